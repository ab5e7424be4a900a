import functools

DECORATED = []


def traced(fn):
    DECORATED.append(fn.__name__)

    @functools.wraps(fn)
    def wrapper(*args):
        return ("traced", fn(*args))

    return wrapper


@traced
def double(x):
    return x * 3
