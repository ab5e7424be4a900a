REGISTRY = {}

def register(k):
    REGISTRY[k] = 1
