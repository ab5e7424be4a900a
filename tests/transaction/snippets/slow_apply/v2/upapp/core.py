import upgrade_probe


def version():
    return 2


def __habanero_migrate__(old):
    upgrade_probe.events["applying"].set()
    if not upgrade_probe.events["release"].wait(10):
        raise TimeoutError("the test never released the apply step")
