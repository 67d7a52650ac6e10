"""Decode and chunked prefill through the KV cache (docs/decode.md): ``nsa.KVCache``, the incremental
mode of ``NSAAttention`` and ``DenseAttention``, and ``generate`` with a cache.

The contract (DESIGN.md section 1): queries at positions [t0, t0+m) against a cache holding [0, t0+m)
give the prefill result at those positions, with the same selected blocks. CPU tests run in float64
with a small config (l=16, d=8, l'=32, n=4, w=40: a compressed token is due every 8 tokens, the
scoring picks 1 of the non-forced blocks from t = 96 on); the CUDA test runs the paper's config in
bfloat16 at T = 4096.
"""

from __future__ import annotations

import copy
import functools
from dataclasses import replace

import pytest
import torch

import nsa.module as nsa_module
from nsa import KVCache, NSAAttention, NSAConfig, nsa_attention_kvcache, num_cmp_tokens
from nsa.model import DenseAttention, LanguageModel, ModelConfig, generate

from test_cuda import PAPER_BLOCKS, gpu_test

SMALL = dict(cmp_block=16, cmp_stride=8, sel_block=32, num_selected=4, num_init=1, num_local=2, window=40)
DIM, HKV, DK, DV = 32, 2, 8, 6


def make_module(group, *, dtype=torch.float64, device="cpu", seed=0, heads=HKV, dims=(DK, DV), config=SMALL,
                **overrides):
    """An NSAAttention with G = group query heads per kv head, every parameter perturbed (so that the
    zero / identity inits of phi and the biases cannot hide wiring mistakes)."""
    torch.manual_seed(seed)
    module = NSAAttention(DIM, group * heads, heads, head_dim_qk=dims[0], head_dim_v=dims[1], **config, **overrides)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return module.to(device=device, dtype=dtype)


def prefill_with_indices(module, x):
    """module(x) without autograd, and the block indices [.., T, Hkv, n] its op selected."""
    real = nsa_module.nsa_attention
    captured = []

    def capture(*args, return_indices=False, **kwargs):
        out, indices = real(*args, return_indices=True, **kwargs)
        captured.append(indices)
        return (out, indices) if return_indices else out

    nsa_module.nsa_attention = capture
    try:
        with torch.no_grad():
            out = module(x)
    finally:
        nsa_module.nsa_attention = real
    return out, captured[0]


@pytest.fixture(name="cached_indices")
def cached_indices_fixture(monkeypatch):
    """The block indices [B, m, Hkv, n] of every nsa_attention_kvcache call NSAAttention makes."""
    calls = []
    real = nsa_module.nsa_attention_kvcache

    def record(*args, **kwargs):
        out, indices = real(*args, **kwargs)
        calls.append(indices)
        return out, indices

    monkeypatch.setattr(nsa_module, "nsa_attention_kvcache", record)
    return calls


def run_chunks(module, x, cache, chunks, slots=None):
    """Feeds x [B, T, dim] through the cache in chunks of the given sizes (cycled); returns [B, T, dim]."""
    outs, start, sizes = [], 0, list(chunks)
    while start < x.shape[1]:
        m = sizes[len(outs) % len(sizes)]
        outs.append(module(x[:, start:start + m], cache=cache, slots=slots))
        start += m
    return torch.cat(outs, dim=1)


# --------------------------------------------------------------------------------------------
# The module: decode and chunked prefill equal prefill
# --------------------------------------------------------------------------------------------

T_CPU = 333
# G -> module options: every phi, a shared window, statistics.
VARIANTS = {1: dict(phi="linear"), 3: dict(phi="mlp", share_window_kv=True, collect_stats=True), 16: dict(phi="avg")}


@functools.lru_cache(maxsize=None)
def _prefill_case(group):
    """(module, x [2, T, dim], prefill output, prefill indices) for one G, computed once."""
    module = make_module(group, **VARIANTS[group])
    x = torch.randn(2, T_CPU, DIM, dtype=torch.float64, generator=torch.Generator().manual_seed(group))
    return (module, x) + prefill_with_indices(module, x)


@pytest.mark.parametrize("chunks", [(1,), (7,), (64,), (300,), (1, 15, 16, 17, 31, 33, 2)],
                         ids=["decode", "chunk7", "chunk64", "chunk300", "mixed"])
@pytest.mark.parametrize("group", [1, 3, 16], ids=["G1", "G3", "G16"])
def test_incremental_equals_prefill(cached_indices, group, chunks):
    """Token by token and in chunks (boundaries inside and across emission points, ragged last
    chunk) the cache path gives the prefill outputs at every position and the same blocks."""
    module, x, expected, expected_indices = _prefill_case(group)
    cache = module.new_cache(2, 16)  # small: grows several times on the way
    out = run_chunks(module, x, cache, chunks)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
    assert torch.equal(torch.cat(cached_indices, dim=1), expected_indices)
    assert cache.lengths() == [T_CPU, T_CPU]
    assert cache.cmp_lengths() == [num_cmp_tokens(T_CPU, 16, 8)] * 2
    if module.collect_stats:
        stats = module.last_stats
        assert 0.0 < stats["forced_fraction"] < 1.0
        assert stats["forced_fraction"] + stats["scored_fraction"] == pytest.approx(1.0)


def test_batch_of_different_lengths_decodes_like_each_alone(cached_indices):
    """Three sequences of different lengths in one cache, decoded together (slot orders that give
    a view and a gathered copy), equal each sequence's own prefill: outputs and blocks."""
    module = make_module(2, phi="linear")
    lengths, steps = {0: 50, 1: 117, 2: 230}, 30
    gen = torch.Generator().manual_seed(5)
    xs = {slot: torch.randn(1, n + steps, DIM, dtype=torch.float64, generator=gen) for slot, n in lengths.items()}
    expected, expected_indices = {}, {}
    for slot, x in xs.items():
        out, indices = prefill_with_indices(module, x)
        expected[slot], expected_indices[slot] = out[0, lengths[slot]:], indices[0, lengths[slot]:]
    cache = module.new_cache(3, 64)
    for slot, n in lengths.items():  # prefill each alone (chunked: one call)
        module(xs[slot][:, :n], cache=cache, slots=[slot])
    outs = {slot: [] for slot in lengths}
    for step in range(steps):
        order = [0, 1, 2] if step % 2 else [2, 0, 1]  # a strided view, then a gathered copy
        x = torch.cat([xs[slot][:, lengths[slot] + step:lengths[slot] + step + 1] for slot in order])
        out = module(x, cache=cache, slots=order)
        for row, slot in enumerate(order):
            outs[slot].append((out[row, 0], cached_indices[-1][row, 0]))
    for slot in lengths:
        torch.testing.assert_close(torch.stack([o for o, _ in outs[slot]]), expected[slot], rtol=0, atol=1e-12)
        assert torch.equal(torch.stack([i for _, i in outs[slot]]), expected_indices[slot]), f"slot {slot}"
    assert cache.lengths() == [n + steps for n in lengths.values()]


def test_reset_reuses_a_slot():
    """After reset, a slot serves a new sequence from position 0; the other slot is untouched."""
    module = make_module(2, phi="mlp")
    gen = torch.Generator().manual_seed(6)
    a, b, c = (torch.randn(1, n, DIM, dtype=torch.float64, generator=gen) for n in (90, 120, 70))
    cache = module.new_cache(2, 32)
    module(a, cache=cache, slots=[0])
    module(b[:, :100], cache=cache, slots=[1])
    cache.reset(0)
    assert cache.lengths() == [0, 100] and cache.cmp_lengths() == [0, num_cmp_tokens(100, 16, 8)]
    out_c = run_chunks(module, c, cache, (9,), slots=[0])
    out_b = run_chunks(module, b[:, 100:], cache, (1,), slots=[1])
    with torch.no_grad():
        torch.testing.assert_close(out_c, module(c), rtol=0, atol=1e-12)
        torch.testing.assert_close(out_b, module(b)[:, 100:], rtol=0, atol=1e-12)


# --------------------------------------------------------------------------------------------
# KVCache itself
# --------------------------------------------------------------------------------------------

def test_cache_growth_keeps_data_and_phi_blocks_are_the_raw_tokens():
    """Appends of assorted sizes to two slots from capacity 1: every growth keeps what was stored,
    capacity doubles, each due token's phi input is exactly raw tokens [i*d, i*d+l) of its slot,
    and what append_cmp stored stays in place."""
    l, d = 8, 4
    config = NSAConfig(cmp_block=l, cmp_stride=d, sel_block=8, num_selected=3, num_init=1, num_local=1, window=8)
    cache = KVCache(2, 1, 2, 4, 3, config=config, separate_window=True, dtype=torch.float64)
    gen = torch.Generator().manual_seed(7)
    history = {name: [[], []] for name in ("k", "v", "k_win", "v_win", "k_cmp_raw", "v_cmp_raw", "k_cmp", "v_cmp")}
    capacities = []
    for count in (1, 2, 5, 13, 40, 3, 1, 1, 70):
        new = {name: torch.randn(2, count, 2, 4 if name.startswith("k") else 3, dtype=torch.float64, generator=gen)
               for name in ("k", "v", "k_win", "v_win", "k_cmp_raw", "v_cmp_raw")}
        due = cache.append([1, 0], new["k"], new["v"], new["k_win"], new["v_win"], k_cmp_raw=new["k_cmp_raw"],
                           v_cmp_raw=new["v_cmp_raw"])
        for name, t in new.items():
            for row, slot in enumerate((1, 0)):
                history[name][slot].append(t[row])
        raw_k = [torch.cat(history["k_cmp_raw"][slot]) for slot in range(2)]
        raw_v = [torch.cat(history["v_cmp_raw"][slot]) for slot in range(2)]
        for j in range(due.num_due):
            slot, i = (1, 0)[int(due.rows[j])], int(due.indices[j])
            assert torch.equal(due.k_blocks[j], raw_k[slot][i * d:i * d + l]), (count, slot, i)
            assert torch.equal(due.v_blocks[j], raw_v[slot][i * d:i * d + l]), (count, slot, i)
        if due.num_due:
            k_cmp = torch.randn(due.num_due, 2, 4, dtype=torch.float64, generator=gen)
            v_cmp = torch.randn(due.num_due, 2, 3, dtype=torch.float64, generator=gen)
            cache.append_cmp(k_cmp, v_cmp)
            for j in range(due.num_due):
                slot = (1, 0)[int(due.rows[j])]
                history["k_cmp"][slot].append(k_cmp[j:j + 1])
                history["v_cmp"][slot].append(v_cmp[j:j + 1])
        capacities.append(cache.capacity)
    assert capacities == [1, 3, 8, 21, 61, 122, 122, 122, 244]  # doubling, or the need when larger
    n = cache.lengths()[0]
    assert cache.lengths() == [n, n] and cache.cmp_lengths() == [num_cmp_tokens(n, l, d)] * 2
    assert cache.cmp_capacity == num_cmp_tokens(cache.capacity, l, d)
    view = cache.view([0, 1])
    for slot in range(2):
        for name in ("k", "v", "k_win", "v_win"):
            assert torch.equal(getattr(view, name)[slot, :n], torch.cat(history[name][slot])), (name, slot)
        for name in ("k_cmp", "v_cmp"):
            stored = torch.cat(history[name][slot])
            assert torch.equal(getattr(view, name)[slot, :stored.shape[0]], stored), (name, slot)
    assert torch.equal(cache.seqlens([1, 0]), torch.tensor([n, n], dtype=torch.int32))


def test_cache_views_are_strided_views_of_the_storage():
    """Slots that step evenly upwards are served as views (no copy), others as a gathered copy."""
    cache = KVCache(5, 8, 1, 4, config=NSAConfig(cmp_block=4, cmp_stride=2), dtype=torch.float32)
    full = cache.view(range(5))
    assert full.k_win is None and full.v_win is None
    for slots, step in (([1, 3], 2), ([2], 1), ([0, 2, 4], 2), ([1, 2, 3], 1)):
        view = cache.view(slots)
        assert view.k.data_ptr() == full.k[slots[0]].data_ptr() and view.k.stride(0) == step * full.k.stride(0)
        assert view.k_cmp.data_ptr() == full.k_cmp[slots[0]].data_ptr()
    gathered = cache.view([3, 1])
    assert gathered.k.shape == (2, 8, 1, 4) and gathered.k.data_ptr() != full.k[3].data_ptr()


# --------------------------------------------------------------------------------------------
# Dense attention and generate()
# --------------------------------------------------------------------------------------------

def test_dense_attention_incremental_equals_full():
    torch.manual_seed(8)
    layer = DenseAttention(DIM, 6, 2, 8, 10000.0).double()
    gen = torch.Generator().manual_seed(8)
    xs = [torch.randn(1, n, DIM, dtype=torch.float64, generator=gen) for n in (40, 75)]
    cache = layer.new_cache(2, 8)
    layer(xs[0][:, :30], cache=cache, slots=[0])
    layer(xs[1][:, :5], cache=cache, slots=[1])
    outs = [[], []]
    for step in range(10):  # both slots together, at different positions
        x = torch.cat([xs[0][:, 30 + step:31 + step], xs[1][:, 5 + step:6 + step]])
        out = layer(x, cache=cache, slots=[0, 1])
        outs[0].append(out[0])
        outs[1].append(out[1])
    out1 = run_chunks(layer, xs[1][:, 15:], cache, (13, 1, 7), slots=[1])
    with torch.no_grad():
        torch.testing.assert_close(torch.cat(outs[0]), layer(xs[0])[0, 30:40], rtol=0, atol=1e-12)
        torch.testing.assert_close(torch.cat((torch.cat(outs[1])[None], out1), dim=1), layer(xs[1])[:, 5:],
                                   rtol=0, atol=1e-12)


TINY_LM = ModelConfig(dim=32, n_layers=2, n_q_heads=4, n_kv_heads=2, head_dim=8, mlp_hidden=64, seq_len=128,
                      cmp_block=16, cmp_stride=8, sel_block=16, num_selected=3, num_init=1, num_local=1, window=24)


def _greedy_by_recompute(model, prompt, new_tokens):
    """The old generate(): a full forward over the whole context for every new byte."""
    tokens = torch.tensor(list(prompt))[None]
    with torch.no_grad():
        for _ in range(new_tokens):
            tokens = torch.cat((tokens, model(tokens)[0, -1].float().argmax().view(1, 1)), dim=1)
    return bytes(tokens[0, len(prompt):].tolist())


@pytest.mark.parametrize("attn", ["nsa", "dense"])
def test_generate_with_cache_equals_full_recompute(attn):
    torch.manual_seed(9)
    model = LanguageModel(replace(TINY_LM, attn=attn)).double().eval()
    prompt = b"The pass key is 31415. Remember it. "
    expected = _greedy_by_recompute(model, prompt, 60)
    assert generate(model, prompt, 60, greedy=True) == expected
    assert generate(model, prompt, 60, temperature=0) == expected  # temperature 0 is greedy


def test_generate_keeps_the_context_bounded(monkeypatch):
    """Past max_context the cache restarts from the newest half: sampling goes on, the cache never
    holds more than max_context tokens, and a seed reproduces the sample."""
    torch.manual_seed(10)
    model = LanguageModel(TINY_LM)
    seen = []
    real_forward = LanguageModel.forward

    def spy(self, tokens, cache=None, slots=None):
        out = real_forward(self, tokens, cache, slots)
        seen.append(cache.lengths()[0])
        return out

    monkeypatch.setattr(LanguageModel, "forward", spy)
    out = generate(model, b"abc" * 10, 50, temperature=0.8, top_k=5, seed=3, max_context=24)
    assert len(out) == 50 and max(seen) == 24 and seen[0] == 24  # the prompt is cropped to 24
    assert generate(model, b"abc" * 10, 50, temperature=0.8, top_k=5, seed=3, max_context=24) == out
    with pytest.raises(ValueError, match="temperature"):
        generate(model, b"abc", 1, temperature=-1.0)


# --------------------------------------------------------------------------------------------
# tokens_read: the paper's count of keys read per decode step
# --------------------------------------------------------------------------------------------

def check_tokens_read(device):
    """One decode query at length L (a multiple of l', L >= n*l' and >= w) reads, per kv head,
    (L - l) // d + 1 compressed tokens, n * l' selected keys and w window keys (the paper's
    N_t = floor((t-l)/d) + 1 + n*l' + w with t = L)."""
    config = NSAConfig(**PAPER_BLOCKS)
    dtype = torch.float64 if device == "cpu" else torch.bfloat16
    heads, dim, capacity = 2, 64, 3072
    gen = torch.Generator().manual_seed(11)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)

    k, v = rand(1, capacity, heads, dim), rand(1, capacity, heads, dim)
    k_cmp, v_cmp = rand(1, num_cmp_tokens(capacity), heads, dim), rand(1, num_cmp_tokens(capacity), heads, dim)
    for length in (1024, 2048, 3072):
        tokens_read = torch.zeros(1, 3, dtype=torch.int64, device=device)
        q, gates = rand(1, 1, 8, dim), torch.full((1, 1, 8, 3), 0.5, dtype=dtype, device=device)
        seqlens = torch.tensor([length], dtype=torch.int32, device=device)
        nsa_attention_kvcache(q, k, v, k_cmp, v_cmp, gates, seqlens, config, tokens_read=tokens_read)
        expected = [heads * ((length - config.cmp_block) // config.cmp_stride + 1),
                    heads * config.num_selected * config.sel_block, heads * config.window]
        assert tokens_read.cpu()[0].tolist() == expected, length


def test_tokens_read_in_decode_is_the_papers_formula():
    check_tokens_read("cpu")


@gpu_test
def test_cuda_tokens_read_in_decode_is_the_papers_formula():
    check_tokens_read("cuda")


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------

def test_bad_inputs_raise_clear_errors():
    config = NSAConfig(cmp_block=4, cmp_stride=2, sel_block=4, num_selected=2, num_init=1, num_local=1, window=4)
    cache = KVCache(2, 4, 2, 4, config=config, separate_window=True)
    k = torch.randn(1, 3, 2, 4)
    ok = dict(k_cmp_raw=k, v_cmp_raw=k)
    with pytest.raises(RuntimeError, match=r"k has shape \[1, 3, 2, 5\], expected \[1, 3, 2, 4\]"):
        cache.append([0], torch.randn(1, 3, 2, 5), k, k, k, **ok)
    with pytest.raises(RuntimeError, match="v has dtype Double, expected the cache's Float"):
        cache.append([0], k, k.double(), k, k, **ok)
    with pytest.raises(RuntimeError, match=r"k_win is required \(the cache has separate window storage\)"):
        cache.append([0], k, k, None, k, **ok)
    with pytest.raises(RuntimeError, match="k_cmp_raw is required"):
        cache.append([0], k, k, k, k)
    with pytest.raises(RuntimeError, match="k has 1 rows .B. but slots lists 2 slots"):
        cache.append([0, 1], k, k, k, k, **ok)
    with pytest.raises(RuntimeError, match=r"slots\[0\] must be in \[0, 2\) \(num_slots\), got 2"):
        cache.append([2], k, k, k, k, **ok)
    with pytest.raises(RuntimeError, match="slots must be distinct, slot 1 is listed twice"):
        cache.append([1, 1], k.expand(2, -1, -1, -1), *(k.expand(2, -1, -1, -1),) * 3,
                     k_cmp_raw=k.expand(2, -1, -1, -1), v_cmp_raw=k.expand(2, -1, -1, -1))
    with pytest.raises(TypeError, match="slots must be a sequence of Python ints"):
        cache.seqlens(torch.tensor([0]))
    with pytest.raises(RuntimeError, match="no compressed tokens are due"):
        cache.append_cmp(torch.randn(0, 2, 4), torch.randn(0, 2, 4))
    due = cache.append([0], torch.randn(1, 4, 2, 4), *(torch.randn(1, 4, 2, 4),) * 3,
                       k_cmp_raw=torch.randn(1, 4, 2, 4), v_cmp_raw=torch.randn(1, 4, 2, 4))
    assert due.num_due == 1
    with pytest.raises(RuntimeError, match="slot 0 has 1 compressed token.s. due that are not stored yet"):
        cache.view([0])
    with pytest.raises(RuntimeError, match="call append_cmp first"):
        cache.append([1], k, k, k, k, **ok)
    with pytest.raises(RuntimeError, match=r"k_cmp has shape \[2, 2, 4\], expected \[1, 2, 4\]"):
        cache.append_cmp(torch.randn(2, 2, 4), torch.randn(2, 2, 4))
    cache.append_cmp(torch.randn(1, 2, 4), torch.randn(1, 2, 4))
    assert cache.seqlens([0, 1]).tolist() == [4, 0]
    with pytest.raises(RuntimeError, match=r"slot must be in \[0, 2\)"):
        cache.reset(5)

    with pytest.raises(RuntimeError, match="num_slots must be >= 1, got 0"):
        KVCache(0, 4, 2, 4, config=config)
    with pytest.raises(RuntimeError, match=r"capacity must be in \[1,"):
        KVCache(1, 0, 2, 4, config=config)
    with pytest.raises(RuntimeError, match=r"cmp_stride \(d\) must divide config.cmp_block"):
        KVCache(1, 4, 2, 4, config=NSAConfig(cmp_block=6, cmp_stride=4))
    with pytest.raises(RuntimeError, match="dtype must be float32, float64, bfloat16 or float16"):
        KVCache(1, 4, 2, 4, config=config, dtype=torch.int32)
    plain = KVCache(1, 4, 2, 4)
    with pytest.raises(RuntimeError, match=r"k_cmp_raw must be None \(the cache has no compressed-token storage\)"):
        plain.append([0], k, k, k_cmp_raw=k, v_cmp_raw=k)

    module = make_module(1)
    x = torch.randn(1, 3, DIM, dtype=torch.float64)
    with pytest.raises(ValueError, match="made for another layer configuration"):
        module(x, cache=make_module(1, config=dict(SMALL, cmp_block=32, cmp_stride=16)).new_cache(1, 8))
    with pytest.raises(ValueError, match="made for another layer configuration"):
        module(x, cache=KVCache(1, 8, HKV, DK, DV, dtype=torch.float64))
    with pytest.raises(ValueError, match="slots lists 2 slots but x has 1 rows"):
        module(x, cache=module.new_cache(2, 8), slots=[0, 1])
    with pytest.raises(ValueError, match="x must be .B, m, dim."):
        module(x[0], cache=module.new_cache(1, 8))
    with pytest.raises(ValueError, match="cache and cu_seqlens cannot be combined"):
        module(x[0], torch.tensor([0, 3], dtype=torch.int32), cache=module.new_cache(1, 8))
    with pytest.raises(ValueError, match="slots were given without a cache"):
        module(x, slots=[0])
    with pytest.raises(TypeError, match="cache must be an nsa.KVCache"):
        module(x, cache=object())
    dense = DenseAttention(DIM, 2, 1, 8, 10000.0).double()
    with pytest.raises(ValueError, match="DenseAttention: slots lists 2 slots but x has 1 rows"):
        dense(x, cache=dense.new_cache(2, 8), slots=[0, 1])
    with pytest.raises(ValueError, match="DenseAttention: cache must be a plain KVCache"):
        dense(x, cache=module.new_cache(1, 8))


# --------------------------------------------------------------------------------------------
# CUDA: bfloat16 at T = 4096, the paper's config
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("group", [1, 3, 16], ids=["G1", "G3", "G16"])
@gpu_test
def test_cuda_incremental_equals_prefill_bf16(cached_indices, group):
    """The module in bfloat16 on CUDA: chunked prefill (chunks 1000 / 7 / 300 / 64) and then
    token-by-token decode of the last 512 positions vs the module's own bf16 prefill, both against
    the float64 CPU prefill of the same (bf16-rounded) weights and inputs.

    Decode and the bf16 prefill see the same weights and inputs but not bit-identical q/k/v (the
    projections of one token and of 4096 are different GEMMs), so their selections may differ at
    near-ties: they must agree on >= 99% of the rows. The float64 reference's selection differs from
    both by the bf16 rounding of the projections themselves (measured on an H100: 91% of the rows
    agree three ways at G = 1, where a single head decides), so the output rule (DESIGN.md section 2,
    the bf16 prefill as the same-dtype baseline: max|decode - ref| <= 2 max|prefill_bf16 - ref| +
    1e-5) is applied on the rows where all three select the same blocks, at least 3/4 of them.
    Nothing may be inf/NaN. The kernel-level equality (same inputs) is tested in C++
    (tests/cpp/test_cuda_decode.cpp)."""
    T, heads, dim_head = 4096, 4 if group < 16 else 1, 64
    ref_module = make_module(group, heads=heads, dims=(dim_head, dim_head), config=PAPER_BLOCKS, phi="linear")
    with torch.no_grad():
        for p in ref_module.parameters():
            p.copy_(p.to(torch.bfloat16).double())
    gpu_module = copy.deepcopy(ref_module).to(device="cuda", dtype=torch.bfloat16)
    x = torch.randn(1, T, DIM, dtype=torch.float64, generator=torch.Generator().manual_seed(group)).to(torch.bfloat16)
    ref, ref_indices = (t[0] for t in prefill_with_indices(ref_module, x.double()))
    prefill, prefill_indices = (t[0].cpu() for t in prefill_with_indices(gpu_module, x.cuda()))
    prefill = prefill.double()

    cache = gpu_module.new_cache(1, 1024)
    head = run_chunks(gpu_module, x[:, :T - 512].cuda(), cache, (1000, 7, 300, 64))
    tail = run_chunks(gpu_module, x[:, T - 512:].cuda(), cache, (1,))
    decode = torch.cat((head, tail), dim=1)[0].double().cpu()
    decode_indices = torch.cat(cached_indices, dim=1)[0].cpu()
    assert torch.isfinite(decode).all() and torch.isfinite(prefill).all()
    same = (decode_indices == prefill_indices).flatten(1).all(dim=1)  # [T]
    assert same.float().mean().item() >= 0.99, f"decode and prefill select alike on {same.float().mean():.4f} of rows"
    agree = same & (prefill_indices == ref_indices).flatten(1).all(dim=1)
    assert agree.float().mean().item() >= 0.75, f"only {agree.float().mean().item():.4f} of the rows agree"
    err = (decode[agree] - ref[agree]).abs().max().item()
    bound = 2 * (prefill[agree] - ref[agree]).abs().max().item() + 1e-5
    assert err <= bound, f"max|decode - ref| {err:.3g} > bound {bound:.3g}"
