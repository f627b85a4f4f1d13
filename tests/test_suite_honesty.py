"""The suite cannot quietly stop proving things: a root-only test fails under CI instead of
skipping, and a hang fails with a stack trace (pytest-timeout) instead of running forever."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from helpers import skip_outside_ci

ROOT = Path(__file__).resolve().parent.parent


def test_a_test_that_cannot_run_skips_here_but_fails_under_ci(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="needs root; CI=true runs as root"):
        skip_outside_ci("needs root")
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception, match="needs root"):
        skip_outside_ci("needs root")


def test_every_test_has_a_timeout() -> None:
    options = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    assert options["timeout"] == 300
