import upgrade_probe

from upapp.tables import TABLE

TABLE += ["extended"]
upgrade_probe.ran("extend")
