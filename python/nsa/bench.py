"""Benchmarks: ``python -m nsa.bench prefill [options]`` (DESIGN.md section 4).

Times the NSA forward (``nsa.nsa_attention``, no grad) and backward (``torch.ops.nsa.backward``
on the forward's saved outputs, default and deterministic modes) and PyTorch SDPA dense causal
attention forward and backward (cuDNN and flash backends, same heads; the backward timed alone,
its forward outside the events) in one process on one GPU: CUDA events after warm-up,
median of ``--iters`` runs, rotating among input sets larger than the L2 cache. Measures the
bf16 matmul and copy ceilings first. Optionally runs the C++ ``nsa_bench_forward`` binary for the
same shape to get per-stage medians, and prints each stage's time over its floor (``stage_floors``:
its FLOPs at the matmul ceiling or its DRAM bytes at the copy ceiling, whichever is larger). Writes
JSON ({"rows", "ceilings", "meta"}) and a PNG.
``--plot-only JSON`` makes the PNG from an existing JSON and needs no GPU (``python -m nsa.bench``
imports the package, so the ops library of any build must load: ``NSA_OPS_LIBRARY``).

``python -m nsa.bench train-step --preset m7c-125m`` times one training step of the showcase
model (python/nsa/model.py: forward, backward, fused AdamW, bf16 autocast) with NSA and with
dense attention in steady state (CUDA events after warm-up, median), and with ``--profile`` prints
the CUDA kernels that take the step's time, and the operators that launched them (torch.profiler).

``python -m nsa.bench decode`` times one decode step (m = 1 new token per sequence) of
``nsa.ops.nsa_attention_kvcache`` against PyTorch SDPA dense attention of the same query over the
same cache (cuDNN, flash and efficient backends), per batch size and context length: per-token
latency, the GB/s NSA achieves on the bytes it must read (``decode_bytes``) against the copy and
read ceilings, and the key rows the kernels report gathering (``tokens_read``) next to that formula.
JSON rows and a log-log PNG; ``--device cpu`` (tiny sizes) is a smoke test without a GPU.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import re
import subprocess
import sys
from pathlib import Path

CONFIGS = {
    "paper": dict(B=1, Hq=64, Hkv=4, Dk=128, Dv=128),
    "paper-192": dict(B=1, Hq=64, Hkv=4, Dk=192, Dv=128),
    "seed-125m": dict(B=1, Hq=12, Hkv=2, Dk=64, Dv=64),
}
NSA = dict(cmp_block=32, cmp_stride=16, sel_block=64, num_selected=16, num_init=1, num_local=2, window=512)
DEFAULT_SEQLENS = "8192,16384,32768,65536,131072"
DECODE_BATCHES = {"cuda": "1,16,64", "cpu": "1"}
DECODE_CONTEXTS = {"cuda": "8192,32768,65536,131072", "cpu": "256"}
DENSE_BACKENDS = ("cudnn", "flash", "efficient")
STAGES = ("all", "cmp", "select", "slc", "win")
METHODS = ("nsa", "cudnn", "flash")


# ----------------------------------------------------------------------------------------------
# FLOP counting (no torch needed)

def num_cmp_tokens(seqlen: int, cmp_block: int = 32, cmp_stride: int = 16) -> int:
    return (seqlen - cmp_block) // cmp_stride + 1 if seqlen >= cmp_block else 0


def nsa_flops(B: int, T: int, Hq: int, Dk: int, Dv: int, cmp_block: int = 32, cmp_stride: int = 16,
              sel_block: int = 64, num_selected: int = 16, window: int = 512, **_unused) -> dict:
    """Nominal forward FLOPs NSA needs (2 per multiply-add), per branch, summed over queries t < T.

    cmp: attention over the nv(t) compressed tokens visible at t (QK: 2*Dk, PV: 2*Dv per key);
    select: the scoring pass over the same compressed keys (QK only, 2*Dk); slc: n*l' keys capped
    by t+1; win: w keys capped by t+1. Per query head; times B*Hq.
    """
    cmp_keys = slc_keys = win_keys = 0
    for t in range(T):
        cmp_keys += num_cmp_tokens(t + 1, cmp_block, cmp_stride)
        slc_keys += min(num_selected * sel_block, t + 1)
        win_keys += min(window, t + 1)
    heads = B * Hq
    f = {"cmp": heads * cmp_keys * 2.0 * (Dk + Dv), "select": heads * cmp_keys * 2.0 * Dk,
         "slc": heads * slc_keys * 2.0 * (Dk + Dv), "win": heads * win_keys * 2.0 * (Dk + Dv)}
    f["all"] = f["cmp"] + f["select"] + f["slc"] + f["win"]
    f["dense_causal"] = heads * 2.0 * (Dk + Dv) * T * (T + 1) / 2.0
    # Backward: per attended key 2*Dk (S) + 2*Dv (dP) + 2*Dv (dV) + 2*Dk (dK) + 2*Dk (dQ), i.e. 2.5x
    # the forward's QK + PV when Dk = Dv; top-n has no backward.
    bwd = lambda fwd_qk_pv: fwd_qk_pv * (3.0 * Dk + 2.0 * Dv) / (Dk + Dv)  # noqa: E731
    f["bwd"] = bwd(f["cmp"] + f["slc"] + f["win"])
    f["dense_causal_bwd"] = bwd(f["dense_causal"])
    return f


def prefill_bytes(B: int, T: int, Hq: int, Hkv: int, Dk: int, Dv: int, elt: int = 2, cmp_block: int = 32,
                  cmp_stride: int = 16, num_selected: int = 16, **_unused) -> dict:
    """Bytes each forward stage must move through DRAM at least, as this library splits the forward
    (one kernel per stage, each reading its inputs once and writing its outputs once; lse fp32,
    block indices int32), and dense causal attention's (Q, K, V read, O and lse written).

    cmp: Q, the compressed K and V in; o_cmp and its lse out. select: Q, the compressed keys and
    the cmp lse in; the block indices out. slc: Q, K, V and the indices in; o_slc and its lse out.
    win: Q, K, V, the gates, o_cmp and o_slc in (the gated combine); out, o_win and its lse out.
    What the cache between kernels keeps, or the gathers' reuse through L2, is not counted.
    """
    rows = B * T * Hq
    q, o, lse = rows * Dk * elt, rows * Dv * elt, rows * 4
    kv = B * T * Hkv * (Dk + Dv) * elt
    cmp_rows = B * num_cmp_tokens(T, cmp_block, cmp_stride) * Hkv
    kv_cmp, k_cmp = cmp_rows * (Dk + Dv) * elt, cmp_rows * Dk * elt
    indices = B * T * Hkv * num_selected * 4
    gates = rows * 3 * elt
    b = {"cmp": q + kv_cmp + o + lse, "select": q + k_cmp + lse + indices, "slc": q + kv + indices + o + lse,
         "win": (q + kv + gates + 2 * o) + (2 * o + lse)}
    b["all"] = b["cmp"] + b["select"] + b["slc"] + b["win"]
    b["dense_causal"] = q + kv + o + lse
    return b


def floor_ms(flops: float, nbytes: float, ceilings: dict):
    """(ms, "compute" | "memory"): the larger of `flops` at the measured bf16 matmul ceiling and
    `nbytes` at the measured copy ceiling (bytes read + written per second); None without both."""
    tflops, gbps = ceilings.get("matmul_bf16_tflops"), ceilings.get("copy_gbps")
    if not tflops or not gbps:
        return None
    compute, memory = flops / (tflops * 1e9), nbytes / (gbps * 1e6)
    return (compute, "compute") if compute >= memory else (memory, "memory")


def stage_floors(flops: dict, nbytes: dict, ceilings: dict) -> dict:
    """{stage: floor_ms of the stage}, and "all": (the sum, "sum") (the stages run one after the
    other); {} without both ceilings."""
    floors = {stage: floor_ms(flops[stage], nbytes[stage], ceilings) for stage in STAGES[1:]}
    if None in floors.values():
        return {}
    floors["all"] = (sum(v[0] for v in floors.values()), "sum")
    return floors


# ----------------------------------------------------------------------------------------------
# Arguments

def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m nsa.bench", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prefill", help="forward (prefill) timing: NSA vs SDPA cuDNN / flash")
    p.add_argument("--configs", default="paper",
                   help=f"comma-separated, from {', '.join(CONFIGS)} (default paper)")
    p.add_argument("--seqlens", default=DEFAULT_SEQLENS, help=f"comma-separated T (default {DEFAULT_SEQLENS})")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    p.add_argument("--iters", type=int, default=20, help="timed runs per method (median)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--stage-bench", metavar="PATH", help="C++ nsa_bench_forward binary: per-stage medians")
    p.add_argument("--stage-timeout", type=float, default=180, help="seconds per stage-bench subprocess")
    p.add_argument("--out-json", metavar="PATH", help="default benchmarks/results/prefill_<gpu>_<date>.json")
    p.add_argument("--out-png", metavar="PATH", help="default: the JSON path with .png")
    p.add_argument("--no-png", action="store_true", help="do not plot")
    p.add_argument("--no-backward", action="store_true", help="time the forward only")
    p.add_argument("--plot-only", metavar="JSON", help="make the PNG from an existing JSON and exit (no GPU)")
    t = sub.add_parser("train-step", help="steady-state training step of the showcase model: NSA vs dense")
    t.add_argument("--preset", default="m7c-125m", help="a preset of nsa.model.PRESETS (default m7c-125m)")
    t.add_argument("--attn", default="nsa,dense", help="comma-separated from nsa, dense")
    t.add_argument("--batch-size", type=int, help="default: the preset's")
    t.add_argument("--seq-len", type=int, help="default: the preset's")
    t.add_argument("--iters", type=int, default=10)
    t.add_argument("--warmup", type=int, default=3)
    t.add_argument("--compile", action="store_true", help="torch.compile the model (the warm-up steps compile)")
    t.add_argument("--profile", action="store_true", help="print the top CUDA kernels and operators of 2 profiled steps")
    t.add_argument("--profile-rows", type=int, default=18, help="rows of each --profile table (default 18)")
    d = sub.add_parser("decode", help="decode step (m = 1) against a KV cache: NSA vs SDPA dense on the same cache")
    d.add_argument("--configs", default="paper",
                   help=f"comma-separated, from {', '.join(CONFIGS)} (default paper; their B is not used)")
    d.add_argument("--batches", help=f"comma-separated B (default {DECODE_BATCHES['cuda']}; "
                                     f"{DECODE_BATCHES['cpu']} with --device cpu)")
    d.add_argument("--contexts", help=f"comma-separated context lengths: keys in the cache, the new token's "
                                      f"included (default {DECODE_CONTEXTS['cuda']}; {DECODE_CONTEXTS['cpu']} "
                                      "with --device cpu)")
    d.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    d.add_argument("--iters", type=int, default=100, help="timed decode steps per method (median)")
    d.add_argument("--warmup", type=int, default=10)
    d.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                   help="cpu: a smoke test of the whole path (wall-clock timing, small ceilings)")
    d.add_argument("--out", metavar="PATH", help="JSON; default benchmarks/results/decode_<gpu>_<date>.json")
    d.add_argument("--plot", metavar="PATH", help="PNG; default: the JSON path with .png")
    d.add_argument("--no-plot", action="store_true", help="do not plot")
    d.add_argument("--profile", action="store_true",
                   help="also profile 20 of our steps per row (torch.profiler): GPU time per kernel, in the "
                        "row's kernels_us and printed")
    d.add_argument("--plot-only", metavar="JSON", help="print the table and make the PNG from an existing JSON, exit")
    args = parser.parse_args(argv)
    if args.command == "train-step":
        return args
    args.configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    for c in args.configs:
        if c not in CONFIGS:
            parser.error(f"unknown config {c!r}; choose from {', '.join(CONFIGS)}")
    if args.command == "decode":
        args.batches = _positive_ints(parser, "--batches", args.batches or DECODE_BATCHES[args.device])
        args.contexts = _positive_ints(parser, "--contexts", args.contexts or DECODE_CONTEXTS[args.device])
    else:
        args.seqlens = _positive_ints(parser, "--seqlens", args.seqlens)
    if args.iters < 1 or args.warmup < 0:
        parser.error("--iters must be >= 1 and --warmup >= 0")
    return args


def _positive_ints(parser, flag: str, text: str) -> list:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        parser.error(f"{flag} must be comma-separated integers, got {text!r}")
    if not values or min(values) < 1:
        parser.error(f"{flag} must be positive")
    return values


# ----------------------------------------------------------------------------------------------
# Stage bench (C++ binary) output parsing

_STAGE_LINE = re.compile(r"^\s*(\d+)\s+(all|cmp|select|slc|win|bwd|bwd-[a-z]+)\s+([0-9.]+)\s")


def parse_stage_output(text: str) -> dict:
    """{T: {stage: median_ms}} from nsa_bench_forward's stdout."""
    out: dict = {}
    for line in text.splitlines():
        m = _STAGE_LINE.match(line)
        if m:
            out.setdefault(int(m.group(1)), {})[m.group(2)] = float(m.group(3))
    return out


def run_stage_bench(path: str, cfg: dict, T: int, dtype: str, iters: int, warmup: int, timeout: float,
                    backward: bool = True):
    cmd = [path, "--seqlens", str(T), "--batch", str(cfg["B"]), "--q-heads", str(cfg["Hq"]),
           "--kv-heads", str(cfg["Hkv"]), "--dk", str(cfg["Dk"]), "--dv", str(cfg["Dv"]), "--dtype", dtype,
           "--iters", str(iters), "--warmup", str(warmup)] + (["--backward"] if backward else [])
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, f"stage bench timed out after {timeout:.0f}s"
    except OSError as e:
        return None, f"stage bench could not run: {e}"
    sys.stdout.write("".join(f"    | {line}\n" for line in proc.stdout.splitlines()))
    if proc.returncode != 0:
        return None, f"stage bench rc {proc.returncode}: {proc.stderr.strip()[-300:]}"
    stages = parse_stage_output(proc.stdout).get(T)
    return stages, None if stages else "stage bench printed no stage lines"


# ----------------------------------------------------------------------------------------------
# GPU timing

def _median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2]


def time_after_setup(setup, fn, sets, iters: int, warmup: int, device: str = "cuda") -> float:
    """Median ms of fn(setup(s)) over rotating sets, timing fn only (setup runs before the start event).
    device "cpu": wall clock (time.perf_counter) per run instead of CUDA events."""
    import torch

    if device == "cpu":
        import time

        for i in range(warmup):
            fn(setup(sets[i % len(sets)]))
        cpu_times = []
        for i in range(iters):
            state = setup(sets[(warmup + i) % len(sets)])
            start = time.perf_counter()
            fn(state)
            cpu_times.append((time.perf_counter() - start) * 1e3)
        return _median(cpu_times)
    for i in range(warmup):
        fn(setup(sets[i % len(sets)]))
    torch.cuda.synchronize()
    times = []
    for i in range(iters):
        state = setup(sets[(warmup + i) % len(sets)])
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn(state)
        b.record()
        times.append((a, b))
    torch.cuda.synchronize()
    return _median([a.elapsed_time(b) for a, b in times])


def time_rotating(fn, sets, iters: int, warmup: int, device: str = "cuda") -> float:
    """Median ms of fn(sets[i % len(sets)]) with CUDA events (device "cpu": wall clock), after warm-up."""
    return time_after_setup(lambda s: s, fn, sets, iters, warmup, device)


def time_graphs(fn, sets, iters: int, warmup: int) -> float:
    """Median ms of replaying a CUDA graph of fn(s) per set (rotating), CUDA events around each replay:
    the GPU time of a step without the host's launch overhead, as a serving loop that captures its
    decode step sees it."""
    import torch

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up on a side stream before capture, as torch.cuda.graph asks
        for s in sets:
            fn(s)
    torch.cuda.current_stream().wait_stream(stream)
    graphs = []
    for s in sets:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn(s)
        graphs.append(graph)
    return time_rotating(lambda g: g.replay(), graphs, iters, warmup)


def num_sets(set_bytes: int, l2_bytes: int, cap: int = 16) -> int:
    """Input sets to rotate among: at least 2, together over twice the L2 size."""
    return max(2, min(cap, math.ceil(2 * l2_bytes / max(set_bytes, 1))))


def measure_ceilings(iters: int = 20) -> dict:
    import torch

    n = 8192
    mats = [(torch.randn(n, n, device="cuda", dtype=torch.bfloat16),
             torch.randn(n, n, device="cuda", dtype=torch.bfloat16)) for _ in range(2)]
    outs = [torch.empty(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2)]
    idx = {"i": 0}

    def mm(ab):
        torch.matmul(ab[0], ab[1], out=outs[idx["i"] % 2])
        idx["i"] += 1

    ms = time_rotating(mm, mats, iters, 3)
    matmul_tflops = 2.0 * n ** 3 / (ms * 1e-3) / 1e12
    del mats, outs
    return {"matmul_bf16_tflops": matmul_tflops, "matmul_shape": [n, n, n], "matmul_ms": ms,
            **measure_copy(iters)}


def measure_copy(iters: int = 20, nbytes: int = 2 << 30, device: str = "cuda") -> dict:
    """Copy ceiling: a device-to-device copy of nbytes (default 2 GiB copied: 4 GiB moved)."""
    import torch

    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_(0, 255)
    dst = torch.empty_like(src)
    cms = time_rotating(lambda s: dst.copy_(s), [src], iters, 3, device)
    del src, dst
    if device == "cuda":
        torch.cuda.empty_cache()
    return {"copy_gbps": 2.0 * nbytes / (cms * 1e-3) / 1e9, "copy_bytes": nbytes, "copy_ms": cms,
            "copy_note": "device-to-device copy, bytes read + written"}


def measure_read(iters: int = 20, nbytes: int = 2 << 30, device: str = "cuda") -> dict:
    """Read ceiling: torch.sum over an nbytes bf16 tensor (read once, a scalar written)."""
    import torch

    x = torch.randn(nbytes // 2, dtype=torch.bfloat16, device=device)
    rms = time_rotating(lambda s: torch.sum(s), [x], iters, 3, device)
    del x
    if device == "cuda":
        torch.cuda.empty_cache()
    return {"read_gbps": nbytes / (rms * 1e-3) / 1e9, "read_bytes": nbytes, "read_ms": rms,
            "read_note": "torch.sum over a bf16 tensor, bytes read"}


def _is_oom(e: BaseException) -> bool:
    import torch

    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


def validate(cfg: dict, dtype) -> dict:
    """Small check against the PyTorch reference (same block indices): finite, max abs error."""
    import torch

    import nsa
    from nsa.reference import nsa_attention_ref

    g = torch.Generator(device="cuda").manual_seed(0)
    B, T, Hq, Hkv, Dk, Dv = cfg["B"], 1024, cfg["Hq"], cfg["Hkv"], cfg["Dk"], cfg["Dv"]
    Tc = num_cmp_tokens(T, NSA["cmp_block"], NSA["cmp_stride"])

    def r(*shape):
        return torch.randn(*shape, device="cuda", dtype=dtype, generator=g)

    q, k, v = r(B, T, Hq, Dk), r(B, T, Hkv, Dk), r(B, T, Hkv, Dv)
    kc, vc = r(B, Tc, Hkv, Dk), r(B, Tc, Hkv, Dv)
    gates = torch.sigmoid(r(B, T, Hq, 3))
    with torch.no_grad():
        out, idx = nsa.nsa_attention(q, k, v, kc, vc, gates, return_indices=True, **NSA)
        ref = nsa_attention_ref(*(t.float() for t in (q, k, v, kc, vc, gates)), block_indices=idx, **NSA)
    err = (out.float() - ref).abs().max().item()
    return {"T": T, "finite": bool(torch.isfinite(out).all().item()), "max_abs_err_vs_ref": err,
            "ok": bool(torch.isfinite(out).all().item()) and err < 5e-2}


def bench_nsa(cfg, T, dtype, iters, warmup, l2, backward=True):
    """(forward ms, {mode: backward ms}, input sets, output finite)."""
    import torch

    import nsa

    B, Hq, Hkv, Dk, Dv = cfg["B"], cfg["Hq"], cfg["Hkv"], cfg["Dk"], cfg["Dv"]
    Tc = num_cmp_tokens(T, NSA["cmp_block"], NSA["cmp_stride"])
    elt = torch.finfo(dtype).bits // 8
    set_bytes = elt * B * (T * Hq * (Dk + Dv + 3) + T * Hkv * (Dk + Dv) + Tc * Hkv * (Dk + Dv))
    n = num_sets(set_bytes, l2)
    sets = []
    for _ in range(n):
        sets.append(dict(q=torch.randn(B, T, Hq, Dk, device="cuda", dtype=dtype),
                         k=torch.randn(B, T, Hkv, Dk, device="cuda", dtype=dtype),
                         v=torch.randn(B, T, Hkv, Dv, device="cuda", dtype=dtype),
                         k_cmp=torch.randn(B, Tc, Hkv, Dk, device="cuda", dtype=dtype),
                         v_cmp=torch.randn(B, Tc, Hkv, Dv, device="cuda", dtype=dtype),
                         gates=torch.sigmoid(torch.randn(B, T, Hq, 3, device="cuda", dtype=dtype))))
    last = {}

    def fn(s):
        last["out"] = nsa.nsa_attention(s["q"], s["k"], s["v"], s["k_cmp"], s["v_cmp"], s["gates"], **NSA)

    bwd_ms = {}
    with torch.no_grad():
        ms = time_rotating(fn, sets, iters, warmup)
        finite = bool(torch.isfinite(last["out"]).all().item())
        if backward:
            order = ("cmp_block", "cmp_stride", "sel_block", "num_selected", "num_init", "num_local", "window")
            settings = [NSA[k] for k in order]
            for s in sets:  # the forward's saved outputs, as autograd would keep them
                _, s["out_branch"], s["lse"], s["indices"] = torch.ops.nsa.forward(
                    s["q"], s["k"], s["v"], None, None, s["k_cmp"], s["v_cmp"], s["gates"], None, None, None, T,
                    *settings, 0.0, True)
                s["grad_out"] = torch.randn(B, T, Hq, Dv, device="cuda", dtype=dtype)
            for mode, deterministic in (("default", False), ("deterministic", True)):
                def bwd(s, deterministic=deterministic):
                    last["grads"] = torch.ops.nsa.backward(
                        s["grad_out"], s["q"], s["k"], s["v"], None, None, s["k_cmp"], s["v_cmp"], s["gates"],
                        s["indices"], s["out_branch"], s["lse"], None, None, T, *settings, 0.0, deterministic)
                bwd_ms[mode] = time_rotating(bwd, sets, iters, warmup)
                finite = finite and all(bool(torch.isfinite(g).all().item()) for g in last["grads"] if g.numel())
    del sets, last
    torch.cuda.empty_cache()
    return ms, bwd_ms, n, finite


def bench_sdpa(backend_name, cfg, T, dtype, iters, warmup, l2, backward=True):
    """(forward ms, backward ms or None, gqa_mode, sets) for one SDPA backend; raises if the backend
    cannot run the shape."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}[backend_name]
    B, Hq, Hkv, Dk, Dv = cfg["B"], cfg["Hq"], cfg["Hkv"], cfg["Dk"], cfg["Dv"]
    elt = torch.finfo(dtype).bits // 8
    errors = []
    for mode in ("enable_gqa", "expanded"):
        kvh = Hkv if mode == "enable_gqa" else Hq
        set_bytes = elt * B * T * (Hq * (Dk + Dv) + kvh * (Dk + Dv))
        n = num_sets(set_bytes, l2)
        sets = []
        try:
            for _ in range(n):
                q = torch.randn(B, Hq, T, Dk, device="cuda", dtype=dtype)
                k = torch.randn(B, Hkv, T, Dk, device="cuda", dtype=dtype)
                v = torch.randn(B, Hkv, T, Dv, device="cuda", dtype=dtype)
                if mode == "expanded":
                    k, v = k.repeat_interleave(Hq // Hkv, dim=1), v.repeat_interleave(Hq // Hkv, dim=1)
                sets.append((q, k, v))
            kw = {"enable_gqa": True} if mode == "enable_gqa" else {}
            with sdpa_kernel(backend), torch.no_grad():
                ms = time_rotating(lambda s: F.scaled_dot_product_attention(*s, is_causal=True, **kw),
                                   sets, iters, warmup)
            bwd_ms = None
            if backward:
                def setup(s):
                    leaves = [t.detach().requires_grad_(True) for t in s]
                    out = F.scaled_dot_product_attention(*leaves, is_causal=True, **kw)
                    return out, leaves, torch.randn_like(out)

                with sdpa_kernel(backend):
                    bwd_ms = time_after_setup(setup, lambda st: torch.autograd.grad(st[0], st[1], st[2]),
                                              sets, iters, warmup)
            return ms, bwd_ms, mode, n
        except Exception as e:  # noqa: BLE001  (backend refuses the shape, or OOM)
            if _is_oom(e):
                raise
            errors.append(f"{mode}: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}")
        finally:
            del sets
            torch.cuda.empty_cache()
    raise RuntimeError("; ".join(errors))


def gpu_tag(name: str) -> str:
    m = re.search(r"(H100|H200|H20|B200|B100|A100|L40S|L4|A10G|GH200|GB200)", name.upper())
    return (m.group(1) if m else re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")).lower()


def import_runtime(device: str = "cuda", no_gpu_hint: str = "use --plot-only JSON on machines without a GPU",
                   load_errors=(ImportError,)):
    """(torch, nsa), or None after printing why the benchmark cannot run (no torch, no GPU for device
    "cuda", the ops library not loadable or, for "cuda", built without CUDA)."""
    try:
        import torch
    except ImportError:
        print("nsa.bench: torch is not importable", file=sys.stderr)
        return None
    if device == "cuda" and not torch.cuda.is_available():
        print(f"nsa.bench: no CUDA device visible; {no_gpu_hint}", file=sys.stderr)
        return None
    try:
        import nsa
    except load_errors as e:
        print(f"nsa.bench: cannot import nsa (set NSA_OPS_LIBRARY and PYTHONPATH=python): {e}", file=sys.stderr)
        return None
    if device == "cuda" and not nsa.cuda_built():
        print("nsa.bench: the nsa ops library was built without CUDA (nsa.cuda_built() is False); "
              f"library: {nsa._library.LIBRARY_PATH}", file=sys.stderr)
        return None
    return torch, nsa


def run_meta(torch, args, device: str = "cuda") -> dict:
    """The fields every benchmark JSON's meta starts with: device, versions, date, command, dtype, iters."""
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        dev = {"gpu": props.name, "sms": props.multi_processor_count,
               "l2_bytes": int(getattr(props, "L2_cache_size", 0) or 50 << 20), "gpu_memory_bytes": props.total_memory}
    else:
        dev = {"gpu": "cpu", "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads()}
    return {**dev, "torch": torch.__version__, "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if device == "cuda" else None,
            "date": datetime.date.today().isoformat(), "python": platform.python_version(),
            "command": " ".join(["python -m nsa.bench"] + sys.argv[1:]), "dtype": args.dtype,
            "iters": args.iters, "warmup": args.warmup}


def write_json(path: Path, result) -> None:
    path.write_text(json.dumps(result, indent=1) + "\n")


def run_prefill(args) -> int:
    runtime = import_runtime()
    if runtime is None:
        return 2
    torch, _ = runtime
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    props = torch.cuda.get_device_properties(0)
    meta = run_meta(torch, args)
    l2, today = meta["l2_bytes"], meta["date"]
    meta.update({"nsa_config": NSA,
                 "nsa_inputs": "k_win/v_win not given (window branch reads k/v), random gates in (0,1), "
                               "random k_cmp/v_cmp; forward timed without grad (no branch outputs saved), "
                               "backward timed on the saved outputs of a forward with save_branch_outputs",
                 "timing": "CUDA events per run, median of iters after warmup, rotating input sets "
                           "(>= 2, together > 2x L2)",
                 "stage_bench": args.stage_bench, "validation": {}})
    print(f"nsa.bench prefill: {props.name}, torch {torch.__version__}, L2 {l2 >> 20} MiB, {today}", flush=True)
    ceilings = measure_ceilings()
    print(f"ceilings: bf16 matmul 8192^3 {ceilings['matmul_bf16_tflops']:.0f} TFLOP/s, "
          f"copy {ceilings['copy_gbps']:.0f} GB/s (read + write)", flush=True)
    rows = []
    result = {"rows": rows, "ceilings": ceilings, "meta": meta}
    out_json = Path(args.out_json or f"benchmarks/results/prefill_{gpu_tag(props.name)}_{today}.json")
    out_json.parent.mkdir(parents=True, exist_ok=True)
    for cname in args.configs:
        cfg = CONFIGS[cname]
        try:
            meta["validation"][cname] = v = validate(cfg, dtype)
            print(f"[{cname}] check at T={v['T']}: finite {v['finite']}, max |ours - ref| "
                  f"{v['max_abs_err_vs_ref']:.3g} ({'ok' if v['ok'] else 'OVER TOLERANCE 5e-2'})", flush=True)
        except Exception as e:  # noqa: BLE001
            meta["validation"][cname] = {"ok": False, "error": f"{type(e).__name__}: {str(e)[:300]}"}
            print(f"[{cname}] check failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
        torch.cuda.empty_cache()
        for T in sorted(args.seqlens):
            row = dict(config=cname, B=cfg["B"], T=T, Hq=cfg["Hq"], Hkv=cfg["Hkv"], Dk=cfg["Dk"], Dv=cfg["Dv"],
                       dtype=args.dtype, gpu=props.name, torch=torch.__version__, date=today, notes=[])
            flops = nsa_flops(cfg["B"], T, cfg["Hq"], cfg["Dk"], cfg["Dv"], **NSA)
            row["nominal_gflop"] = {k: v / 1e9 for k, v in flops.items()}
            print(f"[{cname}] T={T}", flush=True)
            try:
                ms, bwd_ms, nsets, finite = bench_nsa(cfg, T, dtype, args.iters, args.warmup, l2,
                                                      not args.no_backward)
                row.update(nsa_ms=ms, nsa_bwd_ms=bwd_ms.get("default"),
                           nsa_bwd_deterministic_ms=bwd_ms.get("deterministic"), nsa_input_sets=nsets,
                           nsa_finite=finite)
                if not finite:
                    row["notes"].append("NSA output not finite")
            except Exception as e:  # noqa: BLE001
                row["nsa_ms"] = None
                row["nsa_bwd_ms"] = None
                row["notes"].append(("nsa skipped: out of memory" if _is_oom(e) else
                                     f"nsa failed: {type(e).__name__}: {str(e)[:200]}"))
                torch.cuda.empty_cache()
            for b in ("cudnn", "flash"):
                try:
                    ms, bwd_ms, mode, nsets = bench_sdpa(b, cfg, T, dtype, args.iters, args.warmup, l2,
                                                         not args.no_backward)
                    row.update({f"{b}_ms": ms, f"{b}_bwd_ms": bwd_ms, f"{b}_gqa": mode, f"{b}_input_sets": nsets})
                except Exception as e:  # noqa: BLE001
                    row[f"{b}_ms"] = row[f"{b}_bwd_ms"] = None
                    row["notes"].append(f"{b} skipped: out of memory" if _is_oom(e) else
                                        f"{b} unavailable: {str(e)[:300]}")
                    torch.cuda.empty_cache()
            if args.stage_bench:
                stages, err = run_stage_bench(args.stage_bench, cfg, T, args.dtype, args.iters, args.warmup,
                                              args.stage_timeout, not args.no_backward)
                row["stages_ms"] = stages
                if err:
                    row["notes"].append(err)
            ours, ours_bwd = row.get("nsa_ms"), row.get("nsa_bwd_ms")
            for b in ("cudnn", "flash"):
                ref, ref_bwd = row.get(f"{b}_ms"), row.get(f"{b}_bwd_ms")
                row[f"fwd_ratio_vs_{b}"] = ours / ref if ours and ref else None
                row[f"bwd_ratio_vs_{b}"] = ours_bwd / ref_bwd if ours_bwd and ref_bwd else None
                row[f"{b}_tflops"] = flops["dense_causal"] / (ref * 1e-3) / 1e12 if ref else None
                row[f"{b}_bwd_tflops"] = flops["dense_causal_bwd"] / (ref_bwd * 1e-3) / 1e12 if ref_bwd else None
            row["nsa_tflops"] = flops["all"] / (ours * 1e-3) / 1e12 if ours else None
            row["nsa_bwd_tflops"] = flops["bwd"] / (ours_bwd * 1e-3) / 1e12 if ours_bwd else None
            row["nsa_frac_of_matmul"] = (row["nsa_tflops"] / ceilings["matmul_bf16_tflops"]
                                         if row["nsa_tflops"] else None)
            if row.get("stages_ms"):
                row["stages_tflops"] = {s: flops[s] / (v * 1e-3) / 1e12 for s, v in row["stages_ms"].items()
                                        if v and s in flops}
            add_row(result, row, _fmt_row(row), out_json)
    finish_run(result, out_json, print_table, None if args.no_png else (
        lambda: plot(result, Path(args.out_png) if args.out_png else out_json.with_suffix(".png"))))
    bad = [c for c, v in meta["validation"].items() if not v.get("ok")]
    return 1 if bad or not rows else 0


# ----------------------------------------------------------------------------------------------
# Output

def add_row(result: dict, row: dict, line: str, out_json: Path) -> None:
    """Prints a measured row (its notes, then `line`), adds it to result["rows"] and rewrites the JSON,
    so that a run cut off midway keeps the rows it measured."""
    for note in row["notes"]:
        print(f"    note: {note}", flush=True)
    print("    " + line, flush=True)
    result["rows"].append(row)
    write_json(out_json, result)


def finish_run(result: dict, out_json: Path, print_summary, make_plot) -> None:
    """The end of a harness run: the final JSON, its path, the summary table, the plot (unless None)."""
    write_json(out_json, result)
    print(f"wrote {out_json}")
    print_summary(result)
    if make_plot is not None:
        make_plot()

def _f(x, spec=".2f"):
    return "-" if x is None else format(x, spec)


def _fmt_row(r) -> str:
    st = r.get("stages_ms") or {}
    return (f"nsa {_f(r.get('nsa_ms'), '.3f')} ms ({_f(r.get('nsa_tflops'), '.0f')} TFLOP/s)  "
            f"cudnn {_f(r.get('cudnn_ms'), '.3f')}  flash {_f(r.get('flash_ms'), '.3f')}  "
            f"ours/cudnn {_f(r.get('fwd_ratio_vs_cudnn'))}  ours/flash {_f(r.get('fwd_ratio_vs_flash'))}  "
            f"bwd: nsa {_f(r.get('nsa_bwd_ms'), '.3f')} (det {_f(r.get('nsa_bwd_deterministic_ms'), '.3f')}) "
            f"cudnn {_f(r.get('cudnn_bwd_ms'), '.3f')} flash {_f(r.get('flash_bwd_ms'), '.3f')} "
            f"ours/cudnn {_f(r.get('bwd_ratio_vs_cudnn'))}  "
            + " ".join(f"{s} {_f(st.get(s), '.3f')}" for s in STAGES if s in st))


BWD_STAGES = ("bwd-prep", "bwd-dq", "bwd-cmp", "bwd-slc", "bwd-win", "bwd-conv")


def print_table(result) -> None:
    m, c = result["meta"], result["ceilings"]
    print(f"\nprefill forward, {m['gpu']}, torch {m['torch']}, {m['dtype']}, {m['date']}, median ms of "
          f"{m['iters']}; ceilings: matmul {c['matmul_bf16_tflops']:.0f} TFLOP/s, copy {c['copy_gbps']:.0f} GB/s")
    hdr = ("config", "T", "nsa", "cmp", "select", "slc", "win", "st.all", "cudnn", "flash", "/cudnn", "/flash",
           "TFLOP/s", "%mm")
    fmt = "{:<10} {:>7} {:>9} {:>8} {:>8} {:>8} {:>8} {:>9} {:>9} {:>9} {:>6} {:>6} {:>7} {:>5}"
    print(fmt.format(*hdr))
    for r in result["rows"]:
        st = r.get("stages_ms") or {}
        frac = r.get("nsa_frac_of_matmul")
        print(fmt.format(r["config"], r["T"], _f(r.get("nsa_ms"), ".3f"),
                         *(_f(st.get(s), ".3f") for s in ("cmp", "select", "slc", "win", "all")),
                         _f(r.get("cudnn_ms"), ".3f"), _f(r.get("flash_ms"), ".3f"),
                         _f(r.get("fwd_ratio_vs_cudnn")), _f(r.get("fwd_ratio_vs_flash")),
                         _f(r.get("nsa_tflops"), ".0f"), "-" if frac is None else f"{100 * frac:.0f}"))
    print_floors(result)
    if not any(r.get("nsa_bwd_ms") for r in result["rows"]):
        return
    print(f"\nprefill backward (same run; stages from the C++ stage bench, default mode)")
    hdr = ("config", "T", "nsa", "det") + tuple(s[4:] for s in BWD_STAGES) + ("cudnn", "flash", "/cudnn", "/flash",
                                                                              "TFLOP/s")
    fmt = "{:<10} {:>7} {:>9} {:>9}" + " {:>8}" * len(BWD_STAGES) + " {:>9} {:>9} {:>6} {:>6} {:>7}"
    print(fmt.format(*hdr))
    for r in result["rows"]:
        st = r.get("stages_ms") or {}
        print(fmt.format(r["config"], r["T"], _f(r.get("nsa_bwd_ms"), ".3f"), _f(r.get("nsa_bwd_deterministic_ms"), ".3f"),
                         *(_f(st.get(s), ".3f") for s in BWD_STAGES), _f(r.get("cudnn_bwd_ms"), ".3f"),
                         _f(r.get("flash_bwd_ms"), ".3f"), _f(r.get("bwd_ratio_vs_cudnn")),
                         _f(r.get("bwd_ratio_vs_flash")), _f(r.get("nsa_bwd_tflops"), ".0f")))


def print_floors(result) -> None:
    """Each forward stage's time over its floor (stage_floors: which bound sets it, c compute or m
    memory), from the rows' stage times and the run's ceilings; dense causal attention's floor beside
    cuDNN's time. Rows without stage times are left out."""
    rows = [r for r in result["rows"] if r.get("stages_ms") and r.get("nominal_gflop")]
    if not rows or floor_ms(1.0, 1.0, result["ceilings"]) is None:
        return
    print("\nforward floors (ms): the larger of the nominal FLOPs at the matmul ceiling (c) and the DRAM bytes of "
          "prefill_bytes at the copy ceiling (m); measured / floor")
    columns = STAGES[1:] + STAGES[:1]  # the four stages, then "all"
    hdr = ("config", "T") + columns + ("dense", "cudnn")
    fmt = "{:<10} {:>7}" + " {:>20}" * 5 + " {:>10} {:>9}"
    print(fmt.format(*hdr))
    for r in rows:
        flops = {k: v * 1e9 for k, v in r["nominal_gflop"].items()}
        nbytes = prefill_bytes(r["B"], r["T"], r["Hq"], r["Hkv"], r["Dk"], r["Dv"], **NSA)
        floors = stage_floors(flops, nbytes, result["ceilings"])
        dense = floor_ms(flops["dense_causal"], nbytes["dense_causal"], result["ceilings"])[0]
        cells = []
        for stage in columns:
            floor, bound = floors[stage]
            ms = r["stages_ms"].get(stage)
            tag = "" if bound == "sum" else f" {bound[0]}"
            cells.append(f"{_f(ms, '.3f')} / {floor:.3f}{tag}")
        print(fmt.format(r["config"], r["T"], *cells, f"{dense:.3f}", _f(r.get("cudnn_ms"), ".3f")))


def _pyplot():
    """matplotlib.pyplot (Agg backend), or None after printing that the plot is skipped."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plot skipped: matplotlib is not importable")
        return None
    return plt


def _log_axes(ax, title: str, xlabel: str, ylabel: str) -> None:
    """Log-log axes (x in powers of 2) with a title, labels, grid and legend."""
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)


def _save_figure(plt, fig, path: Path) -> None:
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {path}")


def plot(result, path: Path) -> bool:
    plt = _pyplot()
    if plt is None:
        return False
    rows = result["rows"]
    configs = list(dict.fromkeys(r["config"] for r in rows))
    if not configs:
        print("plot skipped: no rows")
        return False
    fig, axes = plt.subplots(1, len(configs), figsize=(max(7.5, 5.5 * len(configs)), 4.8), squeeze=False)
    series = [("nsa_ms", "NSA forward (ours)", "o-"), ("cudnn_ms", "SDPA cuDNN forward (dense causal)", "s--"),
              ("flash_ms", "SDPA flash forward (dense causal)", "^--"), ("nsa_bwd_ms", "NSA backward (ours)", "o-."),
              ("cudnn_bwd_ms", "SDPA cuDNN backward", "s:")]
    for ax, cname in zip(axes[0], configs):
        rs = sorted((r for r in rows if r["config"] == cname), key=lambda r: r["T"])
        for key, label, style in series:
            pts = [(r["T"], r[key]) for r in rs if r.get(key)]
            if pts:
                ax.plot(*zip(*pts), style, label=label)
        for s, style in (("select", ":"), ("slc", ":"), ("cmp", ":")):
            pts = [(r["T"], (r.get("stages_ms") or {}).get(s)) for r in rs]
            pts = [p for p in pts if p[1]]
            if pts:
                ax.plot(*zip(*pts), style, alpha=0.6, label=f"NSA stage {s}")
        r0 = rs[0]
        _log_axes(ax, f"{cname}: B={r0['B']} Hq={r0['Hq']} Hkv={r0['Hkv']} Dk={r0['Dk']} Dv={r0['Dv']}",
                  "sequence length T", "time (ms)")
    m = result["meta"]
    fig.suptitle(f"Prefill forward and backward, {m.get('gpu')}, torch {m.get('torch')}, {m.get('dtype')}, {m.get('date')}", fontsize=10)
    _save_figure(plt, fig, path)
    return True


def run_train_step(args) -> int:
    import torch
    import torch.nn.functional as F

    from nsa.model import PRESETS, LanguageModel, ModelConfig, compile_for_training

    if not torch.cuda.is_available():
        print("nsa.bench train-step: no CUDA device visible", file=sys.stderr)
        return 2
    preset = PRESETS[args.preset]
    B = args.batch_size or preset["train"]["batch_size"]
    print(f"train step, {torch.cuda.get_device_name(0)}, torch {torch.__version__}, preset {args.preset}, "
          f"batch {B}, bf16 autocast, fused AdamW{', torch.compile' if args.compile else ''}; "
          f"median of {args.iters} after {args.warmup}", flush=True)
    for attn in [a.strip() for a in args.attn.split(",") if a.strip()]:
        fields = dict(preset["model"], attn=attn)
        if args.seq_len:
            fields["seq_len"] = args.seq_len
        cfg = ModelConfig.from_dict(fields)
        T = cfg.seq_len
        torch.manual_seed(0)
        model = LanguageModel(cfg, checkpoint_activations=preset["train"].get("checkpoint_activations", False)).cuda()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        tokens = torch.randint(0, cfg.vocab_size, (B, T + 1), device="cuda")
        forward = compile_for_training(model) if args.compile else model

        def step(_):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                logits = forward(tokens[:, :-1])
            F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten()).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        torch.cuda.reset_peak_memory_stats()
        ms = time_rotating(step, [None], args.iters, args.warmup)
        print(f"  {attn:5s} T={T}: {ms:.1f} ms/step, {B * T / (ms * 1e-3):,.0f} tokens/s, "
              f"{model.num_parameters() / 1e6:.1f}M parameters, peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB",
              flush=True)
        if args.profile:
            from torch.profiler import ProfilerActivity, profile

            # CPU activity too, so that the second table charges each operator (autograd's backward
            # nodes included) with the GPU time of the kernels it launched.
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                for _ in range(2):
                    step(None)
                torch.cuda.synchronize()
            events = prof.key_averages()
            print("  kernels, by their own GPU time (2 steps):")
            print(events.table(sort_by="self_cuda_time_total", row_limit=args.profile_rows, max_name_column_width=70))
            print("  operators, by the GPU time of everything they launched (2 steps; nested ranges overlap):")
            print(events.table(sort_by="cuda_time_total", row_limit=args.profile_rows, max_name_column_width=70))
        del model, forward, opt
        torch.cuda.empty_cache()
    return 0


# ----------------------------------------------------------------------------------------------
# Decode: one step (m = 1) against a KV cache

DECODE_BYTES_NOTE = ("nsa_bytes: per sequence and kv head, (compressed tokens visible at the last position "
                     "+ selected keys (n*l' clipped to the keys held, less the unfilled tail of the query's "
                     "own block) + min(w, context)) * (Dk + Dv) * elt, plus q, gates, out and the int32 block "
                     "indices; dense_bytes: context * (Dk + Dv) * elt per sequence and kv head, plus q and out")


def decode_tokens(context: int, cmp_block: int = 32, cmp_stride: int = 16, sel_block: int = 64,
                  num_selected: int = 16, num_init: int = 1, num_local: int = 2, window: int = 512,
                  **_unused) -> dict:
    """Key rows one decode step must read per sequence and kv head, per branch, for the query at
    position context - 1 (context: keys held, the new token's included).

    cmp: all num_cmp_tokens(context) compressed tokens (visible at the last position; the scoring
    pass reads the same keys); slc: every key when the sequence has at most n blocks of l', else the
    n selected blocks less the unfilled tail of the query's own block (always selected when
    num_local >= 1; with num_local = 0, n*l' is an upper bound); win: min(w, context).
    """
    blocks = -(-context // sel_block)
    if blocks <= num_selected:
        slc = context
    else:
        slc = num_selected * sel_block - (blocks * sel_block - context if num_local >= 1 else 0)
    return {"cmp": num_cmp_tokens(context, cmp_block, cmp_stride), "slc": slc, "win": min(window, context)}


def decode_bytes(B: int, context: int, Hq: int, Hkv: int, Dk: int, Dv: int, elt: int = 2, **nsa_config) -> dict:
    """Bytes one decode step of B sequences must move (DECODE_BYTES_NOTE), NSA and dense, and the
    formula's key rows per branch summed over the batch and kv heads (the units of tokens_read)."""
    tokens = decode_tokens(context, **nsa_config)
    row_bytes = (Dk + Dv) * elt
    nsa_kv = B * Hkv * sum(tokens.values()) * row_bytes
    nsa_io = B * Hq * (Dk + 3 + Dv) * elt + B * Hkv * nsa_config.get("num_selected", 16) * 4
    dense_kv = B * Hkv * context * row_bytes
    dense_io = B * Hq * (Dk + Dv) * elt
    return {"formula_tokens": {k: B * Hkv * v for k, v in tokens.items()}, "nsa_kv_bytes": nsa_kv,
            "nsa_bytes": nsa_kv + nsa_io, "dense_kv_bytes": dense_kv, "dense_bytes": dense_kv + dense_io}


def _ratio(a, b):
    return a / b if a is not None and b else None


def decode_row(config_name: str, cfg: dict, B: int, context: int, dtype: str, meta: dict, ceilings: dict,
               ours_ms=None, dense=None, tokens_read=None, ours_graph_ms=None, dense_graph=None, **extra) -> dict:
    """One JSON row from the measurements: dense = {backend: ms or None}; tokens_read = {cmp, slc, win}
    key rows the op reported, summed over the batch and kv heads; *_graph: the same steps replayed as
    CUDA graphs (GPU time without launch overhead); extra fields are kept as given."""
    elt = {"bf16": 2, "fp16": 2, "fp32": 4, "fp64": 8}[dtype]
    nbytes = decode_bytes(B, context, cfg["Hq"], cfg["Hkv"], cfg["Dk"], cfg["Dv"], elt, **NSA)
    dense = dict(dense or {})
    ran = {b: ms for b, ms in dense.items() if ms}
    best = min(ran, key=ran.get) if ran else None
    dense_ms = ran.get(best)
    copy_gbps, read_gbps = ceilings.get("copy_gbps"), ceilings.get("read_gbps")
    gbps = nbytes["nsa_bytes"] / (ours_ms * 1e-3) / 1e9 if ours_ms else None
    dense_gbps = nbytes["dense_bytes"] / (dense_ms * 1e-3) / 1e9 if dense_ms else None
    formula = nbytes["formula_tokens"]
    graphed = {b: ms for b, ms in (dense_graph or {}).items() if ms}
    best_graph = min(graphed, key=graphed.get) if graphed else None
    dense_graph_ms = graphed.get(best_graph)
    gbps_graph = nbytes["nsa_bytes"] / (ours_graph_ms * 1e-3) / 1e9 if ours_graph_ms else None
    row = dict(config=config_name, B=B, context=context, Hq=cfg["Hq"], Hkv=cfg["Hkv"], Dk=cfg["Dk"], Dv=cfg["Dv"],
               dtype=dtype, gpu=meta.get("gpu"), torch=meta.get("torch"), date=meta.get("date"),
               ours_ms=ours_ms, dense_ms=dense_ms, dense_backend=best,
               **{f"{b}_ms": dense.get(b) for b in DENSE_BACKENDS},
               speedup_vs_dense=_ratio(dense_ms, ours_ms),
               nsa_bytes=nbytes["nsa_bytes"], gbps=gbps, bw_fraction=_ratio(gbps, copy_gbps),
               read_bw_fraction=_ratio(gbps, read_gbps), copy_gbps=copy_gbps, read_gbps=read_gbps,
               dense_bytes=nbytes["dense_bytes"], dense_gbps=dense_gbps,
               dense_bw_fraction=_ratio(dense_gbps, copy_gbps),
               ours_graph_ms=ours_graph_ms, dense_graph_ms=dense_graph_ms, dense_graph_backend=best_graph,
               speedup_vs_dense_graph=_ratio(dense_graph_ms, ours_graph_ms), gbps_graph=gbps_graph,
               bw_fraction_graph=_ratio(gbps_graph, copy_gbps),
               tokens_read=tokens_read, formula_tokens=formula,
               tokens_read_over_formula=({k: _ratio(tokens_read.get(k), formula[k]) for k in formula}
                                         if tokens_read else None),
               notes=[])
    row.update(extra)
    return row


def _sdpa_decode(F, s, mode):
    if mode == "enable_gqa":
        return F.scaled_dot_product_attention(s["q_heads"], s["k_dense"], s["v_dense"], enable_gqa=True)
    return F.scaled_dot_product_attention(s["q_grouped"], s["k_dense"], s["v_dense"])


def _kernel_name(name: str) -> str:
    """A CUDA kernel's demangled name without its namespace, return type and parameter list."""
    name = re.sub(r"^void ", "", name).split("(")[0]
    return name.replace("nsa::cuda_detail::", "")


def profile_kernels(fn, sets, steps: int = 20) -> dict:
    """{kernel: mean GPU microseconds per step} over `steps` calls of fn (rotating sets), torch.profiler."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    for s in sets[:2]:
        fn(s)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for i in range(steps):
            fn(sets[i % len(sets)])
        torch.cuda.synchronize()
    totals = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA and e.device_time > 0:
            key = _kernel_name(e.name)
            totals[key] = totals.get(key, 0.0) + e.device_time
    return {k: v / steps for k, v in sorted(totals.items(), key=lambda kv: -kv[1])}


def bench_decode(nsa, cfg: dict, B: int, context: int, dtype, iters: int, warmup: int, device: str,
                 l2=None, profile: bool = False) -> dict:
    """Measurements of one (B, context): ours_ms, dense {backend: ms}, dense_modes, tokens_read,
    cache_sets, ours_finite, notes. Allocates the caches (capacity = context, random contents) and
    frees them. On CUDA, rotates among cache sets when what NSA reads per step is under twice the L2
    size (the rotation is capped by free memory); raises MemoryError when one set does not fit."""
    import warnings

    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    Hq, Hkv, Dk, Dv = cfg["Hq"], cfg["Hkv"], cfg["Dk"], cfg["Dv"]
    elt = torch.finfo(dtype).bits // 8
    cmp_cap = max(1, num_cmp_tokens(context, NSA["cmp_block"], NSA["cmp_stride"]))
    set_bytes = elt * B * ((context + cmp_cap) * Hkv * (Dk + Dv) + Hq * (Dk + 3))
    notes = []
    n = 1
    if device == "cuda":
        read = decode_bytes(B, context, Hq, Hkv, Dk, Dv, elt, **NSA)["nsa_bytes"]
        n = 1 if read >= 2 * l2 else num_sets(read, l2, cap=32)
        budget = torch.cuda.mem_get_info()[0] - (2 << 30)  # headroom for outputs and SDPA workspaces
        if set_bytes > budget:
            raise MemoryError(f"the caches need {set_bytes / 2**30:.1f} GiB, {max(budget, 0) / 2**30:.1f} GiB "
                              "free (less 2 GiB headroom)")
        if n * set_bytes > budget:
            notes.append(f"rotation cut to {budget // set_bytes} of {n} cache sets by free memory")
            n = int(budget // set_bytes)
    sets = []
    for _ in range(n):
        s = dict(k=torch.randn(B, context, Hkv, Dk, device=device, dtype=dtype),
                 v=torch.randn(B, context, Hkv, Dv, device=device, dtype=dtype),
                 k_cmp=torch.randn(B, cmp_cap, Hkv, Dk, device=device, dtype=dtype),
                 v_cmp=torch.randn(B, cmp_cap, Hkv, Dv, device=device, dtype=dtype),
                 q=torch.randn(B, 1, Hq, Dk, device=device, dtype=dtype),
                 gates=torch.sigmoid(torch.randn(B, 1, Hq, 3, device=device, dtype=dtype)),
                 seqlens=torch.full((B,), context, dtype=torch.int32, device=device))
        # Dense views of the same cache: [B, Hkv, context, D] (strided), q as [B, Hq, 1, D] for
        # enable_gqa, or as [B, Hkv, Hq/Hkv, D] (a kv head's query heads as rows, no mask needed).
        s.update(k_dense=s["k"][:, :context].transpose(1, 2), v_dense=s["v"][:, :context].transpose(1, 2),
                 q_heads=s["q"].transpose(1, 2), q_grouped=s["q"].view(B, Hkv, Hq // Hkv, Dk))
        sets.append(s)
    config = nsa.ops.NSAConfig(**NSA)
    last = {}

    def ours(s, tokens_read=None):
        last["out"], last["indices"] = nsa.ops.nsa_attention_kvcache(
            s["q"], s["k"], s["v"], s["k_cmp"], s["v_cmp"], s["gates"], s["seqlens"], config, tokens_read=tokens_read)

    result = {"cache_sets": n, "notes": notes, "dense_modes": {}}
    with torch.no_grad():
        result["ours_ms"] = time_rotating(ours, sets, iters, warmup, device)
        if device == "cuda":
            result["ours_graph_ms"] = time_graphs(ours, sets, iters, warmup)
            if profile:
                result["kernels_us"] = profile_kernels(ours, sets)
        tokens_read = torch.zeros(B, 3, dtype=torch.int64, device=device)
        ours(sets[0], tokens_read)
        result["tokens_read"] = dict(zip(("cmp", "slc", "win"), tokens_read.sum(0).tolist()))
        result["ours_finite"] = bool(torch.isfinite(last["out"]).all().item())
        if not result["ours_finite"]:
            notes.append("NSA output not finite")
        del last["out"], last["indices"]
        backends = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
                    "efficient": SDPBackend.EFFICIENT_ATTENTION}
        dense, dense_graph = {}, {}
        for name in DENSE_BACKENDS:
            modes, graph_modes, errors = {}, {}, []
            for mode in ("enable_gqa", "grouped"):
                try:
                    with sdpa_kernel(backends[name]), warnings.catch_warnings():
                        warnings.simplefilter("ignore")  # "<backend> not used because ..." on refusal
                        modes[mode] = time_rotating(lambda s, mode=mode: _sdpa_decode(F, s, mode), sets, iters,
                                                    warmup, device)
                        if device == "cuda":
                            graph_modes[mode] = time_graphs(lambda s, mode=mode: _sdpa_decode(F, s, mode), sets,
                                                            iters, warmup)
                except Exception as e:  # noqa: BLE001  (no available kernel for this shape / device)
                    if _is_oom(e):
                        raise
                    errors.append(f"{mode}: {str(e).splitlines()[0][:160] if str(e) else type(e).__name__}")
            result["dense_modes"][name] = modes
            dense[name] = min(modes.values()) if modes else None
            dense_graph[name] = min(graph_modes.values()) if graph_modes else None
            if not modes:
                same = len(set(e.split(": ", 1)[-1] for e in errors)) == 1
                notes.append(f"{name} unavailable: {errors[0].split(': ', 1)[-1] if same else '; '.join(errors)}")
        result["dense"] = dense
        result["dense_graph"] = dense_graph
    del sets
    if device == "cuda":
        torch.cuda.empty_cache()
    return result


def run_decode(args) -> int:
    runtime = import_runtime(args.device, "for a smoke test run with --device cpu (tiny sizes: --batches 1 "
                             "--contexts 256); --plot-only JSON needs no GPU", (ImportError, OSError, RuntimeError))
    if runtime is None:
        return 2
    torch, nsa = runtime
    if not (hasattr(torch.ops.nsa, "forward_kvcache") and hasattr(nsa.ops, "nsa_attention_kvcache")):
        print(f"nsa.bench decode: the ops library {nsa._library.LIBRARY_PATH} has no nsa::forward_kvcache "
              "(or nsa.ops has no nsa_attention_kvcache); rebuild it", file=sys.stderr)
        return 2
    device = args.device
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    meta = run_meta(torch, args, device)
    l2, today = meta.get("l2_bytes"), meta["date"]
    meta.update({"nsa_config": NSA, "device": device, "bytes": DECODE_BYTES_NOTE,
                 "inputs": "m = 1 new token per sequence at position context-1; caches of capacity = context "
                           "(k_win/v_win not given: the window branch reads k/v), random bf16 contents, random "
                           "gates in (0,1), cache_seqlens = context; dense: SDPA (no mask) of the same q over "
                           "the same cache viewed as [B, Hkv, context, D], enable_gqa=True or q grouped as "
                           "[B, Hkv, Hq/Hkv, D] (the faster kept per backend)",
                 "timing": ("CUDA events per call, median of iters after warmup, rotating cache sets while "
                            "what NSA reads per step is under 2x L2 (cache_sets per row); *_graph: the same call "
                            "captured as one CUDA graph per set and replayed (no host launch overhead)"
                            if device == "cuda" else
                            "wall clock per call (CPU smoke test: not a performance number)")})
    print(f"nsa.bench decode: {meta['gpu']}, torch {torch.__version__}"
          + (f", L2 {l2 >> 20} MiB" if l2 else "") + f", {args.dtype}, {today}", flush=True)
    ceiling_bytes = (2 << 30) if device == "cuda" else (64 << 20)
    ceilings = {**measure_copy(20, ceiling_bytes, device), **measure_read(20, ceiling_bytes, device)}
    print(f"ceilings: copy {ceilings['copy_gbps']:.0f} GB/s (read + write of {ceiling_bytes >> 20} MiB), "
          f"read {ceilings['read_gbps']:.0f} GB/s (torch.sum)", flush=True)
    rows = []
    result = {"rows": rows, "ceilings": ceilings, "meta": meta}
    out_json = Path(args.out or f"benchmarks/results/decode_{gpu_tag(meta['gpu'])}_{today}.json")
    out_json.parent.mkdir(parents=True, exist_ok=True)
    failed = 0
    for cname in args.configs:
        cfg = CONFIGS[cname]
        for B in args.batches:
            for context in sorted(args.contexts):
                print(f"[{cname}] B={B} context={context}", flush=True)
                try:
                    measured = bench_decode(nsa, cfg, B, context, dtype, args.iters, args.warmup, device, l2,
                                            profile=args.profile)
                except Exception as e:  # noqa: BLE001
                    skipped = isinstance(e, MemoryError) or _is_oom(e)
                    failed += not skipped
                    measured = {"notes": [f"skipped: does not fit in memory ({e})" if isinstance(e, MemoryError) else
                                          "skipped: out of memory" if skipped else
                                          f"failed: {type(e).__name__}: {str(e)[:300]}"]}
                    if device == "cuda":
                        torch.cuda.empty_cache()
                row = decode_row(cname, cfg, B, context, args.dtype, meta, ceilings, **measured)
                failed += row.get("ours_finite") is False
                add_row(result, row, _fmt_decode_row(row), out_json)
                if row.get("kernels_us"):
                    print("  kernels (us per step): " + ", ".join(f"{k} {v:.1f}" for k, v in row["kernels_us"].items()),
                          flush=True)
    finish_run(result, out_json, print_decode_table, None if args.no_plot else (
        lambda: plot_decode(result, Path(args.plot) if args.plot else out_json.with_suffix(".png"))))
    return 1 if failed or not any(r.get("ours_ms") for r in rows) else 0


def _tokens(t, r) -> str:
    """cmp/slc/win key rows per sequence and kv head (t is summed over the batch and kv heads)."""
    return "-" if not t else "/".join(f"{t[k] / (r['B'] * r['Hkv']):.0f}" for k in ("cmp", "slc", "win"))


def _fmt_decode_row(r) -> str:
    frac = r.get("bw_fraction")
    return (f"ours {_f(r.get('ours_ms'), '.4f')} ms ({_f(r.get('gbps'), '.0f')} GB/s, "
            f"{'-' if frac is None else f'{100 * frac:.0f}'}% of copy)  dense {_f(r.get('dense_ms'), '.4f')} ms "
            f"({r.get('dense_backend') or '-'}, {_f(r.get('dense_gbps'), '.0f')} GB/s)  "
            + "  ".join(f"{b} {_f(r.get(f'{b}_ms'), '.4f')}" for b in DENSE_BACKENDS)
            + f"  speedup {_f(r.get('speedup_vs_dense'))}x  graphs: ours {_f(r.get('ours_graph_ms'), '.4f')} dense "
              f"{_f(r.get('dense_graph_ms'), '.4f')} speedup {_f(r.get('speedup_vs_dense_graph'))}x"
              f"  keys read per sequence and kv head cmp/slc/win "
              f"{_tokens(r.get('tokens_read'), r)} (formula {_tokens(r.get('formula_tokens'), r)})")


def print_decode_table(result) -> None:
    m, c = result["meta"], result["ceilings"]
    print(f"\ndecode step (m = 1), {m['gpu']}, torch {m['torch']}, {m['dtype']}, {m['date']}, median ms of "
          f"{m['iters']}; ceilings: copy {_f(c.get('copy_gbps'), '.0f')} GB/s, read {_f(c.get('read_gbps'), '.0f')} GB/s")
    print("(graph: the step replayed as a CUDA graph, GPU time without launch overhead)")
    hdr = ("config", "B", "context", "ours ms", "dense ms", "backend", "speedup", "graph ours", "graph dense",
           "speedup", "GB/s", "%copy", "dense GB/s", "read/head c/s/w", "formula/head")
    fmt = "{:<10} {:>4} {:>8} {:>9} {:>9} {:>9} {:>7} {:>10} {:>11} {:>7} {:>6} {:>5} {:>10} {:>18} {:>18}"
    print(fmt.format(*hdr))
    for r in result["rows"]:
        frac = r.get("bw_fraction_graph") or r.get("bw_fraction")
        print(fmt.format(r["config"], r["B"], r["context"], _f(r.get("ours_ms"), ".4f"), _f(r.get("dense_ms"), ".4f"),
                         r.get("dense_backend") or "-", _f(r.get("speedup_vs_dense")),
                         _f(r.get("ours_graph_ms"), ".4f"), _f(r.get("dense_graph_ms"), ".4f"),
                         _f(r.get("speedup_vs_dense_graph")), _f(r.get("gbps_graph") or r.get("gbps"), ".0f"),
                         "-" if frac is None else f"{100 * frac:.0f}", _f(r.get("dense_gbps"), ".0f"),
                         _tokens(r.get("tokens_read"), r), _tokens(r.get("formula_tokens"), r)))


def plot_decode(result, path: Path) -> bool:
    """Per-token latency (ms per decode step) vs context, log-log: one colour per B, ours solid, dense dashed.
    The CUDA-graph times (GPU time) when every row has them, else the eager ones (a CPU smoke test)."""
    plt = _pyplot()
    if plt is None:
        return False
    rows = [r for r in result["rows"] if r.get("ours_ms") or r.get("dense_ms")]
    configs = list(dict.fromkeys(r["config"] for r in rows))
    if not configs:
        print("plot skipped: no rows")
        return False
    graph = all(r.get("ours_graph_ms") for r in rows)
    ours_key, dense_key = ("ours_graph_ms", "dense_graph_ms") if graph else ("ours_ms", "dense_ms")
    timing = "CUDA graph, GPU time" if graph else "eager"
    fig, axes = plt.subplots(1, len(configs), figsize=(max(7.5, 5.5 * len(configs)), 4.8), squeeze=False)
    for ax, cname in zip(axes[0], configs):
        rs = [r for r in rows if r["config"] == cname]
        for i, B in enumerate(sorted({r["B"] for r in rs})):
            color = f"C{i}"
            pts = sorted((r["context"], r) for r in rs if r["B"] == B)
            for key, label, style in ((ours_key, "NSA (ours)", "o-"), (dense_key, "dense SDPA (best)", "s--")):
                xy = [(ctx, r[key]) for ctx, r in pts if r.get(key)]
                if xy:
                    ax.plot(*zip(*xy), style, color=color, label=f"B={B} {label}")
        r0 = rs[0]
        _log_axes(ax, f"{cname}: Hq={r0['Hq']} Hkv={r0['Hkv']} Dk={r0['Dk']} Dv={r0['Dv']}",
                  "context (keys in the cache)", f"ms per decode step ({timing})")
    m = result["meta"]
    fig.suptitle(f"Decode step (m = 1), {m.get('gpu')}, torch {m.get('torch')}, {m.get('dtype')}, {m.get('date')}",
                 fontsize=10)
    _save_figure(plt, fig, path)
    return True


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.command == "train-step":
        return run_train_step(args)
    if args.command == "decode":
        if args.plot_only:
            result = json.loads(Path(args.plot_only).read_text())
            print_decode_table(result)
            ok = plot_decode(result, Path(args.plot) if args.plot else Path(args.plot_only).with_suffix(".png"))
            return 0 if ok else 1
        return run_decode(args)
    if args.plot_only:
        result = json.loads(Path(args.plot_only).read_text())
        print_table(result)
        ok = plot(result, Path(args.out_png) if args.out_png else Path(args.plot_only).with_suffix(".png"))
        return 0 if ok else 1
    return run_prefill(args)


if __name__ == "__main__":
    sys.exit(main())
