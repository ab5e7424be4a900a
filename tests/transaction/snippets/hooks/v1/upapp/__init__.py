import upgrade_probe

upgrade_probe.ran("upapp v1")


def answer():
    return 1
