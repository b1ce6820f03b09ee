"""python -m fasttrain {tokenizer,data,base,mid,sft,rl,eval,chat,speedrun} --run DIR ...

Any command runs single-process as it is, or data-parallel under
`torchrun --nproc_per_node N -m fasttrain <command> ...`. `--help` on each command lists its flags.
"""
from __future__ import annotations

import argparse
import sys

from fasttrain.cli import add_dataclass_args, dataclass_from_args
# The configs import no torch, so `--help` and the tokenizer command start at once; each command
# imports the modules that do its work (torch, Triton) when it runs.
from fasttrain.config import (TRAINING_STAGES, ChatConfig, DataConfig, EvalConfig, SpeedrunConfig, TokenizerConfig,
                              TrainConfig)
from fasttrain.errors import FasttrainError


def _tokenizer(cfg):
    from fasttrain.stages.tokenizer import train_tokenizer  # no torch: numba and tiktoken only
    train_tokenizer(cfg)


def _data(cfg):
    from fasttrain.stages.common import tokenize_corpus
    tokenize_corpus(cfg)


def _speedrun(cfg):
    from fasttrain.speedrun import speedrun
    speedrun(cfg)


def _distributed(work):
    """A command that runs on every rank: work(*configs, info) between set-up and shutdown."""
    def run(*configs):
        from fasttrain.parallel import init_distributed, shutdown_distributed
        info = init_distributed(configs[0].device)
        try:
            work(*configs, info)
        finally:
            shutdown_distributed()
    return run


def _train_stage(name):
    def work(cfg, options, info):
        from fasttrain.rundir import claim_stage
        from fasttrain.stages import run_stage
        with claim_stage(cfg.run, name, info, resume=cfg.resume, overwrite=cfg.overwrite) as stage:
            run_stage(name, cfg, options, info, stage)
    return _distributed(work)


def _eval(cfg, info):
    from fasttrain.evaluate import run_eval
    run_eval(cfg, info)


def _chat(cfg, info):
    from fasttrain.evaluate import run_chat
    run_chat(cfg, info)


def _commands():
    """{command: (help, [(config dataclass, help section title)], run(*configs))}; the training
    stages come from the registry, fasttrain.config.TRAINING_STAGES."""
    commands = {
        "tokenizer": ("train a BPE tokenizer into <run>/tokenizer", [(TokenizerConfig, "tokenizer")], _tokenizer),
        "data": ("tokenise the base corpus into token shards in <run>/data/base (base does it when needed)",
                 [(DataConfig, "data")], _data),
    }
    for spec in TRAINING_STAGES:
        commands[spec.name] = (spec.help, [(TrainConfig, "training"), (spec.options, f"{spec.name} stage")],
                               _train_stage(spec.name))
    commands.update({
        "eval": ("validation loss and task accuracy of each stage's checkpoint, side by side",
                 [(EvalConfig, "eval")], _distributed(_eval)),
        "chat": ("talk to the chat model", [(ChatConfig, "chat")], _distributed(_chat)),
        "speedrun": ("tokenizer -> base -> mid -> sft (-> rl) -> eval on the embedded default, then a report",
                     [(SpeedrunConfig, "speedrun")], _speedrun),
    })
    return commands


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m fasttrain", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, groups, _) in _commands().items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        for cls, title in groups:
            add_dataclass_args(p, cls, title)
    return parser


def run(argv=None):
    args = build_parser().parse_args(argv)
    _, groups, command = _commands()[args.command]
    command(*(dataclass_from_args(cls, args) for cls, _ in groups))


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
