def stripes():
    return 2


def broken(:
    pass
