"""The package root is the public API: __all__ and what it exports must not drift apart."""

from __future__ import annotations

import inspect

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
