SESSIONS = {}


def since(name):
    return SESSIONS[name]["since"]


def __habanero_migrate__(old):
    raise LookupError("cannot migrate the sessions of v1")
