"""Continuous batching: many sequences at once over one model's KV cache slots."""

from .engine import Engine, QueueFull
from .request import Request

__all__ = ["Engine", "QueueFull", "Request"]
