"""Tests of the torch binding: nsa.nsa_attention / torch.ops.nsa.forward, backward against the
brute-force PyTorch oracle nsa.reference.nsa_attention_ref (docs/semantics.md), gradcheck,
opcheck, torch.compile, autocast and input validation."""

from __future__ import annotations

import zlib

import pytest
import torch

import nsa
from nsa.reference import nsa_attention_ref

from conftest import DIFFERENTIABLE, SMALL_CONFIG, make_problem

TOLERANCE = {torch.float64: dict(atol=1e-10, rtol=1e-10), torch.float32: dict(atol=1e-5, rtol=1e-5)}


def assert_close(actual, expected, dtype, what=""):
    tol = TOLERANCE[dtype]
    assert actual.shape == expected.shape, what
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    torch.testing.assert_close(actual, expected, **tol, msg=lambda m: f"{what}: {m}")


def config_args(problem, scale=0.0):
    c = problem.config
    return (c["cmp_block"], c["cmp_stride"], c["sel_block"], c["num_selected"], c["num_init"], c["num_local"],
            c["window"], scale)


def layout_args(problem):
    """cu_seqlens, cu_seqlens_cmp, max_seqlen as the raw ops take them."""
    if problem.cu_seqlens is None:
        return None, None, 0
    c = problem.config
    return (problem.cu_seqlens, nsa.cmp_seqlens(problem.cu_seqlens, c["cmp_block"], c["cmp_stride"]),
            max(problem.lengths))


def forward_args(problem, block_indices=None, save_branch_outputs=True):
    q, k, v, k_win, v_win, k_cmp, v_cmp, gates = problem.tensors()
    return ((q, k, v, k_win, v_win, k_cmp, v_cmp, gates, block_indices) + layout_args(problem)
            + config_args(problem) + (save_branch_outputs,))


# --------------------------------------------------------------------------------------------
# Forward: op vs brute-force reference
# --------------------------------------------------------------------------------------------

# (id, make_problem kwargs). Mixed lengths include 1 and lengths below cmp_block (no compressed
# token); G = Hq / Hkv in {1, 3, 16}; Dk != Dv; separate and shared window keys; strided inputs.
FORWARD_CASES = [
    ("padded-G1-separate", dict(lengths=(150, 150), num_q_heads=2, num_kv_heads=2, head_dim_qk=16, head_dim_v=8)),
    ("padded-G3-shared-strided", dict(lengths=(130,) * 2, num_q_heads=6, num_kv_heads=2, head_dim_qk=8,
                                      head_dim_v=12, separate_window=False, strided=True, cmp_block=8, cmp_stride=4,
                                      sel_block=16, num_selected=3, num_init=0, num_local=1, window=20)),
    ("padded-G16-defaults", dict(lengths=(200,), num_q_heads=16, num_kv_heads=1, head_dim_qk=4, head_dim_v=6,
                                 cmp_block=32, cmp_stride=16, sel_block=64, num_selected=16, num_init=1, num_local=2,
                                 window=512)),
    ("padded-short-no-cmp-token", dict(lengths=(11, 11, 11), num_q_heads=3, num_kv_heads=1, head_dim_qk=5,
                                       head_dim_v=7)),
    ("varlen-G3-separate", dict(lengths=(1, 7, 33, 130, 15, 64), varlen=True, num_q_heads=6, num_kv_heads=2,
                                head_dim_qk=12, head_dim_v=8)),
    ("varlen-G16-shared-l=d", dict(lengths=(90, 1, 40), varlen=True, num_q_heads=16, num_kv_heads=1, head_dim_qk=8,
                                   head_dim_v=4, separate_window=False, strided=True, cmp_block=8, cmp_stride=8,
                                   sel_block=16, num_selected=5, num_init=2, num_local=0, window=9)),
    ("varlen-G1-sel=d-window1", dict(lengths=(100, 31), varlen=True, num_q_heads=2, num_kv_heads=2, head_dim_qk=6,
                                     head_dim_v=10, cmp_block=16, cmp_stride=8, sel_block=8, num_selected=6,
                                     num_init=1, num_local=1, window=1)),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("case", [c[1] for c in FORWARD_CASES], ids=[c[0] for c in FORWARD_CASES])
def test_forward_matches_reference(case, dtype):
    problem = make_problem(dtype=dtype, seed=zlib.crc32(repr(sorted(case.items())).encode()) % 1000, **case)
    out, indices = problem.call(nsa.nsa_attention, return_indices=True)
    ref_out, ref_indices = problem.call(nsa_attention_ref, return_indices=True)
    assert out.dtype == dtype and indices.dtype == torch.int32
    assert torch.equal(indices, ref_indices), f"selected blocks differ at {(indices != ref_indices).nonzero()[:5]}"
    assert_close(out, ref_out, dtype, "out")
    # Indices are ascending, -1 padded, and always contain the forced blocks (first token of seq).
    valid = indices >= 0
    assert (valid[..., :-1] | ~valid[..., 1:]).all(), "-1 entries must come last"
    assert (torch.where(valid[..., 1:] & valid[..., :-1], indices[..., 1:] - indices[..., :-1], 1) > 0).all()


@pytest.mark.parametrize("varlen", [False, True], ids=["padded", "varlen"])
def test_given_block_indices(varlen):
    """Caller-supplied indices (any order, -1 anywhere, some rows empty) replace the scoring."""
    lengths = (1, 70, 9, 100) if varlen else (100, 100)
    problem = make_problem(lengths, varlen=varlen, num_q_heads=6, num_kv_heads=3, head_dim_qk=8, head_dim_v=4,
                           seed=3)
    cfg = problem.config
    n, sel = cfg["num_selected"], cfg["sel_block"]
    gen = torch.Generator().manual_seed(5)
    positions = (torch.cat([torch.arange(x) for x in lengths]) if varlen
                 else torch.arange(lengths[0]).expand(len(lengths), -1))
    eligible = positions // sel + 1  # blocks 0 .. t // sel
    shape = tuple(positions.shape) + (3, n)
    rows = []
    for e in eligible.reshape(-1).tolist():
        for _ in range(3):
            count = int(torch.randint(0, min(n, e) + 1, (1,), generator=gen))
            row = torch.full((n,), -1, dtype=torch.int32)
            slots = torch.randperm(n, generator=gen)[:count]
            row[slots] = torch.randperm(e, generator=gen)[:count].to(torch.int32)
            rows.append(row)
    given = torch.stack(rows).reshape(shape)
    assert (given < 0).all(-1).any() and not (given < 0).all()
    out, indices = problem.call(nsa.nsa_attention, block_indices=given, return_indices=True)
    ref = problem.call(nsa_attention_ref, block_indices=given)
    assert torch.equal(indices, given)
    assert_close(out, ref, torch.float64, "out with given block_indices")
    # The op's own selection, fed back, reproduces the op's own output.
    own_out, own = problem.call(nsa.nsa_attention, return_indices=True)
    assert_close(problem.call(nsa.nsa_attention, block_indices=own), own_out, torch.float64, "replayed selection")


def test_worked_example_and_ties():
    """docs/semantics.md section 5 (T=200, t=150 selects [0, 1, 2, -1]) and ties to the lower block."""
    problem = make_problem((200,), num_q_heads=2, num_kv_heads=1, cmp_block=32, cmp_stride=16, sel_block=64,
                           num_selected=4, num_init=1, num_local=2, window=64, seed=11)
    _, indices = problem.call(nsa.nsa_attention, return_indices=True)
    _, ref_indices = problem.call(nsa_attention_ref, return_indices=True)
    assert indices[0, 150, 0].tolist() == [0, 1, 2, -1] == ref_indices[0, 150, 0].tolist()

    # All compressed keys equal -> uniform p_cmp; with l = d = l' every fully visible block has the
    # same score, so the free slots go to the lowest blocks. Forced: the current block only.
    problem = make_problem((64,), num_q_heads=3, num_kv_heads=1, cmp_block=8, cmp_stride=8, sel_block=8,
                           num_selected=3, num_init=0, num_local=1, window=4, seed=12)
    problem.inputs["k_cmp"] = problem.inputs["k_cmp"][:, :1].expand_as(problem.inputs["k_cmp"]).contiguous()
    _, indices = problem.call(nsa.nsa_attention, return_indices=True)
    _, ref_indices = problem.call(nsa_attention_ref, return_indices=True)
    assert torch.equal(indices, ref_indices)
    assert indices[0, 40, 0].tolist() == [0, 1, 5]
    assert indices[0, 63, 0].tolist() == [0, 1, 7]


def test_cmp_branch_empty_rows_are_zero():
    """For t < l-1 no compressed token is visible: the cmp branch adds exactly 0 and never NaN."""
    problem = make_problem((40,), num_q_heads=2, num_kv_heads=1, seed=4)
    gates = torch.zeros_like(problem.inputs["gates"])
    gates[..., 0] = 1.0  # cmp branch only
    problem.inputs["gates"] = gates
    l = problem.config["cmp_block"]
    for fn in (nsa.nsa_attention, nsa_attention_ref):
        out = problem.call(fn)
        assert torch.isfinite(out).all()
        assert (out[:, : l - 1] == 0).all() and (out[:, l - 1:] != 0).all()


# --------------------------------------------------------------------------------------------
# Gradients
# --------------------------------------------------------------------------------------------

GRADCHECK_CONFIG = dict(cmp_block=8, cmp_stride=4, sel_block=8, num_selected=2, num_init=1, num_local=1, window=6)


@pytest.mark.parametrize("separate_window", [True, False], ids=["separate-win", "shared-win"])
@pytest.mark.parametrize("varlen", [False, True], ids=["padded", "varlen"])
def test_gradcheck(varlen, separate_window):
    lengths = (1, 7, 40) if varlen else (40,)
    problem = make_problem(lengths, varlen=varlen, num_q_heads=2, num_kv_heads=1, head_dim_qk=3, head_dim_v=2,
                           separate_window=separate_window, seed=21, requires_grad=True, **GRADCHECK_CONFIG)
    with torch.no_grad():
        _, block_indices = problem.call(nsa.nsa_attention, return_indices=True)  # fixed: the function is smooth
    names = [n for n in DIFFERENTIABLE if n in problem.inputs]
    assert len(names) == (8 if separate_window else 6)

    def fn(*xs):
        given = dict(zip(names, xs))
        return problem.call(nsa.nsa_attention, tensors=tuple(given.get(n) for n in DIFFERENTIABLE),
                            block_indices=block_indices)

    assert torch.autograd.gradcheck(fn, tuple(problem.inputs[n] for n in names), eps=1e-6, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("separate_window,varlen", [(True, False), (False, True)],
                         ids=["padded-separate-win", "varlen-shared-win"])
def test_gradients_match_reference(varlen, separate_window):
    lengths = (150, 1, 20, 96) if varlen else (150, 150)
    problem = make_problem(lengths, varlen=varlen, num_q_heads=6, num_kv_heads=2, head_dim_qk=16, head_dim_v=8,
                           separate_window=separate_window, seed=31, requires_grad=True)
    names = [n for n in DIFFERENTIABLE if n in problem.inputs]
    out = problem.call(nsa.nsa_attention)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(32), dtype=out.dtype)
    grads = torch.autograd.grad(out, [problem.inputs[n] for n in names], grad_out)
    ref_problem = problem.detached(requires_grad=True)
    ref_out = ref_problem.call(nsa_attention_ref)
    ref_grads = torch.autograd.grad(ref_out, [ref_problem.inputs[n] for n in names], grad_out)
    assert_close(out.detach(), ref_out.detach(), torch.float64, "out")
    for name, g, r in zip(names, grads, ref_grads):
        assert g.abs().max() > 0, f"grad {name} is all zero"
        assert_close(g, r, torch.float64, f"grad {name}")


# --------------------------------------------------------------------------------------------
# torch.library.opcheck (schema, fake kernels, autograd registration, AOT dispatch)
# --------------------------------------------------------------------------------------------

OPCHECK_CASES = [
    ("padded-win-given", dict(lengths=(48, 48), separate_window=True), True),
    ("padded-nowin", dict(lengths=(48, 48), separate_window=False), False),
    ("varlen-win", dict(lengths=(1, 20, 50), varlen=True, separate_window=True), False),
    ("varlen-nowin-given", dict(lengths=(1, 20, 50), varlen=True, separate_window=False), True),
]


@pytest.mark.parametrize("case,given", [c[1:] for c in OPCHECK_CASES], ids=[c[0] for c in OPCHECK_CASES])
def test_opcheck_forward(case, given):
    problem = make_problem(num_q_heads=4, num_kv_heads=2, head_dim_qk=8, head_dim_v=4, dtype=torch.float32,
                           requires_grad=True, seed=41, **case)
    block_indices = None
    if given:
        with torch.no_grad():
            _, block_indices = problem.call(nsa.nsa_attention, return_indices=True)
    args = forward_args(problem, block_indices)
    torch.library.opcheck(torch.ops.nsa.forward.default, args)
    no_grad = problem.detached()
    torch.library.opcheck(torch.ops.nsa.forward.default, forward_args(no_grad, block_indices, False))


@pytest.mark.parametrize("case", [c[1] for c in OPCHECK_CASES[:3]], ids=[c[0] for c in OPCHECK_CASES[:3]])
def test_opcheck_backward(case):
    problem = make_problem(num_q_heads=4, num_kv_heads=2, head_dim_qk=8, head_dim_v=4, dtype=torch.float32, seed=42,
                           **case)
    _out, out_branch, lse, indices = torch.ops.nsa.forward(*forward_args(problem))
    q, k, v, k_win, v_win, k_cmp, v_cmp, gates = problem.tensors()
    grad_out = torch.randn(_out.shape, generator=torch.Generator().manual_seed(43))
    args = ((grad_out, q, k, v, k_win, v_win, k_cmp, v_cmp, gates, indices, out_branch, lse) + layout_args(problem)
            + config_args(problem) + (False,))
    torch.library.opcheck(torch.ops.nsa.backward.default, args)


# --------------------------------------------------------------------------------------------
# torch.compile, autocast
# --------------------------------------------------------------------------------------------

def _compile_and_compare(fn, tensors, backend, tol):
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend=backend)
    expected = fn(*tensors)
    actual = compiled(*tensors)
    torch.testing.assert_close(actual, expected, **tol)
    grad = torch.randn(expected.shape, generator=torch.Generator().manual_seed(50), dtype=expected.dtype)
    expected_grads = torch.autograd.grad(expected, tensors, grad)
    actual_grads = torch.autograd.grad(actual, tensors, grad)
    for i, (a, e) in enumerate(zip(actual_grads, expected_grads)):
        assert a.abs().max() > 0
        torch.testing.assert_close(a, e, **tol, msg=lambda m: f"grad of input {i}: {m}")


def test_torch_compile_inductor():
    """Inductor, fullgraph, forward and backward. The function holds only the op: inductor then
    generates no C++ kernels of its own (compiling those costs ~10 s per process here)."""
    problem = make_problem((96, 96), num_q_heads=4, num_kv_heads=2, head_dim_qk=8, head_dim_v=4,
                           dtype=torch.float32, requires_grad=True, seed=51)
    cfg = problem.config

    def fn(q, k, v, k_win, v_win, k_cmp, v_cmp, gates):
        return nsa.nsa_attention(q, k, v, k_cmp, v_cmp, gates, k_win, v_win, **cfg)

    _compile_and_compare(fn, problem.tensors(), "inductor", dict(atol=1e-6, rtol=1e-6))


def test_torch_compile_varlen_with_surrounding_ops():
    """aot_eager (no C++ compile), fullgraph, packed varlen, with ops before and after the call."""
    problem = make_problem((1, 40, 90), varlen=True, num_q_heads=4, num_kv_heads=2, dtype=torch.float32,
                           requires_grad=True, separate_window=False, seed=52)
    kwargs = problem.kwargs(max_seqlen=90)  # without max_seqlen the wrapper reads it from the device (.item())

    def fn(q, k, v, k_cmp, v_cmp, gates):
        out = nsa.nsa_attention(torch.sin(q), k, v, k_cmp, v_cmp, torch.sigmoid(gates), **kwargs)
        return out * out

    q, k, v, _, _, k_cmp, v_cmp, gates = problem.tensors()
    _compile_and_compare(fn, (q, k, v, k_cmp, v_cmp, gates), "aot_eager", dict(atol=1e-6, rtol=1e-6))


def test_torch_compile_varlen_without_max_seqlen():
    problem = make_problem((1, 40, 90), varlen=True, dtype=torch.float32, requires_grad=True,
                           separate_window=False, seed=54)
    kwargs = problem.kwargs()

    def fn(q, k, v, k_cmp, v_cmp, gates):
        return nsa.nsa_attention(q, k, v, k_cmp, v_cmp, gates, **kwargs)

    q, k, v, _, _, k_cmp, v_cmp, gates = problem.tensors()
    _compile_and_compare(fn, (q, k, v, k_cmp, v_cmp, gates), "aot_eager", dict(atol=1e-6, rtol=1e-6))


def test_autocast_bf16():
    problem = make_problem((128, 128), num_q_heads=4, num_kv_heads=2, head_dim_qk=16, head_dim_v=8,
                           dtype=torch.float32, requires_grad=True, seed=61)
    tensors = problem.tensors()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, indices = problem.call(nsa.nsa_attention, return_indices=True)
    assert out.dtype == torch.bfloat16
    # Same blocks in float32 (the bf16 rounding may move near-ties of the scores).
    expected = problem.call(nsa.nsa_attention, block_indices=indices)
    assert expected.dtype == torch.float32
    err = (out.float() - expected).abs().max()
    assert err < 5e-2 * expected.abs().max(), f"bf16 autocast output off by {err}"
    grads = torch.autograd.grad(out.float().square().sum(), tensors)
    expected_grads = torch.autograd.grad(expected.square().sum(), tensors)
    for name, g, e in zip(DIFFERENTIABLE, grads, expected_grads):
        assert g.dtype == torch.float32 and torch.isfinite(g).all(), name
        cos = torch.nn.functional.cosine_similarity(g.flatten(), e.flatten(), dim=0)
        assert cos > 0.99, f"grad {name}: cosine {cos}"


# --------------------------------------------------------------------------------------------
# Validation: bad inputs raise with a message naming the argument
# --------------------------------------------------------------------------------------------

def _replace(name, make):
    def mutate(problem):
        problem.inputs[name] = make(problem.inputs)
    return mutate


def _kwarg(**kw):
    def mutate(problem):
        problem.config.update(kw)
    return mutate


def _block_indices(make):
    def mutate(problem):
        problem.config["block_indices"] = make(problem)
    return mutate


def _cu_seqlens(values, dtype=torch.int32):
    def mutate(problem):
        problem.cu_seqlens = torch.tensor(values, dtype=dtype)
    return mutate


def _bad_row(problem):
    bi = torch.full(tuple(problem.inputs["q"].shape[:-2]) + (2, 4), -1, dtype=torch.int32)
    bi.view(-1, 2, 4)[10, 1, 2] = 1  # row 10 is t = 10 of sequence 0, which sees block 0 only
    return bi


PADDED_BAD = [
    ("k-dtype", _replace("k", lambda x: x["k"].float()), RuntimeError, ["k ", "dtype"]),
    ("v-batch", _replace("v", lambda x: x["v"][:1]), RuntimeError, ["v ", "shape"]),
    ("v-length", _replace("v", lambda x: x["v"][:, :-1]), RuntimeError, ["v ", "shape"]),
    ("heads-not-divisible", lambda p: (_replace("q", lambda x: x["q"][:, :, :3])(p),
                                       _replace("gates", lambda x: x["gates"][:, :, :3])(p)),
     RuntimeError, ["q has 3 heads", "kv heads of k"]),
    ("q-last-dim-strided", _replace("q", lambda x: torch.cat([x["q"], x["q"]], -1)[..., ::2]), RuntimeError,
     ["q ", "contiguous last dimension"]),
    ("gates-shape", _replace("gates", lambda x: x["gates"][..., :2]), RuntimeError, ["gates", "shape"]),
    ("k_win-dim", _replace("k_win", lambda x: x["k_win"][..., :-1]), RuntimeError, ["k_win", "shape"]),
    ("k_cmp-length", _replace("k_cmp", lambda x: x["k_cmp"][:, :-1]), RuntimeError, ["k_cmp", "shape"]),
    ("block_indices-dtype", _block_indices(lambda p: _bad_row(p).long()), RuntimeError, ["block_indices", "int32"]),
    ("block_indices-shape", _block_indices(lambda p: _bad_row(p)[..., :3]), RuntimeError, ["block_indices", "shape"]),
    ("block_indices-range", _block_indices(_bad_row), RuntimeError, ["block_indices", "t=10", "out of range"]),
    ("cmp_stride-zero", _kwarg(cmp_stride=0), RuntimeError, ["cmp_stride"]),
    ("num_selected-small", _kwarg(num_selected=2), RuntimeError, ["num_selected"]),
    ("window-zero", _kwarg(window=0), RuntimeError, ["window"]),
    ("scale-negative", _kwarg(scale=-1.0), RuntimeError, ["scale"]),
    ("float-cmp_block", _kwarg(cmp_block=16.0), TypeError, ["cmp_block"]),
    ("non-tensor-v", _replace("v", lambda x: x["v"].tolist()), TypeError, ["v must be a torch.Tensor"]),
    ("cu_seqlens_cmp-alone", _kwarg(cu_seqlens_cmp=torch.tensor([0, 5], dtype=torch.int32)), ValueError,
     ["cu_seqlens_cmp"]),
]

VARLEN_BAD = [  # lengths (40, 1, 59)
    ("cu_seqlens-dtype", _cu_seqlens([0, 40, 41, 100], torch.int64), RuntimeError, ["cu_seqlens", "int32"]),
    ("cu_seqlens-decreasing", _cu_seqlens([0, 40, 30, 100]), RuntimeError, ["cu_seqlens", "non-decreasing"]),
    ("cu_seqlens-last", _cu_seqlens([0, 40, 41, 99]), RuntimeError, ["cu_seqlens[3]", "100"]),
    ("cu_seqlens-first", _cu_seqlens([2, 40, 41, 100]), RuntimeError, ["cu_seqlens[0]"]),
    ("q-not-packed", _replace("q", lambda x: x["q"][None]), RuntimeError, ["q ", "packed"]),
    ("v_cmp-length", _replace("v_cmp", lambda x: x["v_cmp"][:-1]), RuntimeError, ["v_cmp", "shape"]),
    ("block_indices-range", _block_indices(_bad_row), RuntimeError, ["block_indices", "t=10", "out of range"]),
]


@pytest.mark.parametrize("varlen,mutate,exc,words",
                         [(False,) + c[1:] for c in PADDED_BAD] + [(True,) + c[1:] for c in VARLEN_BAD],
                         ids=["padded-" + c[0] for c in PADDED_BAD] + ["varlen-" + c[0] for c in VARLEN_BAD])
def test_bad_inputs_raise(varlen, mutate, exc, words):
    problem = make_problem((40, 1, 59) if varlen else (64, 64), varlen=varlen, num_q_heads=4, num_kv_heads=2,
                           seed=71)
    problem.call(nsa.nsa_attention)  # the unmodified problem is fine
    mutate(problem)
    with pytest.raises(exc) as info:
        problem.call(nsa.nsa_attention)
    for word in words:
        assert word in str(info.value), f"{word!r} not in message: {info.value}"


def test_bad_config_named_when_k_cmp_matches_it():
    # cmp_stride 5 does not divide cmp_block 16; k_cmp sized by that config, so only the config is wrong.
    problem = make_problem((64,), cmp_block=16, cmp_stride=8, seed=72)
    problem.inputs["k_cmp"] = problem.inputs["k_cmp"].new_ones(1, nsa.num_cmp_tokens(64, 16, 5), 2, 8)
    problem.inputs["v_cmp"] = problem.inputs["k_cmp"].clone()
    problem.config["cmp_stride"] = 5
    with pytest.raises(RuntimeError, match=r"cmp_stride \(d\) must divide config.cmp_block"):
        problem.call(nsa.nsa_attention)


# Messages name the argument that is wrong, not one derived from it.
def test_bad_config_is_reported_before_k_cmp_shape():
    problem = make_problem((64,), cmp_block=16, cmp_stride=8, seed=73)  # k_cmp sized for the valid stride 8
    problem.config["cmp_stride"] = 5
    with pytest.raises(RuntimeError, match="cmp_stride"):
        problem.call(nsa.nsa_attention)


@pytest.mark.parametrize("both", [False, True], ids=["k_cmp-only", "k_cmp-and-v_cmp"])
def test_varlen_k_cmp_length_names_k_cmp(both):
    problem = make_problem((40, 1, 59), varlen=True, seed=74)
    problem.inputs["k_cmp"] = problem.inputs["k_cmp"][:-1]
    if both:
        problem.inputs["v_cmp"] = problem.inputs["v_cmp"][:-1]
    with pytest.raises(RuntimeError, match="k_cmp"):
        problem.call(nsa.nsa_attention)


def test_small_max_seqlen_names_max_seqlen():
    problem = make_problem((40, 1, 59), varlen=True, seed=75)
    with pytest.raises(RuntimeError, match="max_seqlen"):
        problem.call(nsa.nsa_attention, max_seqlen=10)


# --------------------------------------------------------------------------------------------
# Grad mode, saved tensors, CUDA
# --------------------------------------------------------------------------------------------

def test_no_grad_forward_saves_nothing():
    problem = make_problem((64, 64), requires_grad=True, seed=81)
    out, out_branch, lse, indices = torch.ops.nsa.forward(*forward_args(problem, save_branch_outputs=False))
    assert out_branch.numel() == 0
    assert out.shape == (2, 64, 4, 8) and lse.shape == (2, 64, 4, 3) and indices.shape == (2, 64, 2, 4)
    out2, out_branch2, lse2, _ = torch.ops.nsa.forward(*forward_args(problem, save_branch_outputs=True))
    assert out_branch2.shape == (2, 64, 4, 3, 8)
    assert torch.equal(out.detach(), out2.detach()) and torch.equal(lse, lse2)
    # The gated sum of the saved branch outputs is the output.
    gates = problem.inputs["gates"].detach().unsqueeze(-1)
    torch.testing.assert_close((gates * out_branch2.detach()).sum(-2), out2.detach(), atol=1e-12, rtol=1e-12)
    # Branch lse: the cmp branch sees nothing for t < l - 1 (-inf), the others always see t.
    l = problem.config["cmp_block"]
    assert torch.isneginf(lse[:, : l - 1, :, 0]).all() and torch.isfinite(lse[:, l - 1:]).all()
    assert torch.isfinite(lse[..., 1:]).all()
    # A forward that did not save them cannot be differentiated: the backward says why.
    with pytest.raises(RuntimeError, match="branch outputs"):
        out.sum().backward()

    with torch.no_grad():
        out = problem.call(nsa.nsa_attention)
    assert not out.requires_grad and out.grad_fn is None
    with pytest.raises(RuntimeError, match="does not require grad"):
        out.sum().backward()


@pytest.mark.cuda
@pytest.mark.skipif(nsa.cuda_built(), reason="this build has the CUDA kernels (tests/python/test_cuda.py)")
def test_cuda_tensor_without_cuda_kernels():
    problem = make_problem((64,), dtype=torch.float32, seed=91)
    problem.inputs = {name: t.cuda() for name, t in problem.inputs.items()}
    with pytest.raises(RuntimeError, match="no CUDA kernels"):
        problem.call(nsa.nsa_attention)
