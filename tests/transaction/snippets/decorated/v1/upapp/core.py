import functools

import upgrade_probe


def traced(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return ("traced", fn(*args, **kwargs))
    return wrapper


def route(path):
    def register(fn):
        upgrade_probe.registry.append((path, fn))
        return fn
    return register


@route("/price")
@traced
def price(amount):
    return amount * 2
