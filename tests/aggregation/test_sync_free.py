"""The torch path never reads a device value on the host when checks are off.

Two honest mechanisms: (1) the whole aggregation runs on the ``meta`` device, where tensors have no
data, so any host read (``.item()``, ``bool()``, ``.tolist()``) fails; (2) TorchDynamo traces it into
one graph with ``fullgraph=True``, which fails on any data-dependent Python control flow.
"""

import pytest
import torch

from tolaria.aggregation import Mean, PCGrad, Sum, Weighted
from tolaria.aggregation._sources import as_sources
from tolaria.aggregation.engine import aggregate

AGGREGATORS = [
    PCGrad(backend="torch", nonfinite="propagate"),
    PCGrad(reduction="mean", weights=[1.0, 2.0, 3.0, 4.0], backend="torch", nonfinite="propagate"),
    Mean(backend="torch", nonfinite="propagate"),
    Sum(backend="torch", nonfinite="propagate"),
    Weighted([1.0, 0.5, 0.5, 2.0], backend="torch", nonfinite="propagate"),
]


@pytest.mark.parametrize("agg", AGGREGATORS, ids=repr)
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
