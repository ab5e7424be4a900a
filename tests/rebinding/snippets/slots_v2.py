class Pair:
    __slots__ = ("a", "b")

    def __init__(self, a, b=0):
        self.a = a
        self.b = b

    def total(self):
        return self.a + self.b
