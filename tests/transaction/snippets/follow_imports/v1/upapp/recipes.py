__all__ = ["take"]


def take(n, items):
    return list(items)[:n]


def old_recipe():
    return "gone in v2"


__all__ += ["old_recipe"]
