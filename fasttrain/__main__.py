"""python -m fasttrain {tokenizer,data,base,mid,sft,eval,chat,speedrun} --run DIR ...

Any command runs single-process as it is, or data-parallel under
`torchrun --nproc_per_node N -m fasttrain <command> ...`. `--help` on each command lists its flags.
"""
from __future__ import annotations

import argparse
import sys

from fasttrain.cli import add_dataclass_args, dataclass_from_args
# The configs import no torch, so `--help` and the tokenizer command start at once; each command
# imports the modules that do its work (torch, Triton) in `run`, when it runs.
from fasttrain.config import (BaseConfig, ChatConfig, DataConfig, EvalConfig, MidConfig, ModelConfig, SFTConfig,
                              SpeedrunConfig, TokenizerConfig, TrainConfig)
from fasttrain.errors import FasttrainError


def _commands():
    return {
        "tokenizer": ("train a BPE tokenizer into <run>/tokenizer", [(TokenizerConfig, "tokenizer")]),
        "data": ("tokenise the base corpus into token shards in <run>/data/base (base does it when needed)",
                 [(DataConfig, "data")]),
        "base": ("base pretraining on raw text", [(TrainConfig, "training"), (ModelConfig, "model"),
                                                  (BaseConfig, "base stage")]),
        "mid": ("mid-training on the conversation task mixture", [(TrainConfig, "training"), (MidConfig, "mid stage")]),
        "sft": ("chat SFT on conversations, assistant tokens scored", [(TrainConfig, "training"), (SFTConfig, "sft stage")]),
        "eval": ("validation loss and task accuracy of each stage's checkpoint, side by side", [(EvalConfig, "eval")]),
        "chat": ("talk to the chat model", [(ChatConfig, "chat")]),
        "speedrun": ("tokenizer -> base -> mid -> sft -> eval on the embedded default, then a report",
                     [(SpeedrunConfig, "speedrun")]),
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
    args = build_parser().parse_args(argv)
    _, groups = _commands()[args.command]
    configs = [dataclass_from_args(cls, args) for cls, _ in groups]
    if args.command == "tokenizer":  # no torch: numba and tiktoken only
        from fasttrain.stages.tokenizer import train_tokenizer
        train_tokenizer(configs[0])
        return
    if args.command == "data":
        from fasttrain.stages.common import tokenize_corpus
        tokenize_corpus(configs[0])
        return
    if args.command == "speedrun":
        from fasttrain.speedrun import speedrun
        speedrun(configs[0])
        return
    from fasttrain import evaluate
    from fasttrain.parallel import init_distributed, shutdown_distributed
    from fasttrain.rundir import claim_stage
    from fasttrain.stages import base, mid, sft
    from fasttrain.train import train

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
