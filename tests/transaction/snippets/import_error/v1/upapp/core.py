import functools

CACHE = {}


def greet(name):
    return f"hello {name} (v1)"


@functools.lru_cache
def square(x):
    return x * x


class Greeter:
    greeting = "hello"

    def hello(self, name):
        return f"{self.greeting} {name} (v1)"
