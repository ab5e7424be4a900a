class Animal:
    def sound(self):
        return "..."


class Dog(Animal):
    def sound(self):
        return "woof v1 over " + super().sound()
