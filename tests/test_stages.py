"""The stages' loss masks, end to end through rendering, packing and the loader: SFT scores
exactly the assistant tokens (and the assistant-end token); mid scores every token."""
import pytest

from fasttrain.data.loader import PackedLoader
from fasttrain.model import IGNORE_INDEX
from fasttrain.tokenizer import Tokenizer

TEXT = ("hello there, how are you? I am fine. What is two plus two? Two plus two is four. "
        "the quick brown fox jumps over the lazy dog. ") * 20
CHAT = [{"role": "user", "content": "hello there"}, {"role": "assistant", "content": "I am fine"},
        {"role": "user", "content": "two plus two?"}, {"role": "assistant", "content": "four"}]
CHAT2 = [{"role": "user", "content": "how are you?"}, {"role": "assistant", "content": "fine"}]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train([TEXT], 300)


def by_hand(tok, messages):
    """ids and, written out turn by turn, which ids are assistant text or assistant end."""
    s = tok.special_id
    ids, scored = [s("<|bos|>")], [False]
    for m in messages:
        body = tok.encode(m["content"])
        if m["role"] == "user":
            ids += [s("<|user_start|>"), *body, s("<|user_end|>")]
            scored += [False] * (len(body) + 2)
        else:
            ids += [s("<|assistant_start|>"), *body, s("<|assistant_end|>")]
            scored += [False] + [True] * len(body) + [True]
    return ids, scored


def one_row(docs, masks):
    """Pack the documents into a single row that holds them exactly; return (inputs, targets)."""
    row_len = sum(len(d) for d in docs) - 1  # a row of T inputs holds T + 1 tokens
    loader = PackedLoader(docs, row_len, rows_per_step=1, micro_batch_rows=1, rank=0, world_size=1, masks=masks,
                          buffer_docs=len(docs))
    (batch,) = loader.next_step()
    assert batch.input_ids.shape == (1, row_len)
    return batch.input_ids[0].tolist(), batch.targets[0].tolist()


def test_sft_scores_exactly_the_assistant_tokens(tok):
    ids, scored = by_hand(tok, CHAT)
    rendered, mask = tok.render_conversation(CHAT)
    assert rendered == ids and mask == [int(x) for x in scored]
    inputs, targets = one_row([rendered], [mask])
    assert inputs == ids[:-1]
    assert targets == [ids[i + 1] if scored[i + 1] else IGNORE_INDEX for i in range(len(ids) - 1)]
    # the loss covers "I am fine", "four" and both assistant-end tokens, nothing else
    s = tok.special_id
    assert [t for t in targets if t != IGNORE_INDEX] == [*tok.encode("I am fine"), s("<|assistant_end|>"),
                                                          *tok.encode("four"), s("<|assistant_end|>")]


def test_sft_packed_conversations_do_not_score_the_next_bos(tok):
    (a, ma), (b, mb) = tok.render_conversation(CHAT), tok.render_conversation(CHAT2)
    inputs, targets = one_row([a, b], [ma, mb])
    joined = inputs + [b[-1]]
    assert sorted([joined[:len(a)], joined[len(a):]]) == sorted([a, b])  # both whole, in some order
    first = len(a) if joined[:len(a)] == a else len(b)
    assert targets[first - 1] == IGNORE_INDEX  # predicting the next conversation's BOS is not scored
    assert sum(t != IGNORE_INDEX for t in targets) == sum(ma) + sum(mb)


def test_mid_scores_every_token(tok):
    (a, _), (b, _) = tok.render_conversation(CHAT), tok.render_conversation(CHAT2)
    inputs, targets = one_row([a, b], None)
    joined = inputs + [targets[-1]]
    # every next token is a target, user turns and the next conversation's BOS included
    assert targets == joined[1:]
    assert sorted([joined[:len(a)], joined[len(a):]]) == sorted([a, b])
