"""Continuous batching: many sequences at once over one model's KV cache slots."""

from .engine import Engine, EngineStopped, QueueFull
from .request import Request

__all__ = ["Engine", "EngineStopped", "QueueFull", "Request"]
