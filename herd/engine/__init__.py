"""Continuous batching: many requests share one model, one batched forward per decode step."""

from herd.engine.async_engine import AsyncEngine
from herd.engine.engine import Engine
from herd.engine.metrics import Metrics
from herd.engine.request import ImagePlacement, QueueFull, Request, RequestOutput
from herd.engine.runner import ImageFeatures

__all__ = ["ImagePlacement", "ImageFeatures", "AsyncEngine", "Engine", "Metrics", "QueueFull", "Request", "RequestOutput"]
