"""Optimizers: Muon for the 2-D hidden matrices, AdamW for the embedding and the LM head.

Both work on plain tensors and on FSDP2's sharded DTensors. Muon orthogonalises each update
(Newton-Schulz iteration), which needs the whole matrix: under FSDP every rank gathers the full
momentum-updated gradient, orthogonalises it, and keeps its own shard. That repeats the
Newton-Schulz work on every rank; at the sizes fasttrain targets the matmuls are cheap next to
the forward and backward, and the code stays one page.
"""
from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor, distribute_tensor


@torch.no_grad()
def zeropower_via_newtonschulz5(G: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Approximately orthogonalise G (m, n): the quintic Newton-Schulz iteration of Muon
    (Keller Jordan), tuned to push all singular values near 1 in a few steps. bf16 on GPU."""
    a, b, c = 3.4445, -4.7750, 2.0315
    X = G.bfloat16() if G.is_cuda else G.float()
    transposed = X.size(0) > X.size(1)
    if transposed:  # iterate on the wide orientation: X @ X.T is the smaller Gram matrix
        X = X.T
    X = X / (X.norm() + 1e-7)  # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):
        A = X @ X.T
        B = b * A + c * A @ A
        X = a * X + B @ X
    return X.T if transposed else X


class Muon(torch.optim.Optimizer):
    """MomentUm Orthogonalized by Newton-schulz, for 2-D weight matrices only.

    update = NS(nesterov momentum of grad) * sqrt(max(1, rows / cols)); p -= lr * update
    """

    def __init__(self, params, lr: float = 0.02, momentum: float = 0.95, ns_steps: int = 5):
        super().__init__(params, dict(lr=lr, momentum=momentum, ns_steps=ns_steps))
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim != 2:
                    raise ValueError(f"Muon takes 2-D matrices only; got a parameter of shape {tuple(p.shape)}")

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("Muon.step takes no closure")
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad)
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - group["momentum"])
                g = p.grad.lerp(buf, group["momentum"])  # Nesterov
                if isinstance(g, DTensor):
                    update = zeropower_via_newtonschulz5(g.full_tensor(), group["ns_steps"])
                    # every rank computed the same full update: keep the local shard, no communication
                    update = distribute_tensor(update.to(p.dtype), p.device_mesh, p.placements, src_data_rank=None)
                else:
                    update = zeropower_via_newtonschulz5(g, group["ns_steps"]).to(p.dtype)
                scale = max(1.0, p.size(0) / p.size(1)) ** 0.5
                p.add_(update, alpha=-group["lr"] * scale)


def build_optimizers(model, matrix_lr: float, embedding_lr: float, head_lr: float, weight_decay: float = 0.0):
    """Muon for the blocks' matrices; AdamW for the embedding and LM head, whose learning rates
    scale as 1/sqrt(width / 768) (nanochat's rule, tuned at width 768).

    Every group records its `initial_lr`; the loop sets lr = initial_lr * schedule(step).
    """
    matrices = [p for p in model.blocks.parameters()]
    dim_scale = (model.config.n_embd / 768) ** -0.5
    adam_groups = [
        dict(params=[model.wte.weight], lr=embedding_lr * dim_scale),
        dict(params=[model.lm_head.weight], lr=head_lr * dim_scale),
    ]
    adamw = torch.optim.AdamW(adam_groups, betas=(0.8, 0.95), eps=1e-10, weight_decay=weight_decay)
    muon = Muon(matrices, lr=matrix_lr)
    optimizers = [adamw, muon]
    for opt in optimizers:
        for group in opt.param_groups:
            group["initial_lr"] = group["lr"]
    return optimizers
