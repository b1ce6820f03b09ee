"""Start-up: `--help` and the tokenizer command import no torch (which takes seconds to import).

Checked by what `python -X importtime` reports as imported, not by timing, so the tests do not
depend on the machine's speed or load."""
import subprocess
import sys
from pathlib import Path

import pytest

from fasttrain.__main__ import _commands

ROOT = Path(__file__).resolve().parents[1]
HEAVY = {"torch", "triton", "fasttrain.kernels"}


def imported(args: list[str]) -> set[str]:
    """The modules `python -X importtime <args>` imports, run from the repository root."""
    proc = subprocess.run([sys.executable, "-X", "importtime", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return {line.rsplit("|", 1)[1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}


def test_help_imports_neither_torch_nor_numba():
    modules = imported(["-m", "fasttrain", "--help"])
    assert "fasttrain.config" in modules  # the check sees fasttrain's own imports
    assert not modules & (HEAVY | {"numba"}), sorted(modules & (HEAVY | {"numba"}))


@pytest.mark.parametrize("command", sorted(_commands()))
def test_command_help_imports_no_torch(command):
    modules = imported(["-m", "fasttrain", command, "--help"])
    assert not modules & (HEAVY | {"numba"}), sorted(modules & (HEAVY | {"numba"}))


def test_tokenizer_command_imports_no_torch():
    # everything `python -m fasttrain tokenizer` imports to train and save (numba and tiktoken)
    modules = imported(["-c", "import fasttrain.__main__, fasttrain.stages.tokenizer"])
    assert "numba" in modules
    assert not modules & HEAVY, sorted(modules & HEAVY)
