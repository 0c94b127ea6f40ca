"""One Settings object, built at start-up and passed down. The only reader of os.environ."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


def _default_data_dir() -> Path:
    return Path.home() / ".local" / "share" / "impasto"


class Settings(BaseSettings):
    """Every knob of impasto; each is also an `IMPASTO_<NAME>` environment variable."""

    # populate_by_name: fields read from a provider's own variable (RUNWAYML_API_SECRET) can
    # still be given by field name in code and tests.
    model_config = SettingsConfigDict(env_prefix="IMPASTO_", extra="ignore", populate_by_name=True)

    # Where state lives: None = the SQLite file in the data dir (one process); redis://… =
    # shared by many API nodes and workers (then images must be in shared storage too).
    state: str | None = None
    redis_prefix: str = "impasto"
    worker_models: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="AIRs an `impasto worker` serves"
    )
    worker_prefetch: int = 8
    worker_lease_s: float = 60.0
    worker_max_deliveries: int = 3
    worker_port: int | None = Field(
        default=None, description="serve /healthz and /metrics of `impasto worker` on this port"
    )
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
    log_format: Literal["text", "json"] = "text"

    # Requests
    max_body_bytes: int = 32 * 1024 * 1024
    max_queued_images: int = Field(
        default=10_000, description="per model; more gets HTTP 429 rateLimitExceeded"
    )
    max_tasks_per_request: int = Field(
        default=100, ge=1, description="tasks in one REST request or one WebSocket frame"
    )
    max_unauthenticated_body_bytes: int = Field(
        default=1024 * 1024,
        description="with API keys set, a body without a Bearer header is read up to this much "
        "before its authentication task is checked",
    )
    sync_timeout_s: float = 300.0
    ws_idle_timeout_s: float = 120.0
    ws_session_ttl_s: float = 120.0
    ws_send_timeout_s: float = Field(
        default=30.0, gt=0, description="a client that takes longer to read a frame is dropped"
    )
    ws_max_sessions: int = Field(default=10_000, ge=1, description="WebSocket sessions at once")
    ws_session_buffer_bytes: int = Field(
        default=64 * 1024 * 1024, description="frames kept for a detached session, in bytes"
    )
    ws_allowed_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="browser Origins allowed on WebSocket (* for any); same-host is always allowed",
    )

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

    # Webhooks and upload endpoints
    webhook_secret: str | None = Field(
        default=None, description="signs webhooks with HMAC-SHA256 when set"
    )
    delivery_max_attempts: int = 12
    delivery_base_delay_s: float = 1.0
    delivery_max_delay_s: float = 60.0
    delivery_budget_s: float = 30 * 60.0
    delivery_connect_timeout_s: float = 5.0
    webhook_read_timeout_s: float = 30.0
    upload_read_timeout_s: float = 120.0

    # Engine
    devices: Annotated[list[str], NoDecode] = Field(default_factory=lambda: ["auto"])
    torch_threads: int | None = Field(
        default=None, description="CPU threads per torch op; default torch's own choice"
    )
    offline: bool = Field(
        default=False, description="never download model weights (local paths and cache only)"
    )
    vram_budget_gb: float | None = Field(
        default=None, description="model weights kept per device; default 90% of a GPU"
    )
    preload: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="AIRs loaded and warmed up (compiled) at start-up"
    )
    max_batch_size: int = 1
    batch_wait_ms: float = 5.0
    encode_threads: int = 2

    # Runway (runway:4@1, runway:4@2). Key and base URL also come from the runwayml SDK's own
    # variables, so one environment serves both the SDK's examples and impasto.
    runway_api_secret: SecretStr | None = Field(
        default=None,
        validation_alias=AliasChoices("IMPASTO_RUNWAY_API_SECRET", "RUNWAYML_API_SECRET"),
        description="Runway API key (key_...); also RUNWAYML_API_SECRET",
    )
    runway_base_url: str = Field(
        default="https://api.dev.runwayml.com",
        validation_alias=AliasChoices("IMPASTO_RUNWAY_BASE_URL", "RUNWAYML_BASE_URL"),
        description="Runway API base URL; also RUNWAYML_BASE_URL (point it at a test double)",
    )
    # Runway: "do not expect updates more often than once every five seconds".
    runway_poll_interval_s: float = Field(default=5.0, gt=0)
    runway_concurrency: int = Field(default=4, ge=1, description="Runway tasks at once per model")
    runway_request_timeout_s: float = Field(default=60.0, gt=0)
    runway_task_timeout_s: float = Field(
        default=1800.0, gt=0, description="give up (and cancel) a Runway task after this long"
    )

    # --- Content safety (safety.checkContent / blockContent; docs/safety.md) -----------------
    safety_checker: str = Field(
        default="nudenet",
        description="nudenet (the AGPL-3.0 `safety` extra) | hf:<model id or path> | none",
    )
    safety_threshold: float = Field(
        default=0.5, ge=0.0, le=1.0, description="a counted label scoring this or more flags"
    )
    safety_labels: Annotated[list[str] | None, NoDecode] = Field(
        default=None, description="comma-separated labels that count; default: the checker's"
    )
    safety_mode: str = Field(default="fast", description="fast | full, when a task names none")
    safety_withhold_flagged: bool = Field(
        default=False, description="flagged outputs fail with sensitiveContentDetected"
    )
    safety_prompt_terms: Annotated[list[str] | None, NoDecode] = Field(
        default=None, description="comma-separated prompt terms; default: a built-in list"
    )
    safety_prompt_terms_file: Path | None = Field(
        default=None, description="more prompt terms, one per line (# comments)"
    )
    safety_device: str = Field(default="cpu", description="torch device of an hf: checker")
    safety_batch_size: int = Field(default=8, ge=1, description="images per checker call")
    safety_threads: int = Field(default=1, ge=1, description="checker calls at once")

    @field_validator("safety_labels", "safety_prompt_terms", mode="before")
    @classmethod
    def _split_safety_list(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("safety_mode")
    @classmethod
    def _known_safety_mode(cls, value: str) -> str:
        if value not in ("fast", "full"):
            raise ValueError("must be fast or full")
        return value

    # --- end of content safety ----------------------------------------------------------------

    # --- Image storage (ImageStore; docs/storage.md) --------------------------------------------
    storage: str | None = Field(
        default=None,
        description="s3://bucket/prefix, file:///dir or a directory; default DATA_DIR/images",
    )
    s3_endpoint_url: str | None = Field(
        default=None, description="S3-compatible endpoint (MinIO, R2, …); default AWS"
    )
    s3_region: str | None = Field(default=None, description="default: boto3's (AWS_REGION, …)")
    s3_access_key_id: str | None = Field(
        default=None, description="with the secret; default: boto3's credential chain"
    )
    s3_secret_access_key: SecretStr | None = None
    s3_url_mode: Literal["proxy", "presigned", "public"] = Field(
        default="proxy",
        description="image URLs: proxy (via impasto, exact TTL) | presigned | public",
    )
    s3_public_base_url: str | None = Field(
        default=None, description="public mode: URL of the bucket root (or a CDN before it)"
    )
    # --- end of image storage -------------------------------------------------------------------

    @field_validator(
        "api_keys", "devices", "preload", "worker_models", "ws_allowed_origins", mode="before"
    )
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
    def distributed(self) -> bool:
        return bool(self.state) and str(self.state).startswith(("redis://", "rediss://"))

    @property
    def state_path(self) -> Path:
        return self.data_dir / "impasto.sqlite3"

    @property
    def images_dir(self) -> Path:
        return self.data_dir / "images"

    @property
    def models_dir(self) -> Path:
        return self.models_cache or self.data_dir / "models"
