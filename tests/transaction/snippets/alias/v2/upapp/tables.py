REGISTRY: dict = {}  # annotated in v2

def register(k):
    REGISTRY[k] = 1
