"""`wasmchord serve`: an OpenAI-compatible HTTP server on the batch engine (needs the `serve` extra:
FastAPI and uvicorn)."""

from __future__ import annotations


def require():
    """FastAPI and uvicorn, or a WasmchordError naming the extra to install."""
    from ..errors import UnsupportedError
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise UnsupportedError(f"wasmchord serve needs FastAPI and uvicorn: pip install 'wasmchord[serve]' ({e})") \
            from None


def create_app(*args, **kw):
    """The ASGI app (see `wasmchord.serve.app.create_app`)."""
    require()
    from .app import create_app as make
    return make(*args, **kw)
