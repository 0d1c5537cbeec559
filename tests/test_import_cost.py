"""A client-only process loads no more than it uses: `import meshlib`, a local Mesh and one
client bring in neither Redis (pybreaker would import it for a storage the mesh never uses),
nor the control link, nor the OpenTelemetry SDK; Redis stays importable afterwards. Time and
memory are for benchmarks; this checks what is loaded."""

from __future__ import annotations

import json
import subprocess
import sys

CODE = """
import json, sys
import meshlib
mesh = meshlib.Mesh("checkout")
client = mesh.client()
loaded = {name: name in sys.modules for name in ("redis", "meshlib.control.link", "opentelemetry.sdk")}
import redis  # still importable as ever
mesh.close()
print(json.dumps(loaded))
"""


def test_a_local_mesh_and_a_client_load_no_redis_control_link_or_sdk() -> None:
    argv = [sys.executable, "-c", CODE]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    loaded = json.loads(done.stdout)
    assert loaded == {"redis": False, "meshlib.control.link": False, "opentelemetry.sdk": False}
