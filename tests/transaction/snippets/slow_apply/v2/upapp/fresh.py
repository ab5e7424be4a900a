import upgrade_probe
from upapp.core import version

upgrade_probe.ran("upapp.fresh")
SEEN = version()
