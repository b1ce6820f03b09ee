"""Kernels that Triton's interpreter runs but its compiler rejects or builds badly, for the tests
of the compile tier's own checks (tests/test_gpu_compile.py). Run as a script, without
TRITON_INTERPRET, it compiles each and prints what the tier's checks say, as JSON."""
import json
import sys

import torch
import triton
import triton.language as tl

SCALE = 0.5  # a plain Python float: the compiler cannot read it inside a kernel


@triton.jit
def reads_float_global(X, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(X + offs, tl.load(X + offs) * SCALE)


@triton.jit
def assigns_constexpr_tuple(X, PREC: tl.constexpr, BLOCK: tl.constexpr):
    meta = (PREC, BLOCK)  # the compiler turns the elements into tensors: PREC, a str, fails
    offs = tl.arange(0, BLOCK)
    x = tl.load(X + offs[:, None] * BLOCK + offs[None, :])
    tl.store(X + offs[:, None] * BLOCK + offs[None, :], tl.dot(x, x, input_precision=meta[0]))


@triton.jit
def big_dot(X, Y, BLOCK: tl.constexpr):
    # Both operands staged in shared memory (2 x 256 x 256 x 2 B = 256 KiB, over any limit) and a
    # 256 x 256 fp32 accumulator on one warp (2,048 values a thread): spills.
    offs = tl.arange(0, BLOCK)
    ptrs = offs[:, None] * BLOCK + offs[None, :]
    a = tl.load(X + ptrs)
    b = tl.load(X + BLOCK * BLOCK + ptrs)
    tl.store(Y + ptrs, tl.dot(a, b))


def main():
    from fasttrain import gpu_compile
    arch = 80
    target = gpu_compile.GPUTarget("cuda", arch, 32)
    x = torch.empty(2 * 256 * 256, dtype=torch.float16)
    y = torch.empty(256 * 256, dtype=torch.float32)
    found = {}
    for kernel, kwargs in ((reads_float_global, {}), (assigns_constexpr_tuple, {"PREC": "tf32"})):
        src, options, backend = gpu_compile._source(kernel, (x,), dict(kwargs, BLOCK=32), target)
        try:
            gpu_compile.front_end(src, options, backend, target)
            found[kernel.__name__] = "compiled"
        except Exception as e:  # noqa: BLE001
            found[kernel.__name__] = f"{type(e).__name__}: {e}"
    src, options, _ = gpu_compile._source(big_dot, (x, y), dict(BLOCK=256, num_warps=1), target)
    rec = dict(gpu_compile.compile_full(src, options, target), kernel="big_dot", dot_rows=256)
    found["big_dot"] = gpu_compile.problems(rec, arch)
    json.dump(found, sys.stdout)


if __name__ == "__main__":
    main()
