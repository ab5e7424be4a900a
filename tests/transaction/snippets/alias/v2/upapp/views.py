from .tables import REGISTRY
