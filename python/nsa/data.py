"""Byte-level training data for the showcase: a corpus on disk -> cached uint8 token files -> batches.

Corpus: by default the Python standard library's source files on this machine
(``sysconfig.get_paths()["stdlib"]``, every ``*.py`` below it, site-packages excluded), else a
directory (every regular file below it, hidden paths and __pycache__ excluded) or one file.
Files are taken in sorted order of their relative path, so the token stream is deterministic.

Tokens: each file's bytes followed by one 0 byte (an end-of-file marker the model can learn),
written once, file by file in 1 MiB chunks (the corpus is never held in memory), to
``<cache_dir>/<key>/{train,val}.bin``. The key hashes the root, the file list, sizes and
mtimes, so an edited corpus gets new token files. Readers use ``numpy.memmap``.

Split: every 50th file (index 49, 99, ... in sorted order) is validation, so validation spans
the whole corpus instead of its alphabetical tail. A corpus of fewer than 50 files (a single
text file, say) has no whole file to spare: there the last 2% of the token stream is validation.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

FORMAT_VERSION = 1  # part of the cache key: bump when the token file layout changes
VAL_EVERY = 50
VAL_FRACTION = 0.02  # for corpora of fewer than VAL_EVERY files
SEPARATOR = b"\x00"
_CHUNK = 1 << 20
_EXCLUDED_DIRS = {"site-packages", "dist-packages", "__pycache__"}


def default_cache_dir() -> Path:
    return Path.home() / ".cache" / "nsa"


def list_corpus(data: Optional[str] = None) -> Tuple[Path, List[Path]]:
    """(root, files): the corpus files in token order. ``data``: None (stdlib), a directory or a file."""
    if data is None:
        root = Path(sysconfig.get_paths()["stdlib"])
        candidates = root.rglob("*.py")
    else:
        root = Path(data).expanduser().resolve()
        if root.is_file():
            return root.parent, [root]
        if not root.is_dir():
            raise FileNotFoundError(f"nsa.data: --data {data!r} is neither a file nor a directory")
        candidates = root.rglob("*")
    files = []
    for path in candidates:
        parts = path.relative_to(root).parts
        if any(p in _EXCLUDED_DIRS or p.startswith(".") for p in parts) or not path.is_file():
            continue
        files.append(path)
    files.sort(key=lambda p: p.relative_to(root).as_posix())
    if not files:
        raise FileNotFoundError(f"nsa.data: no corpus files under {root}")
    return root, files


def corpus_key(root: Path, files: Sequence[Path]) -> str:
    """Cache key: sha256 of the format version, root, and each file's relative path, size and mtime."""
    h = hashlib.sha256(f"nsa-bytes-v{FORMAT_VERSION}\n{root}\n".encode())
    for path in files:
        st = path.stat()
        h.update(f"{path.relative_to(root).as_posix()}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


@dataclass
class TokenFiles:
    """Paths of a built corpus and its metadata (meta.json: counts, source, split rule)."""

    train: Path
    val: Path
    meta: Dict

    def load(self, split: str) -> np.ndarray:
        """The tokens of ``split`` ("train" | "val") as a read-only uint8 memmap."""
        path = {"train": self.train, "val": self.val}[split]
        return np.memmap(path, dtype=np.uint8, mode="r")


def _chunks(path: Path):
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            yield chunk


def _write_by_file(files: Sequence[Path], train: BinaryIO, val: BinaryIO) -> None:
    for i, path in enumerate(files):
        out = val if i % VAL_EVERY == VAL_EVERY - 1 else train
        for chunk in _chunks(path):
            out.write(chunk)
        out.write(SEPARATOR)


def _write_by_tail(files: Sequence[Path], train: BinaryIO, val: BinaryIO) -> None:
    # The cut is placed from the sizes listed before reading; a file that changes meanwhile
    # only moves the split by its change.
    total = sum(p.stat().st_size + len(SEPARATOR) for p in files)
    val_start = total - math.ceil(total * VAL_FRACTION)
    written = 0
    for path in files:
        for chunk in itertools.chain(_chunks(path), [SEPARATOR]):
            cut = min(max(val_start - written, 0), len(chunk))
            train.write(chunk[:cut])
            val.write(chunk[cut:])
            written += len(chunk)


def build_token_files(data: Optional[str] = None, cache_dir: Optional[str] = None) -> TokenFiles:
    """Builds (or finds) the token files of the corpus ``data`` (see ``list_corpus``).

    Safe against interruption and concurrent builders: each builder writes its own temporary
    files and moves them into place with os.replace; meta.json, written last, marks a complete
    build, and its presence is what makes a later call reuse the files.
    """
    root, files = list_corpus(data)
    directory = Path(cache_dir or default_cache_dir()).expanduser() / corpus_key(root, files)
    train_path, val_path, meta_path = directory / "train.bin", directory / "val.bin", directory / "meta.json"
    if meta_path.is_file():
        return TokenFiles(train_path, val_path, json.loads(meta_path.read_text()))

    directory.mkdir(parents=True, exist_ok=True)
    suffix = f".tmp-{os.getpid()}"
    tmp_train, tmp_val = Path(str(train_path) + suffix), Path(str(val_path) + suffix)
    by_file = len(files) >= VAL_EVERY
    with open(tmp_train, "wb") as train, open(tmp_val, "wb") as val:
        (_write_by_file if by_file else _write_by_tail)(files, train, val)
    meta = {
        "format_version": FORMAT_VERSION,
        "root": str(root),
        "num_files": len(files),
        "num_val_files": len(files) // VAL_EVERY if by_file else 0,
        "split": f"every {VAL_EVERY}th file" if by_file else f"last {VAL_FRACTION:.0%} of the stream",
        "train_tokens": tmp_train.stat().st_size,
        "val_tokens": tmp_val.stat().st_size,
    }
    os.replace(tmp_train, train_path)
    os.replace(tmp_val, val_path)
    tmp_meta = Path(str(meta_path) + suffix)
    tmp_meta.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(tmp_meta, meta_path)
    return TokenFiles(train_path, val_path, meta)


def inputs_and_targets(windows: torch.Tensor, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """Windows [B, L + 1] -> (inputs, targets) [B, L] on ``device``, the targets shifted by one."""
    windows = windows.to(device, non_blocking=True)
    return windows[:, :-1], windows[:, 1:]


class WindowSampler:
    """Batches of random windows from a token array, drawn with a seeded torch.Generator.

    ``next_batch()`` -> (inputs, targets), int64 [batch_size, seq_len] each on ``device``, targets
    shifted by one token. Window starts are uniform over every position that leaves seq_len + 1
    tokens. The sampler's whole state is its generator's state (``state_dict``), so a resumed
    run draws the same batches as an uninterrupted one.
    """

    def __init__(self, tokens: np.ndarray, batch_size: int, seq_len: int, seed: int,
                 device: torch.device = torch.device("cpu")):
        if len(tokens) < seq_len + 1:
            raise ValueError(f"WindowSampler: {len(tokens)} tokens cannot fill a window of seq_len + 1 = "
                             f"{seq_len + 1}")
        self.tokens, self.batch_size, self.seq_len, self.device = tokens, batch_size, seq_len, device
        self.generator = torch.Generator().manual_seed(seed)

    def next_windows(self) -> torch.Tensor:
        """The next batch's windows, int64 [batch_size, seq_len + 1] on the CPU."""
        starts = torch.randint(0, len(self.tokens) - self.seq_len, (self.batch_size,), generator=self.generator)
        windows = np.stack([self.tokens[s:s + self.seq_len + 1] for s in starts.tolist()])
        return torch.from_numpy(windows.astype(np.int64))

    def next_batch(self) -> Tuple[torch.Tensor, torch.Tensor]:
        return inputs_and_targets(self.next_windows(), self.device)

    def state_dict(self) -> Dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: Dict) -> None:  # other keys (PasskeyMixer's) are not its own
        self.generator.set_state(state["generator"])
