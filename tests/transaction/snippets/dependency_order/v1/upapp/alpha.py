from upapp.beta import BASE


def price():
    return BASE
