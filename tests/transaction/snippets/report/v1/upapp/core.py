LIMIT = 10


def greet(name):
    return f"hello {name}"


class Greeter:
    def hello(self):
        return "hello v1"


class Pair:
    __slots__ = ("a",)
