def work():
    return 1


def steps():
    yield "v1-a"
    yield "v1-b"


async def handle(gate):
    await gate
    return "v1"
