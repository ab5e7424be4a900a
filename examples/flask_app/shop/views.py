"""Request handlers. Edit `greeting()` and push: every worker answers with the new text."""

import os
from pathlib import Path

from flask import Flask, jsonify

from shop.catalog import catalog

app = Flask(__name__)

# In-memory state of each worker: survives every push, because unchanged top-level lines do not run again.
HITS = {"count": 0}


def greeting() -> str:
    return "Hello, world"


@app.get("/")
def index():
    HITS["count"] += 1
    return jsonify(message=greeting(), hits=HITS["count"], pid=os.getpid())


@app.get("/banner")
def banner():
    """A data file beside the code: each worker reads the one of the version it runs."""
    return jsonify(banner=(Path(__file__).parent / "banner.txt").read_text().strip(), pid=os.getpid(),
                   file=__file__)


app.register_blueprint(catalog, url_prefix="/catalog")
