"""Checks of the attention autotuners that need the compiled (not interpreted) kernels; run by
tests/test_autotune.py in a subprocess without TRITON_INTERPRET. Prints one JSON object.

- which attention kernel objects are autotuned with the disk cache on, and their keys;
- causal and unbounded windows specialise to the same binary (why the key leaves them out);
- Triton's disk cache round trip (Autotuner.check_disk_cache, as Autotuner.run calls it) with the
  real kernels and a real launch's key, in a fresh TRITON_CACHE_DIR, for a sm_90 target: the first
  call benchmarks and writes, a second one (the in-memory cache cleared: a new process) reads the
  choice back without benchmarking, and another key or another config list benchmarks again.
"""
import json
import os
import sys
import tempfile
import types

os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="autotune-check-")
os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import autotuner  # noqa: E402
from triton.runtime.autotuner import Autotuner  # noqa: E402

from fasttrain import gpu_compile  # noqa: E402
from fasttrain.kernels import attention  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)


def launches(window_right):
    """The attention launches (kernel, args, kwargs) of one varlen bf16 forward + backward."""
    def thunk():
        q = torch.empty(300, 4, 64, dtype=torch.bfloat16)
        cu = torch.tensor([0, 100, 300], dtype=torch.int32)
        options = (cu, cu, 200, 200, 0.125, attention.UNBOUNDED, window_right, 0.0)
        out, lse = attention._triton_forward(q, q, q, *options)
        attention._triton_backward(out, q, q, q, out, lse, *options)
    names = ["_attn_fwd", "_attn_bwd_preprocess_kernel", "_attn_bwd_dkdv", "_attn_bwd_dq"]
    found = list(gpu_compile._capture("attention", attention, names, [("case", True, thunk)], 90))
    assert all(not x.error for x in found), [x.error for x in found]
    return [(x.kernel, x.args, x.kwargs) for x in found]


def tuning_key(tuned, args, kwargs):
    """The key Autotuner.run builds: the key arguments' values, then every tensor's dtype."""
    named = {**dict(zip(tuned.arg_names, args)), **kwargs}
    named = {k: v for k, v in named.items() if k in tuned.arg_names}
    return tuple([named[k] for k in tuned.keys if k in named]
                 + [str(v.dtype) for v in named.values() if hasattr(v, "dtype")])


def binary(kernel, args, kwargs):
    config = kernel.configs[0].all_kwargs()
    src, _, _ = gpu_compile._source(kernel.fn, args, dict(kwargs, **config), TARGET)
    return src.hash()


def disk_cache_round_trip(tuned, key, configs):
    out = {}
    for name, k, cs in (("first", key, configs), ("second", key, configs),
                        ("other_key", key[:1] + (key[1] * 2,) + key[2:], configs),
                        ("other_configs", key, configs[:2])):
        benched = []

        def bench(k=k, cs=cs):  # what Autotuner.run's benchmark() leaves; the 2nd config is fastest
            benched.append(1)
            tuned.configs_timings = {c: [float(t)] * 3 for c, t in zip(cs, (3, 1, 2, 4))}
            tuned.cache[k] = min(tuned.configs_timings, key=tuned.configs_timings.get)

        tuned.cache.clear()  # as in a new process
        hit = tuned.check_disk_cache(k, cs, bench)
        out[name] = {"hit": hit, "benchmarked": bool(benched), "choice": str(tuned.cache[k])}
    out["fastest"] = str(configs[1])
    return out


def main():
    # check_disk_cache asks the driver for the current target; there is no GPU here
    autotuner.driver = types.SimpleNamespace(active=types.SimpleNamespace(
        get_current_target=lambda: TARGET))
    causal, full = launches(0), launches(attention.UNBOUNDED)
    report = {"autotuned": {}, "same_key": {}, "same_binary": {}}
    for (kernel, args, kwargs), (_, args_full, kwargs_full) in zip(causal, full):
        if not isinstance(kernel, Autotuner):
            continue
        name = kernel.fn.__name__
        report["autotuned"][name] = {"cache_results": kernel.cache_results, "key": kernel.keys}
        report["same_key"][name] = (tuning_key(kernel, args, kwargs)
                                    == tuning_key(kernel, args_full, kwargs_full))
        report["same_binary"][name] = (binary(kernel, args, kwargs)
                                       == binary(kernel, args_full, kwargs_full))
    kernel, args, kwargs = causal[0]
    key = tuning_key(kernel, args, kwargs)
    report["key"] = list(key)
    report["round_trip"] = disk_cache_round_trip(kernel, key, kernel.configs[:3])
    report["cache_files"] = sorted(
        name for _, _, files in os.walk(os.environ["TRITON_CACHE_DIR"]) for name in files
        if name.endswith(".autotune.json"))
    json.dump(report, sys.stdout)


if __name__ == "__main__":
    main()
