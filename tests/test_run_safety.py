"""What protects a user's run, through the real CLI in subprocesses: the run folder is claimed by
one run at a time and never restarted by accident, signals save a checkpoint, damaged checkpoints
are skipped, a diverging run stops, and file-system failures are one line with nothing partial
left behind. Every interrupted run must end with the weights of the uninterrupted one."""
import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from test_training import ROOT, TINY, corpus, fasttrain, fresh_run, tokenizer_run  # noqa: F401 (fixtures)

STEPS = 16
# a model big enough that a step takes a few tens of milliseconds, so signals land mid-run
ARGS = ["base", *TINY, "--depth", 2, "--seq-len", 64, "--batch-tokens", 2048, "--micro-batch", 8,
        "--max-steps", STEPS]


def command(args) -> list[str]:
    return [sys.executable, "-m", "fasttrain", *map(str, args)]


def torchrun(args, nproc: int = 2) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
            "-m", "fasttrain", *map(str, args)]


def metrics(run: Path, stage: str = "base") -> list[dict]:
    path = run / stage / "metrics.jsonl"
    if not path.exists():
        return []
    # strict JSON: NaN or Infinity would be a bug (parse_constant is called only for those)
    return [json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} in metrics.jsonl"))
            for line in path.read_text().splitlines()]


def start(cmd, env) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_steps(proc: subprocess.Popen, run: Path, n: int, timeout: float = 300):
    """Wait until the run has logged n steps (fails if it ended first)."""
    deadline = time.time() + timeout
    while len(metrics(run)) < n:
        assert proc.poll() is None, f"the run ended before step {n}:\n{proc.stderr.read()[-3000:]}"
        assert time.time() < deadline, "the run made no progress"
        time.sleep(0.005)


def final_weights(run: Path, stage: str = "base") -> dict:
    checkpoints = run / stage / "checkpoints"
    out = run / "weights.pt"
    dcp_to_torch_save(checkpoints / (checkpoints / "latest").read_text().strip(), out)
    return torch.load(out)["model"]


def assert_same_weights(a: dict, b: dict):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def one_error_line(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = [l for l in stderr.splitlines() if l.startswith("error:")]
    assert len(lines) == 1, stderr[-3000:]
    return lines[0]


@pytest.fixture(scope="module")
def straight(tokenizer_run, corpus, tmp_path_factory):
    """The uninterrupted run's final weights and losses."""
    run = fresh_run(tokenizer_run, tmp_path_factory.mktemp("straight"))
    fasttrain(ARGS + ["--data", corpus, "--run", run], _env())
    return final_weights(run), [m["loss"] for m in metrics(run)]


def _env():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["OMP_NUM_THREADS"] = "1"
    return env


# --- 1 and 9: a stage that holds a run is not restarted by accident ---------------------------
def test_rerun_is_refused_overwrite_moves_aside_resume_says_what(tokenizer_run, corpus, tmp_path, cpu_env):
    run = fresh_run(tokenizer_run, tmp_path)
    args = ["base", *TINY, "--data", corpus, "--max-steps", 3, "--run", run]
    first = fasttrain(args + ["--resume"], cpu_env)
    assert "nothing to resume" in first.stderr  # and it trained from the beginning
    before = (run / "base" / "metrics.jsonl").read_text()

    again = fasttrain(args, cpu_env, check=False)
    assert again.returncode == 2
    assert "already holds a run (checkpoints up to step_000003)" in one_error_line(again.stderr)
    assert "--resume" in again.stderr and "--overwrite" in again.stderr
    assert (run / "base" / "metrics.jsonl").read_text() == before  # untouched

    fasttrain(args + ["--overwrite"], cpu_env)
    assert (run / "base.old-1" / "metrics.jsonl").read_text() == before  # moved aside, not deleted
    assert (run / "base.old-1" / "checkpoints" / "step_000003").is_dir()
    assert len(metrics(run)) == 3

    resumed = fasttrain(["base", *TINY, "--data", corpus, "--max-steps", 5, "--run", run, "--resume"], cpu_env)
    assert "resumed from" in resumed.stderr and "step_000003 at step 3" in resumed.stderr
    assert [m["step"] for m in metrics(run)] == [1, 2, 3, 4, 5]


# --- 2: SIGTERM and SIGINT finish the step, save, and exit 143 / 130 ------------------------
@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_saves_and_resume_ends_with_the_same_weights(sig, code, straight, tokenizer_run, corpus, tmp_path):
    run = fresh_run(tokenizer_run, tmp_path)
    args = ARGS + ["--data", corpus, "--run", run]
    proc = start(command(args), _env())
    wait_for_steps(proc, run, 3)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == code, stderr[-3000:]
    assert "Traceback" not in stderr
    stopped = [l for l in stderr.splitlines() if "stopped by" in l]
    assert len(stopped) == 1 and signal.Signals(sig).name in stopped[0], stderr[-3000:]
    step = len(metrics(run))
    assert step < STEPS, "the run finished before the signal; make its steps slower"
    assert (run / "base" / "checkpoints" / "latest").read_text() == f"step_{step:06d}"

    fasttrain(args + ["--resume"], _env())
    weights, losses = straight
    assert [m["loss"] for m in metrics(run)] == losses
    assert_same_weights(final_weights(run), weights)


def test_sigterm_under_torchrun_saves_the_same_step_on_every_rank(tokenizer_run, corpus, tmp_path):
    args = ARGS + ["--data", corpus]
    whole, run = fresh_run(tokenizer_run, tmp_path / "whole"), fresh_run(tokenizer_run, tmp_path / "stopped")
    subprocess.run(torchrun(args + ["--run-dir", whole]), cwd=ROOT, env=_env(), capture_output=True, check=True,
                   timeout=600)
    proc = start(torchrun(args + ["--run-dir", run]), _env())
    wait_for_steps(proc, run, 3)
    proc.send_signal(signal.SIGTERM)  # torchrun passes it on to both ranks
    _, stderr = proc.communicate(timeout=300)
    assert stderr.count("stopped by SIGTERM") == 2, stderr[-3000:]  # one line per rank, the same step
    step = len(metrics(run))
    assert step < STEPS
    saved = run / "base" / "checkpoints" / f"step_{step:06d}"
    assert (saved / "rng_rank0.pt").exists() and (saved / "rng_rank1.pt").exists()
    assert stderr.count(f"after step {step};") == 2

    resumed = subprocess.run(torchrun(args + ["--run-dir", run, "--resume"]), cwd=ROOT, env=_env(),
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [m["loss"] for m in metrics(run)] == pytest.approx([m["loss"] for m in metrics(whole)], rel=1e-6)
    assert_same_weights(final_weights(run), final_weights(whole))


def interrupt_until_done(run: Path, args, rng: random.Random, interruptions: list[int]):
    """Run, interrupting with each signal of `interruptions` at a random step, resuming each time."""
    for sig in interruptions:
        done = len(metrics(run))
        proc = start(command(args + (["--resume"] if done else [])), _env())
        try:
            wait_for_steps(proc, run, min(done + rng.randint(1, 4), STEPS - 1))
        except AssertionError:
            proc.kill()
            raise
        proc.send_signal(sig)
        proc.communicate(timeout=300)
        assert proc.returncode in (143, -signal.SIGKILL), proc.returncode
    fasttrain(args + ["--resume"], _env())


def test_sigterm_then_sigkill_then_resume(straight, tokenizer_run, corpus, tmp_path):
    run = fresh_run(tokenizer_run, tmp_path)
    args = ARGS + ["--data", corpus, "--run", run, "--save-every", 2]
    interrupt_until_done(run, args, random.Random(0), [signal.SIGTERM, signal.SIGKILL])
    assert_same_weights(final_weights(run), straight[0])


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(6))
def test_many_random_interruptions(seed, straight, tokenizer_run, corpus, tmp_path):
    rng = random.Random(seed)
    run = fresh_run(tokenizer_run, tmp_path)
    args = ARGS + ["--data", corpus, "--run", run, "--save-every", rng.choice([1, 2, 3])]
    interrupt_until_done(run, args, rng, [rng.choice([signal.SIGTERM, signal.SIGKILL]) for _ in range(4)])
    assert_same_weights(final_weights(run), straight[0])


# --- 3: one run per stage ------------------------------------------------------------------
def test_second_run_into_a_busy_stage_fails_at_once(tokenizer_run, corpus, tmp_path):
    run = fresh_run(tokenizer_run, tmp_path)
    args = ARGS + ["--data", corpus, "--run", run, "--max-steps", 1000]  # stopped by the test
    first = start(command(args), _env())
    try:
        wait_for_steps(first, run, 1)
        second = fasttrain(args, _env(), check=False)
        assert second.returncode == 2
        assert f"being written by another run (pid {first.pid}" in one_error_line(second.stderr)
        second = fasttrain(args + ["--resume"], _env(), check=False)  # --resume does not get past the lock either
        assert second.returncode == 2 and f"pid {first.pid}" in second.stderr
        # under torchrun rank 0 finds the lock taken and every rank stops with its message (none hangs)
        ranks = subprocess.run(torchrun(ARGS + ["--data", corpus, "--run-dir", run, "--resume"]), cwd=ROOT, env=_env(), capture_output=True, text=True,
                               timeout=300)
        assert ranks.returncode != 0
        assert ranks.stderr.count(f"being written by another run (pid {first.pid}") == 2, ranks.stderr[-3000:]
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=300)
    steps = [m["step"] for m in metrics(run)]
    assert steps == list(range(1, len(steps) + 1))  # one run's curve, not two interleaved


# --- 5: damaged checkpoints are skipped ----------------------------------------------------
@pytest.fixture(scope="module")
def checkpointed(tokenizer_run, corpus, tmp_path_factory):
    """A base run of 6 steps saving every 2 and keeping 2: step_000004 and step_000006."""
    run = fresh_run(tokenizer_run, tmp_path_factory.mktemp("checkpointed"))
    fasttrain(["base", *TINY, "--data", corpus, "--max-steps", 6, "--save-every", 2, "--keep-checkpoints", 2,
               "--run", run], _env())
    return run


def test_keep_checkpoints_keeps_the_newest(checkpointed):
    names = sorted(p.name for p in (checkpointed / "base" / "checkpoints").iterdir())
    assert names == ["latest", "step_000004", "step_000006"]


def _truncate_shard(ckpt: Path):
    shard = next(ckpt.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:100])


@pytest.mark.parametrize("damage, problem", [
    (_truncate_shard, "has 100 bytes"),
    (lambda c: (c / ".metadata").unlink(), ".metadata is missing"),
    (lambda c: (c / "meta.json").write_text(""), "meta.json has 0 bytes"),
    (lambda c: (c / "meta.json").unlink(), "meta.json is missing"),
    (lambda c: (c / "manifest.json").unlink(), "no manifest.json"),
])
def test_a_damaged_checkpoint_falls_back_to_the_previous(damage, problem, checkpointed, corpus, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(checkpointed, run)
    damage(run / "base" / "checkpoints" / "step_000006")
    proc = fasttrain(["base", *TINY, "--data", corpus, "--max-steps", 7, "--save-every", 2, "--run", run, "--resume"],
                     _env())
    warnings = [l for l in proc.stderr.splitlines() if l.startswith("warning:")]
    assert len(warnings) == 1 and "step_000006" in warnings[0] and problem in warnings[0], proc.stderr[-3000:]
    assert "step_000004 at step 4" in proc.stderr
    assert [m["step"] for m in metrics(run)] == [1, 2, 3, 4, 5, 6, 7]

    # a later stage starting from a damaged base also takes the intact one before it
    shutil.rmtree(run / "base" / "checkpoints" / "step_000007")
    damage(run / "base" / "checkpoints" / "step_000006")
    mid = fasttrain(["mid", *TINY[6:], "--run", run, "--max-steps", 1, "--mixture-size", 100], _env())
    assert "warning: skipping checkpoint" in mid.stderr


# --- 6: divergence --------------------------------------------------------------------------
@pytest.mark.parametrize("flags, what", [
    (["--lr", 1e3, "--embedding-lr", 1e3, "--head-lr", 1e3], "worse than a uniform guess"),
    (["--embedding-lr", 1e30, "--head-lr", 1e30], "not finite"),
])
def test_a_diverging_run_stops_with_one_line(flags, what, tokenizer_run, corpus, tmp_path, cpu_env):
    run = fresh_run(tokenizer_run, tmp_path)
    proc = fasttrain(["base", *TINY, "--data", corpus, "--max-steps", 30, "--save-every", 1, "--max-bad-steps", 4,
                      "--run", run, *flags], cpu_env, check=False)
    assert proc.returncode == 2
    line = one_error_line(proc.stderr)
    assert "4 bad steps in a row" in line and what in line, line
    assert "--embedding-lr" in line and "--lr" in line  # every learning rate is named, not only --lr
    logged = metrics(run)
    assert len(logged) < 30 and logged[-1]["bad_steps"] >= 4
    saved = sorted(p.name for p in (run / "base" / "checkpoints").glob("step_*"))
    if saved:  # no checkpoint is written during a bad streak: the newest is from before it
        assert f"last good checkpoint is {run / 'base' / 'checkpoints' / saved[-1]}" in line
        assert int(saved[-1][5:]) <= len(logged) - 4
    if what == "not finite":
        assert any(m["loss"] is None or m["grad_norm"] is None for m in logged)
        assert all(m["skipped"] for m in logged if m["loss"] is None)


# --- 8: file-system failures --------------------------------------------------------------
def test_run_folder_that_is_a_file(tokenizer_run, corpus, tmp_path, cpu_env):
    not_a_folder = tmp_path / "run"
    not_a_folder.write_text("a file")
    proc = fasttrain(["base", *TINY, "--data", corpus, "--max-steps", 1, "--run", not_a_folder], cpu_env, check=False)
    assert proc.returncode == 2 and "is a file" in one_error_line(proc.stderr)


def test_read_only_run_folder(tokenizer_run, corpus, tmp_path, cpu_env):
    run = fresh_run(tokenizer_run, tmp_path)
    run.chmod(0o555)
    cmd = command(["base", *TINY, "--data", corpus, "--max-steps", 1, "--run", run])
    if os.geteuid() == 0:  # root ignores permissions unless it gives up the capability to
        cmd = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search", "--"] + cmd
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=cpu_env, capture_output=True, text=True, timeout=600)
    finally:
        run.chmod(0o755)
    assert proc.returncode == 2
    assert "Permission denied" in one_error_line(proc.stderr)


def test_a_write_that_fails_mid_checkpoint_leaves_nothing_partial(tokenizer_run, corpus, tmp_path, cpu_env):
    run = fresh_run(tokenizer_run, tmp_path)
    args = ["base", *TINY, "--data", corpus, "--save-every", 2, "--run", run]
    fasttrain(args + ["--max-steps", 2], cpu_env)
    shard_bytes = next((run / "base" / "checkpoints" / "step_000002").glob("*.distcp")).stat().st_size

    def small_files():  # a file-size limit: a write past it fails with EFBIG, as a full disk fails
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (shard_bytes // 2, shard_bytes // 2))

    proc = subprocess.run(command(args + ["--max-steps", 4, "--resume"]), cwd=ROOT, env=cpu_env,
                          capture_output=True, text=True, timeout=600, preexec_fn=small_files)
    assert proc.returncode == 2
    line = one_error_line(proc.stderr)
    assert "could not write checkpoint" in line and "step_000004" in line and "step_000002 is intact" in line, line
    checkpoints = run / "base" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", "step_000002"]  # no .tmp left
    assert (checkpoints / "latest").read_text() == "step_000002"
    fasttrain(args + ["--max-steps", 4, "--resume"], cpu_env)  # and the run continues from it


# --- 10: a bug keeps its traceback ---------------------------------------------------------
def test_only_user_errors_become_one_line(monkeypatch):
    import fasttrain.__main__ as entry

    def bug(argv):
        raise ValueError("an internal invariant broke")
    monkeypatch.setattr(entry, "run", bug)
    with pytest.raises(ValueError, match="invariant"):
        entry.main([])
