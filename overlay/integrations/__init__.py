"""Framework integrations and the hook API they are built on (see ``overlay.integrations.hooks``).

Each framework habanero knows rebuilds, in a module of its own here, the tables it keeps outside
the app's modules: ``flask`` (routes, blueprints, templates, static files), ``django`` (URLconf,
template caches, the model registry, settings), ``starlette`` (FastAPI and Starlette routes and
their request analysis) and ``aiohttp`` (the router). Each is loaded when its framework is.
"""

from overlay.integrations.hooks import Hook, Push, register, registered, unregister

__all__ = ["Hook", "Push", "register", "registered", "unregister"]
