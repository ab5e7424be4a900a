"""Request handlers. Edit `greeting()` and push: the running process answers with the new text."""

import os

from aiohttp import web

# In-memory state: survives every push, because unchanged top-level lines do not run again.
HITS = {"count": 0}


def greeting() -> str:
    return "Hello, world"


async def index(request: web.Request) -> web.Response:
    HITS["count"] += 1
    return web.json_response({"message": greeting(), "hits": HITS["count"], "pid": os.getpid()})
