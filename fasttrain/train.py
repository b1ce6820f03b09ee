"""The one training loop. Every stage (base, mid, sft) runs through `train()`; a stage only
chooses the data, the loss mask (already in the targets) and the schedule.

Per optimizer step:
    micro-batches = loader.next_step()                          this rank's share of the global batch
    n = number of scored targets in the whole global batch       (all micro-batches, all ranks)
    for each micro-batch: (loss_sum * world_size / n).backward()
        FSDP averages gradients over ranks, so the world_size factor makes the result the
        gradient of  sum(loss over scored tokens) / n  -- masked stages weight tokens, not batches
    clip, set lr = initial_lr * schedule(step), step every optimizer
"""
from __future__ import annotations

import contextlib
import json
import math
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch.distributed.tensor import DTensor

from fasttrain.checkpoint import load_checkpoint, load_model_weights, save_checkpoint
from fasttrain.config import TrainConfig  # defined without torch, for the command line
from fasttrain.data.batch import IGNORE_INDEX, Batch
from fasttrain.data.loader import PackedLoader
from fasttrain.data.packing import packing_backend
from fasttrain.errors import Diverged, Interrupted, RunError, file_system
from fasttrain.kernels.attention import warmup_seqlens
from fasttrain.model import GPT, ModelConfig
from fasttrain.optim import build_optimizers
from fasttrain.parallel import DistInfo, all_reduce_max, all_reduce_sum, apply_fsdp
from fasttrain.rundir import Stage, tokenizer_dir


@dataclass
class StagePlan:
    """What a stage hands the loop."""
    name: str  # the folder under the run: base, mid, sft
    model_config: ModelConfig
    loader: PackedLoader  # or RL's RolloutSource: next_step, last_stats, state_dict, load_state_dict, close
    total_steps: int  # the schedule's length: --max-steps, else the stage's own budget
    lr_schedule: Callable[[int, int], float]  # (step, total_steps) -> multiplier of each group's initial lr
    init_from: Path | None = None  # checkpoint to take the weights from; None = random init
    extra_meta: dict = field(default_factory=dict)  # saved with every checkpoint (stage settings)
    on_model: Callable[[GPT], None] | None = None  # given the built model before the first step (RL samples from it)


def lr_multiplier(step: int, total: int, warmup: int = 0, warmdown_frac: float = 0.2, final_frac: float = 0.0) -> float:
    """Warmup -> stable -> linear warmdown, a pure function of the step.

    step < warmup:                 linear ramp (step + 1) / warmup
    then until the warmdown:       1.0
    last warmdown_frac of steps:   linear from 1.0 to final_frac at the last step
    """
    if step < warmup:
        return (step + 1) / warmup
    warmdown = round(warmdown_frac * total)
    if warmdown == 0 or step < total - warmdown:
        return 1.0
    progress = (step - (total - warmdown) + 1) / warmdown  # (0, 1]
    return 1.0 - progress * (1.0 - final_frac)


# Dense bf16 peak FLOP/s by device name (datasheet, without sparsity). Unknown devices: no MFU.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "A800": 312e12,
              "L40S": 362e12, "4090": 165e12, "B200": 2250e12, "GH200": 989e12}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, flops in PEAK_FLOPS.items():
        if key in name:
            return flops
    return None


def compile_blocks(model: GPT) -> GPT:
    """torch.compile each block's forward with fullgraph=True, in place; returns the model.

    The blocks hold what fuses: norms, ReLU^2, residual adds and the reshapes around the
    projections; attention and RoPE are torch.library custom ops, which the compiler keeps as
    opaque calls, so the Triton kernels run as they are. The forward method is compiled, not the
    module call, so the hooks FSDP adds around each block's call stay outside the graph; the
    embedding and the fused LM head + loss are one op each and have nothing to fuse. Generation
    with a KV cache (RL's sampling) runs the blocks eagerly: its cache writes and per-row lengths
    are not one graph.
    """
    for block in model.blocks:
        block.forward = _compiled_unless_cached(block.forward, torch.compile(block.forward, fullgraph=True))
    return model


def _compiled_unless_cached(eager, compiled):
    def forward(x, cos, sin, cu_seqlens=None, max_seqlen=0, cache=None):
        if cache is not None:
            return eager(x, cos, sin, cu_seqlens, max_seqlen, cache)
        return compiled(x, cos, sin, cu_seqlens, max_seqlen)
    return forward


def use_compile(cfg: TrainConfig, device: torch.device) -> bool:
    """--compile / --no-compile, else on for CUDA and off on CPU: there the compiled step measured
    0.96x to 1.19x the eager one at nanochat's depth-4 shape (no clear gain), and compiling takes a
    minute or more on 2 cores, longer than the short CPU runs (the speedrun's stages, the tests)
    could win back; see bench/RESULTS.md, "End to end (CPU)"."""
    return cfg.compile if cfg.compile is not None else device.type == "cuda"


def use_warmup(cfg: TrainConfig, device: torch.device) -> bool:
    """--warmup-kernels / --no-warmup-kernels, else on for CUDA, where the Triton kernels compile
    and autotune on first use, and off on CPU, where the PyTorch paths compile nothing."""
    return cfg.warmup_kernels if cfg.warmup_kernels is not None else device.type == "cuda"


def warmup_batches(seq_len: int, micro_batch: int) -> list[Batch]:
    """Dummy micro-batches of the training shape (micro_batch, seq_len), one per kernel variant
    the loader's batches reach: each row cut into documents of n tokens (the last one shorter),
    for each n of `warmup_seqlens(seq_len)`; every row start is a document start, as in the
    loader's batches, and every target is scored."""
    batches = []
    for n in warmup_seqlens(seq_len):
        row = [n] * (seq_len // n) + ([seq_len % n] if seq_len % n else [])
        cu_seqlens = torch.tensor([0] + row * micro_batch).cumsum(0).to(torch.int32)  # (S + 1,)
        ids = torch.zeros(micro_batch, seq_len, dtype=torch.int64)
        batches.append(Batch(ids, ids.clone(), cu_seqlens, n))
    return batches


def warm_up_kernels(model, batches: list[Batch], autocast, device: torch.device) -> None:
    """Forward + backward once on each batch (in the training autocast), then drop the gradients:
    no optimizer step, and the RNG states are restored, so the training that follows is the
    same as without it. Under FSDP every rank calls it with the same batches (the backward's
    collectives)."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        for b in batches:
            b = b.to(device)
            with autocast:
                model(b.input_ids, b.targets, b.cu_seqlens, b.max_seqlen).backward()
    model.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_model(cfg: ModelConfig, info: DistInfo, seed: int, compile: bool = False) -> GPT:
    """Meta device -> allocate on the device -> initialise -> compile (optional) -> FSDP shards it.

    Every rank initialises the full model from the same seed and keeps its shard, so the
    initial weights are the same whatever the world size (initialising the shards with a
    sharded RNG would not be). The full fp32 model must fit one device once.
    """
    with torch.device("meta"):
        model = GPT(cfg)
    model.to_empty(device=info.device)
    torch.manual_seed(seed)
    model.init_weights()
    if compile:
        compile_blocks(model)
    return apply_fsdp(model, info.device)


def accumulate_gradients(model, batches, world_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Backward over this rank's micro-batches so that the gradients (after FSDP's average over
    ranks) are those of  sum(loss over scored targets in the global batch) / n_scored.

    Returns (that loss, n_scored), both summed over all ranks.
    """
    # the global count of scored targets is known before any forward: targets are data
    n_scored = all_reduce_sum(sum((b.targets != IGNORE_INDEX).sum() for b in batches).to(torch.float32))
    loss_total = torch.zeros((), device=n_scored.device)
    for b in batches:
        loss_sum = model(b.input_ids, b.targets, b.cu_seqlens, b.max_seqlen, weights=b.weights)
        loss = loss_sum * world_size / n_scored.clamp(min=1)  # x world_size undoes FSDP's average
        loss.backward()
        loss_total += loss.detach() / world_size
    return all_reduce_sum(loss_total), n_scored


def progress_line(stage: str, step: int, total: int, loss: float, lr: float, tok_s: float, mfu: float | None) -> str:
    width = 20
    filled = int(width * step / max(total, 1))
    mfu_s = f"{100 * mfu:.1f}%" if mfu is not None else "-"
    return (f"{stage:4s} [{'#' * filled}{'.' * (width - filled)}] {step}/{total}  loss {loss:.4f}  "
            f"lr x{lr:.3f}  {tok_s / 1e3:.1f}k tok/s  MFU {mfu_s}")


class StopSignals:
    """SIGTERM and SIGINT (Ctrl-C) ask the loop to stop: it finishes the step, saves a
    checkpoint and exits 143 / 130. Every rank stops after the same step: the ranks agree on
    the request once per step (a 1-element all-reduce), whichever rank saw the signal first.
    Repeats of the signal are ignored (torchrun forwards a Ctrl-C that the workers also got);
    SIGKILL or Ctrl-\\ stops at once."""
    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __enter__(self):
        self.signum, self._previous = 0, {}
        if threading.current_thread() is threading.main_thread():  # only the main thread may set handlers
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signum = self.signum or signum

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def agreed(self, device: torch.device) -> int:
        """The signal number any rank received so far (0 = none)."""
        return int(all_reduce_max(torch.tensor(self.signum, device=device)))


def _json_number(x: float) -> float | None:
    return x if math.isfinite(x) else None  # strict JSON has no NaN or Infinity


def train(cfg: TrainConfig, plan: StagePlan, info: DistInfo, stage: Stage) -> GPT:
    """Run `plan` in the claimed stage folder (see rundir.claim_stage) to its last step."""
    model = build_model(plan.model_config, info, cfg.seed, compile=use_compile(cfg, info.device))
    optimizers = build_optimizers(model, cfg.lr, cfg.embedding_lr, cfg.head_lr, cfg.weight_decay)

    step = 0
    if stage.resume_from is not None:
        meta = load_checkpoint(stage.resume_from, model, optimizers, info)
        if meta.get("tokenizer") != plan.extra_meta.get("tokenizer"):
            raise RunError(f"{stage.resume_from} was trained with another tokenizer than the one in "
                           f"{tokenizer_dir(cfg.run)} now; restore that tokenizer, or --overwrite to start the stage afresh")
        plan.loader.load_state_dict(meta["data_cursor"])
        step = meta["step"]
        if info.is_main:
            print(f"{plan.name}: resumed from {stage.resume_from} at step {step}", file=sys.stderr)
    elif plan.init_from is not None:
        load_model_weights(plan.init_from, model)
    if plan.on_model is not None:
        plan.on_model(model)
    if info.is_main:
        with file_system(f"cannot write {stage.metrics}"):
            # a resumed run rewrites the curve from its checkpoint on; a fresh run starts a new file
            kept = [l for l in stage.metrics.read_text().splitlines() if json.loads(l)["step"] <= step] if (
                step and stage.metrics.exists()) else []
            stage.metrics.write_text("".join(l + "\n" for l in kept))

    last_step = plan.total_steps
    if info.is_main:
        print(f"{plan.name}: {model.num_params() / 1e6:.2f}M parameters, {last_step} steps of {cfg.batch_tokens} tokens "
              f"on {info.world_size} x {info.device.type}{', compiled' if use_compile(cfg, info.device) else ''}, packing with {packing_backend()}", file=sys.stderr)
    flops_per_token = model.flops_per_token(cfg.seq_len)
    peak = peak_flops(info.device)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if info.device.type == "cuda"
                else contextlib.nullcontext())
    meta = {"stage": plan.name, "config": asdict(cfg), "model_config": asdict(plan.model_config), **plan.extra_meta}
    # a step is bad when its loss or gradient norm is not finite (its update is skipped), or when
    # its loss is worse than guessing uniformly over the vocabulary by a nat (diverging)
    worse_than_uniform = math.log(plan.model_config.vocab_size) + 1.0
    bad_in_a_row, bad_total = 0, 0
    last_good = stage.resume_from  # the checkpoint to go back to if the run diverges
    warmup_s = None  # logged with the first step
    if use_warmup(cfg, info.device):
        t0 = time.perf_counter()
        batches = warmup_batches(cfg.seq_len, cfg.micro_batch)
        warm_up_kernels(model, batches, autocast, info.device)
        warmup_s = time.perf_counter() - t0
        if info.is_main:
            print(f"{plan.name}: kernels warmed up (compiled and autotuned) on {len(batches)} dummy micro-batches "
                  f"in {warmup_s:.1f} s", file=sys.stderr, flush=True)

    # closing: stops the loader's prefetch thread however the loop ends (a signal, an error)
    with StopSignals() as stop, contextlib.closing(plan.loader):
        while step < last_step:
            t0 = time.perf_counter()
            batches = [b.to(info.device) for b in plan.loader.next_step()]
            with autocast:
                loss_total, n_scored = accumulate_gradients(model, batches, info.world_size)
            grad_norm = clip_grad_norm(model, cfg.grad_clip)
            # one device-to-host copy for the step's three numbers (each .item() would sync)
            loss_value, grad_norm, scored = torch.stack([loss_total, grad_norm.to(loss_total), n_scored]).tolist()
            finite = math.isfinite(loss_value) and math.isfinite(grad_norm)
            multiplier = plan.lr_schedule(step, plan.total_steps)
            if finite:
                for opt in optimizers:
                    for group in opt.param_groups:
                        group["lr"] = group["initial_lr"] * multiplier
                    opt.step()
            model.zero_grad(set_to_none=True)
            step += 1
            bad = not finite or loss_value > worse_than_uniform
            bad_in_a_row = bad_in_a_row + 1 if bad else 0
            bad_total += bad

            dt = time.perf_counter() - t0
            tokens_per_s = cfg.batch_tokens / dt
            stats = plan.loader.last_stats
            mfu = tokens_per_s * flops_per_token / (peak * info.world_size) if peak else None
            if info.is_main:
                # train_tokens_per_s leaves out the time spent waiting for data (RL: sampling)
                train_s = max(dt - stats.get("wait_s", 0.0), 1e-9)
                record = {"step": step, "loss": _json_number(loss_value), "grad_norm": _json_number(grad_norm),
                          "lr": multiplier, "tokens_per_s": tokens_per_s,
                          "train_tokens_per_s": stats.get("train_tokens", cfg.batch_tokens) / train_s,
                          "scored_tokens": int(scored), "utilization": stats.get("utilization"),
                          "data_wait_s": stats.get("wait_s"), "skipped": not finite, "bad_steps": bad_total,
                          **stats.get("metrics", {})}
                if mfu is not None:
                    record["mfu"] = mfu
                if warmup_s is not None:
                    record["warmup_s"], warmup_s = warmup_s, None
                with file_system(f"cannot write {stage.metrics}"), stage.metrics.open("a") as f:
                    f.write(json.dumps(record, allow_nan=False) + "\n")
                if step % cfg.log_every == 0 or step == last_step or bad:
                    print(progress_line(plan.name, step, last_step, loss_value, multiplier, tokens_per_s, mfu)
                          + "".join(f"  {k} {v:.3g}" for k, v in stats.get("metrics", {}).items())
                          + ("  (non-finite: update skipped)" if not finite else ""), file=sys.stderr, flush=True)
            if bad_in_a_row >= cfg.max_bad_steps:
                what = "loss or gradient norm not finite" if not finite else f"loss above {worse_than_uniform:.2f}, worse than a uniform guess"
                back = f"the last good checkpoint is {last_good}" if last_good else "no checkpoint was saved before it"
                raise Diverged(f"{plan.name}: {bad_in_a_row} bad steps in a row, up to step {step} ({what}); "
                               f"{back}. Lower the learning rates (now --lr {cfg.lr:g} --embedding-lr {cfg.embedding_lr:g} "
                               f"--head-lr {cfg.head_lr:g}) and start again, or raise --max-bad-steps")
            signum = stop.agreed(info.device) if step < last_step else 0
            due = cfg.save_every and step % cfg.save_every == 0 and bad_in_a_row == 0
            if signum or due or step == last_step:
                last_good = save_checkpoint(stage.path, step, model, optimizers,
                                            {**meta, "data_cursor": plan.loader.state_dict()}, info,
                                            keep=cfg.keep_checkpoints)
            if signum:
                name = signal.Signals(signum).name
                raise Interrupted(f"{plan.name}: stopped by {name} after step {step}; saved {last_good} "
                                  f"(continue with --resume)", signum)
    return model


def clip_grad_norm(model, max_norm: float) -> torch.Tensor:
    """Clip the global gradient norm to max_norm (0 = no clipping); returns the norm before, a
    0-dim tensor on the device."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm if max_norm > 0 else math.inf)
    return norm.full_tensor() if isinstance(norm, DTensor) else norm
