"""Who may call the API: per-site API keys, the ids that name them, and the live stream's tokens.

A key (LEADSTREAM_API_KEYS) is for exactly one site, read-write or read-only. Keys are never stored or shown
anywhere: a key is named by its `key_id`, an HMAC of the key under the server secret (LEADSTREAM_SERVER_SECRET),
in the actor of a person's command (`user:key-<key_id>`) and in stream tokens. Without the secret a key id
cannot be computed from a guessed key, so an actor recorded in ClickHouse does not let anyone test guesses.

EventSource cannot send headers, so the stream also accepts a short-lived token for one board of one site:
its claims (site, board, expiry, key id) signed with the server secret. It names a key that must still be
configured for that site, so removing (rotating) the key voids its tokens; it never contains the key.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from collections.abc import Iterable
from dataclasses import dataclass

import orjson
import redis

from schemas.redis_keys import RedisKeys
from schemas.settings import ApiKeyEntry, Settings

STREAM_TOKEN_TTL_MS = 5 * 60_000
KEY_ID_CHARS = 16


@dataclass(frozen=True, slots=True)
class SiteGrant:
    """What a request's key may do: read `site`, and change it unless `read_only`."""

    site: str
    read_only: bool
    key_id: str

    @property
    def actor(self) -> str:
        """How a person's commands record who sent them."""
        return f"user:key-{self.key_id}"


@dataclass(frozen=True, slots=True)
class StreamToken:
    token: str
    expires_ms: int


@dataclass(frozen=True, slots=True)
class StreamPass:
    """A valid stream token: the key's grant, and when the token (and the stream it opened) expires."""

    grant: SiteGrant
    expires_ms: int


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def server_secret(settings: Settings) -> str:
    """LEADSTREAM_SERVER_SECRET when set (checked by Settings.refuse_weak_secrets); otherwise a random secret
    made by the first API process and kept in Redis, so that every API process, before and after a restart,
    names keys alike and accepts each other's stream tokens. Secure without configuration; set the setting to
    rotate it (a rotation voids open stream tokens and changes the key ids recorded from then on)."""
    if settings.server_secret:
        return settings.server_secret
    key = RedisKeys.of(settings).server_secret
    client = redis.Redis.from_url(settings.redis_url)
    try:
        client.set(key, secrets.token_hex(32), nx=True)
        return client.get(key).decode()
    finally:
        client.close()


class ApiKeys:
    """The configured keys, indexed by key id: a lookup hashes the presented key first, so it never compares
    secrets byte by byte."""

    def __init__(self, entries: Iterable[ApiKeyEntry], server_secret: str) -> None:
        self._secret = server_secret.encode()
        self._grants = {}
        for entry in entries:
            key_id = self.key_id(entry.key)
            self._grants[key_id] = SiteGrant(entry.site, entry.read_only, key_id)

    def key_id(self, api_key: str) -> str:
        return hmac.new(self._secret, b"key-id\x1f" + api_key.encode(), hashlib.sha256).hexdigest()[:KEY_ID_CHARS]

    def grant(self, api_key: str) -> SiteGrant | None:
        return self._grants.get(self.key_id(api_key))

    def _sign(self, payload: bytes) -> bytes:
        return hmac.new(self._secret, b"stream-token\x1f" + payload, hashlib.sha256).digest()

    def stream_token(self, grant: SiteGrant, board_id: str, now_ms: int) -> StreamToken:
        expires_ms = now_ms + STREAM_TOKEN_TTL_MS
        payload = orjson.dumps({"s": grant.site, "b": board_id, "e": expires_ms, "k": grant.key_id})
        return StreamToken(token=f"{_b64(payload)}.{_b64(self._sign(payload))}", expires_ms=expires_ms)

    def check_stream_token(self, token: str, site_id: str, board_id: str, now_ms: int) -> StreamPass | None:
        """The pass of a token signed here, for this site's board, unexpired, whose key is still configured
        for the site; None otherwise."""
        try:
            payload_text, signature_text = token.split(".")
            payload, signature = _unb64(payload_text), _unb64(signature_text)
        except ValueError:
            return None
        if not hmac.compare_digest(self._sign(payload), signature):
            return None
        claims = orjson.loads(payload)  # signed by us: well-formed
        if (claims["s"], claims["b"]) != (site_id, board_id) or claims["e"] < now_ms:
            return None
        grant = self._grants.get(claims["k"])
        return StreamPass(grant, claims["e"]) if grant is not None and grant.site == site_id else None
