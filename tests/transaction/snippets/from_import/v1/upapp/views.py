from upapp.core import price


def checkout(x):
    return price(x)
