from upapp.base import Base


class Child(Base):
    pass
