"""The training stages. Each is a module fasttrain/stages/<name>.py with one function,

    plan(cfg: TrainConfig, options, info: DistInfo) -> StagePlan

(options: the stage's dataclass in fasttrain.config.TRAINING_STAGES, the one registry), which the
one loop (fasttrain/train.py) runs. Importing this package imports no torch: a stage's module is
imported when it runs."""
from __future__ import annotations

import importlib


def plan_stage(name: str, cfg, options, info):
    """The StagePlan of stage `name` (its module's plan)."""
    return importlib.import_module(f"fasttrain.stages.{name}").plan(cfg, options, info)


def run_stage(name: str, cfg, options, info, stage):
    """Plan stage `name` and train it in the claimed stage folder `stage` (rundir.claim_stage)."""
    from fasttrain.train import train
    return train(cfg, plan_stage(name, cfg, options, info), info, stage)
