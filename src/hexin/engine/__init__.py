"""The serving engine: continuous batching of every request over a paged KV pool."""

from hexin.engine.engine import Engine, EngineStats
from hexin.engine.scheduler import EngineBusy
from hexin.engine.sequence import RequestHandle

__all__ = ["Engine", "EngineBusy", "EngineStats", "RequestHandle"]
