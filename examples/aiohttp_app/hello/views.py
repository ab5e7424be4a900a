"""Request handlers. Edit `greeting()` and push: the running process answers with the new text.

Routes live here, in a `RouteTableDef` that `serve.py` adds to the app: a route you add, move or
delete in this file is served (or gone) after the next push, without a restart.
"""

import os

from aiohttp import web

routes = web.RouteTableDef()

# In-memory state: survives every push, because unchanged top-level lines do not run again.
HITS = {"count": 0}


def greeting() -> str:
    return "Hello, world"


@routes.get("/")
async def index(request: web.Request) -> web.Response:
    HITS["count"] += 1
    return web.json_response({"message": greeting(), "hits": HITS["count"], "pid": os.getpid()})
