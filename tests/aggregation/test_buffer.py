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


def test_rows_are_zeroed_between_steps():
    model = TwoHeads()
    buf = GradientBuffer(model, num_sources=1)
    for _ in range(2):
        a, _ = model(torch.ones(1, 4))
        buf.backward([a.sum()])
    single = _flat_grad(model(torch.ones(1, 4))[0].sum(), buf.params)
    torch.testing.assert_close(buf.buffer[0], single)


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
