"""`meshlib.asgi.MeshMiddleware`: the mesh's server middleware for ASGI apps (FastAPI, Starlette).

The public import name; the middleware lives with the other HTTP adapters in `meshlib.http`."""

from meshlib.http.asgi import MeshMiddleware

__all__ = ["MeshMiddleware"]
