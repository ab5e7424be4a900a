"""The app every scenario pushes."""
from upapp.core import greet
