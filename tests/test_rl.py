"""The RL stage: group-relative advantages, rollout rows, the weighted loss through the model, the
rollout cursor, and end to end through the CLI: a 2-rank torchrun step equals a 1-process step on
the same prompts, and --resume continues a run exactly."""
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fasttrain.data.batch import IGNORE_INDEX
from fasttrain.data.loader import epoch_order
from fasttrain.model import GPT, ModelConfig
from fasttrain.parallel import DistInfo
from fasttrain.rollout import Problem, RolloutSource, group_advantages, rollout_rows
from test_training import ROOT, corpus, fasttrain, fresh_run, tokenizer_run  # noqa: F401 (fixtures)


# --- advantages ------------------------------------------------------------------------------
def test_group_advantages_are_z_scores_within_each_group():
    rng = np.random.default_rng(0)
    rewards = rng.integers(0, 2, size=(6, 5)).astype(np.float64)
    rewards[2] = 1.0  # every answer right: nothing to learn from the group
    rewards[4] = 0.0  # every answer wrong
    rewards[5] = [0.2, 0.9, 0.4, 0.4, 0.7]  # graded rewards work alike
    got = group_advantages(torch.tensor(rewards)).numpy()
    for p in range(6):
        r = rewards[p]
        if len(set(r)) == 1:
            assert (got[p] == 0).all()
        else:
            want = (r - r.mean()) / np.sqrt(((r - r.mean()) ** 2).mean())
            np.testing.assert_allclose(got[p], want, rtol=1e-5)
            assert abs(got[p].sum()) < 1e-9  # above-average answers are pushed up as much as the others down


def test_rollout_rows_score_only_the_answers_with_their_advantage():
    pad = 0
    samples = [([1, 5, 6], [7, 8, 9], 0.5),  # prompt, answer (ending with the stop token 9), advantage
               ([1, 5], [4], -1.5)]
    b = rollout_rows(samples, pad)
    assert b.input_ids.tolist() == [[1, 5, 6, 7, 8], [1, 5, pad, pad, pad]]
    I = IGNORE_INDEX
    assert b.targets.tolist() == [[I, I, 7, 8, 9], [I, 4, I, I, I]]
    assert b.weights.tolist() == [[0, 0, 0.5, 0.5, 0.5], [0, -1.5, 0, 0, 0]]
    assert b.cu_seqlens.tolist() == [0, 5, 7, 10] and b.max_seqlen == 5  # row 2: 2 tokens, 3 of padding


# --- the weighted loss through the model -----------------------------------------------------
def tiny_model(seed=0, vocab=40, max_seq_len=32):
    torch.manual_seed(seed)
    model = GPT(ModelConfig(depth=1, aspect_ratio=32, head_dim=16, vocab_size=vocab, max_seq_len=max_seq_len))
    model.init_weights()
    with torch.no_grad():  # the zero-initialised projections would make every position alike
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def test_model_weighted_loss_equals_reference_and_sft_with_01_weights():
    model = tiny_model()
    ids = torch.randint(0, 40, (3, 12))
    targets = torch.randint(0, 40, (3, 12))
    targets[:, :4] = IGNORE_INDEX
    weights = torch.randn(3, 12)
    logits = model(ids)  # (B, T, V), softcapped as the fused loss caps them
    ce = F.cross_entropy(logits.reshape(-1, 40), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none")
    torch.testing.assert_close(model(ids, targets, weights=weights), (ce * weights.reshape(-1)).sum(),
                               rtol=1e-5, atol=1e-5)
    mask = torch.rand(3, 12) < 0.5
    sft = model(ids, torch.where(mask, targets, IGNORE_INDEX))
    torch.testing.assert_close(model(ids, targets, weights=mask.float()), sft)


def test_compiled_blocks_sample_eagerly_with_a_kv_cache():
    """--compile compiles the blocks' training forward (fullgraph); sampling with a KV cache, which
    is not one graph, runs them eagerly, so RL samples alike compiled or not."""
    from fasttrain.engine import Engine
    from fasttrain.train import compile_blocks
    prompts = [[1, 2, 3], [4, 5]]
    want = Engine(tiny_model()).generate(prompts, 5)
    assert Engine(compile_blocks(tiny_model())).generate(prompts, 5) == want


# --- the rollout cursor ----------------------------------------------------------------------
class StubTokenizer:
    bos_id = 0

    def special_id(self, name):
        return 1

    def decode(self, ids):
        return " ".join(map(str, ids))


def source(n_problems=7, rows=6, group=2, seed=3, rank=0, world_size=1):
    problems = [Problem([0, 2 + i], str(i), "text") for i in range(n_problems)]
    return RolloutSource(problems, StubTokenizer(), rows, 2, DistInfo(rank, world_size, 0, torch.device("cpu")),
                         samples_per_prompt=group, seq_len=16, max_new_tokens=4, seed=seed)


def test_the_prompt_stream_crosses_epochs_and_resumes_from_its_cursor():
    src = source()
    stream = np.concatenate([epoch_order(3, e, 7) for e in range(3)])  # epochs back to back
    taken = []
    for _ in range(5):  # 3 prompts a step, 15 prompts: into the third epoch
        prompts = src.step_prompts()
        assert [(e, p) for e, p, _ in prompts] == [divmod(k, 7) for k in range(len(taken), len(taken) + 3)]
        taken += [i for _, _, i in prompts]
        last = prompts[-1]
        src.load_state_dict({"epoch": last[0], "position": last[1] + 1})  # what next_step leaves
        again = source()
        again.load_state_dict(json.loads(json.dumps(src.state_dict())))  # through a checkpoint's JSON
        assert again.step_prompts() == src.step_prompts()
    assert taken == stream[:15].tolist()


def test_samples_depend_on_the_prompt_not_on_the_rank(monkeypatch):
    """Rank 1 of 2 draws for its prompts exactly what one process draws for them."""
    model = tiny_model(vocab=12)
    monkeypatch.setattr("fasttrain.rollout.all_reduce_sum", lambda t: t)  # no process group here

    def answers(src):
        """Per row: the scored (target, weight) pairs, i.e. the answer and its advantage."""
        src.bind(model)
        out = []
        for b in src.next_step():
            for targets, weights in zip(b.targets.tolist(), b.weights.tolist()):
                out.append([(t, w) for t, w in zip(targets, weights) if t != IGNORE_INDEX])
        return out

    one = answers(source(rows=8))  # 4 prompts, 2 answers each
    two = source(rows=8, rank=1, world_size=2)
    monkeypatch.setattr(two, "_agree_done", lambda done: done)  # alone, it need not wait for rank 0
    assert answers(two) == one[4:]  # rank 1 takes prompts 2 and 3


# --- end to end ------------------------------------------------------------------------------
QA = [("say ok", "ok"), ("say yes", "yes"), ("say no", "no"), ("say hi", "hi")]
SMALL = ["--depth", "1", "--aspect-ratio", "32", "--head-dim", "16", "--seq-len", "32", "--batch-tokens", "256",
         "--micro-batch", "4", "--device", "cpu"]


@pytest.fixture(scope="module")
def sft_run(tokenizer_run, corpus, tmp_path_factory):  # noqa: F811
    """A run with a tiny SFT model that has learnt a little of four one-word answers, and their chat file."""
    import os
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["OMP_NUM_THREADS"] = "1"
    run = fresh_run(tokenizer_run, tmp_path_factory.mktemp("rl"))
    chats = run / "qa.jsonl"
    chats.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q},
                                                      {"role": "assistant", "content": a}]}) + "\n" for q, a in QA))
    fasttrain(["base", *SMALL, "--data", corpus, "--max-steps", 2, "--run", run], env)
    fasttrain(["mid", *SMALL[6:], "--data", chats, "--max-steps", 10, "--run", run, "--lr", 0.05], env)
    fasttrain(["sft", *SMALL[6:], "--data", chats, "--max-steps", 10, "--run", run, "--lr", 0.05], env)
    return run, chats, env


RL = [*SMALL[6:], "--samples-per-prompt", 4, "--max-new-tokens", 3, "--micro-batch", 2]


def metrics(run):
    return [json.loads(line) for line in (run / "rl" / "metrics.jsonl").read_text().splitlines()]


def test_two_ranks_step_equals_one_process_step(sft_run, tmp_path):
    run, chats, env = sft_run
    one, two = tmp_path / "one", tmp_path / "two"
    shutil.copytree(run, one)
    shutil.copytree(run, two)
    args = ["rl", *RL, "--data", chats, "--max-steps", 1, "--batch-tokens", 512]  # 16 answers: 4 prompts x 4
    fasttrain(args + ["--run", one], env)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "fasttrain", *map(str, args + ["--run-dir", two])],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (a,), (b,) = metrics(one), metrics(two)
    assert a["zero_advantage_groups"] < 1, "every group scored alike: the step would test nothing"
    for key in ("reward", "pass@1", "pass@4", "answer_tokens", "zero_advantage_groups", "scored_tokens"):
        assert a[key] == b[key], key
    assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-7)
    assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)


def test_resume_continues_the_rollouts_exactly(sft_run, tmp_path):
    run, chats, env = sft_run
    straight = tmp_path / "straight"
    shutil.copytree(run, straight)
    args = ["rl", *RL, "--data", chats, "--max-steps", 4, "--save-every", 1, "--keep-checkpoints", 0]
    fasttrain(args + ["--run", straight], env)
    resumed = tmp_path / "resumed"
    shutil.copytree(straight, resumed)
    for step in (3, 4):  # as if it had been stopped after step 2
        shutil.rmtree(resumed / "rl" / "checkpoints" / f"step_{step:06d}")
    fasttrain(args + ["--run", resumed, "--resume"], env)
    a, b = metrics(straight), metrics(resumed)
    assert [m["step"] for m in b] == [1, 2, 3, 4]
    for key in ("loss", "reward", "answer_tokens", "scored_tokens"):
        assert [m[key] for m in b] == pytest.approx([m[key] for m in a], rel=1e-6), key
