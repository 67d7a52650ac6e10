"""``NSAAttention``: a Native Sparse Attention layer built on the ``nsa_attention`` op.

The op (python/nsa/ops.py) is the attention core. Everything learnable lives here, in the
framework (DESIGN.md section 3): the projections, RoPE, the compression phi, the gate MLP and
the output projection. Semantics of the core: docs/semantics.md.

Data flow of one forward, with H = Hkv, padded shapes [B, T, ...] (packed: [total, ...]):

    x [B, T, dim]
      q_proj  -> q [B, T, Hq, Dk]                                   -> RoPE
      kv_proj -> per branch b in (cmp, slc[, win]): k_b [B, T, H, Dk] -> RoPE,  v_b [B, T, H, Dv]
      phi     -> k_cmp, v_cmp [B, Tc, H, D] from the blocks [i*d, i*d+l) of k_cmp-raw, v_cmp-raw
      gate    -> sigmoid(gate_proj(x)) [B, T, Hq, 3]  (cmp, slc, win), raised to gate_floor
      nsa_attention(q, k_slc, v_slc, k_cmp, v_cmp, gates, k_win, v_win) -> [B, T, Hq, Dv]
      o_proj  -> [B, T, dim]

Incremental mode (decode and chunked prefill, docs/decode.md): ``forward(x, cache=..., slots=...)``
with x [B, m, dim] the next m tokens of the sequences in ``slots`` of a ``KVCache``. The same
projections run at positions ``length + 0 .. m-1``; the keys and values are appended to the cache,
phi compresses the l raw tokens of every compressed token that became due (the cache keeps phi's
input for the last l tokens), and ``nsa_attention_kvcache`` attends the new queries to the cache:
the prefill result at those positions.
"""

from __future__ import annotations

import functools
import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .cache import KVCache
from .ops import NSAConfig, cmp_seqlens, nsa_attention, nsa_attention_kvcache, num_cmp_tokens

PHI_KINDS = ("avg", "linear", "mlp")
# The branches in the order of the gates' last dimension.
BRANCHES = ("cmp", "slc", "win")
STAT_NAMES = ("gate_mean_cmp", "gate_mean_slc", "gate_mean_win", "gate_entropy", "forced_fraction",
              "scored_fraction")


# --------------------------------------------------------------------------------------------
# RoPE and the compression gather: plain functions, shared by the padded and the packed path.


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float,
                 dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [..., 1, head_dim] for rotate-half RoPE at integer ``positions`` [...].

    Frequency k (k < head_dim/2) is theta^(-2k/head_dim); both halves of the head dim use the same
    frequencies. Computed in float64 for float64 ``dtype``, else float32. The trailing 1 broadcasts
    over heads.
    """
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, device=positions.device, dtype=compute) / head_dim)
    angles = positions.to(compute)[..., None] * inv_freq  # [..., head_dim/2]
    angles = torch.cat((angles, angles), dim=-1).unsqueeze(-2)  # [..., 1, head_dim]
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE: x [..., H, D] with cos/sin from ``rope_cos_sin``; returns x's dtype.

    Pairs (x[k], x[k + D/2]) are rotated by the angle of frequency k.
    """
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


def cmp_gather_index(starts: torch.Tensor, cmp_block: int) -> torch.Tensor:
    """Gather index [Tc, l] (int64): row i lists the raw-token rows ``starts[i] + 0 .. l-1``.

    ``starts`` [Tc] holds the first raw row of each compressed token: ``i * d`` for a padded
    sequence, ``cu_seqlens[b] + i * d`` for compressed token i of packed sequence b.
    """
    return starts.to(torch.int64)[:, None] + torch.arange(cmp_block, device=starts.device)


def gather_blocks(raw: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """raw [..., T, H, D] (token dim third from last), index [Tc, l] -> blocks [..., Tc, l, H, D]."""
    return raw.index_select(-3, index.flatten()).unflatten(-3, tuple(index.shape))


def strided_blocks(raw: torch.Tensor, cmp_block: int, cmp_stride: int) -> torch.Tensor:
    """raw [..., T, H, D] of padded sequences -> blocks [..., Tc, l, H, D], block i = raw tokens
    i*d .. i*d+l-1: gather_blocks with cmp_gather_index's padded index, as a view (unfold). Its
    backward sums the overlapping windows in place of index_add's atomic scatter."""
    if raw.shape[-3] < cmp_block:  # no block (a view of raw still, for autograd)
        empty = raw.narrow(-3, 0, 0).unsqueeze(-3)  # [..., 0, 1, H, D]
        return empty.expand(*empty.shape[:-3], cmp_block, *empty.shape[-2:])
    return raw.unfold(-3, cmp_block, cmp_stride).movedim(-1, -3)  # [..., Tc, H, D, l] -> [..., Tc, l, H, D]


class Compressor(nn.Module):
    """phi: blocks of l raw tokens [..., Tc, l, H, D] -> compressed tokens [..., Tc, H, D].

    ``avg``: the mean over the l tokens (no parameters). ``linear``: add a learnable intra-block
    position embedding [l, D], flatten the block to l*D and apply Linear(l*D -> D), shared across
    heads; initialized to the mean (zero embedding, weight [I/l ... I/l]) so it starts as ``avg``.
    ``mlp``: same input, Linear(l*D -> hidden) + GELU + Linear(hidden -> D) (default init).
    """

    def __init__(self, kind: str, block: int, dim: int, hidden: int):
        super().__init__()
        self.kind = kind
        if kind == "avg":
            self.pos_emb = None
            self.net = None
            return
        self.pos_emb = nn.Parameter(torch.zeros(block, dim))
        if kind == "linear":
            self.net = nn.Linear(block * dim, dim)
            with torch.no_grad():
                self.net.weight.copy_(torch.eye(dim).repeat(1, block) / block)
                self.net.bias.zero_()
        else:
            self.net = nn.Sequential(nn.Linear(block * dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, blocks: torch.Tensor) -> torch.Tensor:
        if self.net is None:
            return blocks.mean(dim=-3)
        if self.kind == "linear":
            # Linear(vec(block + pos_emb)) = Linear(vec(block)) + W vec(pos_emb): the embedding's share is
            # one vector, folded into the bias, rather than an add over every block (in float32 under
            # autocast, the embedding being float32) and a gradient summed back over all of them.
            bias = torch.addmv(self.net.bias, self.net.weight, self.pos_emb.flatten())
            return nn.functional.linear(blocks.movedim(-3, -2).flatten(-2), self.net.weight, bias)
        blocks = blocks + self.pos_emb[:, None, :]  # [l, 1, D]: same embedding for every head
        return self.net(blocks.movedim(-3, -2).flatten(-2))  # [..., Tc, H, l*D] -> [..., Tc, H, D]

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}"


def selection_distill_loss(q: torch.Tensor, k_slc: torch.Tensor, k_cmp: torch.Tensor, config: Dict[str, int],
                           num_positions: int) -> torch.Tensor:
    """KL(target || ranking), averaged over sequences, kv heads and sampled positions: a gradient for
    the selection's ranking, which top-n leaves without one (docs/training.md, "Why NSA does not
    retrieve here").

    q [B, T, Hq, Dk], k_slc [B, T, Hkv, Dk], k_cmp [B, Tc, Hkv, Dk] (RoPE'd, padded sequences). At
    ``num_positions`` positions t spread evenly over [n l', T) (before n l' every eligible block is
    selected), per kv head:
      - the ranking: Eqs. 8-10, the compressed branch's attention summed per block and over the G
        heads, as the selection ranks blocks;
      - the target: the mass per block of the selected branch's attention over every key <= t (its
        queries and keys, dense), summed over the G heads: where that branch would look if it could
        see everything (as DeepSeek-V3.2 trains its indexer toward the main attention);
    both over the blocks the ranking decides (eligible, not forced initial or local, overlapped by a
    visible compressed token), normalized; zero where it decides none (n = n_init + n_local).
    Only k_cmp carries the gradient: q and the target are detached (NSAAttention passes compressed
    keys made from its detached input, so that only the compressed keys' projection and phi learn
    from it). Computed in float32 whatever the inputs' dtype.
    """
    l, d, ls = config["cmp_block"], config["cmp_stride"], config["sel_block"]
    B, T, num_q_heads, head_dim = q.shape
    num_kv_heads, num_cmp = k_slc.shape[-2], k_cmp.shape[-3]
    first = max(config["num_selected"] * ls, l - 1)  # (and some compressed token visible)
    free = config["num_selected"] > config["num_init"] + config["num_local"]  # slots the ranking fills
    if T <= first or num_cmp == 0 or num_positions <= 0 or not free:
        return k_cmp.sum() * 0  # (a zero that keeps k_cmp in the graph)
    dev = q.device
    # fp32 throughout, also under autocast (whose matmuls would round the scores to bf16).
    with torch.autocast(dev.type, enabled=False):
        t = torch.linspace(first, T - 1, min(num_positions, T - first), device=dev).round().long()  # [S]
        num_blocks = -(-T // ls)
        scale = head_dim ** -0.5
        group = num_q_heads // num_kv_heads
        qs = q.detach()[:, t].unflatten(2, (num_kv_heads, group)).float()  # [B, S, Hkv, G, Dk]
        with torch.no_grad():
            logits = torch.einsum("bshgd,bkhd->bshgk", qs, k_slc.detach().float()) * scale  # [B, S, Hkv, G, T]
            future = torch.arange(T, device=dev) > t[:, None]  # [S, T]
            logits = logits.masked_fill(future[None, :, None, None], float("-inf"))
            mass = nn.functional.pad(logits.softmax(-1), (0, num_blocks * ls - T))
            target = mass.unflatten(-1, (num_blocks, ls)).sum(dim=(-1, 3))  # [B, S, Hkv, blocks]
        scores = torch.einsum("bshgd,bchd->bshgc", qs, k_cmp.float()) * scale  # [B, S, Hkv, G, Tc]
        cmp_start = torch.arange(num_cmp, device=dev) * d
        visible = cmp_start + l - 1 <= t[:, None]  # [S, Tc]
        scores = scores.masked_fill(~visible[None, :, None, None], float("-inf"))
        block_start = torch.arange(num_blocks, device=dev) * ls
        overlap = (torch.minimum(cmp_start[:, None] + l, block_start[None] + ls)
                   - torch.maximum(cmp_start[:, None], block_start[None])).clamp(min=0).float() / d  # Eq. 9
        ranking = scores.softmax(-1).sum(dim=3) @ overlap  # [B, S, Hkv, blocks]
        current = (t // ls)[:, None]  # [S, 1]
        j = torch.arange(num_blocks, device=dev)
        decided = (j <= current) & ~forced_blocks(j, current, config)  # [S, blocks]
        decided = (decided & ((visible.float() @ (overlap > 0).float()) > 0))[None, :, None]
        target = torch.where(decided, target, 0)
        target = target / target.sum(-1, keepdim=True).clamp(min=1e-30)
        ranking = torch.where(decided, ranking, 0)
        ranking = ranking / ranking.sum(-1, keepdim=True).clamp(min=1e-30)
        kl = torch.xlogy(target, target) - target * ranking.clamp(min=1e-30).log()
        return kl.sum(-1).mean()


# --------------------------------------------------------------------------------------------
# Incremental mode (decode and chunked prefill), shared with DenseAttention (model.py).


def cached_positions(cache: KVCache, x: torch.Tensor, slots: Optional[Sequence[int]], caller: str):
    """Where the next m tokens x [B, m, dim] of the sequences in ``slots`` (default 0 .. B-1) of
    ``cache`` go: (slots as a list, start [B] int32 = tokens held before them, positions [B, m]
    int64), without a device sync (the lengths are the cache's host-side ones)."""
    if x.dim() != 3:
        raise ValueError(f"{caller}: with a cache, x must be [B, m, dim], got shape {tuple(x.shape)}")
    slots = list(range(x.shape[0])) if slots is None else list(slots)
    if len(slots) != x.shape[0]:
        raise ValueError(f"{caller}: slots lists {len(slots)} slots but x has {x.shape[0]} rows")
    start = cache.seqlens(slots)
    positions = start[:, None].to(torch.int64) + torch.arange(x.shape[1], device=x.device)
    return slots, start, positions


# --------------------------------------------------------------------------------------------
# The layer.


def _require(condition: bool, name: str, message: str) -> None:
    if not condition:
        raise ValueError(f"NSAAttention: {name} {message}")


def _require_int(name: str, value, minimum: int) -> None:
    _require(isinstance(value, int) and not isinstance(value, bool) and value >= minimum, name,
             f"must be an int >= {minimum}, got {value!r}")


def _check_op_config(config: Dict[str, int]) -> None:
    """The op's config (l, d, l', n, n_init, n_local, w) as NSAAttention takes it: raises ValueError."""
    for name, minimum in (("cmp_block", 1), ("cmp_stride", 1), ("sel_block", 1), ("num_selected", 1),
                          ("num_init", 0), ("num_local", 0), ("window", 1)):
        _require_int(name, config[name], minimum)
    l, d, ls = config["cmp_block"], config["cmp_stride"], config["sel_block"]
    _require(l % d == 0, "cmp_stride", f"({d}) must divide cmp_block ({l})")
    _require(ls % d == 0, "cmp_stride", f"({d}) must divide sel_block ({ls})")
    n, n_init, n_local = config["num_selected"], config["num_init"], config["num_local"]
    _require(n >= n_init + n_local, "num_selected", f"({n}) must be >= num_init + num_local ({n_init} + {n_local})")


def forced_blocks(blocks: torch.Tensor, current: torch.Tensor, config: Dict[str, int]) -> torch.Tensor:
    """Whether block ``blocks`` is forced for a query in block ``current`` (broadcast): one of the
    num_init initial blocks or the num_local blocks ending at the query's own."""
    return (blocks < config["num_init"]) | (blocks > current - config["num_local"])


class NSAAttention(nn.Module):
    """Native Sparse Attention layer (Yuan et al., 2025): self-attention over x, causal.

    Args:
        dim: model width of x and of the output.
        num_q_heads, num_kv_heads: Hq query heads, Hkv KV heads (GQA), Hq % Hkv == 0.
        head_dim_qk: Dk (default dim // num_q_heads), even (RoPE).
        head_dim_v: Dv (default Dk).
        cmp_block, cmp_stride, sel_block, num_selected, num_init, num_local, window: the op's
            config (l, d, l', n, n_init, n_local, w; docs/semantics.md section 1).
        phi: the compression, "avg" | "linear" | "mlp" (see ``Compressor``).
        phi_hidden: hidden width of the "mlp" phi (default l * Dk for keys, l * Dv for values).
        share_window_kv: the window branch reuses the selection branch's keys and values instead
            of its own projection (the paper uses independent ones: the default).
        rope_theta: RoPE base.
        bias: bias in the q, k/v and output projections (phi and the gate always have one).
        gate_floor: lower bound of every branch's gate, g = floor + (1 - floor) * sigmoid(z), in
            [0, 1) (0: the paper's sigmoid gate). The blocks the selected branch reads are ranked
            by the compressed branch's attention, whose keys learn only through that branch's gated
            output: in m7c-125m runs its gate closed to 0.005 within 400 steps (docs/training.md),
            and a floor keeps it in the gradient.
        cmp_gate_bias: the initial bias of the compressed branch's gate logit in every head (None:
            nn.Linear's default initialization, as for the other gates). A negative value starts that
            branch nearly shut (sigmoid(-3) = 0.047): its early output, an average over blurred blocks,
            delayed the forming of copy (induction) heads in tiny CPU models (from step 175 instead of
            125; docs/training.md, "The compressed branch at initialization"); the gate opens where the
            branch helps. Its keys then get little gradient through the output (pair it with
            selection_distill, which trains the ranking apart from the gate).
        selection_distill: positions per sequence at which a training forward (padded batches,
            grad enabled) computes ``aux_loss``, the ``selection_distill_loss`` of its q, selected
            branch keys and compressed keys (0: none, the paper's training). Add it, weighted, to
            the loss to train the selection's ranking toward where the selected branch would look.
        collect_stats: after each forward, ``last_stats`` holds gate and selection statistics.

    Parameters: ``q_proj`` dim -> Hq*Dk; ``kv_proj`` dim -> all branches' keys then all values,
    one matmul (``kv_branches`` = ("cmp", "slc", "win") or ("cmp", "slc")); ``compress_k``,
    ``compress_v`` (phi); ``gate_proj`` dim -> Hq*3; ``o_proj`` Hq*Dv -> dim.

    RoPE (rotate-half, positions 0-based per sequence) is applied to q and to the keys of every
    branch before the op; phi compresses the RoPE'd raw keys of the cmp branch.

    Incremental mode: ``new_cache`` makes a ``KVCache`` for this layer; ``forward(x, cache=cache,
    slots=slots)`` continues those sequences (module docstring, docs/decode.md).
    """

    def __init__(self, dim: int, num_q_heads: int, num_kv_heads: int, head_dim_qk: Optional[int] = None,
                 head_dim_v: Optional[int] = None, *, cmp_block: int = 32, cmp_stride: int = 16,
                 sel_block: int = 64, num_selected: int = 16, num_init: int = 1, num_local: int = 2,
                 window: int = 512, phi: str = "avg", phi_hidden: Optional[int] = None,
                 share_window_kv: bool = False, rope_theta: float = 10000.0, bias: bool = False,
                 gate_floor: float = 0.0, cmp_gate_bias: Optional[float] = None, selection_distill: int = 0,
                 collect_stats: bool = False):
        super().__init__()
        for name, value in (("dim", dim), ("num_q_heads", num_q_heads), ("num_kv_heads", num_kv_heads)):
            _require_int(name, value, 1)
        op_config = dict(cmp_block=cmp_block, cmp_stride=cmp_stride, sel_block=sel_block, num_selected=num_selected,
                         num_init=num_init, num_local=num_local, window=window)
        _check_op_config(op_config)
        _require(num_q_heads % num_kv_heads == 0, "num_q_heads",
                 f"({num_q_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        head_dim_qk = dim // num_q_heads if head_dim_qk is None else head_dim_qk
        head_dim_v = head_dim_qk if head_dim_v is None else head_dim_v
        _require_int("head_dim_qk", head_dim_qk, 1)
        _require(head_dim_qk % 2 == 0, "head_dim_qk", f"must be even for RoPE, got {head_dim_qk}")
        _require_int("head_dim_v", head_dim_v, 1)
        _require(phi in PHI_KINDS, "phi", f"must be one of {PHI_KINDS}, got {phi!r}")
        if phi_hidden is not None:
            _require_int("phi_hidden", phi_hidden, 1)
        _require(isinstance(rope_theta, (int, float)) and math.isfinite(rope_theta) and rope_theta > 0,
                 "rope_theta", f"must be a finite number > 0, got {rope_theta!r}")
        _require(isinstance(gate_floor, (int, float)) and 0 <= gate_floor < 1, "gate_floor",
                 f"must be a number in [0, 1), got {gate_floor!r}")
        is_number = isinstance(cmp_gate_bias, (int, float)) and not isinstance(cmp_gate_bias, bool)
        _require(cmp_gate_bias is None or (is_number and math.isfinite(cmp_gate_bias)), "cmp_gate_bias",
                 f"must be None or a finite number, got {cmp_gate_bias!r}")
        _require_int("selection_distill", selection_distill, 0)

        self.dim, self.num_q_heads, self.num_kv_heads = dim, num_q_heads, num_kv_heads
        self.head_dim_qk, self.head_dim_v = head_dim_qk, head_dim_v
        self.op_config = op_config
        self.phi = phi
        self.share_window_kv = bool(share_window_kv)
        self.rope_theta = float(rope_theta)
        self.gate_floor = float(gate_floor)
        self.selection_distill = selection_distill
        # The last training forward's selection_distill_loss (None: off, or not a training forward).
        self.aux_loss: Optional[torch.Tensor] = None
        # Branches whose gate is held at 0 (set_branches_off: a diagnostic, e.g. nsa.evals --branch-off).
        self.branches_off: Tuple[str, ...] = ()
        self.collect_stats = bool(collect_stats)
        self.kv_branches = ("cmp", "slc") if self.share_window_kv else ("cmp", "slc", "win")

        nb = len(self.kv_branches)
        self.q_proj = nn.Linear(dim, num_q_heads * head_dim_qk, bias=bias)
        self.kv_proj = nn.Linear(dim, nb * num_kv_heads * (head_dim_qk + head_dim_v), bias=bias)
        self.compress_k = Compressor(phi, cmp_block, head_dim_qk, phi_hidden or cmp_block * head_dim_qk)
        self.compress_v = Compressor(phi, cmp_block, head_dim_v, phi_hidden or cmp_block * head_dim_v)
        self.gate_proj = nn.Linear(dim, num_q_heads * 3)
        if cmp_gate_bias is not None:
            with torch.no_grad():
                self.gate_proj.bias.view(num_q_heads, 3)[:, BRANCHES.index("cmp")] = float(cmp_gate_bias)
        self.o_proj = nn.Linear(num_q_heads * head_dim_v, dim, bias=bias)
        self._stats: Optional[torch.Tensor] = None

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_q_heads={self.num_q_heads}, num_kv_heads={self.num_kv_heads}, "
                f"head_dim_qk={self.head_dim_qk}, head_dim_v={self.head_dim_v}, phi={self.phi!r}, "
                f"share_window_kv={self.share_window_kv}, rope_theta={self.rope_theta}, "
                + ", ".join(f"{k}={v}" for k, v in self.op_config.items()))

    # ---- layout of packed sequences: positions and the compression gather index -------------

    def _packed_layout(self, cu_seqlens: torch.Tensor, total: int, max_seqlen: Optional[int]):
        """positions [total], gather index [total_cmp, l], cu_seqlens_cmp [N+1], max_seqlen.

        Reads cu_seqlens on the host once (``tolist``): the number of compressed tokens sizes a
        tensor. Everything else is computed on cu_seqlens's device.
        """
        if cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
            raise ValueError(f"NSAAttention: cu_seqlens must be int32 [N+1] with N >= 1, got "
                             f"{cu_seqlens.dtype} {tuple(cu_seqlens.shape)}")
        l, d = self.op_config["cmp_block"], self.op_config["cmp_stride"]
        bounds = cu_seqlens.tolist()  # the one host sync of the packed path
        lengths = [end - start for start, end in zip(bounds, bounds[1:])]
        if bounds[0] != 0 or bounds[-1] != total or min(lengths) < 0:
            raise ValueError(f"NSAAttention: cu_seqlens must rise from 0 to the {total} rows of x, got {bounds}")
        if max_seqlen is None:
            max_seqlen = max(lengths)
        elif max_seqlen < max(lengths):
            raise ValueError(f"NSAAttention: max_seqlen ({max_seqlen}) is below the longest sequence ({max(lengths)})")
        total_cmp = sum(num_cmp_tokens(n, l, d) for n in lengths)

        device = cu_seqlens.device
        cu = cu_seqlens.to(torch.int64)
        cu_seqlens_cmp = cmp_seqlens(cu_seqlens, l, d)
        cu_cmp = cu_seqlens_cmp.to(torch.int64)
        seq_ids = torch.arange(len(lengths), device=device)
        token_seq = torch.repeat_interleave(seq_ids, cu.diff(), output_size=total)
        positions = torch.arange(total, device=device) - cu[token_seq]
        cmp_seq = torch.repeat_interleave(seq_ids, cu_cmp.diff(), output_size=total_cmp)
        starts = cu[cmp_seq] + (torch.arange(total_cmp, device=device) - cu_cmp[cmp_seq]) * d
        return positions, cmp_gather_index(starts, l), cu_seqlens_cmp, max_seqlen

    # ---- forward -----------------------------------------------------------------------------

    def _keys_values(self, x: torch.Tensor, cos: torch.Tensor,
                     sin: torch.Tensor) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        """Per branch of ``kv_branches``: RoPE'd keys [..., Hkv, Dk] and values [..., Hkv, Dv]."""
        nb, h = len(self.kv_branches), self.num_kv_heads
        kv = self.kv_proj(x)
        keys, values = kv.split((nb * h * self.head_dim_qk, nb * h * self.head_dim_v), dim=-1)
        keys = self._rope_keys(keys, cos, sin)  # all branches at once
        values = values.unflatten(-1, (nb * h, self.head_dim_v))
        return list(keys.split(h, dim=-2)), list(values.split(h, dim=-2))

    def _rope_keys(self, keys: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Flat keys [..., heads * Dk] -> RoPE'd [..., heads, Dk]."""
        return apply_rope(keys.unflatten(-1, (-1, self.head_dim_qk)), cos, sin)

    def _project(self, x: torch.Tensor, positions: torch.Tensor):
        """At integer ``positions`` (x's leading dims): RoPE'd q [..., Hq, Dk], the per-branch keys and
        values of ``_keys_values``, the gate logits [..., Hq, 3] and the RoPE tables (cos, sin) used."""
        cos, sin = rope_cos_sin(positions, self.head_dim_qk, self.rope_theta, x.dtype)
        q = apply_rope(self.q_proj(x).unflatten(-1, (self.num_q_heads, self.head_dim_qk)), cos, sin)
        keys, values = self._keys_values(x, cos, sin)
        gate_logits = self.gate_proj(x).unflatten(-1, (self.num_q_heads, 3))
        return q, keys, values, gate_logits, (cos, sin)

    def forward(self, x: torch.Tensor, cu_seqlens: Optional[torch.Tensor] = None,
                max_seqlen: Optional[int] = None, *, cache: Optional[KVCache] = None,
                slots: Optional[Sequence[int]] = None) -> torch.Tensor:
        """x [B, T, dim] (padded: every row a sequence of T tokens) -> [B, T, dim]; or packed
        x [total, dim] with cu_seqlens int32 [N+1] (sequence b is rows cu_seqlens[b] ..
        cu_seqlens[b+1]-1) -> [total, dim]; or, with ``cache``, the next m tokens x [B, m, dim] of
        the sequences in ``slots`` (see ``forward_cached``).

        The padded path makes no host sync (and traces with torch.compile(fullgraph=True)); the
        packed path reads cu_seqlens on the host once per call, to size the compressed tokens.
        ``max_seqlen`` (packed only) is checked against, not trusted blindly.
        """
        self.aux_loss = None
        if cache is not None:
            if cu_seqlens is not None:
                raise ValueError("NSAAttention: cache and cu_seqlens cannot be combined (a cache holds padded slots)")
            return self.forward_cached(x, cache, slots)
        if slots is not None:
            raise ValueError("NSAAttention: slots were given without a cache")
        if cu_seqlens is None:
            if x.dim() != 3:
                raise ValueError(f"NSAAttention: x must be [B, T, dim] (or [total, dim] with cu_seqlens), "
                                 f"got shape {tuple(x.shape)}")
            positions = torch.arange(x.shape[1], device=x.device)  # no host sync
            l, d = self.op_config["cmp_block"], self.op_config["cmp_stride"]
            blocks_of = functools.partial(strided_blocks, cmp_block=l, cmp_stride=d)
            varlen = {}
        else:
            if x.dim() != 2:
                raise ValueError(f"NSAAttention: with cu_seqlens, x must be packed [total, dim], "
                                 f"got shape {tuple(x.shape)}")
            positions, gather_index, cu_seqlens_cmp, max_seqlen = self._packed_layout(
                cu_seqlens, x.shape[0], max_seqlen)
            blocks_of = functools.partial(gather_blocks, index=gather_index)
            varlen = dict(cu_seqlens=cu_seqlens, cu_seqlens_cmp=cu_seqlens_cmp, max_seqlen=max_seqlen)

        q, keys, values, gate_logits, rope = self._project(x, positions)
        k_cmp = self.compress_k(blocks_of(keys[0]))
        v_cmp = self.compress_v(blocks_of(values[0]))
        if self.selection_distill > 0 and self.training and torch.is_grad_enabled():
            if cu_seqlens is not None:
                raise ValueError("NSAAttention: selection_distill supports padded batches [B, T, dim] only, "
                                 "not packed sequences")
            self.aux_loss = selection_distill_loss(q, keys[1], self._ranking_keys(x, rope, blocks_of),
                                                   self.op_config, self.selection_distill)
        k_win, v_win = (None, None) if self.share_window_kv else (keys[2], values[2])
        gates = self._gates(gate_logits)

        result = nsa_attention(q, keys[1], values[1], k_cmp, v_cmp, gates, k_win, v_win, **self.op_config,
                               **varlen, return_indices=self.collect_stats)
        if self.collect_stats:
            out, indices = result
            self._record_stats(gate_logits, indices, positions)
        else:
            out = result
        return self.o_proj(out.flatten(-2))

    # ---- incremental mode: decode and chunked prefill ----------------------------------------

    @property
    def nsa_config(self) -> NSAConfig:
        """The op's config as an NSAConfig (what the KV cache and nsa_attention_kvcache take)."""
        return NSAConfig(**self.op_config)

    def new_cache(self, num_slots: int, capacity: int, *, dtype: Optional[torch.dtype] = None,
                  device=None) -> KVCache:
        """A KVCache for this layer: ``num_slots`` sequences of initial ``capacity`` tokens (grown on
        demand). dtype/device default to the layer's parameters'; under autocast pass the autocast
        dtype (the cache stores what the projections return)."""
        weight = self.q_proj.weight
        return KVCache(num_slots, capacity, self.num_kv_heads, self.head_dim_qk, self.head_dim_v,
                       config=self.nsa_config, separate_window=not self.share_window_kv,
                       dtype=dtype or weight.dtype, device=weight.device if device is None else device)

    @torch.no_grad()
    def forward_cached(self, x: torch.Tensor, cache: KVCache, slots: Optional[Sequence[int]] = None) -> torch.Tensor:
        """x [B, m, dim]: the next m tokens of the sequences in ``slots`` (B distinct slots of
        ``cache``; default 0 .. B-1), which may hold different lengths. Appends them to the cache and
        returns [B, m, dim]: what the prefill of each whole sequence gives at those positions.

        Inference only (runs without autograd). No device sync: the positions come from the cache's
        host-side lengths.
        """
        if not isinstance(cache, KVCache):
            raise TypeError(f"NSAAttention: cache must be an nsa.KVCache, got {type(cache).__name__}")
        if cache.config != self.nsa_config or cache.separate_window != (not self.share_window_kv):
            raise ValueError(f"NSAAttention: the cache was made for another layer configuration ({cache}); "
                             f"make it with new_cache")
        slots, start, positions = cached_positions(cache, x, slots, "NSAAttention")
        q, keys, values, gate_logits, _ = self._project(x, positions)
        k_win, v_win = (None, None) if self.share_window_kv else (keys[2], values[2])
        due = cache.append(slots, keys[1], values[1], k_win, v_win, k_cmp_raw=keys[0], v_cmp_raw=values[0])
        if due.num_due:
            cache.append_cmp(self.compress_k(due.k_blocks), self.compress_v(due.v_blocks))
        view = cache.view(slots)
        out, indices = nsa_attention_kvcache(q, view.k, view.v, view.k_cmp, view.v_cmp, self._gates(gate_logits),
                                             start + x.shape[1], self.nsa_config, view.k_win, view.v_win)
        if self.collect_stats:
            self._record_stats(gate_logits, indices, positions)
        return self.o_proj(out.flatten(-2))

    def _ranking_keys(self, x: torch.Tensor, rope: Tuple[torch.Tensor, torch.Tensor], blocks_of) -> torch.Tensor:
        """The compressed keys [..., Tc, Hkv, Dk] again, from x detached (the cmp branch's keys are
        kv_proj's first Hkv * Dk rows: _keys_values): the selection distillation's gradient reaches
        their projection and phi, not the layer's input or anything before it."""
        rows = slice(0, self.num_kv_heads * self.head_dim_qk)
        bias = None if self.kv_proj.bias is None else self.kv_proj.bias[rows]
        raw = nn.functional.linear(x.detach(), self.kv_proj.weight[rows], bias)
        return self.compress_k(blocks_of(self._rope_keys(raw, *rope)))

    def update_op_config(self, **changes: int) -> None:
        """Changes the op's config (keys of ``op_config``) from the next forward on, checked as the
        constructor checks it; nothing changes if the result is refused."""
        unknown = sorted(set(changes) - set(self.op_config))
        _require(not unknown, "op_config", f"has no {unknown}; its keys are {sorted(self.op_config)}")
        config = dict(self.op_config, **changes)
        _check_op_config(config)
        self.op_config = config

    def set_branches_off(self, branches: Sequence[str]) -> None:
        """Holds the gates of ``branches`` (names in BRANCHES) at 0 from the next forward on, so that
        the output is the other branches' alone: which branch carries what the layer does (e.g.
        nsa.evals --branch-off). An empty sequence restores the learned gates."""
        unknown = [b for b in branches if b not in BRANCHES]
        _require(not unknown, "branches", f"must be names in {BRANCHES}, got {list(branches)!r}")
        self.branches_off = tuple(b for b in BRANCHES if b in branches)

    def _gates(self, gate_logits: torch.Tensor) -> torch.Tensor:
        """The branch gates [..., Hq, 3] from their logits: sigmoid, raised to gate_floor; 0 for the
        branches_off."""
        gates = torch.sigmoid(gate_logits)
        gates = gates if self.gate_floor == 0 else self.gate_floor + (1 - self.gate_floor) * gates
        if self.branches_off:
            gates = torch.stack([torch.zeros_like(g) if b in self.branches_off else g
                                 for b, g in zip(BRANCHES, gates.unbind(-1))], dim=-1)
        return gates

    # ---- statistics --------------------------------------------------------------------------

    @torch.no_grad()
    def _record_stats(self, gate_logits: torch.Tensor, indices: torch.Tensor, positions: torch.Tensor) -> None:
        """Stores the statistics of one forward as one tensor (no host sync; ``last_stats`` reads it).

        gate_logits [..., T, Hq, 3]; indices [..., T, Hkv, n] int32 (-1 padded); positions [T] (packed:
        [total], with indices [total, Hkv, n]; incremental: [B, m], with indices [B, m, Hkv, n]).
        """
        z = gate_logits.detach().double()
        sigmoid = torch.sigmoid(z)
        # Binary entropy of sigmoid(z), stable form: p*softplus(-z) + (1-p)*softplus(z).
        entropy = sigmoid * nn.functional.softplus(-z) + (1 - sigmoid) * nn.functional.softplus(z)
        gate_means = self._gates(z).flatten(0, -2).mean(dim=0)  # (cmp, slc, win)

        current = (positions // self.op_config["sel_block"])[..., None, None]  # block of t, [..., T, 1, 1]
        forced = forced_blocks(indices, current, self.op_config)
        valid = indices >= 0
        num_valid = valid.sum().clamp(min=1).double()
        forced_fraction = (forced & valid).sum().double() / num_valid
        scored_fraction = (~forced & valid).sum().double() / num_valid
        self._stats = torch.cat((gate_means, entropy.mean()[None], forced_fraction[None], scored_fraction[None]))

    @property
    def last_stats(self) -> Optional[Dict[str, float]]:
        """Statistics of the last forward (None before the first one or without collect_stats):
        gate_mean_cmp/slc/win (mean gate per branch, gate_floor included), gate_entropy (mean binary
        entropy of the gates' sigmoids, in [0, ln 2]), forced_fraction / scored_fraction (share of the selected blocks,
        -1 padding excluded, that were forced as initial or local vs chosen by score). Reading it
        copies the numbers to the host."""
        if self._stats is None:
            return None
        return dict(zip(STAT_NAMES, self._stats.tolist()))
