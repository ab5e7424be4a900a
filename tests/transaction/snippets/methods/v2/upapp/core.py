class Greeter:
    def __init__(self, name):
        self.name = name

    def hello(self):
        return f"hello {self.name} (v2)"

    def wave(self):
        return f"{self.name} waves (new in v2)"
