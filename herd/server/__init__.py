"""HTTP only: OpenAI JSON ↔ engine requests. `create_app(llm, ...)` builds the FastAPI app;
`uvicorn_config(app, host, port)` the uvicorn settings that serve it (with its header deadline)."""

from herd.server.app import create_app
from herd.server.connection import uvicorn_config

__all__ = ["create_app", "uvicorn_config"]
