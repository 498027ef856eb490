"""How the kernels address J: the public face of :mod:`tolaria.kernels._rows`.

``as_rows`` turns a K x N tensor (rows at any stride) or K separate tensors into the
:class:`Rows` layout every kernel reads (no copy when the rows share a stride); ``INTERPRETED`` is
true when Triton runs under its interpreter (``TRITON_INTERPRET=1``: CPU tensors, small blocks).
Importing this module imports Triton.
"""

from __future__ import annotations

from ._rows import INTERPRETED, Rows, as_rows, check_device

__all__ = ["INTERPRETED", "Rows", "as_rows", "check_device"]
