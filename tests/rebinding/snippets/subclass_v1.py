class Animal:
    def speak(self):
        return "..."

    def describe(self):
        return f"{type(self).__name__} says {self.speak()}"


class Dog(Animal):
    def speak(self):
        return "woof"
