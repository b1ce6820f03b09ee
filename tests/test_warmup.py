"""--warmup-kernels: the flag's default, the dummy batches, and a warm-up that leaves the model, its
gradients and the RNG as it found them (tests/test_training.py checks the loss curve end to end)."""
import contextlib

import torch

from fasttrain.data.batch import IGNORE_INDEX
from fasttrain.kernels.attention import warmup_seqlens
from fasttrain.train import TrainConfig, use_warmup, warm_up_kernels, warmup_batches
from test_compile import _parse, _tiny_model


def test_warmup_flag_defaults_by_device():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert _parse().warmup_kernels is None
    assert not use_warmup(_parse(), cpu) and use_warmup(_parse(), cuda)
    assert use_warmup(_parse("--warmup-kernels"), cpu)
    assert not use_warmup(_parse("--no-warmup-kernels"), cuda)
    assert isinstance(_parse(), TrainConfig)


def test_warmup_batches_look_like_the_loaders():
    """Each (micro_batch, seq_len) batch packs documents of one length n into every row, each row
    start a document start, max_seqlen n: one batch per length of warmup_seqlens."""
    seq_len, rows = 100, 3
    batches = warmup_batches(seq_len, rows)
    assert [b.max_seqlen for b in batches] == warmup_seqlens(seq_len)
    for b in batches:
        assert b.input_ids.shape == b.targets.shape == (rows, seq_len)
        assert b.cu_seqlens.dtype == torch.int32 and (b.targets != IGNORE_INDEX).all()  # every target scored
        cu = b.cu_seqlens.tolist()
        assert cu[0] == 0 and cu[-1] == rows * seq_len
        assert set(range(0, rows * seq_len, seq_len)) <= set(cu)  # row starts are document starts
        assert max(y - x for x, y in zip(cu, cu[1:])) == b.max_seqlen


def test_warmup_leaves_weights_gradients_and_rng_alone():
    model = _tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    warm_up_kernels(model, warmup_batches(16, 2), contextlib.nullcontext(), torch.device("cpu"))
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(p.grad is None for p in model.parameters())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
