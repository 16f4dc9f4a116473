"""API keys and the server secret for the tests: long and random-looking, as the API requires (it refuses
short keys and placeholders at start)."""

from __future__ import annotations

import hashlib

SERVER_SECRET = hashlib.sha256(b"leadstream tests: server secret").hexdigest()


def api_key(label: str) -> str:
    """A key that names what it is for (readable in a failing test) and is long enough to be accepted."""
    return f"{label}-{hashlib.sha256(label.encode()).hexdigest()[:32]}"
