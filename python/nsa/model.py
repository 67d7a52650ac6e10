"""Decoder-only byte-level language model for the training showcase, with NSA or dense attention.

    tokens [B, T] (bytes, vocab 256)
      tok_emb -> x [B, T, dim]
      n_layers x Block:  x = x + attn(RMSNorm(x));  x = x + SwiGLU(RMSNorm(x))
      RMSNorm -> lm_head (untied) -> logits [B, T, vocab]

``attn="nsa"`` uses ``NSAAttention`` (module.py); ``attn="dense"`` uses ``DenseAttention`` below:
the same q_proj / o_proj shapes, RoPE from module.py, and causal torch SDPA with GQA. Its kv_proj
has one branch where NSA's has three (cmp, slc, win), and it has no gate or phi: the only
parameter shapes that differ between the variants.

The LM head is untied from the token embedding: at a vocabulary of 256 tying saves 256*dim
parameters (0.2M at dim 768), and untied weights save to safetensors without shared storage.

``PRESETS`` names the model shapes and training defaults that ``python -m nsa.train --preset``
offers (docs/training.md has the table). ``generate`` samples bytes from a prompt through a KV
cache: ``model.new_cache(batch, capacity)`` holds one ``KVCache`` per layer and
``model(tokens, cache=cache)`` continues the cached sequences (docs/decode.md).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, fields
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from .cache import KVCache
from .module import STAT_NAMES, NSAAttention, apply_rope, cached_positions, rope_cos_sin

ATTN_KINDS = ("nsa", "dense")


@dataclass
class ModelConfig:
    """Architecture of ``LanguageModel``. The NSA fields (cmp_block .. phi) are ignored by attn="dense"."""

    vocab_size: int = 256
    dim: int = 128
    n_layers: int = 2
    n_q_heads: int = 4
    n_kv_heads: int = 2
    head_dim: int = 32
    mlp_hidden: int = 384  # SwiGLU hidden width (about 8/3 * dim, rounded to a multiple of 64)
    seq_len: int = 256  # training context; generate() crops its context to it
    attn: str = "nsa"
    cmp_block: int = 16  # l
    cmp_stride: int = 8  # d
    sel_block: int = 16  # l'
    num_selected: int = 4  # n (forced blocks included)
    num_init: int = 1
    num_local: int = 2
    window: int = 64  # w
    # "linear": a learned intra-block position embedding + Linear(l*D -> D), initialized to the
    # mean. The paper's MLP phi would add 2 * (l*D)^2 parameters per layer (8.4M at l=32, D=64).
    phi: str = "linear"
    gate_floor: float = 0.0  # lower bound of the branch gates (NSAAttention; 0: the paper's sigmoid)
    # Initial bias of the compressed branch's gate logits (NSAAttention.cmp_gate_bias; None: default init).
    cmp_gate_bias: Optional[float] = None
    # Weight of the selection distillation loss (NSAAttention.selection_distill at
    # SELECTION_DISTILL_POSITIONS positions per sequence, averaged over the layers; 0: off).
    selection_distill: float = 0.0
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5

    def __post_init__(self):
        if self.attn not in ATTN_KINDS:
            raise ValueError(f"ModelConfig: attn must be one of {ATTN_KINDS}, got {self.attn!r}")
        if not (isinstance(self.gate_floor, (int, float)) and 0 <= self.gate_floor < 1):
            raise ValueError(f"ModelConfig: gate_floor must be in [0, 1), got {self.gate_floor!r}")
        if self.cmp_gate_bias is not None and not (isinstance(self.cmp_gate_bias, (int, float))
                                                   and math.isfinite(self.cmp_gate_bias)):
            raise ValueError(f"ModelConfig: cmp_gate_bias must be None or a finite number, got {self.cmp_gate_bias!r}")
        if not (isinstance(self.selection_distill, (int, float)) and 0 <= self.selection_distill < math.inf):
            raise ValueError(f"ModelConfig: selection_distill must be a finite number >= 0, got "
                             f"{self.selection_distill!r}")
        if self.n_q_heads % self.n_kv_heads:
            raise ValueError(f"ModelConfig: n_q_heads ({self.n_q_heads}) must be a multiple of n_kv_heads "
                             f"({self.n_kv_heads})")

    @classmethod
    def from_dict(cls, values: Dict) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"ModelConfig: unknown fields {sorted(unknown)}")
        return cls(**values)


# Positions per sequence at which the selection distillation compares ranking and target.
SELECTION_DISTILL_POSITIONS = 32

_M7C_125M = dict(dim=768, n_layers=12, n_q_heads=12, n_kv_heads=2, head_dim=64, mlp_hidden=2048, seq_len=2048,
                 cmp_block=32, cmp_stride=16, sel_block=64, num_selected=16, window=512)

# name -> {"model": ModelConfig fields, "train": train.TrainConfig defaults}. The tiny preset
# is sized so that `python -m nsa.train --preset tiny` (training, evaluation and the sample)
# ends within 3 minutes on the 2-core development machine; at T=256 its NSA config has 16
# selection blocks of which 4 are picked, a 64-token window and 31 compressed tokens, so every
# branch sees a different part of the context.
PRESETS: Dict[str, Dict[str, Dict]] = {
    "tiny": {
        "model": dict(dim=128, n_layers=2, n_q_heads=4, n_kv_heads=2, head_dim=32, mlp_hidden=384, seq_len=256,
                      cmp_block=16, cmp_stride=8, sel_block=16, num_selected=4, window=64),
        "train": dict(steps=200, batch_size=8, lr=3e-3, warmup=20, eval_every=50, eval_batches=4, ckpt_every=100),
    },
    "m7c-125m": {
        "model": dict(_M7C_125M),
        "train": dict(steps=5000, batch_size=16, lr=1e-3, warmup=200, eval_every=250, eval_batches=16,
                      ckpt_every=1000),
    },
    "long": {
        "model": dict(_M7C_125M, seq_len=32768),
        "train": dict(steps=2000, batch_size=1, lr=1e-3, warmup=100, eval_every=250, eval_batches=4, ckpt_every=500,
                      checkpoint_activations=True),
    },
}


class DenseAttention(nn.Module):
    """Causal GQA self-attention through torch SDPA; projections and RoPE as in ``NSAAttention``.

    q_proj: dim -> Hq*D and o_proj: Hq*D -> dim have NSAAttention's shapes; kv_proj: dim -> Hkv*2D
    (keys then values) is NSAAttention's with one branch instead of three. Incremental mode as in
    NSAAttention: ``new_cache`` (a plain KVCache: keys and values only) and ``forward(x, cache=...,
    slots=...)``.
    """

    def __init__(self, dim: int, num_q_heads: int, num_kv_heads: int, head_dim: int, rope_theta: float):
        super().__init__()
        self.num_q_heads, self.num_kv_heads, self.head_dim = num_q_heads, num_kv_heads, head_dim
        self.rope_theta = rope_theta
        self.q_proj = nn.Linear(dim, num_q_heads * head_dim, bias=False)
        self.kv_proj = nn.Linear(dim, 2 * num_kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(num_q_heads * head_dim, dim, bias=False)

    def _project(self, x: torch.Tensor, positions: torch.Tensor):
        """RoPE'd q [..., Hq, D], k [..., Hkv, D] and v [..., Hkv, D] at ``positions`` (x's leading dims)."""
        cos, sin = rope_cos_sin(positions, self.head_dim, self.rope_theta, x.dtype)
        q = apply_rope(self.q_proj(x).unflatten(-1, (self.num_q_heads, self.head_dim)), cos, sin)
        k, v = self.kv_proj(x).unflatten(-1, (2 * self.num_kv_heads, self.head_dim)).chunk(2, dim=-2)
        return q, apply_rope(k, cos, sin), v

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **mask) -> torch.Tensor:
        # SDPA wants [B, H, T, D]; enable_gqa lets the Hkv heads serve groups of Hq/Hkv query heads.
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             enable_gqa=True, **mask)
        return self.o_proj(out.transpose(1, 2).flatten(-2))

    def forward(self, x: torch.Tensor, *, cache: Optional[KVCache] = None,
                slots: Optional[Sequence[int]] = None) -> torch.Tensor:
        if cache is not None:
            return self.forward_cached(x, cache, slots)
        q, k, v = self._project(x, torch.arange(x.shape[1], device=x.device))
        return self._attend(q, k, v, is_causal=True)

    def new_cache(self, num_slots: int, capacity: int, *, dtype: Optional[torch.dtype] = None,
                  device=None) -> KVCache:
        """A plain KVCache (keys and values) for this layer; dtype/device default to the parameters'."""
        weight = self.q_proj.weight
        return KVCache(num_slots, capacity, self.num_kv_heads, self.head_dim, dtype=dtype or weight.dtype,
                       device=weight.device if device is None else device)

    @torch.no_grad()
    def forward_cached(self, x: torch.Tensor, cache: KVCache, slots: Optional[Sequence[int]] = None) -> torch.Tensor:
        """x [B, m, dim]: the next m tokens of the sequences in ``slots`` (default 0 .. B-1), appended
        to ``cache``; each query attends to its sequence's keys up to its own position."""
        if cache.compressed:
            raise ValueError(f"DenseAttention: cache must be a plain KVCache (new_cache), got {cache}")
        slots, _, positions = cached_positions(cache, x, slots, "DenseAttention")
        q, k, v = self._project(x, positions)
        cache.append(slots, k, v)
        # Only the rows up to the longest slot hold keys (a host-side length: no device sync).
        held = max(cache.lengths()[slot] for slot in slots)
        view = cache.view(slots)
        visible = torch.arange(held, device=x.device) <= positions[:, None, :, None]  # [B, 1, m, held]
        return self._attend(q, view.k[:, :held], view.v[:, :held], attn_mask=visible)


class SwiGLU(nn.Module):
    """w_out(silu(a) * b) with (a, b) = w_in(x) split in halves (one matmul for both)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w_in = nn.Linear(dim, 2 * hidden, bias=False)
        self.w_out = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.w_in(x).chunk(2, dim=-1)
        return self.w_out(F.silu(a) * b)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        c = config
        self.attn_norm = nn.RMSNorm(c.dim, eps=c.norm_eps)
        if c.attn == "nsa":
            self.attn = NSAAttention(c.dim, c.n_q_heads, c.n_kv_heads, c.head_dim, cmp_block=c.cmp_block,
                                     cmp_stride=c.cmp_stride, sel_block=c.sel_block, num_selected=c.num_selected,
                                     num_init=c.num_init, num_local=c.num_local, window=c.window, phi=c.phi,
                                     rope_theta=c.rope_theta, gate_floor=c.gate_floor,
                                     cmp_gate_bias=c.cmp_gate_bias,
                                     selection_distill=SELECTION_DISTILL_POSITIONS if c.selection_distill > 0 else 0,
                                     collect_stats=True)
        else:
            self.attn = DenseAttention(c.dim, c.n_q_heads, c.n_kv_heads, c.head_dim, c.rope_theta)
        self.mlp_norm = nn.RMSNorm(c.dim, eps=c.norm_eps)
        self.mlp = SwiGLU(c.dim, c.mlp_hidden)

    def forward(self, x: torch.Tensor, cache: Optional[KVCache] = None,
                slots: Optional[Sequence[int]] = None) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The block's output and its attention's aux_loss of this forward (NSAAttention's
        selection_distill; None without): an output, so that activation checkpointing keeps it in
        the graph. (Called through the module, as FSDP2's and torch.compile's hooks need.)"""
        x = x + self.attn(self.attn_norm(x), cache=cache, slots=slots)
        return x + self.mlp(self.mlp_norm(x)), getattr(self.attn, "aux_loss", None)


class ModelCache:
    """The KV caches of a LanguageModel, one ``KVCache`` per block, all over the same slots."""

    def __init__(self, layers: Sequence[KVCache]):
        self.layers: List[KVCache] = list(layers)

    def lengths(self) -> List[int]:
        """Tokens held per slot (host ints; every layer holds the same)."""
        return self.layers[0].lengths()

    def reset(self, slot: int) -> None:
        """Empties ``slot`` in every layer for another sequence."""
        for layer in self.layers:
            layer.reset(slot)


@functools.lru_cache(maxsize=None)
def _attention_ops() -> frozenset:
    """The attention cores whose outputs activation checkpointing keeps: the NSA op and SDPA's
    fused kernels (those this torch build has)."""
    names = ("_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
             "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu")
    ops = [torch.ops.nsa.forward.default]
    ops += [getattr(torch.ops.aten, name).default for name in names if hasattr(torch.ops.aten, name)]
    return frozenset(ops)


def _keep_attention(ctx, func, *args, **kwargs) -> CheckpointPolicy:
    """Selective checkpointing policy: save the attention cores' outputs, recompute the rest."""
    return CheckpointPolicy.MUST_SAVE if func in _attention_ops() else CheckpointPolicy.PREFER_RECOMPUTE


def compile_for_training(module: nn.Module) -> nn.Module:
    """torch.compile(module) for training steps (``nsa.train --compile``, ``nsa.bench train-step
    --compile``): TorchInductor fuses the element-wise work around the attention cores, which run
    as registered (the NSA op through its fake kernel and autograd formula, without a graph break).

    NSAAttention records its statistics in forward. Under activation checkpointing the recompute
    would replay that side effect (storing the same values again), which a checkpointed region
    cannot do when compiled, so the graph would break at every block; dynamo is told to skip the
    replay (a process-wide setting).
    """
    torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint = True
    return torch.compile(module)


class LanguageModel(nn.Module):
    """Byte-level decoder LM. forward(tokens [B, T] int64) -> logits [B, T, vocab].

    With ``cache`` (from ``new_cache``): tokens [B, m] are the next m tokens of the sequences in
    ``slots`` (default 0 .. B-1); they are appended to every layer's cache and the logits are those
    the full forward of each sequence gives at these positions (inference only, no autograd).

    ``checkpoint_activations``: recompute each block in the backward instead of keeping its
    activations (torch.utils.checkpoint, non-reentrant, selective), trading about one extra forward
    of everything but attention for memory that grows with the number of layers only by the
    attention cores' outputs: those are kept, not recomputed (the NSA op's out, branch outputs, lse
    and indices; SDPA's output and logsumexp), as torchtitan's op-level selective checkpointing
    keeps SDPA's.
    """

    def __init__(self, config: ModelConfig, checkpoint_activations: bool = False):
        super().__init__()
        self.config = config
        self.checkpoint_activations = checkpoint_activations
        self.tok_emb = nn.Embedding(config.vocab_size, config.dim)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = nn.RMSNorm(config.dim, eps=config.norm_eps)
        self.lm_head = nn.Linear(config.dim, config.vocab_size, bias=False)
        self._distill: Optional[torch.Tensor] = None  # selection_distill_loss: the last forward's
        self._init_weights()

    def _init_weights(self) -> None:
        """GPT-2 style: N(0, 0.02) for embeddings and the projections both attention variants share
        and the MLP; the projections that write into the residual stream (o_proj, w_out) scaled by
        1/sqrt(2 * n_layers) so the stream's variance does not grow with depth. NSA's gate and phi
        keep NSAAttention's own initialization (phi="linear" starts as the block mean)."""
        std = 0.02
        residual_std = std / math.sqrt(2 * self.config.n_layers)
        nn.init.normal_(self.tok_emb.weight, std=std)
        nn.init.normal_(self.lm_head.weight, std=std)
        for block in self.blocks:
            for linear in (block.attn.q_proj, block.attn.kv_proj, block.mlp.w_in):
                nn.init.normal_(linear.weight, std=std)
            for linear in (block.attn.o_proj, block.mlp.w_out):
                nn.init.normal_(linear.weight, std=residual_std)

    def forward(self, tokens: torch.Tensor, cache: Optional[ModelCache] = None,
                slots: Optional[Sequence[int]] = None) -> torch.Tensor:
        x = self.tok_emb(tokens)
        if cache is not None:
            if len(cache.layers) != len(self.blocks):
                raise ValueError(f"LanguageModel: cache has {len(cache.layers)} layers, the model "
                                 f"{len(self.blocks)}; make it with new_cache")
            self._distill = None
            for block, layer_cache in zip(self.blocks, cache.layers):
                x, _ = block(x, layer_cache, slots)
            return self.lm_head(self.norm(x))
        recompute = self.checkpoint_activations and self.training and torch.is_grad_enabled()
        context_fn = functools.partial(create_selective_checkpoint_contexts, _keep_attention)
        distill_terms = []
        for block in self.blocks:
            x, aux = checkpoint(block, x, use_reentrant=False, context_fn=context_fn) if recompute else block(x)
            if aux is not None:
                distill_terms.append(aux)
        self._distill = self.config.selection_distill * torch.stack(distill_terms).mean() if distill_terms else None
        return self.lm_head(self.norm(x))

    def new_cache(self, num_slots: int, capacity: int, *, dtype: Optional[torch.dtype] = None,
                  device=None) -> ModelCache:
        """Per-layer KV caches for ``num_slots`` sequences of initial ``capacity`` tokens (grown on
        demand). dtype/device default to the parameters'; under autocast pass the autocast dtype."""
        return ModelCache(block.attn.new_cache(num_slots, capacity, dtype=dtype, device=device)
                          for block in self.blocks)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def selection_distill_loss(self) -> Optional[torch.Tensor]:
        """config.selection_distill times the mean over the layers of the last forward's
        NSAAttention.aux_loss; None when off (or after a forward that computed none)."""
        return self._distill

    def attention_stats(self) -> Optional[Dict[str, float]]:
        """NSAAttention.last_stats averaged over the layers (None for dense attention or before a
        forward). Copies a few numbers to the host."""
        stats = [block.attn.last_stats for block in self.blocks if isinstance(block.attn, NSAAttention)]
        stats = [s for s in stats if s is not None]
        if not stats:
            return None
        return {name: sum(s[name] for s in stats) / len(stats) for name in STAT_NAMES}


def _sample(logits: torch.Tensor, temperature: float, top_k: Optional[int],
            generator: torch.Generator) -> torch.Tensor:
    """The next token [1] from logits [vocab]: the argmax when temperature == 0, else a sample of
    softmax(logits / temperature) restricted to the top_k most likely tokens (all when None)."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None and top_k < logits.numel():
        cutoff = logits.topk(top_k).values[-1]
        logits = logits.masked_fill(logits < cutoff, float("-inf"))
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator)


@torch.no_grad()
def generate(model: LanguageModel, prompt_bytes: bytes, max_new_tokens: int, temperature: float = 1.0,
             top_k: Optional[int] = None, greedy: bool = False, seed: Optional[int] = None,
             max_context: Optional[int] = None) -> bytes:
    """Continues ``prompt_bytes`` by ``max_new_tokens`` bytes; returns only the new bytes.

    Through a KV cache (docs/decode.md): one chunked prefill of the prompt, then one decode step
    per new byte. The model sees at most ``max_context`` bytes (default its training ``seq_len``;
    the passkey evaluation passes longer contexts to measure retrieval beyond the training length):
    the prompt is cropped to its last max_context bytes, and when the context is full the cache is
    refilled with the last max_context // 2 bytes (one prefill per max_context // 2 new bytes, so a
    step costs O(1) amortized instead of a forward over the whole context).

    Sampling: softmax(logits / temperature) restricted to the ``top_k`` most likely bytes (all
    when None); ``greedy`` or temperature == 0 takes the argmax instead. ``seed`` seeds a private
    generator, so the sample does not touch the global RNG (and a resumed run stays exact).
    """
    if not prompt_bytes:
        raise ValueError("generate: prompt_bytes must hold at least one byte")
    if temperature < 0:
        raise ValueError(f"generate: temperature must be >= 0 (0: greedy), got {temperature}")
    context = max_context or model.config.seq_len
    if context < 2:
        raise ValueError(f"generate: max_context must be >= 2, got {context}")
    temperature = 0.0 if greedy else temperature
    device = next(model.parameters()).device
    generator = torch.Generator(device=device)
    if seed is not None:
        generator.manual_seed(seed)
    else:
        generator.seed()
    # Under autocast (CUDA) the projections, and so the cache, are bfloat16.
    autocast = device.type == "cuda"
    dtype = torch.bfloat16 if autocast else next(model.parameters()).dtype
    tokens = torch.tensor(list(prompt_bytes), dtype=torch.long, device=device)[None, -context:]
    prompt_length = tokens.shape[1]
    cache = model.new_cache(1, min(context, prompt_length + max_new_tokens), dtype=dtype)
    was_training = model.training
    model.eval()
    try:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            step_input = tokens
            for _ in range(max_new_tokens):
                next_token = _sample(model(step_input, cache=cache)[0, -1].float(), temperature, top_k, generator)
                tokens = torch.cat((tokens, next_token[None]), dim=1)
                if cache.lengths()[0] < context:
                    step_input = next_token[None]
                else:  # full: continue from the newest half of the context
                    cache.reset(0)
                    step_input = tokens[:, -(context // 2):]
    finally:
        model.train(was_training)
    return bytes(tokens[0, prompt_length:].tolist())
