"""A small Flask shop whose code is hot-deployed by habanero."""
