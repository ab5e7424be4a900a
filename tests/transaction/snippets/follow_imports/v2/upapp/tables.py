TABLE = ["a", "b"]
