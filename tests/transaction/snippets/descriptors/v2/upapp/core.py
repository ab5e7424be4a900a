class Shape:
    sides = 4

    @property
    def label(self):
        return f"{self.sides} sides (v2)"

    @classmethod
    def make(cls):
        return f"{cls.__name__}.make v2"

    @staticmethod
    def unit():
        return "unit v2"
