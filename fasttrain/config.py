"""Every command's configuration, one dataclass per concern; the command line is generated from
them (fasttrain/cli.py), and the resolved values are saved with every checkpoint.

Kept free of torch (and of numba) so that `python -m fasttrain --help` and the tokenizer command
start at once: the modules that do the work (train.py, model.py, stages/, evaluate.py,
speedrun.py) import their config from here, and export it under their own name as well.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields

from fasttrain.cli import check_ranges
from fasttrain.errors import ConfigError

# Smallest --vocab-size: the 256 bytes, the tokenizer's special tokens and a few merges.
MIN_VOCAB_SIZE = 300


# --- tokenizer (python -m fasttrain tokenizer)
@dataclass
class TokenizerConfig:
    run: str = field(default="runs/default", metadata={"help": "run directory; the tokenizer goes to <run>/tokenizer", "aliases": ["--run-dir"]})
    data: list[str] = field(default_factory=list, metadata={"help": "text files or folders (default: the embedded corpus)"})
    vocab_size: int = field(default=4096, metadata={"help": "vocabulary size, including the 256 bytes and the special tokens", "range": (MIN_VOCAB_SIZE, None)})
    max_mb: float = field(default=0.0, metadata={"help": "train on at most this many MB of text; 0 = all", "range": (0, None)})

    def __post_init__(self):
        check_ranges(self)


# --- token shards (python -m fasttrain data; base does it when needed)
SHARD_TOKENS = 1 << 27  # 256 MB of uint16 tokens per shard


@dataclass
class DataConfig:
    run: str = field(default="runs/default", metadata={"help": "run directory: reads <run>/tokenizer, writes the token shards to <run>/data/base", "aliases": ["--run-dir"]})
    data: list[str] = field(default_factory=list, metadata={"help": "text, JSONL or Parquet files or folders (default: the embedded corpus)"})
    workers: int = field(default=0, metadata={"help": "tokenising processes; 0 = one per CPU core (at most 16)", "range": (0, None)})
    shard_tokens: int = field(default=SHARD_TOKENS, metadata={"help": "a new shard after this many tokens (2**27: 256 MB of uint16 ids); a worker holds one shard in memory", "range": (1, None)})

    def __post_init__(self):
        check_ranges(self)


# --- training: every stage (fasttrain/train.py)
@dataclass
class TrainConfig:
    run: str = field(default="runs/default", metadata={"help": "run directory; each stage writes <run>/<stage>/", "aliases": ["--run-dir"]})
    data: list[str] = field(default_factory=list, metadata={"help": "data files or folders (default: the embedded corpus / generated tasks)"})
    max_steps: int = field(default=0, metadata={"help": "the stage's length in optimizer steps (the LR schedule spans it); 0 = the stage's own budget", "range": (0, None)})
    seq_len: int = field(default=256, metadata={"help": "tokens per row", "range": (1, None)})
    batch_tokens: int = field(default=8192, metadata={"help": "tokens per optimizer step over all ranks (gradient accumulation fills it)", "range": (1, None)})
    micro_batch: int = field(default=8, metadata={"help": "rows per forward/backward on one rank", "range": (1, None)})
    lr: float = field(default=0.02, metadata={"help": "Muon learning rate for the hidden matrices", "range": (0, None)})
    embedding_lr: float = field(default=0.2, metadata={"help": "AdamW learning rate for the embedding (scaled by 1/sqrt(width/768))", "range": (0, None)})
    head_lr: float = field(default=0.004, metadata={"help": "AdamW learning rate for the LM head (scaled by 1/sqrt(width/768))", "range": (0, None)})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay", "range": (0, None)})
    grad_clip: float = field(default=1.0, metadata={"help": "clip the global gradient norm to this; 0 disables", "range": (0, None)})
    device: str = field(default="auto", metadata={"help": "auto, cpu or cuda"})
    seed: int = field(default=1337, metadata={"help": "seed for initialisation and data order", "range": (0, 2**32 - 1)})
    save_every: int = field(default=0, metadata={"help": "checkpoint every N steps (0 = only at the end)", "range": (0, None)})
    resume: bool = field(default=False, metadata={"help": "continue this stage from its newest intact checkpoint"})
    overwrite: bool = field(default=False, metadata={"help": "start the stage afresh even if it holds a run: the old one is moved aside to <run>/<stage>.old-<k>"})
    keep_checkpoints: int = field(default=3, metadata={"help": "keep the newest N checkpoints of the stage (0 = all)", "range": (0, None)})
    max_bad_steps: int = field(default=10, metadata={"help": "stop after this many bad steps in a row (non-finite loss or gradients: update skipped; or loss worse than a uniform guess)", "range": (1, None)})
    compile: bool | None = field(default=None, metadata={"help": "torch.compile each block (fullgraph; the kernels stay opaque custom ops); default: on for CUDA; off on CPU, where it measured no clear gain and compiling takes a minute or more (bench/RESULTS.md, End to end (CPU))"})
    warmup_kernels: bool | None = field(default=None, metadata={"help": "before the first step, run forward+backward once on dummy micro-batches of the training shape, one per document-length variant the kernels compile and autotune for, then drop the gradients (no optimizer step; the loss curve is unchanged), so the first steps do not stall; default: on for CUDA, off on CPU (the PyTorch paths compile nothing)"})
    log_every: int = field(default=1, metadata={"help": "print a progress line every N steps", "range": (1, None)})

    def __post_init__(self):
        check_ranges(self)
        if self.batch_tokens % self.seq_len:
            raise ConfigError(f"--batch-tokens ({self.batch_tokens}) must be a multiple of --seq-len ({self.seq_len})")
        if self.rows_per_step() % self.micro_batch:
            raise ConfigError(f"--batch-tokens / --seq-len = {self.rows_per_step()} rows per step, which --micro-batch "
                              f"({self.micro_batch}) must divide; change one of them")

    def rows_per_step(self) -> int:
        return self.batch_tokens // self.seq_len


# --- the model (fasttrain/model.py)
ROPE_SCALINGS = ("none", "linear", "ntk", "yarn", "llama3")


@dataclass
class ModelConfig:
    depth: int = field(default=4, metadata={"help": "number of blocks; the one size dial: width and heads follow from it", "range": (1, None)})
    aspect_ratio: int = field(default=64, metadata={"help": "model width = depth * aspect_ratio (unless --n-embd is set)", "range": (1, None)})
    n_embd: int = field(default=0, metadata={"help": "model width; 0 derives it from --depth", "range": (0, None)})
    head_dim: int = field(default=64, metadata={"help": "width of one attention head (even, for RoPE)", "range": (2, 256)})
    n_head: int = field(default=0, metadata={"help": "query heads; 0 derives n_embd // head_dim", "range": (0, None)})
    n_kv_head: int = field(default=0, metadata={"help": "key/value heads (GQA when fewer than n_head); 0 means n_head", "range": (0, None)})
    vocab_size: int = field(default=0, metadata={"help": "set from the tokenizer; 0 = not yet", "cli": False, "range": (0, None)})
    mlp_ratio: int = field(default=4, metadata={"help": "MLP hidden width = mlp_ratio * n_embd", "range": (1, None)})
    logit_softcap: float = field(default=15.0, metadata={"help": "logits = c * tanh(logits / c); 0 disables", "range": (0, None)})
    rope_base: float = field(default=10000.0, metadata={"help": "RoPE base frequency", "range": (0, None), "low_exclusive": True})
    rope_scaling: str = field(default="none", metadata={"help": "RoPE scaling for context extension: none, linear, ntk, yarn, llama3"})
    rope_factor: float = field(default=1.0, metadata={"help": "context extension factor for --rope-scaling", "range": (1, None)})
    rope_original_len: int = field(default=0, metadata={"help": "sequence length the model was trained at before extension (yarn, llama3); 0 = max_seq_len", "range": (0, None)})
    max_seq_len: int = field(default=512, metadata={"help": "longest sequence the RoPE tables cover (set from --seq-len)", "cli": False, "range": (1, None)})

    def __post_init__(self):
        check_ranges(self)
        if self.n_embd == 0:
            self.n_embd = self.depth * self.aspect_ratio
        if self.n_head == 0:
            self.n_head = max(1, self.n_embd // self.head_dim)
        if self.n_kv_head == 0:
            self.n_kv_head = self.n_head
        if self.n_head % self.n_kv_head:
            raise ConfigError(f"--n-head ({self.n_head}) must be a multiple of --n-kv-head ({self.n_kv_head})")
        if self.head_dim % 2:
            raise ConfigError(f"--head-dim must be even for RoPE, got {self.head_dim}")
        if self.rope_scaling not in ROPE_SCALINGS:
            raise ConfigError(f"--rope-scaling must be one of {', '.join(ROPE_SCALINGS)}; got {self.rope_scaling!r}")


# --- the stages (fasttrain/stages/): each has one options dataclass, listed in TRAINING_STAGES
@dataclass
class BaseConfig(ModelConfig):
    """The base stage's options: the model's shape (ModelConfig's fields) and the budget and schedule."""
    tokens_per_param: float = field(default=20.0, metadata={"help": "token budget = this x parameter count (unless --max-steps)", "range": (0, None), "low_exclusive": True})
    warmup_steps: int = field(default=0, metadata={"help": "linear LR warmup steps", "range": (0, None)})
    warmdown_frac: float = field(default=0.2, metadata={"help": "fraction of steps of the final linear LR decay", "range": (0, 1)})
    final_lr_frac: float = field(default=0.0, metadata={"help": "LR at the end of the warmdown, as a fraction of the peak", "range": (0, 1)})
    val_tokens: int = field(default=0, metadata={"help": "tokens held out for validation, the end of the token stream; 0 = 1%% of it (at least 4096 when the corpus has twice that, at most 4M)", "range": (0, None)})

    def model_config(self) -> ModelConfig:
        return ModelConfig(**{f.name: getattr(self, f.name) for f in fields(ModelConfig)})


# The default mixtures draw from five tasks; a smaller mixture cannot hold one of each.
MIN_MIXTURE_SIZE = 5


@dataclass
class MidConfig:
    mixture_size: int = field(default=20000, metadata={"help": "generated conversations in the default task mixture (at least one per task)", "range": (MIN_MIXTURE_SIZE, None)})
    warmdown_frac: float = field(default=0.2, metadata={"help": "fraction of steps of the final linear LR decay to 0", "range": (0, 1)})
    rope_base: float = field(default=0.0, metadata={"help": "new RoPE base frequency for context extension; 0 keeps the base model's", "range": (0, None)})
    rope_scaling: str = field(default="", metadata={"help": "new RoPE scaling (none, linear, ntk, yarn, llama3); empty keeps the base model's"})
    rope_factor: float = field(default=0.0, metadata={"help": "context extension factor (>= 1) for --rope-scaling; 0 keeps the base model's", "range": (0, None)})
    text_fraction: float = field(default=0.0, metadata={"help": "mix the base corpus (its train split) into mid's stream as this fraction of its tokens: long documents give long-range context (for context extension) and keep the model on the base text; 0 = conversations only", "range": (0, 1)})

    def __post_init__(self):
        check_ranges(self)
        if self.text_fraction >= 1:
            raise ConfigError(f"--text-fraction must be below 1 (mid keeps its conversations), got {self.text_fraction}")
        if 0 < self.rope_factor < 1:
            raise ConfigError(f"--rope-factor must be 0 (keep the base model's) or >= 1 (the new context over the "
                              f"old), got {self.rope_factor}")
        if self.rope_scaling not in ("", *ROPE_SCALINGS):
            raise ConfigError(f"--rope-scaling must be empty (keep the base model's) or one of "
                              f"{', '.join(ROPE_SCALINGS)}; got {self.rope_scaling!r}")


@dataclass
class SFTConfig:
    mixture_size: int = field(default=5000, metadata={"help": "generated conversations in the default SFT mixture (at least one per task)", "range": (MIN_MIXTURE_SIZE, None)})
    epochs: int = field(default=1, metadata={"help": "passes over the conversations", "range": (1, None)})
    pack: bool = field(default=True, metadata={"help": "pack conversations with document masking (--no-pack: one per row, padded)"})
    warmdown_frac: float = field(default=0.5, metadata={"help": "LR is flat, then decays linearly to 0 over this fraction of steps", "range": (0, 1)})

    def __post_init__(self):
        check_ranges(self)


# the generated tasks with a checkable answer, RL's default prompts (fasttrain/data/tasks.py)
RL_TASKS = ("arithmetic", "spelling", "letter_count")


@dataclass
class RLConfig:
    tasks: list[str] = field(default_factory=list, metadata={"help": "generated tasks to sample prompts from when no --data is given: arithmetic, spelling, letter_count; empty = all three"})
    problems: int = field(default=1000, metadata={"help": "prompts drawn from each generated task's train split (repeats included)", "range": (1, None)})
    samples_per_prompt: int = field(default=8, metadata={"help": "answers sampled per prompt: the group its advantages are relative to", "range": (2, None)})
    max_new_tokens: int = field(default=64, metadata={"help": "longest answer in tokens (and at most --seq-len minus the prompt)", "range": (1, None)})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature", "range": (0, None), "low_exclusive": True})
    top_k: int = field(default=0, metadata={"help": "sample from the k most likely tokens; 0 = all", "range": (0, None)})
    lr_frac: float = field(default=0.2, metadata={"help": "learning rates as a fraction of --lr, --embedding-lr and --head-lr", "range": (0, 1), "low_exclusive": True})
    warmdown_frac: float = field(default=1.0, metadata={"help": "LR decays linearly to 0 over this fraction of the steps (1 = from the start)", "range": (0, 1)})

    def __post_init__(self):
        check_ranges(self)
        unknown = [t for t in self.tasks if t not in RL_TASKS]
        if unknown:
            raise ConfigError(f"--tasks: unknown task {unknown[0]!r}; choose from {', '.join(RL_TASKS)}")


# --- the registry of training stages, in training order: the commands, their options, the run's
# folders, the speedrun, eval's columns and the stage a checkpoint is loaded from all follow it.
@dataclass(frozen=True)
class StageSpec:
    name: str  # the command, the folder <run>/<name>, and the module fasttrain/stages/<name>.py, whose
    #            plan(cfg: TrainConfig, options, info: DistInfo) -> StagePlan the one loop runs
    help: str
    options: type  # the stage's options dataclass; its flags follow TrainConfig's


TRAINING_STAGES = (
    StageSpec("base", "base pretraining on raw text", BaseConfig),
    StageSpec("mid", "mid-training on the conversation task mixture", MidConfig),
    StageSpec("sft", "chat SFT on conversations, assistant tokens scored", SFTConfig),
    StageSpec("rl", "reinforcement learning on prompts with checkable answers (sampled answers, "
                    "group-relative advantages)", RLConfig),
)


# --- eval and chat (fasttrain/evaluate.py)
STAGES = tuple(s.name for s in reversed(TRAINING_STAGES))  # the latest stage first


# the generated tasks `eval` scores by default (fasttrain/data/tasks.py)
EVAL_TASKS = ("arithmetic", "spelling", "letter_count", "identity")


@dataclass
class EvalConfig:
    run: str = field(default="runs/default", metadata={"help": "run directory", "aliases": ["--run-dir"]})
    stage: str = field(default="all", metadata={"help": "base, mid, sft, rl, or all (every stage with a checkpoint); empty = all"})
    data: list[str] = field(default_factory=list, metadata={"help": "task files to score (chat, GSM8K-style or multiple-choice JSONL, told by their first record's keys), and the text whose held-out part is scored (default: what the base stage trained on)"})
    tasks: list[str] = field(default_factory=list, metadata={"help": "tasks to score: arithmetic, spelling, letter_count, identity, or a task file's name without .jsonl; empty = all, none = only the validation loss"})
    device: str = field(default="auto", metadata={"help": "auto, cpu or cuda"})
    val_tokens: int = field(default=32768, metadata={"help": "held-out tokens to score", "range": (1, None)})
    problems: int = field(default=20, metadata={"help": "test problems drawn per generated task (repeats are scored once)", "range": (1, None)})
    max_examples: int = field(default=200, metadata={"help": "score at most this many examples per task; 0 = all", "range": (0, None)})
    few_shot: int = field(default=3, metadata={"help": "solved examples of the same task before each question for the base model (plain Q:/A: text)", "range": (0, None)})
    samples: int = field(default=0, metadata={"help": "also sample k answers per problem at --temperature and report pass@1 and pass@k; 0 = greedy only", "range": (0, None)})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature for --samples", "range": (0, None), "low_exclusive": True})
    json: str = field(default="", metadata={"help": "also write every figure to this JSON file"})
    long_context: int = field(default=0, metadata={"help": "also measure long context at this many tokens: loss by position bucket on single held-out documents, and passkey accuracy by length x depth; 0 = off", "range": (0, None)})

    def __post_init__(self):
        check_ranges(self)
        if self.stage not in ("", "all", *STAGES):
            raise ConfigError(f"--stage must be all (every stage with a checkpoint) or one of "
                              f"{', '.join(reversed(STAGES))}; got {self.stage!r}")


@dataclass
class ChatConfig:
    run: str = field(default="runs/default", metadata={"help": "run directory", "aliases": ["--run-dir"]})
    stage: str = field(default="", metadata={"help": "base, mid, sft or rl; empty = the latest stage with a checkpoint"})
    prompt: str = field(default="", metadata={"help": "one message to answer; empty = read messages from stdin, one per line"})
    device: str = field(default="auto", metadata={"help": "auto, cpu or cuda"})
    max_new_tokens: int = field(default=64, metadata={"help": "longest reply in tokens", "range": (1, None)})
    temperature: float = field(default=0.0, metadata={"help": "0 = greedy", "range": (0, None)})
    top_k: int = field(default=0, metadata={"help": "sample from the k most likely tokens; 0 = all", "range": (0, None)})
    top_p: float = field(default=1.0, metadata={"help": "sample from the most likely tokens whose probability reaches top_p; 1 = all", "range": (0, 1), "low_exclusive": True})
    seed: int = field(default=0, metadata={"help": "sampling seed", "range": (0, 2**32 - 1)})

    def __post_init__(self):
        check_ranges(self)
        _check_stage(self.stage)


def _check_stage(stage: str):
    if stage not in ("", *STAGES):
        raise ConfigError(f"--stage must be empty (the latest stage with a checkpoint) or one of "
                          f"{', '.join(reversed(STAGES))}; got {stage!r}")


# --- the speedrun (fasttrain/speedrun.py)
@dataclass
class SpeedrunConfig:
    run: str = field(default="runs/speedrun", metadata={"help": "run directory", "aliases": ["--run-dir"]})
    device: str = field(default="auto", metadata={"help": "auto, cpu or cuda"})
    depth: int = field(default=2, metadata={"help": "model depth (width = 64 x depth)", "range": (1, None)})
    vocab_size: int = field(default=4096, metadata={"help": "tokenizer vocabulary", "range": (MIN_VOCAB_SIZE, None)})
    tokenizer_mb: float = field(default=8.0, metadata={"help": "MB of corpus the tokenizer trains on; 0 = all", "range": (0, None)})
    seq_len: int = field(default=256, metadata={"help": "tokens per row", "range": (1, None)})
    batch_tokens: int = field(default=4096, metadata={"help": "tokens per optimizer step", "range": (1, None)})
    base_steps: int = field(default=120, metadata={"help": "base pretraining steps (0 = the token budget)", "range": (0, None)})
    mid_steps: int = field(default=40, metadata={"help": "mid-training steps (0 = one pass over the mixture)", "range": (0, None)})
    sft_steps: int = field(default=30, metadata={"help": "SFT steps (0 = one epoch)", "range": (0, None)})
    rl: bool = field(default=False, metadata={"help": "add the RL stage after SFT"})
    rl_steps: int = field(default=80, metadata={"help": "RL steps with --rl (0 = one pass over the prompts)", "range": (0, None)})
    seed: int = field(default=1337, metadata={"help": "seed", "range": (0, 2**32 - 1)})
    overwrite: bool = field(default=False, metadata={"help": "if the run folder holds an earlier speedrun, move its stages aside and start again"})

    def __post_init__(self):
        check_ranges(self)
        # checked here too (the stages check it again) so a bad pair fails before the tokenizer trains
        if self.batch_tokens % self.seq_len:
            raise ConfigError(f"--batch-tokens ({self.batch_tokens}) must be a multiple of --seq-len ({self.seq_len})")
