"""Build fasttrain: the Python packages plus the packing extension in csrc/.

Install after torch, without build isolation (so the extension builds against the torch you run):
    pip install torch==2.13.0            # CPU build; any torch 2.11-2.14 works
    pip install --no-build-isolation -e .
"""
from setuptools import setup

setup(
    name="fasttrain",
    version="0.1.0",
    description="A readable, fast LLM trainer: Triton kernels, a C++/CUDA packer, one FSDP2 loop.",
    python_requires=">=3.10",
    packages=["fasttrain", "fasttrain.data", "fasttrain.stages", "fasttrain.kernels"],
    package_dir={"fasttrain.kernels": "kernels"},
    install_requires=["torch>=2.11", "triton>=3.6", "numpy", "numba", "tiktoken"],
    extras_require={"test": ["pytest"], "plots": ["matplotlib"], "parquet": ["pyarrow"]},
)
