REGISTRY = []
STARTS = []


def register(fn):
    REGISTRY.append(fn)
    return fn


STARTS.append("started")


@register
def handler():
    return "v2"
