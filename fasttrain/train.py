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
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from fasttrain.checkpoint import latest_checkpoint, load_checkpoint, load_model_weights, save_checkpoint
from fasttrain.data.loader import PackedLoader
from fasttrain.data.packing import packing_backend
from fasttrain.model import GPT, IGNORE_INDEX, ModelConfig
from fasttrain.optim import build_optimizers
from fasttrain.parallel import DistInfo, all_reduce_sum, apply_fsdp


@dataclass
class TrainConfig:
    run: str = field(default="runs/default", metadata={"help": "run directory; each stage writes <run>/<stage>/", "aliases": ["--run-dir"]})
    data: list[str] = field(default_factory=list, metadata={"help": "data files or folders (default: the embedded corpus / generated tasks)"})
    max_steps: int = field(default=0, metadata={"help": "the stage's length in optimizer steps (the LR schedule spans it); 0 = the stage's own budget"})
    seq_len: int = field(default=256, metadata={"help": "tokens per row"})
    batch_tokens: int = field(default=8192, metadata={"help": "tokens per optimizer step over all ranks (gradient accumulation fills it)"})
    micro_batch: int = field(default=8, metadata={"help": "rows per forward/backward on one rank"})
    lr: float = field(default=0.02, metadata={"help": "Muon learning rate for the hidden matrices"})
    embedding_lr: float = field(default=0.2, metadata={"help": "AdamW learning rate for the embedding (scaled by 1/sqrt(width/768))"})
    head_lr: float = field(default=0.004, metadata={"help": "AdamW learning rate for the LM head (scaled by 1/sqrt(width/768))"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    grad_clip: float = field(default=1.0, metadata={"help": "clip the global gradient norm to this; 0 disables"})
    device: str = field(default="auto", metadata={"help": "auto, cpu or cuda"})
    seed: int = field(default=1337, metadata={"help": "seed for initialisation and data order"})
    save_every: int = field(default=0, metadata={"help": "checkpoint every N steps (0 = only at the end)"})
    resume: bool = field(default=False, metadata={"help": "continue this stage from its latest checkpoint"})
    log_every: int = field(default=1, metadata={"help": "print a progress line every N steps"})

    def __post_init__(self):
        for name in ("seq_len", "batch_tokens", "micro_batch", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.batch_tokens % self.seq_len:
            raise ValueError(f"--batch-tokens ({self.batch_tokens}) must be a multiple of --seq-len ({self.seq_len})")

    def rows_per_step(self) -> int:
        return self.batch_tokens // self.seq_len


@dataclass
class StagePlan:
    """What a stage hands the loop."""
    name: str  # the folder under the run: base, mid, sft
    model_config: ModelConfig
    loader: PackedLoader
    total_steps: int  # the schedule's length: --max-steps, else the stage's own budget
    lr_schedule: Callable[[int, int], float]  # (step, total_steps) -> multiplier of each group's initial lr
    init_from: Path | None = None  # checkpoint to take the weights from; None = random init
    extra_meta: dict = field(default_factory=dict)  # saved with every checkpoint (stage settings)


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


def build_model(cfg: ModelConfig, info: DistInfo, seed: int) -> GPT:
    """Meta device -> allocate on the device -> initialise -> FSDP shards it.

    Every rank initialises the full model from the same seed and keeps its shard, so the
    initial weights are the same whatever the world size (initialising the shards with a
    sharded RNG would not be). The full fp32 model must fit one device once.
    """
    with torch.device("meta"):
        model = GPT(cfg)
    model.to_empty(device=info.device)
    torch.manual_seed(seed)
    model.init_weights()
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
        loss_sum = model(b.input_ids, b.targets, b.cu_seqlens, b.max_seqlen)
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


def train(cfg: TrainConfig, plan: StagePlan, info: DistInfo) -> GPT:
    stage_dir = Path(cfg.run) / plan.name
    model = build_model(plan.model_config, info, cfg.seed)
    optimizers = build_optimizers(model, cfg.lr, cfg.embedding_lr, cfg.head_lr, cfg.weight_decay)

    step = 0
    resume_from = latest_checkpoint(stage_dir) if cfg.resume else None
    if resume_from is not None:
        meta = load_checkpoint(resume_from, model, optimizers, info)
        plan.loader.load_state_dict(meta["data_cursor"])
        step = meta["step"]
        if info.is_main:
            print(f"{plan.name}: resumed from {resume_from} at step {step}", file=sys.stderr)
    elif plan.init_from is not None:
        load_model_weights(plan.init_from, model)
    metrics_path = stage_dir / "metrics.jsonl"
    if info.is_main:
        stage_dir.mkdir(parents=True, exist_ok=True)
        # a resumed run rewrites the curve from its checkpoint on; a fresh run starts a new file
        kept = [l for l in metrics_path.read_text().splitlines() if json.loads(l)["step"] <= step] if (
            resume_from is not None and metrics_path.exists()) else []
        metrics_path.write_text("".join(l + "\n" for l in kept))

    last_step = plan.total_steps
    if info.is_main:
        print(f"{plan.name}: {model.num_params() / 1e6:.2f}M parameters, {last_step} steps of {cfg.batch_tokens} tokens "
              f"on {info.world_size} x {info.device.type}, packing with {packing_backend()}", file=sys.stderr)
    flops_per_token = model.flops_per_token(cfg.seq_len)
    peak = peak_flops(info.device)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if info.device.type == "cuda"
                else contextlib.nullcontext())
    meta = {"stage": plan.name, "config": asdict(cfg), "model_config": asdict(plan.model_config), **plan.extra_meta}

    while step < last_step:
        t0 = time.perf_counter()
        batches = [b.to(info.device) for b in plan.loader.next_step()]
        with autocast:
            loss_total, n_scored = accumulate_gradients(model, batches, info.world_size)
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        multiplier = plan.lr_schedule(step, plan.total_steps)
        for opt in optimizers:
            for group in opt.param_groups:
                group["lr"] = group["initial_lr"] * multiplier
            opt.step()
        model.zero_grad(set_to_none=True)
        step += 1

        loss_value = loss_total.item()
        dt = time.perf_counter() - t0
        tokens_per_s = cfg.batch_tokens / dt
        mfu = tokens_per_s * flops_per_token / (peak * info.world_size) if peak else None
        if info.is_main:
            record = {"step": step, "loss": loss_value, "lr": multiplier, "tokens_per_s": tokens_per_s,
                      "scored_tokens": int(n_scored.item()), "utilization": plan.loader.last_stats.get("utilization")}
            if mfu is not None:
                record["mfu"] = mfu
            with metrics_path.open("a") as f:
                f.write(json.dumps(record) + "\n")
            if step % cfg.log_every == 0 or step == last_step:
                print(progress_line(plan.name, step, last_step, loss_value, multiplier, tokens_per_s, mfu),
                      file=sys.stderr, flush=True)
        if not math.isfinite(loss_value):
            raise FloatingPointError(f"{plan.name}: loss became {loss_value} at step {step}; lower --lr")
        if (cfg.save_every and step % cfg.save_every == 0) or step == last_step:
            save_checkpoint(stage_dir, step, model, optimizers, {**meta, "data_cursor": plan.loader.state_dict()}, info)
    return model
