class Greeter:
    greeting = "howdy"
    created = 0

    def __init__(self, name):
        self.name = name
        Greeter.created += 1

    def greet(self):
        return f"{self.greeting}, {self.name}{self.punctuation()}"

    @property
    def shout(self):
        return self.greet().upper() + "!!"

    @classmethod
    def make(cls, name):
        return cls(name.title())

    @staticmethod
    def punctuation():
        return "!"

    def wave(self):
        return f"*waves at {self.name}*"
