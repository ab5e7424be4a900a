SESSIONS = {}


def __habanero_migrate__(old):
    raise LookupError("cannot migrate sessions")
