import upgrade_probe

upgrade_probe.ran("upapp v2")


def answer():
    return 2
