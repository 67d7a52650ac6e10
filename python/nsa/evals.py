"""Synthetic evaluations of the showcase model: passkey retrieval, and how fast a model learns to copy.

``python -m nsa.evals passkey --checkpoint RUN_DIR [--lengths 2048,4096,...] [--depths ...] [--set window=N]``
``python -m nsa.evals induction [--attn nsa|dense] [--cmp-gate-bias B] [--branch-off NAME] [--steps 600]``

A prompt of exactly L bytes is filler text with one needle, "The pass key is 31415. Remember it.
31415 is the pass key.", placed so that it starts at fraction ``depth`` of the filler, and ends
with "What is the pass key? The pass key is". The model continues it greedily for as many bytes
as the key has; a trial is correct when they are the key. The report is the accuracy per
(context length, depth): a model that only uses its local window answers at chance (about 0 for
5-digit keys) once the needle is farther back than its window; NSA's compressed and selected
branches are what can reach it. Beside it, the key's negative log-likelihood (teacher forced,
nats per byte) as the answer, a graded measure that shows partial retrieval (some digits copied)
where the exact answer scores 0 (ln 10 = 2.30 is a uniform guess among the digits), and as the
needle's own second copy of the key, 20 bytes after the first: whether the model copies at all.
Lengths past the training length test extrapolation (the model sees the whole prompt and its
answer so far: ``generate(..., max_context=L + digits)``).

``--set window=N`` / ``--set num_selected=N`` evaluate an NSA model with another window or block
count than it was trained with (``apply_settings``): a diagnostic of which branch holds what the
model retrieves. With the window as long as the prompt the window branch is full causal attention,
and so is the selected branch with ``num_selected`` >= length / l'. ``--branch-off NAME`` (cmp, slc
or win; repeatable) holds that branch's gate at 0: which branch carries the retrieval.

``induction`` trains a fresh model (the ``tiny`` preset's shape by default, on the CPU) on sequences
of a random span repeated, with the loss on the repeats only: bytes that only copying from one span
back predicts, the job of induction heads, which the passkey's retrieval needs too. It prints the
loss every ``--every`` steps and the step from which it stays below 0.1: a quick comparison of how
soon each attention (or NSA setting) learns to copy (docs/training.md).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
import random
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .data import inputs_and_targets
from .model import PRESETS, LanguageModel, ModelConfig, generate
from .module import BRANCHES, NSAAttention

FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. ")
QUESTION = " What is the pass key? The pass key is "


def needle(key: str) -> str:
    return f" The pass key is {key}. Remember it. {key} is the pass key. "


def passkey_prompt(length: int, depth: float, key: str) -> bytes:
    """A prompt of exactly ``length`` bytes with the needle starting at fraction ``depth`` (0 =
    the start, 1 = just before the question) of the filler."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"passkey_prompt: depth must be in [0, 1], got {depth}")
    fill = length - len(needle(key)) - len(QUESTION)
    if fill < 0:
        raise ValueError(f"passkey_prompt: length {length} is shorter than the needle and the question "
                         f"({length - fill} bytes)")
    filler = (FILLER * (fill // len(FILLER) + 1))[:fill]
    at = round(depth * fill)
    return (filler[:at] + needle(key) + filler[at:] + QUESTION).encode()


def passkey_min_length(digits: int = 5) -> int:
    """Bytes of the shortest passkey document (no filler) with a ``digits``-digit key."""
    return len(needle("0" * digits)) + len(QUESTION) + digits


def check_passkey_mix(fraction: float, seq_len: int, digits: int = 5, caller: str = "PasskeyMixer") -> None:
    """Raises ValueError unless ``fraction`` is in [0, 1] and, where it is > 0, windows of
    ``seq_len`` + 1 bytes hold a passkey document."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"{caller}: passkey_fraction must be in [0, 1], got {fraction}")
    if fraction > 0 and seq_len + 1 < passkey_min_length(digits):
        raise ValueError(f"{caller}: passkey_fraction needs seq_len >= {passkey_min_length(digits) - 1}, "
                         f"got seq_len = {seq_len}")


def passkey_document(length: int, depth: float, key: str) -> bytes:
    """The evaluation's prompt followed by its answer: exactly ``length`` bytes, ending in ``key``."""
    return passkey_prompt(length - len(key), depth, key) + key.encode()


class PasskeyMixer:
    """Training batches with passkey documents mixed in: wraps a ``WindowSampler`` and replaces each
    of its windows, with probability ``fraction``, by ``passkey_document(seq_len + 1, depth, key)``
    for a uniform depth and a uniform ``digits``-digit key: training on them is meant to teach the
    retrieval that ``evaluate_passkey`` measures. Seeded (its own generator). ``state_dict`` is the
    sampler's plus the key "passkey", so either sampler loads the other's state (a run resumed with
    passkey documents turned on or off) and a resumed run draws the same batches."""

    def __init__(self, sampler, fraction: float, seed: int, digits: int = 5):
        check_passkey_mix(fraction, sampler.seq_len, digits)
        self.sampler, self.fraction, self.digits = sampler, fraction, digits
        self.generator = torch.Generator().manual_seed(seed)

    def next_batch(self):
        windows = self.sampler.next_windows()
        replace = torch.rand(windows.shape[0], generator=self.generator) < self.fraction
        for row in replace.nonzero().flatten().tolist():
            depth = torch.rand((), generator=self.generator).item()
            key = f"{torch.randint(10 ** self.digits, (), generator=self.generator).item():0{self.digits}d}"
            document = passkey_document(windows.shape[1], depth, key)
            windows[row] = torch.frombuffer(bytearray(document), dtype=torch.uint8).to(torch.int64)
        return inputs_and_targets(windows, self.sampler.device)

    def state_dict(self):
        return {**self.sampler.state_dict(), "passkey": self.generator.get_state()}

    def load_state_dict(self, state) -> None:
        self.sampler.load_state_dict(state)
        if "passkey" in state:  # else a plain sampler's: this generator stays as seeded
            self.generator.set_state(state["passkey"])


def key_nll(model: LanguageModel, prompt: bytes, key: str) -> Tuple[float, float]:
    """Mean negative log-likelihoods, in nats per byte, of ``key``'s bytes (answer, copy): as the
    answer following ``prompt`` and as the needle's second copy in it, which copying from a few
    bytes back predicts. One teacher-forced forward over prompt + key (bfloat16 autocast on CUDA,
    as ``generate``)."""
    device = next(model.parameters()).device
    ids = torch.tensor(list(prompt + key.encode()), dtype=torch.long, device=device)[None]
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        logits = model(ids[:, :-1])[0]  # [len - 1, vocab]: row i predicts byte i + 1
    nll = -torch.log_softmax(logits.float(), dim=-1).gather(-1, ids[0, 1:, None])[:, 0]
    copy_at = prompt.rindex(key.encode())  # the needle's second copy: the prompt holds the key nowhere else
    return nll[-len(key):].mean().item(), nll[copy_at - 1:copy_at - 1 + len(key)].mean().item()


# The measures of a passkey evaluation, per (length, depth): name -> what the table's title says.
PASSKEY_MEASURES = {
    "accuracy": "accuracy (the greedy answer is the key)",
    "key_nll": "key NLL as the answer, nats per byte (ln 10 = 2.30: a uniform guess among the digits)",
    "copy_nll": "key NLL as the needle's second copy, nats per byte (copying from 20 bytes back)",
}


def evaluate_passkey(model: LanguageModel, lengths: Sequence[int], depths: Sequence[float], trials: int,
                     seed: int = 0, digits: int = 5, log=print) -> Dict[str, Dict[Tuple[int, float], float]]:
    """Per measure of PASSKEY_MEASURES, per (length, depth), over ``trials`` random keys of ``digits``
    digits: the accuracy of the greedy answer and the means of ``key_nll``'s two likelihoods."""
    rng = random.Random(seed)
    results = {name: {} for name in PASSKEY_MEASURES}
    for length in lengths:
        for depth in depths:
            start, sums = time.perf_counter(), dict.fromkeys(PASSKEY_MEASURES, 0.0)
            for _ in range(trials):
                key = f"{rng.randrange(10 ** digits):0{digits}d}"
                prompt = passkey_prompt(length, depth, key)
                answer = generate(model, prompt, digits, greedy=True, max_context=length + digits)
                sums["accuracy"] += answer == key.encode()
                answer_nll, copy_nll = key_nll(model, prompt, key)
                sums["key_nll"] += answer_nll
                sums["copy_nll"] += copy_nll
            for name, total in sums.items():
                results[name][(length, depth)] = total / trials
            log(f"passkey length {length} depth {depth:.2f}: {round(sums['accuracy'])}/{trials}, key NLL "
                f"{sums['key_nll'] / trials:.2f} as the answer, {sums['copy_nll'] / trials:.2f} as the needle's "
                f"copy ({time.perf_counter() - start:.1f} s)")
    return results


# The NSA settings an evaluation may change (the op's window w and selected-block count n).
INFERENCE_SETTINGS = ("window", "num_selected")


def parse_settings(items: Sequence[str]) -> Dict[str, int]:
    """``["window=2048", "num_selected=32"]`` -> ``{"window": 2048, "num_selected": 32}``."""
    settings = {}
    for item in items:
        key, sep, value = (part.strip() for part in item.partition("="))
        if not sep or key not in INFERENCE_SETTINGS or not (value.isascii() and value.isdigit()):
            raise ValueError(f"--set takes KEY=N with KEY one of {', '.join(INFERENCE_SETTINGS)} and N a positive "
                             f"integer, got {item!r}")
        settings[key] = int(value)
    return settings


def apply_settings(model: LanguageModel, settings: Dict[str, int], branches_off: Sequence[str] = ()) -> None:
    """Sets ``settings`` (keys of INFERENCE_SETTINGS) in every NSAAttention layer of ``model`` and in
    its config, as if it had been built with them, and holds the gates of ``branches_off`` at 0
    (NSAAttention.set_branches_off); the weights are unchanged."""
    layers = [m for m in model.modules() if isinstance(m, NSAAttention)]
    if (settings or branches_off) and not layers:
        raise ValueError(f"apply_settings: {', '.join(list(settings) + list(branches_off))} apply to NSA models; "
                         f"this one has {model.config.attn} attention")
    unknown = [b for b in branches_off if b not in BRANCHES]
    if unknown:
        raise ValueError(f"apply_settings: branches_off must be names in {BRANCHES}, got {list(branches_off)!r}")
    for key, value in settings.items():
        if key not in INFERENCE_SETTINGS:
            raise ValueError(f"apply_settings: {key!r} is not one of {', '.join(INFERENCE_SETTINGS)}")
        if value < 1:
            raise ValueError(f"apply_settings: {key} must be >= 1, got {value}")
    for layer in layers:  # (every layer has the model's config: the first refuses what all would)
        layer.update_op_config(**settings)
        layer.set_branches_off(branches_off)
    model.config = replace(model.config, **settings)


def format_table(cells: Dict[Tuple[int, float], float]) -> str:
    """A markdown table of ``cells`` (accuracy or key NLL): a row per length, a column per depth."""
    lengths = sorted({length for length, _ in cells})
    depths = sorted({depth for _, depth in cells})
    lines = ["| length | " + " | ".join(f"depth {d:.2f}" for d in depths) + " |",
             "|---|" + "---|" * len(depths)]
    for length in lengths:
        lines.append(f"| {length} | " + " | ".join(f"{cells[(length, d)]:.2f}" for d in depths) + " |")
    return "\n".join(lines)


def induction_curve(config: ModelConfig, steps: int, batch_size: int = 16, span: int = 24, lr: float = 3e-3,
                    seed: int = 0, every: int = 100, branches_off: Sequence[str] = (),
                    log=print) -> List[Tuple[int, float]]:
    """Trains a fresh ``LanguageModel(config)`` on the CPU (AdamW at ``lr``, no weight decay, float32)
    for ``steps`` steps of ``batch_size`` sequences of ``config.seq_len`` bytes: ``span`` random bytes
    repeated, the loss on the bytes that copying from one span back predicts (the repeats but their
    first). NSA layers hold ``branches_off`` at 0. Returns (step, that step's loss) every ``every``
    steps and at the last."""
    if not 0 < span < config.seq_len - 1:
        raise ValueError(f"induction_curve: span must be in [1, seq_len - 1) = [1, {config.seq_len - 1}), got {span}")
    torch.manual_seed(seed)
    model = LanguageModel(config)
    for layer in model.modules():
        if isinstance(layer, NSAAttention):
            layer.set_branches_off(branches_off)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed + 1)
    repeats = -(-(config.seq_len + 1) // span)
    curve = []
    for step in range(1, steps + 1):
        spans = torch.randint(0, config.vocab_size, (batch_size, span), generator=generator)
        tokens = spans.repeat(1, repeats)[:, :config.seq_len + 1]
        logits = model(tokens[:, :-1])
        # From the second repeat on: the first follows the span's last byte, whose earlier copy is none.
        loss = torch.nn.functional.cross_entropy(logits[:, span:].flatten(0, 1), tokens[:, span + 1:].flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % every == 0 or step == steps:
            curve.append((step, loss.item()))
            log(f"induction step {step}: loss {curve[-1][1]:.3f}")
    return curve


def _induction_main(args, parser) -> int:
    values = dict(PRESETS[args.preset]["model"], attn=args.attn, seq_len=args.seq_len)
    if args.cmp_gate_bias is not None:
        values["cmp_gate_bias"] = args.cmp_gate_bias
    try:
        config = ModelConfig.from_dict(values)
        print(f"induction: {args.attn} attention, {args.preset} shape at seq_len {args.seq_len}, span {args.span}, "
              f"{args.steps} steps of {args.batch_size}, lr {args.lr}"
              + (f", cmp gate bias {args.cmp_gate_bias}" if args.cmp_gate_bias is not None else "")
              + "".join(f", {branch} off" for branch in args.branch_off), flush=True)
        curve = induction_curve(config, args.steps, args.batch_size, args.span, args.lr, args.seed, args.every,
                                args.branch_off)
    except ValueError as e:
        parser.error(str(e))
    learned = next((step for i, (step, _) in enumerate(curve) if all(loss < 0.1 for _, loss in curve[i:])), None)
    print(f"copying learned (loss < 0.1 from then on) at step {learned}" if learned is not None
          else f"copying not learned in {args.steps} steps (final loss {curve[-1][1]:.3f})")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nsa.evals", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("passkey", help="passkey retrieval accuracy by context length and depth")
    p.add_argument("--checkpoint", required=True, help="a run directory or a checkpoint state file")
    p.add_argument("--lengths", default="2048,4096,8192,16384,32768", help="comma-separated prompt lengths (bytes)")
    p.add_argument("--depths", default="0,0.25,0.5,0.75,1", help="comma-separated needle depths in [0, 1]")
    p.add_argument("--trials", type=int, default=5, help="random keys per (length, depth)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--set", action="append", default=[], metavar="KEY=N",
                   help="evaluate with another window or num_selected than trained with (NSA; repeatable)")
    p.add_argument("--branch-off", action="append", default=[], choices=BRANCHES,
                   help="hold this branch's gate at 0 (NSA; repeatable): which branch retrieves")
    p.add_argument("--out-json", help="write {'rows': [{length, depth, accuracy, key_nll, copy_nll, trials}], ...} "
                                      "here")
    q = sub.add_parser("induction", help="how fast a fresh model learns to copy a repeated random span (CPU)")
    q.add_argument("--attn", default="nsa", choices=("nsa", "dense"))
    q.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="model shape (default tiny)")
    q.add_argument("--seq-len", type=int, default=64)
    q.add_argument("--span", type=int, default=24, help="random bytes, repeated to fill the sequence")
    q.add_argument("--steps", type=int, default=600)
    q.add_argument("--batch-size", type=int, default=16)
    q.add_argument("--lr", type=float, default=3e-3)
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--every", type=int, default=100, help="print the loss every N steps")
    q.add_argument("--cmp-gate-bias", type=float, help="ModelConfig.cmp_gate_bias (NSA)")
    q.add_argument("--branch-off", action="append", default=[], choices=BRANCHES,
                   help="hold this NSA branch's gate at 0 while training (repeatable)")
    args = parser.parse_args(argv)
    if args.command == "induction":
        if min(args.steps, args.batch_size, args.every) < 1:
            parser.error("--steps, --batch-size and --every must be >= 1")
        return _induction_main(args, parser)
    try:
        lengths = [int(x) for x in args.lengths.split(",") if x.strip()]
        depths = [float(x) for x in args.depths.split(",") if x.strip()]
    except ValueError:
        parser.error("--lengths takes integers and --depths numbers, comma-separated")
    if args.trials < 1 or not lengths or not depths:
        parser.error("--trials must be >= 1 and --lengths / --depths non-empty")
    try:
        settings = parse_settings(args.set)
    except ValueError as e:
        parser.error(str(e))

    from .train import load_model

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    model = load_model(args.checkpoint, device)
    try:
        apply_settings(model, settings, args.branch_off)
    except ValueError as e:
        parser.error(str(e))
    changed = "".join(f", {key}={value}" for key, value in settings.items())
    changed += "".join(f", {branch} off" for branch in args.branch_off)
    print(f"passkey: {args.checkpoint} ({model.config.attn} attention, trained at T={model.config.seq_len}{changed}) "
          f"on {device}, {args.trials} trials per cell", flush=True)
    results = evaluate_passkey(model, lengths, depths, args.trials, args.seed)
    for name, title in PASSKEY_MEASURES.items():
        print(f"{title}\n{format_table(results[name])}")
    if args.out_json:
        rows = [dict(length=length, depth=depth, **{name: results[name][(length, depth)] for name in PASSKEY_MEASURES},
                     trials=args.trials) for length, depth in sorted(results["accuracy"])]
        Path(args.out_json).write_text(json.dumps({"rows": rows, "checkpoint": args.checkpoint,
                                                   "attn": model.config.attn, "settings": settings,
                                                   "branches_off": args.branch_off,
                                                   "train_seq_len": model.config.seq_len}, indent=1) + "\n")
        print(f"wrote {args.out_json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
