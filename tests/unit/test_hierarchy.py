"""Hierarchy validation and how a user's method / exits / budgets resolve."""

from __future__ import annotations

import json

import pytest

from hispec.speculation import Hierarchy, paper_default, resolve_hierarchy
from hispec.speculation.hierarchy import TUNED_CONFIG_NAME


@pytest.mark.parametrize("exits,budgets", [((4, 2), (1, 1)), ((0,), (1,)), ((16,), (1,)), ((2,), ()), ((2,), (0,))])
def test_invalid_hierarchies(exits, budgets):
    with pytest.raises(ValueError):
        Hierarchy(16, exits, budgets)


def test_levels_and_defaults():
    h = paper_default("hispec", 16)
    assert (h.exits, h.budgets, h.depth, h.method) == ((2, 4), (2, 4), 2, "hispec")
    assert [h.layer_range(k) for k in range(3)] == [(0, 2), (2, 4), (4, 16)]
    assert paper_default("layerskip", 16).exits == (4,) and paper_default("ar", 16).depth == 0


def test_resolve(tmp_path):
    assert resolve_hierarchy("hispec", 16, tmp_path).exits == (2, 4)  # nothing tuned: the paper's
    (tmp_path / TUNED_CONFIG_NAME).write_text(json.dumps(
        {"methods": {"hispec": {"exits": [1, 3], "budgets": [3, 2]}, "layerskip": {"exits": [3], "budgets": [5]}}}))
    assert resolve_hierarchy("hispec", 16, tmp_path) == Hierarchy(16, (1, 3), (3, 2))
    assert resolve_hierarchy("layerskip", 16, tmp_path) == Hierarchy(16, (3,), (5,))
    assert resolve_hierarchy("hispec", 16, tmp_path, exits=(2, 5, 9), budgets=(1, 2, 3)).depth == 3
    assert resolve_hierarchy("hispec", 16, tmp_path, exits=(2, 6)).budgets == (3, 2)  # tuned budgets kept
    for method, exits, budgets, message in [
        ("hispec", (4,), None, "two or more"), ("layerskip", (2, 4), None, "exactly one"),
        ("ar", (2,), None, "no exits"), ("hispec", (2, 4, 6), None, "one budget per exit"), ("beam", None, None, "unknown"),
    ]:
        with pytest.raises(ValueError, match=message):
            resolve_hierarchy(method, 16, tmp_path, exits, budgets)
