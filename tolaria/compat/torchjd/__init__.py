"""TorchJD's ``torchjd.autojac`` functions (github.com/SimplexLab/TorchJD, 0.18), on Tolaria's engine.

``from tolaria.compat.torchjd import backward, mtl_backward, jac_to_grad`` replaces
``from torchjd.autojac import backward, mtl_backward, jac_to_grad``: the same signatures, the same
``.jac`` and ``.grad`` fields, the same numbers. What TorchJD 0.18 does, and this module repeats:

- ``backward(tensors, /, *, jac_tensors=None, inputs=None, retain_graph=False, parallel_chunk_size=None)``
  accumulates into each input's ``.jac`` the Jacobian of ``tensors`` (left-multiplied by
  ``jac_tensors``; by default the identity: one row per element of ``tensors``). ``inputs`` defaults to
  the leaf tensors of the graph (a walk from the tensors' ``grad_fn``). ``.grad`` is left alone.
- ``mtl_backward(tensors, /, features, *, grad_tensors=None, tasks_params=None, shared_params=None,
  retain_graph=False, parallel_chunk_size=None)``: the Jacobian of the K task tensors over the shared
  parameters, through the ``features`` only, accumulated into their ``.jac`` (one row per task); each
  task's plain gradient over its own parameters accumulated into their ``.grad``.
- ``jac_to_grad(tensors, /, aggregator, *, retain_jac=False, optimize_gramian_computation=False)``
  aggregates the ``.jac`` fields, accumulates the result into ``.grad`` (``grad += result``, or a new
  ``.grad``), deletes ``.jac`` unless ``retain_jac``, and returns the weights when the aggregator combines
  the rows with weights (every Tolaria aggregator but the coordinate-wise GradDrop and TrimmedMean;
  TorchJD's ``WeightedAggregator`` subclasses), in the gradients' dtype; otherwise ``None``.
- Accumulation: ``.jac`` sums over calls (``jac += new``), as TorchJD's; a ``.jac`` of another shape
  raises ``RuntimeError``.

The aggregator is a Tolaria aggregator, a TorchJD aggregator, or any callable mapping the K x N
matrix to an N-vector. :func:`as_torchjd` gives a Tolaria aggregator TorchJD's ``weighting`` /
``gramian_weighting`` attributes, for code that calls those itself.

The older form, which most published TorchJD examples use (TorchJD 0.3 to 0.8), passes the aggregator
to ``backward`` / ``mtl_backward`` and aggregates into ``.grad`` in the same call, leaving ``.jac``
alone: ``backward(tensors, aggregator, inputs=None, retain_graph=False, parallel_chunk_size=None)`` and
``mtl_backward(losses, features, aggregator, tasks_params=None, shared_params=None, retain_graph=False,
parallel_chunk_size=None)`` (``aggregator`` and ``losses`` also by keyword). TorchJD 0.2's
``backward(tensors, inputs, A=aggregator)`` and ``mtl_backward(losses, features, tasks_params,
shared_params, A=aggregator)`` work too. ``inspect.signature`` shows the 0.18 signatures.

How it differs inside (not in results):

- One buffer. Each call allocates one K x N matrix per dtype and device of its inputs (one, for a
  usual model; rows padded apart to 32 elements, as :class:`~tolaria.aggregation.GradientBuffer`'s),
  and every input's ``.jac`` is the K x (its shape) view of its columns: nothing is copied. A second
  call that accumulates adds its fresh buffer into the first one's views (``jac += new``, as TorchJD).
- No ``torch.vmap``: row k is one ordinary backward pass, with the inputs' ``.grad`` bound to views of
  row k while it runs (their own ``.grad`` is put back afterwards). ``parallel_chunk_size`` is validated
  as TorchJD validates it and otherwise ignored: the passes always run one row at a time (TorchJD's
  ``parallel_chunk_size=1``), which also avoids vmap's limitations (compiled models, ``retain_grad``,
  RNNs on CUDA). For scalar losses that is K passes, as vmap's; for the identity Jacobian of a
  non-scalar tensor it is one pass per element, slower than TorchJD's vmap for large tensors.
- ``jac_to_grad``'s fast path: when the tensors' ``.jac`` are views of one K x S row-major tensor that
  tile its first N columns exactly (what one ``backward`` / ``mtl_backward`` call leaves), the K x N
  matrix is aggregated where it lies, with one Gram pass and one combine (Tolaria's aggregators, and
  TorchJD's Gramian-based ones under ``optimize_gramian_computation=True``) or by the aggregator itself
  (TorchJD's, otherwise), and the result is one flat tensor whose views become the new ``.grad``.
  Otherwise (``.jac`` from several calls over different inputs, from several dtypes, replaced by the
  caller, or a subset of a buffer's tensors) the ``.jac`` are flattened and concatenated as TorchJD
  does, which copies them once; :func:`concatenation_fallbacks` counts those calls. With
  ``optimize_gramian_computation=True`` the fallback sums per-tensor Gram matrices instead (as
  TorchJD), for Tolaria aggregators on the base ``__call__`` and TorchJD's Gramian-weighted ones.
- A tensor repeated in ``jac_to_grad``'s ``tensors`` counts once (TorchJD 0.18.2's fix; 0.18.0 fails on it).
- ``create_graph`` does not exist in TorchJD's signatures and is not supported: the Jacobians carry no
  graph.
"""

from __future__ import annotations

from ._aggregate import as_torchjd, concatenation_fallbacks, jac_to_grad
from ._legacy import backward, mtl_backward

__all__ = ["as_torchjd", "backward", "concatenation_fallbacks", "jac_to_grad", "mtl_backward"]
