"""``python -m packer``: the habanero-pack command."""
from packer.cli import main

raise SystemExit(main())
