"""The passkey evaluation (nsa.evals): prompt construction, scoring, the CLI on a saved run."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch

from nsa import evals
from nsa.model import PRESETS, LanguageModel, ModelConfig
from nsa.train import TrainConfig, train

TINY = ModelConfig(dim=32, n_layers=1, n_q_heads=2, n_kv_heads=1, head_dim=16, mlp_hidden=64, seq_len=64,
                   cmp_block=8, cmp_stride=4, sel_block=8, num_selected=4, window=16)


@pytest.mark.parametrize("length", [120, 257, 1000])
@pytest.mark.parametrize("depth", [0.0, 0.3, 1.0])
def test_prompt_has_the_length_the_needle_at_its_depth_and_the_question_last(length, depth):
    key = "04217"
    prompt = evals.passkey_prompt(length, depth, key).decode()
    assert len(prompt) == length
    assert prompt.endswith(evals.QUESTION)
    at = prompt.index(evals.needle(key))
    filler = length - len(evals.needle(key)) - len(evals.QUESTION)
    assert abs(at - depth * filler) <= 0.5
    assert prompt.count(key) == 2  # only the needle holds the key


def test_prompt_rejects_bad_arguments():
    with pytest.raises(ValueError, match="depth"):
        evals.passkey_prompt(200, 1.5, "12345")
    with pytest.raises(ValueError, match="shorter than the needle"):
        evals.passkey_prompt(90, 0.5, "12345")


def test_scoring_counts_exact_answers(monkeypatch):
    """A model that reads the key back scores 1, one that answers a wrong key scores 0; each cell's
    NLLs are the means of key_nll's two over its trials."""
    def reader(_model, prompt, n, **_kwargs):
        text = prompt.decode()
        start = text.index("The pass key is ") + len("The pass key is ")
        return text[start:start + n].encode()

    calls = []
    monkeypatch.setattr(evals, "key_nll", lambda _m, prompt, key: (calls.append(key) or float(len(calls)),
                                                                    -float(len(calls))))
    monkeypatch.setattr(evals, "generate", reader)
    perfect = evals.evaluate_passkey(None, [120, 300], [0.0, 0.5, 1.0], trials=3, log=lambda _m: None)
    assert set(perfect) == set(evals.PASSKEY_MEASURES)
    cells = {(length, depth) for length in (120, 300) for depth in (0.0, 0.5, 1.0)}
    assert all(set(perfect[name]) == cells for name in evals.PASSKEY_MEASURES)
    assert all(acc == 1.0 for acc in perfect["accuracy"].values())
    assert perfect["key_nll"][(120, 0.0)] == 2.0 and perfect["key_nll"][(300, 1.0)] == 17.0  # trials 1-3, 16-18
    assert perfect["copy_nll"][(300, 1.0)] == -17.0
    monkeypatch.setattr(evals, "generate", lambda _m, _p, n, **_k: b"x" * n)
    wrong = evals.evaluate_passkey(None, [120], [0.5], 2, log=lambda _m: None)
    assert all(acc == 0.0 for acc in wrong["accuracy"].values())


class _ConstantLogits(torch.nn.Module):
    """A stand-in model: the same logits at every position, high on the byte ``favored``."""

    def __init__(self, favored: int):
        super().__init__()
        self.logits = torch.nn.Parameter(torch.zeros(256))
        with torch.no_grad():
            self.logits[favored] = 30.0

    def forward(self, tokens):
        return self.logits.expand(*tokens.shape, 256)


def test_key_nll_scores_exactly_the_key_bytes():
    """Only the key's bytes are scored, as the answer and as the needle's second copy: a model sure
    of "7" has NLLs near 0 on the key 77777 (a byte next to either copy, never a 7, would cost 30
    nats) and about 30 nats per byte on 12345."""
    for key in ("77777", "12345"):
        prompt = evals.passkey_prompt(200, 0.5, key)
        answer, copy = evals.key_nll(_ConstantLogits(ord("7")), prompt, key)
        expected = 0.0 if key == "77777" else 30.0
        assert answer == pytest.approx(expected, abs=1e-4) and copy == pytest.approx(expected, abs=1e-4)
    uniform = _ConstantLogits(0)
    with torch.no_grad():
        uniform.logits.zero_()
    assert evals.key_nll(uniform, prompt, "12345") == pytest.approx((math.log(256), math.log(256)), abs=1e-5)


def test_random_model_answers_five_bytes_beyond_its_training_length():
    torch.manual_seed(0)
    model = LanguageModel(TINY).eval()
    results = evals.evaluate_passkey(model, [TINY.seq_len * 2], [0.0, 1.0], trials=1, log=lambda _m: None)
    assert all(0.0 <= a <= 1.0 for a in results["accuracy"].values()) and len(results["accuracy"]) == 2
    for name in ("key_nll", "copy_nll"):
        assert all(0.0 < value < 20.0 for value in results[name].values())


def test_cli_on_a_saved_run(tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"  # a small corpus: no stdlib token cache to build here
    corpus.write_text(evals.FILLER * 400)
    cfg = TrainConfig(preset="test", steps=2, batch_size=2, eval_every=1000, eval_batches=1, ckpt_every=1000,
                      sample_tokens=0, device="cpu", progress_seconds=1e9, data=str(corpus),
                      cache_dir=str(tmp_path / "cache"))
    train(TINY, cfg, tmp_path / "run", log=lambda _m: None)
    out = tmp_path / "passkey.json"
    assert evals.main(["passkey", "--checkpoint", str(tmp_path / "run"), "--lengths", "128,160", "--depths", "0,1",
                       "--trials", "1", "--device", "cpu", "--out-json", str(out), "--set", "window=160",
                       "--branch-off", "win"]) == 0
    result = json.loads(out.read_text())
    assert [(r["length"], r["depth"]) for r in result["rows"]] == [(128, 0.0), (128, 1.0), (160, 0.0), (160, 1.0)]
    assert all(r["key_nll"] > 0 and r["copy_nll"] > 0 for r in result["rows"])
    assert result["settings"] == {"window": 160} and result["branches_off"] == ["win"]
    printed = capsys.readouterr().out
    assert printed.count("| length | depth 0.00 | depth 1.00 |") == 3 and "window=160, win off" in printed
    assert all(title in printed for title in evals.PASSKEY_MEASURES.values())
    with pytest.raises(SystemExit):
        evals.main(["passkey", "--checkpoint", str(tmp_path / "run"), "--set", "num_selected=1", "--device", "cpu"])


def test_settings_give_the_model_built_with_them():
    """apply_settings(window, num_selected) on a model gives the outputs of a model built with
    those settings and the same weights, and they differ from the unchanged model's."""
    torch.manual_seed(1)
    model = LanguageModel(TINY).double().eval()
    changed = dict(window=48, num_selected=6)
    built = LanguageModel(replace(TINY, **changed)).double().eval()
    built.load_state_dict(model.state_dict())
    tokens = torch.randint(256, (1, TINY.seq_len))
    with torch.no_grad():
        before = model(tokens)
        evals.apply_settings(model, changed)
        torch.testing.assert_close(model(tokens), built(tokens), rtol=0, atol=0)
        assert not torch.allclose(before, model(tokens))
    assert model.config == built.config


def test_settings_are_checked():
    assert evals.parse_settings(["window=128", " num_selected = 8"]) == {"window": 128, "num_selected": 8}
    for bad in ("window", "window=x", "window=-3", "sel_block=64", "window=²"):
        with pytest.raises(ValueError, match="--set takes KEY=N"):
            evals.parse_settings([bad])
    nsa_model = LanguageModel(TINY)
    with pytest.raises(ValueError, match=r"num_selected \(1\) must be >= num_init \+ num_local"):
        evals.apply_settings(nsa_model, {"num_selected": 1})
    with pytest.raises(ValueError, match="window must be >= 1, got 0"):
        evals.apply_settings(nsa_model, {"window": 0})
    assert nsa_model.config == TINY  # nothing changed by the rejected calls
    with pytest.raises(ValueError, match="apply to NSA models; this one has dense attention"):
        evals.apply_settings(LanguageModel(replace(TINY, attn="dense")), {"window": 32})
    with pytest.raises(ValueError, match="apply to NSA models; this one has dense attention"):
        evals.apply_settings(LanguageModel(replace(TINY, attn="dense")), {}, ["slc"])
    with pytest.raises(ValueError, match="branches_off must be names in"):
        evals.apply_settings(nsa_model, {}, ["window"])
    evals.apply_settings(nsa_model, {}, ["slc"])
    assert all(block.attn.branches_off == ("slc",) for block in nsa_model.blocks)


def test_induction_curve_shows_dense_attention_learning_to_copy():
    """The repeated-span task is learnable: the tiny dense model copies (loss < 0.1) within 150
    steps, from a loss near ln 256 = 5.5 at the start."""
    config = ModelConfig.from_dict(dict(PRESETS["tiny"]["model"], attn="dense", seq_len=64))
    curve = evals.induction_curve(config, steps=150, every=50, log=lambda _m: None)
    assert [step for step, _ in curve] == [50, 100, 150]
    assert curve[0][1] > 1.0 and curve[-1][1] < 0.1
    with pytest.raises(ValueError, match="span must be in"):
        evals.induction_curve(config, steps=1, span=63)


def test_induction_cli_trains_nsa_with_its_options(capsys):
    assert evals.main(["induction", "--steps", "3", "--every", "2", "--seq-len", "40", "--span", "12",
                       "--cmp-gate-bias", "-3", "--branch-off", "slc"]) == 0
    printed = capsys.readouterr().out
    assert "nsa attention, tiny shape at seq_len 40, span 12, 3 steps of 16" in printed
    assert "cmp gate bias -3.0, slc off" in printed
    assert "induction step 2:" in printed and "induction step 3:" in printed
    assert "copying not learned in 3 steps" in printed
    with pytest.raises(SystemExit):
        evals.main(["induction", "--steps", "0"])
