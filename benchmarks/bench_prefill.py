#!/usr/bin/env python3
"""Prefill (forward) benchmark: NSA vs PyTorch SDPA dense causal attention. Same as
``python -m nsa.bench prefill ...``; see benchmarks/README.md. ``--plot-only`` works without the
compiled ops library (_bench_by_path.py)."""
import sys

from _bench_by_path import run

if __name__ == "__main__":
    sys.exit(run("prefill"))
