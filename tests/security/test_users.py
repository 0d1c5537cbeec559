"""`meshlib.current_user()`: None outside a request, and nothing of PyJWT loaded by a process
that has no RequestAuthentication (import time matters to client-only processes)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import meshlib
from meshlib.security.users import User

ROOT = Path(__file__).resolve().parents[2]


def test_no_user_outside_a_request() -> None:
    assert meshlib.current_user() is None


def test_a_user_is_frozen_and_names_its_principal() -> None:
    user = User("https://auth.example.com", "alice")
    assert user.principal == "https://auth.example.com/alice"
    with pytest.raises(AttributeError):
        user.subject = "bob"  # type: ignore[misc]
    assert dict(user.claims) == {}


def test_pyjwt_is_loaded_only_by_a_document_that_needs_it() -> None:
    code = """
import sys
import meshlib
from meshlib.rules import parse_documents
mesh = meshlib.Mesh("orders")
allow = {"kind": "Authorization", "service": "orders", "allow": [{"from_users": ["*"]}]}
mesh.apply_rules(parse_documents([allow]), "1")
print("jwt" in sys.modules)
doc = {"kind": "RequestAuthentication", "service": "orders",
       "jwt": [{"issuer": "https://a.example.com", "jwks_uri": "https://a.example.com/jwks"}]}
parse_documents([doc])
print("jwt" in sys.modules)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False", "False"]  # a jwks_uri is checked without PyJWT too
