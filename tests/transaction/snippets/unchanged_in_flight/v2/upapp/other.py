def version():
    return 2
