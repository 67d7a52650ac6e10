"""Brute-force NSA attention in plain PyTorch: the test oracle for ``nsa.nsa_attention``.

``nsa_attention_ref`` computes exactly what docs/semantics.md (DESIGN.md section 1) says, as
plainly as possible and sharing no code with the C++ core: one sequence at a time, an explicit
boolean mask per branch ([T, Tc] for the compressed branch, [T, T] for the window branch,
[Hkv, T, T] for the selected branch), a dense masked softmax per branch, the Eq. 9 weights as
an explicit overlap-count matrix [Tc, num_blocks] built from the token ranges, the Eq. 10 group
sum, and the top-n by a stable sort. It is differentiable through ordinary torch autograd.

It is meant for small problems only: memory and time grow as O(Hq * T^2) per sequence.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

__all__ = ["nsa_attention_ref"]


def _num_cmp_tokens(seqlen: int, cmp_block: int, cmp_stride: int) -> int:
    # Tc = T >= l ? (T - l) / d + 1 : 0 (the windows [i*d, i*d + l) that fit in the sequence).
    return (seqlen - cmp_block) // cmp_stride + 1 if seqlen >= cmp_block else 0


def _masked_attention(q, k, v, mask, scale):
    """Dense softmax attention with an explicit mask.

    q [T, H, Dk], k [S, H, Dk], v [S, H, Dv], mask [H or 1, T, S] (True: the key is seen).
    Returns the output [T, H, Dv] and the probabilities [H, T, S]. A row with no visible key gets
    probability 0 everywhere, hence output 0, and no NaN (also not in the gradients).
    """
    scores = torch.einsum("thd,shd->hts", q, k) * scale
    mask = mask.expand(scores.shape)
    scores = scores.masked_fill(~mask, float("-inf"))
    empty = ~mask.any(dim=-1, keepdim=True)
    scores = scores.masked_fill(empty, 0.0)  # any finite value; those rows are zeroed below
    probs = torch.softmax(scores, dim=-1) * mask
    out = torch.einsum("hts,shd->thd", probs, v)
    return out, probs


def _overlap_matrix(num_cmp: int, num_blocks: int, cmp_block: int, cmp_stride: int, sel_block: int, dtype):
    """Eq. 9 weights W[i, j] = |[i*d, i*d + l) ∩ [j*l', (j+1)*l')| / d, counted from the ranges."""
    weights = torch.zeros(num_cmp, num_blocks, dtype=dtype)
    for i in range(num_cmp):
        cmp_lo, cmp_hi = i * cmp_stride, i * cmp_stride + cmp_block
        for j in range(num_blocks):
            blk_lo, blk_hi = j * sel_block, (j + 1) * sel_block
            overlap = max(0, min(cmp_hi, blk_hi) - max(cmp_lo, blk_lo))
            weights[i, j] = overlap / cmp_stride
    return weights


def _select_blocks(q, k_cmp, num_kv_heads, cfg, scale):
    """Eqs. 8-12 for one sequence: the selected-block mask [Hkv, T, num_blocks] (no gradient).

    The scores are computed in float64 from detached inputs (the backends accumulate in at least
    fp32, the CPU one in fp64); the selection is not differentiated, as in the paper.
    """
    T, num_q_heads = q.shape[0], q.shape[1]
    G = num_q_heads // num_kv_heads
    num_cmp = k_cmp.shape[0]
    num_blocks = -(-T // cfg["sel_block"])  # blocks touching [0, T)
    dev = q.device
    t = torch.arange(T, device=dev).unsqueeze(1)  # [T, 1]
    with torch.no_grad():
        q64 = q.detach().to(torch.float64)
        k_cmp64 = k_cmp.detach().to(torch.float64).repeat_interleave(G, dim=1)  # [Tc, Hq, Dk]
        # Eq. 8: the cmp softmax over visible compressed tokens (strictly causal normalizer).
        i = torch.arange(num_cmp, device=dev).unsqueeze(0)
        visible = i * cfg["cmp_stride"] + cfg["cmp_block"] - 1 <= t  # [T, Tc]
        _, p_cmp = _masked_attention(q64, k_cmp64, k_cmp64, visible.unsqueeze(0), scale)  # [Hq, T, Tc]
        # Eq. 9 (overlap form) and Eq. 10 (sum over the G heads of a group).
        weights = _overlap_matrix(num_cmp, num_blocks, cfg["cmp_block"], cfg["cmp_stride"], cfg["sel_block"],
                                  torch.float64).to(dev)
        p_slc = p_cmp @ weights  # [Hq, T, num_blocks]
        P = p_slc.reshape(num_kv_heads, G, T, num_blocks).sum(dim=1)  # [Hkv, T, num_blocks]

    j = torch.arange(num_blocks, device=dev).unsqueeze(0)  # [1, num_blocks]
    current = t // cfg["sel_block"]  # [T, 1]
    eligible = j <= current  # [T, num_blocks]
    forced = (j < cfg["num_init"]) | ((current - j >= 0) & (current - j < cfg["num_local"]))
    forced = forced & eligible
    # Forced blocks first (+inf), then decreasing P; ineligible blocks last (-inf). The sort is
    # stable over ascending j, so equal keys keep the lower j first.
    key = torch.where(forced, torch.full_like(P, math.inf), P)
    key = torch.where(eligible, key, torch.full_like(P, -math.inf))
    order = torch.sort(-key, dim=-1, stable=True).indices  # [Hkv, T, num_blocks]
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(num_blocks, device=dev).expand_as(order).contiguous())
    count = torch.clamp(eligible.sum(dim=-1), max=cfg["num_selected"])  # [T]: min(n, eligible)
    selected = (rank < count.view(1, T, 1)) & eligible
    return selected


def _mask_from_indices(indices, num_blocks):
    """Selected-block mask [Hkv, T, num_blocks] from rows [T, Hkv, n] of block ids (-1 ignored)."""
    T, num_kv_heads, n = indices.shape
    idx = indices.to(torch.int64)
    if ((idx < -1) | (idx >= num_blocks)).any():
        raise ValueError("nsa_attention_ref: block_indices has entries outside [-1, num_blocks)")
    idx = torch.where(idx < 0, torch.full_like(idx, num_blocks), idx)  # -1 -> a spare column
    mask = torch.zeros(T, num_kv_heads, num_blocks + 1, dtype=torch.bool, device=idx.device)
    mask.scatter_(-1, idx, True)
    return mask[..., :num_blocks].permute(1, 0, 2)


def _indices_from_mask(selected, num_selected):
    """Rows [T, Hkv, n] int32: the selected blocks ascending, -1 padded."""
    num_kv_heads, T, num_blocks = selected.shape
    j = torch.arange(num_blocks, device=selected.device).expand(num_kv_heads, T, num_blocks)
    big = num_blocks + num_selected + 1
    ids = torch.where(selected, j, torch.full_like(j, big)).sort(dim=-1).values
    if num_blocks < num_selected:
        ids = torch.cat([ids, torch.full((num_kv_heads, T, num_selected - num_blocks), big, device=ids.device)], dim=-1)
    ids = ids[..., :num_selected]
    ids = torch.where(ids == big, torch.full_like(ids, -1), ids)
    return ids.permute(1, 0, 2).to(torch.int32).contiguous()


def _sequence(q, k, v, k_win, v_win, k_cmp, v_cmp, gates, given, cfg, scale):
    """One sequence: q [T, Hq, Dk] ... gates [T, Hq, 3]; given [T, Hkv, n] or None."""
    T, num_q_heads = q.shape[0], q.shape[1]
    num_kv_heads = k.shape[1]
    G = num_q_heads // num_kv_heads
    num_blocks = -(-T // cfg["sel_block"])
    dev = q.device
    t = torch.arange(T, device=dev).unsqueeze(1)  # [T, 1] query positions
    s = torch.arange(T, device=dev).unsqueeze(0)  # [1, T] key positions

    def per_q_head(x):  # [S, Hkv, D] -> [S, Hq, D]: query head h reads kv head h // G
        return x.repeat_interleave(G, dim=1)

    # cmp branch: compressed token i is visible to t iff i*d + l - 1 <= t.
    i = torch.arange(k_cmp.shape[0], device=dev).unsqueeze(0)
    cmp_mask = (i * cfg["cmp_stride"] + cfg["cmp_block"] - 1 <= t).unsqueeze(0)  # [1, T, Tc]
    o_cmp, _ = _masked_attention(q, per_q_head(k_cmp), per_q_head(v_cmp), cmp_mask, scale)

    # Selection: scoring + top-n, or the caller's blocks.
    if given is None:
        selected = _select_blocks(q, k_cmp, num_kv_heads, cfg, scale)  # [Hkv, T, num_blocks]
        indices = _indices_from_mask(selected, cfg["num_selected"])
    else:
        selected = _mask_from_indices(given, num_blocks)
        indices = given.clone()

    # slc branch: keys s <= t whose block s // l' is selected for (t, kv head).
    key_block = torch.arange(T, device=dev) // cfg["sel_block"]  # [T]
    slc_mask = (s <= t).unsqueeze(0) & selected[:, :, key_block]  # [Hkv, T, T]
    slc_mask = slc_mask.repeat_interleave(G, dim=0)  # [Hq, T, T]
    o_slc, _ = _masked_attention(q, per_q_head(k), per_q_head(v), slc_mask, scale)

    # win branch: keys max(0, t - w + 1) <= s <= t.
    win_mask = ((s <= t) & (s >= t - cfg["window"] + 1)).unsqueeze(0)  # [1, T, T]
    o_win, _ = _masked_attention(q, per_q_head(k_win), per_q_head(v_win), win_mask, scale)

    # Eq. 5: gated sum, gates (cmp, slc, win) as plain multipliers.
    out = gates[..., 0:1] * o_cmp + gates[..., 1:2] * o_slc + gates[..., 2:3] * o_win
    return out, indices


def nsa_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cmp: torch.Tensor, v_cmp: torch.Tensor,
                      gates: torch.Tensor, k_win: Optional[torch.Tensor] = None, v_win: Optional[torch.Tensor] = None,
                      block_indices: Optional[torch.Tensor] = None, *, cmp_block: int = 32, cmp_stride: int = 16,
                      sel_block: int = 64, num_selected: int = 16, num_init: int = 1, num_local: int = 2,
                      window: int = 512, scale: Optional[float] = None, cu_seqlens: Optional[torch.Tensor] = None,
                      return_indices: bool = False):
    """Brute-force NSA attention; same arguments and semantics as ``nsa.nsa_attention``.

    Shapes (padded): q [B, T, Hq, Dk]; k, k_win [B, T, Hkv, Dk]; v, v_win [B, T, Hkv, Dv];
    k_cmp [B, Tc, Hkv, Dk], v_cmp [B, Tc, Hkv, Dv] with Tc = num_cmp_tokens(T); gates [B, T, Hq, 3]
    (cmp, slc, win); block_indices [B, T, Hkv, n] (-1 padded, any order) replaces the scoring.
    Packed varlen: drop B and pass cu_seqlens [N+1]; k_cmp/v_cmp are packed too, sequence b owning
    num_cmp_tokens(len_b) rows. ``k_win``/``v_win`` default to ``k``/``v``; ``scale`` None (or 0)
    means 1/sqrt(Dk).

    Returns out [B, T, Hq, Dv] (or [total, Hq, Dv]) in the input dtype, plus the selected block
    indices [.., Hkv, n] int32 (ascending, -1 padded; the given ones, unchanged, when
    ``block_indices`` is passed) if ``return_indices``. Differentiable in q, k, v, k_win, v_win,
    k_cmp, v_cmp and gates through plain torch autograd; the selection is not differentiated (its
    scores are computed in float64 under no_grad from detached inputs).

    A test oracle for small sizes: it builds dense [Hq, T, T] masks and probabilities per sequence,
    i.e. O(Hq * T^2) memory and time, and loops over sequences in Python. Runs on the inputs'
    device, but is meant for CPU.
    """
    cfg = dict(cmp_block=cmp_block, cmp_stride=cmp_stride, sel_block=sel_block, num_selected=num_selected,
               num_init=num_init, num_local=num_local, window=window)
    if cmp_stride <= 0 or cmp_block <= 0 or sel_block <= 0:
        raise ValueError("nsa_attention_ref: cmp_block, cmp_stride and sel_block must be positive")
    if cmp_block % cmp_stride or sel_block % cmp_stride:
        raise ValueError("nsa_attention_ref: cmp_stride must divide cmp_block and sel_block")
    if num_selected < max(1, num_init + num_local) or num_init < 0 or num_local < 0 or window < 1:
        raise ValueError("nsa_attention_ref: need num_selected >= max(1, num_init + num_local), window >= 1")
    if q.shape[-2] % k.shape[-2]:
        raise ValueError("nsa_attention_ref: Hq must be a multiple of Hkv")
    if k_win is None:
        k_win = k
    if v_win is None:
        v_win = v
    if not scale:
        scale = 1.0 / math.sqrt(q.shape[-1])
    scale = float(scale)

    outs, indices = [], []
    if cu_seqlens is None:
        if q.dim() != 4:
            raise ValueError("nsa_attention_ref: q must be [B, T, Hq, Dk] without cu_seqlens")
        num_cmp = _num_cmp_tokens(q.shape[1], cmp_block, cmp_stride)
        if k_cmp.shape[1] != num_cmp or v_cmp.shape[1] != num_cmp:
            raise ValueError(f"nsa_attention_ref: k_cmp/v_cmp must have Tc = {num_cmp} tokens per sequence")
        for b in range(q.shape[0]):
            out, idx = _sequence(q[b], k[b], v[b], k_win[b], v_win[b], k_cmp[b], v_cmp[b], gates[b],
                                 None if block_indices is None else block_indices[b], cfg, scale)
            outs.append(out)
            indices.append(idx)
        out, idx = torch.stack(outs), torch.stack(indices)
    else:
        if q.dim() != 3:
            raise ValueError("nsa_attention_ref: with cu_seqlens, q must be packed [total, Hq, Dk]")
        bounds = [int(x) for x in cu_seqlens.tolist()]
        if bounds[0] != 0 or bounds[-1] != q.shape[0] or any(a > b for a, b in zip(bounds, bounds[1:])):
            raise ValueError("nsa_attention_ref: cu_seqlens must rise from 0 to the number of packed tokens")
        cmp_bounds = [0]
        for a, b in zip(bounds, bounds[1:]):
            cmp_bounds.append(cmp_bounds[-1] + _num_cmp_tokens(b - a, cmp_block, cmp_stride))
        if k_cmp.shape[0] != cmp_bounds[-1] or v_cmp.shape[0] != cmp_bounds[-1]:
            raise ValueError(f"nsa_attention_ref: k_cmp/v_cmp must have {cmp_bounds[-1]} packed compressed tokens")
        for (a, b), (ca, cb) in zip(zip(bounds, bounds[1:]), zip(cmp_bounds, cmp_bounds[1:])):
            out, idx = _sequence(q[a:b], k[a:b], v[a:b], k_win[a:b], v_win[a:b], k_cmp[ca:cb], v_cmp[ca:cb],
                                 gates[a:b], None if block_indices is None else block_indices[a:b], cfg, scale)
            outs.append(out)
            indices.append(idx)
        out, idx = torch.cat(outs), torch.cat(indices)
    return (out, idx) if return_indices else out
