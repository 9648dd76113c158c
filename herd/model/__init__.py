"""The model: imports only torch and herd.config."""

from herd.model.cache import Batch, PagedKVCache
from herd.model.model import Transformer

__all__ = ["Transformer", "Batch", "PagedKVCache"]
