"""The aggregation benchmark's own behaviour (not its timings): what it measures and how it fails."""

import json
import shlex

import pytest
import torch

from tolaria import bench
from tolaria.aggregation import PCGrad


def test_naive_pcgrad_is_the_recipe_it_claims():
    # The baseline must compute PCGrad too, or the speed-ups it reports mean nothing.
    j = torch.tensor([[1.0, 0.0], [-1.0, 1.0]], dtype=torch.float64)
    expected = PCGrad(shuffle=False, backend="torch")(j)
    torch.testing.assert_close(bench.naive_pcgrad(j), expected)


def test_measure_times_every_method_on_one_matrix():
    rows = bench.measure(bench.CONTENDERS["pcgrad"], "fp32", 3, 1000, torch.device("cpu"), repeats=2, budget_s=0.1)
    by = {r.method: r for r in rows}
    assert {"floor", "tolaria", "tolaria-torch", "naive-loop"} <= set(by)
    for r in rows:
        assert r.ms > 0 and r.x_floor == pytest.approx(r.ms / by["floor"].ms)


def test_another_librarys_failure_leaves_it_out_loudly(monkeypatch, capsys):
    def broken(j):
        raise TypeError("Got unsupported ScalarType BFloat16")

    monkeypatch.setattr(bench, "_torchjd", lambda name, kwargs=(), k=None: broken)
    rows = bench.measure(bench.CONTENDERS["mean"], "bf16", 2, 256, torch.device("cpu"), repeats=1, budget_s=0.1)
    assert "torchjd" not in {r.method for r in rows} and "tolaria" in {r.method for r in rows}
    assert "torchjd failed and is left out: TypeError: Got unsupported ScalarType BFloat16" in capsys.readouterr().out


def test_a_failure_of_tolaria_itself_is_not_hidden(monkeypatch):
    class Broken(PCGrad):
        def weighting(self, gram):
            raise RuntimeError("weighting broke")

    contender = bench.Contender("pcgrad", lambda b: Broken(backend=b))
    monkeypatch.setattr(bench, "_torchjd", lambda name, kwargs=(), k=None: None)
    with pytest.raises(RuntimeError, match="weighting broke"):
        bench.measure(contender, "fp32", 2, 64, torch.device("cpu"), repeats=1, budget_s=0.1)


def test_command_writes_the_table_and_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    line = f"--k 2 --n 1000 --dtypes fp32 --repeats 1 --budget-s 0.05 --no-memory --json {out}"
    assert bench.main(shlex.split(line)) == 0
    assert "pcgrad  fp32  K=2  N=1e+03  (cpu)" in capsys.readouterr().out
    methods = {row["method"] for row in json.loads(out.read_text())}
    assert {"floor", "tolaria", "tolaria-torch", "naive-loop"} <= methods


def test_bad_arguments_name_the_valid_choices():
    with pytest.raises(SystemExit, match="unknown aggregator"):
        bench.main(["--aggregators", "nope"])
    with pytest.raises(SystemExit, match="unknown dtype"):
        bench.main(["--dtypes", "fp8"])


def test_isa_flag_runs_under_the_forced_level_and_names_it(tmp_path, capsys):
    from tolaria.aggregation import cpu_isa, set_cpu_isa, supported_cpu_isas

    before = cpu_isa()
    narrowest = supported_cpu_isas()[-1]
    try:
        out = tmp_path / "m.json"
        args = shlex.split(f"--isa {narrowest} --k 2 --n 1000 --dtypes fp32 --repeats 1 --no-memory --json {out}")
        assert bench.main(args) == 0
        assert f"CPU ISA {narrowest}," in capsys.readouterr().out.splitlines()[0]
        assert {m["cpu_isa"] for m in json.loads(out.read_text())} == {narrowest}
    finally:
        set_cpu_isa(before)


def test_isa_flag_rejects_an_unknown_level_with_the_valid_ones():
    with pytest.raises(SystemExit, match="--isa avx9000: unknown CPU ISA level .* valid levels are"):
        bench.main(["--isa", "avx9000", "--quick"])
