"""The coordinate-wise aggregations (GradDrop, TrimmedMean) on each backend: one pass over J.

These two aggregators are not functions of the Gram matrix, so they do not go through the backends'
``gram``/``combine`` seam; each is one pass over the K x N matrix J that maps every column on its
own. This module runs that pass on the backend :func:`tolaria.aggregation.engine.select_backend`
picked (by its ``name``): the compiled CPU kernels (``csrc/aggregation/coordinatewise.h``), the
Triton kernels (``tolaria.kernels.graddrop``, ``tolaria.kernels.trimmed_mean``), or plain PyTorch,
which is written here as the reference of the same arithmetic:

- GradDrop: s = sum_i x_i and a = sum_i |x_i| in row order, in float32 for 16/32-bit rows (float64
  for float64 rows); u = :func:`graddrop_uniforms` (a counter-based hash of the column and two keys,
  so every backend draws the same u for the same keys and nothing random is stored); x_i is kept
  when x_i > 0 and s > (2u - 1) a (GradDrop's P > u, P = (1 + s / a) / 2), or x_i < 0 and s < (2u - 1) a
  (P < u); out = sum_i (kept ? 1 : leak_i) x_i in row order, rounded once to J's dtype.
- TrimmedMean: per column, the values sorted in the total order -inf < ... < -0 < +0 < ... < +inf <
  NaN (NaN ranks above +inf, as in ``torch.sort``), the ``trim`` smallest and largest dropped, the
  rest summed in ascending order (float32 for 16/32-bit rows, float64 for float64) and divided by
  their count.

With the same keys, every backend takes the same decisions (masks, orders) bit for bit; results
agree exactly without a leak, and to rounding with one (fused multiply-adds). Each pass can report
whether every input value was finite (``check``), at no extra read of J.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .._sources import Sources
from .base import Backend, accumulation_dtype
from .cpu import _DTYPE_CODES, _contiguous_rows, _ext

# Columns per step of the torch reference: its K x chunk float32 copies stay a few MiB.
_CHUNK = 1 << 16
_MASK32 = 0xFFFFFFFF


def _mul32(x: Tensor, c: int) -> Tensor:
    """(x * c) mod 2^32 for int64 x in [0, 2^32), without overflowing int64."""
    lo = x * (c & 0xFFFF)
    hi = ((x * (c >> 16)) & 0xFFFF) << 16
    return (lo + hi) & _MASK32


def _lowbias32(x: Tensor) -> Tensor:
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def graddrop_uniforms(
    keys: tuple[int, int],
    start: int,
    stop: int,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """GradDrop's uniforms of columns [start, stop) for one call's ``keys``: the top 24 bits of two
    rounds of the lowbias32 hash of the column (``graddrop_hash`` in csrc/aggregation/coordinatewise.h,
    ``_uniform`` in tolaria.kernels.graddrop), exact in float32, in [0, 1)."""
    key0, key1 = keys
    cols = torch.arange(start, stop, dtype=torch.int64, device=device)
    h = _lowbias32((cols & _MASK32) ^ key0)
    h = _lowbias32(h ^ (cols >> 32) ^ key1)
    return (h >> 8).to(dtype) * 2.0**-24


def _chunks(n: int):
    for start in range(0, n, _CHUNK):
        yield start, min(n, start + _CHUNK)


def _output(sources: Sources, out: Tensor | None) -> Tensor:
    if out is None:
        return torch.empty(sources.n, dtype=sources.dtype, device=sources.device)
    return out.view(-1)


def _finite(x: Tensor) -> Tensor:
    return torch.isfinite(x).all()


# ---- GradDrop ------------------------------------------------------------------------------------


def _graddrop_torch(
    sources: Sources,
    keys: tuple[int, int],
    leak: Tensor | None,
    out: Tensor | None,
    f: Callable[[Tensor], Tensor] | None,
    check: bool,
) -> tuple[Tensor, Tensor]:
    j = sources.stacked()
    acc_dtype = accumulation_dtype(sources.dtype)
    flat = _output(sources, out)
    lk = None if leak is None else leak.to(device=j.device, dtype=acc_dtype)
    finite = torch.ones((), dtype=torch.bool, device=j.device)
    # A Python f sees P whole (it need not be elementwise), so it runs on one chunk: all of J.
    spans = [(0, sources.n)] if f is not None else list(_chunks(sources.n))
    for start, stop in spans:
        x = j[:, start:stop].to(acc_dtype)
        s = torch.zeros(stop - start, dtype=acc_dtype, device=j.device)
        a = torch.zeros_like(s)
        for row in x:  # row order, as the kernels
            s = s + row
            a = a + row.abs()
        if check:
            finite &= _finite(x)
        u = graddrop_uniforms(keys, start, stop, device=j.device, dtype=acc_dtype)
        if f is None:
            thr = (u * 2 - 1) * a
            up, down = s > thr, s < thr
        else:
            fp = f(0.5 * (1 + s / a))
            up, down = fp > u, fp < u
        acc = torch.zeros_like(s)
        for i, row in enumerate(x):
            keep = ((row > 0) & up) | ((row < 0) & down)
            coef = keep.to(acc_dtype) if lk is None else torch.where(keep, 1.0, lk[i]).to(acc_dtype)
            acc = acc + coef * row
        flat[start:stop] = acc
    return flat, finite


def graddrop(
    impl: Backend,
    sources: Sources,
    keys: tuple[int, int],
    *,
    leak: Tensor | None = None,
    out: Tensor | None = None,
    f: Callable[[Tensor], Tensor] | None = None,
    check: bool = True,
) -> tuple[Tensor, bool | None]:
    """GradDrop's combination of ``sources`` on backend ``impl``; ``leak`` is None or K float64 values
    on any device, ``f`` (torch backend only) is applied to P. Returns the flat result and, with
    ``check``, whether every input value was finite (read on the host), else None."""
    if f is not None and impl.name != "torch":
        raise ValueError(f"GradDrop's f is a Python callable, which the {impl.name!r} backend cannot run")
    if impl.name == "cpu":
        rows = _contiguous_rows(sources)
        flat = _output(sources, out)
        lk = None if leak is None else leak.to(device="cpu", dtype=torch.float64).contiguous()
        finite = _ext.graddrop(
            [r.data_ptr() for r in rows],
            sources.n,
            _DTYPE_CODES[sources.dtype],
            0 if lk is None else lk.data_ptr(),
            keys[0],
            keys[1],
            flat.data_ptr(),
            torch.get_num_threads(),
        )
        return flat, bool(finite) if check else None
    if impl.name == "triton":
        from tolaria.kernels.graddrop import graddrop as _triton_graddrop

        operand = sources.matrix if sources.matrix is not None else sources.rows
        lk = None if leak is None else leak.to(device=sources.device, dtype=torch.float64)
        flat, flag = _triton_graddrop(operand, keys, leak=lk, out=out, check=check)
        return flat, (not bool(flag.item())) if check else None
    flat, finite = _graddrop_torch(sources, keys, leak, out, f, check)
    return flat, bool(finite) if check else None


# ---- TrimmedMean ---------------------------------------------------------------------------------

_QUIET_NAN_BITS = {torch.int32: 0x7FC00000, torch.int64: 0x7FF8000000000000}
_SIGN_BITS = {torch.int32: 31, torch.int64: 63}
_MAGNITUDE = {torch.int32: 0x7FFFFFFF, torch.int64: 0x7FFFFFFFFFFFFFFF}


def order_keys(x: Tensor) -> Tensor:
    """Integer keys of float32/float64 ``x`` in the total order -inf < ... < -0 < +0 < ... < +inf < NaN
    (every NaN made one positive quiet NaN); :func:`order_values` inverts it."""
    itype = torch.int32 if x.dtype == torch.float32 else torch.int64
    bits = torch.where(
        torch.isnan(x), torch.tensor(_QUIET_NAN_BITS[itype], dtype=itype, device=x.device), x.view(itype)
    )
    return bits ^ ((bits >> _SIGN_BITS[itype]) & _MAGNITUDE[itype])


def order_values(keys: Tensor) -> Tensor:
    bits = keys ^ ((keys >> _SIGN_BITS[keys.dtype]) & _MAGNITUDE[keys.dtype])
    return bits.view(torch.float32 if keys.dtype == torch.int32 else torch.float64)


def _trimmed_mean_torch(sources: Sources, trim: int, out: Tensor | None, check: bool) -> tuple[Tensor, Tensor]:
    j = sources.stacked()
    acc_dtype = accumulation_dtype(sources.dtype)
    flat = _output(sources, out)
    k = sources.k
    finite = torch.ones((), dtype=torch.bool, device=j.device)
    for start, stop in _chunks(sources.n):
        x = j[:, start:stop].to(acc_dtype)
        if check:
            finite &= _finite(x)
        ordered = order_values(order_keys(x).sort(dim=0).values)
        acc = torch.zeros(stop - start, dtype=acc_dtype, device=j.device)
        for r in range(trim, k - trim):  # ascending order, as the kernels
            acc = acc + ordered[r]
        flat[start:stop] = acc / torch.full_like(acc, k - 2 * trim)  # a true division, as the kernels
    return flat, finite


def trimmed_mean(
    impl: Backend, sources: Sources, trim: int, *, out: Tensor | None = None, check: bool = True
) -> tuple[Tensor, bool | None]:
    """The per-column mean of ``sources`` without their ``trim`` smallest and largest values, on
    backend ``impl`` (needs K > 2 trim); returns the flat result and, with ``check``, whether every
    input value was finite (read on the host), else None."""
    if impl.name == "cpu":
        rows = _contiguous_rows(sources)
        flat = _output(sources, out)
        finite = _ext.trimmed_mean(
            [r.data_ptr() for r in rows],
            sources.n,
            _DTYPE_CODES[sources.dtype],
            trim,
            flat.data_ptr(),
            torch.get_num_threads(),
        )
        return flat, bool(finite) if check else None
    if impl.name == "triton":
        from tolaria.kernels.trimmed_mean import trimmed_mean as _triton_trimmed_mean

        operand = sources.matrix if sources.matrix is not None else sources.rows
        flat, flag = _triton_trimmed_mean(operand, trim, out=out, check=check)
        return flat, (not bool(flag.item())) if check else None
    flat, finite = _trimmed_mean_torch(sources, trim, out, check)
    return flat, bool(finite) if check else None


__all__ = ["graddrop", "graddrop_uniforms", "order_keys", "order_values", "trimmed_mean"]
