"""fasttrain benchmark suite: `python -m bench` (see bench/__main__.py and bench/common.py)."""
