"""The training showcase: ``python -m nsa.train`` trains the byte-level LM of model.py with NSA or
dense attention on the corpus of data.py, and reports what it measured.

    python -m nsa.train --preset tiny                 # CPU, a few minutes (docs/training.md)
    python -m nsa.train --preset m7c-125m --steps 300 # one GPU
    torchrun --nproc-per-node 8 -m nsa.train --preset m7c-125m
    torchrun --nproc-per-node 8 -m nsa.train --preset m7c-125m --parallel fsdp   # FSDP2 instead of DDP
    python -m nsa.train --resume runs/<run>           # continue from its latest checkpoint
    python -m nsa.train --compare --steps 100         # nsa and dense, same seed and data

Settings are layered: the dataclass defaults, then the preset (or, with --resume, the
settings saved in the checkpoint), then the flags given on the command line. The Python API is
``train(model_config, train_config, out_dir, resume=None, ddp=False)``; the tests call it.
``TrainConfig.parallel`` (``--parallel ddp|fsdp``) picks how a process group is used: DDP
(replicated weights) or FSDP2 (``fully_shard``: weights, gradients and optimizer state sharded over
the ranks); checkpoints are the same full files either way.

Outputs (rank 0 only), in --out: config.json, metrics.csv (one row per step), loss_curve.png
(if matplotlib imports), tb/ (if tensorboard imports), checkpoints/step_NNNNNNN.{safetensors,
state.pt}, sample.txt, summary.json.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import socket
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple, Union

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from .data import WindowSampler, build_token_files
from .evals import PasskeyMixer, check_passkey_mix
from .model import ATTN_KINDS, PRESETS, LanguageModel, ModelConfig, compile_for_training, generate
from .module import STAT_NAMES

try:
    import safetensors.torch as _safetensors
except ImportError:  # optional: model weights then go through torch.save
    _safetensors = None

EVAL_SEED = 1_234_567  # validation windows come from a fresh generator with this seed: the same at every evaluation
# loss: the cross entropy (what validation reports too); distill_loss: the weighted selection
# distillation loss the step also minimized (--selection-distill), empty without it.
CSV_COLUMNS = ("step", "loss", "lr", "grad_norm", "tokens_per_s", "elapsed_s", "val_loss") + STAT_NAMES + (
    "distill_loss",)


@dataclass
class TrainConfig:
    """Everything about a run except the model architecture. Presets override the defaults."""

    preset: str = "tiny"
    steps: int = 200
    batch_size: int = 8  # per rank
    lr: float = 3e-3  # peak learning rate
    min_lr_ratio: float = 0.1  # the cosine decays to lr * min_lr_ratio at the last step
    warmup: int = 20  # linear warmup steps
    weight_decay: float = 0.1  # on matrices and embeddings, not on norms or biases
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # max global gradient norm
    eval_every: int = 50  # validation loss every N steps and at the last step
    eval_batches: int = 4  # validation batches (of batch_size windows) per evaluation, per rank
    ckpt_every: int = 100  # checkpoint every N steps and at the last step
    keep_ckpts: int = 2  # checkpoints kept (older ones deleted); 0 keeps all
    seed: int = 0
    data: Optional[str] = None  # corpus: None = the Python stdlib on this machine (data.py)
    cache_dir: Optional[str] = None  # token cache root (default ~/.cache/nsa)
    checkpoint_activations: bool = False
    # torch.compile the model for the training steps (TorchInductor fuses the element-wise work
    # around the attention op; the op itself runs as registered). The first step compiles.
    compile: bool = False
    # torch.use_deterministic_algorithms(True) for the run (process-wide; warn-only for ops without
    # a deterministic kernel): the NSA backward takes its bitwise-reproducible mode and cuBLAS a
    # fixed workspace, so a resumed GPU run repeats the uninterrupted one's losses.
    deterministic: bool = False
    device: str = "auto"  # auto: cuda if available, else cpu
    prompt: str = "def "  # the end-of-run sample continues this
    sample_tokens: int = 256
    temperature: float = 0.8
    top_k: int = 40
    progress_seconds: float = 3.0  # a progress line at least this often (and at every evaluation)
    # With a process group: "ddp" (DistributedDataParallel) or "fsdp" (FSDP2, fully_shard per block
    # and on the root). "fsdp" without torchrun or a caller's group makes a group of one, like --ddp.
    parallel: str = "ddp"
    # Each training window is replaced, with this probability, by a passkey document of the same
    # length (nsa.evals.PasskeyMixer): teaches the retrieval the passkey evaluation measures.
    # Validation windows stay plain text.
    passkey_fraction: float = 0.0


# Fields that change the sequence of losses; changing one on --resume ends the exact continuation.
_TRAJECTORY_FIELDS = ("steps", "batch_size", "lr", "min_lr_ratio", "warmup", "weight_decay", "beta1", "beta2",
                      "grad_clip", "seed", "data", "deterministic", "parallel", "compile", "passkey_fraction")


@dataclass
class RunResult:
    """What ``train`` measured. ``losses`` and ``val_losses`` cover the steps of this invocation."""

    out_dir: Optional[Path]
    steps: int
    tokens: int  # all ranks, since step 0 (resumed runs included)
    losses: List[Tuple[int, float]] = field(default_factory=list)
    val_losses: List[Tuple[int, float]] = field(default_factory=list)
    # All ranks, over the training steps of this invocation after its first (eval and checkpoints
    # excluded): the first step pays one-time costs (compilation, cuBLAS and allocator warm-up). Over
    # that one step when it is the only one.
    tokens_per_s: float = 0.0
    train_s: float = 0.0  # time in training steps, this invocation (the first included)
    first_step_s: float = 0.0  # the first step of this invocation alone
    wall_s: float = 0.0  # whole invocation
    num_parameters: int = 0
    peak_gpu_memory_gib: Optional[float] = None  # torch.cuda.max_memory_allocated, this rank
    sample: bytes = b""
    paths: Dict[str, str] = field(default_factory=dict)

    @property
    def final_train_loss(self) -> Optional[float]:
        """Mean of the last (up to) 10 steps' losses: one step's loss is a noisy single batch."""
        tail = [loss for _, loss in self.losses[-10:]]
        return sum(tail) / len(tail) if tail else None

    @property
    def final_val_loss(self) -> Optional[float]:
        return self.val_losses[-1][1] if self.val_losses else None


# ---------------------------------------------------------------------------------------------
# Distributed setup: torchrun (WORLD_SIZE > 1), --ddp, or a process group the caller made.


@dataclass
class _Dist:
    rank: int
    world_size: int
    device: torch.device
    enabled: bool  # a process group exists: DDP or FSDP in use
    owns_group: bool  # we created it, so we destroy it


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _setup_distributed(ddp: bool, device_name: str) -> _Dist:
    use_cuda = torch.cuda.is_available() if device_name == "auto" else device_name == "cuda"
    owns = False
    if not dist.is_initialized() and (ddp or int(os.environ.get("WORLD_SIZE", "1")) > 1):
        backend = "nccl" if use_cuda else "gloo"
        if "MASTER_ADDR" in os.environ:  # torchrun: rank, world size and rendezvous from the environment
            dist.init_process_group(backend)
        else:  # --ddp without torchrun: a group of one process
            dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
        owns = True
    if not dist.is_initialized():
        return _Dist(0, 1, torch.device("cuda" if use_cuda else "cpu"), False, False)
    rank, world_size = dist.get_rank(), dist.get_world_size()
    if use_cuda:
        local_rank = int(os.environ.get("LOCAL_RANK", rank % torch.cuda.device_count()))
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    return _Dist(rank, world_size, device, True, owns)


# ---------------------------------------------------------------------------------------------
# Checkpoints: <out>/checkpoints/step_NNNNNNN.safetensors (model weights; .model.pt without the
# safetensors package) and step_NNNNNNN.state.pt (optimizer, scheduler, step, every rank's RNG
# and sampler state, configs). Each file is written to a temporary name and moved into place
# with os.replace; the state file goes last and is what --resume looks for, so a checkpoint
# is either complete or absent.


def _atomic_write(path: Path, write: Callable[[str], None]) -> None:
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    write(str(tmp))
    os.replace(tmp, path)


def _save_checkpoint(ckpt_dir: Path, step: int, weights: Dict[str, torch.Tensor], model_config: ModelConfig,
                     state: Dict, keep: int) -> Path:
    """``weights``: the full (unsharded) state dict of the model, whatever the parallelism."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    name = f"step_{step:07d}"
    weights = {k: v.detach().contiguous() for k, v in weights.items()}
    if _safetensors is not None:
        model_path = ckpt_dir / f"{name}.safetensors"
        metadata = {"model_config": json.dumps(asdict(model_config))}
        _atomic_write(model_path, lambda tmp: _safetensors.save_file(weights, tmp, metadata=metadata))
    else:
        model_path = ckpt_dir / f"{name}.model.pt"
        _atomic_write(model_path, lambda tmp: torch.save(weights, tmp))
    state_path = ckpt_dir / f"{name}.state.pt"
    _atomic_write(state_path, lambda tmp: torch.save(dict(state, model_file=model_path.name), tmp))
    if keep > 0:
        for old in sorted(ckpt_dir.glob("step_*.state.pt"))[:-keep]:
            prefix = old.name[: -len(".state.pt")]
            for path in ckpt_dir.glob(prefix + ".*"):
                path.unlink()
    return state_path


def find_checkpoint(path: str) -> Path:
    """A state file, or the latest one in a run directory or its checkpoints/ directory."""
    p = Path(path)
    if p.is_file():
        return p
    for directory in (p / "checkpoints", p):
        found = sorted(directory.glob("step_*.state.pt"))
        if found:
            return found[-1]
    raise FileNotFoundError(f"nsa.train: no checkpoint (step_*.state.pt) at {path}")


def load_checkpoint_state(path: Path) -> Dict:
    # mmap: reading the configs does not load the optimizer state into memory.
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


def load_model(path: str, device: str = "cpu") -> LanguageModel:
    """The model of a checkpoint (a state file, or a run directory: its latest), in eval mode."""
    state_path = find_checkpoint(path)
    state = load_checkpoint_state(state_path)
    model = LanguageModel(ModelConfig.from_dict(dict(state["model_config"])))
    _load_model_weights(model, state_path, state)
    return model.to(device).eval()


def _load_model_weights(model: LanguageModel, state_path: Path, state: Dict) -> None:
    model.load_state_dict(_read_model_weights(state_path, state))


def _read_model_weights(state_path: Path, state: Dict) -> Dict[str, torch.Tensor]:
    model_path = state_path.parent / state["model_file"]
    if model_path.suffix == ".safetensors":
        if _safetensors is None:
            raise RuntimeError(f"nsa.train: {model_path} needs the safetensors package (pip install safetensors)")
        weights = _safetensors.load_file(str(model_path))
    else:
        weights = torch.load(model_path, map_location="cpu", weights_only=True)
    return weights


# ---------------------------------------------------------------------------------------------
# Logging: CSV (the record; plots read it), TensorBoard when importable, progress lines.


class _MetricsLog:
    """metrics.csv, one row per step; on resume into the same directory, rows after the resumed
    step (from the interrupted run) are dropped so that the file reads as one run."""

    def __init__(self, path: Path, start_step: int):
        self.path = path
        rows = []
        if start_step > 0 and path.is_file():
            with open(path, newline="") as f:
                rows = [row for row in csv.DictReader(f) if int(row["step"]) <= start_step]
        self.file = open(path, "w", newline="")
        self.writer = csv.DictWriter(self.file, fieldnames=CSV_COLUMNS)
        self.writer.writeheader()
        self.writer.writerows(rows)
        self.file.flush()

    def write(self, row: Dict) -> None:
        self.writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in CSV_COLUMNS})
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def _tensorboard_writer(out_dir: Path, log: Callable[[str], None]):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        log("tensorboard is not installed: logging to metrics.csv only")
        return None
    return SummaryWriter(str(out_dir / "tb"))


def read_metrics(path: Path) -> List[Dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def plot_losses(curves: Dict[str, Path], png: Path, tokens_per_s: Optional[Dict[str, float]] = None) -> bool:
    """Train loss (thin: per step; thick: 20-step moving mean) and validation loss (markers) per
    labelled metrics.csv; with ``tokens_per_s``, a bar chart of throughput beside it. Returns
    False when matplotlib is not importable."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    ncols = 2 if tokens_per_s else 1
    fig, axes = plt.subplots(1, ncols, figsize=(7 * ncols, 4.5), squeeze=False)
    ax = axes[0][0]
    for i, (label, path) in enumerate(curves.items()):
        rows = read_metrics(path)
        steps = [int(r["step"]) for r in rows]
        losses = [float(r["loss"]) for r in rows]
        color = f"C{i}"
        ax.plot(steps, losses, color=color, alpha=0.25, linewidth=0.8)
        smooth = [sum(losses[max(0, j - 19): j + 1]) / (j + 1 - max(0, j - 19)) for j in range(len(losses))]
        ax.plot(steps, smooth, color=color, label=f"{label} train")
        val = [(int(r["step"]), float(r["val_loss"])) for r in rows if r["val_loss"]]
        if val:
            ax.plot(*zip(*val), "o--", color=color, label=f"{label} val")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/byte)")
    ax.grid(alpha=0.3)
    ax.legend()
    if tokens_per_s:
        bar = axes[0][1]
        bar.bar(list(tokens_per_s), list(tokens_per_s.values()), color=[f"C{i}" for i in range(len(tokens_per_s))])
        bar.set_ylabel("tokens/s (training steps)")
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return True


def _format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


# ---------------------------------------------------------------------------------------------
# Training.


def lr_factor(step_index: int, warmup: int, steps: int, min_ratio: float) -> float:
    """Multiplier of the peak lr for optimizer step ``step_index`` (0-based): linear warmup over
    ``warmup`` steps, then cosine decay to ``min_ratio`` at the last step."""
    if step_index < warmup:
        return (step_index + 1) / warmup
    progress = min(1.0, (step_index - warmup) / max(1, steps - 1 - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def _make_optimizer(model: LanguageModel, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    # Decay matrices and embeddings; norms' weights and biases (1-D) are left alone.
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=device.type == "cuda")


def _autocast(device: torch.device):
    # bf16 on CUDA (the NSA kernels' dtype); plain fp32 on CPU, where the reference is exact.
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def _steady_seconds_per_step(result: RunResult, steps_done: int) -> float:
    """Mean seconds of this invocation's steps after its first (RunResult.tokens_per_s); the first
    step's when it is the only one."""
    if steps_done <= 1:
        return result.first_step_s
    return (result.train_s - result.first_step_s) / (steps_done - 1)


def _loss(model, x: torch.Tensor, y: torch.Tensor, device: torch.device) -> torch.Tensor:
    with _autocast(device):
        logits = model(x)
    return F.cross_entropy(logits.float().flatten(0, 1), y.flatten())


@torch.no_grad()
def evaluate(model: LanguageModel, val_tokens, cfg: TrainConfig, seq_len: int, dst: _Dist) -> float:
    """Mean loss over ``eval_batches`` fixed windows per rank (averaged over ranks). The windows
    come from a fresh generator, so every evaluation sees the same ones."""
    sampler = WindowSampler(val_tokens, cfg.batch_size, seq_len, EVAL_SEED + dst.rank, dst.device)
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=dst.device)
    for _ in range(cfg.eval_batches):
        total += _loss(model, *sampler.next_batch(), dst.device).double()
    model.train(was_training)
    if dst.enabled:
        dist.all_reduce(total)
    return total.item() / (cfg.eval_batches * dst.world_size)


def _rank_state(sampler: Union[WindowSampler, PasskeyMixer], device: torch.device) -> Dict:
    state = {"sampler": sampler.state_dict(), "torch_rng": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda_rng"] = torch.cuda.get_rng_state(device)
    return state


def _restore_rank_state(state: Dict, sampler: Union[WindowSampler, PasskeyMixer], device: torch.device) -> None:
    sampler.load_state_dict(state["sampler"])
    torch.set_rng_state(state["torch_rng"])
    if device.type == "cuda" and "cuda_rng" in state:
        torch.cuda.set_rng_state(state["cuda_rng"], device)


# ---------------------------------------------------------------------------------------------
# FSDP2 (--parallel fsdp): torch.distributed.fsdp.fully_shard on every block, then on the root
# (embedding, final norm, head). The parameters become DTensors sharded over the ranks (dim 0);
# the optimizer, built afterwards, holds only this rank's shards. Checkpoints stay the full files
# of the other path: the full state dicts are gathered to rank 0 on the CPU and written there,
# and the optimizer state is stored keyed by parameter index, as optimizer.state_dict() keys it,
# so a checkpoint resumes under either --parallel (and loads with load_model / nsa.evals).


def _fsdp_shard(model: LanguageModel, device: torch.device, world_size: int) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (world_size,))  # over the default group (gloo on CPU, NCCL on CUDA)
    # Mixed precision exactly where train() autocasts to bf16 (CUDA): the all-gathered parameters
    # are bf16 (fp32 master weights and optimizer state stay sharded), gradients are reduced in
    # fp32. The autocast context stays on: its casts of the now-bf16 weights are no-ops (nothing is
    # cast twice) and the ops it runs in fp32 still run in fp32. One difference from DDP + autocast:
    # the embedding and norm weights are bf16 too, so the residual stream is bf16 instead of fp32.
    # On CPU (no autocast) no policy: fp32 throughout, the same computation as the DDP path.
    if device.type == "cuda":
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    else:
        policy = MixedPrecisionPolicy()
    for block in model.blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)


def _optimizer_param_names(model: LanguageModel, optimizer: torch.optim.Optimizer) -> List[str]:
    """Parameter names in the order optimizer.state_dict() numbers them (group by group)."""
    names = {id(p): name for name, p in model.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def _fsdp_full_state(model: LanguageModel, optimizer: torch.optim.Optimizer) -> Tuple[Dict, Dict]:
    """(model weights, optimizer state dict) in full, on the CPU, on rank 0 ({} on the others). A
    collective: every rank calls it. The optimizer state comes back keyed by parameter index like
    a plain optimizer.state_dict()."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = get_model_state_dict(model, options=options)
    optim = get_optimizer_state_dict(model, optimizer, options=options)
    if not optim:  # ranks other than 0
        return weights, optim
    index = {name: i for i, name in enumerate(_optimizer_param_names(model, optimizer))}
    return weights, {"state": {index[name]: value for name, value in optim["state"].items()},
                     "param_groups": [dict(g, params=[index[name] for name in g["params"]])
                                      for g in optim["param_groups"]]}


def _fsdp_load(model: LanguageModel, optimizer: torch.optim.Optimizer, weights: Dict, optim: Dict) -> None:
    """Loads full (unsharded) weights and an index-keyed optimizer state dict into the sharded
    model and optimizer. Every rank reads the checkpoint files itself (as it does for its RNG and
    sampler state), so each rank slices its shards out of the full tensors locally; no broadcast
    from rank 0 is needed (broadcast_from_rank0 would save the other ranks the reading)."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)

    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, weights, options=options)
    names = _optimizer_param_names(model, optimizer)
    by_name = {"state": {names[i]: value for i, value in optim["state"].items()},
               "param_groups": [dict(g, params=[names[i] for i in g["params"]]) for g in optim["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, by_name, options=options)


def _full_tensor(t: torch.Tensor) -> torch.Tensor:
    # clip_grad_norm_ over DTensor gradients returns a DTensor norm.
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def train(model_config: ModelConfig, cfg: TrainConfig, out_dir: Optional[Path] = None, resume: Optional[Path] = None,
          ddp: bool = False, log: Callable[[str], None] = print) -> RunResult:
    """Trains (or, with ``resume`` = a state file, continues) one run; returns what it measured.

    ``out_dir`` None writes nothing (no checkpoints, logs or plots). DDP, or FSDP2 with
    ``cfg.parallel == "fsdp"``, is used when a process group exists or is made here (``ddp``,
    ``cfg.parallel == "fsdp"`` or WORLD_SIZE > 1); only rank 0 writes and logs.
    """
    if cfg.parallel not in ("ddp", "fsdp"):
        raise ValueError(f"nsa.train: parallel must be 'ddp' or 'fsdp', got {cfg.parallel!r}")
    check_passkey_mix(cfg.passkey_fraction, model_config.seq_len, caller="nsa.train")  # before the token cache
    if cfg.compile and cfg.parallel == "fsdp":
        # FSDP2 keeps its hooks out of dynamo, so the root forward is not compiled: only the blocks,
        # and under activation checkpointing nothing. A silent eager run would be worse than none.
        raise ValueError("nsa.train: compile is supported with a single process and with parallel='ddp', "
                         "not with parallel='fsdp' (FSDP2's hooks keep the model out of torch.compile)")
    wall_start = time.perf_counter()
    dst = _setup_distributed(ddp or cfg.parallel == "fsdp", cfg.device)
    fsdp = dst.enabled and cfg.parallel == "fsdp"
    rank0 = dst.rank == 0
    if not rank0:
        log = lambda message: None  # noqa: E731
    writing = rank0 and out_dir is not None
    device, seq_len = dst.device, model_config.seq_len

    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read when cuBLAS starts
        torch.use_deterministic_algorithms(True, warn_only=True)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank (DDP also broadcasts rank 0's)
    model = LanguageModel(model_config, cfg.checkpoint_activations).to(device)
    num_parameters = model.num_parameters()
    if fsdp:  # before the optimizer is made: it must hold the sharded parameters
        _fsdp_shard(model, device, dst.world_size)

    # Rank 0 builds the token cache first; the others then find it complete.
    token_files = build_token_files(cfg.data, cfg.cache_dir) if rank0 else None
    if dst.enabled:
        dist.barrier()
    token_files = token_files or build_token_files(cfg.data, cfg.cache_dir)
    train_tokens, val_tokens = token_files.load("train"), token_files.load("val")
    # Each rank draws its own windows.
    sampler = WindowSampler(train_tokens, cfg.batch_size, seq_len, cfg.seed + 1000 * (dst.rank + 1), device)
    if cfg.passkey_fraction > 0:
        sampler = PasskeyMixer(sampler, cfg.passkey_fraction, cfg.seed + 1000 * (dst.rank + 1) + 1)

    optimizer = _make_optimizer(model, cfg, device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda i: lr_factor(i, cfg.warmup, cfg.steps, cfg.min_lr_ratio))
    start_step = 0
    if resume is not None:
        state = load_checkpoint_state(resume)
        if state["model_config"] != asdict(model_config):
            raise ValueError(f"nsa.train: {resume} holds a different model: {state['model_config']}")
        if state["world_size"] != dst.world_size:
            raise RuntimeError(f"nsa.train: the checkpoint was written by {state['world_size']} ranks, this run has "
                               f"{dst.world_size}; an exact resume needs the same number (each rank's data stream)")
        if fsdp:
            _fsdp_load(model, optimizer, _read_model_weights(resume, state), state["optimizer"])
        else:
            _load_model_weights(model, resume, state)
            optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        _restore_rank_state(state["rank_states"][dst.rank], sampler, device)
        start_step = state["step"]
        log(f"resumed from {resume} at step {start_step}")
    # FSDP shards `model` in place (its forward gathers the weights), so it is its own net.
    net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) \
        if dst.enabled and not fsdp else model
    if cfg.compile:
        net = compile_for_training(net)  # the training steps only: evaluation and sampling run `model` eagerly

    tokens_per_step = cfg.batch_size * seq_len * dst.world_size
    result = RunResult(out_dir=out_dir, steps=start_step, tokens=start_step * tokens_per_step,
                       num_parameters=num_parameters)
    log(f"model: {model_config.attn} attention, {result.num_parameters / 1e6:.2f}M parameters, "
        f"{model_config.n_layers} layers, dim {model_config.dim}, seq {seq_len}; device {device} x{dst.world_size}"
        f"{(' (' + cfg.parallel + ')') if dst.enabled else ''}; "
        f"data {token_files.meta['train_tokens']:,} train / {token_files.meta['val_tokens']:,} val tokens "
        f"({token_files.meta['root']}, {token_files.meta['num_files']} files, validation: {token_files.meta['split']})")

    metrics = tensorboard = None
    if writing:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.json").write_text(json.dumps(
            {"model": asdict(model_config), "train": asdict(cfg), "world_size": dst.world_size}, indent=2) + "\n")
        metrics = _MetricsLog(out_dir / "metrics.csv", start_step)
        tensorboard = _tensorboard_writer(out_dir, log)
        result.paths["metrics"] = str(out_dir / "metrics.csv")

    net.train()
    last_print, printed_losses = time.perf_counter(), []
    for step in range(start_step + 1, cfg.steps + 1):
        step_start = time.perf_counter()
        x, y = sampler.next_batch()
        loss = _loss(net, x, y, device)
        distill = model.selection_distill_loss()
        optimizer.zero_grad(set_to_none=True)
        (loss if distill is None else loss + distill).backward()
        grad_norm = _full_tensor(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip))
        lr = scheduler.get_last_lr()[0]  # the lr this step uses
        optimizer.step()
        scheduler.step()
        reported = torch.stack([t.detach().double() for t in (loss, grad_norm, distill) if t is not None])
        if dst.enabled:
            dist.all_reduce(reported)
            reported /= dst.world_size
        loss_value, grad_norm_value, *distill_value = reported.tolist()  # host sync: ends the step's timing
        distill_value = distill_value[0] if distill_value else None
        step_s = time.perf_counter() - step_start
        if not math.isfinite(loss_value):
            raise FloatingPointError(f"nsa.train: loss is {loss_value} at step {step}")
        if distill_value is not None and not math.isfinite(distill_value):
            raise FloatingPointError(f"nsa.train: the selection distillation loss is {distill_value} at step {step}")
        result.losses.append((step, loss_value))
        result.steps, result.tokens = step, step * tokens_per_step
        result.train_s += step_s
        if step == start_step + 1:
            result.first_step_s = step_s

        val_loss = None
        if step % cfg.eval_every == 0 or step == cfg.steps:
            val_loss = evaluate(model, val_tokens, cfg, seq_len, dst)
            result.val_losses.append((step, val_loss))
        row = {"step": step, "loss": loss_value, "lr": lr, "grad_norm": grad_norm_value,
               "tokens_per_s": tokens_per_step / step_s, "elapsed_s": time.perf_counter() - wall_start,
               "val_loss": val_loss, "distill_loss": distill_value}
        row.update(model.attention_stats() or {})
        if metrics is not None:
            metrics.write(row)
        if tensorboard is not None:
            for key in ("loss", "lr", "grad_norm", "tokens_per_s", "val_loss", "distill_loss") + STAT_NAMES:
                if row.get(key) is not None:
                    tensorboard.add_scalar(key, row[key], step)

        printed_losses.append(loss_value)
        now = time.perf_counter()
        if now - last_print >= cfg.progress_seconds or val_loss is not None or step in (start_step + 1, cfg.steps):
            done_here = step - start_step
            if done_here == 1:  # one-time costs: no rate or ETA from it
                speed = f"first step {result.first_step_s:.1f} s{' (compiling)' if cfg.compile else ''}"
            else:
                seconds_per_step = _steady_seconds_per_step(result, done_here)
                speed = (f"{tokens_per_step / seconds_per_step:,.0f} tok/s  "
                         f"eta {_format_duration(seconds_per_step * (cfg.steps - step))}")
            log(f"step {step}/{cfg.steps}  loss {sum(printed_losses) / len(printed_losses):.4f}  lr {lr:.2e}  "
                + speed + (f"  val {val_loss:.4f}" if val_loss is not None else ""))
            last_print, printed_losses = now, []

        if step % cfg.ckpt_every == 0 or step == cfg.steps:
            rank_states = [_rank_state(sampler, device)]
            if dst.enabled:
                rank_states = [None] * dst.world_size
                dist.all_gather_object(rank_states, _rank_state(sampler, device))
            if fsdp:  # collective: every rank takes part, rank 0 receives the full tensors
                weights, optimizer_state = _fsdp_full_state(model, optimizer) if out_dir is not None else ({}, {})
            else:
                weights, optimizer_state = model.state_dict(), optimizer.state_dict()
            if writing:
                state = {"step": step, "world_size": dst.world_size, "model_config": asdict(model_config),
                         "train_config": asdict(cfg), "optimizer": optimizer_state,
                         "scheduler": scheduler.state_dict(), "rank_states": rank_states}
                result.paths["checkpoint"] = str(_save_checkpoint(out_dir / "checkpoints", step, weights,
                                                                  model_config, state, cfg.keep_ckpts))

    if not result.val_losses:  # nothing trained here (resumed at the last step): still report a val loss
        result.val_losses.append((result.steps, evaluate(model, val_tokens, cfg, seq_len, dst)))
    if result.losses:
        result.tokens_per_s = tokens_per_step / _steady_seconds_per_step(result, len(result.losses))
    if device.type == "cuda":
        result.peak_gpu_memory_gib = torch.cuda.max_memory_allocated(device) / 2**30

    # Under FSDP every forward all-gathers each block's weights, so every rank must run the same
    # forwards: all ranks sample, with the same seed, prompt and (gathered) weights; generate()
    # runs a fixed number of forwards whatever bytes it draws, so the collectives stay matched even
    # if ranks drew different bytes. Rank 0's sample is the one reported. (Verified with one rank.)
    if (rank0 or fsdp) and cfg.sample_tokens > 0:
        sample = generate(model, cfg.prompt.encode(), cfg.sample_tokens, temperature=cfg.temperature,
                          top_k=cfg.top_k, seed=cfg.seed)
        result.sample = sample if rank0 else b""
        log("sample: " + repr((cfg.prompt.encode() + result.sample).decode("utf-8", errors="replace")))
    if metrics is not None:
        metrics.close()
    if tensorboard is not None:
        tensorboard.close()
    if writing:
        (out_dir / "sample.txt").write_bytes(cfg.prompt.encode() + result.sample)
        result.paths["sample"] = str(out_dir / "sample.txt")
        if plot_losses({model_config.attn: out_dir / "metrics.csv"}, out_dir / "loss_curve.png"):
            result.paths["loss_curve"] = str(out_dir / "loss_curve.png")
        else:
            log("matplotlib is not installed: no loss_curve.png")
    result.wall_s = time.perf_counter() - wall_start
    if writing:
        summary = {k: v for k, v in asdict(result).items() if k not in ("losses", "val_losses", "sample", "out_dir")}
        summary.update(final_train_loss=result.final_train_loss, final_val_loss=result.final_val_loss,
                       attn=model_config.attn, preset=cfg.preset, world_size=dst.world_size, device=str(device))
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        result.paths["summary"] = str(out_dir / "summary.json")
    if dst.owns_group:
        dist.destroy_process_group()
    return result


def _rate_line(result: RunResult, cfg: TrainConfig) -> str:
    """The summary's throughput: tokens/s after the invocation's first step (RunResult.tokens_per_s)."""
    steps = len(result.losses)
    if steps == 0:
        return "no training steps in this invocation"
    if steps == 1:
        return f"{result.tokens_per_s:,.0f} tokens/s over its one step ({result.train_s:.1f} s)"
    return (f"{result.tokens_per_s:,.0f} tokens/s after the first step ({result.first_step_s:.1f} s of the "
            f"{result.train_s:.1f} s of training steps{', compiling' if cfg.compile else ''})")


def format_summary(result: RunResult, model_config: ModelConfig, cfg: TrainConfig) -> str:
    this_run = f"{result.losses[0][0]}-{result.losses[-1][0]}" if result.losses else "none"
    val = f"{result.final_val_loss:.4f}" if result.final_val_loss is not None else "n/a"
    train_loss = f"{result.final_train_loss:.4f}" if result.final_train_loss is not None else "n/a"
    lines = [
        f"summary: preset {cfg.preset}, attn {model_config.attn}, {result.num_parameters / 1e6:.2f}M parameters",
        f"  steps {result.steps} (this run: {this_run}), tokens {result.tokens:,}",
        f"  {_rate_line(result, cfg)}; wall {result.wall_s:.1f} s"
        + (f"; peak GPU memory {result.peak_gpu_memory_gib:.1f} GiB" if result.peak_gpu_memory_gib is not None else ""),
        f"  final train loss {train_loss} (mean of the last 10 steps), val loss {val} (nats/byte)",
    ]
    lines += [f"  {name}: {path}" for name, path in result.paths.items()]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Command line.


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m nsa.train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    # Every default is None: unset flags keep the preset's (or the resumed checkpoint's) value.
    p.add_argument("--preset", choices=sorted(PRESETS), help="model shape and training defaults (default tiny)")
    p.add_argument("--attn", choices=ATTN_KINDS, help="attention: nsa (default) or dense (torch SDPA)")
    p.add_argument("--seq-len", type=int, help="training context length")
    p.add_argument("--selection-distill", type=float, metavar="WEIGHT",
                   help="train NSA's block ranking toward the selected branch's dense attention mass, this loss weight "
                        "(default 0: off)")
    p.add_argument("--gate-floor", type=float,
                   help="lower bound of NSA's branch gates, in [0, 1) (default 0: the paper's sigmoid gates)")
    p.add_argument("--cmp-gate-bias", type=float,
                   help="initial bias of NSA's compressed-branch gate logits (default: nn.Linear's init; "
                        "e.g. -3 starts that branch nearly shut)")
    p.add_argument("--steps", type=int, help="total optimizer steps of the run")
    p.add_argument("--batch-size", type=int, help="sequences per step, per rank")
    p.add_argument("--lr", type=float, help="peak learning rate")
    p.add_argument("--min-lr-ratio", type=float, help="final lr / peak lr of the cosine decay")
    p.add_argument("--warmup", type=int, help="linear warmup steps")
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--grad-clip", type=float, help="max global gradient norm")
    p.add_argument("--eval-every", type=int, help="validation loss every N steps (and at the end)")
    p.add_argument("--eval-batches", type=int, help="validation batches per evaluation (per rank)")
    p.add_argument("--ckpt-every", type=int, help="checkpoint every N steps (and at the end)")
    p.add_argument("--keep-ckpts", type=int, help="checkpoints to keep (0: all)")
    p.add_argument("--seed", type=int)
    p.add_argument("--data", help="corpus directory or text file (default: the Python stdlib sources)")
    p.add_argument("--cache-dir", help="token cache root (default ~/.cache/nsa)")
    p.add_argument("--checkpoint-activations", action=argparse.BooleanOptionalAction, default=None,
                   help="recompute each block's activations in the backward")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the model for the training steps (the first step compiles)")
    p.add_argument("--deterministic", action=argparse.BooleanOptionalAction, default=None,
                   help="deterministic algorithms (NSA's bitwise-reproducible backward): exact resume on GPU")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"))
    p.add_argument("--passkey-fraction", type=float,
                   help="replace each training window with this probability by a passkey document (default 0)")
    p.add_argument("--prompt", help="prompt of the end-of-run sample")
    p.add_argument("--sample-tokens", type=int, help="bytes to generate at the end (0: none)")
    p.add_argument("--temperature", type=float)
    p.add_argument("--top-k", type=int)
    p.add_argument("--progress-seconds", type=float, help="print progress at least this often")
    p.add_argument("--out", help="output directory (default runs/<preset>-<attn>-<time>; with --resume, the "
                                 "checkpoint's run directory)")
    p.add_argument("--resume", help="checkpoint state file or run directory to continue from")
    p.add_argument("--compare", action="store_true", help="train nsa and dense with the same settings, compare")
    p.add_argument("--compare-runs", nargs="+", metavar="LABEL=RUN_DIR",
                   help="compare finished runs (no training): losses at equal steps, tokens/s; with --out, "
                        "compare.png there")
    p.add_argument("--ddp", action="store_true", help="use DDP even without torchrun (a group of one)")
    p.add_argument("--parallel", choices=("ddp", "fsdp"),
                   help="with a process group (torchrun, --ddp): ddp (default) or fsdp (FSDP2 fully_shard: "
                        "sharded weights, gradients and optimizer state; full checkpoints all the same); "
                        "fsdp without torchrun makes a group of one")
    return p.parse_args(argv)


# The ModelConfig fields the command line sets (new runs only: a resumed run keeps its model).
_MODEL_FLAGS = ("attn", "seq_len", "gate_floor", "cmp_gate_bias", "selection_distill")


def resolve_configs(args: argparse.Namespace) -> Tuple[ModelConfig, TrainConfig, Optional[Path]]:
    """(model config, train config, checkpoint to resume) from preset / checkpoint / flags."""
    given = {k: v for k, v in vars(args).items() if v is not None}
    resume = find_checkpoint(args.resume) if args.resume else None
    if resume is not None:
        saved = load_checkpoint_state(resume)
        model_values, train_values = dict(saved["model_config"]), dict(saved["train_config"])
        if "preset" in given and given["preset"] != train_values["preset"]:
            raise SystemExit(f"nsa.train: --preset {given['preset']} conflicts with the checkpoint's preset "
                             f"{train_values['preset']}")
        for key in _MODEL_FLAGS:  # (a checkpoint older than a field holds its default)
            if key in given and given[key] != model_values.get(key, getattr(ModelConfig, key)):
                raise SystemExit(f"nsa.train: --{key.replace('_', '-')} cannot change the model of a resumed run")
        changed = [k for k in _TRAJECTORY_FIELDS  # a checkpoint older than a field holds its default
                   if k in given and given[k] != train_values.get(k, getattr(TrainConfig, k))]
        if changed:
            print(f"nsa.train: note: {', '.join(changed)} differ from the checkpoint: the resumed run will not "
                  "match an uninterrupted one", file=sys.stderr)
    else:
        preset = given.get("preset", "tiny")
        model_values = dict(PRESETS[preset]["model"])
        train_values = dict(PRESETS[preset]["train"], preset=preset)
        for key in _MODEL_FLAGS:
            if key in given:
                model_values[key] = given[key]
    train_values.update({f.name: given[f.name] for f in fields(TrainConfig) if f.name in given})
    return ModelConfig.from_dict(model_values), TrainConfig(**train_values), resume


def _default_out(cfg: TrainConfig, label: str) -> Path:
    return Path("runs") / f"{cfg.preset}-{label}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def compare_report(runs: Dict[str, Path], png: Optional[Path] = None) -> str:
    """Side by side, from finished run directories (their summary.json and metrics.csv; labels are
    the keys): parameters, final train and validation loss, tokens/s (after each run's first step)
    and training seconds (every step); then the validation losses at the steps every run evaluated,
    with, for two runs, the first's relative to the second's. With ``png``, the loss curves and
    throughputs are plotted there (when matplotlib imports)."""
    summaries, val = {}, {}
    for label, run_dir in runs.items():
        try:
            summaries[label] = json.loads((Path(run_dir) / "summary.json").read_text())
            rows = read_metrics(Path(run_dir) / "metrics.csv")
        except FileNotFoundError as e:
            raise FileNotFoundError(f"nsa.train: {run_dir} is not a finished run directory ({e.filename} is missing)")
        val[label] = {int(r["step"]): float(r["val_loss"]) for r in rows if r.get("val_loss")}
    lines = [f"{'run':<8} {'params':>8} {'train loss':>10} {'val loss':>9} {'tokens/s':>10} {'train s':>8}"]
    for label, summary in summaries.items():
        train_loss, val_loss = (f"{summary[k]:.4f}" if summary[k] is not None else "n/a"
                                for k in ("final_train_loss", "final_val_loss"))
        lines.append(f"{label:<8} {summary['num_parameters'] / 1e6:>7.2f}M {train_loss:>10} {val_loss:>9} "
                     f"{summary['tokens_per_s']:>10,.0f} {summary['train_s']:>8.1f}")
    labels = list(runs)
    steps = sorted(set.intersection(*(set(v) for v in val.values()))) if val else []
    if steps:
        lines.append("validation loss at equal steps" + (f" ({labels[0]} relative to {labels[1]})"
                                                         if len(labels) == 2 else ""))
        lines.append(f"{'step':>8} " + " ".join(f"{label:>9}" for label in labels))
        for step in steps:
            row = f"{step:>8} " + " ".join(f"{val[label][step]:>9.4f}" for label in labels)
            if len(labels) == 2:
                row += f" {val[labels[0]][step] / val[labels[1]][step] - 1:>+8.1%}"
            lines.append(row)
    if png is not None and plot_losses({label: Path(d) / "metrics.csv" for label, d in runs.items()}, png,
                                       {label: s["tokens_per_s"] for label, s in summaries.items()}):
        lines.append(f"plot: {png}")
    return "\n".join(lines)


def compare(model_config: ModelConfig, cfg: TrainConfig, out_dir: Path, ddp: bool) -> Dict[str, RunResult]:
    """Trains the nsa and the dense variant with the same settings and seed (same data windows),
    prints both side by side and plots the two loss curves and throughputs (compare.png)."""
    results = {}
    for attn in ATTN_KINDS:
        variant = ModelConfig.from_dict(dict(asdict(model_config), attn=attn))
        print(f"== {attn} ==")
        results[attn] = train(variant, cfg, out_dir / attn, ddp=ddp)
        print(format_summary(results[attn], variant, cfg))
    print(compare_report({attn: out_dir / attn for attn in results}, out_dir / "compare.png"))
    return results


def main(argv: Optional[List[str]] = None) -> None:
    args = parse_args(argv)
    if args.compare_runs:
        runs = dict(item.split("=", 1) if "=" in item else (Path(item).name, item) for item in args.compare_runs)
        if len(runs) != len(args.compare_runs):
            raise SystemExit(f"nsa.train: --compare-runs needs distinct labels, got {args.compare_runs}")
        png = Path(args.out) / "compare.png" if args.out else None
        if png is not None:
            png.parent.mkdir(parents=True, exist_ok=True)
        print(compare_report({label: Path(d) for label, d in runs.items()}, png))
        return
    model_config, cfg, resume = resolve_configs(args)
    if args.compare:
        if resume is not None:
            raise SystemExit("nsa.train: --compare starts two fresh runs; it does not take --resume")
        compare(model_config, cfg, Path(args.out) if args.out else _default_out(cfg, "compare"), args.ddp)
        return
    if args.out:
        out_dir = Path(args.out)
    elif resume is not None:
        out_dir = resume.parent.parent  # <run>/checkpoints/step_N.state.pt -> <run>
    else:
        out_dir = _default_out(cfg, model_config.attn)
    result = train(model_config, cfg, out_dir, resume=resume, ddp=args.ddp)
    if int(os.environ.get("RANK", "0")) == 0:  # torchrun sets RANK; the process group is closed by now
        print(format_summary(result, model_config, cfg))


if __name__ == "__main__":
    main()
