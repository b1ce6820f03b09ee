"""The compile tier: every Triton kernel builds for sm_90 (H100/H200) and sm_80 (A100), no GPU needed.

The interpreter tests prove the kernels compute the right thing; these prove that Triton's compiler
accepts them, for every launch the public ops make and every autotune config the launchers keep.
The default run puts the whole grid through the front end and a representative set through ptxas
(bf16 attention at head dims 64, 128 and 256 plus its register-hungriest variant, RoPE, cross-entropy),
where it also checks shared memory, spills and warpgroup MMA. The `slow` test takes every launch
and config through ptxas.

The tier runs `python -m fasttrain.gpu_compile` in subprocesses: the kernels must be decorated
without TRITON_INTERPRET, which conftest sets for this process.
"""
import json
import os
import subprocess
import sys

import pytest
import triton

ARCHS = (90, 80)


def _run_tier(out_dir, *args):
    """Run the tier for each arch in parallel (one process each); return their JSON records."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    procs = {}
    for arch in ARCHS:
        path = out_dir / f"sm{arch}.jsonl"
        cmd = [sys.executable, "-m", "fasttrain.gpu_compile", "--arch", str(arch), "--json",
               str(path), *args]
        procs[arch] = (path, subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE,
                                              stderr=subprocess.STDOUT, text=True))
    records = []
    for arch, (path, proc) in procs.items():
        output = proc.communicate()[0]
        assert path.exists(), f"sm_{arch}: the tier wrote no results:\n{output[-3000:]}"
        records += [json.loads(line) for line in path.read_text().splitlines()]
    return records


def _assert_no_problems(records):
    failed = [r for r in records if r["problems"]]
    lines = [f"sm_{r['arch']} {r['kernel']} [{r['case']}] {r['config']}: {'; '.join(r['problems'])}"
             for r in failed]
    assert not failed, f"{len(failed)} of {len(records)} launches fail:\n" + "\n".join(lines[:40])


@pytest.fixture(scope="module")
def tier(tmp_path_factory):
    return _run_tier(tmp_path_factory.mktemp("gpu_compile"))


def test_every_kernel_builds(tier):
    _assert_no_problems(tier)


def test_tier_covers_every_kernel_on_both_targets(tier):
    expected = {"_attn_fwd_kernel", "_attn_bwd_preprocess_kernel", "_attn_bwd_dkdv_kernel",
                "_attn_bwd_dq_kernel", "_attn_bwd_fused_kernel", "_rotary_kernel",
                "_cross_entropy_kernel"}
    for arch in ARCHS:
        mine = [r for r in tier if r["arch"] == arch]
        assert {r["kernel"] for r in mine} == expected
        assert {r["kernel"] for r in mine if "regs" in r} == expected, "ptxas skipped a kernel"
        cases = {r["case"] for r in mine if r["op"] == "attention"}
        for variant in ("D256 float32 varlen softcap Hq8/Hkv8", "D80 float16 dense Hq8/Hkv8",
                        "D64 bfloat16 varlen Hq8/Hkv2"):
            assert variant in cases
    wgmma = [r for r in tier if r["arch"] == 90 and r.get("dot_rows") and "regs" in r]
    assert wgmma and all(r["HGMMA"] for r in wgmma if r["dot_rows"] >= 64)
    assert all(r["HMMA"] and not r["HGMMA"] for r in tier
               if r["arch"] == 80 and r.get("dot_rows") and "regs" in r)


def test_forward_choices_on_both_targets(tier):
    """The forward's choices (attention.py, _FWD_CHOICES): TMA configs are kept on sm_90 only and
    load through TMA there; packed configs only for GQA at head dims <= 128; one-loop configs
    inline one copy of the main loop (2 dots in the IR, against 6)."""
    fwd = [r for r in tier if r["kernel"] == "_attn_fwd_kernel"]
    for arch in ARCHS:
        mine = [r for r in fwd if r["arch"] == arch]
        assert any(r["tile"]["USE_TMA"] for r in mine) == (arch == 90)
        assert any(r["tile"]["ONE_LOOP"] for r in mine) == (arch == 90)
        assert any(r["tile"]["PACK_GQA"] for r in mine)
        assert not any(r["tile"]["PACK_GQA"] for r in mine
                       if r["case"].endswith("Hkv8") or r["case"].startswith(("D160", "D256")))
    compiled = [r for r in fwd if "regs" in r]
    assert any(r["tile"]["USE_TMA"] for r in compiled)
    assert any(r["tile"]["PACK_GQA"] for r in compiled)
    for r in compiled:
        assert bool(r["UTMALDG"]) == r["tile"]["USE_TMA"], (r["case"], r["config"])
        assert r["dots"] == (2 if r["tile"]["ONE_LOOP"] else 6), (r["case"], r["config"])


def test_fused_backward_has_five_dots_per_tile_pair(tier):
    """tt.dot ops in the compiled Triton IR: each kernel has one loop per range (masked edge,
    full blocks, masked edge); the fused loop body has 5 dots, the split kernels' 4 (dk/dv) + 3
    (dq) for the same (key block, query block) pair."""
    for arch in ARCHS:
        dots = {r["kernel"]: r["dots"] for r in tier if r["arch"] == arch and "regs" in r
                and r["case"] == "D128 bfloat16 dense Hq8/Hkv8"}
        assert dots["_attn_bwd_fused_kernel"] == 3 * 5
        assert dots["_attn_bwd_dkdv_kernel"] + dots["_attn_bwd_dq_kernel"] == 3 * 7


def test_shared_memory_estimate_bounds_the_compiled_size(tier):
    """The autotune prune keeps configs by an estimate: it must never be below what Triton
    allocates, or a device with less shared memory (sm_86: 99 KiB) would get configs that fail."""
    from fasttrain.kernels import attention
    checked = 0
    for r in tier:
        if r["op"] == "attention" and "regs" in r and r["tile"]:
            head_dim, dtype = r["case"].split()[:2]
            elem_size = 4 if dtype == "float32" else 2
            tile = max(64, triton.next_power_of_2(int(head_dim[1:])))
            config = triton.Config({k: v for k, v in r["tile"].items()
                                    if k not in ("num_warps", "num_stages")},
                                   num_stages=r["tile"]["num_stages"])
            estimate = attention._shared_memory_bytes(r["kernel"], config, tile, elem_size)
            assert estimate >= r["shared"], (r["kernel"], r["case"], r["config"], estimate)
            checked += 1
    assert checked >= 40


@pytest.mark.slow
def test_every_config_through_ptxas(tmp_path):
    _assert_no_problems(_run_tier(tmp_path, "--ptxas", "all"))


# ---- the checks themselves fail on broken kernels ---------------------------------------------


def test_checks_catch_broken_kernels():
    """The interpreter runs these kernels; the tier must report each one's compile problem."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = os.path.join(os.path.dirname(__file__), "broken_kernels.py")
    proc = subprocess.run([sys.executable, script], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = json.loads(proc.stdout)
    assert "Cannot access global variable SCALE" in found["reads_float_global"]
    assert "cannot convert tf32" in found["assigns_constexpr_tuple"]
    problems = " ".join(found["big_dot"])
    assert "shared memory 262144 B > sm_80 limit" in problems and "spills" in problems
