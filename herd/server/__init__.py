"""HTTP only: OpenAI JSON ↔ engine requests. `create_app(llm, ...)` builds the FastAPI app."""

from herd.server.app import create_app

__all__ = ["create_app"]
