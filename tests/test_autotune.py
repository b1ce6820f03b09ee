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
            fits = {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in tuned.configs
                    if attention._shared_memory_bytes(name, c, tile, q.element_size()) <= limit}
            assert kept and set(shapes) <= fits, (name, head_dim)
            if dtype == torch.float32:
                assert len(kept) == 1, (name, head_dim, shapes)
            else:  # all of the table that fits, at most 4 to benchmark
                assert set(shapes) == fits & set(table[f"sm{arch}"][tile]), (name, head_dim)
                assert len(kept) <= 4, (name, head_dim, shapes)


@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_forward_designs_add_at_most_two_tiles_each(head_dim, monkeypatch):
    """With every forward design allowed (sm_90, GQA, aligned), the pointer loads keep their table and
    each other design is timed at the two leading tiles that fit; forced, a design gets every tile."""
    monkeypatch.setattr(attention, "_device_limits", lambda device: (9, SHARED_MEMORY_LIMIT[90]))
    q = torch.empty(1, 64, 8, head_dim, dtype=torch.bfloat16)
    k = torch.empty(1, 64, 2, head_dim, dtype=torch.bfloat16)
    meta = attention._kernel_meta(q, 0.0)
    table = attention._FWD_TILES["sm90"][head_dim]

    def kept():
        choices, _ = attention._fwd_choices(k, k, 4)
        configs = attention._prune_fwd_configs(attention._attn_fwd.configs, {"Q": q, "choices": choices}, **meta)
        by_design = {}
        for c in configs:
            design = (c.kwargs["USE_TMA"], c.kwargs["PACK_GQA"], c.kwargs["ONE_LOOP"])
            by_design.setdefault(design, []).append((c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages))
        return by_design

    by_design = kept()
    pointer = attention._FWD_CHOICES["pointer"]
    assert sorted(by_design.pop(pointer), key=table.index) == table
    assert len(by_design) == (4 if head_dim <= 128 else 2)  # packing is not tried at 256
    assert all(sorted(tiles, key=table.index) == table[:2] for tiles in by_design.values()), by_design
    monkeypatch.setenv("FASTTRAIN_ATTN_FWD", "tma")
    assert sorted(kept()[attention._FWD_CHOICES["tma"]], key=table.index) == table


@pytest.mark.parametrize("max_seqlen", [1, 15, 16, 40, 64, 65, 100, 1000, 2048, 3000])
def test_warmup_seqlens_reach_every_kernel_variant_with_its_longest_length(max_seqlen):
    """Brute force over every longest-document length a batch can have: the warm-up lengths are
    the longest of each (autotune bucket, divisible by 16) variant, one each."""
    longest = {}
    for n in range(1, max_seqlen + 1):
        longest[(attention._seqlen_bucket(n), n % 16 == 0)] = n
    assert attention.warmup_seqlens(max_seqlen) == sorted(longest.values())


# ---- GPU tier: the stall is gone ---------------------------------------------------------------

_TUNE_ONCE = """
import json, torch
from fasttrain.kernels import attention, flash_attn_varlen_func
q, k, v = (torch.randn(4096, h, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
           for h in (16, 4, 4))
cu = torch.arange(0, 4097, 1024, device="cuda", dtype=torch.int32)
flash_attn_varlen_func(q, k, v, cu, cu, 1024, 1024, causal=True).sum().backward()
torch.cuda.synchronize()
print(json.dumps([hasattr(t, "bench_time") for t in  # set only when a key was benchmarked
                  (attention._attn_fwd, attention._attn_bwd_dkdv, attention._attn_bwd_dq)]))
"""


@pytest.mark.gpu
def test_a_second_process_takes_the_tuned_choices_from_disk():
    """In the usual cache folder (compiled kernels are likely there already: compiling every
    config afresh takes minutes), the first process tunes or reads the choices; the second reads."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    runs = []
    for _ in range(2):
        proc = subprocess.run([sys.executable, "-c", _TUNE_ONCE], env=env, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    assert runs[1] == [False] * 3, runs


@pytest.mark.gpu
def test_warmup_tunes_every_key_the_training_batches_reach():
    """After the warm-up, batches of documents of any lengths up to seq_len add no autotune key."""
    from fasttrain.train import warm_up_kernels, warmup_batches
    from test_model import tiny

    seq_len, rows = 512, 2
    model = tiny(head_dim=64, aspect_ratio=64, max_seq_len=seq_len).cuda()
    autocast = torch.autocast("cuda", dtype=torch.bfloat16)
    warm_up_kernels(model, warmup_batches(seq_len, rows), autocast, torch.device("cuda"))
    tuned = (attention._attn_fwd, attention._attn_bwd_dkdv, attention._attn_bwd_dq)
    keys = [set(t.cache) for t in tuned]
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        lens = []  # every row cut into documents of random lengths
        for _ in range(rows):
            cuts = sorted(torch.randint(1, seq_len, (int(torch.randint(0, 6, (1,), generator=gen)),),
                                        generator=gen).tolist())
            lens += [b - a for a, b in zip([0, *cuts], [*cuts, seq_len]) if b > a]
        cu = torch.tensor([0, *lens]).cumsum(0).to("cuda", torch.int32)
        ids = torch.randint(0, 97, (rows, seq_len), device="cuda")
        with autocast:
            model(ids, ids, cu, max(lens)).backward()
    assert [set(t.cache) for t in tuned] == keys
