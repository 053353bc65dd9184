"""The one exception hierarchy of pagepipe.

Every error pagepipe raises on purpose is a ``PagepipeError``. Callers that
only want to know "was the input bad" catch ``CorruptData`` (which is also a
``ValueError``); configuration mistakes are ``ConfigError`` (also a
``ValueError``), reported before anything starts.
"""
from __future__ import annotations


class PagepipeError(Exception):
    """Base class of every error pagepipe raises on purpose."""


class ConfigError(PagepipeError, ValueError):
    """A pipeline description, stage name, property or value is wrong."""


class ParseError(ConfigError):
    """A launch description does not parse; ``position`` points at the offending word."""

    def __init__(self, message: str, text: str = "", position: int = -1):
        self.text = text
        self.position = position
        if text and position >= 0:
            message = f"{message}\n  {text}\n  {' ' * position}^"
        super().__init__(message)


class CapsError(ConfigError):
    """Two linked stages disagree on the batch format between them."""


class CorruptData(PagepipeError, ValueError):
    """Untrusted bytes (wire, file, encoded payload) are malformed.

    The message says what is wrong and where (record, page index, byte offset).
    """

    offset: int | None = None
    """Where in a stream the malformed bytes start, when a stream reader knows (also sequence and epoch)."""
    sequence: int | None = None
    epoch: int | None = None


class TrackerError(PagepipeError):
    """A dirty tracker cannot track what it was given (buffer, region, process)."""


class TransportError(PagepipeError):
    """A sink or source cannot reach its endpoint or file."""


class ReplicaError(PagepipeError):
    """The replica on disk is missing, inconsistent or cannot be written."""


class StageFailed(PagepipeError):
    """A stage raised or its process died; names the stage and worker."""

    def __init__(self, stage: str, worker: int, reason: str, traceback: str = "", category: str = "bug"):
        self.stage = stage
        self.worker = worker
        self.reason = reason
        self.traceback = traceback
        self.category = category
        """``config`` (a ConfigError: bad configuration found when the stage started), ``error`` (another
        PagepipeError: the reason says it all) or ``bug`` (any other exception: the traceback helps)."""
        super().__init__(f"stage {stage!r} worker {worker} failed: {reason}")


def error_category(exc: BaseException) -> str:
    """How a stage's exception is reported (StageFailed.category)."""
    if isinstance(exc, ConfigError):
        return "config"
    return "error" if isinstance(exc, PagepipeError) else "bug"
