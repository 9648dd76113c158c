"""Continuous batching: many requests share one model, one batched forward per decode step."""

from herd.engine.async_engine import AsyncEngine
from herd.engine.engine import Engine
from herd.engine.metrics import Metrics
from herd.engine.request import QueueFull, Request, RequestOutput

__all__ = ["AsyncEngine", "Engine", "Metrics", "QueueFull", "Request", "RequestOutput"]
