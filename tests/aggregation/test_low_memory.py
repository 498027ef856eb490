"""``GradientBuffer(mode="low_memory")``: the buffer mode's update (float64, 1e-12) for every Gramian
aggregator of the registry, without a K x N tensor; the exact fallback when the batched backward
fails; the memory estimate from a measured forward."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from tolaria.aggregation import (
    AGGREGATOR_NAMES,
    GradientBuffer,
    LowMemoryGradientBuffer,
    build_aggregator,
    estimate_memory,
    is_gramian,
    measure_activations,
)

from .registry_examples import example_aggregator

K = 3


def _build(name: str):
    return example_aggregator(name, K)


GRAMIAN = [n for n in AGGREGATOR_NAMES if is_gramian(_build(n))]
NOT_GRAMIAN = [n for n in AGGREGATOR_NAMES if n not in GRAMIAN]


class _ItemInBackward(torch.autograd.Function):
    """Identity whose backward reads a value on the host: no batching rule under vmap."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        scale = 1.0 if grad.abs().sum().item() >= 0 else 0.0
        return grad * scale


class _Net(nn.Module):
    def __init__(self, host_read: bool = False):
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, 8))
        self.heads = nn.ModuleList([nn.Linear(8, 1) for _ in range(K)])
        self.host_read = host_read

    def forward(self, x):
        z = self.trunk(x)
        if self.host_read:
            z = _ItemInBackward.apply(z)
        return [head(torch.tanh(z)).squeeze(-1) for head in self.heads]


def _model(host_read: bool = False) -> _Net:
    torch.manual_seed(0)
    return _Net(host_read).double()


def _batches(steps: int):
    gen = torch.Generator().manual_seed(1)
    # targets pull the heads (and so the trunk) in opposite directions: conflicts happen
    return [
        (torch.randn(10, 6, generator=gen, dtype=torch.float64), torch.randn(K, 10, generator=gen, dtype=torch.float64))
        for _ in range(steps)
    ]


def _losses(model, x, ys):
    return [((out - y) ** 2).mean() + 0.3 * out.mean() * (-1) ** k for k, (out, y) in enumerate(zip(model(x), ys))]


def _run(name: str, mode: str, steps: int = 2, host_read: bool = False):
    model = _model(host_read)
    aggregator = _build(name)
    buf = GradientBuffer(model, K, shared=model.trunk, mode=mode)
    grads, stats = [], []
    for x, ys in _batches(steps):
        buf.zero_grad()
        buf.backward(_losses(model, x, ys))
        _, st = buf.aggregate(aggregator, return_stats=True)
        grads.append([p.grad.clone() for p in model.parameters()])
        stats.append(st)
        with torch.no_grad():  # a step, so that the second round sees other parameters and state
            for p in model.parameters():
                p -= 0.1 * p.grad
    return grads, stats, buf


def _assert_same(reference, other):
    for step, (ref_grads, grads) in enumerate(zip(reference[0], other[0])):
        for i, (a, b) in enumerate(zip(ref_grads, grads)):
            scale = max(a.abs().max().item(), 1.0)
            error = (a - b).abs().max()
            assert torch.allclose(a, b, rtol=0, atol=1e-12 * scale), f"step {step}, parameter {i}: {error}"
    for ref_st, st in zip(reference[1], other[1]):
        assert torch.allclose(ref_st.gram, st.gram, rtol=1e-12, atol=1e-14)
        assert torch.allclose(ref_st.weights.double(), st.weights.double(), rtol=1e-10, atol=1e-12, equal_nan=True)
        assert int(ref_st.conflicts) == int(st.conflicts)


@pytest.mark.parametrize("name", GRAMIAN)
def test_the_update_is_the_buffer_modes_for_every_gramian_aggregator(name):
    reference = _run(name, "buffer")
    low = _run(name, "low_memory")
    assert isinstance(low[2], LowMemoryGradientBuffer) and low[2].batched
    _assert_same(reference, low)


def test_the_registry_s_non_gramian_aggregators_are_the_expected_ones_and_raise():
    assert sorted(NOT_GRAMIAN) == ["excess_mtl", "graddrop", "trimmed_mean"]
    model = _model()
    buf = GradientBuffer(model, K, shared=model.trunk, mode="low_memory")
    x, ys = _batches(1)[0]
    for name in NOT_GRAMIAN:
        buf.zero_grad()
        buf.backward(_losses(model, x, ys))
        with pytest.raises(ValueError, match='use mode="buffer"'):
            buf.aggregate(_build(name))


def test_a_backward_without_batching_rule_falls_back_exactly_and_says_so_once():
    reference = _run("upgrad", "buffer", steps=2, host_read=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        low = _run("upgrad", "low_memory", steps=2, host_read=True)
    fallback = [w for w in caught if "batched backward failed" in str(w.message)]
    assert len(fallback) == 1 and "1 + K(K-1)/2 = 4 passes" in str(fallback[0].message)
    assert not low[2].batched
    _assert_same(reference, low)


class _LargestTensor(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("host_read", [False, True], ids=["batched", "fallback"])
def test_no_tensor_of_k_x_n_elements_is_ever_made(host_read):
    torch.manual_seed(0)
    # Six blocks of 144: the largest block x K (432) is far below K x N (2 592).
    trunk = nn.Sequential(*[nn.Sequential(nn.Linear(12, 12, bias=False), nn.Tanh()) for _ in range(6)]).double()
    heads = nn.ModuleList([nn.Linear(12, 1) for _ in range(K)]).double()
    x = torch.randn(4, 12, dtype=torch.float64)
    buf = GradientBuffer(nn.ModuleList([trunk, heads]), K, shared=trunk, mode="low_memory")
    with pytest.raises(AttributeError, match="holds no K x N buffer"):
        _ = buf.buffer
    z = trunk(x)
    if host_read:
        z = _ItemInBackward.apply(z)
    losses = [head(z).pow(2).mean() for head in heads]
    with _LargestTensor() as seen, warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        buf.backward(losses)
        buf.aggregate(build_aggregator("upgrad"))
    assert buf.batched is not host_read
    assert seen.largest < buf.num_sources * buf.numel // 4, seen.largest


def test_round_semantics_match_the_buffer_mode():
    model = _model()
    x, ys = _batches(1)[0]
    buf = GradientBuffer(model, K, shared=model.trunk, mode="low_memory")
    with pytest.raises(RuntimeError, match="no per-source rows"):
        with buf.source(0):
            pass
    with pytest.raises(RuntimeError, match="needs a backward"):
        buf.aggregate(build_aggregator("mean"))
    buf.backward(_losses(model, x, ys))
    with pytest.raises(RuntimeError, match="cannot sum sources over several backward passes"):
        buf.backward(_losses(model, x, ys))
    # A .grad already there (here: an earlier aggregate never cleared) is added, as PyTorch does.
    before = [p.grad for p in model.trunk.parameters()]
    assert all(g is None for g in before)
    buf.aggregate(build_aggregator("mean"))
    once = buf.output.clone()
    buf.backward(_losses(model, x, ys))
    buf.aggregate(build_aggregator("mean"))
    assert torch.allclose(buf.output, 2 * once, rtol=1e-13, atol=0)
    assert all(p.grad.data_ptr() == v.data_ptr() for p, v in zip(buf.params, buf._output_views))
    with pytest.raises(ValueError, match="valid modes are buffer, low_memory"):
        GradientBuffer(model, K, mode="tiny")


def test_the_estimate_counts_the_saved_activations_and_declines_where_they_dominate():
    torch.manual_seed(0)
    wide = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 64)).double()
    x = torch.randn(2, 64, dtype=torch.float64)
    with measure_activations(list(wide.parameters())) as measured:
        wide(x)
    # Saved: the input (2 x 64), tanh's output (2 x 64) and the second Linear's input (the same
    # tensor, counted once); the weights are parameters, not activations.
    assert measured.total_bytes == 2 * (2 * 64 * 8) and measured.largest_bytes == 2 * 64 * 8
    saving = estimate_memory(list(wide.parameters()), 8, measured)
    assert saving.saves and "saves memory" in saving.message
    assert saving.buffer_bytes == 8 * sum(p.numel() for p in wide.parameters()) * 8 + 2 * 2 * 64 * 8

    # A conv trunk: few parameters, large activations. The buffer wins, and the buffer says so.
    conv = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.Flatten())
    heads = nn.ModuleList([nn.Linear(8 * 16 * 16, 1) for _ in range(K)])
    buf = GradientBuffer(nn.ModuleList([conv, heads]), K, shared=conv, mode="low_memory")
    with buf.measure_forward():
        z = conv(torch.randn(16, 3, 16, 16))
    with pytest.warns(RuntimeWarning, match=r'saves no memory: use mode="buffer".*activations .* MiB saved'):
        buf.backward([head(z).mean() for head in heads])
    assert not buf.memory_estimate.saves
    buf.aggregate(build_aggregator("mean"))


def test_non_finite_sources_are_named_or_propagated_as_in_the_buffer_mode():
    x, ys = _batches(1)[0]
    for mode in ("buffer", "low_memory"):
        model = _model()
        buf = GradientBuffer(model, K, shared=model.trunk, mode=mode)
        losses = _losses(model, x, ys)
        buf.backward([losses[0], losses[1] * float("nan"), losses[2]])
        with pytest.raises(ValueError, match=r"gradient source\(s\) 1;"):
            buf.aggregate(build_aggregator("upgrad"))
        buf.zero_grad()
        losses = _losses(model, x, ys)
        buf.backward([losses[0], losses[1] * float("nan"), losses[2]])
        out, stats = buf.aggregate(build_aggregator("upgrad", nonfinite="propagate"), return_stats=True)
        assert torch.isnan(stats.weights).all() and torch.isnan(out).all(), mode
        assert torch.isfinite(stats.gram[[0, 2]][:, [0, 2]]).all(), mode  # the other sources stay finite


def test_a_functorch_without_the_private_unwrap_falls_back_exactly(monkeypatch):
    import tolaria.aggregation.low_memory as low_memory

    def missing(grad, k):
        raise AttributeError("module 'torch._C._functorch' has no attribute 'get_unwrapped'")

    monkeypatch.setattr(low_memory, "_unbatch", missing)
    reference = _run("mgda", "buffer", steps=1)
    with pytest.warns(RuntimeWarning, match="AttributeError: module 'torch._C._functorch'"):
        low = _run("mgda", "low_memory", steps=1)
    assert not low[2].batched
    _assert_same(reference, low)


def test_wide_linear_layers_take_their_gram_from_inputs_and_output_gradients():
    """x x^T and the output gradients give a wide layer's Gram share: the same update, fewer blocks; a
    tied weight or a layer called twice keeps the block path (the shortcut would be wrong there)."""
    torch.manual_seed(0)
    wide = nn.Linear(40, 40).double()
    tied = nn.Linear(40, 40).double()
    trunk = nn.ModuleDict({"wide": wide, "tied": tied, "twice": nn.Linear(40, 40).double()})
    heads = nn.ModuleList([nn.Linear(40, 1) for _ in range(K)]).double()
    x = torch.randn(5, 40, dtype=torch.float64)

    def losses():
        z = torch.tanh(wide(x))
        z = torch.tanh(tied(z)) + 0.1 * (z @ tied.weight)  # the weight used twice: two edges
        z = trunk["twice"](torch.tanh(trunk["twice"](z)))
        return [head(z).pow(2).mean() * (k + 1) for k, head in enumerate(heads)]

    grads = {}
    for mode, shortcut in (("buffer", None), ("low_memory", True), ("low_memory", False)):
        buf = GradientBuffer(nn.ModuleList([trunk, heads]), K, shared=trunk, mode=mode)
        if shortcut is not None:
            buf.linear_gram = shortcut
        buf.zero_grad()
        buf.backward(losses())
        _, stats = buf.aggregate(build_aggregator("upgrad"), return_stats=True)
        grads[mode, shortcut] = ([p.grad.clone() for p in trunk.parameters()], stats.gram)
        if shortcut is not None:
            assert buf.linear_layers == (1 if shortcut else 0)  # "wide" only
    for key in (("low_memory", True), ("low_memory", False)):
        for a, b in zip(grads["buffer", None][0], grads[key][0]):
            assert torch.allclose(a, b, rtol=0, atol=1e-13), key
        assert torch.allclose(grads["buffer", None][1], grads[key][1], rtol=1e-12, atol=1e-14), key
