SESSIONS = {}


def since(name):
    return SESSIONS[name]["since"]


def __habanero_migrate__(old):
    for name, value in old["SESSIONS"].items():
        SESSIONS[name] = {"since": value}
