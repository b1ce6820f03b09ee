"""Packing: the C++ extension and the numpy fallback against the plain-Python reference, a
Packer reusing its buffers, layout invariants, hand-worked examples, bad input, and the CUDA
sources compiling."""
import os
import shutil
import subprocess

import numpy as np
import pytest
import torch

from fasttrain.data import packing
from fasttrain.data.packing import (PackedBatch, Packer, pack_documents, pack_documents_reference,
                                    packing_backend)

BOS = 1
IGNORE = -100
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

needs_extension = pytest.mark.skipif(packing._load_extension() is None,
                                     reason="C++ extension not built (pip install --no-build-isolation -e .)")


def random_docs(rng, n, row_len, masked=False):
    """Documents with the awkward lengths: 0, 1, row_len, row_len + 1, longer than a bin."""
    cap = row_len + 1
    special = [0, 1, row_len, cap, cap + 1, 2 * cap, 3 * cap - 1]
    docs, masks = [], []
    for _ in range(n):
        length = int(rng.choice(special)) if rng.random() < 0.3 else int(rng.integers(1, 2 * cap))
        doc = rng.integers(2, 1000, size=length)
        if length:
            doc[0] = BOS
        docs.append(doc)
        masks.append(rng.integers(0, 2, size=length))
    return docs, (masks if masked else None)


def assert_same(a: PackedBatch, b: PackedBatch):
    for name in ("input_ids", "targets", "position_ids", "doc_ids", "cu_seqlens"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and x.shape == y.shape, name
        assert torch.equal(x, y), name
    assert a.max_seqlen == b.max_seqlen
    assert a.stats == b.stats


def backends():
    return ["python", "cpp"] if packing._load_extension() is not None else ["python"]


@pytest.mark.parametrize("row_len", [1, 2, 7, 64])
@pytest.mark.parametrize("mode", ["best_fit", "pad"])
@pytest.mark.parametrize("masked", [False, True])
def test_backends_match_reference(row_len, mode, masked):
    rng = np.random.default_rng(row_len * 10 + masked)
    docs, masks = random_docs(rng, 60, row_len, masked)
    opts = dict(masks=masks, pad_id=0, ignore_index=IGNORE, mode=mode)
    ref = pack_documents_reference(docs, row_len, **opts)
    for backend in backends():
        assert_same(pack_documents(docs, row_len, backend=backend, **opts), ref)


@needs_extension
def test_cpp_equals_fallback_on_a_larger_batch():
    rng = np.random.default_rng(0)
    lengths = np.minimum(rng.lognormal(5.5, 1.0, size=3000).astype(int) + 1, 3000)
    docs = [np.concatenate([[BOS], rng.integers(2, 50000, size=n - 1)]).astype(np.int32)
            for n in lengths]
    masks = [rng.integers(0, 2, size=len(d)).astype(np.uint8) for d in docs]
    for m in (None, masks):
        a = pack_documents(docs, 512, masks=m, backend="cpp")
        b = pack_documents(docs, 512, masks=m, backend="python")
        assert_same(a, b)
    assert a.stats["utilization"] > 0.97


def test_worked_example():
    # row_len 4: bins of 5 tokens. Pieces, longest first: D[0:5] (5), C (4), A (3), B (2), D[5:7].
    # D[0:5] fills bin 0, C opens bin 1 (1 free), A opens bin 2 (2 free), B fills bin 2,
    # D[5:7] fits nowhere (1 free in bin 1) and opens bin 3.
    A, B, C, D = [1, 10, 11], [1, 20], [1, 30, 31, 32], [1, 40, 41, 42, 43, 44, 45]
    for backend in backends():
        b = pack_documents([np.array(d) for d in (A, B, C, D)], 4, backend=backend)
        assert b.input_ids.tolist() == [[1, 40, 41, 42], [1, 30, 31, 32], [1, 10, 11, 1], [44, 45, 0, 0]]
        assert b.targets.tolist() == [[40, 41, 42, 43], [30, 31, 32, -1], [10, 11, 1, 20],
                                      [45, -1, -1, -1]]
        assert b.position_ids.tolist() == [[0, 1, 2, 3], [0, 1, 2, 3], [0, 1, 2, 0], [0, 1, 0, 1]]
        assert b.doc_ids.tolist() == [[3, 3, 3, 3], [2, 2, 2, 2], [0, 0, 0, 1], [3, 3, -1, -1]]
        assert b.cu_seqlens.tolist() == [0, 4, 8, 11, 12, 14, 16]
        assert b.cu_seqlens.dtype == torch.int32 and b.max_seqlen == 4
        assert b.stats == {"rows": 4, "tokens": 16, "padding": 2, "utilization": 14 / 16,
                           "docs": 4, "split_docs": 1, "empty_docs": 0}
        # Masking B's BOS drops A's end-of-document target; masking C's 31 drops 30 -> 31.
        masks = [np.ones(3), np.array([0, 1]), np.array([1, 1, 0, 1]), np.ones(7)]
        b = pack_documents([np.array(d) for d in (A, B, C, D)], 4, masks=masks, backend=backend)
        assert b.targets.tolist() == [[40, 41, 42, 43], [30, -1, 32, -1], [10, 11, -1, 20],
                                      [45, -1, -1, -1]]


def test_continuation_piece_is_never_a_target():
    # D splits into D[0:5] and [44]; [44] joins A's bin, but A's last token must not predict it.
    docs = [np.array([1, 10]), np.array([1, 40, 41, 42, 43, 44])]
    for backend in backends():
        b = pack_documents(docs, 4, backend=backend)
        assert b.input_ids.tolist() == [[1, 40, 41, 42], [1, 10, 44, 0]]
        assert b.targets.tolist() == [[40, 41, 42, 43], [10, -1, -1, -1]]
        assert b.position_ids.tolist() == [[0, 1, 2, 3], [0, 1, 0, 0]]
        assert b.cu_seqlens.tolist() == [0, 4, 6, 7, 8]


def test_layout_invariants():
    rng = np.random.default_rng(1)
    row_len = 16
    docs, _ = random_docs(rng, 200, row_len)
    b = pack_documents(docs, row_len, ignore_index=IGNORE, pad_id=0)
    R = b.input_ids.shape[0]
    cu = b.cu_seqlens.tolist()
    assert cu[0] == 0 and cu[-1] == R * row_len and all(x < y for x, y in zip(cu, cu[1:]))
    assert set(range(0, R * row_len, row_len)) <= set(cu)  # every row start is a boundary
    assert b.max_seqlen == max(y - x for x, y in zip(cu, cu[1:]))
    pos, ids, tgt, did = (t.flatten() for t in (b.position_ids, b.input_ids, b.targets, b.doc_ids))
    for x, y in zip(cu, cu[1:]):  # positions restart at every segment, one document per segment
        assert torch.equal(pos[x:y], torch.arange(y - x))
        assert len(set(did[x:y].tolist())) == 1
    # Within a document piece, the target is the next input token.
    same = (b.doc_ids[:, 1:] == b.doc_ids[:, :-1]) & (b.position_ids[:, 1:] > 0) & (b.doc_ids[:, 1:] >= 0)
    assert torch.equal(b.targets[:, :-1][same], b.input_ids[:, 1:][same])
    # At a document start inside a row, the previous document's last token predicts the BOS.
    starts = (b.position_ids[:, 1:] == 0) & (b.doc_ids[:, 1:] >= 0) & (b.input_ids[:, 1:] == BOS)
    assert (b.targets[:, :-1][starts] == BOS).all()
    # Padding: pad input, no target; no target points into padding.
    assert (ids[did < 0] == 0).all() and (tgt[did < 0] == IGNORE).all()
    assert (b.targets[:, :-1][b.doc_ids[:, 1:] < 0] == IGNORE).all()
    assert b.stats["padding"] == int((did < 0).sum())


def test_every_token_placed_exactly_once():
    rng = np.random.default_rng(2)
    row_len = 32
    docs, _ = random_docs(rng, 300, row_len)
    lengths = torch.tensor([len(d) for d in docs], dtype=torch.int64)
    cap = row_len + 1
    for plan_fn in plan_functions():
        doc, start, length, offset, row_first_piece, _, _, split, empty = plan_fn(lengths, row_len, True)
        covered = [np.zeros(len(d), int) for d in docs]
        for r in range(len(row_first_piece) - 1):
            fill = 0
            for q in range(row_first_piece[r], row_first_piece[r + 1]):
                assert offset[q] == fill  # pieces are contiguous from the row start
                fill += length[q]
                covered[doc[q]][start[q]:start[q] + length[q]] += 1
            assert 0 < fill <= cap
        assert all((c == 1).all() for c in covered)
        assert split == sum(len(d) > cap for d in docs) and empty == sum(len(d) == 0 for d in docs)
        assert all(length[q] <= cap for q in range(len(length)))


def plan_functions():
    fns = [lambda L, n, bf: packing._plan_numpy(L.numpy(), n, bf)]
    if packing._load_extension() is not None:
        fns.append(packing._load_extension().plan)
    return fns


def test_no_document_that_fits_is_cut():
    rng = np.random.default_rng(3)
    row_len = 64
    docs = [np.r_[BOS, rng.integers(2, 100, size=int(n))] for n in rng.integers(0, row_len + 1, 400)]
    b = pack_documents(docs, row_len)
    assert b.stats["split_docs"] == 0
    for d in range(len(docs)):  # each document lies in a single row
        assert len(torch.nonzero(b.doc_ids == d)[:, 0].unique()) <= 1


def test_deterministic_and_dtypes():
    rng = np.random.default_rng(4)
    docs, masks = random_docs(rng, 80, 16, masked=True)
    a = pack_documents(docs, 16, masks=masks)
    assert_same(a, pack_documents(docs, 16, masks=masks))
    for convert in (lambda d: d.astype(np.uint16), lambda d: d.astype(np.int32),
                    lambda d: torch.from_numpy(d), lambda d: d.tolist()):
        assert_same(a, pack_documents([convert(d) for d in docs], 16,
                                      masks=[torch.from_numpy(m.astype(bool)) for m in masks]))


def test_pad_mode_one_piece_per_row():
    docs = [np.array([1, 5, 6]), np.array([], dtype=np.int64), np.array([1] + [7] * 9)]
    b = pack_documents(docs, 4, mode="pad")
    # [1,5,6] | [1,7,7,7,7] | [7,7,7,7,7]: documents keep their order, one piece per row.
    assert b.doc_ids.tolist() == [[0, 0, 0, -1], [2, 2, 2, 2], [2, 2, 2, 2]]
    assert b.targets.tolist() == [[5, 6, -1, -1], [7, 7, 7, 7], [7, 7, 7, 7]]
    assert b.stats["empty_docs"] == 1 and b.stats["split_docs"] == 1 and b.stats["padding"] == 1


def test_empty_inputs():
    for docs in ([], [np.array([], dtype=np.int32)]):
        for backend in backends():
            b = pack_documents(docs, 8, backend=backend)
            assert b.input_ids.shape == (0, 8) and b.cu_seqlens.tolist() == [0]
            assert b.max_seqlen == 0 and b.stats["rows"] == 0 and b.stats["utilization"] == 0.0


@pytest.mark.parametrize("call, match", [
    (lambda: pack_documents([np.ones(3, int)], 0), "row_len"),
    (lambda: pack_documents([np.ones(3, int)], 2.5), "row_len"),
    (lambda: pack_documents([np.ones((2, 3), int)], 4), r"docs\[0\]"),
    (lambda: pack_documents([np.ones(3, int), np.ones(3)], 4), r"docs\[1\].*integer"),
    (lambda: pack_documents(np.ones(3, int), 4), "docs"),
    (lambda: pack_documents([np.ones(3, int)], 4, masks=[]), "masks"),
    (lambda: pack_documents([np.ones(3, int)], 4, masks=[np.ones(2)]), r"masks\[0\]"),
    (lambda: pack_documents([np.ones(3, int)], 4, mode="greedy"), "mode"),
    (lambda: pack_documents([np.ones(3, int)], 4, backend="tpu"), "backend"),
    (lambda: pack_documents([np.array([5, 1])], 4, bos_id=1), "bos_id"),
])
def test_bad_input_raises(call, match):
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("mode", ["best_fit", "pad"])
def test_packer_reuses_buffers_without_stale_data(backend, mode):
    # Odd row lengths; batches bigger, then smaller, then bigger than any before (the buffers
    # grow), masked and not, int64 and int32 tokens: every batch equals the reference, so nothing
    # of an earlier call shows through.
    for row_len in (7, 13):
        packer = Packer(row_len, pad_id=3, ignore_index=IGNORE, mode=mode, backend=backend)
        rng = np.random.default_rng(row_len)
        pointers = []
        for i, (n_docs, masked) in enumerate([(90, True), (17, False), (5, True), (160, False),
                                              (1, False), (90, True)]):
            docs, masks = random_docs(rng, n_docs, row_len, masked)
            if i % 2:
                docs = [d.astype(np.int32) for d in docs]
            ref = pack_documents_reference(docs, row_len, masks=masks, pad_id=3, ignore_index=IGNORE,
                                           mode=mode)
            batch = packer.pack(docs, masks)
            assert_same(batch, ref)
            pointers.append(batch.input_ids.untyped_storage().data_ptr())
        # The smaller batches after the first lived in its buffers (the ones after 160 docs
        # live in the grown ones).
        assert pointers[1] == pointers[2] == pointers[0] and pointers[4] == pointers[5] == pointers[3]


def test_pack_documents_returns_fresh_tensors():
    rng = np.random.default_rng(7)
    docs, _ = random_docs(rng, 40, 16)
    a = pack_documents(docs, 16)
    kept = a.input_ids.clone()
    pack_documents(docs[:10], 16)
    assert torch.equal(a.input_ids, kept)


def test_fallback_when_the_extension_is_missing(monkeypatch):
    monkeypatch.setattr(packing, "_extension", None)
    monkeypatch.setattr(packing, "_extension_error", "No module named 'fasttrain._packing'")
    monkeypatch.setattr(packing, "_logged", False)
    assert packing_backend() == "python"
    rng = np.random.default_rng(8)
    docs, masks = random_docs(rng, 50, 9, masked=True)
    assert_same(pack_documents(docs, 9, masks=masks), pack_documents_reference(docs, 9, masks=masks))
    with pytest.raises(RuntimeError, match="backend='python'"):
        pack_documents(docs, 9, backend="cpp")


def test_backend_name_and_log(caplog):
    caplog.set_level("INFO", logger="fasttrain")
    packing._logged = False
    name = packing_backend()
    assert name == ("cpp" if packing._load_extension() is not None else "python")
    packing_backend()
    assert len([r for r in caplog.records if "packing:" in r.getMessage()]) == 1


def test_cuda_sources_compile():
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc not installed")
    script = os.path.join(ROOT, "csrc", "check_cuda_compiles.sh")
    result = subprocess.run(["bash", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.gpu
def test_cuda_backend_matches_cpp():
    rng = np.random.default_rng(6)
    docs, masks = random_docs(rng, 500, 128, masked=True)
    for m in (None, masks):
        a = pack_documents(docs, 128, masks=m, backend="cpp")
        b = pack_documents(docs, 128, masks=m, backend="cuda")
        assert b.input_ids.is_cuda
        assert_same(a, b.to("cpu"))
