TABLE = ["a"]
