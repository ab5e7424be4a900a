LIMIT = 20


def greet(name):
    return f"hi {name}"


class Greeter:
    def hello(self):
        return "hello v2"


class Pair:
    __slots__ = ("a", "b")
