"""One Settings object, built at start-up and passed down. The only reader of os.environ."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


def _default_data_dir() -> Path:
    return Path.home() / ".local" / "share" / "impasto"


class Settings(BaseSettings):
    """Every knob of impasto; each is also an `IMPASTO_<NAME>` environment variable."""

    model_config = SettingsConfigDict(env_prefix="IMPASTO_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = 8080
    data_dir: Path = Field(default_factory=_default_data_dir)
    models: Path | None = Field(default=None, description="models file (TOML)")
    models_cache: Path | None = Field(
        default=None, description="where built-in models are built/cached; default DATA_DIR/models"
    )
    public_url: str | None = Field(
        default=None, description="base URL of image links; default http://HOST:PORT"
    )
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="comma-separated; empty = open server"
    )
    log_level: str = "info"

    # Requests
    max_body_bytes: int = 32 * 1024 * 1024
    sync_timeout_s: float = 300.0

    # Retention
    output_retention_s: int = 7 * 24 * 3600
    upload_retention_s: int = 30 * 24 * 3600
    task_retention_s: int = 7 * 24 * 3600
    sweep_interval_s: float = 60.0

    # Inputs fetched or decoded on behalf of a client
    allow_private_networks: bool = False
    fetch_timeout_s: float = 15.0
    max_fetch_bytes: int = 20 * 1024 * 1024
    max_image_pixels: int = 40_000_000
    upload_max_side: int = 2048

    # Engine
    devices: Annotated[list[str], NoDecode] = Field(default_factory=lambda: ["auto"])
    max_batch_size: int = 1
    batch_wait_ms: float = 5.0
    encode_threads: int = 2

    @field_validator("api_keys", "devices", mode="before")
    @classmethod
    def _split_list(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @property
    def image_base_url(self) -> str:
        if self.public_url:
            return self.public_url.rstrip("/")
        host = self.host
        if host in ("0.0.0.0", "::", ""):
            host = "127.0.0.1"
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"

    @property
    def state_path(self) -> Path:
        return self.data_dir / "impasto.sqlite3"

    @property
    def images_dir(self) -> Path:
        return self.data_dir / "images"

    @property
    def models_dir(self) -> Path:
        return self.models_cache or self.data_dir / "models"
