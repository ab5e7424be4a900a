class Greeter:
    greeting = "hello"
    created = 0

    def __init__(self, name):
        self.name = name
        Greeter.created += 1

    def greet(self):
        return f"{self.greeting} {self.name}"

    def farewell(self):
        return f"bye {self.name}"

    @property
    def shout(self):
        return self.greet().upper()

    @classmethod
    def make(cls, name):
        return cls(name)

    @staticmethod
    def punctuation():
        return "."
