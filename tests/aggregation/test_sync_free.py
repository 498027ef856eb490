"""The torch path never reads a device value on the host when checks are off.

Two honest mechanisms: (1) the whole aggregation runs on the ``meta`` device, where tensors have no
data, so any host read (``.item()``, ``bool()``, ``.tolist()``) fails; (2) TorchDynamo traces it into
one graph with ``fullgraph=True``, which fails on any data-dependent Python control flow.
"""

import pytest
import torch

from tolaria.aggregation import Mean, PCGrad, Sum, Weighted, as_sources
from tolaria.aggregation.engine import aggregate

AGGREGATORS = [
    PCGrad(backend="torch", nonfinite="propagate"),
    PCGrad(reduction="mean", weights=[1.0, 2.0, 3.0, 4.0], backend="torch", nonfinite="propagate"),
    Mean(backend="torch", nonfinite="propagate"),
    Sum(backend="torch", nonfinite="propagate"),
    Weighted([1.0, 0.5, 0.5, 2.0], backend="torch", nonfinite="propagate"),
]


@pytest.mark.parametrize("agg", AGGREGATORS + [PCGrad(shuffle=False, backend="torch", nonfinite="propagate")], ids=repr)
def test_runs_on_meta_tensors(agg):
    out, stats = agg(torch.empty(4, 1000, device="meta"), return_stats=True)
    assert out.device.type == "meta" and stats.conflicts.device.type == "meta"


def test_the_checked_mode_does_read_the_host():
    # The control: the meta device does catch a host read.
    with pytest.raises(NotImplementedError):
        PCGrad(backend="torch", nonfinite="raise")(torch.empty(4, 10, device="meta"))


def test_compiles_to_one_graph():
    agg = PCGrad(backend="torch", nonfinite="propagate", generator=None)

    def step(j):
        flat, stats = aggregate(as_sources(j), agg.weighting, backend="torch", nonfinite="propagate")
        return flat, stats.conflicts, stats.cosine

    compiled = torch.compile(step, fullgraph=True, backend="eager")
    j = torch.randn(5, 64, dtype=torch.float64)
    flat, conflicts, cosine = compiled(j)
    torch.testing.assert_close(flat.norm(), flat.norm())  # ran
    assert conflicts.dtype == torch.int64 and cosine.shape == (5, 5)


class _HostTensorsSeen(torch.utils._python_dispatch.TorchDispatchMode):
    """Records every op that receives a CPU tensor: on a GPU such an input is a host-to-device copy,
    which synchronises (and breaks CUDA-graph capture). (``torch.tensor(data, device=...)`` copies
    below this mode and is not seen; the code under test does not use it on the device path.)"""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        flat = torch.utils._pytree.tree_leaves((args, kwargs or {}))
        if any(isinstance(a, torch.Tensor) and a.device.type == "cpu" for a in flat):
            self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("k", [2, 3, 5])
@pytest.mark.parametrize("shuffle", [True, False])
def test_no_host_data_reaches_the_device(k, shuffle):
    # The K x K work (orders, projections, weights) is built on the inputs' device, never copied
    # there from host memory; meta stands in for a GPU.
    agg = PCGrad(shuffle=shuffle, backend="torch", nonfinite="propagate")
    with _HostTensorsSeen() as seen:
        agg(torch.empty(k, 100, device="meta"), return_stats=True)
    assert seen.ops == []


def test_the_host_data_guard_sees_a_copy():
    # The control: a CPU tensor moved to the device, or mixed into a device op, is recorded.
    with _HostTensorsSeen() as seen:
        torch.ones(2).to("meta")
        torch.empty(3, device="meta") * torch.tensor(2.0)
    assert seen.ops == ["aten._to_copy.default", "aten.lift_fresh.default", "aten.mul.Tensor"]
