import upgrade_probe

upgrade_probe.ran("upapp.tax")
RATE = 0.5


def with_tax(amount):
    return amount * (1 + RATE)
