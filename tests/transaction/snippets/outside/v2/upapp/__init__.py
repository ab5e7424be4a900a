import json
import os
import sys
import threading

import upgrade_probe


class LeakedFinder:
    @staticmethod
    def find_spec(*args):
        return None


os.environ["HABANERO_LEAKED"] = "1"
os.environ.pop("HABANERO_KEPT", None)
sys.path.insert(0, "/leaked/path")
sys.meta_path.append(LeakedFinder())
json.dumps = lambda *args, **kwargs: "patched"
import tabnanny  # noqa: E402  (a module of the standard library nothing imported before)

threading.Thread(target=upgrade_probe.events["stop"].wait, name="leaked-worker", daemon=True).start()


def answer():
    return 2


raise RuntimeError("the new version fails at the end of its import")
