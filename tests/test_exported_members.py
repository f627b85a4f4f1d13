"""The package root is the public API: __all__ and what it exports must not drift apart."""

from __future__ import annotations

import inspect
import subprocess
import sys

import pytest

import pipecat_roark
from pipecat_roark import errors


def test_every_name_in_all_is_exported_and_documented() -> None:
    for name in pipecat_roark.__all__:
        member = getattr(pipecat_roark, name)
        if name != "__version__":
            assert inspect.getdoc(member), f"{name} has no docstring"


def test_every_error_class_is_exported_from_the_root() -> None:
    classes = {
        name
        for name, obj in vars(errors).items()
        if inspect.isclass(obj) and issubclass(obj, errors.PipecatRoarkError)
    }
    assert classes == set(errors.__all__)
    assert classes <= set(pipecat_roark.__all__)


def test_the_quick_start_import_works() -> None:
    from pipecat_roark import RoarkObserver

    assert RoarkObserver.__module__ == "pipecat_roark.observer"
    assert pipecat_roark.__version__ != "0+unknown"


def test_the_drainer_is_exported_from_the_root() -> None:
    from pipecat_roark import Drainer, DrainPolicy, DrainReport, drain

    assert (Drainer, DrainPolicy, DrainReport) == (
        drain.Drainer,
        drain.DrainPolicy,
        drain.DrainReport,
    )
    assert {"Drainer", "DrainPolicy", "DrainReport"} <= set(pipecat_roark.__all__)


def test_the_root_imports_neither_pipecat_nor_the_drainer_until_asked() -> None:
    # A fresh interpreter: this one has imported everything already.
    code = (
        "import sys, pipecat_roark\n"
        "loaded = [m for m in sys.modules if m == 'pipecat' or m.startswith('pipecat.')]\n"
        "loaded += [m for m in ('pipecat_roark.drain', 'pipecat_roark.observer') if m in sys.modules]\n"
        "print(loaded)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_an_unknown_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        pipecat_roark.Nope  # noqa: B018
