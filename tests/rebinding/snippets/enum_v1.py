import enum


class Color(enum.Enum):
    RED = 1
    GREEN = 2

    def label(self):
        return self.name.lower()


class Level(enum.IntEnum):
    LOW = 1
    HIGH = 3
