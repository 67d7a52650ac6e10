"""``KVCache``: the KV cache of one attention layer, for decode and chunked prefill.

A thin wrapper of ``torch.classes.nsa.KvCache`` (torch/nsa_kv_cache.cpp), whose bookkeeping is
the C++ core's ``nsa::KvCacheBook`` (include/nsa/kv_cache.h). Usage: docs/decode.md.

A cache holds ``num_slots`` sequences (slots), each up to ``capacity`` tokens (grown by doubling,
contents kept, when an append needs more). Per slot it stores the RoPE'd raw keys and values
(``k``, ``v``; and ``k_win``, ``v_win`` when the window branch has its own), the compressed tokens
(``k_cmp``, ``v_cmp``), and phi's input (the cmp branch's raw keys and values) of the last l tokens,
which is all a compressed token that becomes due needs. One step of a layer:

    due = cache.append(slots, k, v, k_win, v_win, k_cmp_raw=..., v_cmp_raw=...)
    if due.num_due:                                   # a host-side count, no device sync
        cache.append_cmp(phi_k(due.k_blocks), phi_v(due.v_blocks))
    view = cache.view(slots)                           # tensors for nsa_attention_kvcache
    seqlens = cache.seqlens(slots)                     # int32 [B], keys held per slot

Appending position t makes compressed token i = (t+1-l)/d due when t+1 >= l and (t+1-l) % d == 0;
it compresses raw tokens [i*d, i*d + l) (DESIGN.md section 1). ``config=None`` gives a plain cache
(dense attention): only k and v.
"""

from __future__ import annotations

from typing import List, NamedTuple, Optional, Sequence

import torch

from .ops import NSAConfig


class DueTokens(NamedTuple):
    """The compressed tokens an append made due, ascending by (batch row, index)."""

    rows: torch.Tensor  # [N] int64: the batch row (index into the append's slots)
    indices: torch.Tensor  # [N] int64: compressed token index i within its slot
    k_blocks: torch.Tensor  # [N, l, Hkv, Dk]: phi's input keys, raw tokens [i*d, i*d + l)
    v_blocks: torch.Tensor  # [N, l, Hkv, Dv]

    @property
    def num_due(self) -> int:
        return self.k_blocks.shape[0]


class CacheView(NamedTuple):
    """A batch of slots' storage, in the shapes nsa_attention_kvcache takes (row b = slots[b])."""

    k: torch.Tensor  # [B, capacity, Hkv, Dk]
    v: torch.Tensor  # [B, capacity, Hkv, Dv]
    k_win: Optional[torch.Tensor]  # [B, capacity, Hkv, Dk], None without a separate window
    v_win: Optional[torch.Tensor]
    k_cmp: torch.Tensor  # [B, cmp_capacity, Hkv, Dk]
    v_cmp: torch.Tensor  # [B, cmp_capacity, Hkv, Dv]


def _slot_list(slots: Sequence[int]) -> List[int]:
    if isinstance(slots, torch.Tensor):
        raise TypeError("KVCache: slots must be a sequence of Python ints (host-side), not a tensor")
    return [int(s) for s in slots]


class KVCache:
    """The KV cache of one attention layer for ``num_slots`` sequences.

    Args:
        num_slots: sequences held (slots 0 .. num_slots-1).
        capacity: initial tokens per slot (>= 1); appends grow it by doubling when needed.
        num_kv_heads, head_dim_qk, head_dim_v: Hkv, Dk, Dv (Dv defaults to Dk).
        config: the NSAConfig of the attention op the cache serves (l and d decide when compressed
            tokens are due); None: a plain cache for dense attention (no compressed tokens).
        separate_window: the window branch has its own keys and values (k_win, v_win).
        dtype, device: of every stored tensor; appended tensors must match.
    """

    def __init__(self, num_slots: int, capacity: int, num_kv_heads: int, head_dim_qk: int,
                 head_dim_v: Optional[int] = None, *, config: Optional[NSAConfig] = None,
                 separate_window: bool = False, dtype: torch.dtype = torch.float32, device="cpu"):
        if config is not None and not isinstance(config, NSAConfig):
            raise TypeError(f"KVCache: config must be an NSAConfig or None, got {type(config).__name__}")
        self.config = config
        op = config or NSAConfig()  # a plain cache still hands the book a valid config
        self._impl = torch.classes.nsa.KvCache(
            num_slots, capacity, num_kv_heads, head_dim_qk, head_dim_qk if head_dim_v is None else head_dim_v,
            bool(separate_window), config is not None,
            [op.cmp_block, op.cmp_stride, op.sel_block, op.num_selected, op.num_init, op.num_local, op.window],
            dtype, torch.device(device))

    def append(self, slots: Sequence[int], k: torch.Tensor, v: torch.Tensor, k_win: Optional[torch.Tensor] = None,
               v_win: Optional[torch.Tensor] = None, *, k_cmp_raw: Optional[torch.Tensor] = None,
               v_cmp_raw: Optional[torch.Tensor] = None) -> DueTokens:
        """Appends m tokens to each slot of ``slots`` (distinct; batch row b to slots[b]).

        k, k_win, k_cmp_raw [B, m, Hkv, Dk]; v, v_win, v_cmp_raw [B, m, Hkv, Dv]. k_win/v_win iff
        the cache has a separate window; k_cmp_raw/v_cmp_raw (phi's input: the cmp branch's RoPE'd
        raw keys and its values) iff it has a config. Returns the compressed tokens now due; when
        there are any, store phi's outputs with ``append_cmp`` before the next append or view."""
        return DueTokens(*self._impl.append(_slot_list(slots), k, v, k_win, v_win, k_cmp_raw, v_cmp_raw))

    def append_cmp(self, k_cmp: torch.Tensor, v_cmp: torch.Tensor) -> None:
        """Stores phi's outputs k_cmp [N, Hkv, Dk], v_cmp [N, Hkv, Dv] for the last append's due tokens."""
        self._impl.append_cmp(k_cmp, v_cmp)

    def view(self, slots: Sequence[int]) -> CacheView:
        """The slots' storage for ``nsa_attention_kvcache`` (views when the slots step evenly upwards,
        e.g. range(B); a gathered copy otherwise)."""
        return CacheView(*self._impl.view(_slot_list(slots)))

    def seqlens(self, slots: Sequence[int]) -> torch.Tensor:
        """Tokens held per slot, int32 [B] on the cache's device (copied from the host, no device sync)."""
        return self._impl.seqlens(_slot_list(slots))

    def lengths(self) -> List[int]:
        """Tokens held per slot (host ints)."""
        return self._impl.lengths()

    def cmp_lengths(self) -> List[int]:
        """Compressed tokens held per slot (host ints)."""
        return self._impl.cmp_lengths()

    def reset(self, slot: int) -> None:
        """Empties ``slot`` for another sequence."""
        self._impl.reset(int(slot))

    def reserve(self, capacity: int) -> None:
        """Grows every slot to hold at least ``capacity`` tokens (contents kept)."""
        self._impl.reserve(int(capacity))

    @property
    def num_slots(self) -> int:
        return self._impl.num_slots()

    @property
    def capacity(self) -> int:
        return self._impl.capacity()

    @property
    def cmp_capacity(self) -> int:
        return self._impl.cmp_capacity()

    @property
    def compressed(self) -> bool:
        return self._impl.compressed()

    @property
    def separate_window(self) -> bool:
        return self._impl.separate_window()

    def __repr__(self) -> str:
        return (f"KVCache(num_slots={self.num_slots}, capacity={self.capacity}, compressed={self.compressed}, "
                f"separate_window={self.separate_window}, lengths={self.lengths()})")
