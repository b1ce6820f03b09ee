"""The loader: a deterministic global row stream whose per-step cost does not grow with the corpus,
the same batches with and without prefetch, exact resume on another number of ranks, cu_seqlens
as the old per-micro-batch computation gave them, and an unbiased validation sample."""
import threading
import time

import numpy as np
import pytest
import torch

import fasttrain.data.loader as loader_module
from fasttrain.data.batch import IGNORE_INDEX
from fasttrain.data.loader import PackedLoader, row_segments, shuffle_rows
from fasttrain.data.packing import pack_documents
from fasttrain.errors import DataError
from fasttrain.evaluate import validation_loss, validation_rows


def random_docs(n, max_len, seed=0, bos=1):
    rng = np.random.default_rng(seed)
    return [np.concatenate([[bos], rng.integers(2, 1000, rng.integers(0, max_len))]) for _ in range(n)]


def steps(loader, n):
    return [loader.next_step() for _ in range(n)]


def same_steps(a, b):
    """Two lists of steps (each a list of Batch) hold the same tensors."""
    assert len(a) == len(b)
    for step_a, step_b in zip(a, b):
        assert len(step_a) == len(step_b)
        for x, y in zip(step_a, step_b):
            assert torch.equal(x.input_ids, y.input_ids) and torch.equal(x.targets, y.targets)
            assert torch.equal(x.cu_seqlens, y.cu_seqlens) and x.max_seqlen == y.max_seqlen
    return True


def segments_of_rows(position_ids, doc_ids):
    """Reference (the loader's former per-micro-batch computation): cu_seqlens over the flattened
    B*T tokens; a segment starts at every row start, where the position restarts at 0, and where
    the document changes."""
    B, T = position_ids.shape
    starts = position_ids == 0
    starts[:, 1:] |= doc_ids[:, 1:] != doc_ids[:, :-1]
    starts[:, 0] = True
    idx = torch.nonzero(starts.reshape(-1)).squeeze(1)
    cu = torch.cat([idx, torch.tensor([B * T])]).to(torch.int32)
    return cu, int((cu[1:] - cu[:-1]).max())


# --- the row stream ------------------------------------------------------------------------------

def test_batch_contract_and_determinism():
    docs = random_docs(500, 120)
    make = lambda seed: PackedLoader(docs, 48, 12, 3, 0, 1, seed=seed, buffer_docs=64, prefetch=0)  # noqa: E731
    a, b, other = steps(make(0), 20), steps(make(0), 20), steps(make(1), 20)
    assert same_steps(a, b)
    assert not torch.equal(a[0][0].input_ids, other[0][0].input_ids)
    for batch in a[0]:
        assert batch.input_ids.shape == batch.targets.shape == (3, 48)
        assert batch.input_ids.dtype == batch.targets.dtype == torch.int64
        assert batch.cu_seqlens.dtype == torch.int32
        assert batch.cu_seqlens[0] == 0 and batch.cu_seqlens[-1] == 3 * 48
        assert batch.max_seqlen == int(batch.cu_seqlens.diff().max())


def test_every_document_once_per_epoch():
    # document d is [BOS, d + 2, ...], short enough never to be split
    docs = [np.array([1, d + 2] + [5] * (d % 30)) for d in range(300)]
    loader = PackedLoader(docs, 40, 1, 1, 0, 1, buffer_docs=32, prefetch=0)
    seen = []
    while loader.state_dict()["epoch"] == 0:
        (row,) = loader.next_step()
        tokens = torch.cat([row.input_ids[0], row.targets[0, -1:]])  # the row's bin of T + 1 tokens
        seen += tokens[1:][tokens[:-1] == 1].tolist()  # the token after each BOS names its document
    assert sorted(seen) == [d + 2 for d in range(300)]
    assert loader.state_dict() == {"epoch": 1, "buffer": 0, "row": 0}


class FakeDocs:
    """n documents of 20 tokens, made on demand (a million cost nothing); counts the reads."""

    def __init__(self, n):
        self.n, self.reads = n, 0
        self.doc = np.array([1] + [7] * 19)

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        assert 0 <= i < self.n
        self.reads += 1
        return self.doc


def test_cost_per_step_does_not_grow_with_the_corpus(monkeypatch):
    """Count the work of 30 steps on corpora of 10k and 1M documents: the documents read and
    packed are the same, and the only O(N) work, the epoch's document order, is done once."""
    work = {}
    real_order, real_pack = loader_module.epoch_order, loader_module.Packer.pack

    def counting_order(seed, epoch, n_docs):
        work["orders"] += 1
        work["ordered"] += n_docs
        return real_order(seed, epoch, n_docs)

    def counting_pack(self, docs, *args, **kw):
        work["packs"] += 1
        work["packed"] += len(docs)
        return real_pack(self, docs, *args, **kw)

    monkeypatch.setattr(loader_module, "epoch_order", counting_order)
    monkeypatch.setattr(loader_module.Packer, "pack", counting_pack)
    counts = {}
    for n in (10_000, 1_000_000):
        work.update(orders=0, ordered=0, packs=0, packed=0)
        docs = FakeDocs(n)
        loader = PackedLoader(docs, 64, 16, 4, 0, 1, buffer_docs=256, prefetch=0)
        per_step = []
        for _ in range(30):
            before = docs.reads
            loader.next_step()
            per_step.append(docs.reads - before)
        counts[n] = dict(work, reads=docs.reads, per_step=per_step)
        assert work["orders"] == 1 and work["ordered"] == n  # one permutation for the epoch
        assert max(per_step) <= 256  # a step reads at most one new buffer
    small, large = counts[10_000], counts[1_000_000]
    assert small["reads"] == large["reads"] > 0
    assert small["per_step"] == large["per_step"]
    assert (small["packs"], small["packed"]) == (large["packs"], large["packed"])


def test_segments_match_the_reference_on_shuffled_rows():
    """Per-row segment lengths, read once off the packer's cu_seqlens and shuffled with the rows,
    give every run of rows the cu_seqlens the reference computes from positions and documents."""
    rng = np.random.default_rng(3)
    for mode, T in (("best_fit", 37), ("best_fit", 8), ("pad", 50)):
        docs = random_docs(200, 3 * T, seed=T)  # some split, some empty
        packed = pack_documents(docs, T, mode=mode, ignore_index=IGNORE_INDEX)
        R = packed.input_ids.size(0)
        seg_lens, row_seg = row_segments(packed.cu_seqlens.numpy(), R, T)
        perm = rng.permutation(R)
        seg_lens, row_seg = shuffle_rows(seg_lens, row_seg, perm)
        for _ in range(30):
            a = int(rng.integers(0, R))
            b = int(rng.integers(a + 1, min(R, a + 9) + 1))
            lens = seg_lens[row_seg[a]:row_seg[b]]
            cu = torch.from_numpy(np.concatenate([[0], np.cumsum(lens)]).astype(np.int32))
            rows = torch.from_numpy(perm[a:b])
            ref_cu, ref_max = segments_of_rows(packed.position_ids[rows], packed.doc_ids[rows])
            assert torch.equal(cu, ref_cu) and int(lens.max()) == ref_max


def test_loader_cu_seqlens_match_the_reference():
    """End to end, with micro-batches that span buffers: each token encodes (document, index in
    the document), so the reference's positions and document ids can be read off the batch."""
    rng = np.random.default_rng(0)
    T, pad = 16, 0
    docs = [(d + 1) * 1000 + np.arange(int(rng.integers(1, 3 * T))) for d in range(400)]  # BOS = (d+1)*1000
    loader = PackedLoader(docs, T, 12, 3, 0, 1, buffer_docs=7, pad_id=pad, prefetch=0)
    for step in steps(loader, 40):
        for batch in step:
            x = batch.input_ids
            doc_ids = torch.where(x == pad, -1, x // 1000)
            # positions: index in the document for tokens, and 1 on padding, whose start the
            # change of document marks (a continuation piece starts at a row start or after
            # another document, so the change of document marks it too)
            position_ids = torch.where(x == pad, 1, x % 1000)
            ref_cu, ref_max = segments_of_rows(position_ids, doc_ids)
            assert torch.equal(batch.cu_seqlens, ref_cu) and batch.max_seqlen == ref_max


def test_all_empty_documents_fail_clearly():
    loader = PackedLoader([np.zeros(0, np.int64)] * 10, 8, 2, 1, 0, 1, buffer_docs=3, prefetch=0)
    with pytest.raises(DataError, match="empty"):
        loader.next_step()


# --- resume, world size, prefetch -----------------------------------------------------------------

@pytest.mark.parametrize("before, after", [(1, 2), (2, 1), (2, 4)])
def test_resume_on_another_world_size(before, after):
    """k steps on `before` ranks, then the rest on `after` ranks from the saved cursor: the
    ranks' micro-batches, in rank order, are those of the uninterrupted single-rank stream."""
    docs = random_docs(300, 90, seed=1)
    make = lambda rank, world: PackedLoader(docs, 32, 16, 2, rank, world, seed=7, buffer_docs=40,  # noqa: E731
                                            prefetch=2)
    straight = steps(make(0, 1), 30)
    first = [make(r, before) for r in range(before)]
    for k in range(11):
        assert same_steps([sum((l.next_step() for l in first), [])], [straight[k]])
    states = [l.state_dict() for l in first]
    assert all(s == states[0] for s in states)  # the cursor does not depend on the rank
    second = [make(r, after) for r in range(after)]
    for l in second:
        l.load_state_dict(states[0])
    for k in range(11, 30):
        assert same_steps([sum((l.next_step() for l in second), [])], [straight[k]])
    for l in first + second:
        l.close()


def test_prefetch_gives_the_same_batches_and_stats():
    docs = random_docs(400, 200, seed=2)
    sync = PackedLoader(docs, 64, 8, 2, 1, 2, seed=3, buffer_docs=50, prefetch=0)
    ahead = PackedLoader(docs, 64, 8, 2, 1, 2, seed=3, buffer_docs=50, prefetch=3)
    for _ in range(60):
        assert same_steps([sync.next_step()], [ahead.next_step()])
        assert sync.state_dict() == ahead.state_dict()
        assert {k: v for k, v in sync.last_stats.items() if k != "wait_s"} == \
               {k: v for k, v in ahead.last_stats.items() if k != "wait_s"}
    ahead.close()


def test_state_is_the_last_step_taken_not_the_prefetchers():
    docs = random_docs(300, 100, seed=4)
    make = lambda prefetch: PackedLoader(docs, 32, 8, 4, 0, 1, buffer_docs=30, prefetch=prefetch)  # noqa: E731
    straight = steps(make(0), 20)
    loader = make(4)
    steps(loader, 5)
    thread, prefetched, _ = loader._worker
    deadline = time.time() + 10
    while not prefetched.full() and time.time() < deadline:  # let the prefetcher run 4 steps ahead
        time.sleep(0.01)
    assert prefetched.full()
    state = loader.state_dict()
    loader.close()
    assert not thread.is_alive()
    resumed = make(4)
    resumed.load_state_dict(state)
    assert same_steps(steps(resumed, 15), straight[5:])
    # a loader keeps going after close(), from the last step taken
    assert same_steps(steps(loader, 15), straight[5:])
    resumed.close()
    loader.close()


def test_prefetch_errors_reach_the_loop_and_no_thread_is_left():
    docs = random_docs(50, 40)
    masks = [np.ones(len(d) + 1) for d in docs]  # one too long: the packer refuses them
    loader = PackedLoader(docs, 16, 4, 2, 0, 1, masks=masks, buffer_docs=8, prefetch=2)
    with pytest.raises(ValueError, match="masks"):
        loader.next_step()
    assert loader._worker is None
    before = threading.active_count()
    loader = PackedLoader(docs, 16, 4, 2, 0, 1, buffer_docs=8, prefetch=2)
    loader.next_step()
    assert threading.active_count() > before  # the prefetcher (and the buffer packed ahead)
    start = time.perf_counter()
    loader.close()
    assert threading.active_count() == before and time.perf_counter() - start < 1.0


# --- evaluation -------------------------------------------------------------------------------------

class CountingModel(torch.nn.Module):
    """Stands in for the GPT: its 'loss sum' of a batch is the number of scored targets equal
    to LONG, so validation_loss returns the fraction of scored targets from long documents."""

    def __init__(self):
        super().__init__()
        self.register_buffer("cos", torch.zeros(1))

    def forward(self, input_ids, targets, cu_seqlens, max_seqlen):
        assert cu_seqlens[-1] == input_ids.numel()
        return (targets == LONG).sum().float()


class ByteTokenizer:
    bos_id, special_tokens, token_bytes = 1, [], [b"x"] * 10


LONG, SHORT = 5, 7


def test_validation_scores_an_unbiased_seeded_sample():
    """Half the held-out tokens are in a few long documents, half in many short ones. The
    sample must hold about half of each, however the documents are ordered (best-fit packing
    of everything then taking the first rows would score long documents only)."""
    long_docs = [np.array([1] + [LONG] * 199) for _ in range(20)]
    short_docs = [np.array([1] + [SHORT] * 9) for _ in range(400)]
    model, tok = CountingModel(), ByteTokenizer()
    for docs in (long_docs + short_docs, short_docs + long_docs):
        fractions = [validation_loss(model, tok, docs, 32, 20 * 32, seed=s)["val_loss"] for s in range(10)]
        assert 0.35 < np.mean(fractions) < 0.65, fractions
        assert len(set(fractions)) > 1  # the seed chooses the sample
    # the same seed scores the same rows
    a, b = (validation_rows(long_docs + short_docs, 32, 640, 1, seed=3) for _ in range(2))
    assert same_steps([a], [b]) and len(a) == 20
    # never more than one epoch, however many tokens are asked for
    few = validation_rows(short_docs[:30], 32, 10**6, 1)
    assert sum(int((r.targets == SHORT).sum()) for r in few) == 30 * 9
