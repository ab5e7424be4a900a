"""A small FastAPI service whose code is hot-deployed by habanero."""
