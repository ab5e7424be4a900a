class Pair:
    __slots__ = ("a",)

    def __init__(self, a):
        self.a = a

    def total(self):
        return self.a
