"""nsa: Native Sparse Attention (DeepSeek 2025) for PyTorch.

``nsa_attention`` is the attention core (compressed + selected + sliding-window branches,
gated), differentiable; ``NSAAttention`` is a drop-in attention layer built on it; and
``nsa.reference.nsa_attention_ref`` is a brute-force PyTorch implementation to check against.
``KVCache`` holds a layer's keys, values and compressed tokens for decode and chunked prefill
(``nsa_attention_kvcache``; ``NSAAttention(x, cache=...)``). Semantics: docs/semantics.md;
decode: docs/decode.md.
"""

__version__ = "0.1.0"

from . import _library  # noqa: F401  (registers torch.ops.nsa.*)
from .cache import KVCache
from .module import NSAAttention
from .ops import NSAConfig, cmp_seqlens, nsa_attention, nsa_attention_kvcache, num_cmp_tokens

__all__ = ["__version__", "KVCache", "NSAAttention", "NSAConfig", "cmp_seqlens", "cuda_built", "nsa_attention",
           "nsa_attention_kvcache", "num_cmp_tokens"]


def cuda_built() -> bool:
    """Whether the ops library was built with the CUDA kernels (else CUDA tensors are refused)."""
    import torch

    return bool(torch.ops.nsa.cuda_built())
