"""Tests of nsa.module.NSAAttention (projections, RoPE, phi, gates, statistics) on the CPU op.

Small config throughout: l=8, d=4, l'=8, n=3 (1 initial + 1 local), w=12, so that scoring
matters from t = 24 on and sequences of ~40 tokens exercise every branch.
"""

import math

import pytest
import torch

import nsa.module as nsa_module
from nsa.module import (Compressor, NSAAttention, apply_rope, cmp_gather_index, gather_blocks, rope_cos_sin,
                        selection_distill_loss, strided_blocks)

CONFIG = dict(cmp_block=8, cmp_stride=4, sel_block=8, num_selected=3, num_init=1, num_local=1, window=12)
DIM, HQ, HKV, DK, DV = 32, 4, 2, 8, 6


def make_module(dtype=torch.float64, seed=0, **overrides):
    torch.manual_seed(seed)
    kwargs = dict(CONFIG, head_dim_qk=DK, head_dim_v=DV)
    kwargs.update(overrides)
    module = NSAAttention(DIM, HQ, HKV, **kwargs).to(dtype)
    # Perturb every parameter so that zero/identity inits (phi position embeddings, biases)
    # cannot hide wiring mistakes.
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return module


def kv_rows(module):
    """Row slices of kv_proj.weight per (branch, "k"|"v"): all branches' keys, then all values."""
    branches = module.kv_branches
    rows, start = {}, 0
    for kind, width in (("k", DK), ("v", DV)):
        for branch in branches:
            rows[branch, kind] = slice(start, start + HKV * width)
            start += HKV * width
    assert start == module.kv_proj.out_features
    return rows


def packed(lengths, device="cpu"):
    bounds = [0]
    for n in lengths:
        bounds.append(bounds[-1] + n)
    return torch.tensor(bounds, dtype=torch.int32, device=device)


def naive_rope(x, positions, theta):
    """Straightforward rotate-half RoPE, written apart from nsa.module: x [T, H, D], positions list."""
    half = x.shape[-1] // 2
    out = torch.empty_like(x)
    for row, pos in enumerate(positions):
        for k in range(half):
            angle = pos * theta ** (-2.0 * k / x.shape[-1])
            c, s = math.cos(angle), math.sin(angle)
            a, b = x[row, :, k], x[row, :, k + half]
            out[row, :, k] = a * c - b * s
            out[row, :, k + half] = b * c + a * s
    return out


class CaptureOp:
    """Stands in for nsa.module.nsa_attention: records its arguments, then calls the real op."""

    def __init__(self, monkeypatch):
        self.calls = []
        self.real = nsa_module.nsa_attention
        monkeypatch.setattr(nsa_module, "nsa_attention", self)

    def __call__(self, q, k, v, k_cmp, v_cmp, gates, k_win=None, v_win=None, **kwargs):
        self.calls.append(dict(q=q, k=k, v=v, k_cmp=k_cmp, v_cmp=v_cmp, gates=gates, k_win=k_win, v_win=v_win,
                               **kwargs))
        return self.real(q, k, v, k_cmp, v_cmp, gates, k_win, v_win, **kwargs)


def expected_forced_fraction(seqlens, batch=1):
    """Share of selected blocks that are forced, counted from the config alone (no scores)."""
    l_sel, n, n_init, n_local = (CONFIG[k] for k in ("sel_block", "num_selected", "num_init", "num_local"))
    forced_total = selected_total = 0
    for length in seqlens:
        for t in range(length):
            current = t // l_sel
            forced = {j for j in range(n_init)} | {current - k for k in range(n_local)}
            forced_total += len({j for j in forced if 0 <= j <= current})
            selected_total += min(n, current + 1)
    return forced_total / selected_total


# ---- shapes and batching ----------------------------------------------------------------------


def test_output_shape_padded_and_varlen():
    module = make_module(torch.float32)
    x = torch.randn(3, 40, DIM)
    assert module(x).shape == (3, 40, DIM)
    cu = packed([40, 7, 19])
    out = module(torch.randn(66, DIM), cu)
    assert out.shape == (66, DIM)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("share_window_kv", [False, True])
@pytest.mark.parametrize("phi", ["avg", "mlp"])
def test_varlen_matches_each_sequence_alone(phi, share_window_kv):
    module = make_module(phi=phi, share_window_kv=share_window_kv)
    lengths = [37, 5, 20, 1, 8, 44]
    x = torch.randn(sum(lengths), DIM, dtype=torch.float64)
    out = module(x, packed(lengths))
    for seq, (start, length) in enumerate(zip(packed(lengths).tolist(), lengths)):
        alone = module(x[None, start:start + length])[0]
        torch.testing.assert_close(out[start:start + length], alone, rtol=0, atol=1e-12,
                                   msg=lambda m: f"sequence {seq} (length {length}): {m}")


def test_padded_batch_rows_are_independent():
    module = make_module()
    x = torch.randn(3, 40, DIM, dtype=torch.float64)
    out = module(x)
    for b in range(3):
        torch.testing.assert_close(out[b], module(x[b:b + 1])[0], rtol=0, atol=1e-12)


# ---- gradients --------------------------------------------------------------------------------


@pytest.mark.parametrize("share_window_kv", [False, True])
@pytest.mark.parametrize("phi", ["avg", "linear", "mlp"])
def test_every_parameter_gets_a_gradient(phi, share_window_kv):
    module = make_module(torch.float32, phi=phi, share_window_kv=share_window_kv)
    branches = 2 if share_window_kv else 3
    assert module.kv_proj.out_features == branches * HKV * (DK + DV)
    x = torch.randn(2, 40, DIM, requires_grad=True)
    out = module(x)
    (out * torch.randn_like(out)).sum().backward()
    kv_grad = module.kv_proj.weight.grad
    for (branch, kind), rows in kv_rows(module).items():
        assert kv_grad[rows].abs().max() > 0, f"kv_proj rows of {branch} {kind}: gradient is all zero"
    params = dict(module.named_parameters())
    assert params, "module has no parameters"
    if phi != "avg":
        assert "compress_k.pos_emb" in params and "compress_v.pos_emb" in params
    for name, p in params.items():
        assert p.grad is not None, f"{name}: no gradient"
        assert torch.isfinite(p.grad).all(), f"{name}: non-finite gradient"
        assert p.grad.abs().max() > 0, f"{name}: gradient is all zero"
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().max() > 0


# ---- phi ---------------------------------------------------------------------------------------


def test_avg_phi_on_known_input():
    # l = 4, d = 2, T = 10: Tc = 4 windows starting at 0, 2, 4, 6 of raw tokens valued 0..9.
    raw = torch.arange(10, dtype=torch.float64)[:, None, None].expand(10, 3, 2)  # [T, H, D]
    index = cmp_gather_index(torch.arange(4) * 2, 4)
    assert index.tolist() == [[0, 1, 2, 3], [2, 3, 4, 5], [4, 5, 6, 7], [6, 7, 8, 9]]
    out = Compressor("avg", 4, 2, 1)(gather_blocks(raw, index))
    assert out.shape == (4, 3, 2)
    expected = torch.tensor([1.5, 3.5, 5.5, 7.5], dtype=torch.float64)[:, None, None].expand(4, 3, 2)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


@pytest.mark.parametrize("T, l, d", [(10, 4, 2), (77, 32, 16), (64, 32, 32), (31, 32, 16), (32, 32, 16)])
def test_strided_blocks_equal_the_gather(T, l, d):
    # The padded path's view (unfold) against the gather by index: same blocks, same gradient (the
    # overlapping windows' contributions summed) into raw.
    raw = torch.randn(2, T, 3, 5, dtype=torch.float64, requires_grad=True)  # [B, T, H, D]
    tc = (T - l) // d + 1 if T >= l else 0
    index = cmp_gather_index(torch.arange(tc) * d, l)
    viewed, gathered = strided_blocks(raw, l, d), gather_blocks(raw, index)
    assert viewed.shape == gathered.shape == (2, tc, l, 3, 5)
    torch.testing.assert_close(viewed, gathered, rtol=0, atol=0)
    weight = torch.randn_like(gathered)
    (grad_viewed,) = torch.autograd.grad((viewed * weight).sum(), raw)
    (grad_gathered,) = torch.autograd.grad((gathered * weight).sum(), raw)
    torch.testing.assert_close(grad_viewed, grad_gathered, rtol=0, atol=1e-12)


def test_linear_phi_starts_as_avg():
    blocks = torch.randn(2, 5, 8, 3, 6)  # [B, Tc, l, H, D]
    linear = Compressor("linear", 8, 6, 1)
    torch.testing.assert_close(linear(blocks), Compressor("avg", 8, 6, 1)(blocks), rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        linear.pos_emb.add_(1.0)  # the embedding enters before the (mean) map: shifts by its mean
    torch.testing.assert_close(linear(blocks), blocks.mean(dim=-3) + 1.0, rtol=1e-6, atol=1e-6)


def test_linear_phi_is_the_map_of_the_embedded_block():
    """The linear phi folds W vec(pos_emb) into its bias: its values and every gradient are those of
    Linear(vec(block + pos_emb)), with random weights and embedding."""
    torch.manual_seed(3)
    phi = Compressor("linear", 8, 6, 1).double()
    with torch.no_grad():
        for p in (phi.pos_emb, phi.net.weight, phi.net.bias):
            p.normal_()
    blocks = torch.randn(2, 5, 8, 3, 6, dtype=torch.float64, requires_grad=True)  # [B, Tc, l, H, D]
    explicit = phi.net((blocks + phi.pos_emb[:, None, :]).movedim(-3, -2).flatten(-2))
    folded = phi(blocks)
    torch.testing.assert_close(folded, explicit, rtol=1e-12, atol=1e-12)
    upstream = torch.randn_like(folded)
    wrt = (blocks, phi.pos_emb, phi.net.weight, phi.net.bias)
    for got, want in zip(torch.autograd.grad(folded, wrt, upstream), torch.autograd.grad(explicit, wrt, upstream)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_module_feeds_avg_of_rope_keys_to_the_op(layout, monkeypatch):
    """k_cmp / v_cmp given to the op are the hand-computed window means of the cmp branch's
    RoPE'd raw keys and raw values (recomputed here from kv_proj's documented row layout)."""
    module = make_module(phi="avg")
    l, d, theta = CONFIG["cmp_block"], CONFIG["cmp_stride"], module.rope_theta
    lengths = [37] if layout == "padded" else [37, 6, 21]
    x = torch.randn(sum(lengths), DIM, dtype=torch.float64)
    capture = CaptureOp(monkeypatch)
    if layout == "padded":
        module(x[None])
        k_cmp, v_cmp = capture.calls[0]["k_cmp"][0], capture.calls[0]["v_cmp"][0]
    else:
        module(x, packed(lengths))
        k_cmp, v_cmp = capture.calls[0]["k_cmp"], capture.calls[0]["v_cmp"]
    rows = kv_rows(module)
    keys_weight = module.kv_proj.weight[rows["cmp", "k"]]
    values_weight = module.kv_proj.weight[rows["cmp", "v"]]
    expected_k, expected_v = [], []
    start = 0
    for length in lengths:
        rows = x[start:start + length]
        keys = naive_rope((rows @ keys_weight.T).view(length, HKV, DK), range(length), theta)
        values = (rows @ values_weight.T).view(length, HKV, DV)
        for i in range((length - l) // d + 1 if length >= l else 0):
            expected_k.append(keys[i * d:i * d + l].mean(0))
            expected_v.append(values[i * d:i * d + l].mean(0))
        start += length
    torch.testing.assert_close(k_cmp, torch.stack(expected_k), rtol=0, atol=1e-12)
    torch.testing.assert_close(v_cmp, torch.stack(expected_v), rtol=0, atol=1e-12)


# ---- RoPE --------------------------------------------------------------------------------------


def test_rope_matches_straightforward_implementation():
    x = torch.randn(50, 3, 16, dtype=torch.float64)
    positions = torch.arange(50) * 7 + 3
    cos, sin = rope_cos_sin(positions, 16, 500.0, x.dtype)
    torch.testing.assert_close(apply_rope(x, cos, sin), naive_rope(x, positions.tolist(), 500.0),
                               rtol=0, atol=1e-12)


def test_rope_scores_depend_only_on_relative_position():
    q, k = torch.randn(2, 1, 1, 32, dtype=torch.float64).unbind(0)  # [1, 1, D] each

    def score(m, n):
        cos_m, sin_m = rope_cos_sin(torch.tensor([m]), 32, 10000.0, torch.float64)
        cos_n, sin_n = rope_cos_sin(torch.tensor([n]), 32, 10000.0, torch.float64)
        return (apply_rope(q, cos_m, sin_m) * apply_rope(k, cos_n, sin_n)).sum().item()

    for m, n in [(5, 2), (2, 5), (100, 37), (0, 0)]:
        base = score(m, n)
        for shift in (1, 13, 1000):
            assert score(m + shift, n + shift) == pytest.approx(base, rel=1e-10, abs=1e-10)
    assert abs(score(5, 2) - score(6, 2)) > 1e-6  # and it does depend on the difference


def test_module_applies_rope_per_sequence(monkeypatch):
    module = make_module()
    lengths = [9, 30]
    x = torch.randn(sum(lengths), DIM, dtype=torch.float64)
    capture = CaptureOp(monkeypatch)
    module(x, packed(lengths))
    q = capture.calls[0]["q"]
    raw_q = module.q_proj(x).view(-1, HQ, DK)
    torch.testing.assert_close(q[:9], naive_rope(raw_q[:9], range(9), module.rope_theta), rtol=0, atol=1e-12)
    torch.testing.assert_close(q[9:], naive_rope(raw_q[9:], range(30), module.rope_theta), rtol=0, atol=1e-12)
    # the selection and window keys are RoPE'd too
    for branch, arg in (("slc", "k"), ("win", "k_win")):
        raw_k = (x @ module.kv_proj.weight[kv_rows(module)[branch, "k"]].T).view(-1, HKV, DK)
        torch.testing.assert_close(capture.calls[0][arg][9:], naive_rope(raw_k[9:], range(30), module.rope_theta),
                                   rtol=0, atol=1e-12)


@pytest.mark.parametrize("share_window_kv", [False, True])
def test_branch_keys_and_values_reach_the_op(share_window_kv, monkeypatch):
    """slc gets its own projection; win gets its own one, or (share_window_kv) none: k_win = v_win = None."""
    module = make_module(share_window_kv=share_window_kv)
    x = torch.randn(1, 20, DIM, dtype=torch.float64)
    capture = CaptureOp(monkeypatch)
    module(x)
    call, rows, weight = capture.calls[0], kv_rows(module), module.kv_proj.weight
    torch.testing.assert_close(call["v"], (x @ weight[rows["slc", "v"]].T).view(1, 20, HKV, DV), rtol=0, atol=1e-12)
    if share_window_kv:
        assert call["k_win"] is None and call["v_win"] is None
    else:
        torch.testing.assert_close(call["v_win"], (x @ weight[rows["win", "v"]].T).view(1, 20, HKV, DV),
                                   rtol=0, atol=1e-12)
        assert (call["k_win"] - call["k"]).abs().max() > 1e-3


# ---- statistics --------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_statistics(layout):
    module = make_module(collect_stats=True)
    plain = make_module(collect_stats=False)
    assert module.last_stats is None and plain.last_stats is None
    lengths = [40, 40] if layout == "padded" else [40, 13, 27]
    x = torch.randn(sum(lengths), DIM, dtype=torch.float64)
    if layout == "padded":
        out, out_plain = module(x.view(2, 40, DIM)), plain(x.view(2, 40, DIM))
    else:
        out, out_plain = module(x, packed(lengths)), plain(x, packed(lengths))
    torch.testing.assert_close(out, out_plain, rtol=0, atol=0)  # statistics do not change the output
    assert plain.last_stats is None
    stats = module.last_stats
    assert set(stats) == {"gate_mean_cmp", "gate_mean_slc", "gate_mean_win", "gate_entropy", "forced_fraction",
                          "scored_fraction"}
    assert all(isinstance(v, float) for v in stats.values())

    gates = torch.sigmoid(module.gate_proj(x)).view(-1, HQ, 3)
    for c, name in enumerate(("cmp", "slc", "win")):
        assert 0.0 <= stats[f"gate_mean_{name}"] <= 1.0
        assert stats[f"gate_mean_{name}"] == pytest.approx(gates[..., c].mean().item(), abs=1e-12)
    entropy = -(gates * gates.log() + (1 - gates) * (1 - gates).log()).mean().item()
    assert 0.0 <= stats["gate_entropy"] <= math.log(2)
    assert stats["gate_entropy"] == pytest.approx(entropy, abs=1e-12)
    assert stats["forced_fraction"] + stats["scored_fraction"] == pytest.approx(1.0, abs=1e-12)
    assert stats["forced_fraction"] == pytest.approx(expected_forced_fraction(lengths), abs=1e-12)
    assert 0.0 < stats["scored_fraction"] < 1.0


def test_cmp_gate_bias_sets_the_compressed_gates_initial_bias():
    """cmp_gate_bias b: every head's compressed-branch gate logit starts with bias b (sigmoid(b) for
    x = 0); the other gates keep nn.Linear's init, as does everything with None. Non-finite or
    non-numbers are refused."""
    kwargs = dict(CONFIG, head_dim_qk=DK, head_dim_v=DV)
    torch.manual_seed(0)
    default = NSAAttention(DIM, HQ, HKV, **kwargs)
    torch.manual_seed(0)
    shut = NSAAttention(DIM, HQ, HKV, cmp_gate_bias=-3.0, **kwargs)
    bias, default_bias = shut.gate_proj.bias.view(HQ, 3), default.gate_proj.bias.view(HQ, 3)
    assert torch.all(bias[:, 0] == -3.0)
    torch.testing.assert_close(bias[:, 1:], default_bias[:, 1:], rtol=0, atol=0)
    torch.testing.assert_close(shut.gate_proj.weight, default.gate_proj.weight, rtol=0, atol=0)
    gates = shut._gates(shut.gate_proj(torch.zeros(1, DIM)).unflatten(-1, (HQ, 3)))
    torch.testing.assert_close(gates[..., 0], torch.full((1, HQ), torch.sigmoid(torch.tensor(-3.0)).item()))
    for bad in (float("inf"), float("nan"), "-3", True):
        with pytest.raises(ValueError, match="cmp_gate_bias"):
            NSAAttention(DIM, HQ, HKV, cmp_gate_bias=bad, **kwargs)


@pytest.mark.parametrize("floor", [0.0, 0.3])
def test_gate_floor_raises_every_gate(monkeypatch, floor):
    """gate_floor f: the op (prefill and cache path) gets the gates f + (1 - f) sigmoid(z), and the
    statistics report their means; f = 0 is the plain sigmoid. Other values are refused."""
    seen = []
    for name in ("nsa_attention", "nsa_attention_kvcache"):
        real = getattr(nsa_module, name)
        monkeypatch.setattr(nsa_module, name, lambda *args, _real=real, **kwargs: (seen.append(args[5]),
                                                                                    _real(*args, **kwargs))[1])
    module = make_module(gate_floor=floor, collect_stats=True)
    x = torch.randn(1, 20, DIM, dtype=torch.float64)
    expected = floor + (1 - floor) * torch.sigmoid(module.gate_proj(x)).unflatten(-1, (HQ, 3))
    module(x)
    module(x, cache=module.new_cache(1, 20))
    assert len(seen) == 2
    for gates in seen:
        torch.testing.assert_close(gates, expected, rtol=0, atol=1e-15)
        assert gates.min().item() >= floor
    for c, name in enumerate(("cmp", "slc", "win")):
        assert module.last_stats[f"gate_mean_{name}"] == pytest.approx(expected[..., c].mean().item(), abs=1e-12)
    for bad in (-0.1, 1.0, "0.5", float("nan")):
        with pytest.raises(ValueError, match="gate_floor"):
            make_module(gate_floor=bad)

    # Branches held off: their gates are 0 in both paths and in the statistics; [] restores them.
    seen.clear()
    module.set_branches_off(["win", "cmp"])
    assert module.branches_off == ("cmp", "win")
    module(x)
    module(x, cache=module.new_cache(1, 20))
    for gates in seen:
        only_slc = expected * torch.tensor([0.0, 1.0, 0.0], dtype=gates.dtype)
        torch.testing.assert_close(gates, only_slc, rtol=0, atol=1e-15)
    assert module.last_stats["gate_mean_cmp"] == 0 and module.last_stats["gate_mean_win"] == 0
    module.set_branches_off([])
    seen.clear()
    module(x)
    torch.testing.assert_close(seen[0], expected, rtol=0, atol=1e-15)
    with pytest.raises(ValueError, match="branches"):
        module.set_branches_off(["window"])


def naive_selection_distill(q, k_slc, k_cmp, cfg, positions):
    """selection_distill_loss position by position and head by head, from the definitions."""
    l, d, ls = cfg["cmp_block"], cfg["cmp_stride"], cfg["sel_block"]
    B, T, hq, dk = q.shape
    hkv, tc = k_slc.shape[2], k_cmp.shape[1]
    G, blocks, scale = hq // hkv, -(-T // ls), dk ** -0.5
    total, count = 0.0, 0
    for b in range(B):
        for t in positions:
            current = t // ls
            vis = [i for i in range(tc) if i * d + l - 1 <= t]
            covered = {j for i in vis for j in range(blocks) if min(i * d + l, (j + 1) * ls) > max(i * d, j * ls)}
            decided = [j for j in covered if cfg["num_init"] <= j <= current - cfg["num_local"]]
            for h in range(hkv):
                target, ranking = [0.0] * blocks, [0.0] * blocks
                for g in range(G):
                    qv = q[b, t, h * G + g].double()
                    p = torch.softmax(torch.stack([qv @ k_slc[b, s, h].double() * scale for s in range(t + 1)]), 0)
                    for s in range(t + 1):
                        target[s // ls] += p[s].item()
                    pc = torch.softmax(torch.stack([qv @ k_cmp[b, i, h].double() * scale for i in vis]), 0)
                    for i, pi in zip(vis, pc):
                        for j in range(blocks):
                            ranking[j] += pi.item() * max(0, min(i * d + l, (j + 1) * ls) - max(i * d, j * ls)) / d
                tsum, rsum = sum(target[j] for j in decided), sum(ranking[j] for j in decided)
                total += sum(target[j] / tsum * math.log((target[j] / tsum) / (ranking[j] / rsum))
                             for j in decided if target[j] > 0)
                count += 1
    return total / count


@pytest.mark.parametrize("num_local", [1, 0])  # 0: the current block is decided, its newest tokens not compressed
def test_selection_distill_loss_matches_its_definition_and_trains_only_the_compressed_keys(num_local):
    cfg = dict(CONFIG, num_selected=3, num_init=1, num_local=num_local)  # l 8, d 4, l' 8: from t = 24 on
    B, T = 2, 45
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(B, T, HQ, DK, dtype=torch.float64, generator=gen, requires_grad=True)
    k_slc = torch.randn(B, T, HKV, DK, dtype=torch.float64, generator=gen, requires_grad=True)
    k_cmp = torch.randn(B, (T - 8) // 4 + 1, HKV, DK, dtype=torch.float64, generator=gen, requires_grad=True)
    loss = selection_distill_loss(q, k_slc, k_cmp, cfg, num_positions=5)
    positions = torch.linspace(24, T - 1, 5).round().long().tolist()  # from n l' = 24 to T - 1
    assert loss.item() == pytest.approx(naive_selection_distill(q, k_slc, k_cmp, cfg, positions), rel=1e-5)
    assert loss.item() > 0
    loss.backward()
    assert q.grad is None and k_slc.grad is None  # detached: only the ranking's keys learn
    assert k_cmp.grad.abs().max().item() > 0
    # No position past n l', no positions asked for, or no slot the ranking fills (n = n_init + n_local):
    # zero, with k_cmp still in the graph.
    for short, positions, n in ((24, 5, 3), (T, 0, 3), (T, 5, 1 + num_local)):
        zero = selection_distill_loss(q[:, :short], k_slc[:, :short], k_cmp, dict(cfg, num_selected=n),
                                      num_positions=positions)
        assert zero.item() == 0 and zero.requires_grad
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # (the Eq. 9 weights once took it and met float32 scores)
    try:
        assert selection_distill_loss(q, k_slc, k_cmp, cfg, num_positions=5).item() == pytest.approx(loss.item())
    finally:
        torch.set_default_dtype(default)


def test_module_selection_distill_runs_in_training_forwards_only():
    module = make_module(selection_distill=4, num_selected=3, phi="linear")
    x = torch.randn(2, 40, DIM, dtype=torch.float64, requires_grad=True)
    module.train()
    module(x)
    aux = module.aux_loss
    assert aux is not None and aux.item() > 0
    aux.backward()
    # Only the compressed keys' projection rows (kv_proj's first Hkv * Dk) and phi learn from it.
    assert module.compress_k.net.weight.grad.abs().max().item() > 0
    key_rows = HKV * DK
    assert module.kv_proj.weight.grad[:key_rows].abs().max().item() > 0
    assert module.kv_proj.weight.grad[key_rows:].abs().max().item() == 0
    assert x.grad is None and module.q_proj.weight.grad is None and module.compress_v.net.weight.grad is None
    with torch.no_grad():
        module(x)
    assert module.aux_loss is None
    module.eval()
    module(x)
    assert module.aux_loss is None
    module.train()
    with pytest.raises(ValueError, match="selection_distill supports padded batches"):
        module(x.flatten(0, 1), packed([40, 40]))
    plain = make_module()
    plain(x)
    assert plain.training and plain.aux_loss is None  # off by default
    with pytest.raises(ValueError, match="selection_distill"):
        make_module(selection_distill=-1)


# ---- edge cases and causality ------------------------------------------------------------------


def test_sequence_shorter_than_cmp_block():
    module = make_module(phi="mlp")
    x = torch.randn(2, 5, DIM, dtype=torch.float64, requires_grad=True)  # T = 5 < l = 8: Tc = 0
    out = module(x)
    assert out.shape == (2, 5, DIM) and torch.isfinite(out).all()
    out.square().sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().max() > 0
    # Nothing is compressed, so the cmp branch's key/value rows of kv_proj get no gradient.
    grad, rows = module.kv_proj.weight.grad, kv_rows(module)
    assert (grad[rows["cmp", "k"]] == 0).all() and (grad[rows["cmp", "v"]] == 0).all()
    assert grad[rows["slc", "k"]].abs().max() > 0
    # Packed sequences that are all short: no compressed tokens in the whole batch.
    lengths = [3, 7, 1]
    xs = torch.randn(11, DIM, dtype=torch.float64)
    out = module(xs, packed(lengths))
    torch.testing.assert_close(out[3:10], module(xs[None, 3:10])[0], rtol=0, atol=1e-12)


@pytest.mark.parametrize("share_window_kv", [False, True])
def test_causality(share_window_kv):
    module = make_module(phi="mlp", share_window_kv=share_window_kv)
    x = torch.randn(2, 48, DIM, dtype=torch.float64)
    out = module(x)
    for t in (0, 6, 7, 23, 31, 40):
        x2 = x.clone()
        x2[:, t + 1:] = torch.randn_like(x2[:, t + 1:])
        out2 = module(x2)
        torch.testing.assert_close(out2[:, :t + 1], out[:, :t + 1], rtol=0, atol=1e-12,
                                   msg=lambda m: f"t = {t}: {m}")
        assert (out2[:, t + 1:] - out[:, t + 1:]).abs().max() > 1e-3  # the change did reach later rows


@pytest.mark.parametrize("kwargs, name", [
    (dict(num_q_heads=6, num_kv_heads=4), "num_q_heads"),
    (dict(num_kv_heads=0), "num_kv_heads"),
    (dict(dim=0), "dim"),
    (dict(head_dim_qk=7), "head_dim_qk"),
    (dict(head_dim_qk=0), "head_dim_qk"),
    (dict(head_dim_v=0), "head_dim_v"),
    (dict(phi="max"), "phi"),
    (dict(phi_hidden=0), "phi_hidden"),
    (dict(cmp_stride=3), "cmp_stride"),
    (dict(cmp_block=8, cmp_stride=8, sel_block=12), "cmp_stride"),
    (dict(num_selected=1, num_init=1, num_local=2), "num_selected"),
    (dict(window=0), "window"),
    (dict(num_local=-1), "num_local"),
    (dict(cmp_block=2.5), "cmp_block"),
    (dict(rope_theta=0.0), "rope_theta"),
    (dict(rope_theta=float("nan")), "rope_theta"),
])
def test_bad_constructor_arguments(kwargs, name):
    args = dict(dim=DIM, num_q_heads=HQ, num_kv_heads=HKV)
    args.update(kwargs)
    with pytest.raises(ValueError, match=rf"\b{name}\b"):
        NSAAttention(**args)


def test_bad_forward_inputs():
    module = make_module(torch.float32)
    with pytest.raises(ValueError, match="x must be"):
        module(torch.randn(40, DIM))
    with pytest.raises(ValueError, match="cu_seqlens"):
        module(torch.randn(40, DIM), torch.tensor([0, 40]))  # int64
    with pytest.raises(ValueError, match="cu_seqlens"):
        module(torch.randn(40, DIM), packed([20, 19]))  # does not cover x


# ---- torch.compile -----------------------------------------------------------------------------


def test_torch_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    module = make_module(torch.float32, phi="linear")
    x = torch.randn(2, 40, DIM, requires_grad=True)
    weights = torch.randn(2, 40, DIM)

    def run(fn):
        out = fn(x)
        grads = torch.autograd.grad((out * weights).sum(), [x, *module.parameters()])
        return out.detach(), grads

    compiled = torch.compile(module, fullgraph=True)  # inductor
    out_c, grads_c = run(compiled)
    out_e, grads_e = run(module)
    torch.testing.assert_close(out_c, out_e, rtol=1e-5, atol=1e-5)
    names = ["x"] + [name for name, _ in module.named_parameters()]
    for name, g_c, g_e in zip(names, grads_c, grads_e):
        torch.testing.assert_close(g_c, g_e, rtol=1e-4, atol=1e-5, msg=lambda m: f"grad of {name}: {m}")
