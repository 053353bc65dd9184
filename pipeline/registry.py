"""The stage registry: every stage factory, found through the ``pagepipe.stages`` entry points.

Another installed package adds stages by declaring entry points in the same
group. When pagepipe itself runs from a source tree (not installed), the
built-in entries are read from its ``pyproject.toml`` instead.

A program adds a stage of its own without packaging it: ``register(MyStage)``
(or ``@register`` on the class) makes its ``factory_name`` usable in launch
strings of that program. Process-mode workers rebuild it by importing
``module:Class``, so the class must be defined at the top level of an
importable module or of the main script; a script then keeps its pipeline
under ``if __name__ == "__main__":`` (workers re-import it).
"""
from __future__ import annotations

import difflib
import importlib
import tomllib
from functools import lru_cache
from importlib.metadata import entry_points
from pathlib import Path
from typing import Callable, overload

from .errors import ConfigError
from .stage import Stage

ENTRY_POINT_GROUP = "pagepipe.stages"
_SOURCE_TREE_PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"


_REGISTERED: dict[str, type[Stage]] = {}
"""Stages registered in this process (``register``), by factory name."""


def factories() -> dict[str, str]:
    """Factory name -> ``module:Class`` of every registered stage, sorted by name."""
    return dict(sorted({**installed(), **{name: class_path(cls) for name, cls in _REGISTERED.items()}}.items()))


@lru_cache(maxsize=1)
def installed() -> dict[str, str]:
    """Factory name -> ``module:Class`` of the stages declared as entry points (or in the source tree)."""
    found: dict[str, str] = {}
    if _SOURCE_TREE_PYPROJECT.is_file():
        with _SOURCE_TREE_PYPROJECT.open("rb") as file:
            project = tomllib.load(file).get("project", {})
        found.update(project.get("entry-points", {}).get(ENTRY_POINT_GROUP, {}))
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        found[entry.name] = entry.value
    return found


@overload
def register(stage_class: type[Stage]) -> type[Stage]: ...
@overload
def register(stage_class: None = None, *, replace: bool = False) -> Callable[[type[Stage]], type[Stage]]: ...


def register(stage_class: type[Stage] | None = None, *, replace: bool = False):
    """Make ``stage_class`` usable by its ``factory_name`` in this program's launch strings; returns the class,
    so it also works as a class decorator (``@register`` or ``@register(replace=True)``).

    A name an installed stage already has is refused unless ``replace=True`` (an experiment that wants
    ``classify`` in a launch string to mean its own class); registering again under the same class path
    (a re-imported script) just updates the entry.
    """
    def add(cls: type[Stage]) -> type[Stage]:
        if not (isinstance(cls, type) and issubclass(cls, Stage)):
            raise ConfigError(f"register: {cls!r} is not a pagepipe Stage class")
        name = cls.factory_name
        if not name:
            raise ConfigError(f"register: {cls.__qualname__} has no factory_name (the name launch strings use)")
        if "<locals>" in cls.__qualname__:
            raise ConfigError(f"register: {cls.__qualname__} is defined inside a function; define it at the top "
                              "level of a module so process-mode workers can import it")
        existing = _REGISTERED[name] if name in _REGISTERED else installed().get(name)
        known = existing if isinstance(existing, str) or existing is None else class_path(existing)
        if known not in (None, class_path(cls)) and not replace:
            raise ConfigError(f"register: the stage name {name!r} is taken by {known}; choose another "
                              "factory_name or pass replace=True")
        _REGISTERED[name] = cls
        return cls

    return add if stage_class is None else add(stage_class)


def unregister(name: str) -> None:
    """Forget a stage registered in this process (tests); installed stages stay."""
    _REGISTERED.pop(name, None)


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
    if name in _REGISTERED:
        return _REGISTERED[name]
    targets = factories()
    if name not in targets:
        close = difflib.get_close_matches(name, targets, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else "; `pagepipe inspect` lists them"
        raise ConfigError(f"unknown stage {name!r}{hint}")
    return import_target(targets[name])
