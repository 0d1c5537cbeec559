"""The control process's garbage collector settings (in a subprocess: they are the interpreter's)."""

from __future__ import annotations

import json
import subprocess
import sys

from meshlib.control.gc_tuning import THRESHOLDS

SCRIPT = """
import gc, json
from meshlib.control.gc_tuning import tune_for_service
before = gc.get_freeze_count()
tune_for_service()
print(json.dumps({"before": before, "frozen": gc.get_freeze_count(), "thresholds": gc.get_threshold()}))
"""


def test_start_up_objects_are_frozen_and_thresholds_raised() -> None:
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, check=True, timeout=60
    )
    result = json.loads(out.stdout)
    assert result["before"] == 0 and result["frozen"] > 1000
    assert tuple(result["thresholds"]) == THRESHOLDS and THRESHOLDS[0] > 700
