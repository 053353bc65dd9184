"""pagepipe runtime: stages, batches, pipelines and their executors."""
from .batch import Batch, Flag, PageKind
from .errors import (CapsError, ConfigError, CorruptData, PagepipeError, ParseError,
                     ReplicaError, StageFailed, TrackerError, TransportError)
from .stage import Property, Stage, StageContext
from .bus import Message, RunResult
from .pipeline import Pipeline, PipelineHandle

__all__ = [
    "Batch", "Flag", "PageKind", "Property", "Stage", "StageContext",
    "Pipeline", "PipelineHandle", "RunResult", "Message",
    "PagepipeError", "ConfigError", "ParseError", "CapsError", "CorruptData",
    "TrackerError", "TransportError", "ReplicaError", "StageFailed",
]
