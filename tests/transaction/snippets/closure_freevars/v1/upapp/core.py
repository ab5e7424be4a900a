def make_adder(n):
    def add(x):
        return x + n
    return add
