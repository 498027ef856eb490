"""The gradient stage against plain PyTorch in float64, and its per-source statistics."""

import math

import pytest
import torch

from tolaria.aggregation import Mean, PCGrad
from tolaria.trainer.gradient import (
    AGGREGATOR_NAMES,
    GradientStage,
    SourceAccumulator,
    as_named_losses,
    build_aggregator,
    build_training_aggregator,
)

from .helpers import TwoHeads, make_batches, two_task_loss


def per_source_grads(model, losses):
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for loss in losses.values():
        grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        rows.append(
            torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)])
        )
    return torch.stack(rows)


def reference_pcgrad(J):
    """Yu et al. Algorithm 1 with ascending projection order, in float64."""
    out = []
    for i in range(J.shape[0]):
        g = J[i].clone()
        for j in range(J.shape[0]):
            if j != i and torch.dot(g, J[j]) < 0:
                g -= torch.dot(g, J[j]) / torch.dot(J[j], J[j]) * J[j]
        out.append(g)
    return torch.stack(out).sum(0)


def flat_grad(model):
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


def setup(seed=0):
    torch.manual_seed(seed)
    model = TwoHeads().double()
    x, y = make_batches(1, seed=seed)[0]
    batch = (x.double(), y.double())
    return model, batch


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pcgrad_matches_float64_reference(seed):
    model, batch = setup(seed)
    J = per_source_grads(model, two_task_loss(model(batch[0]), batch))
    stage = GradientStage(model, build_training_aggregator("pcgrad", shuffle=False))
    stats = stage.backward(two_task_loss(model(batch[0]), batch))
    torch.testing.assert_close(flat_grad(model), reference_pcgrad(J), rtol=1e-10, atol=1e-12)
    norms = J.norm(dim=1)
    assert stats.names == ("a", "b")
    assert stats.norms == pytest.approx(norms.tolist(), rel=1e-9)
    cos = float(torch.dot(J[0], J[1]) / (norms[0] * norms[1]))
    assert stats.cosine[0][1] == pytest.approx(cos, rel=1e-9, abs=1e-12)
    assert stats.cosine[1][0] == pytest.approx(cos, rel=1e-9, abs=1e-12)
    assert stats.conflicts == (2 if cos < 0 else 0)
    assert sum(stats.shares) == pytest.approx(1.0)
    assert stats.grad_norm == pytest.approx(float(reference_pcgrad(J).norm()), rel=1e-9)
    assert stats.finite


def test_weights_reproduce_the_aggregate():
    model, batch = setup(3)
    J = per_source_grads(model, two_task_loss(model(batch[0]), batch))
    stage = GradientStage(model, build_training_aggregator("pcgrad"))
    stats = stage.backward(two_task_loss(model(batch[0]), batch))
    torch.testing.assert_close(flat_grad(model), torch.tensor(stats.weights, dtype=J.dtype) @ J, rtol=1e-10, atol=1e-12)


def test_mean_of_two_sources():
    model, batch = setup(4)
    J = per_source_grads(model, two_task_loss(model(batch[0]), batch))
    GradientStage(model, Mean(nonfinite="propagate")).backward(two_task_loss(model(batch[0]), batch))
    torch.testing.assert_close(flat_grad(model), J.mean(0), rtol=1e-10, atol=1e-12)


def test_single_source_fast_path_equals_plain_backward():
    model, batch = setup(5)
    loss = lambda: sum(two_task_loss(model(batch[0]), batch).values())  # noqa: E731
    expected = per_source_grads(model, {"loss": loss()})[0]
    stage = GradientStage(model, PCGrad(nonfinite="propagate"))
    stats = stage.backward(loss())
    assert stage.fast_path and stage.buffer is None
    torch.testing.assert_close(flat_grad(model), expected, rtol=1e-12, atol=1e-14)
    assert stats.names == ("loss",) and stats.weights == (1.0,)
    assert stats.norms[0] == pytest.approx(float(expected.norm()), rel=1e-9)
    stage.zero_grad()
    assert all(p.grad is None for p in model.parameters())


def test_single_weighted_source_is_not_the_identity():
    model, batch = setup(6)
    loss = lambda: sum(two_task_loss(model(batch[0]), batch).values())  # noqa: E731
    expected = per_source_grads(model, {"loss": loss()})[0]
    stage = GradientStage(model, build_training_aggregator("weighted", weights=[0.5]))
    stats = stage.backward(loss())
    assert not stage.fast_path
    torch.testing.assert_close(flat_grad(model), 0.5 * expected, rtol=1e-10, atol=1e-12)
    assert stats.weights == (0.5,)


@pytest.mark.parametrize("sources", [1, 2])
def test_clipping(sources):
    model, batch = setup(7)

    def losses():
        named = two_task_loss(model(batch[0]), batch)
        return named if sources == 2 else sum(named.values())

    unclipped = GradientStage(model, build_training_aggregator("sum")).backward(losses())
    stage = GradientStage(model, build_training_aggregator("sum"), max_grad_norm=unclipped.grad_norm / 4)
    stage.zero_grad()
    stats = stage.backward(losses())
    assert stats.grad_norm == pytest.approx(unclipped.grad_norm)  # reported before clipping
    assert float(flat_grad(model).norm()) == pytest.approx(unclipped.grad_norm / 4, rel=1e-5)


@pytest.mark.parametrize("sources", [1, 2])
def test_non_finite_is_flagged(sources):
    model, batch = setup(8)
    losses = two_task_loss(model(batch[0]), batch)
    losses = {"a": losses["a"] * float("nan"), "b": losses["b"]} if sources == 2 else losses["a"] * float("inf")
    stats = GradientStage(model, build_training_aggregator("pcgrad")).backward(losses)
    assert not stats.finite
    assert not math.isfinite(stats.losses[0])


@pytest.mark.parametrize("scale", [float("inf"), 1e300])
def test_infinite_or_overflowing_gradients_are_flagged_not_raised(scale):
    # An inf gradient (or one whose squared norm overflows) must come out as a non-finite step for
    # the safety checks, never as an exception from the statistics.
    model, batch = setup(10)
    losses = two_task_loss(model(batch[0]), batch)
    stats = GradientStage(model, build_training_aggregator("sum")).backward(
        {"a": losses["a"] * scale, "b": -losses["b"] * scale}
    )
    assert not stats.finite
    assert not math.isfinite(stats.grad_norm)


def test_names_must_stay_the_same():
    model, batch = setup(9)
    stage = GradientStage(model, build_training_aggregator("pcgrad"))
    stage.backward(two_task_loss(model(batch[0]), batch))
    with pytest.raises(ValueError, match=r"missing \['b'\], unexpected \['c'\]"):
        out = two_task_loss(model(batch[0]), batch)
        stage.backward({"a": out["a"], "c": out["b"]})


@pytest.mark.parametrize(
    "losses, error, match",
    [
        ({}, ValueError, "empty dict"),
        ([1.0], TypeError, "tensor or a dict"),
        ({"a": 1.0}, TypeError, "not a tensor"),
        ({"a": torch.ones(2, requires_grad=True)}, ValueError, "must be a scalar"),
        ({"a": torch.ones(())}, ValueError, "does not require grad"),
    ],
)
def test_bad_losses(losses, error, match):
    with pytest.raises(error, match=match):
        as_named_losses(losses)


@pytest.mark.parametrize("name", AGGREGATOR_NAMES)
def test_every_named_aggregator_trains_two_sources(name):
    model, batch = setup(11)
    options = {"weights": [1.0, 0.5]} if name in ("weighted", "constant") else {}
    if name == "graddrop":
        options["seed"] = 0
    if name == "trimmed_mean":
        options["trim_number"] = 0  # two sources: nothing to trim, the mean
    stage = GradientStage(model, build_training_aggregator(name, **options))
    if name == "krum":  # Krum scores each source by its distance to others: it needs three at least
        with pytest.raises(ValueError, match="Krum.* needs at least 3 sources"):
            stage.backward(two_task_loss(model(batch[0]), batch))
        return
    stats = stage.backward(two_task_loss(model(batch[0]), batch))
    assert stats.finite and stats.names == ("a", "b")
    J = per_source_grads(model, two_task_loss(model(batch[0]), batch))
    if not stage.aggregator.weighted:  # coordinate-wise: the same aggregator, fresh, on J
        expected = build_training_aggregator(name, **options)(J)
        torch.testing.assert_close(flat_grad(model), expected, rtol=1e-8, atol=1e-10)
        assert stats.grad_norm == pytest.approx(float(expected.norm()), rel=1e-9)
        return
    torch.testing.assert_close(flat_grad(model), torch.tensor(stats.weights, dtype=J.dtype) @ J, rtol=1e-8, atol=1e-10)


def test_unknown_aggregator_lists_valid_names():
    with pytest.raises(ValueError, match="valid names are " + ", ".join(AGGREGATOR_NAMES)):
        build_aggregator("nope")
    with pytest.raises(ValueError, match="bad options"):
        build_training_aggregator("mean", shuffle=True)


def test_one_build_aggregator_with_one_default():
    # tolaria.trainer.build_aggregator is tolaria.aggregation.build_aggregator: it raises on NaN by
    # default; only the trainer's own builder propagates (its safety checks skip such steps).
    import tolaria.aggregation
    import tolaria.trainer

    assert tolaria.trainer.build_aggregator is tolaria.aggregation.build_aggregator
    assert build_aggregator("pcgrad").nonfinite == "raise"
    assert build_training_aggregator("pcgrad").nonfinite == "propagate"
    assert build_training_aggregator("pcgrad", nonfinite="raise").nonfinite == "raise"


def test_accumulator_means_and_conflict_rate():
    model, batch = setup(10)
    stage = GradientStage(model, build_training_aggregator("pcgrad"))
    acc = SourceAccumulator()
    steps = []
    for _ in range(3):
        s = stage.backward(two_task_loss(model(batch[0]), batch))
        steps.append(s)
        acc.add(s)
    summary = acc.summary()
    assert summary["steps"] == 3
    assert summary["losses"]["a"] == pytest.approx(sum(s.losses[0] for s in steps) / 3)
    assert summary["conflict_rate"] == pytest.approx(sum(s.conflicts for s in steps) / (3 * 2))
    assert summary["cosine"][0][1] == pytest.approx(sum(s.cosine[0][1] for s in steps) / 3)
