"""tolaria.compat.torchjd against TorchJD 0.18's own torchjd.autojac functions, number for number."""

import inspect

import pytest
import torch
from torch import nn

import tolaria.aggregation as ta
from tolaria.compat import torchjd as tc

tj = pytest.importorskip("torchjd.autojac")
tja = pytest.importorskip("torchjd.aggregation")

TOL = {"rtol": 0, "atol": 1e-12}
K = 3


def UPG():
    """Tolaria's UPGrad with TorchJD's regularisation (its defaults are the exact projection)."""
    return ta.UPGrad(reg_eps=1e-4, norm_eps=1e-4)


class MultiTask(nn.Module):
    """A shared trunk and K heads whose targets pull the trunk in conflicting directions."""

    def __init__(self, seed=0, dtype=torch.float64):
        super().__init__()
        torch.manual_seed(seed)
        self.trunk = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 7), nn.Tanh()).to(dtype)
        self.heads = nn.ModuleList(nn.Linear(7, 2).to(dtype) for _ in range(K))

    def forward(self, x):
        features = self.trunk(x)
        return features, [h(features) for h in self.heads]


def batch(seed=1, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(16, 6, generator=g, dtype=dtype)
    y = torch.randn(16, 2, generator=g, dtype=dtype)
    return x, [y, -y, 2 * y.flip(0)]  # opposite targets: the tasks' gradients conflict


def losses_of(model, x, ys):
    features, outs = model(x)
    return features, [((o - y) ** 2).mean() for o, y in zip(outs, ys)]


def head_params(model):
    return [p for h in model.heads for p in h.parameters()]


def flat_grads(params):
    return torch.cat([p.grad.flatten() for p in params])


def twins(dtype=torch.float64):
    return MultiTask(dtype=dtype), MultiTask(dtype=dtype)


@pytest.mark.parametrize("tolaria_aggregator", [True, False], ids=["tolaria-upgrad", "torchjd-upgrad"])
def test_mtl_backward_and_jac_to_grad_match_torchjd(tolaria_aggregator):
    ours, theirs = twins()
    x, ys = batch()
    f, losses = losses_of(theirs, x, ys)
    tj.mtl_backward(losses, f)
    jacs_ref = [p.jac.clone() for p in theirs.trunk.parameters()]
    w_ref = tj.jac_to_grad(list(theirs.trunk.parameters()), tja.UPGrad())

    f, losses = losses_of(ours, x, ys)
    tc.mtl_backward(losses, f)
    for p, j in zip(ours.trunk.parameters(), jacs_ref):
        torch.testing.assert_close(p.jac, j, **TOL)
    for p in head_params(ours):
        assert not hasattr(p, "jac")
    aggregator = UPG() if tolaria_aggregator else tja.UPGrad()
    w = tc.jac_to_grad(list(ours.trunk.parameters()), aggregator)

    torch.testing.assert_close(flat_grads(ours.trunk.parameters()), flat_grads(theirs.trunk.parameters()), **TOL)
    torch.testing.assert_close(flat_grads(head_params(ours)), flat_grads(head_params(theirs)), **TOL)
    torch.testing.assert_close(w, w_ref, **TOL)
    assert w.dtype == torch.float64
    assert (w_ref - w_ref.mean()).abs().max() > 1e-3, "the tasks should conflict (UPGrad's weights not uniform)"
    for p in ours.trunk.parameters():
        assert not hasattr(p, "jac")


def test_backward_default_inputs_match_torchjd():
    ours, theirs = twins()
    x, ys = batch()
    _, losses = losses_of(theirs, x, ys)
    tj.backward(losses)
    _, losses = losses_of(ours, x, ys)
    tc.backward(losses)
    for p, q in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(p.jac, q.jac, **TOL)
        assert p.grad is None  # backward leaves .grad alone
    before = tc.concatenation_fallbacks()
    w = tc.jac_to_grad(list(ours.parameters()), UPG())
    w_ref = tj.jac_to_grad(list(theirs.parameters()), tja.UPGrad())
    assert tc.concatenation_fallbacks() == before
    torch.testing.assert_close(flat_grads(ours.parameters()), flat_grads(theirs.parameters()), **TOL)
    torch.testing.assert_close(w, w_ref, **TOL)


def test_backward_jac_tensors_non_scalar_and_explicit_inputs():
    ours, theirs = twins()
    x, _ = batch()
    jac_tensors = torch.randn(4, 16, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    results = []
    for lib, model in ((tj, theirs), (tc, ours)):
        _, outs = model(x)
        inputs = [*model.trunk.parameters(), *model.heads[0].parameters()]
        lib.backward(outs[0], jac_tensors=jac_tensors, inputs=inputs)
        results.append([p.jac.clone() for p in inputs])
        assert all(not hasattr(p, "jac") for p in model.heads[1].parameters())
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, **TOL)

    # Identity over a non-scalar tensor: one row per element.
    rows = []
    for lib, model in ((tj, MultiTask(seed=5)), (tc, MultiTask(seed=5))):
        _, outs = model(x[:3])
        lib.backward([outs[1]], inputs=list(model.heads[1].parameters()))
        rows.append([p.jac.clone() for p in model.heads[1].parameters()])
    assert rows[1][0].shape[0] == 6
    for a, b in zip(*rows):
        torch.testing.assert_close(a, b, **TOL)


def test_jacs_are_views_of_one_buffer():
    model = MultiTask()
    x, ys = batch()
    _, losses = losses_of(model, x, ys)
    tc.backward(losses)
    params = list(model.parameters())
    base = params[0].jac._base
    assert base is not None and base.dim() == 2 and base.shape[0] == K
    start = base.data_ptr()
    end = start + base.numel() * base.element_size()
    for p in params:
        assert p.jac._base is base
        assert p.jac.untyped_storage().data_ptr() == base.untyped_storage().data_ptr()
        assert start <= p.jac.data_ptr() and p.jac.data_ptr() + p.jac[0].numel() * 8 <= end
    total = sum(p.numel() for p in params)
    assert base.shape[1] >= total and base.shape[1] - total < 32  # rows padded to 32 elements at most
    base.zero_()
    assert all(bool((p.jac == 0).all()) for p in params)  # no copies anywhere


def test_accumulation_over_two_calls_and_retain_jac():
    ours, theirs = twins()
    x, ys = batch()
    for lib, model in ((tj, theirs), (tc, ours)):
        f, losses = losses_of(model, x, ys)
        lib.mtl_backward(losses, f, retain_graph=True)
        lib.mtl_backward([2 * loss for loss in losses], f)  # .jac and the heads' .grad accumulate
    for p, q in zip(ours.parameters(), theirs.parameters()):
        if hasattr(q, "jac"):
            torch.testing.assert_close(p.jac, q.jac, **TOL)
        else:
            torch.testing.assert_close(p.grad, q.grad, **TOL)
    base = next(ours.trunk.parameters()).jac._base
    assert all(p.jac._base is base for p in ours.trunk.parameters())  # accumulated in place, still one buffer

    before = tc.concatenation_fallbacks()
    w = tc.jac_to_grad(list(ours.trunk.parameters()), UPG(), retain_jac=True)
    w_ref = tj.jac_to_grad(list(theirs.trunk.parameters()), tja.UPGrad(), retain_jac=True)
    assert tc.concatenation_fallbacks() == before
    torch.testing.assert_close(w, w_ref, **TOL)
    assert all(hasattr(p, "jac") for p in ours.trunk.parameters())
    # A second jac_to_grad on the retained .jac accumulates into .grad (grad += aggregate), as TorchJD.
    tc.jac_to_grad(list(ours.trunk.parameters()), UPG())
    tj.jac_to_grad(list(theirs.trunk.parameters()), tja.UPGrad())
    torch.testing.assert_close(flat_grads(ours.parameters()), flat_grads(theirs.parameters()), **TOL)
    assert not any(hasattr(p, "jac") for p in ours.parameters())


def test_grad_accumulates_into_existing_grad():
    ours, theirs = twins()
    x, ys = batch()
    for lib, model, agg in ((tj, theirs, tja.UPGrad()), (tc, ours, UPG())):
        for p in model.parameters():
            p.grad = torch.full_like(p, 0.25)
        f, losses = losses_of(model, x, ys)
        lib.mtl_backward(losses, f)
        lib.jac_to_grad(list(model.trunk.parameters()), agg)
    torch.testing.assert_close(flat_grads(ours.parameters()), flat_grads(theirs.parameters()), **TOL)
    plain = MultiTask()
    f, losses = losses_of(plain, x, ys)
    tc.mtl_backward(losses, f)
    tc.jac_to_grad(list(plain.trunk.parameters()), UPG())
    torch.testing.assert_close(flat_grads(ours.parameters()), flat_grads(plain.parameters()) + 0.25, **TOL)


def test_backward_leaves_existing_grad_alone():
    model = MultiTask()
    x, ys = batch()
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    _, losses = losses_of(model, x, ys)
    tc.backward(losses)
    for p in model.parameters():
        assert bool((p.grad == 1).all())


@pytest.mark.parametrize("form", ["positional", "keywords", "v0.2"])
def test_old_api_aggregates_into_grad(form):
    ours, theirs = twins()
    x, ys = batch()
    f, losses = losses_of(theirs, x, ys)
    tj.mtl_backward(losses, f)
    tj.jac_to_grad(list(theirs.trunk.parameters()), tja.UPGrad())

    f, losses = losses_of(ours, x, ys)
    if form == "positional":
        tc.mtl_backward(losses, f, UPG())
    elif form == "keywords":
        tc.mtl_backward(losses=losses, features=f, aggregator=tja.UPGrad())
    else:
        tc.mtl_backward(losses, f, [list(h.parameters()) for h in ours.heads], list(ours.trunk.parameters()), A=UPG())
    torch.testing.assert_close(flat_grads(ours.parameters()), flat_grads(theirs.parameters()), **TOL)
    assert not any(hasattr(p, "jac") for p in ours.parameters())


def test_old_api_backward():
    ours, theirs = twins()
    x, ys = batch()
    _, losses = losses_of(theirs, x, ys)
    tj.backward(losses)
    tj.jac_to_grad(list(theirs.parameters()), tja.UPGrad())
    _, losses = losses_of(ours, x, ys)
    tc.backward(losses, UPG())
    torch.testing.assert_close(flat_grads(ours.parameters()), flat_grads(theirs.parameters()), **TOL)
    assert not any(hasattr(p, "jac") for p in ours.parameters())

    # With explicit inputs (positional, as 0.3-0.8 allowed), and TorchJD 0.2's keyword A.
    for call in (lambda ls, ps: tc.backward(ls, tja.UPGrad(), ps), lambda ls, ps: tc.backward(ls, ps, A=UPG())):
        model = MultiTask()
        _, losses = losses_of(model, x, ys)
        call(losses, list(model.trunk.parameters()))
        assert all(p.grad is None for p in head_params(model))
        ref = MultiTask()
        _, losses = losses_of(ref, x, ys)
        tj.backward(losses, inputs=list(ref.trunk.parameters()))
        tj.jac_to_grad(list(ref.trunk.parameters()), tja.UPGrad())
        torch.testing.assert_close(flat_grads(model.trunk.parameters()), flat_grads(ref.trunk.parameters()), **TOL)


def test_weights_dtype_and_non_weighted_aggregators():
    try:
        from tolaria.aggregation.trimmed_mean import TrimmedMean

        coordinatewise = [(TrimmedMean(trim_number=1), False)]
    except ImportError:  # a Tolaria without coordinate-wise aggregators
        coordinatewise = []
    model = MultiTask(dtype=torch.float32)
    x, ys = batch(dtype=torch.float32)
    for aggregator, weighted in (
        (UPG(), True),
        (ta.Mean(), True),
        (tja.UPGrad(), True),
        (tja.TrimmedMean(trim_number=1), False),
        *coordinatewise,
    ):
        f, losses = losses_of(model, x, ys)
        tc.mtl_backward(losses, f)
        w = tc.jac_to_grad(list(model.trunk.parameters()), aggregator)
        if weighted:
            assert w is not None and w.dtype == torch.float32 and w.shape == (K,)
        else:
            assert w is None
        model.zero_grad(set_to_none=True)
    f, losses = losses_of(model, x, ys)
    tc.mtl_backward(losses, f)
    w = tc.jac_to_grad(list(model.trunk.parameters()), ta.Mean())
    torch.testing.assert_close(w, torch.full((K,), 1 / K))


def test_fallback_on_a_subset_is_counted_and_matches():
    ours, theirs = twins()
    x, ys = batch()
    for lib, model in ((tj, theirs), (tc, ours)):
        _, losses = losses_of(model, x, ys)
        lib.backward(losses)
    subset_ours = list(ours.trunk.parameters())[::-1]
    subset_theirs = list(theirs.trunk.parameters())[::-1]
    before = tc.concatenation_fallbacks()
    w = tc.jac_to_grad(subset_ours, UPG())
    assert tc.concatenation_fallbacks() == before + 1
    w_ref = tj.jac_to_grad(subset_theirs, tja.UPGrad())
    torch.testing.assert_close(w, w_ref, **TOL)
    torch.testing.assert_close(flat_grads(subset_ours), flat_grads(subset_theirs), **TOL)


@pytest.mark.parametrize("subset", [False, True], ids=["whole-buffer", "subset"])
@pytest.mark.parametrize("tolaria_aggregator", [True, False], ids=["tolaria", "torchjd"])
def test_optimize_gramian_computation(subset, tolaria_aggregator):
    ours, theirs = twins()
    x, ys = batch()
    for lib, model in ((tj, theirs), (tc, ours)):
        f, losses = losses_of(model, x, ys)
        lib.mtl_backward(losses, f)
    pick = (lambda ps: list(ps)[1:]) if subset else list
    aggregator = UPG() if tolaria_aggregator else tja.UPGrad()
    w = tc.jac_to_grad(pick(ours.trunk.parameters()), aggregator, optimize_gramian_computation=True)
    w_ref = tj.jac_to_grad(pick(theirs.trunk.parameters()), tja.UPGrad(), optimize_gramian_computation=True)
    torch.testing.assert_close(w.to(w_ref.dtype), w_ref, **TOL)
    torch.testing.assert_close(
        flat_grads(pick(ours.trunk.parameters())), flat_grads(pick(theirs.trunk.parameters())), **TOL
    )


def test_optimize_gramian_computation_refuses_non_gramian_aggregators():
    model = MultiTask()
    x, ys = batch()
    f, losses = losses_of(model, x, ys)
    tc.mtl_backward(losses, f)
    for aggregator in (tja.Mean(), tja.TrimmedMean(trim_number=1), lambda m: m.sum(0)):
        with pytest.raises(ValueError, match="optimize_gramian_computation"):
            tc.jac_to_grad(list(model.trunk.parameters()), aggregator, optimize_gramian_computation=True)
    assert all(hasattr(p, "jac") for p in model.trunk.parameters())  # a refused call keeps .jac


def test_non_leaf_input_with_retain_grad():
    a = torch.tensor([1.0, 2.0, -1.0], dtype=torch.float64, requires_grad=True)
    results = []
    for lib in (tj, tc):
        h = a * 3
        h.retain_grad()
        y = [(h**2).sum(), (h * torch.arange(3.0, dtype=torch.float64)).sum()]
        lib.backward(y, inputs=[h, a])
        results.append((h.jac.clone(), a.jac.clone(), h.grad))
        del a.jac
    torch.testing.assert_close(results[0][0], results[1][0], **TOL)
    torch.testing.assert_close(results[0][1], results[1][1], **TOL)
    assert results[1][2] is None and a.grad is None  # .grad restored


def test_retain_graph():
    model = MultiTask()
    x, ys = batch()
    f, losses = losses_of(model, x, ys)
    tc.mtl_backward(losses, f, retain_graph=True)
    tc.mtl_backward(losses, f)  # the graph was kept
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        tc.mtl_backward(losses, f)
    _, losses = losses_of(model, x, ys)
    tc.backward(losses)
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        tc.backward(losses)


def test_parallel_chunk_size_is_validated_and_does_not_change_results():
    x, ys = batch()
    jacs = []
    for chunk in (None, 1, 2):
        model = MultiTask()
        _, losses = losses_of(model, x, ys)
        tc.backward(losses, parallel_chunk_size=chunk)
        jacs.append(torch.cat([p.jac.flatten(1) for p in model.parameters()], 1))
    assert torch.equal(jacs[0], jacs[1]) and torch.equal(jacs[0], jacs[2])
    model = MultiTask()
    _, losses = losses_of(model, x, ys)
    with pytest.raises(ValueError, match="parallel_chunk_size"):
        tc.backward(losses, parallel_chunk_size=0)


def test_signatures_match_torchjd():
    for name in ("backward", "mtl_backward", "jac_to_grad"):
        ours = inspect.signature(getattr(tc, name)).parameters.values()
        theirs = inspect.signature(getattr(tj, name)).parameters.values()
        assert [(p.name, p.kind, p.default) for p in ours] == [(p.name, p.kind, p.default) for p in theirs], name


def test_as_torchjd_weighting_matches_torchjd():
    matrix = torch.randn(4, 50, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    matrix[1] = -matrix[0] + 0.1 * matrix[2]
    adapter = tc.as_torchjd(UPG())
    torch.testing.assert_close(adapter.weighting(matrix), tja.UPGradWeighting()(matrix @ matrix.T), **TOL)
    torch.testing.assert_close(
        adapter.gramian_weighting(matrix @ matrix.T), tja.UPGradWeighting()(matrix @ matrix.T), **TOL
    )
    torch.testing.assert_close(adapter(matrix), tja.UPGrad()(matrix), **TOL)
    assert adapter.weighting(matrix.float()).dtype == torch.float32


def train(lib, aggregator, steps=20, old_api=False):
    model = MultiTask(seed=11)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for step in range(steps):
        x, ys = batch(seed=100 + step)
        optimizer.zero_grad()
        f, losses = losses_of(model, x, ys)
        if old_api:
            lib.mtl_backward(losses, f, aggregator)
        else:
            lib.mtl_backward(losses, f)
            lib.jac_to_grad(list(model.trunk.parameters()), aggregator)
        optimizer.step()
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_training_loop_changing_only_the_import():
    reference = train(tj, tja.UPGrad())
    start = torch.cat([p.detach().flatten() for p in MultiTask(seed=11).parameters()])
    assert (reference - start).abs().max() > 1e-2  # the loop did move the parameters
    torch.testing.assert_close(train(tc, tja.UPGrad()), reference, rtol=0, atol=1e-10)
    torch.testing.assert_close(train(tc, UPG()), reference, rtol=0, atol=1e-10)
    torch.testing.assert_close(train(tc, UPG(), old_api=True), reference, rtol=0, atol=1e-10)


def test_errors():
    model = MultiTask()
    x, ys = batch()
    f, losses = losses_of(model, x, ys)
    with pytest.raises(ValueError, match="cannot be empty"):
        tc.backward([])
    with pytest.raises(ValueError, match="`tensors` cannot be empty"):
        tc.mtl_backward([], f)
    with pytest.raises(ValueError, match="`features` cannot be empty"):
        tc.mtl_backward(losses, [])
    with pytest.raises(ValueError, match="cannot be empty"):
        tc.jac_to_grad([], UPG())
    with pytest.raises(ValueError, match="call backward or mtl_backward"):
        tc.jac_to_grad(list(model.trunk.parameters()), UPG())
    with pytest.raises(ValueError, match="same number of rows"):
        tc.backward(
            losses[:2],
            jac_tensors=[torch.ones(2, dtype=torch.float64), torch.ones(3, dtype=torch.float64)],
            retain_graph=True,
        )
    with pytest.raises(ValueError, match="Shape mismatch"):
        tc.backward(losses[0], jac_tensors=torch.ones(2, 2, dtype=torch.float64), retain_graph=True)
    with pytest.raises(ValueError, match="unique"):
        tc.backward([losses[0], losses[0]], retain_graph=True)
    f2, outs = model(x)
    with pytest.raises(ValueError, match="grad_tensors"):
        tc.mtl_backward(outs, f2)
    with pytest.raises(ValueError, match="in common"):
        tc.mtl_backward(losses, f, tasks_params=[list(model.trunk.parameters())] * K, retain_graph=True)
    with pytest.raises(ValueError, match="requires_grad"):
        tc.backward(losses, inputs=[torch.zeros(3)], retain_graph=True)
    with pytest.raises(ValueError, match="grad_fn"):
        tc.backward(torch.zeros(3, requires_grad=True))

    # .jac of different numbers of rows (two calls with different K, or stale .jac).
    p, q = list(model.heads[0].parameters())
    p.jac, q.jac = torch.zeros(2, *p.shape), torch.zeros(3, *q.shape)
    with pytest.raises(ValueError, match="same number of rows"):
        tc.jac_to_grad([p, q], UPG())
    del p.jac, q.jac
    tc.backward(losses[:2], inputs=[p], retain_graph=True)
    with pytest.raises(RuntimeError, match="number of rows"):
        tc.backward(losses, inputs=[p], retain_graph=True)
    with pytest.raises(TypeError):
        tc.jac_to_grad([p], "upgrad")
    with pytest.raises(TypeError):
        tc.backward(losses, UPG(), jac_tensors=None, bogus=1)


def test_mixed_dtypes_get_one_buffer_each_and_fall_back_to_concatenation():
    results = []
    for lib, agg in ((tj, tja.UPGrad()), (tc, UPG())):
        torch.manual_seed(2)
        a = torch.randn(5, dtype=torch.float64, requires_grad=True)
        b = torch.randn(4, dtype=torch.float32, requires_grad=True)
        y = [(a**2).sum() + b.double().sum(), (a.sin() * 3).sum() - (b**2).double().sum(), a.sum() - b.double()[0]]
        lib.backward(y)
        assert a.jac.dtype == torch.float64 and b.jac.dtype == torch.float32
        before = tc.concatenation_fallbacks()
        w = lib.jac_to_grad([a, b], agg)
        if lib is tc:
            assert tc.concatenation_fallbacks() == before + 1
        results.append((a.grad, b.grad, w))
    for x, y in zip(*results):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-6)
