"""pagepipe runtime: stages, batches, pipelines and their executors."""
from .batch import Batch, Flag, PageKind
from .errors import (CapsError, ConfigError, CorruptData, PagepipeError, ParseError,
                     ReplicaError, StageFailed, TrackerError, TransportError)
from .stage import Property, Stage, StageContext

__all__ = [
    "Batch", "Flag", "PageKind", "Property", "Stage", "StageContext",
    "PagepipeError", "ConfigError", "ParseError", "CapsError", "CorruptData",
    "TrackerError", "TransportError", "ReplicaError", "StageFailed",
]
