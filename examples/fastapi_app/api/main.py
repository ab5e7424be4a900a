"""Endpoints. Edit `greeting()` and push: every worker answers with the new text."""

import os

from fastapi import FastAPI

api = FastAPI()

# In-memory state of each worker: survives every push, because unchanged top-level lines do not run again.
HITS = {"count": 0}


def greeting() -> str:
    return "Hello, world"


@api.get("/")
def index() -> dict:
    HITS["count"] += 1
    return {"message": greeting(), "hits": HITS["count"], "pid": os.getpid()}
