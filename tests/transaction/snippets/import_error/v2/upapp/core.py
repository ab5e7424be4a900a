import functools

from upapp.extra import EXCLAIM

CACHE = {}


def greet(name):
    return f"hello {name} (v2){EXCLAIM}"


@functools.lru_cache
def square(x):
    return x * x * 1


class Greeter:
    greeting = "howdy"

    def hello(self, name):
        return f"{self.greeting} {name} (v2)"

    def wave(self):
        return "new in v2"
