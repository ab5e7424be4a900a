"""A blueprint, registered under /catalog in views.py. Add a route here and push: it is served under
that prefix; edit templates/catalog.html and push: the next request renders the new template."""

import os

from flask import Blueprint, render_template

catalog = Blueprint("catalog", __name__)

ITEMS = ["green tea", "black tea", "coffee"]


@catalog.get("/")
def index():
    return render_template("catalog.html", items=ITEMS, pid=os.getpid())
