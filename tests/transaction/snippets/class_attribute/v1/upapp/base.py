class Base:
    greeting = "hello"

    def speak(self):
        return f"{self.greeting} from Base v1"
