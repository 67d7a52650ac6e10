"""Runs one subcommand of python/nsa/bench.py, loaded by path: importing the ``nsa`` package would load
the compiled ops library, which ``--plot-only`` does not need (timing does: NSA_OPS_LIBRARY,
PYTHONPATH=python). Used by the bench_*.py scripts beside it."""
import importlib.util
import sys
from pathlib import Path


def run(subcommand: str) -> int:
    path = Path(__file__).resolve().parent.parent / "python" / "nsa" / "bench.py"
    spec = importlib.util.spec_from_file_location("nsa_bench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench.main([subcommand] + sys.argv[1:])
