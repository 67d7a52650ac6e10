"""The decode benchmark (python -m nsa.bench decode): the bytes / key-rows formula, the row fields, the
argument defaults, and one end-to-end run on CPU (tiny sizes) through the real op."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nsa import bench

PYTHON_DIR = Path(__file__).resolve().parents[2] / "python"
SMALL = dict(cmp_block=16, cmp_stride=8, sel_block=32, num_selected=4, num_init=1, num_local=2, window=40)


@pytest.mark.parametrize("context, expected", [
    (1, {"cmp": 0, "slc": 1, "win": 1}),  # shorter than l: no compressed token yet
    (16, {"cmp": 0, "slc": 16, "win": 16}),
    (32, {"cmp": 1, "slc": 32, "win": 32}),  # the first compressed token is complete
    (256, {"cmp": 15, "slc": 256, "win": 256}),  # shorter than w and than n*l': every key
    (1025, {"cmp": 63, "slc": 961, "win": 512}),  # 17 blocks: 15 full + the query's 1-key block
    (8192, {"cmp": 511, "slc": 1024, "win": 512}),
    (131072, {"cmp": 8191, "slc": 1024, "win": 512}),
])
def test_decode_tokens_paper_config(context, expected):
    assert bench.decode_tokens(context, **bench.NSA) == expected


def test_decode_tokens_small_config_and_no_local_block():
    assert bench.decode_tokens(100, **SMALL) == {"cmp": 11, "slc": 100, "win": 40}  # 4 blocks <= n = 4
    assert bench.decode_tokens(130, **SMALL) == {"cmp": 15, "slc": 98, "win": 40}  # 3 full + 2 keys of the 5th
    # Without forced local blocks the query's partial block need not be selected: n*l' is the bound.
    assert bench.decode_tokens(130, **dict(SMALL, num_local=0)) == {"cmp": 15, "slc": 128, "win": 40}


def test_decode_bytes_counts_every_branch_and_the_io():
    got = bench.decode_bytes(2, 100, Hq=4, Hkv=2, Dk=8, Dv=4, elt=2, **SMALL)
    assert got["formula_tokens"] == {"cmp": 2 * 2 * 11, "slc": 2 * 2 * 100, "win": 2 * 2 * 40}
    assert got["nsa_kv_bytes"] == 2 * 2 * (11 + 100 + 40) * (8 + 4) * 2 == 14496
    io = 2 * 4 * (8 + 3 + 4) * 2 + 2 * 2 * 4 * 4  # q, gates, out; int32 block indices
    assert got["nsa_bytes"] == 14496 + io == 14800
    assert got["dense_kv_bytes"] == 2 * 2 * 100 * (8 + 4) * 2
    assert got["dense_bytes"] == 9600 + 2 * 4 * (8 + 4) * 2
    # At a long context NSA reads a small, fixed share of what dense reads.
    paper = bench.CONFIGS["paper"]
    long = bench.decode_bytes(1, 131072, paper["Hq"], paper["Hkv"], paper["Dk"], paper["Dv"], **bench.NSA)
    assert long["nsa_kv_bytes"] == 4 * (8191 + 1024 + 512) * 256 * 2
    assert 0.07 < long["nsa_bytes"] / long["dense_bytes"] < 0.08


def test_decode_row_fields():
    meta = {"gpu": "GPU X", "torch": "2.x", "date": "2026-01-01"}
    ceilings = {"copy_gbps": 2000.0, "read_gbps": 2500.0}
    cfg = bench.CONFIGS["paper"]
    tokens = bench.decode_bytes(2, 8192, cfg["Hq"], cfg["Hkv"], cfg["Dk"], cfg["Dv"], **bench.NSA)
    read = {"cmp": 4088, "slc": 8192, "win": 2048}  # a kernel that read half the window
    row = bench.decode_row("paper", cfg, 2, 8192, "bf16", meta, ceilings, ours_ms=0.02,
                           dense={"cudnn": None, "flash": 0.08, "efficient": 0.05}, tokens_read=read, cache_sets=3)
    assert (row["config"], row["B"], row["context"], row["gpu"], row["date"]) == ("paper", 2, 8192, "GPU X",
                                                                                  "2026-01-01")
    assert row["dense_backend"] == "efficient" and row["dense_ms"] == 0.05
    assert row["cudnn_ms"] is None and row["flash_ms"] == 0.08
    assert row["speedup_vs_dense"] == pytest.approx(2.5)
    assert row["nsa_bytes"] == tokens["nsa_bytes"]
    assert row["gbps"] == pytest.approx(tokens["nsa_bytes"] / 0.02e-3 / 1e9)
    assert row["bw_fraction"] == pytest.approx(row["gbps"] / 2000.0)
    assert row["read_bw_fraction"] == pytest.approx(row["gbps"] / 2500.0)
    assert row["dense_gbps"] == pytest.approx(tokens["dense_bytes"] / 0.05e-3 / 1e9)
    assert row["formula_tokens"] == {"cmp": 2 * 4 * 511, "slc": 2 * 4 * 1024, "win": 2 * 4 * 512}
    assert row["tokens_read_over_formula"] == {"cmp": 1.0, "slc": 1.0, "win": 0.5}
    assert row["cache_sets"] == 3 and row["notes"] == []
    assert "511/1024/256 (formula 511/1024/512)" in bench._fmt_decode_row(row)  # per sequence and kv head


def test_decode_row_without_measurements():
    row = bench.decode_row("paper", bench.CONFIGS["paper"], 1, 8192, "bf16", {}, {},
                           notes=["skipped: out of memory"])
    for key in ("ours_ms", "dense_ms", "dense_backend", "speedup_vs_dense", "gbps", "bw_fraction", "dense_gbps",
                "tokens_read", "tokens_read_over_formula"):
        assert row[key] is None, key
    assert row["notes"] == ["skipped: out of memory"]
    bench.print_decode_table({"rows": [row], "ceilings": {}, "meta": {"gpu": "-", "torch": "-", "dtype": "bf16",
                                                                      "date": "-", "iters": 1}})


def test_decode_arguments():
    args = bench.parse_args(["decode"])
    assert (args.batches, args.contexts, args.device) == ([1, 16, 64], [8192, 32768, 65536, 131072], "cuda")
    args = bench.parse_args(["decode", "--device", "cpu"])
    assert (args.batches, args.contexts) == ([1], [256])
    args = bench.parse_args(["decode", "--batches", "2,4", "--contexts", "100", "--iters", "3", "--warmup", "0"])
    assert (args.batches, args.contexts, args.iters, args.warmup) == ([2, 4], [100], 3, 0)
    for bad in (["--contexts", "8k"], ["--batches", "0"], ["--configs", "nope"], ["--iters", "0"]):
        with pytest.raises(SystemExit):
            bench.parse_args(["decode"] + bad)
    assert bench.parse_args(["prefill"]).seqlens == [8192, 16384, 32768, 65536, 131072]


@pytest.mark.skipif(not hasattr(torch.ops.nsa, "forward_kvcache"),
                    reason="the ops library has no nsa::forward_kvcache yet")
@pytest.mark.parametrize("context", [16, 300, 1100])  # < l; < w; > n*l' with the query's block partial
def test_formula_matches_the_keys_the_cpu_op_reads(context):
    import nsa

    cfg = bench.CONFIGS["seed-125m"]
    got = bench.bench_decode(nsa, cfg, 2, context, torch.bfloat16, iters=1, warmup=0, device="cpu")
    assert got["ours_finite"] and got["ours_ms"] > 0 and got["cache_sets"] == 1
    formula = bench.decode_bytes(2, context, cfg["Hq"], cfg["Hkv"], cfg["Dk"], cfg["Dv"], **bench.NSA)
    assert got["tokens_read"] == formula["formula_tokens"]
    assert set(got["dense"]) == set(bench.DENSE_BACKENDS)


def _run_cli(args, cwd):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(PYTHON_DIR)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return subprocess.run([sys.executable, "-m", "nsa.bench", "decode"] + args, cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given on a machine without a GPU")
def test_decode_without_gpu_exits_with_a_message(tmp_path):
    proc = _run_cli(["--iters", "1"], tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "no CUDA device visible" in proc.stderr and "--device cpu" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.skipif(not hasattr(torch.ops.nsa, "forward_kvcache"),
                    reason="the ops library has no nsa::forward_kvcache yet")
def test_decode_cpu_end_to_end(tmp_path):
    out = tmp_path / "decode.json"
    png = tmp_path / "decode.png"
    proc = _run_cli(["--device", "cpu", "--batches", "1", "--contexts", "256", "--iters", "1", "--warmup", "0",
                     "--out", str(out), "--plot", str(png)], tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    result = json.loads(out.read_text())
    assert result["meta"]["device"] == "cpu" and result["ceilings"]["copy_gbps"] > 0
    assert result["ceilings"]["read_gbps"] > 0
    (row,) = result["rows"]
    assert (row["config"], row["B"], row["context"], row["gpu"]) == ("paper", 1, 256, "cpu")
    assert row["ours_ms"] > 0 and row["ours_finite"] and row["gbps"] > 0
    assert row["dense_ms"] is not None and row["speedup_vs_dense"] > 0  # SDPA's flash backend runs on CPU
    # The CPU backend counts the keys each softmax reads: exactly the formula at context 256
    # (15 compressed tokens, all 256 keys selected and in the window), times 4 kv heads.
    assert row["formula_tokens"] == {"cmp": 60, "slc": 1024, "win": 1024}
    assert row["tokens_read"] == row["formula_tokens"], row["tokens_read"]
    # A progress line per row, then the summary table: title, a note on graph timing, header, rows
    # (then the plot's path).
    lines = proc.stdout.splitlines()
    progress = next(i for i, line in enumerate(lines) if line.strip().startswith("ours "))
    table = next(i for i, line in enumerate(lines) if line.startswith("decode step (m = 1)"))
    assert progress < table and lines[table + 3].split()[:3] == ["paper", "1", "256"]
    if importlib.util.find_spec("matplotlib") is None:
        assert "plot skipped: matplotlib is not importable" in proc.stdout
    else:
        assert png.stat().st_size > 0 and f"wrote {png}" in proc.stdout
    # --plot-only redraws from the JSON without running anything.
    proc = _run_cli(["--plot-only", str(out), "--plot", str(tmp_path / "again.png")], tmp_path)
    assert proc.returncode in (0, 1), proc.stderr
    assert "decode step (m = 1)" in proc.stdout
