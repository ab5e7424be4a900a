import upgrade_probe

upgrade_probe.ran("upapp.core top level")
CALLS = []


def greet(name):
    CALLS.append(name)
    return f"hello {name} from disk"
