"""A tiny aiohttp app whose code is hot-deployed by habanero."""
