from .recipes import *
from .tables import TABLE
