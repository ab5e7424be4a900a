class Greeter:
    def __init__(self, name):
        self.name = name

    def hello(self):
        return f"hello {self.name} (v1)"

    def retired(self):
        return "only v1 has this"
