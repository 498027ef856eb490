"""Shared pieces of the Triton kernel tests: the device they run on, inputs, float64 references.

Without a GPU the kernels run under Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1)
on CPU tensors, with small blocks; with a GPU the same tests run compiled on CUDA tensors.
"""

from __future__ import annotations

import torch
from aggregation.reference import ascending_orders  # noqa: F401  (re-exported for the kernel tests)
from aggregation.reference import pcgrad_reference as _pcgrad_reference
from torch import Tensor

from tolaria.kernels.rows import INTERPRETED

DEVICE = torch.device("cpu") if INTERPRETED else torch.device("cuda")

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
KS = (1, 2, 3, 8, 17, 64)

# How far a result may sit from the float64 reference, relative to the reference's scale. The
# kernels read the inputs in their own precision, accumulate in float32 and write the result in the
# input dtype: one rounding of the result (the interpreter truncates to bfloat16 instead of
# rounding, hence the full ulp there) on top of float32 accumulation.
RTOL = {torch.float64: 1e-12, torch.float32: 2e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}
# tf32x3 products (float32 rows on the GPU) carry about 2^-21 relative error each.
GRAM_RTOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-5, torch.float16: 1e-5}


def randn(*shape: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen, dtype=torch.float32).to(device=DEVICE, dtype=dtype)


def gram_reference(j: Tensor) -> Tensor:
    j64 = j.detach().to(device="cpu", dtype=torch.float64)
    return j64 @ j64.T


def assert_gram_close(g: Tensor, j: Tensor, dtype: torch.dtype) -> None:
    ref = gram_reference(j)
    scale = ref.diagonal().abs().max().clamp_min(1e-30)
    err = (g.detach().to(device="cpu", dtype=torch.float64) - ref).abs().max()
    assert err <= GRAM_RTOL[dtype] * scale, f"Gram error {err:.3g} vs scale {scale:.3g} ({dtype})"


def assert_result_close(
    result: Tensor, reference: Tensor, dtype: torch.dtype, scale: Tensor | float | None = None
) -> None:
    """``result`` within RTOL[dtype] of the float64 ``reference``, relative to ``scale`` (default: its max)."""
    ref = reference.detach().to(device="cpu", dtype=torch.float64)
    res = result.detach().to(device="cpu", dtype=torch.float64)
    assert res.shape == ref.shape, f"shape {tuple(res.shape)} != {tuple(ref.shape)}"
    s = ref.abs().max() if scale is None else torch.as_tensor(scale, dtype=torch.float64)
    s = s.clamp_min(1e-30)
    err = (res - ref).abs().max()
    assert err <= RTOL[dtype] * s, f"max error {err:.3g} vs scale {float(s):.3g} ({dtype})"


def pcgrad_reference(j: Tensor, orders: list[list[int]]) -> Tensor:
    """Algorithm 1 of Yu et al. (2020), pair by pair, in float64 on the host."""
    return _pcgrad_reference(j.detach().cpu(), orders)
