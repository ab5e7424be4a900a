def scale(x, factor=3, *, offset=1):
    return x * factor + offset
