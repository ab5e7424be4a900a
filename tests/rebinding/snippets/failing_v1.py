import enum

COUNTER = [0]


def helper(x=1):
    return "v1"


class Service:
    limit = 1

    def run(self):
        return "v1"


class Mode(enum.Enum):
    A = 1


def late():
    return "v1"
