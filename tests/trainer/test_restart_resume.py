"""`tolaria train` under `torchrun --max-restarts`: a restarted attempt picks the run up from its
checkpoints by itself (tests/distributed/test_rank_killed.py kills a rank for real; this checks the
decision the command makes from torchrun's environment)."""

from __future__ import annotations

import pytest

from tolaria.cli import build_parser
from tolaria.trainer.command import build_config
from tolaria.trainer.config import ConfigError


def _config(argv, monkeypatch, attempt):
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", str(attempt))
    return build_config(build_parser().parse_args(["train", *argv]))[0]


def test_a_restarted_attempt_resumes_from_the_checkpoints_of_its_run_folder(tmp_path, monkeypatch):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "manifest.json").write_text("{}")
    assert _config(["--out", str(tmp_path)], monkeypatch, attempt=1).checkpoint.resume
    assert not _config(["--out", str(tmp_path)], monkeypatch, attempt=0).checkpoint.resume


def test_a_restart_before_the_first_checkpoint_starts_over_and_says_so(tmp_path, monkeypatch, caplog):
    assert not _config(["--out", str(tmp_path)], monkeypatch, attempt=2).checkpoint.resume
    assert "holds no checkpoint yet; the run starts over" in caplog.text


def test_a_restart_without_a_fixed_run_folder_is_an_error_not_a_new_run(monkeypatch):
    with pytest.raises(ConfigError, match="attempt 1.*give --out DIR"):
        _config([], monkeypatch, attempt=1)
