"""The stage registry: every stage factory, found through the ``pagepipe.stages`` entry points.

Another installed package adds stages by declaring entry points in the same
group. When pagepipe itself runs from a source tree (not installed), the
built-in entries are read from its ``pyproject.toml`` instead.
"""
from __future__ import annotations

import difflib
import importlib
import tomllib
from functools import lru_cache
from importlib.metadata import entry_points
from pathlib import Path

from .errors import ConfigError
from .stage import Stage

ENTRY_POINT_GROUP = "pagepipe.stages"
_SOURCE_TREE_PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"


@lru_cache(maxsize=1)
def factories() -> dict[str, str]:
    """Factory name -> ``module:Class`` of every registered stage, sorted by name."""
    found: dict[str, str] = {}
    if _SOURCE_TREE_PYPROJECT.is_file():
        with _SOURCE_TREE_PYPROJECT.open("rb") as file:
            project = tomllib.load(file).get("project", {})
        found.update(project.get("entry-points", {}).get(ENTRY_POINT_GROUP, {}))
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        found[entry.name] = entry.value
    return dict(sorted(found.items()))


def import_target(target: str) -> type[Stage]:
    """The Stage subclass a ``module:Class`` path names; ConfigError if it cannot be imported."""
    module_name, _, class_name = target.partition(":")
    try:
        stage_class = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"stage class {target}: cannot be loaded ({type(exc).__name__}: {exc})") from None
    if not (isinstance(stage_class, type) and issubclass(stage_class, Stage)):
        raise ConfigError(f"stage class {target}: is not a pagepipe Stage")
    return stage_class


def class_path(stage_class: type[Stage]) -> str:
    """The ``module:Class`` path a worker process imports to rebuild a stage."""
    return f"{stage_class.__module__}:{stage_class.__qualname__}"


def load(name: str) -> type[Stage]:
    """The Stage subclass registered as ``name``; ConfigError naming close matches if unknown."""
    targets = factories()
    if name not in targets:
        close = difflib.get_close_matches(name, targets, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else "; `pagepipe inspect` lists them"
        raise ConfigError(f"unknown stage {name!r}{hint}")
    return import_target(targets[name])
