"""The differentiable NSA attention op: ``nsa_attention``.

Wraps ``torch.ops.nsa.forward`` / ``torch.ops.nsa.backward`` (torch/nsa_ops.cpp) with fake
kernels for tracing (torch.compile, meta tensors) and an autograd formula. The selection is not
differentiated (as in the paper): gradients flow to q, k, v, k_win, v_win, k_cmp, v_cmp and gates.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

_DIFFERENTIABLE = ("q", "k", "v", "k_win", "v_win", "k_cmp", "v_cmp", "gates")


@dataclass(frozen=True)
class NSAConfig:
    """NSA hyper-parameters; defaults are the paper's (docs/semantics.md section 1)."""

    cmp_block: int = 32  # l: raw tokens per compressed token
    cmp_stride: int = 16  # d: stride between compressed tokens
    sel_block: int = 64  # l': raw tokens per selection block
    num_selected: int = 16  # n: selected blocks per (query, kv head), forced ones included
    num_init: int = 1  # initial blocks always selected
    num_local: int = 2  # local blocks (the query's and those before it) always selected
    window: int = 512  # w: sliding-window size
    scale: Optional[float] = None  # softmax scale; None: 1/sqrt(Dk)


def num_cmp_tokens(seqlen: int, cmp_block: int = 32, cmp_stride: int = 16) -> int:
    """Tc: compressed tokens of a sequence of ``seqlen`` raw tokens."""
    return (seqlen - cmp_block) // cmp_stride + 1 if seqlen >= cmp_block else 0


def cmp_seqlens(cu_seqlens: torch.Tensor, cmp_block: int = 32, cmp_stride: int = 16) -> torch.Tensor:
    """cu_seqlens_cmp [N+1] (int32, same device) for packed sequences ``cu_seqlens`` [N+1]; no host sync."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).to(torch.int64)
    counts = torch.where(lengths >= cmp_block, (lengths - cmp_block) // cmp_stride + 1, torch.zeros_like(lengths))
    return torch.nn.functional.pad(torch.cumsum(counts, 0), (1, 0)).to(torch.int32)


def _stats_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.register_fake("nsa::forward")
def _forward_fake(q, k, v, k_win, v_win, k_cmp, v_cmp, gates, block_indices, cu_seqlens, cu_seqlens_cmp,
                  max_seqlen, cmp_block, cmp_stride, sel_block, num_selected, num_init, num_local, window, scale,
                  save_branch_outputs, deterministic=False):
    rows = tuple(q.shape[:-2])
    num_q_heads, num_kv_heads, head_dim_v = q.shape[-2], k.shape[-2], v.shape[-1]
    out = q.new_empty(rows + (num_q_heads, head_dim_v))
    out_branch = q.new_empty(rows + (num_q_heads, 3, head_dim_v)) if save_branch_outputs else q.new_empty((0,))
    lse = q.new_empty(rows + (num_q_heads, 3), dtype=_stats_dtype(q.dtype))
    indices = q.new_empty(rows + (num_kv_heads, num_selected), dtype=torch.int32)
    return out, out_branch, lse, indices


@torch.library.register_fake("nsa::backward")
def _backward_fake(grad_out, q, k, v, k_win, v_win, k_cmp, v_cmp, gates, block_indices, out_branch, lse,
                   cu_seqlens, cu_seqlens_cmp, max_seqlen, cmp_block, cmp_stride, sel_block, num_selected,
                   num_init, num_local, window, scale, deterministic):
    def like(t):
        return torch.empty_like(t, memory_format=torch.contiguous_format) if t is not None else q.new_empty((0,))

    return like(q), like(k), like(v), like(k_win), like(v_win), like(k_cmp), like(v_cmp), like(gates)


def _setup_context(ctx, inputs, output):
    # inputs: the forward op's arguments, defaults filled in (deterministic last).
    (q, k, v, k_win, v_win, k_cmp, v_cmp, gates, _given, cu_seqlens, cu_seqlens_cmp, *settings) = inputs
    _out, out_branch, lse, indices = output
    ctx.save_for_backward(q, k, v, k_win, v_win, k_cmp, v_cmp, gates, indices, out_branch, lse, cu_seqlens,
                          cu_seqlens_cmp)
    ctx.settings = settings[:-2]  # max_seqlen .. scale (save_branch_outputs dropped)
    ctx.deterministic = bool(settings[-1])  # resolved by nsa_attention when it was called


def _backward(ctx, grad_out, _grad_out_branch, _grad_lse, _grad_indices):
    (q, k, v, k_win, v_win, k_cmp, v_cmp, gates, indices, out_branch, lse, cu_seqlens,
     cu_seqlens_cmp) = ctx.saved_tensors
    if out_branch.numel() == 0:
        raise RuntimeError("nsa: backward needs the forward's branch outputs; the forward ran without them "
                           "(was grad mode off?)")
    grads = torch.ops.nsa.backward(grad_out.contiguous(), q, k, v, k_win, v_win, k_cmp, v_cmp, gates, indices, out_branch, lse,
                                   cu_seqlens, cu_seqlens_cmp, *ctx.settings, ctx.deterministic)
    grad_q, grad_k, grad_v, grad_k_win, grad_v_win, grad_k_cmp, grad_v_cmp, grad_gates = grads
    # One entry per forward argument: the 8 tensors above, then block_indices .. deterministic.
    return (grad_q, grad_k, grad_v, grad_k_win if k_win is not None else None,
            grad_v_win if v_win is not None else None, grad_k_cmp, grad_v_cmp, grad_gates) + (None,) * 14


torch.library.register_autograd("nsa::forward", _backward, setup_context=_setup_context)


def _autocast(tensors: dict, device_type: str) -> dict:
    """Under autocast, floating inputs cast to the autocast dtype (float64 stays, as in torch's own autocast)."""
    if not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return {name: t.to(dtype) if t is not None and t.dtype in (torch.float32, torch.float16, torch.bfloat16) else t
            for name, t in tensors.items()}


def _check_config_ints(caller: str, config: dict) -> None:
    for name, value in config.items():
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"{caller}: {name} must be an int, got {value!r}")


def nsa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cmp: torch.Tensor, v_cmp: torch.Tensor,
                  gates: torch.Tensor, k_win: Optional[torch.Tensor] = None, v_win: Optional[torch.Tensor] = None,
                  block_indices: Optional[torch.Tensor] = None, *, cmp_block: int = 32, cmp_stride: int = 16,
                  sel_block: int = 64, num_selected: int = 16, num_init: int = 1, num_local: int = 2,
                  window: int = 512, scale: Optional[float] = None, cu_seqlens: Optional[torch.Tensor] = None,
                  cu_seqlens_cmp: Optional[torch.Tensor] = None, max_seqlen: Optional[int] = None,
                  return_indices: bool = False, deterministic: Optional[bool] = None):
    """Native Sparse Attention core: gated sum of compressed, selected and sliding-window attention.

    Shapes (padded): q [B, T, Hq, Dk]; k, k_win [B, T, Hkv, Dk]; v, v_win [B, T, Hkv, Dv];
    k_cmp [B, Tc, Hkv, Dk]; v_cmp [B, Tc, Hkv, Dv] with Tc = num_cmp_tokens(T); gates [B, T, Hq, 3]
    (cmp, slc, win); block_indices [B, T, Hkv, n] int32 (-1 padded) replaces the scoring.
    Packed varlen: drop B, pass cu_seqlens [N+1] int32 (cu_seqlens_cmp is derived when not given;
    max_seqlen, when not given, costs one device-to-host copy). Any Hq divisible by Hkv; the last
    dim of every tensor must be contiguous. Returns out [B, T, Hq, Dv], and the selected block
    indices [B, T, Hkv, n] if return_indices. Under autocast, floating inputs are cast to the
    autocast dtype.

    ``deterministic``: whether the backward of this call must give bitwise reproducible gradients
    (the CUDA backward then avoids floating-point atomics whose order varies; the CPU backward
    always is). None: ``torch.are_deterministic_algorithms_enabled()`` at the time of this call.
    The value is saved for the backward with the rest of the call's settings.
    """
    tensors = {"q": q, "k": k, "v": v, "k_win": k_win, "v_win": v_win, "k_cmp": k_cmp, "v_cmp": v_cmp,
               "gates": gates}
    for name, tensor in tensors.items():
        if tensor is not None and not isinstance(tensor, torch.Tensor):
            raise TypeError(f"nsa_attention: {name} must be a torch.Tensor, got {type(tensor).__name__}")
    _check_config_ints("nsa_attention", dict(cmp_block=cmp_block, cmp_stride=cmp_stride, sel_block=sel_block,
                                              num_selected=num_selected, num_init=num_init, num_local=num_local,
                                              window=window))
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    elif not isinstance(deterministic, bool):
        raise TypeError(f"nsa_attention: deterministic must be a bool or None, got {deterministic!r}")
    tensors = _autocast(tensors, q.device.type)
    if cu_seqlens is not None:
        if cu_seqlens_cmp is None:
            cu_seqlens_cmp = cmp_seqlens(cu_seqlens, cmp_block, cmp_stride)
        if max_seqlen is None:
            max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max().item()) if cu_seqlens.numel() > 1 else 0
    elif cu_seqlens_cmp is not None:
        raise ValueError("nsa_attention: cu_seqlens_cmp was given without cu_seqlens")
    save_branch_outputs = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in tensors.values())
    out, _out_branch, _lse, indices = torch.ops.nsa.forward(
        tensors["q"], tensors["k"], tensors["v"], tensors["k_win"], tensors["v_win"], tensors["k_cmp"],
        tensors["v_cmp"], tensors["gates"], block_indices, cu_seqlens, cu_seqlens_cmp,
        0 if max_seqlen is None else max_seqlen, cmp_block,
        cmp_stride, sel_block, num_selected, num_init, num_local, window, float(scale or 0.0), save_branch_outputs,
        deterministic)
    return (out, indices) if return_indices else out


@torch.library.register_fake("nsa::forward_kvcache")
def _forward_kvcache_fake(q, k_cache, v_cache, k_win_cache, v_win_cache, k_cmp_cache, v_cmp_cache, gates,
                          cache_seqlens, tokens_read, cmp_block, cmp_stride, sel_block, num_selected, num_init,
                          num_local, window, scale):
    batch, m, num_q_heads = q.shape[0], q.shape[1], q.shape[2]
    out = q.new_empty((batch, m, num_q_heads, v_cache.shape[-1]))
    indices = q.new_empty((batch, m, k_cache.shape[2], num_selected), dtype=torch.int32)
    return out, indices


def nsa_attention_kvcache(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, k_cmp_cache: torch.Tensor,
                          v_cmp_cache: torch.Tensor, gates: torch.Tensor, cache_seqlens: torch.Tensor,
                          config: Optional[NSAConfig] = None, k_win_cache: Optional[torch.Tensor] = None,
                          v_win_cache: Optional[torch.Tensor] = None, tokens_read: Optional[torch.Tensor] = None):
    """NSA attention of the m newest tokens of each sequence against its KV cache (decode: m = 1).

    Shapes: q [B, m, Hq, Dk] and gates [B, m, Hq, 3] for the new tokens; k_cache, k_win_cache
    [B, capacity, Hkv, Dk]; v_cache, v_win_cache [B, capacity, Hkv, Dv] (RoPE'd raw keys and values,
    the new tokens already appended; any strides with a contiguous last dim, e.g. a slot view of a
    larger cache); k_cmp_cache [B, cmp_capacity, Hkv, Dk], v_cmp_cache [B, cmp_capacity, Hkv, Dv];
    cache_seqlens [B] int32 on q's device: keys held per sequence after the append, so query i of
    sequence b sits at position cache_seqlens[b] - m + i, and the cache must hold that sequence's
    first num_cmp_tokens(cache_seqlens[b]) compressed tokens. Gives exactly what prefill gives at
    those positions (same selected blocks). tokens_read: optional int64 [B, 3] accumulator of the
    key rows each branch (cmp, slc, win) gathered, summed over kv heads. Returns out
    [B, m, Hq, Dv] and the selected block indices [B, m, Hkv, n] (int32, ascending, -1 padded).
    Inference only: no gradient flows through this op.
    """
    config = NSAConfig() if config is None else config
    if not isinstance(config, NSAConfig):
        raise TypeError(f"nsa_attention_kvcache: config must be an NSAConfig, got {type(config).__name__}")
    _check_config_ints("nsa_attention_kvcache", dict(cmp_block=config.cmp_block, cmp_stride=config.cmp_stride,
                                                      sel_block=config.sel_block, num_selected=config.num_selected,
                                                      num_init=config.num_init, num_local=config.num_local,
                                                      window=config.window))
    tensors = {"q": q, "k_cache": k_cache, "v_cache": v_cache, "k_win_cache": k_win_cache,
               "v_win_cache": v_win_cache, "k_cmp_cache": k_cmp_cache, "v_cmp_cache": v_cmp_cache, "gates": gates,
               "cache_seqlens": cache_seqlens}
    for name, tensor in tensors.items():
        if tensor is not None and not isinstance(tensor, torch.Tensor):
            raise TypeError(f"nsa_attention_kvcache: {name} must be a torch.Tensor, got {type(tensor).__name__}")
    new_tokens = _autocast({"q": q, "gates": gates}, q.device.type)
    return torch.ops.nsa.forward_kvcache(
        new_tokens["q"], k_cache, v_cache, k_win_cache, v_win_cache, k_cmp_cache, v_cmp_cache, new_tokens["gates"],
        cache_seqlens, tokens_read, config.cmp_block, config.cmp_stride, config.sel_block, config.num_selected,
        config.num_init, config.num_local, config.window, float(config.scale or 0.0))
