SESSIONS = {}


def __habanero_migrate__(old):
    for name, since in old["SESSIONS"].items():
        SESSIONS[name] = {"since": since}
