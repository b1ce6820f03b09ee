"""Attention autotuning that does not stall training: a key without what compiles alike, the
choices cached on disk, a small fitting config list per (target, head dim, dtype), and the
document lengths a warm-up runs so that every kernel variant is compiled and tuned before training.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

from fasttrain.gpu_compile import SHARED_MEMORY_LIMIT
from fasttrain.kernels import attention


@pytest.fixture(scope="module")
def compiled_checks():
    """tests/autotune_check.py's report: it needs the kernels compiled, not interpreted."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = os.path.join(os.path.dirname(__file__), "autotune_check.py")
    proc = subprocess.run([sys.executable, script], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def test_autotuners_cache_their_choices_on_disk(compiled_checks):
    tuned = compiled_checks["autotuned"]
    assert set(tuned) == {"_attn_fwd_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel"}
    assert all(t["cache_results"] for t in tuned.values())
    trip = compiled_checks["round_trip"]
    # a new process finds the first one's choice; another key or config list tunes afresh
    assert trip["first"]["benchmarked"] and not trip["first"]["hit"]
    assert trip["second"]["hit"] and not trip["second"]["benchmarked"]
    assert trip["second"]["choice"] == trip["fastest"]
    assert trip["other_key"]["benchmarked"] and trip["other_configs"]["benchmarked"]
    assert compiled_checks["cache_files"] == ["_attn_fwd_kernel.autotune.json"] * 3


def test_causal_and_unbounded_windows_share_key_and_binary(compiled_checks):
    """The window sides are not in the key: causal and full attention compile to one binary,
    so tuning them apart only doubled the tuning."""
    assert all(compiled_checks["same_binary"].values())
    assert all(compiled_checks["same_key"].values())
    key = compiled_checks["key"]
    assert key[:4] == [64, 256, True, False]  # head dim, bucket of 200 tokens, varlen, softcap
    assert "torch.bfloat16" in key  # Triton adds the dtypes


@pytest.mark.parametrize("arch", sorted(SHARED_MEMORY_LIMIT))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_each_target_head_dim_and_dtype_keeps_a_small_fitting_list(arch, dtype, monkeypatch):
    """16-bit inputs keep the target's table (what fits); 4-byte inputs one config, no tuning."""
    limit = SHARED_MEMORY_LIMIT[arch]
    monkeypatch.setattr(attention, "_device_limits", lambda device: (arch // 10, limit))
    tables = {attention._attn_fwd: attention._FWD_TILES, attention._attn_bwd_dkdv: attention._DKDV_TILES,
              attention._attn_bwd_dq: attention._DQ_TILES}
    for head_dim in (16, 32, 64, 80, 96, 128, 160, 256):
        q = torch.empty(1, 1, 1, head_dim, dtype=dtype)
        meta = attention._kernel_meta(q, 0.0)
        tile = max(64, meta["BLOCK_D"])
        for tuned, table in tables.items():
            name = tuned.fn.__name__
            kept = tuned.early_config_prune(tuned.configs, {"Q": q}, **meta)
            shapes = [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in kept]
            assert set(shapes) <= set(table[f"sm{arch}"][tile]), (name, head_dim)
            fits = [c for c in kept if attention._shared_memory_bytes(name, c, tile, q.element_size()) <= limit]
            assert fits == kept and kept, (name, head_dim)
            if dtype == torch.float32:
                assert len(kept) == 1, (name, head_dim, shapes)
            else:
                assert len(kept) <= 4, (name, head_dim, shapes)


@pytest.mark.parametrize("max_seqlen", [1, 15, 16, 40, 64, 65, 100, 1000, 2048, 3000])
def test_warmup_seqlens_reach_every_kernel_variant_with_its_longest_length(max_seqlen):
    """Brute force over every longest-document length a batch can have: the warm-up lengths are
    the longest of each (autotune bucket, divisible by 16) variant, one each."""
    longest = {}
    for n in range(1, max_seqlen + 1):
        longest[(attention._seqlen_bucket(n), n % 16 == 0)] = n
    assert attention.warmup_seqlens(max_seqlen) == sorted(longest.values())
