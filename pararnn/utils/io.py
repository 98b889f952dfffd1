"""Result files: written atomically, so a crash never leaves a half-written JSON behind."""
from __future__ import annotations

import json
import os


def write_json_atomic(path: str, obj) -> None:
    """Write JSON via a temporary file and a rename."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)
