class Base:
    def hello(self):
        return "base"


class Child(Base):
    def hello(self):
        return "child+" + super().hello()

    def plain(self):
        return "plain"
