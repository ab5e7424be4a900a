from . import tables, views
