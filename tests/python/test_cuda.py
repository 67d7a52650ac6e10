"""The CUDA path of the torch op (GPU only): forward vs the CPU reference, refusals with clear
messages for what the CUDA backend does not do yet."""

import pytest
import torch

import nsa

from conftest import make_problem

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not nsa.cuda_built(), reason="ops library built without CUDA kernels")]

PAPER_BLOCKS = dict(cmp_block=32, cmp_stride=16, sel_block=64, num_selected=16, num_init=1, num_local=2,
                    window=512)


def _to(problem, device, dtype):
    return {name: t.detach().to(device=device, dtype=dtype) for name, t in problem.inputs.items()}


@pytest.mark.parametrize("lengths,varlen,heads,dims", [
    ((1000,), False, (16, 2), (64, 64)),
    ((300, 300), False, (6, 2), (128, 128)),
    ((1, 70, 517, 33), True, (12, 4), (192, 128)),
])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_forward_matches_cpu_reference(lengths, varlen, heads, dims, dtype):
    problem = make_problem(lengths, varlen=varlen, num_q_heads=heads[0], num_kv_heads=heads[1],
                           head_dim_qk=dims[0], head_dim_v=dims[1], dtype=torch.float64, seed=sum(lengths),
                           **PAPER_BLOCKS)
    cuda_inputs = _to(problem, "cuda", dtype)
    kwargs = problem.kwargs()
    kwargs.update(cu_seqlens=None if problem.cu_seqlens is None else problem.cu_seqlens.cuda())
    out, indices = nsa.nsa_attention(**cuda_inputs, **kwargs, return_indices=True)
    assert out.dtype == dtype and torch.isfinite(out).all()

    # The reference on the same (rounded) values, with the GPU's selection: scores within
    # rounding of each other may be ordered differently, the attention given a selection may not.
    cpu_inputs = {name: t.to(device="cpu", dtype=torch.float64) for name, t in cuda_inputs.items()}
    cpu_kwargs = problem.kwargs()
    ref_given = nsa.nsa_attention(**cpu_inputs, **cpu_kwargs, block_indices=indices.cpu())
    ref_out, ref_indices = nsa.nsa_attention(**cpu_inputs, **cpu_kwargs, return_indices=True)
    err = (out.double().cpu() - ref_given).abs().max().item()
    # A bf16/fp16 kernel rounds P and the output once: allow a few output ulps.
    ulp = 2.0 ** -7 if dtype == torch.bfloat16 else 2.0 ** -10
    assert err <= 4 * ulp * ref_given.abs().max().item() + 1e-5
    cos = torch.nn.functional.cosine_similarity(out.double().cpu().flatten(), ref_given.flatten(), dim=0)
    assert cos > 0.9999
    agree = (indices.cpu() == ref_indices).float().mean().item()
    assert agree > 0.99, f"only {agree:.4f} of the selected blocks agree with the reference"


def test_float32_is_refused_with_the_supported_list():
    problem = make_problem((64,), dtype=torch.float32, seed=3)
    inputs = _to(problem, "cuda", torch.float32)
    with pytest.raises(RuntimeError, match="bfloat16"):
        nsa.nsa_attention(**inputs, **problem.kwargs())


def test_backward_is_refused_until_written():
    problem = make_problem((64,), head_dim_qk=64, head_dim_v=64, seed=4)
    inputs = {name: t.requires_grad_(True) for name, t in _to(problem, "cuda", torch.bfloat16).items()}
    out = nsa.nsa_attention(**inputs, **problem.kwargs())
    with pytest.raises(RuntimeError, match="CUDA backward is not written yet"):
        out.float().sum().backward()
