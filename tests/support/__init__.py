"""What the tests share that is not a fixture: sample apps, real processes, scenario trees.

Fixtures live in the ``conftest.py`` files (``tests/conftest.py`` for every layer, each layer's
own beside its tests); these modules are imported by name, ``from support.e2e import AppProcess``,
with ``tests/`` on ``sys.path`` through ``pythonpath`` in ``[tool.pytest.ini_options]``.

* ``e2e``: app processes on loopback, the developer's project, raw HTTP, TLS.
* ``watch``: the ``habanero-pack --watch`` process and its lines.
* ``project``: small packer projects on disk.
* ``overlay``: sample bundled apps, a store filled through its API, fresh interpreters.
* ``upgrade``: push scenarios as source trees, snapshots by identity.
* ``bundles``: a base bundle and the pushes the format tests open against it.
* ``crash_writer``: the child process the store's kill -9 test kills.
* ``powercut``, ``powercut_writer``: a recorder of fsyncs and the disk images a power cut can leave;
  the child process the store's power-loss test records.
"""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the repository
TESTS = ROOT / "tests"
