"""kvstore.demo: a primary and a replica surviving a stream of memory errors.

``kvstore-demo`` / ``python -m kvstore.demo``; see :mod:`kvstore.demo.run`.
It lives outside the core package (``demo/``, mapped to ``kvstore.demo`` by
pyproject.toml) because it drives servers through the client: it sits above
both.
"""

from .run import main  # noqa: F401

__all__ = ["main"]
