"""Tests of the training showcase (nsa.model, nsa.data, nsa.train) on CPU (and one on the GPU).

The model here is smaller than the tiny preset (dim 64, T=64, NSA blocks l=8 d=4 l'=8 n=4
w=16) so that the whole file runs in well under a minute on two cores; the stdlib token cache
is built once per session into a temporary directory.
"""

from __future__ import annotations

import contextlib
import csv
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

from nsa import data as nsa_data
from nsa import train as nsa_train
from nsa.model import PRESETS, LanguageModel, ModelConfig, generate
from nsa.train import TrainConfig, lr_factor, train

SMALL = ModelConfig(dim=64, n_layers=2, n_q_heads=4, n_kv_heads=2, head_dim=16, mlp_hidden=128, seq_len=64,
                    cmp_block=8, cmp_stride=4, sel_block=8, num_selected=4, window=16)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("nsa-cache")
    nsa_data.build_token_files(None, str(path))  # the stdlib corpus, once
    return str(path)


@pytest.fixture
def small_cfg(cache_dir) -> TrainConfig:
    return TrainConfig(preset="test", steps=8, batch_size=4, lr=1e-2, warmup=2, eval_every=1000, eval_batches=1,
                       ckpt_every=1000, sample_tokens=0, cache_dir=cache_dir, device="cpu", progress_seconds=1e9)


def _quiet(_message: str) -> None:
    pass


@contextlib.contextmanager
def _group_of_one(tmp_path: Path):
    """A gloo process group of one rank (file:// store) that the caller owns, as torchrun would
    give train() one: train() uses it and leaves it alone."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _csv_losses(path: Path):
    with open(path, newline="") as f:
        return [(int(r["step"]), float(r["loss"])) for r in csv.DictReader(f)]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_resume_is_exact_on_gpu_when_deterministic(small_cfg, tmp_path):
    """On the GPU (bf16 autocast, the CUDA kernels) --deterministic makes a resumed run repeat the
    uninterrupted one bit for bit: the NSA backward's deterministic mode, deterministic cuBLAS."""
    import nsa

    if not nsa.cuda_built():
        pytest.skip("ops library built without CUDA kernels")
    model = replace(SMALL, n_q_heads=2, n_kv_heads=1, head_dim=64)  # a head dim the CUDA kernels have
    k = 3
    cfg = replace(small_cfg, steps=2 * k, device="cuda", deterministic=True)
    try:
        uninterrupted = train(model, cfg, tmp_path / "a", log=_quiet)
        train(model, replace(cfg, ckpt_every=k), tmp_path / "b", log=_quiet)
        ckpt = tmp_path / "b" / "checkpoints" / f"step_{k:07d}.state.pt"
        nsa_train.main(["--resume", str(ckpt), "--progress-seconds", "1e9"])
    finally:
        torch.use_deterministic_algorithms(False)  # train() set it for the process
    assert _csv_losses(tmp_path / "b" / "metrics.csv") == uninterrupted.losses


def test_loss_drops_on_stdlib(small_cfg):
    cfg = replace(small_cfg, steps=30, batch_size=8, warmup=5)
    result = train(SMALL, cfg, log=_quiet)
    first = result.losses[0][1]
    last = sum(loss for _, loss in result.losses[-5:]) / 5
    assert first > 5.0  # about ln(256) = 5.55 at initialization
    assert last < 0.7 * first, result.losses
    assert result.final_val_loss < 0.75 * first


@pytest.mark.parametrize("weights", ["safetensors", "torch.save"])
def test_resume_is_exact(small_cfg, tmp_path, monkeypatch, weights):
    if weights == "safetensors":
        pytest.importorskip("safetensors")
    else:
        monkeypatch.setattr(nsa_train, "_safetensors", None)
    k = 4
    cfg = replace(small_cfg, steps=2 * k)
    uninterrupted = train(SMALL, cfg, tmp_path / "a", log=_quiet)
    # Run b checkpoints at step k; its continuation is then thrown away and redone from there.
    interrupted = train(SMALL, replace(cfg, ckpt_every=k), tmp_path / "b", log=_quiet)
    assert interrupted.losses == uninterrupted.losses  # checkpointing itself changes nothing
    ckpt = tmp_path / "b" / "checkpoints" / f"step_{k:07d}.state.pt"
    suffix = ".safetensors" if weights == "safetensors" else ".model.pt"
    assert ckpt.is_file() and ckpt.with_name(f"step_{k:07d}{suffix}").is_file()
    torch.manual_seed(12345)  # the global RNG must come from the checkpoint, not from this process
    nsa_train.main(["--resume", str(ckpt), "--progress-seconds", "1e9"])  # the CLI path, into run b's directory
    resumed = _csv_losses(tmp_path / "b" / "metrics.csv")
    assert [s for s, _ in resumed] == list(range(1, 2 * k + 1))  # rows after step k replaced, not duplicated
    assert resumed == uninterrupted.losses  # bit for bit


def test_ddp_world_size_one(small_cfg, tmp_path):
    cfg = replace(small_cfg, steps=3)
    plain = train(SMALL, cfg, log=_quiet)
    with _group_of_one(tmp_path):
        result = train(SMALL, cfg, tmp_path / "ddp", ddp=True, log=_quiet)
        assert dist.is_initialized()  # a group the caller made is left to the caller
    state = torch.load(result.paths["checkpoint"], weights_only=True)
    assert state["world_size"] == 1 and len(state["rank_states"]) == 1
    assert result.losses == plain.losses  # one rank: DDP's gradient all-reduce changes nothing


def test_fsdp_matches_ddp_world_size_one(small_cfg, tmp_path):
    """--parallel fsdp (FSDP2 fully_shard) on the tiny preset's model: with one rank it computes
    what DDP computes (fp32 on CPU), and the end-of-run sample runs through the sharded model."""
    tiny = ModelConfig(**dict(PRESETS["tiny"]["model"], seq_len=64))
    cfg = replace(small_cfg, steps=3, sample_tokens=4)
    with _group_of_one(tmp_path):
        ddp = train(tiny, cfg, ddp=True, log=_quiet)
        fsdp = train(tiny, replace(cfg, parallel="fsdp"), log=_quiet)
        assert dist.is_initialized()
    assert [s for s, _ in fsdp.losses] == [1, 2, 3]
    assert all(math.isfinite(loss) for _, loss in fsdp.losses)
    for (_, a), (_, b) in zip(fsdp.losses, ddp.losses):
        assert a == pytest.approx(b, rel=1e-6, abs=0)
    assert fsdp.final_val_loss == pytest.approx(ddp.final_val_loss, rel=1e-6, abs=0)
    assert len(fsdp.sample) == 4 and fsdp.sample == ddp.sample  # same weights, seed and prompt


def test_fsdp_resume_is_exact(small_cfg, tmp_path):
    k = 3
    cfg = replace(small_cfg, steps=2 * k, parallel="fsdp")
    with _group_of_one(tmp_path):
        uninterrupted = train(SMALL, cfg, tmp_path / "a", log=_quiet)
        interrupted = train(SMALL, replace(cfg, ckpt_every=k), tmp_path / "b", log=_quiet)
        assert interrupted.losses == uninterrupted.losses
        ckpt = tmp_path / "b" / "checkpoints" / f"step_{k:07d}.state.pt"
        assert torch.load(ckpt, weights_only=True)["train_config"]["parallel"] == "fsdp"
        torch.manual_seed(12345)  # the global RNG must come from the checkpoint
        nsa_train.main(["--resume", str(ckpt), "--progress-seconds", "1e9"])  # fsdp again: the saved setting
        # The checkpoint format does not depend on --parallel: DDP continues it just as well.
        nsa_train.main(["--resume", str(ckpt), "--parallel", "ddp", "--out", str(tmp_path / "c"),
                        "--progress-seconds", "1e9"])
    resumed = _csv_losses(tmp_path / "b" / "metrics.csv")
    assert [s for s, _ in resumed] == list(range(1, 2 * k + 1))
    assert resumed == uninterrupted.losses  # bit for bit
    assert _csv_losses(tmp_path / "c" / "metrics.csv") == uninterrupted.losses[k:]  # a new --out: steps k+1..


def test_fsdp_checkpoint_loads_into_plain_model(small_cfg, tmp_path):
    # No process group given: --parallel fsdp makes a group of one itself (and closes it).
    cfg = replace(small_cfg, steps=2)
    fsdp = train(SMALL, replace(cfg, parallel="fsdp"), tmp_path / "fsdp", log=_quiet)
    assert not dist.is_initialized()
    plain = train(SMALL, cfg, tmp_path / "plain", log=_quiet)
    assert fsdp.losses == plain.losses
    model = nsa_train.load_model(str(tmp_path / "fsdp"))  # what nsa.evals loads
    assert type(model) is LanguageModel and model.config == SMALL and not model.training
    reference = nsa_train.load_model(str(tmp_path / "plain")).state_dict()
    weights = model.state_dict()
    assert weights.keys() == reference.keys()
    for name, tensor in weights.items():
        assert tensor.dtype == torch.float32 and not hasattr(tensor, "full_tensor"), name  # full, not DTensor
        torch.testing.assert_close(tensor, reference[name], rtol=1e-6, atol=1e-8, msg=name)
    fsdp_state = torch.load(fsdp.paths["checkpoint"], weights_only=True)["optimizer"]
    plain_state = torch.load(plain.paths["checkpoint"], weights_only=True)["optimizer"]
    assert fsdp_state["param_groups"] == plain_state["param_groups"]  # keyed by index, like optimizer.state_dict()
    assert fsdp_state["state"].keys() == plain_state["state"].keys()


def _write_corpus(root: Path, count: int) -> None:
    for i in range(count):
        (root / f"f{i:03d}.txt").write_bytes(f"file {i}: ".encode() + bytes([65 + i % 26]) * (10 + i))


def test_split_is_deterministic_and_disjoint(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    _write_corpus(corpus, 120)
    (corpus / ".hidden").write_text("skipped")
    built = nsa_data.build_token_files(str(corpus), str(tmp_path / "c1"))
    again = nsa_data.build_token_files(str(corpus), str(tmp_path / "c2"))
    assert built.train.read_bytes() == again.train.read_bytes()
    assert built.val.read_bytes() == again.val.read_bytes()
    assert built.meta["num_files"] == 120 and built.meta["num_val_files"] == 2
    train_docs = set(built.train.read_bytes().split(nsa_data.SEPARATOR)[:-1])
    val_docs = built.val.read_bytes().split(nsa_data.SEPARATOR)[:-1]
    assert [d[:9] for d in val_docs] == [b"file 49: ", b"file 99: "]  # every 50th file
    assert len(train_docs) == 118 and not train_docs & set(val_docs)
    # A second call finds the complete cache instead of rebuilding.
    mtime = built.train.stat().st_mtime_ns
    assert nsa_data.build_token_files(str(corpus), str(tmp_path / "c1")).train.stat().st_mtime_ns == mtime
    # A changed corpus gets a new cache entry.
    (corpus / "f000.txt").write_bytes(b"changed")
    assert nsa_data.build_token_files(str(corpus), str(tmp_path / "c1")).train != built.train


def test_single_file_splits_at_tail(tmp_path):
    text = tmp_path / "book.txt"
    text.write_bytes(bytes(range(256)) * 40)
    built = nsa_data.build_token_files(str(text), str(tmp_path / "cache"))
    train_bytes, val_bytes = built.train.read_bytes(), built.val.read_bytes()
    assert train_bytes + val_bytes == text.read_bytes() + nsa_data.SEPARATOR
    assert len(val_bytes) == -(-len(train_bytes + val_bytes) * 2 // 100)  # ceil(2%)


def test_stdlib_corpus_listing(cache_dir):
    root, files = nsa_data.list_corpus(None)
    assert files == nsa_data.list_corpus(None)[1]
    assert all(f.suffix == ".py" and "site-packages" not in f.parts for f in files)
    rel = [f.relative_to(root).as_posix() for f in files]
    assert rel == sorted(rel)


def test_sampler_state_roundtrip(cache_dir):
    tokens = nsa_data.build_token_files(None, cache_dir).load("train")
    sampler = nsa_data.WindowSampler(tokens, 3, 32, seed=7)
    sampler.next_batch()
    state = sampler.state_dict()
    expected = sampler.next_batch()
    other = nsa_data.WindowSampler(tokens, 3, 32, seed=99)
    other.load_state_dict(state)
    got = other.next_batch()
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    assert torch.equal(got[0][:, 1:], got[1][:, :-1])  # targets are the inputs shifted by one


@pytest.mark.parametrize("attn", ["nsa", "dense"])
def test_generate_returns_requested_bytes(attn):
    torch.manual_seed(0)
    model = LanguageModel(replace(SMALL, attn=attn))
    out = generate(model, b"def ", 12, temperature=0.9, top_k=20, seed=1)
    assert isinstance(out, bytes) and len(out) == 12
    assert generate(model, b"def ", 12, temperature=0.9, top_k=20, seed=1) == out
    greedy = generate(model, b"x" * (SMALL.seq_len + 5), 3, greedy=True)  # context cropped to seq_len
    assert len(greedy) == 3
    assert model.training  # generate restores the mode
    with pytest.raises(ValueError):
        generate(model, b"", 1)


def test_variants_share_projection_shapes():
    nsa_model, dense_model = LanguageModel(SMALL), LanguageModel(replace(SMALL, attn="dense"))
    nsa_shapes = {k: v.shape for k, v in nsa_model.state_dict().items()}
    dense_shapes = {k: v.shape for k, v in dense_model.state_dict().items()}
    for name, shape in dense_shapes.items():
        if "kv_proj" not in name:
            assert nsa_shapes[name] == shape, name
    assert nsa_model.attention_stats() is None  # before the first forward
    nsa_model(torch.zeros(1, 40, dtype=torch.long))
    assert set(nsa_model.attention_stats()) >= {"gate_mean_cmp", "gate_mean_slc", "gate_mean_win"}
    assert dense_model.attention_stats() is None


def test_compare_runs_both_variants(cache_dir, tmp_path):
    # The CLI with the tiny preset at a short length: both variants train, log and plot.
    nsa_train.main(["--compare", "--preset", "tiny", "--seq-len", "64", "--batch-size", "2", "--steps", "2",
                    "--eval-batches", "1", "--sample-tokens", "4", "--cache-dir", cache_dir, "--device", "cpu",
                    "--out", str(tmp_path)])
    for attn in ("nsa", "dense"):
        rows = _csv_losses(tmp_path / attn / "metrics.csv")
        assert [s for s, _ in rows] == [1, 2] and all(l == l for _, l in rows)
        assert (tmp_path / attn / "sample.txt").read_bytes().startswith(b"def ")
    first_row = (tmp_path / "nsa" / "metrics.csv").read_text().splitlines()[1]
    assert first_row.split(",")[7] != ""  # gate_mean_cmp: statistics are logged for nsa
    pytest.importorskip("matplotlib")
    assert (tmp_path / "compare.png").is_file() and (tmp_path / "nsa" / "loss_curve.png").is_file()


def test_compare_finished_runs(cache_dir, tmp_path, capsys):
    # Runs trained apart (as on a device whose calls fit one run each) compared afterwards: the
    # validation losses at the steps both evaluated, the first run's relative to the second's.
    common = ["--preset", "tiny", "--seq-len", "64", "--batch-size", "2", "--eval-batches", "1", "--sample-tokens",
              "0", "--cache-dir", cache_dir, "--device", "cpu", "--progress-seconds", "1e9"]
    nsa_train.main(common + ["--steps", "4", "--eval-every", "2", "--out", str(tmp_path / "a")])
    nsa_train.main(common + ["--steps", "6", "--eval-every", "3", "--attn", "dense", "--out", str(tmp_path / "b")])
    capsys.readouterr()
    nsa_train.main(["--compare-runs", f"nsa={tmp_path / 'a'}", f"dense={tmp_path / 'b'}", "--out", str(tmp_path)])
    report = capsys.readouterr().out.splitlines()
    val = {run: {int(r["step"]): float(r["val_loss"]) for r in nsa_train.read_metrics(tmp_path / run / "metrics.csv")
                 if r["val_loss"]} for run in ("a", "b")}
    assert sorted(val["a"]) == [2, 4] and sorted(val["b"]) == [3, 6]  # no step in common ...
    assert not any(line.startswith("validation loss at equal steps") for line in report)
    assert report[1].startswith("nsa ") and report[2].startswith("dense ")
    # ... until b's log has step 4 too: the table then holds that row, with the ratio
    with open(tmp_path / "b" / "metrics.csv") as f:
        header, *rows = f.read().splitlines()
    cols = header.split(",")
    rows[3] = ",".join(v if c != "val_loss" else "2.5" for c, v in zip(cols, rows[3].split(",")))
    (tmp_path / "b" / "metrics.csv").write_text("\n".join([header] + rows) + "\n")
    capsys.readouterr()
    nsa_train.main(["--compare-runs", f"nsa={tmp_path / 'a'}", f"dense={tmp_path / 'b'}"])
    report = capsys.readouterr().out.splitlines()
    at = report.index("validation loss at equal steps (nsa relative to dense)")
    step, a, b, rel = report[at + 2].split()
    assert int(step) == 4 and float(a) == pytest.approx(val["a"][4], abs=1e-4) and float(b) == 2.5
    assert float(rel.rstrip("%")) == pytest.approx((val["a"][4] / 2.5 - 1) * 100, abs=0.06)
    with pytest.raises(FileNotFoundError, match="not a finished run directory"):
        nsa_train.compare_report({"x": tmp_path / "missing"})


def test_activation_checkpointing_matches(small_cfg):
    cfg = replace(small_cfg, steps=2)
    plain = train(SMALL, cfg, log=_quiet)
    recomputed = train(SMALL, replace(cfg, checkpoint_activations=True), log=_quiet)
    assert recomputed.losses == plain.losses


@pytest.mark.parametrize("checkpoint_activations", [False, True])
def test_compiled_training_matches_eager(small_cfg, checkpoint_activations):
    # --compile (torch.compile, fullgraph through the NSA op's fake kernel and autograd formula):
    # the same losses as eager up to the fused element-wise work's rounding (about 1e-7 here; a
    # parameter whose gradient is lost moves them by 1e-4 by the third step).
    cfg = replace(small_cfg, steps=3, checkpoint_activations=checkpoint_activations)
    eager = train(SMALL, cfg, log=_quiet)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    # compile_for_training sets a process-wide dynamo option; the patch restores it afterwards
    with torch._dynamo.config.patch(skip_fwd_side_effects_in_bwd_under_checkpoint=False):
        compiled = train(SMALL, replace(cfg, compile=True), log=_quiet)
    counters = torch._dynamo.utils.counters
    assert not counters["graph_break"] and not counters["unimplemented"], dict(counters)
    assert counters["stats"]["unique_graphs"] == 1  # the whole model in one graph: nothing ran eagerly
    assert [s for s, _ in compiled.losses] == [s for s, _ in eager.losses]
    for (_, a), (_, b) in zip(compiled.losses, eager.losses):
        assert a == pytest.approx(b, rel=1e-5, abs=0)


def test_compiled_ddp_world_size_one(small_cfg, tmp_path):
    # torch.compile of the DDP wrapper (DDP's graph optimizer splits the graph at its buckets): the
    # same losses as the eager DDP run up to rounding.
    cfg = replace(small_cfg, steps=2)
    with _group_of_one(tmp_path):
        eager = train(SMALL, cfg, ddp=True, log=_quiet)
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        with torch._dynamo.config.patch(skip_fwd_side_effects_in_bwd_under_checkpoint=False):
            compiled = train(SMALL, replace(cfg, compile=True), ddp=True, log=_quiet)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # the model ran compiled
    assert [s for s, _ in compiled.losses] == [s for s, _ in eager.losses]
    for (_, a), (_, b) in zip(compiled.losses, eager.losses):
        assert a == pytest.approx(b, rel=1e-5, abs=0)


def test_compile_refuses_fsdp(small_cfg):
    with pytest.raises(ValueError, match="parallel='fsdp'"):
        train(SMALL, replace(small_cfg, compile=True, parallel="fsdp"), log=_quiet)


class _CountOps(TorchDispatchMode):
    """Counts the calls of the attention cores (the NSA op, SDPA's CPU kernel) below autograd."""

    def __init__(self):
        super().__init__()
        self.calls = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.nsa.forward.default, torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default):
            self.calls[func] = self.calls.get(func, 0) + 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("attn", ["nsa", "dense"])
def test_activation_checkpointing_keeps_attention(attn):
    # Checkpointed blocks recompute everything but the attention core, whose outputs are kept: the
    # core runs once per layer and step, as without checkpointing, and the gradients are the same.
    config = replace(SMALL, attn=attn)
    tokens = torch.randint(0, config.vocab_size, (2, config.seq_len + 1), generator=torch.Generator().manual_seed(3))
    grads, calls = {}, {}
    for recompute in (False, True):
        torch.manual_seed(0)
        model = LanguageModel(config, checkpoint_activations=recompute)
        counter = _CountOps()
        with counter:
            logits = model(tokens[:, :-1])
            torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()
        grads[recompute] = [p.grad for p in model.parameters()]
        calls[recompute] = sum(counter.calls.values())
    assert calls[False] == calls[True] == config.n_layers
    assert all(torch.equal(a, b) for a, b in zip(grads[False], grads[True]))


def test_lr_schedule():
    factors = [lr_factor(i, warmup=10, steps=100, min_ratio=0.1) for i in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert factors[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(factors[9:], factors[10:]))


def test_presets_build():
    # The named shapes of the brief; building m7c-125m on the meta device costs no memory.
    big = ModelConfig(**PRESETS["m7c-125m"]["model"])
    assert (big.dim, big.n_layers, big.n_q_heads, big.n_kv_heads, big.head_dim, big.seq_len) == (768, 12, 12, 2, 64, 2048)
    assert (big.cmp_block, big.cmp_stride, big.sel_block, big.num_selected, big.window) == (32, 16, 64, 16, 512)
    assert ModelConfig(**PRESETS["long"]["model"]).seq_len == 32768
    with torch.device("meta"):
        assert LanguageModel(big).num_parameters() > 50e6


# ---------------------------------------------------------------------------------------------
# Passkey documents mixed into training (--passkey-fraction, nsa.evals.PasskeyMixer).

def _windows(x: torch.Tensor, y: torch.Tensor):
    return [bytes(x[r].tolist() + [y[r, -1].item()]) for r in range(x.shape[0])]


def test_passkey_mixer_replaces_windows_with_documents(cache_dir):
    from nsa import evals

    tokens = nsa_data.build_token_files(None, cache_dir).load("train")
    mixer = evals.PasskeyMixer(nsa_data.WindowSampler(tokens, 6, 127, seed=3), 1.0, seed=4)
    x, y = mixer.next_batch()
    assert x.shape == y.shape == (6, 127) and torch.equal(x[:, 1:], y[:, :-1])
    for window in _windows(x, y):
        key = window[-5:].decode()
        assert key.isdigit()
        assert window.endswith((evals.QUESTION + key).encode()) and evals.needle(key).encode() in window
    # fraction 0 draws the plain sampler's windows; in between, some of each.
    plain = nsa_data.WindowSampler(tokens, 6, 127, seed=3).next_batch()
    none = evals.PasskeyMixer(nsa_data.WindowSampler(tokens, 6, 127, seed=3), 0.0, seed=4).next_batch()
    assert torch.equal(none[0], plain[0]) and torch.equal(none[1], plain[1])
    half = evals.PasskeyMixer(nsa_data.WindowSampler(tokens, 16, 127, seed=3), 0.5, seed=4)
    documents = [evals.QUESTION.encode() in w for _ in range(3) for w in _windows(*half.next_batch())]
    assert 0 < sum(documents) < len(documents)


def test_passkey_mixer_state_roundtrip_and_checks(cache_dir):
    from nsa import evals

    tokens = nsa_data.build_token_files(None, cache_dir).load("train")
    mixer = evals.PasskeyMixer(nsa_data.WindowSampler(tokens, 8, 127, seed=1), 0.5, seed=2)
    mixer.next_batch()
    state = mixer.state_dict()
    expected = mixer.next_batch()
    other = evals.PasskeyMixer(nsa_data.WindowSampler(tokens, 8, 127, seed=9), 0.5, seed=9)
    other.load_state_dict(state)
    got = other.next_batch()
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    with pytest.raises(ValueError, match="fraction must be in"):
        evals.PasskeyMixer(nsa_data.WindowSampler(tokens, 2, 127, seed=1), 1.5, seed=2)
    shortest = evals.passkey_min_length() - 1  # seq_len + 1 bytes per window
    evals.PasskeyMixer(nsa_data.WindowSampler(tokens, 2, shortest, seed=1), 1.0, seed=2).next_batch()
    with pytest.raises(ValueError, match=f"needs seq_len >= {shortest}, got seq_len = {shortest - 1}"):
        evals.PasskeyMixer(nsa_data.WindowSampler(tokens, 2, shortest - 1, seed=1), 0.5, seed=2)


def test_passkey_fraction_resume_is_exact(small_cfg, tmp_path):
    model = replace(SMALL, seq_len=128)
    k = 2
    cfg = replace(small_cfg, steps=2 * k, passkey_fraction=0.5)
    uninterrupted = train(model, cfg, tmp_path / "a", log=_quiet)
    assert uninterrupted.losses != train(model, replace(cfg, passkey_fraction=0.0), log=_quiet).losses
    train(model, replace(cfg, ckpt_every=k), tmp_path / "b", log=_quiet)
    nsa_train.main(["--resume", str(tmp_path / "b" / "checkpoints" / f"step_{k:07d}.state.pt"),
                    "--progress-seconds", "1e9"])
    assert _csv_losses(tmp_path / "b" / "metrics.csv") == uninterrupted.losses
    with pytest.raises(ValueError, match="passkey_fraction must be in"):
        train(model, replace(cfg, passkey_fraction=-0.1), log=_quiet)
    with pytest.raises(ValueError, match="passkey_fraction needs seq_len >= "):
        train(SMALL, cfg, log=_quiet)  # T = 64 holds no passkey document


@pytest.mark.parametrize("before, after", [(0.0, 0.5), (0.5, 0.0)])
def test_resume_adds_or_drops_passkey_documents(small_cfg, tmp_path, before, after):
    """A run resumed with passkey documents turned on (fine-tuning a finished run) or off continues
    its window stream: the steps before the checkpoint are kept, the ones after use the new mix."""
    model = replace(SMALL, seq_len=128)
    k = 2
    cfg = replace(small_cfg, steps=2 * k, ckpt_every=k, passkey_fraction=before)
    unchanged = train(model, cfg, tmp_path / "run", log=_quiet).losses
    before_losses = _csv_losses(tmp_path / "run" / "metrics.csv")[:k]
    nsa_train.main(["--resume", str(tmp_path / "run" / "checkpoints" / f"step_{k:07d}.state.pt"),
                    "--passkey-fraction", str(after), "--progress-seconds", "1e9"])
    resumed = _csv_losses(tmp_path / "run" / "metrics.csv")
    assert [s for s, _ in resumed] == list(range(1, 2 * k + 1)) and resumed[:k] == before_losses
    assert resumed[k:] != unchanged[k:]  # the new mix is in use after the checkpoint


def test_model_flags_set_the_model_and_stay_with_a_resumed_run(cache_dir, tmp_path):
    common = ["--preset", "tiny", "--seq-len", "64", "--batch-size", "2", "--eval-batches", "1", "--sample-tokens",
              "0", "--cache-dir", cache_dir, "--device", "cpu", "--progress-seconds", "1e9"]
    model_config, _, _ = nsa_train.resolve_configs(
        nsa_train.parse_args(common + ["--gate-floor", "0.1", "--selection-distill", "0.2", "--cmp-gate-bias", "-3"]))
    assert (model_config.gate_floor, model_config.selection_distill, model_config.cmp_gate_bias) == (0.1, 0.2, -3.0)
    default_config = nsa_train.resolve_configs(nsa_train.parse_args(common))[0]
    assert (default_config.gate_floor, default_config.cmp_gate_bias) == (0.0, None)
    nsa_train.main(common + ["--steps", "2", "--eval-every", "2", "--gate-floor", "0.1", "--cmp-gate-bias", "-3",
                             "--out", str(tmp_path / "a")])
    model = nsa_train.load_model(str(tmp_path / "a"))
    assert (model.config.gate_floor, model.config.cmp_gate_bias) == (0.1, -3.0)
    assert all(block.attn.gate_floor == 0.1 for block in model.blocks)
    resume = ["--resume", str(tmp_path / "a"), "--steps", "4"]
    assert nsa_train.resolve_configs(nsa_train.parse_args(resume + ["--gate-floor", "0.1"]))[0].gate_floor == 0.1
    with pytest.raises(SystemExit, match="--gate-floor cannot change the model of a resumed run"):
        nsa_train.resolve_configs(nsa_train.parse_args(resume + ["--gate-floor", "0.2"]))
    with pytest.raises(SystemExit, match="--cmp-gate-bias cannot change the model of a resumed run"):
        nsa_train.resolve_configs(nsa_train.parse_args(resume + ["--cmp-gate-bias", "-2"]))


def test_selection_distill_trains_logs_and_compiles(small_cfg, tmp_path):
    """--selection-distill: the weighted loss joins the objective (another trajectory than without),
    metrics.csv logs it (empty without), and activation checkpointing (eager: the same losses),
    compiled training (eager's losses to rounding; also checkpointed), DDP and FSDP2 with one rank
    keep it in the gradient."""
    distilled = replace(SMALL, selection_distill=0.5)
    cfg = replace(small_cfg, steps=3)
    result = train(distilled, cfg, tmp_path / "d", log=_quiet)
    plain = train(SMALL, cfg, tmp_path / "p", log=_quiet)
    logged = {run: [r["distill_loss"] for r in csv.DictReader(open(tmp_path / run / "metrics.csv"))] for run in "dp"}
    assert len(logged["d"]) == 3 and all(float(v) > 0 for v in logged["d"])
    assert logged["p"] == ["", "", ""]
    assert result.losses[0] == plain.losses[0]  # the first step's cross entropy: same weights, same batch
    assert result.losses[1:] != plain.losses[1:]
    assert train(distilled, replace(cfg, checkpoint_activations=True), log=_quiet).losses == result.losses
    with _group_of_one(tmp_path):
        assert train(distilled, cfg, ddp=True, log=_quiet).losses == result.losses
        fsdp = train(distilled, replace(cfg, parallel="fsdp"), log=_quiet)
    for (_, a), (_, b) in zip(fsdp.losses, result.losses):
        assert a == pytest.approx(b, rel=1e-6, abs=0)
    for checkpoint_activations in (False, True):
        torch._dynamo.reset()
        compiled = train(distilled, replace(cfg, compile=True, checkpoint_activations=checkpoint_activations),
                         log=_quiet)
        for (_, a), (_, b) in zip(compiled.losses, result.losses):
            assert a == pytest.approx(b, rel=1e-5, abs=0)
    for bad in (-1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="selection_distill must be a finite number >= 0"):
            replace(SMALL, selection_distill=bad)
    with pytest.raises(ValueError, match=r"gate_floor must be in \[0, 1\)"):
        replace(SMALL, gate_floor=1.0)
    for bad in (math.inf, math.nan, "-3"):
        with pytest.raises(ValueError, match="cmp_gate_bias must be None or a finite number"):
            replace(SMALL, cmp_gate_bias=bad)


def test_selection_distill_reaches_only_the_ranking_keys_of_the_model():
    """In the whole model (embedding, norms, earlier blocks) the distillation loss alone has a
    gradient only on the compressed keys' rows of each kv_proj and on phi's keys."""
    torch.manual_seed(0)
    model = LanguageModel(replace(SMALL, selection_distill=1.0)).train()
    model(torch.randint(256, (2, SMALL.seq_len)))
    model.selection_distill_loss().backward()
    key_rows = SMALL.n_kv_heads * SMALL.head_dim
    for name, p in model.named_parameters():
        grad = torch.zeros_like(p) if p.grad is None else p.grad
        if name.endswith("attn.kv_proj.weight"):
            assert grad[:key_rows].abs().max().item() > 0 and grad[key_rows:].abs().max().item() == 0, name
        elif ".attn.compress_k." in name:
            continue  # phi: its weight learns; its bias and position embedding have exactly zero gradient
        else:
            assert grad.abs().max().item() == 0, name
