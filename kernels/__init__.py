"""Triton kernels of the aggregation engine, installed as ``tolaria.kernels``."""
