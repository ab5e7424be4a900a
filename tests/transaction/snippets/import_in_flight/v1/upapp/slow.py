import upgrade_probe

upgrade_probe.events["importing"].set()
if not upgrade_probe.events["finish_import"].wait(10):
    raise TimeoutError("the test never let the import finish")


def answer():
    return "v1"
