"""A WSGI app whose code is hot-deployed by habanero."""

TOTAL = [0]  # in-memory state that survives pushes


def message() -> str:
    return "counting"


def application(environ, start_response):
    TOTAL[0] += 1
    body = f"{message()}: {TOTAL[0]}\n".encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
