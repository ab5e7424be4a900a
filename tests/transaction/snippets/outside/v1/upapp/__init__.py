import json


def answer():
    return 1
