#!/usr/bin/env python3
"""Decode benchmark: one NSA decode step (nsa.ops.nsa_attention_kvcache, m = 1) vs PyTorch SDPA dense
attention over the same KV cache. Same as ``python -m nsa.bench decode ...``; see benchmarks/README.md.
``--plot-only`` works without the compiled ops library (_bench_by_path.py)."""
import sys

from _bench_by_path import run

if __name__ == "__main__":
    sys.exit(run("decode"))
