"""The app every scenario pushes: one package, a few modules."""
