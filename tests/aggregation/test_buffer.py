"""GradientBuffer: per-source rows filled by backward in place, aggregate written into .grad views."""

import pytest
import torch
from torch import nn

from tolaria.aggregation import GradientBuffer, PCGrad, Sum


class TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.trunk = nn.Linear(4, 8)
        self.head_a = nn.Linear(8, 1)
        self.head_b = nn.Linear(8, 1)

    def forward(self, x):
        h = torch.tanh(self.trunk(x))
        return self.head_a(h), self.head_b(h)


def _flat_grad(loss, params):
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for g, p in zip(grads, params)])


def test_rows_hold_each_source_and_unreached_params_are_zero():
    torch.manual_seed(0)
    model = TwoHeads()
    x = torch.randn(16, 4)
    buf = GradientBuffer(model, num_sources=2)
    params = buf.params
    a, b = model(x)
    la, lb = a.pow(2).mean(), (b - 1).abs().mean()
    expect_a = _flat_grad(model(x)[0].pow(2).mean(), params)
    expect_b = _flat_grad((model(x)[1] - 1).abs().mean(), params)
    buf.backward([la, lb])
    torch.testing.assert_close(buf.buffer[0], expect_a)
    torch.testing.assert_close(buf.buffer[1], expect_b)
    # head_b is not reached by source 0: its slots in row 0 are exactly zero.
    offset = sum(p.numel() for p in params[:4])
    assert torch.all(buf.buffer[0, offset:] == 0)


def test_aggregate_writes_grad_views_of_one_flat_output():
    model = TwoHeads()
    buf = GradientBuffer(model, num_sources=2)
    a, b = model(torch.randn(8, 4))
    buf.backward([a.sum(), -b.sum()])
    out, stats = buf.aggregate(PCGrad(shuffle=False), return_stats=True)
    assert out.data_ptr() == buf.output.data_ptr()
    start = buf.output.data_ptr()
    end = start + buf.output.numel() * buf.output.element_size()
    for p in buf.params:
        assert start <= p.grad.data_ptr() < end
    torch.testing.assert_close(buf.output, PCGrad(shuffle=False, backend="torch")(buf.buffer))
    assert stats.norms.shape == (2,)


def test_optimizer_step_uses_the_aggregate():
    model = TwoHeads()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    buf = GradientBuffer(model, num_sources=2)
    a, b = model(torch.randn(8, 4))
    buf.backward([a.sum(), b.sum()])
    buf.aggregate(Sum())
    opt.step()
    for p, p0, g in zip(model.parameters(), before, buf._output_views):
        torch.testing.assert_close(p.detach(), p0 - 0.1 * g)


def test_rows_accumulate_over_micro_batches_until_aggregate_consumes_them():
    torch.manual_seed(0)
    model = TwoHeads()
    xs = [torch.randn(4, 4) for _ in range(3)]
    buf = GradientBuffer(model, num_sources=2)
    for x in xs:  # three micro-batches, then one aggregate: as PyTorch accumulates .grad
        a, b = model(x)
        buf.backward([a.sum(), b.sum()])
    expected = torch.stack([sum(_flat_grad(model(x)[k].sum(), buf.params) for x in xs) for k in range(2)])
    torch.testing.assert_close(buf.buffer, expected)
    buf.aggregate(Sum())
    torch.testing.assert_close(buf.output, expected.sum(0))
    a, b = model(xs[0])  # the next round starts from empty rows
    buf.zero_grad()
    buf.backward([a.sum(), b.sum()])
    torch.testing.assert_close(buf.buffer[0], _flat_grad(model(xs[0])[0].sum(), buf.params))


def test_accumulate_false_keeps_only_the_last_backward():
    model = TwoHeads()
    buf = GradientBuffer(model, num_sources=1, accumulate=False)
    model.trunk.weight.grad = torch.ones_like(model.trunk.weight)  # discarded, as documented
    for _ in range(2):
        a, _ = model(torch.ones(1, 4))
        buf.backward([a.sum()])
    single = _flat_grad(model(torch.ones(1, 4))[0].sum(), buf.params)
    torch.testing.assert_close(buf.buffer[0], single)
    buf.aggregate(Sum())
    torch.testing.assert_close(buf.output, single)


def test_an_existing_grad_is_added_to_the_aggregate_never_dropped():
    torch.manual_seed(1)
    model = TwoHeads()
    x = torch.randn(8, 4)
    buf = GradientBuffer(model, num_sources=2)
    regulariser = sum((p**2).sum() for p in model.parameters())
    regulariser.backward()  # before the sources ...
    a, b = model(x)
    buf.backward([a.sum(), b.sum()])
    extra = model.trunk.weight.sum()
    extra.backward()  # ... and between the last source and the aggregate
    buf.aggregate(Sum())
    expected = (
        _flat_grad(sum((p**2).sum() for p in model.parameters()), buf.params)
        + _flat_grad(model(x)[0].sum() + model(x)[1].sum(), buf.params)
        + _flat_grad(model.trunk.weight.sum(), buf.params)
    )
    torch.testing.assert_close(buf.output, expected)
    # A step without zero_grad accumulates the previous aggregate, as PyTorch's .grad does.
    previous = buf.output.clone()
    a, b = model(x)
    buf.backward([a.sum(), b.sum()])
    buf.aggregate(Sum())
    torch.testing.assert_close(buf.output, previous + _flat_grad(model(x)[0].sum() + model(x)[1].sum(), buf.params))


def test_only_shared_parameters_are_buffered_and_heads_get_their_plain_gradient():
    torch.manual_seed(2)
    model = TwoHeads()
    x = torch.randn(8, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    buf = GradientBuffer(opt, num_sources=2, shared=model.trunk)
    assert buf.params == list(model.trunk.parameters())
    assert len(buf.unshared_params) == 4 and buf.numel == 4 * 8 + 8
    a, b = model(x)
    buf.backward({"a": a.sum(), "b": b.sum()})
    buf.aggregate(PCGrad(shuffle=False))
    head_a = torch.autograd.grad(model(x)[0].sum(), list(model.head_a.parameters()))
    for p, g in zip(model.head_a.parameters(), head_a):
        torch.testing.assert_close(p.grad, g)
    trunk = torch.stack([_flat_grad(model(x)[k].sum(), buf.params) for k in range(2)])
    torch.testing.assert_close(buf.output, PCGrad(shuffle=False)(trunk))


def test_parameters_come_from_a_module_an_optimizer_or_its_param_groups():
    model = TwoHeads()
    opt = torch.optim.Adam([{"params": model.trunk.parameters()}, {"params": model.head_a.parameters(), "lr": 0.1}])
    for source in (opt, opt.param_groups, list(model.trunk.parameters()) + list(model.head_a.parameters())):
        buf = GradientBuffer(source, num_sources=2)
        assert buf.numel == 4 * 8 + 8 + 8 + 1
    with pytest.raises(TypeError, match="module, an optimizer, its param_groups"):
        GradientBuffer([{"lr": 0.1}], 2)
    with pytest.raises(TypeError, match="pass the aggregator to buf.aggregate"):
        GradientBuffer(PCGrad(), 2)
    with pytest.raises(ValueError, match="not among the buffer's parameters"):
        GradientBuffer(model.trunk, 2, shared=model.head_a)


def test_a_model_cast_after_the_buffer_was_built_says_to_rebuild_it():
    model = TwoHeads()
    buf = GradientBuffer(model, num_sources=2)
    model.double()
    a, b = model(torch.randn(2, 4, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="build a new GradientBuffer after model.to"):
        buf.backward([a.sum(), b.sum()])


def test_any_callable_on_the_matrix_aggregates_and_a_wrong_shape_is_refused():
    model = TwoHeads()
    buf = GradientBuffer(model, num_sources=2)
    a, b = model(torch.randn(3, 4))
    buf.backward([a.sum(), b.sum()], retain_graph=True)
    rows = buf.buffer.clone()
    buf.aggregate(lambda matrix: matrix.mean(dim=0))
    torch.testing.assert_close(buf.output, rows.mean(0))
    assert model.trunk.weight.grad.data_ptr() == buf.output.data_ptr()
    buf.zero_grad()
    buf.backward([a.sum(), b.sum()])
    with pytest.raises(ValueError, match="must return one vector"):
        buf.aggregate(lambda matrix: matrix)
    with pytest.raises(ValueError, match="return_stats=True needs a Tolaria aggregator"):
        buf.aggregate(lambda matrix: matrix.sum(0), return_stats=True)


def test_zero_grad_inside_a_source_block_is_reported():
    model = TwoHeads()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    buf = GradientBuffer(model, num_sources=1)
    with pytest.raises(RuntimeError, match="replaced"):
        with buf.source(0):
            opt.zero_grad(set_to_none=False)
            model.trunk.weight.grad = torch.zeros_like(model.trunk.weight)


def test_bad_arguments():
    model = TwoHeads()
    with pytest.raises(ValueError, match="num_sources"):
        GradientBuffer(model, 0)
    with pytest.raises(ValueError, match="requires_grad"):
        GradientBuffer([nn.Parameter(torch.ones(2), requires_grad=False)], 1)
    with pytest.raises(ValueError, match="one dtype and device"):
        GradientBuffer([nn.Parameter(torch.ones(2)), nn.Parameter(torch.ones(2, dtype=torch.float64))], 1)
    buf = GradientBuffer(model, 2)
    with pytest.raises(IndexError):
        with buf.source(2):
            pass
    with pytest.raises(ValueError, match="got 1 losses"):
        buf.backward([torch.zeros((), requires_grad=True)])


def test_rows_are_aligned_for_any_parameter_count():
    params = [nn.Parameter(torch.randn(7)), nn.Parameter(torch.randn(3, 3)), nn.Parameter(torch.randn(1))]
    buf = GradientBuffer(params, num_sources=3)  # N = 17: rows would sit 68 bytes apart unpadded
    assert buf.buffer.shape == (3, 17)
    for k in range(3):
        assert buf.buffer[k].data_ptr() % 64 == 0
    buf.backward([sum(p.sum() for p in params) * (k + 1) for k in range(3)])
    torch.testing.assert_close(buf.buffer, torch.tensor([[1.0], [2.0], [3.0]]).expand(3, 17))
    buf.aggregate(Sum())
    torch.testing.assert_close(buf.output, torch.full((17,), 6.0))


def test_torchjds_aggregators_aggregate_the_buffer():
    tjd = pytest.importorskip("torchjd.aggregation")
    torch.manual_seed(3)
    model = TwoHeads()
    buf = GradientBuffer(model, num_sources=2)
    a, b = model(torch.randn(5, 4))
    buf.backward([a.sum(), b.sum()])
    rows = buf.buffer.clone()
    buf.aggregate(tjd.UPGrad())
    torch.testing.assert_close(buf.output, tjd.UPGrad()(rows))
