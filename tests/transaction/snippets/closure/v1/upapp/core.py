def make_adder(n):
    def add(x):
        return x + n
    return add


add_ten = make_adder(10)
