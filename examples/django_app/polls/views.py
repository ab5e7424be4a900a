"""Views. Edit `greeting()` and push: the running server answers with the new text."""

import os

from django.http import JsonResponse
from django.template.loader import render_to_string

from polls.models import Question

# In-memory state: survives every push, because unchanged top-level lines do not run again.
HITS = {"count": 0}


def greeting() -> str:
    return "Hello, world"


def index(request):
    HITS["count"] += 1
    return JsonResponse({"message": greeting(), "hits": HITS["count"], "pid": os.getpid()})


def questions(request):
    html = render_to_string("polls/questions.html", {"questions": Question.objects.all()})
    return JsonResponse({"html": html, "pid": os.getpid()})
