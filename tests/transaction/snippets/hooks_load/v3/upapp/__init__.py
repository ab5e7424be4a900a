import fakeframework


def answer():
    return 3
