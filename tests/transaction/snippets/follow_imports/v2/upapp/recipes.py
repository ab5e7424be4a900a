__all__ = ["take", "multinomial"]


def take(n, items):
    return list(items)[:n]


def multinomial(*counts):
    return sum(counts)
