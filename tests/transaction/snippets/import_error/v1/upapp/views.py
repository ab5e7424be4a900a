from upapp.core import Greeter, greet


def page(name):
    return greet(name)
