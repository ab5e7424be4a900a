import upgrade_probe

upgrade_probe.registry.append("upapp.core registered itself")
CACHE = {}


def lookup(key):
    if key not in CACHE:
        CACHE[key] = f"{key} computed by v2"
    return CACHE[key]
