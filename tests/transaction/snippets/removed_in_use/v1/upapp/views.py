import upgrade_probe
from upapp.legacy import old

upgrade_probe.ran("upapp.views v1")


def page():
    return old()
