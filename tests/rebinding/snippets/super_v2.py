class Base:
    def hello(self):
        return "base"


class Child(Base):
    def hello(self):
        return "CHILD+" + super().hello()

    def plain(self):
        return "plain+" + super().hello()
