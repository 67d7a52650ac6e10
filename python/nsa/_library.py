"""Loads the compiled torch ops (``_nsa_ops.so``) that register ``torch.ops.nsa.*``.

Looked up in ``$NSA_OPS_LIBRARY`` when set (development builds: ``make test`` points it at
``build/``), else next to this file (installed wheels).
"""

import os
from pathlib import Path

import torch


def _find_library() -> Path:
    override = os.environ.get("NSA_OPS_LIBRARY")
    if override:
        path = Path(override)
        if not path.is_file():
            raise ImportError(f"nsa: NSA_OPS_LIBRARY={override!r} is not a file")
        return path
    here = Path(__file__).resolve().parent
    candidates = sorted(here.glob("_nsa_ops*.so"))
    if not candidates:
        raise ImportError(
            f"nsa: the compiled ops library _nsa_ops.so is not in {here}; install the package with "
            "`pip install .` or build it with `make build` and set NSA_OPS_LIBRARY=build/_nsa_ops.so"
        )
    return candidates[0]


LIBRARY_PATH = _find_library()
torch.ops.load_library(str(LIBRARY_PATH))
