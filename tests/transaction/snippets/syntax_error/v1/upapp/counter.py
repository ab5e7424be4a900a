import upgrade_probe

upgrade_probe.ran("upapp.counter v1")
