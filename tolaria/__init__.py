"""Tolaria: conflict-aware multi-source gradient aggregation and a training loop built to survive.

The public API lives in the subpackages: ``tolaria.aggregation`` (aggregators, ``GradientBuffer``,
drop-in functions), and the training-run parts added beside it.
"""

__version__ = "0.1.0"
