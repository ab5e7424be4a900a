SESSIONS = {"ann": "2024-01-01"}


def since(name):
    return SESSIONS[name]
