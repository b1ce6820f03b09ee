"""python -m fasttrain {tokenizer,data,base,mid,sft,eval,chat,speedrun} --run DIR ...

Any command runs single-process as it is, or data-parallel under
`torchrun --nproc_per_node N -m fasttrain <command> ...`. `--help` on each command lists its flags.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field

from fasttrain.cli import add_dataclass_args, check_ranges, dataclass_from_args
from fasttrain.data.corpus import SHARD_TOKENS
from fasttrain.errors import FasttrainError
from fasttrain.model import ModelConfig
from fasttrain.tokenizer import MIN_VOCAB_SIZE
from fasttrain.train import TrainConfig


@dataclass
class TokenizerConfig:
    run: str = field(default="runs/default", metadata={"help": "run directory; the tokenizer goes to <run>/tokenizer", "aliases": ["--run-dir"]})
    data: list[str] = field(default_factory=list, metadata={"help": "text files or folders (default: the embedded corpus)"})
    vocab_size: int = field(default=4096, metadata={"help": "vocabulary size, including the 256 bytes and the special tokens", "range": (MIN_VOCAB_SIZE, None)})
    max_mb: float = field(default=0.0, metadata={"help": "train on at most this many MB of text; 0 = all", "range": (0, None)})

    def __post_init__(self):
        check_ranges(self)


@dataclass
class DataConfig:
    run: str = field(default="runs/default", metadata={"help": "run directory: reads <run>/tokenizer, writes the token shards to <run>/data/base", "aliases": ["--run-dir"]})
    data: list[str] = field(default_factory=list, metadata={"help": "text, JSONL or Parquet files or folders (default: the embedded corpus)"})
    workers: int = field(default=0, metadata={"help": "tokenising processes; 0 = one per CPU core (at most 16)", "range": (0, None)})
    shard_tokens: int = field(default=SHARD_TOKENS, metadata={"help": "a new shard after this many tokens (2**27: 256 MB of uint16 ids); a worker holds one shard in memory", "range": (1, None)})

    def __post_init__(self):
        check_ranges(self)


def _commands():
    # imported here: the stage modules import the loop, and speedrun imports TokenizerConfig from here
    from fasttrain import evaluate, speedrun
    from fasttrain.stages import base, mid, sft
    return {
        "tokenizer": ("train a BPE tokenizer into <run>/tokenizer", [(TokenizerConfig, "tokenizer")]),
        "data": ("tokenise the base corpus into token shards in <run>/data/base (base does it when needed)",
                 [(DataConfig, "data")]),
        "base": ("base pretraining on raw text", [(TrainConfig, "training"), (ModelConfig, "model"),
                                                  (base.BaseConfig, "base stage")]),
        "mid": ("mid-training on the conversation task mixture", [(TrainConfig, "training"), (mid.MidConfig, "mid stage")]),
        "sft": ("chat SFT on conversations, assistant tokens scored", [(TrainConfig, "training"), (sft.SFTConfig, "sft stage")]),
        "eval": ("validation loss and task accuracy of a stage's checkpoint", [(evaluate.EvalConfig, "eval")]),
        "chat": ("talk to the chat model", [(evaluate.ChatConfig, "chat")]),
        "speedrun": ("tokenizer -> base -> mid -> sft -> eval on the embedded default, then a report",
                     [(speedrun.SpeedrunConfig, "speedrun")]),
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m fasttrain", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, groups) in _commands().items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        for cls, title in groups:
            add_dataclass_args(p, cls, title)
    return parser


def run(argv=None):
    from fasttrain import evaluate, speedrun
    from fasttrain.parallel import init_distributed, shutdown_distributed
    from fasttrain.rundir import claim_stage
    from fasttrain.stages import base, mid, sft
    from fasttrain.train import train

    args = build_parser().parse_args(argv)
    _, groups = _commands()[args.command]
    configs = [dataclass_from_args(cls, args) for cls, _ in groups]
    if args.command == "tokenizer":
        from fasttrain.stages.common import train_tokenizer
        train_tokenizer(configs[0])
        return
    if args.command == "data":
        from fasttrain.stages.common import tokenize_corpus
        tokenize_corpus(configs[0])
        return
    if args.command == "speedrun":
        speedrun.speedrun(configs[0])
        return
    info = init_distributed(getattr(configs[0], "device", "auto"))
    try:
        if args.command in ("base", "mid", "sft"):
            plan = {"base": base.plan, "mid": mid.plan, "sft": sft.plan}[args.command]
            cfg = configs[0]
            with claim_stage(cfg.run, args.command, info, resume=cfg.resume, overwrite=cfg.overwrite) as stage:
                train(cfg, plan(*configs, info), info, stage)
        elif args.command == "eval":
            evaluate.run_eval(configs[0], info)
        elif args.command == "chat":
            evaluate.run_chat(configs[0], info)
    finally:
        shutdown_distributed()


def main(argv=None):
    # what the user can fix (a bad flag or data file, a missing or busy stage, a full disk, a
    # divergence, a signal) is one line and an exit code; anything else is a bug: a traceback
    try:
        run(argv)
    except FasttrainError as e:
        print(f"error: {e}" if e.exit_code == 2 else str(e), file=sys.stderr)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:  # Ctrl-C before training started: there is nothing to save yet
        print("interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
