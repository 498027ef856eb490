"""Tolaria inside other training frameworks.

Each integration is its own module, imported on demand, since each needs its framework installed:

- :mod:`tolaria.integrations.lightning`: PyTorch Lightning (``pip install 'tolaria[lightning]'``), a
  ``LightningModule`` mixin whose ``training_step`` returns several named losses.
"""

__all__: list[str] = []
