"""The runnable example of docs/security.md's "End users (JWT)" section runs and prints what its
comments say."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_end_users_example_runs_as_documented() -> None:
    text = (ROOT / "docs" / "security.md").read_text(encoding="utf-8")
    section = text[text.index("## End users (JWT)") :]
    (code,) = re.findall(r"```python\n(.*?)```", section[: section.index("### Not supported")], re.DOTALL)
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT, check=False
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines == [
        "(200, '{\"user\":null}')",
        '(200, \'{"user":"https://auth.example.com/alice"}\')',
        "(403, 'RBAC: access denied: a caller without identity (user https://auth.example.com/alice) "
        "may not GET /admin/x')",
        "(403, 'RBAC: access denied: a caller without identity may not GET /admin/x; no end-user token')",
        "(401, 'token has expired')",
    ]
