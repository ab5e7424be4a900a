from upapp.beta import BASE, SURCHARGE


def price():
    return BASE + SURCHARGE
