def make_adder(n, bonus=1000):
    def add(x):
        return x + n + bonus
    return add
