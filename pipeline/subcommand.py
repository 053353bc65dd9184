"""The shape of a ``pagepipe`` subcommand, shared by the CLI and the packages that add commands
through the ``pagepipe.commands`` entry-point group (kept apart from ``pipeline.cli`` so that
``python -m pipeline.cli`` and an entry point agree on one class)."""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Callable

from rich.console import Console


@dataclass(frozen=True)
class Subcommand:
    """One ``pagepipe`` subcommand: what ``--help`` says, how it adds its arguments, how it runs
    (returning the exit code)."""

    summary: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace, Console], int]
