def old():
    return "legacy v1"
