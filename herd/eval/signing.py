"""Ed25519 signatures over a report's digest, so a published report is tied to a key (`cryptography`)."""

from __future__ import annotations

import base64
import hashlib
import os
from pathlib import Path

from herd.errors import DataError, HerdError
from herd.eval.data import regular_file
from herd.eval.report import digest

ALGORITHM = "ed25519"


class SignatureError(HerdError):
    """A key cannot be read, or a signature does not hold."""


def _crypto():
    try:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:
        raise SignatureError("signing needs the `cryptography` package: pip install cryptography") from None
    return serialization, ed25519


def generate_key(path: str | os.PathLike) -> tuple[Path, Path]:
    """Write a new private key (PEM, PKCS#8, unencrypted, mode 600) to `path` and its public key to path.pub."""
    serialization, ed25519 = _crypto()
    path = Path(path)
    if path.exists():
        raise SignatureError(f"{path} exists; not overwriting a key")
    key = ed25519.Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    pub = path.with_name(path.name + ".pub")
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo))
    return path, pub


def _raw_public(public_key) -> bytes:
    serialization, _ = _crypto()
    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id(raw_public: bytes) -> str:
    return hashlib.sha256(raw_public).hexdigest()[:16]


def load_private_key(path: str | os.PathLike):
    serialization, ed25519 = _crypto()
    try:
        key = serialization.load_pem_private_key(regular_file(path, "private key").read_bytes(), password=None)
    except DataError as e:
        raise SignatureError(str(e)) from None
    except (OSError, ValueError, TypeError) as e:
        raise SignatureError(f"{path}: not an unencrypted PEM private key ({e})") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise SignatureError(f"{path}: not an Ed25519 key")
    return key


def load_public_key(path: str | os.PathLike):
    serialization, ed25519 = _crypto()
    try:
        data = regular_file(path, "public key").read_bytes()
    except (OSError, DataError) as e:
        raise SignatureError(str(e) if isinstance(e, DataError) else f"public key {str(path)!r}: {e.strerror}") from None
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError:
        try:  # a private key file also names its public key
            key = load_private_key(path).public_key()
        except SignatureError:
            raise SignatureError(f"{path}: not a PEM Ed25519 public key") from None
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise SignatureError(f"{path}: not an Ed25519 key")
    return key


def sign(report: dict, key_path: str | os.PathLike) -> dict:
    """The report with a signature over its digest (any earlier signature replaced)."""
    key = load_private_key(key_path)
    d = digest(report)
    raw = _raw_public(key.public_key())
    signature = {"algorithm": ALGORITHM, "digest": d, "public_key": base64.b64encode(raw).decode(),
                 "key_id": key_id(raw), "value": base64.b64encode(key.sign(d.encode())).decode()}
    return {**report, "signature": signature}


def check_signature(report: dict, public_key_path: str | os.PathLike | None = None) -> list[str]:
    """Problems with the report's signature ([] when it holds). With `public_key_path`, the signature must
    be by that key; without, by the key the report names."""
    _, ed25519 = _crypto()
    from cryptography.exceptions import InvalidSignature

    sig = report.get("signature")
    if sig is None:
        return ["the report is not signed"] if public_key_path is not None else []
    if sig.get("algorithm") != ALGORITHM:
        return [f"signature algorithm {sig.get('algorithm')!r} is not {ALGORITHM}"]
    try:
        named = base64.b64decode(sig["public_key"])
        value = base64.b64decode(sig["value"])
    except (KeyError, ValueError):
        return ["the signature is malformed"]
    problems = []
    if public_key_path is not None:
        expected = _raw_public(load_public_key(public_key_path))
        if expected != named:
            problems.append(f"signed by key {key_id(named)}, not by {public_key_path} (key {key_id(expected)})")
        named = expected
    d = digest(report)
    if sig.get("digest") != d:
        problems.append("the report changed after it was signed (its digest differs from the signed one)")
    try:
        ed25519.Ed25519PublicKey.from_public_bytes(named).verify(value, d.encode())
    except (InvalidSignature, ValueError):
        problems.append(f"the signature does not verify against key {key_id(named)} for this report's contents")
    return problems
