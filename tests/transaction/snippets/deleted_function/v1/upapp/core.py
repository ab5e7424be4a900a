def keep():
    return "kept"


def obsolete():
    return "obsolete"
