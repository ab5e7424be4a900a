def work():
    return 2


def steps():
    yield "v2-a"
    yield "v2-b"


async def handle(gate):
    await gate
    return "v2"
