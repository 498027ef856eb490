"""A broken install is loud: backend="auto" without the compiled extension warns once and counts."""

import warnings

import pytest
import torch

from tolaria.aggregation import PCGrad, engine


@pytest.fixture
def extension_missing(monkeypatch):
    backend = engine._cpu_backend
    monkeypatch.setattr(type(backend), "available", False)
    monkeypatch.setattr(type(backend), "supports", lambda self, sources: "the compiled extension did not load: boom")
    monkeypatch.setitem(engine._compiled_missing, "warned", False)
    monkeypatch.setitem(engine._compiled_missing, "fallbacks", 0)


def test_auto_on_cpu_warns_once_with_the_import_error_and_counts(extension_missing, caplog):
    j = torch.randn(3, 20)
    with pytest.warns(RuntimeWarning, match="did not load: boom.*Reinstall tolaria"):
        first = PCGrad(shuffle=False)(j)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second call is counted, not warned again
        PCGrad(shuffle=False)(j)
    assert engine.compiled_backend_fallbacks() == 2
    assert "did not load: boom" in caplog.text
    torch.testing.assert_close(first, PCGrad(shuffle=False, backend="torch")(j))  # the same numbers


def test_a_forced_cpu_backend_raises_instead(extension_missing):
    with pytest.raises(ValueError, match="did not load: boom"):
        PCGrad(backend="cpu")(torch.randn(3, 20))


def test_a_working_install_counts_nothing():
    before = engine.compiled_backend_fallbacks()
    PCGrad()(torch.randn(3, 20))
    assert engine.compiled_backend_fallbacks() == before
