"""The generation engine on CPU: the KV cache decodes exactly what recomputing the context does,
batched prompts equal one at a time, sampling options, stop tokens, and the chat loop."""
import io

import pytest
import torch

from fasttrain.engine import Engine, sample_next
from fasttrain.evaluate import chat_loop, generate
from fasttrain.model import GPT
from fasttrain.tokenizer import Tokenizer
from test_model import tiny as tiny_model

VOCAB = 97


@pytest.fixture(autouse=True)
def reference_kernels(monkeypatch):
    # the model's kernels take their PyTorch reference path on CPU unless the interpreter is on
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # decoding a tiny model is many small ops: a second thread only adds waiting on a shared CPU
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(**kw) -> GPT:
    # attention projections larger than test_model's: greedy decoding must depend on the context
    return tiny_model(attn_proj_std=0.2, **{"vocab_size": VOCAB, **kw}).eval()


MODELS = {
    "dense": {},
    # GQA (4 query heads on 1 key/value head) with Llama-3.1 / YaRN RoPE scaling; QK-norm and the
    # logit softcap are always on in this model
    "gqa-llama3": {"n_kv_head": 1, "rope_scaling": "llama3", "rope_factor": 4.0, "rope_original_len": 16},
    "gqa-yarn": {"n_kv_head": 2, "rope_scaling": "yarn", "rope_factor": 2.0, "rope_original_len": 32},
}


def prompts(n: int, seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = [3, 11, 1, 7, 20, 5][:n]
    return [torch.randint(0, VOCAB, (t,), generator=g).tolist() for t in lengths]


@pytest.mark.parametrize("kind", MODELS)
def test_cached_greedy_equals_recomputed(kind):
    engine = Engine(tiny(**MODELS[kind]))
    batch = prompts(4)
    cached = engine.generate(batch, 30)
    recomputed = engine.generate(batch, 30, use_cache=False)
    assert cached == recomputed
    # not a constant continuation: the test would pass for a model that ignores its context
    assert len({t for row in cached for t in row}) > 5
    # batched prompts of different lengths decode as each does alone
    assert [engine.generate([p], 30)[0] for p in batch] == cached


def test_generation_runs_to_max_seq_len():
    engine = Engine(tiny(max_seq_len=24))
    batch = prompts(5)  # lengths up to 20, and one (20) close to the end of the RoPE tables
    out = engine.generate(batch, 50)
    assert out == engine.generate(batch, 50, use_cache=False)
    assert [len(p) + len(o) for p, o in zip(batch, out)] == [24] * 5


def test_top_k_1_is_greedy_and_sampling_is_seeded():
    engine = Engine(tiny(n_kv_head=2))
    batch = prompts(3)
    greedy = engine.generate(batch, 12)
    assert engine.generate(batch, 12, temperature=1.5, top_k=1, seed=0) == greedy
    assert engine.generate(batch, 12, temperature=1.0, top_p=1e-6, seed=0) == greedy  # only the top token
    a = engine.generate(batch, 12, temperature=1.0, top_k=20, top_p=0.9, seed=3)
    assert a == engine.generate(batch, 12, temperature=1.0, top_k=20, top_p=0.9, seed=3)
    assert a != greedy


def test_top_p_keeps_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    drawn = {int(sample_next(logits, 1.0, top_p=0.7, generator=g)) for _ in range(200)}
    assert drawn == {0, 1}  # 0.5 < 0.7 <= 0.5 + 0.3


def test_stop_tokens_end_their_row():
    engine = Engine(tiny())
    batch = prompts(3)
    greedy = engine.generate(batch, 20)
    stop = greedy[1][4]
    out = engine.generate(batch, 20, stop_ids=[stop])
    for full, cut in zip(greedy, out):
        want = full[:full.index(stop)] if stop in full else full
        assert cut == want
    assert len(out[1]) <= 4


def test_evaluate_generate_keeps_its_signature():
    model = tiny()
    ids = prompts(1)[0]
    out = Engine(model).generate([ids], 10)[0]
    assert generate(model, ids, 10) == out
    assert generate(model, ids, 10, stop_id=out[3]) == out[:out.index(out[3])]
    g = torch.Generator().manual_seed(5)
    assert len(generate(model, ids, 10, temperature=1.0, top_k=5, generator=g)) <= 10


@pytest.fixture(scope="module")
def tokenizer():
    text = "hello there, how are you? I am fine. What is two plus two? It is four. " * 20
    return Tokenizer.train([text], 280)


def test_render_prompt_is_the_training_prefix(tokenizer):
    chat = [{"role": "user", "content": "hello there"}, {"role": "assistant", "content": "I am fine."},
            {"role": "user", "content": "What is two plus two?"}, {"role": "assistant", "content": "four"}]
    ids, mask = tokenizer.render_conversation(chat)
    prompt = tokenizer.render_prompt(chat[:-1])
    assert ids[:len(prompt)] == prompt
    assert prompt[-1] == tokenizer.special_id("<|assistant_start|>")
    assert mask[len(prompt) - 1] == 0 and mask[len(prompt)] == 1  # the reply is what training scored


class ScriptedEngine(Engine):
    """Replies from a script instead of a model, and records the prompts it was given."""

    def __init__(self, model, replies):
        super().__init__(model)
        self.replies, self.prompts = list(replies), []

    def generate(self, prompts, max_new_tokens, **kw):
        self.prompts += prompts
        return [self.replies.pop(0)]


def test_chat_loop_multi_turn_and_empty_replies(tokenizer):
    model = tiny(vocab_size=tokenizer.vocab_size, max_seq_len=128)
    fine, four = tokenizer.encode("I am fine."), tokenizer.encode("It is four.")
    engine = ScriptedEngine(model, [fine, [], four])
    out = io.StringIO()
    lines = ["hello there", "", "how are you?", "What is two plus two?", "/quit", "never read"]
    messages = chat_loop(engine, tokenizer, lines, max_new_tokens=8, out=out)
    # three replies (the blank line asked nothing; /quit ended), the empty one an empty line
    assert out.getvalue() == "I am fine.\n\nIt is four.\n"
    # the empty reply cannot be a turn: its exchange is left out, and the next turn goes on
    want = [{"role": "user", "content": "hello there"}, {"role": "assistant", "content": "I am fine."},
            {"role": "user", "content": "What is two plus two?"}, {"role": "assistant", "content": "It is four."}]
    assert messages == want
    # every prompt is the conversation so far, rendered as training rendered it
    assert engine.prompts[2] == tokenizer.render_prompt(want[:3])
    assert engine.prompts[2] == tokenizer.render_conversation(want)[0][:len(engine.prompts[2])]


def test_chat_loop_on_a_model(tokenizer):
    model = tiny(vocab_size=tokenizer.vocab_size, max_seq_len=48)
    stop = tokenizer.special_id("<|assistant_end|>")
    with torch.no_grad():
        model.lm_head.weight[stop] = 0.0  # never the most likely, so each reply is 8 tokens
    out = io.StringIO()
    messages = chat_loop(Engine(model, tokenizer), tokenizer, ["hello there", "how are you?", "What is two plus two?"],
                         max_new_tokens=8, out=out)
    assert len(out.getvalue().splitlines()) >= 3
    # the context holds 48 tokens: the oldest exchanges were dropped to fit the last prompt and reply
    assert messages[-2] == {"role": "user", "content": "What is two plus two?"}
    assert len(messages) < 6 and len(tokenizer.render_prompt(messages[:-1])) + 8 <= 48
