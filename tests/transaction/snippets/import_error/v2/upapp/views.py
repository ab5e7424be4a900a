from upapp.core import Greeter, greet


def page(name):
    return greet(name).upper()


raise RuntimeError("views v2 cannot start: the database is gone")
