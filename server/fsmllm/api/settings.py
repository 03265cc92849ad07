"""Server configuration: environment variables ``FSMLLM_*`` (or a ``.env`` file), overridden by CLI flags."""

from __future__ import annotations

import argparse
import json
from typing import Annotated, Any, Literal, get_args, get_origin

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from fsmllm.fastest_dtype import DtypeChoice


class Settings(BaseSettings):
    """Every knob of a deployment. Each field is read from ``FSMLLM_<NAME>`` (e.g. ``FSMLLM_PORT=9000``)."""

    model_config = SettingsConfigDict(env_prefix="FSMLLM_", env_file=".env", extra="ignore")

    # what to serve
    model: str = Field(
        "fsmllm-demo",
        description="named model (fsmllm-demo, tiny-test), a LLaVA checkpoint folder, or 'none' = certify only",
    )
    encoder: str | None = Field(None, description="vision encoder; default: the model's own")
    image_size: int | None = Field(None, description="encoder input size in pixels; default: the encoder's")
    booster: str = Field("none", description="Gaussian Smoothness Booster name or path, or 'none'")
    lm_backend: Literal["transformers", "vllm"] = Field("transformers", description="language-model backend")
    device: str = Field("cpu", description="torch device of the encoder worker: cpu, cuda, cuda:1, ...")
    dtype: DtypeChoice = Field(
        "auto",
        description="precision of the encoder on the certified path (certificates are for it as computed); auto: "
        "the fastest this machine runs natively, timed at start-up and cached",
    )
    lm_dtype: DtypeChoice = Field(
        "auto",
        description="precision of the language model (transformers backend); auto: the fastest, timed and cached",
    )
    compile: bool = Field(False, description="torch.compile the encoder (the first batches compile it: slow start)")
    vllm_dtype: str = Field("auto", description="vllm backend: weight dtype (auto, float16, bfloat16, float32)")
    vllm_max_model_len: int = Field(2048, ge=64, description="vllm backend: longest prompt + answer in tokens")
    vllm_kv_cache_bytes: int | None = Field(None, ge=1, description="vllm backend: KV cache size; default vLLM's share")
    vllm_enforce_eager: bool = Field(False, description="vllm backend: no CUDA graphs (faster start, slower decode)")
    vllm_tensor_parallel_size: int = Field(1, ge=1, description="vllm backend: GPUs to split the language model over")

    # HTTP
    host: str = Field("127.0.0.1", description="address to bind; 0.0.0.0 to listen on every interface")
    port: int = Field(8000, ge=1, le=65535, description="TCP port")
    api_key: str | None = Field(
        None, description="if set, every route but health/ready/metrics needs 'Authorization: Bearer <key>'"
    )

    # certification policy
    allowed_sigmas: Annotated[list[float], NoDecode] = Field(
        [0.25, 0.5], description="noise levels a request may ask for (from the environment: 0.25,0.5 or [0.25, 0.5])"
    )
    default_sigma: float = Field(0.25, description="noise level of requests that name none")
    default_n0: int = Field(100, ge=1, description="selection samples of requests that name none")
    default_n: int = Field(1000, ge=2, description="estimation samples of requests that name none")
    max_n: int = Field(100_000, ge=2, description="largest n0 + n a request may ask for")
    default_alpha: float = Field(0.001, gt=0, lt=1, description="failure probability of requests that name none")
    max_radii: int = Field(32, ge=1, description="most radii one request may ask for")

    # the device worker
    batch_size: int = Field(32, ge=1, description="noisy images per encoder batch (set by device memory)")
    threads: int | None = Field(
        None,
        ge=1,
        description="torch CPU threads of this process; default: the CPUs it may use (its affinity and container "
        "CPU limit), not the host's cores; replicas sharing a host: cores / replicas each",
    )
    queue_capacity: int = Field(32, ge=1, description="jobs queued or running before new ones get 503")
    request_timeout_s: float = Field(600.0, gt=0, description="a certification still running after this is cancelled")
    cache_size: int = Field(256, ge=0, description="certificates kept for identical (image, parameters, seed)")

    # certificates: signed, stored (docs/certificates.md)
    cert_folder: str | None = Field(
        None,
        description="folder of the SQLite certificate store and generated signing keys; default <cache>/certificates",
    )
    cert_store: str | None = Field(
        None,
        description="certificate store URL: postgresql://user:password@host/db (shared by replicas) or sqlite:///FILE; "
        "default SQLite in cert_folder",
    )
    cert_retention_days: float | None = Field(
        None, gt=0, description="certificates older than this are deleted from the store; default: kept"
    )
    signing_key: SecretStr | None = Field(
        None, description="Ed25519 private key (PEM or JWK text) that signs certificates, e.g. from a secret"
    )
    signing_key_file: str | None = Field(
        None, description="file of the signing key (PEM or JWK); default: generated in cert_folder on first start"
    )

    # input limits
    max_body_bytes: int = Field(20 * 1024 * 1024, ge=1024, description="request bodies above this get 413")
    max_image_pixels: int = Field(40_000_000, ge=1, description="decoded width x height above this is refused")
    max_prompt_chars: int = Field(8_000, ge=1, description="longest prompt accepted")
    max_tokens_limit: int = Field(512, ge=1, description="largest max_tokens a request may ask for")

    @field_validator("allowed_sigmas", mode="before")
    @classmethod
    def _list_from_text(cls, value: Any) -> Any:
        """A list given as text (an environment variable): JSON (``[0.25, 0.5]``) or comma-separated (``0.25,0.5``)."""
        if not isinstance(value, str):
            return value
        text = value.strip()
        if text.startswith("["):
            return json.loads(text)
        return [item.strip() for item in text.split(",") if item.strip()]

    @field_validator("allowed_sigmas")
    @classmethod
    def _positive_sigmas(cls, value: list[float]) -> list[float]:
        if not value or any(s <= 0 for s in value):
            raise ValueError("allowed_sigmas must be a non-empty list of positive noise levels")
        return sorted(set(value))

    @model_validator(mode="after")
    def _default_sigma_allowed(self) -> Settings:
        if self.default_sigma not in self.allowed_sigmas:
            raise ValueError(f"default_sigma {self.default_sigma} is not in allowed_sigmas {self.allowed_sigmas}")
        if self.default_n0 + self.default_n > self.max_n:
            raise ValueError("default_n0 + default_n exceeds max_n")
        return self


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One ``--flag`` per :class:`Settings` field (``max_n`` -> ``--max-n``), typed and documented from it."""
    for name, field in Settings.model_fields.items():
        kind = field.annotation
        options: dict[str, Any] = {
            "help": f"{field.description or name} (env FSMLLM_{name.upper()}, default {field.default})"
        }
        if get_origin(kind) is Literal:
            options["choices"] = list(get_args(kind))
        elif get_origin(kind) is list:
            options.update(type=get_args(kind)[0], nargs="+")
        elif kind is bool:
            options["action"] = argparse.BooleanOptionalAction
        elif kind in (int, float):
            options["type"] = kind
        elif int in get_args(kind):  # int | None
            options["type"] = int
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name, default=None, **options)


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Settings from the environment, overridden by the flags that were given."""
    given = {name: value for name in Settings.model_fields if (value := getattr(args, name, None)) is not None}
    return Settings(**given)
