import upgrade_probe
from upapp.legacy import old

upgrade_probe.ran("upapp.views v2")


def page():
    return old()
