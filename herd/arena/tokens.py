"""Signed battle tokens and CSRF tokens: HMAC-SHA256 under the arena's secret."""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets


def _mac(secret: bytes, purpose: str, value: str) -> str:
    digest = hmac.new(secret, f"{purpose}\0{value}".encode("utf-8", "surrogatepass"), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def battle_token(secret: bytes, uid: str, session: str) -> str:
    """The battle's id signed together with the session that started it: a token copied into another
    browser votes nowhere."""
    return f"{uid}.{_mac(secret, 'battle', uid + chr(0) + session)}"


def battle_uid(secret: bytes, token: str, session: str | None) -> str | None:
    """The battle id a token was signed for in this session, or None for anything the server did not sign."""
    uid, _, mac = str(token).partition(".")
    if not uid or not mac or not session or \
            not _same(mac, _mac(secret, "battle", uid + chr(0) + session)):
        return None
    return uid


def new_session() -> str:
    return secrets.token_urlsafe(24)


def csrf_token(secret: bytes, session: str) -> str:
    return _mac(secret, "csrf", session)


def csrf_ok(secret: bytes, session: str | None, token: str | None) -> bool:
    return bool(session and token) and _same(str(token), csrf_token(secret, session))


def _same(given: str, expected: str) -> bool:
    """Constant-time equality for a token from a client: compared as bytes, since compare_digest refuses str
    with non-ASCII characters (a header or body can hold any)."""
    return hmac.compare_digest(given.encode("utf-8", "surrogatepass"), expected.encode())


def client_hash(salt: bytes, client: str) -> str:
    """A voter's or client's identity as stored: salted, so the log names no address."""
    return hashlib.sha256(salt + b"\0" + client.encode()).hexdigest()[:32]
