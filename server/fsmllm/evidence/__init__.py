"""Certificates as evidence: bound to their image and weights (:mod:`~fsmllm.evidence.binding`), signed
(:mod:`~fsmllm.evidence.keys`), stored (:mod:`~fsmllm.evidence.store`), issued by :class:`Issuer`; checked by
``fsmllm verify`` (:mod:`fsmllm_client.verify` and :mod:`fsmllm.certify.replay`). docs/certificates.md."""

from __future__ import annotations

from pathlib import Path

from fsmllm.encoders._common import cache_dir
from fsmllm.engine.runtime import Runtime
from fsmllm.evidence.binding import Deployment
from fsmllm.evidence.issue import CERTIFICATE_HEADER, Issuance, Issuer
from fsmllm.evidence.keys import Keyring
from fsmllm.evidence.store import CertificateStore, store_url

__all__ = ["CERTIFICATE_HEADER", "CertificateStore", "Issuance", "Issuer", "Keyring", "cert_folder", "open_issuer"]


def cert_folder(setting: str | None) -> Path:
    """Where the SQLite store and the generated keys live: the setting, or ``<cache>/certificates``."""
    return Path(setting).expanduser() if setting else cache_dir() / "certificates"


def open_issuer(
    runtime: Runtime,
    *,
    device: str,
    folder: str | None = None,
    store: str | None = None,
    retention_days: float | None = None,
    signing_key: str | None = None,
    signing_key_file: str | None = None,
) -> Issuer:
    """The issuer of a deployment: its keys, its store (migrated), the hashes of its weight files."""
    root = cert_folder(folder)
    keyring = Keyring(root / "signing-keys", signing_key, signing_key_file)
    certificate_store = CertificateStore(store_url(store, root), retention_days)
    inner = getattr(runtime.encoder, "encoder", runtime.encoder)  # the encoder behind a booster
    encoder = getattr(inner, "source", None) or inner.name  # a vision tower's folder, not just its last part
    deployment = Deployment.of(encoder, runtime.booster, runtime.model_name, device)
    return Issuer(runtime, keyring, certificate_store, deployment)
