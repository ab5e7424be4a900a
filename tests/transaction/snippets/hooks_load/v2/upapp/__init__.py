import fakeframework  # first imported by this version, which then fails

from upapp import late  # a module that runs after it: its integration is loaded by then


def answer():
    return 2


raise RuntimeError("version 2 fails after importing the framework")
