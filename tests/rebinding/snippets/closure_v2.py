def make_adder(n):
    def add(x):
        return x + n + 1000

    return add


add5 = make_adder(5)
