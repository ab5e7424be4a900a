from . import LIMIT
from upapp import LIMIT as ABS_LIMIT
