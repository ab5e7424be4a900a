import upgrade_probe

# Another thread of the app works while this version applies; then this version fails.
upgrade_probe.events["applying"].set()
upgrade_probe.events["other thread done"].wait(10)


def answer():
    return 2


raise RuntimeError("the new version fails after another thread did its own work")
