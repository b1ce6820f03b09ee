"""Test set-up. Without a GPU, Triton kernels run in Triton's CPU interpreter.

TRITON_INTERPRET is read when a kernel is decorated, so it is set here, before any test module
imports fasttrain.kernels. Tests that launch training in subprocesses drop it (see `cpu_env`):
training on CPU uses the PyTorch reference paths, which are fast.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def cpu_env():
    """Environment for training subprocesses: reference kernels, one thread each, no interpreter."""
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env["OMP_NUM_THREADS"] = "1"
    return env
