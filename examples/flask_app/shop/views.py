"""Request handlers. Edit `greeting()` and push: every worker answers with the new text."""

import os

from flask import Flask, jsonify

app = Flask(__name__)

# In-memory state of each worker: survives every push, because unchanged top-level lines do not run again.
HITS = {"count": 0}


def greeting() -> str:
    return "Hello, world"


@app.get("/")
def index():
    HITS["count"] += 1
    return jsonify(message=greeting(), hits=HITS["count"], pid=os.getpid())
