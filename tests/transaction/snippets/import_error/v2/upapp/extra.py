EXCLAIM = "!"
