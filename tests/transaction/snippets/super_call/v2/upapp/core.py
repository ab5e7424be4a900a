class Animal:
    def sound(self):
        return "..."


class Dog(Animal):
    def sound(self):
        return "woof v2 over " + super().sound()
