"""Backends of the aggregation engine. Only :func:`tolaria.aggregation.engine.select_backend` picks one."""

from .base import Backend
from .cpu import CompiledCpuBackend
from .torch_backend import TorchBackend

__all__ = ["Backend", "CompiledCpuBackend", "TorchBackend"]
