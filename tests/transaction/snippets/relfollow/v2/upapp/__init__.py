LIMIT = 2
from . import views
