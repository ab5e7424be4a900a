import enum


class Color(enum.Enum):
    RED = 1
    GREEN = 2
    BLUE = 3

    def label(self):
        return self.name.title()


class Level(enum.IntEnum):
    LOW = 1
    MEDIUM = 2
    HIGH = 3
