#!/usr/bin/env python3
"""Decode benchmark: one NSA decode step (nsa.ops.nsa_attention_kvcache, m = 1) vs PyTorch SDPA dense
attention over the same KV cache. Same as ``python -m nsa.bench decode ...``; see benchmarks/README.md.

Loads python/nsa/bench.py by path, so ``--plot-only`` works without the compiled ops library
(importing the ``nsa`` package loads it); timing needs it (NSA_OPS_LIBRARY, PYTHONPATH=python).
"""
import importlib.util
import sys
from pathlib import Path

_PATH = Path(__file__).resolve().parent.parent / "python" / "nsa" / "bench.py"
_spec = importlib.util.spec_from_file_location("nsa_bench", _PATH)
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)

if __name__ == "__main__":
    sys.exit(bench.main(["decode"] + sys.argv[1:]))
