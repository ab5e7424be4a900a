def keep():
    return "kept"
