import enum

COUNTER = [0]


def helper(x=2):
    return "v2"


class Service:
    limit = 2

    def run(self):
        return "v2"

    def extra(self):
        return "extra"


class Mode(enum.Enum):
    A = 1
    B = 2


NEW_NAME = "added before the failure"
raise RuntimeError("boom during import")


def late():
    return "v2"
