"""The prefill benchmark's floors (nsa.bench.prefill_bytes, stage_floors, print_floors): no GPU."""

from __future__ import annotations

import pytest

from nsa import bench


def test_prefill_bytes_counts_each_stage_inputs_and_outputs():
    # B 2, T 64, Hq 4, Hkv 2, Dk 8, Dv 4, bf16; l = 32, d = 16: 3 compressed tokens; n = 2.
    b = bench.prefill_bytes(2, 64, 4, 2, 8, 4, elt=2, cmp_block=32, cmp_stride=16, num_selected=2)
    rows = 2 * 64 * 4
    q, o, lse = rows * 8 * 2, rows * 4 * 2, rows * 4
    kv = 2 * 64 * 2 * 12 * 2
    kv_cmp, k_cmp = 2 * 3 * 2 * 12 * 2, 2 * 3 * 2 * 8 * 2
    indices = 2 * 64 * 2 * 2 * 4
    assert b["cmp"] == q + kv_cmp + o + lse
    assert b["select"] == q + k_cmp + lse + indices
    assert b["slc"] == q + kv + indices + o + lse
    assert b["win"] == q + kv + rows * 3 * 2 + 4 * o + lse
    assert b["all"] == b["cmp"] + b["select"] + b["slc"] + b["win"]
    assert b["dense_causal"] == q + kv + o + lse


def test_stage_floors_take_the_larger_bound_and_sum_the_stages():
    flops = {"cmp": 2e12, "select": 1e9, "slc": 4e12, "win": 1e9}
    nbytes = {"cmp": 1e6, "select": 3e9, "slc": 1e6, "win": 2e9}
    floors = bench.stage_floors(flops, nbytes, {"matmul_bf16_tflops": 1000.0, "copy_gbps": 1000.0})
    assert floors["cmp"] == pytest.approx((2.0, "compute"))
    assert floors["select"] == pytest.approx((3.0, "memory"))
    assert floors["slc"] == pytest.approx((4.0, "compute"))
    assert floors["win"] == pytest.approx((2.0, "memory"))
    assert floors["all"] == pytest.approx((11.0, "sum"))
    assert bench.stage_floors(flops, nbytes, {"copy_gbps": 1000.0}) == {}


def test_print_floors_shows_measured_over_floor_per_stage(capsys):
    cfg = dict(B=1, T=8192, Hq=64, Hkv=4, Dk=128, Dv=128)
    flops = bench.nsa_flops(cfg["B"], cfg["T"], cfg["Hq"], cfg["Dk"], cfg["Dv"], **bench.NSA)
    stages = {"all": 3.0, "cmp": 0.3, "select": 0.3, "slc": 1.5, "win": 0.6}
    result = {"ceilings": {"matmul_bf16_tflops": 800.0, "copy_gbps": 3000.0},
              "rows": [dict(config="paper", **cfg, cudnn_ms=1.7, stages_ms=stages,
                            nominal_gflop={k: v / 1e9 for k, v in flops.items()}),
                       dict(config="paper", **cfg, cudnn_ms=1.7)]}  # no stage times: left out
    bench.print_floors(result)
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("forward floors")
    assert len(lines) == 3  # title, header, the one row with stage times
    floors = bench.stage_floors(flops, bench.prefill_bytes(**cfg, **bench.NSA), result["ceilings"])
    for stage in ("cmp", "select", "slc", "win"):
        floor, bound = floors[stage]
        assert f"{stages[stage]:.3f} / {floor:.3f} {bound[0]}" in lines[2]
    assert f"{stages['all']:.3f} / {floors['all'][0]:.3f}" in lines[2]
