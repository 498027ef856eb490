"""Drop-in replacements for other libraries' gradient-aggregation APIs, on Tolaria's engine.

- ``tolaria.compat.pcgrad``: Pytorch-PCGrad's ``PCGrad(optimizer)`` wrapper.
- ``tolaria.compat.torchjd``: TorchJD's ``autojac`` functions (``backward``, ``mtl_backward``,
  ``jac_to_grad``, and the older forms that take the aggregator).

Each keeps the original's names, signatures and numbers, so that changing the import is the whole
port; where the original has a quirk that changes results, the quirk is kept and documented.
"""

__all__: list[str] = []
