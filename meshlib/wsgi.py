"""`meshlib.wsgi.MeshMiddleware`: the mesh's server middleware for WSGI apps (Flask, Django).

The public import name; the middleware lives with the other HTTP adapters in `meshlib.http`."""

from meshlib.http.wsgi import MeshMiddleware

__all__ = ["MeshMiddleware"]
