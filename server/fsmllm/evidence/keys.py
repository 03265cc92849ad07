"""The server's signing keys (Ed25519, as OKP JWKs, RFC 8037) and the key set it publishes (JWKS, RFC 7517).

The signing key is, in this order: ``FSMLLM_SIGNING_KEY`` (a PEM private key or a private JWK, the way a secret is
mounted), the file ``signing_key_file`` (PEM or JWK), or the newest key in the key folder (``<cache>/signing-keys``),
generated there on the first start. Its ``kid`` is its RFC 7638 thumbprint. The public half of every key that has
signed is kept in the key folder's ``public/`` (written when the key is first used), so that after a rotation
(another key configured, or ``fsmllm keys --rotate``) certificates signed before it still verify: the published
key set holds them all. Private keys are written with mode 0600.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from joserfc import jws
from joserfc.jwk import KeySet, OKPKey

from fsmllm_client.verify import ALGORITHM

PRIVATE_SUFFIX = ".jwk.json"
log = logging.getLogger(__name__)


def _import(text: str) -> OKPKey:
    """An Ed25519 private key from PEM or JWK text."""
    source: Any = json.loads(text) if text.lstrip().startswith("{") else text.encode()
    key = OKPKey.import_key(source)
    if key.as_dict().get("crv") != "Ed25519" or not key.is_private:
        raise ValueError("the signing key must be an Ed25519 private key (PEM or JWK)")
    return key


def _public(key: OKPKey) -> dict[str, Any]:
    return {**key.as_dict(private=False), "kid": key.thumbprint(), "alg": ALGORITHM, "use": "sig"}


def _write(path: Path, data: dict[str, Any], private: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(f".{os.getpid()}.tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
        json.dump(data, handle)
    os.replace(temporary, path)


class Keyring:
    """The active signing key and every public key that has signed here."""

    def __init__(self, folder: Path, secret: str | None = None, key_file: str | None = None) -> None:
        self.folder = folder
        if secret:
            self.key = _import(secret)
        elif key_file:
            self.key = _import(Path(key_file).expanduser().read_text(encoding="utf-8"))
        else:
            self.key = self._newest() or self.rotate()
        self.kid = self.key.thumbprint()
        public = self.folder / "public" / f"{self.kid}.json"
        if not public.is_file():
            _write(public, _public(self.key), private=False)

    def _newest(self) -> OKPKey | None:
        """The newest private key of the folder. A key file without its private half (written by fsmllm before
        it kept it) cannot sign: it is passed over with a warning, and its public key stays published."""
        files = sorted(self.folder.glob(f"*{PRIVATE_SUFFIX}"), key=lambda path: path.stat().st_mtime_ns)
        for path in reversed(files):
            try:
                return _import(path.read_text(encoding="utf-8"))
            except ValueError:
                log.warning("%s holds no private key: it cannot sign (its certificates still verify)", path)
        return None

    def rotate(self) -> OKPKey:
        """Generate a new key in the folder (the newest key signs from the next start on) and return it."""
        key = OKPKey.generate_key("Ed25519")
        _write(
            self.folder / f"{time.strftime('%Y%m%dT%H%M%S')}-{key.thumbprint()}{PRIVATE_SUFFIX}",
            key.as_dict(private=True),  # joserfc's as_dict() leaves the private part out unless asked
            True,
        )
        _write(self.folder / "public" / f"{key.thumbprint()}.json", _public(key), private=False)
        return key

    def jwks(self) -> dict[str, Any]:
        """The published key set: the active key first, then every other key that signed here."""
        keys = {self.kid: _public(self.key)}
        for path in sorted((self.folder / "public").glob("*.json")):
            entry = json.loads(path.read_text(encoding="utf-8"))
            keys.setdefault(entry["kid"], entry)
        return {"keys": list(keys.values())}

    def key_set(self) -> KeySet:
        return KeySet.import_key_set(self.jwks())  # type: ignore[arg-type]

    def sign(self, payload: bytes) -> str:
        """A compact JWS over ``payload`` with the payload detached (RFC 7515 appendix F): ``header..signature``."""
        token = jws.serialize_compact({"alg": ALGORITHM, "kid": self.kid}, payload, self.key, algorithms=[ALGORITHM])
        header, _, signature = token.split(".")
        return f"{header}..{signature}"
