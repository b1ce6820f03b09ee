"""Compile the Triton kernels for GPUs this machine does not have: sm_90 (H100/H200), sm_80 (A100).

Triton's interpreter, which runs the kernels in the CPU tests, accepts code that Triton's compiler
rejects (a tuple of constexprs assigned to a local, a plain Python float global read in a kernel).
So the test suite also compiles every kernel the way a launch on a GPU would:

1. capture: the real host launchers (`attention._triton_forward/_triton_backward`,
   `rope._rotary_launch`, `cross_entropy._ce_launch`) run on CPU tensors while the kernel objects
   are swapped for recorders, so each launch's exact arguments are kept instead of run;
2. specialise: Triton's own binder turns them into what a real launch compiles (an int equal to 1
   becomes a constexpr; pointers and ints divisible by 16 get the divisibility hint), once per
   autotune config that the launcher's own prune keeps for the target's shared-memory limit;
3. compile: the front end (source -> Triton IR, milliseconds) for every launch; the whole
   pipeline through ptxas for the chosen ones, reading the cubin back with the cuobjdump that Triton
   ships: registers, stack, spill stores, shared memory, HGMMA (wgmma), HMMA (mma.sync), TMA; and
   the number of tt.dot ops in the Triton IR (each inlined copy of a loop brings its own).

A compiled launch passes when it builds, its shared memory fits the target's per-block limit, it
has no spill stores, and (attention on sm_90) its dots lower to warpgroup MMA. Compiled kernels land
in Triton's cache (TRITON_CACHE_DIR), so a second run reads them back in seconds.

This relies on Triton's JIT internals (the binder and `JITFunction._pack_args`), which are the same
on Triton 3.6 to 3.9, the versions fasttrain supports.

    python -m fasttrain.gpu_compile                   front end for every case, ptxas for a representative set
    python -m fasttrain.gpu_compile --ptxas all       ptxas for every case and kept config (slow)
    options: --arch 90 --arch 80, --only attention|rope|cross_entropy, --match 'D16 ',
             --json FILE, --table, --markdown
"""
import argparse
import contextlib
import dataclasses
import importlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from typing import Callable, Iterable

import torch
import triton
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import create_function_from_signature

# Opt-in maximum of dynamic shared memory per block (cudaDevAttrMaxSharedMemoryPerBlockOptin).
SHARED_MEMORY_LIMIT = {90: 232_448, 80: 166_912}
# Kernels whose dots must lower to warpgroup MMA on sm_90, with the config keys that give the
# dots' row counts (the smallest counts): wgmma takes 64 rows per warpgroup, so a tile of fewer
# rows may use mma.sync. The fused backward's dots have BLOCK_N rows (dk, dv) and BLOCK_M (dq).
DOT_ROWS = {"_attn_fwd_kernel": ("BLOCK_M",), "_attn_bwd_dq_kernel": ("BLOCK_M",),
            "_attn_bwd_dkdv_kernel": ("BLOCK_N",),
            "_attn_bwd_fused_kernel": ("BLOCK_M", "BLOCK_N")}
# SASS instructions counted per kernel: MMA kind, TMA and cp.async copies, spill stores, global
# loads and stores (how wide the memory access is vectorised shows in their count)
_SASS_OPS = ("HGMMA", "HMMA", "UTMALDG", "LDGSTS", "STL", "LDG", "STG")


# ----------------------------------------------------------------------------------------------
# Cases: launches captured from the real host launchers
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Launch:
    """One kernel launch as a launcher made it: kernel object (JITFunction or Autotuner) + args."""
    op: str  # "attention", "rope", "cross_entropy"
    case: str  # the public-op variant that produced it
    kernel: object
    args: tuple
    kwargs: dict
    representative: bool  # also compiled through ptxas in the default run
    configs: list = dataclasses.field(default_factory=list)  # [(label, config kwargs, kept)]
    error: str = ""  # the launcher itself failed (then kernel is None)


class _Recorder:
    """Stands in for a kernel object: `kernel[grid](*args, **kwargs)` is recorded, not run."""

    def __init__(self, real, sink):
        self.real, self.sink = real, sink

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.sink.append((self.real, args, kwargs))


@contextlib.contextmanager
def _recording(module, names, sink, arch):
    saved = {name: getattr(module, name) for name in names}
    saved_limits = getattr(module, "_device_limits", None)
    try:
        for name in names:
            setattr(module, name, _Recorder(saved[name], sink))
        if saved_limits is not None:  # the autotune prune sees the target GPU, not the CPU
            module._device_limits = lambda device: (arch // 10, SHARED_MEMORY_LIMIT[arch])
        yield
    finally:
        for name, value in saved.items():
            setattr(module, name, value)
        if saved_limits is not None:
            module._device_limits = saved_limits


def _capture(op, module, names, cases, arch):
    """Launches from running each case's thunk with the module's kernels recorded, yielded case
    by case: a case's tensors (the launchers' zeroed buffers take real memory) are freed before
    the next case runs."""
    for case, representative, thunk in cases:
        sink = []
        with _recording(module, names, sink, arch):
            try:
                thunk()
                # the autotuner prunes at launch time, for the device: prune for the target here
                launches = [Launch(op, case, kernel, args, kwargs, representative,
                                   configs_of(kernel, args, kwargs))
                            for kernel, args, kwargs in sink]
            except Exception as e:  # noqa: BLE001 -- the launcher refused: a finding to report
                launches = [Launch(op, case, None, (), {}, representative,
                                   error=f"launcher: {type(e).__name__}: {e}")]
        del sink
        yield from launches


def attention_launches(arch):
    attention = importlib.import_module("fasttrain.kernels.attention")
    cases = []
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for head_dim in (16, 32, 64, 80, 96, 128, 160, 256):
            for varlen in (False, True):
                for softcap in (0.0, 30.0):
                    for n_heads_kv in (8, 2):  # MHA (group 1 specialises to a constexpr), GQA
                        if n_heads_kv == 2 and dtype != torch.bfloat16:
                            continue
                        name = (f"D{head_dim} {str(dtype)[6:]} {'varlen' if varlen else 'dense'}"
                                f"{' softcap' if softcap else ''} Hq8/Hkv{n_heads_kv}")
                        # the training shapes, the register-hungriest variant, the mma.sync tiles
                        representative = dtype == torch.bfloat16 and head_dim in (64, 128, 256) \
                            and (not (varlen or softcap or n_heads_kv == 2)
                                 or (varlen and softcap and n_heads_kv == 2))
                        cases.append((name, representative, _attention_thunk(
                            attention, dtype, head_dim, varlen, softcap, n_heads_kv)))
    names = ["_attn_fwd", "_attn_bwd_dkdv", "_attn_bwd_dq", "_attn_bwd_fused",
             "_attn_bwd_preprocess_kernel"]
    return _capture("attention", attention, names, cases, arch)


def _attention_thunk(attention, dtype, head_dim, varlen, softcap, n_heads_kv, batch=2, T=2048):
    def thunk():
        shape = (batch * T,) if varlen else (batch, T)
        q = torch.empty(*shape, 8, head_dim, dtype=dtype)
        k = torch.empty(*shape, n_heads_kv, head_dim, dtype=dtype)
        cu = torch.tensor([0, 1000, T, batch * T], dtype=torch.int32) if varlen else None
        options = (cu, cu, T, T, head_dim ** -0.5, attention.UNBOUNDED, 0, softcap)  # causal
        out, lse = attention._triton_forward(q, k, k, *options)
        for path in ("split", "fused"):  # both backward paths, whatever the device table picks
            attention._triton_backward(torch.empty_like(out), q, k, k, out, lse, *options, path)
    return thunk


def rope_launches(arch):
    rope = importlib.import_module("fasttrain.kernels.rope")
    cases = []
    flags = [(has_k, varlen, interleaved, conjugate, partial, offsets)
             for has_k in (True, False) for varlen in (False, True)
             for interleaved in (False, True) for conjugate in (False, True)
             for partial in (False, True) for offsets in (False, True)]
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for head_dim in (64, 128):
            for has_k, varlen, interleaved, conjugate, partial, offsets in flags:
                if dtype != torch.bfloat16 and (varlen or conjugate or offsets):
                    continue
                name = (f"D{head_dim}{' rot/2' if partial else ''} {str(dtype)[6:]} "
                        f"{'varlen' if varlen else 'dense'} {'q+k' if has_k else 'q'}"
                        f"{' interleaved' if interleaved else ''}{' conj' if conjugate else ''}"
                        f"{' offsets' if offsets else ''}")
                representative = (dtype == torch.bfloat16 and head_dim == 128 and has_k
                                  and not (varlen or conjugate or partial or offsets))
                cases.append((name, representative, _rope_thunk(
                    rope, dtype, head_dim, has_k, varlen, interleaved, conjugate, partial,
                    offsets)))
    return _capture("rope", rope, ["_rotary_kernel"], cases, arch)


def _rope_thunk(rope, dtype, head_dim, has_k, varlen, interleaved, conjugate, partial, offsets,
                batch=4, T=2048):
    def thunk():
        shape = (batch * T,) if varlen else (batch, T)
        q = torch.empty(*shape, 16, head_dim, dtype=dtype)
        k = torch.empty(*shape, 4, head_dim, dtype=dtype) if has_k else None
        cos = torch.empty(T, (head_dim // 2 if partial else head_dim) // 2)
        cu = torch.tensor([0, 100, T, 3 * T, batch * T], dtype=torch.int32) if varlen else None
        seqlen_offsets = torch.zeros(4 if varlen else batch, dtype=torch.int32) if offsets else None
        rope._rotary_launch(q, k, torch.empty_like(q), None if k is None else torch.empty_like(k),
                            cos, cos, seqlen_offsets, 0, cu, T, interleaved, conjugate)
    return thunk


def cross_entropy_launches(arch):
    ce = importlib.import_module("fasttrain.kernels.cross_entropy")  # not the function of that name
    cases = []
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for vocab in (50304, 1000):
            for forward, backward in ((True, True), (True, False), (False, True)):
                for softcap in (None, 15.0):
                    for smoothing in (0.0, 0.1):
                        name = (f"V{vocab} {str(dtype)[6:]} "
                                f"{'fwd' if forward else ''}{'+' if forward and backward else ''}"
                                f"{'bwd' if backward else ''}{' softcap' if softcap else ''}"
                                f"{' smoothing' if smoothing else ''}")
                        representative = (dtype == torch.bfloat16 and vocab == 50304 and forward
                                          and backward and not smoothing)
                        cases.append((name, representative, _ce_thunk(
                            ce, dtype, vocab, forward, backward, softcap, smoothing)))
    return _capture("cross_entropy", ce, ["_cross_entropy_kernel"], cases, arch)


def _ce_thunk(ce, dtype, vocab, forward, backward, softcap, smoothing, rows=4096):
    def thunk():
        logits = torch.empty(rows, vocab, dtype=dtype)
        target = torch.empty(rows, dtype=torch.int64)
        loss, lse = torch.empty(rows), torch.empty(rows)
        ce._ce_launch(logits, target, loss, lse, logits, torch.ones(()), -100, smoothing,
                      1e-4 if forward else 0.0, softcap, forward, backward)
    return thunk


LAUNCHES: dict[str, Callable[[int], Iterable[Launch]]] = {
    "attention": attention_launches, "rope": rope_launches, "cross_entropy": cross_entropy_launches}


# ----------------------------------------------------------------------------------------------
# Specialise and compile
# ----------------------------------------------------------------------------------------------


# Constexpr choices beside the tile that autotune configs may carry, as config labels show them
_CHOICE_LABELS = {"USE_TMA": "tma", "PACK_GQA": "pack", "ONE_LOOP": "oneloop"}


def configs_of(kernel, args, kwargs):
    """[(label, config kwargs, kept)] for an autotuned kernel; [("w4", {}, True)] otherwise."""
    if not isinstance(kernel, Autotuner):
        return [(f"w{kwargs.get('num_warps', 4)}", {}, True)]
    kept = kernel.configs
    if kernel.early_config_prune:
        kept = kernel.early_config_prune(kernel.configs, dict(zip(kernel.arg_names, args)),
                                         **kwargs)
    out = []
    for config in kernel.configs:
        kw = config.all_kwargs()
        label = "BM{BLOCK_M} BN{BLOCK_N} w{num_warps} s{num_stages}".format(**kw)
        label += "".join(f" {name}" for key, name in _CHOICE_LABELS.items() if kw.get(key))
        out.append((label, kw, config in kept))
    return out


def _source(fn, args, kwargs, target):
    """(ASTSource, options) exactly as JITFunction.run would build them for this launch."""
    kwargs = dict(kwargs, debug=False, instrumentation_mode=knobs.compilation.instrumentation_mode)
    if hasattr(knobs.compilation, "fpsan_homomorphic_casts"):  # Triton >= 3.7
        kwargs["fpsan_homomorphic_casts"] = knobs.compilation.fpsan_homomorphic_casts
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args,
                                                          specialization, options)
    return ASTSource(fn, signature, constexprs, attrs), options, backend


def front_end(src, options, backend, target):
    """Source -> Triton IR; raises what the compiler raises."""
    from triton._C.libtriton import ir
    context = ir.context()
    ir.load_dialects(context)
    backend.load_dialects(context)
    src.make_ir(target, options, backend.get_codegen_implementation(options),
                backend.get_module_map(), context)


def compile_full(src, options, target):
    """Compile to a cubin; returns its resources (registers, spills, shared memory, MMA kind)."""
    with contextlib.redirect_stdout(io.StringIO()):  # some versions print ptxas logs
        kernel = triton.compile(src, target=target, options=options.__dict__)
    return resources(kernel)


def resources(kernel):
    cubin = kernel.asm["cubin"]
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                             "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True,
                               text=True, check=True).stdout
        sass = subprocess.run([cuobjdump, "-sass", f.name], capture_output=True, text=True,
                              check=True).stdout
    ops = re.findall(r"^\s+/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", sass, re.M)
    res = {"regs": int(re.search(r"REG:(\d+)", usage).group(1)),
           "stack": int(re.search(r"STACK:(\d+)", usage).group(1)),
           "shared": kernel.metadata.shared,
           # tensor-core matmuls in the Triton IR (the attention kernels: per loop, times loops)
           "dots": len(re.findall(r"= tt\.dot ", kernel.asm["ttir"]))}
    for op in _SASS_OPS:
        res[op] = sum(1 for name in ops if name == op)
    res["spill_stores"] = res.pop("STL")  # STL: store to local memory, which only spills use here
    return res


def problems(rec, arch):
    """What is wrong with one compiled launch (empty when it passes)."""
    if "error" in rec:  # a compiler message ends with the reason, after the source excerpt
        lines = rec["error"].strip().splitlines()
        return [lines[0] if len(lines) == 1 else f"{lines[0]} ... {lines[-1]}"]
    if "regs" not in rec:  # front end only
        return []
    out = []
    if rec["shared"] > SHARED_MEMORY_LIMIT[arch]:
        out.append(f"shared memory {rec['shared']} B > sm_{arch} limit {SHARED_MEMORY_LIMIT[arch]}")
    if rec["spill_stores"] or rec["stack"]:
        out.append(f"spills: {rec['spill_stores']} spill stores, {rec['stack']} B stack")
    if arch == 90 and (rec["dot_rows"] or 0) >= 64 and (rec["HMMA"] or not rec["HGMMA"]):
        out.append(f"dots not all on warpgroup MMA ({rec['HGMMA']} HGMMA, {rec['HMMA']} HMMA)")
    return out


def _message(e):
    return f"{type(e).__name__}: {e}".strip()[-2000:]


def _error_of(fn, *args):
    """None when fn(*args) succeeds, else the exception's message."""
    try:
        fn(*args)
    except Exception as e:  # noqa: BLE001 -- a compile error is a finding to report
        return _message(e)
    return None


def run(arch, only=None, ptxas="representative", log=None, match=None):
    """Every (launch, kept config) for one arch: a list of result dicts with 'problems'."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("TRITON_INTERPRET=1 turns the kernels into interpreted functions, "
                           "which cannot be compiled: run without it (python -m "
                           "fasttrain.gpu_compile drops it)")
    target = GPUTarget("cuda", arch, 32)
    results = []
    front_errors, compiled = {}, {}  # launches that specialise alike compile alike: once each
    for op, make in LAUNCHES.items():
        if only and op not in only:
            continue
        for launch in make(arch):
            if match and match not in launch.case:
                continue
            if launch.error:
                results.append({"arch": arch, "op": op, "kernel": "-", "case": launch.case,
                                "config": "-", "triton": triton.__version__,
                                "error": launch.error, "problems": [launch.error]})
                continue
            fn = launch.kernel.fn if isinstance(launch.kernel, Autotuner) else launch.kernel
            for label, config, kept in launch.configs:
                if not kept:
                    continue
                rec = {"arch": arch, "op": op, "kernel": fn.__name__, "case": launch.case,
                       "config": label, "triton": triton.__version__,
                       "tile": {k: config[k] for k in ("BLOCK_M", "BLOCK_N", "num_warps",
                                                        "num_stages", *_CHOICE_LABELS)
                                if k in config},
                       "dot_rows": min((config[k] for k in DOT_ROWS.get(fn.__name__, ())),
                                       default=None)}
                try:
                    src, options, backend = _source(fn, launch.args, dict(launch.kwargs, **config),
                                                    target)
                    key = src.hash()
                    if key not in front_errors:
                        front_errors[key] = _error_of(front_end, src, options, backend, target)
                    rec["error"] = front_errors[key]
                    if not rec["error"] and (ptxas == "all" or (ptxas == "representative"
                                                                 and launch.representative)):
                        full_key = (key, repr(sorted(options.__dict__.items())))
                        if full_key not in compiled:
                            t0 = time.time()
                            compiled[full_key] = compile_full(src, options, target)
                            compiled[full_key]["compile_s"] = round(time.time() - t0, 1)
                        rec.update(compiled[full_key])
                except Exception as e:  # noqa: BLE001 -- every failure is a finding to report
                    rec["error"] = _message(e)
                if not rec["error"]:
                    del rec["error"]
                rec["problems"] = problems(rec, arch)
                results.append(rec)
                if log and "regs" in rec:
                    log(_row(rec))
    return results


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------


_HEADER = (f"{'arch':5} {'kernel':28} {'case':36} {'config':20} {'regs':>4} {'spill':>5} "
           f"{'stack':>5} {'shared':>7} {'wgmma':>5} {'hmma':>4} {'tma':>3} {'ldgsts':>6} "
           f"{'dots':>4}  result")


def _row(rec):
    if "regs" not in rec:
        return (f"sm_{rec['arch']:<2} {rec['kernel'][:28]:28} {rec['case'][:36]:36} "
                f"{rec['config']:20} {'; '.join(rec['problems'])[:300]}")
    verdict = "ok" if not rec["problems"] else "; ".join(rec["problems"])
    return (f"sm_{rec['arch']:<2} {rec['kernel'][:28]:28} {rec['case'][:36]:36} {rec['config']:20} "
            f"{rec['regs']:4} {rec['spill_stores']:5} {rec['stack']:5} {rec['shared']:7} "
            f"{rec['HGMMA']:5} {rec['HMMA']:4} {rec['UTMALDG']:3} {rec['LDGSTS']:6} "
            f"{rec['dots']:4}  {verdict}")


def markdown(results):
    """Compiled launches as a Markdown table (one row per distinct kernel x case x config)."""
    lines = ["| target | kernel | case | config | registers | spill stores | stack B | shared B "
             "| HGMMA | HMMA | TTIR dots | result |", "|" + "---|" * 12]
    for r in results:
        if "regs" in r:
            lines.append(f"| sm_{r['arch']} | {r['kernel']} | {r['case']} | {r['config']} | "
                         f"{r['regs']} | {r['spill_stores']} | {r['stack']} | {r['shared']} | "
                         f"{r['HGMMA']} | {r['HMMA']} | {r['dots']} | "
                         f"{'; '.join(r['problems']) or 'ok'} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, action="append", choices=sorted(SHARED_MEMORY_LIMIT),
                        help="target compute capability (repeatable; default 90 and 80)")
    parser.add_argument("--only", action="append", choices=sorted(LAUNCHES),
                        help="only these kernel files (repeatable)")
    parser.add_argument("--ptxas", choices=("none", "representative", "all"),
                        default="representative",
                        help="which launches go through ptxas (all launches get the front end)")
    parser.add_argument("--match", help="only the cases whose name contains this (e.g. 'D16 ')")
    parser.add_argument("--json", help="write one JSON object per (launch, config) here")
    parser.add_argument("--table", action="store_true", help="print every compiled launch")
    parser.add_argument("--markdown", action="store_true",
                        help="print the compiled launches as a Markdown table at the end")
    args = parser.parse_args(argv)
    os.environ.pop("TRITON_INTERPRET", None)  # before the kernels are imported (and decorated)
    results = []
    if args.table:
        print(_HEADER, flush=True)
    for arch in args.arch or (90, 80):
        results += run(arch, args.only, args.ptxas,
                       log=(lambda line: print(line, flush=True)) if args.table else None,
                       match=args.match)
    if args.json:
        with open(args.json, "w") as f:
            for rec in results:
                f.write(json.dumps(rec) + "\n")
    if args.markdown:
        print(markdown(results))
    failed = [rec for rec in results if rec["problems"]]
    for rec in failed[:50]:
        print("FAIL", _row(rec), flush=True)
    n_full = sum("regs" in rec for rec in results)
    print(f"gpu_compile: triton {triton.__version__}: {len(results)} launches x configs, "
          f"{n_full} through ptxas, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
