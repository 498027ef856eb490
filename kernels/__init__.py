"""Triton kernels of the aggregation engine, installed as ``tolaria.kernels``.

One module per kernel, each a Triton kernel and a thin torch facade (as in Liger-Kernel):

- :mod:`tolaria.kernels.gram`: G = J J^T in one pass (``gram``), deterministic or atomic reduction;
- :mod:`tolaria.kernels.pcgrad`: PCGrad's weights from G in one small kernel (``pcgrad_weights``);
- :mod:`tolaria.kernels.combine`: out = w^T J in one pass (``combine``), optionally in place.

J is a K x N tensor (rows at any stride) or K separate tensors, addressed where they lie
(:mod:`tolaria.kernels._rows`). The engine reaches them through
:class:`tolaria.aggregation.backends.triton.TritonBackend`. Importing this package does not import
Triton; its submodules do.
"""

__all__: list[str] = []  # the kernels live in the submodules (importing them imports Triton)
