"""The trainer end to end, through the real CLI in subprocesses: 2-rank torchrun equals one
process, kill-and-resume reproduces the loss curve, the stages chain, bad input fails clearly."""
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# a tiny model and batch: 8 rows of 32 tokens per step
TINY = ["--depth", "1", "--aspect-ratio", "32", "--head-dim", "16", "--seq-len", "32", "--batch-tokens", "256",
        "--micro-batch", "2", "--device", "cpu"]
WORDS = ("the a model learns to predict next token from text data packing rows into batches with masks "
         "loss falls when training works and each rank reads its own rows").split()


def fasttrain(args, env, check=True, **kw):
    """python -m fasttrain ARGS from the repository root; returns the CompletedProcess."""
    proc = subprocess.run([sys.executable, "-m", "fasttrain", *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"fasttrain {args} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def losses(run: Path, stage: str) -> list[float]:
    return [json.loads(l)["loss"] for l in (run / stage / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A folder of 60 small text files of random sentences."""
    folder = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    for i in range(60):
        sentences = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))) + "." for _ in range(rng.randint(2, 15))]
        (folder / f"doc{i:02d}.txt").write_text(" ".join(sentences))
    return folder


@pytest.fixture(scope="module")
def tokenizer_run(corpus, tmp_path_factory):
    """A run directory holding a tokenizer trained on the corpus."""
    run = tmp_path_factory.mktemp("run")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    fasttrain(["tokenizer", "--run", run, "--data", corpus, "--vocab-size", 320], env)
    return run


def fresh_run(tokenizer_run: Path, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    (run / "tokenizer").mkdir(parents=True)
    for f in (tokenizer_run / "tokenizer").iterdir():
        (run / "tokenizer" / f.name).write_bytes(f.read_bytes())
    return run


def test_two_ranks_match_one_process(tokenizer_run, corpus, tmp_path, cpu_env):
    """... with the kernel warm-up on every rank of the two (FSDP's collectives in its backward)."""
    one, two = fresh_run(tokenizer_run, tmp_path / "one"), fresh_run(tokenizer_run, tmp_path / "two")
    args = ["base", *TINY, "--data", corpus, "--max-steps", 4]
    fasttrain(args + ["--run", one], cpu_env)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "fasttrain", *map(str, args + ["--run-dir", two, "--warmup-kernels"])],
                          cwd=ROOT, env=cpu_env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("kernels warmed up") == 1  # printed by rank 0
    a, b = losses(one, "base"), losses(two, "base")
    assert len(a) == len(b) == 4
    assert a[-1] < a[0]  # it trains
    assert b == pytest.approx(a, rel=1e-5)


def test_kill_and_resume_reproduces_the_loss_curve(tokenizer_run, corpus, tmp_path, cpu_env):
    steps = 24
    args = ["base", *TINY, "--depth", 2, "--seq-len", 64, "--batch-tokens", 2048, "--micro-batch", 8,
            "--data", corpus, "--max-steps", steps, "--save-every", 3]
    straight, killed = fresh_run(tokenizer_run, tmp_path / "a"), fresh_run(tokenizer_run, tmp_path / "b")
    fasttrain(args + ["--run", straight], cpu_env)

    proc = subprocess.Popen([sys.executable, "-m", "fasttrain", *map(str, args + ["--run", killed])], cwd=ROOT,
                            env=cpu_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    pointer = killed / "base" / "checkpoints" / "latest"
    deadline = time.time() + 300
    while not pointer.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(losses(killed, "base"))
    assert done < steps, "the run finished before it could be killed; make its steps slower"

    resumed = fasttrain(args + ["--run", killed, "--resume", "--warmup-kernels"], cpu_env)
    assert "kernels warmed up" in resumed.stderr
    assert losses(killed, "base") == pytest.approx(losses(straight, "base"), rel=1e-6)


def test_kernel_warmup_leaves_the_loss_curve_unchanged(tokenizer_run, corpus, tmp_path, cpu_env):
    """--warmup-kernels runs forward+backward on dummy batches before the first step and drops the
    gradients: the loss curve is exactly the one without it, and its time is logged."""
    args = ["base", *TINY, "--data", corpus, "--max-steps", 3]
    plain, warmed = fresh_run(tokenizer_run, tmp_path / "a"), fresh_run(tokenizer_run, tmp_path / "b")
    assert "kernels warmed up" not in fasttrain(args + ["--run", plain], cpu_env).stderr  # off on CPU
    assert "kernels warmed up" in fasttrain(args + ["--run", warmed, "--warmup-kernels"], cpu_env).stderr
    assert losses(warmed, "base") == losses(plain, "base")
    records = [json.loads(l) for l in (warmed / "base" / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["warmup_s"] > 0 and "warmup_s" not in records[1]


def test_stages_chain_and_losses_fall(tokenizer_run, corpus, tmp_path, cpu_env):
    run = fresh_run(tokenizer_run, tmp_path)
    fasttrain(["base", *TINY, "--data", corpus, "--max-steps", 12, "--run", run], cpu_env)
    fasttrain(["mid", *TINY[6:], "--run", run, "--max-steps", 8, "--mixture-size", 400, "--seq-len", 64,
               "--rope-scaling", "yarn", "--rope-factor", 2], cpu_env)
    fasttrain(["sft", *TINY[6:], "--run", run, "--max-steps", 8, "--mixture-size", 200, "--seq-len", 64], cpu_env)
    for stage in ("base", "mid", "sft"):
        curve = losses(run, stage)
        assert sum(curve[-3:]) < sum(curve[:3]), (stage, curve)
    mid_meta = json.loads((run / "mid" / "checkpoints" / "step_000008" / "meta.json").read_text())
    assert mid_meta["model_config"]["rope_scaling"] == "yarn"
    assert mid_meta["model_config"]["rope_original_len"] == 32 and mid_meta["model_config"]["max_seq_len"] == 64
    reply = fasttrain(["chat", "--run", run, "--prompt", "hello", "--max-new-tokens", 5, "--device", "cpu"], cpu_env)
    assert reply.returncode == 0


GOLDEN = ROOT / "tests" / "assets" / "golden_loss.json"
# A tiny base run, then mid and SFT from it: the losses every step, kept as the golden curves
GOLDEN_STAGES = {
    "base": ["base", *TINY, "--depth", 2, "--seq-len", 64, "--batch-tokens", 2048, "--micro-batch", 8, "--max-steps", 40],
    "mid": ["mid", *TINY[6:], "--batch-tokens", 2048, "--micro-batch", 8, "--max-steps", 10, "--mixture-size", 400, "--seq-len", 64],
    "sft": ["sft", *TINY[6:], "--batch-tokens", 2048, "--micro-batch", 8, "--max-steps", 30, "--mixture-size", 400, "--seq-len", 64],
}
GOLDEN_TAIL, GOLDEN_SLACK = 8, 0.02  # the mean loss of the last 8 steps may be at most 2% above the golden one


def test_training_is_not_worse_than_the_golden_curves(tokenizer_run, corpus, tmp_path, cpu_env):
    """Guards convergence, not only equality: a change that makes training worse (a wrong gradient that
    still runs, a schedule or data bug) raises the end of a curve. After a change that is meant to move
    the curves, regenerate them with FASTTRAIN_UPDATE_GOLDEN=1 and give the measured reason in the commit."""
    run = fresh_run(tokenizer_run, tmp_path)
    curves = {}
    for stage, args in GOLDEN_STAGES.items():
        fasttrain([*args, "--run", run] + (["--data", corpus] if stage == "base" else []), cpu_env)
        curves[stage] = losses(run, stage)
    if os.environ.get("FASTTRAIN_UPDATE_GOLDEN") == "1":
        GOLDEN.write_text(json.dumps({"args": {k: list(map(str, v)) for k, v in GOLDEN_STAGES.items()},
                                      "losses": curves}, indent=1) + "\n")
        pytest.skip(f"wrote {GOLDEN}")
    golden = json.loads(GOLDEN.read_text())
    assert golden["args"] == {k: list(map(str, v)) for k, v in GOLDEN_STAGES.items()}, \
        "the golden runs' arguments changed: regenerate the curves (FASTTRAIN_UPDATE_GOLDEN=1)"
    for stage, curve in curves.items():
        expected = golden["losses"][stage]
        assert len(curve) == len(expected), stage
        tail, golden_tail = (sum(c[-GOLDEN_TAIL:]) / GOLDEN_TAIL for c in (curve, expected))
        assert tail <= golden_tail * (1 + GOLDEN_SLACK), \
            f"{stage}: mean loss of the last {GOLDEN_TAIL} steps {tail:.4f} > golden {golden_tail:.4f} + {GOLDEN_SLACK:.0%}"
        assert curve[0] == pytest.approx(expected[0], rel=0.02), f"{stage}: the first loss moved: {curve[0]} vs {expected[0]}"


@pytest.mark.parametrize("args, message", [
    (["base", "--seq-len", "0"], "--seq-len must be >= 1"),
    (["base", "--batch-tokens", "100", "--seq-len", "32"], "must be a multiple of --seq-len"),
    (["base", "--depth", "2", "--n-head", "4", "--n-kv-head", "3"], "multiple of --n-kv-head"),
    (["mid"], "run `python -m fasttrain base"),
    (["base", "--data", "missing.txt"], "missing.txt"),
])
def test_bad_arguments_give_one_clear_line(args, message, tokenizer_run, tmp_path, cpu_env):
    run = fresh_run(tokenizer_run, tmp_path)
    proc = fasttrain(args + ["--run", run, "--device", "cpu"], cpu_env, check=False)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr


def test_bad_data_file_names_file_and_line(tokenizer_run, corpus, tmp_path, cpu_env):
    run = fresh_run(tokenizer_run, tmp_path)
    fasttrain(["base", *TINY, "--data", corpus, "--max-steps", 1, "--run", run], cpu_env)
    bad = tmp_path / "chats.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n{not json\n')
    proc = fasttrain(["mid", *TINY[6:], "--run", run, "--data", bad], cpu_env, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "chats.jsonl:2" in proc.stderr
