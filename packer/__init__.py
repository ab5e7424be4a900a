"""habanero's developer side: the ``habanero-pack`` command and the functions behind it.

    packer.config    load_config(), ProjectConfig: settings from flags, HABANERO_*, [tool.habanero]
    packer.collect   collect(), SourceSnapshot: the project's packages as bundle entries
    packer.build     build(), BuiltBundle, builder_info(), inspect_bundle()
    packer.cli       main(): the command line

Nothing is imported here, so ``habanero-pack`` starts without loading what a command does not use.
"""
