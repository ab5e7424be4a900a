class Base:
    greeting = "howdy"

    def speak(self):
        return f"{self.greeting} from Base v2"
