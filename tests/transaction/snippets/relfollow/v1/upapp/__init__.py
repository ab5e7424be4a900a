LIMIT = 1
from . import views
