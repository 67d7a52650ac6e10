"""Shared pytest setup for the nsa Python tests.

- Loads the compiled ops (``nsa`` imports ``_nsa_ops.so`` from ``$NSA_OPS_LIBRARY`` or next to the
  package). If that fails the whole run fails with the reason: these tests never skip for a
  missing library.
- Registers the ``cuda`` marker; tests marked ``cuda`` are skipped when no CUDA device is present.
- ``make_problem`` (function and fixture): seeded random NSA inputs, padded or packed varlen.
"""

from __future__ import annotations

import itertools
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Optional, Sequence

import pytest
import torch

# Fallback so that `pytest tests/python` finds the package without PYTHONPATH (PYTHONPATH wins).
_PYTHON_DIR = Path(__file__).resolve().parents[2] / "python"
if str(_PYTHON_DIR) not in sys.path:
    sys.path.append(str(_PYTHON_DIR))

try:
    import nsa  # noqa: E402  (loads the ops library)
    import nsa.reference  # noqa: E402,F401
except Exception as exc:  # fail loudly, never skip
    raise RuntimeError(
        "tests/python: could not import nsa / load the compiled ops library. Build it with "
        "`cmake -S . -B build-torch -DNSA_BUILD_TORCH=ON -DNSA_CUDA=OFF && cmake --build build-torch "
        "--target nsa_torch_ops` and set NSA_OPS_LIBRARY=$PWD/build-torch/_nsa_ops.so. Cause: "
        f"{type(exc).__name__}: {exc}") from exc

if not (hasattr(torch.ops.nsa, "forward") and hasattr(torch.ops.nsa, "backward")):
    raise RuntimeError(f"tests/python: {nsa._library.LIBRARY_PATH} did not register torch.ops.nsa.forward/backward")


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA device; skipped when torch.cuda.is_available() is False")
    # Emitted from inside torch.library.opcheck (torch internals), not by nsa.
    config.addinivalue_line("filterwarnings", "ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA device (torch.cuda.is_available() is False)")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


# A small non-default configuration in which the scoring matters at a few hundred tokens.
SMALL_CONFIG = dict(cmp_block=16, cmp_stride=8, sel_block=32, num_selected=4, num_init=1, num_local=2, window=40)

DIFFERENTIABLE = ("q", "k", "v", "k_win", "v_win", "k_cmp", "v_cmp", "gates")


@dataclass
class Problem:
    """One set of op inputs. ``inputs`` holds q, k, v, k_cmp, v_cmp, gates and (if separate) k_win,
    v_win; ``config`` the op's keyword config; ``cu_seqlens`` is None for the padded layout."""

    inputs: Dict[str, torch.Tensor]
    config: Dict[str, int]
    cu_seqlens: Optional[torch.Tensor] = None
    lengths: Sequence[int] = field(default_factory=list)

    @property
    def varlen(self) -> bool:
        return self.cu_seqlens is not None

    def kwargs(self, **extra):
        """Keyword arguments for nsa_attention / nsa_attention_ref (config + cu_seqlens)."""
        out = dict(self.config)
        if self.cu_seqlens is not None:
            out["cu_seqlens"] = self.cu_seqlens
        out.update(extra)
        return out

    def tensors(self):
        """The eight tensor arguments in op order (k_win/v_win may be None)."""
        return tuple(self.inputs.get(name) for name in DIFFERENTIABLE)

    def call(self, fn, tensors=None, **extra):
        """fn(q, k, v, k_cmp, v_cmp, gates, k_win, v_win, **kwargs) for nsa_attention or the reference."""
        q, k, v, k_win, v_win, k_cmp, v_cmp, gates = tensors if tensors is not None else self.tensors()
        return fn(q, k, v, k_cmp, v_cmp, gates, k_win, v_win, **self.kwargs(**extra))

    def detached(self, dtype=None, requires_grad=False) -> "Problem":
        """A copy with fresh leaf tensors (optionally converted), same strides pattern not kept."""
        inputs = {}
        for name, t in self.inputs.items():
            t = t.detach().to(dtype) if dtype is not None else t.detach().clone()
            inputs[name] = t.requires_grad_(requires_grad)
        return Problem(inputs, dict(self.config), self.cu_seqlens, list(self.lengths))


def _random(shape, generator, dtype, strided):
    """randn with no exact zeros; ``strided`` makes a view whose only contiguous dim is the last."""
    if strided and len(shape) >= 3:
        # Allocate with the head dim before the token dim(s), then transpose back: [.., H, T, D] -> [.., T, H, D].
        perm_shape = list(shape)
        perm_shape[-3], perm_shape[-2] = perm_shape[-2], perm_shape[-3]
        x = torch.randn(perm_shape, generator=generator, dtype=torch.float64).transpose(-3, -2)
    else:
        x = torch.randn(shape, generator=generator, dtype=torch.float64)
    x = torch.where(x == 0, torch.full_like(x, 0.5), x)
    return x.to(dtype)


def make_problem(lengths: Sequence[int] = (64, 64), *, varlen: bool = False, num_q_heads: int = 4,
                 num_kv_heads: int = 2, head_dim_qk: int = 8, head_dim_v: int = 8, dtype=torch.float64,
                 separate_window: bool = True, strided: bool = False, seed: int = 0, requires_grad: bool = False,
                 **config) -> Problem:
    """Seeded random inputs. Padded layout: all ``lengths`` must be equal (B = len(lengths)).
    Varlen: packed [total, H, D] with cu_seqlens (int32) from ``lengths``. Gates lie in (0.05, 0.95)."""
    cfg = dict(SMALL_CONFIG)
    cfg.update(config)
    l, d = cfg["cmp_block"], cfg["cmp_stride"]
    gen = torch.Generator().manual_seed(seed)
    hq, hkv, dk, dv = num_q_heads, num_kv_heads, head_dim_qk, head_dim_v
    if varlen:
        total = sum(lengths)
        total_cmp = sum(nsa.num_cmp_tokens(n, l, d) for n in lengths)
        rows, cmp_rows = (total,), (total_cmp,)
        cu_seqlens = torch.tensor([0] + list(itertools.accumulate(lengths)), dtype=torch.int32)
    else:
        if len(set(lengths)) != 1:
            raise ValueError("padded problems need equal lengths")
        rows, cmp_rows = (len(lengths), lengths[0]), (len(lengths), nsa.num_cmp_tokens(lengths[0], l, d))
        cu_seqlens = None
    shapes = {"q": rows + (hq, dk), "k": rows + (hkv, dk), "v": rows + (hkv, dv), "k_cmp": cmp_rows + (hkv, dk),
              "v_cmp": cmp_rows + (hkv, dv)}
    if separate_window:
        shapes["k_win"] = rows + (hkv, dk)
        shapes["v_win"] = rows + (hkv, dv)
    inputs = {name: _random(shape, gen, dtype, strided) for name, shape in shapes.items()}
    inputs["gates"] = (0.05 + 0.9 * torch.rand(rows + (hq, 3), generator=gen, dtype=torch.float64)).to(dtype)
    for t in inputs.values():
        t.requires_grad_(requires_grad)
    return Problem(inputs, cfg, cu_seqlens, list(lengths))


@pytest.fixture(name="make_problem")
def make_problem_fixture():
    """The ``make_problem`` factory."""
    return make_problem
