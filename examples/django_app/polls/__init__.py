"""A Django app whose code is hot-deployed by habanero."""
