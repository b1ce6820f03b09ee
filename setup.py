"""Build fasttrain: the Python packages plus the packing extension in csrc/.

Install after torch, without build isolation (so the extension builds against the torch you run):
    pip install torch==2.13.0            # CPU build; any torch 2.11-2.14 works
    pip install --no-build-isolation -e .

The extension `fasttrain._packing` always gets its C++ part (csrc/packing.cpp). Its CUDA kernels
(csrc/packing_cuda.cu) are added only when both a CUDA toolchain (CUDA_HOME) and a CUDA build of
torch are present; fasttrain.data.packing reports which parts were built.
"""
import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension


def packing_extension():
    # -fopenmp: torch's at::parallel_for runs its OpenMP path only when we compile with OpenMP;
    # the runtime is the libgomp torch already loaded, so torch.set_num_threads() applies.
    cxx = ["-O3", "-fopenmp"]
    sources = ["csrc/packing.cpp"]
    if torch.version.cuda and CUDA_HOME:
        return CUDAExtension(
            "fasttrain._packing",
            sources + ["csrc/packing_cuda.cu"],
            define_macros=[("FASTTRAIN_WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3"]},
            extra_link_args=["-fopenmp"],
        )
    return CppExtension("fasttrain._packing", sources, extra_compile_args=cxx,
                        extra_link_args=["-fopenmp"])


setup(
    name="fasttrain",
    version="0.1.0",
    description="A readable, fast LLM trainer: Triton kernels, a C++/CUDA packer, one FSDP2 loop.",
    python_requires=">=3.10",
    packages=["fasttrain", "fasttrain.data", "fasttrain.stages", "fasttrain.kernels"],
    package_dir={"fasttrain.kernels": "kernels"},
    ext_modules=[packing_extension()],
    cmdclass={"build_ext": BuildExtension},
    install_requires=["torch>=2.11", "triton>=3.6", "numpy", "numba", "tiktoken", "regex"],
    extras_require={"test": ["pytest"], "plots": ["matplotlib"], "parquet": ["pyarrow"]},
)
