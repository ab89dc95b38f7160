"""The docstring examples of the routing core run and give what they show."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = [
    "gateway.routing",
    "gateway.routing.baselines",
    "gateway.routing.config",
    "gateway.routing.normalize",
    "gateway.routing.policies",
    "gateway.routing.posterior",
    "gateway.routing.prior",
    "gateway.routing.fold",
    "gateway.routing.registry",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str) -> None:
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0, f"{name} has no examples"
    assert result.failed == 0
