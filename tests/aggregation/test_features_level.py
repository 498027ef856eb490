"""``GradientBuffer(level="features")``: every aggregator of the registry on the K x M Jacobian at the
shared representation, then one backward through the trunk, against a float64 reference built from
the explicit Jacobian at the features; the heads get their plain gradients."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tolaria.aggregation import AGGREGATOR_NAMES, MGDA, FeatureGradientBuffer, GradientBuffer, build_aggregator

from .registry_examples import example_aggregator

K = 3


def _build(name: str):
    return example_aggregator(name, K)


def _model():
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 4)).double()
    heads = nn.ModuleList([nn.Linear(4, 1) for _ in range(K)]).double()
    return trunk, heads


def _data():
    gen = torch.Generator().manual_seed(2)
    return torch.randn(6, 5, generator=gen, dtype=torch.float64), torch.randn(K, 6, generator=gen, dtype=torch.float64)


def _losses(heads, z, ys):
    return [((head(torch.tanh(z)).squeeze(-1) - y) ** 2).mean() * (k + 1) for k, (head, y) in enumerate(zip(heads, ys))]


def _reference(name: str):
    """The explicit Jacobian at the features, aggregated, pulled back through the trunk (float64)."""
    trunk, heads = _model()
    x, ys = _data()
    z = trunk(x)
    losses = _losses(heads, z, ys)
    jacobian = torch.stack([torch.autograd.grad(loss, z, retain_graph=True)[0].reshape(-1) for loss in losses])
    cotangent, stats = _build(name)(jacobian, return_stats=True)
    trunk_grads = torch.autograd.grad(z, list(trunk.parameters()), cotangent.view_as(z), retain_graph=True)
    head_grads = torch.autograd.grad(sum(losses), list(heads.parameters()))
    return [*trunk_grads, *head_grads], stats, jacobian


@pytest.mark.parametrize("read_jacobian", [True, False], ids=["jacobian-read", "rows-as-autograd-left-them"])
@pytest.mark.parametrize("name", AGGREGATOR_NAMES)
def test_every_aggregator_weighs_the_gradients_at_the_features(name, read_jacobian):
    expected, expected_stats, jacobian = _reference(name)
    trunk, heads = _model()
    x, ys = _data()
    buf = GradientBuffer(nn.ModuleList([trunk, heads]), K, shared=trunk, level="features")
    assert isinstance(buf, FeatureGradientBuffer)
    z = trunk(x)
    buf.backward(_losses(heads, z, ys), features=z)
    if read_jacobian:  # stacks the K rows; unread, the aggregator takes them one by one
        assert torch.equal(buf.jacobian, jacobian)
    out, stats = buf.aggregate(_build(name), return_stats=True)
    got = [p.grad for p in (*trunk.parameters(), *heads.parameters())]
    for i, (a, b) in enumerate(zip(expected, got)):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-14), f"parameter {i}: {(a - b).abs().max()}"
    assert torch.allclose(stats.gram, expected_stats.gram, rtol=1e-12, atol=1e-14)
    assert out.data_ptr() == next(trunk.parameters()).grad.data_ptr()


def test_mgda_at_the_features_is_mgda_ub_the_min_norm_point_of_the_feature_gradients():
    _, stats, jacobian = _reference("mgda")
    weights = MGDA().weighting(jacobian @ jacobian.T).weights
    assert torch.allclose(stats.weights, weights, rtol=1e-12, atol=1e-14)
    assert abs(float(weights.sum()) - 1.0) < 1e-12 and bool((weights >= -1e-15).all())


def test_several_feature_tensors_and_the_errors():
    trunk, heads = _model()
    x, ys = _data()
    buf = GradientBuffer(nn.ModuleList([trunk, heads]), K, shared=trunk, level="features")
    z = trunk(x)
    a, b = z[:3], z[3:]  # two representations (e.g. two inputs through the trunk): rows concatenate them
    losses = [((head(torch.tanh(torch.cat([a, b]))).squeeze(-1) - y) ** 2).mean() for head, y in zip(heads, ys)]
    with pytest.raises(TypeError, match="needs features="):
        buf.backward(losses)
    with pytest.raises(ValueError, match="does not require grad"):
        buf.backward(losses, features=z.detach())
    buf.backward(losses, features=[a, b])
    assert buf.jacobian.shape == (K, z.numel())
    buf.aggregate(build_aggregator("upgrad"))
    with pytest.raises(ValueError, match='mode="low_memory" applies to level="params" only'):
        GradientBuffer(trunk, K, mode="low_memory", level="features")
    with pytest.raises(ValueError, match="valid levels are params, features"):
        GradientBuffer(trunk, K, level="outputs")
