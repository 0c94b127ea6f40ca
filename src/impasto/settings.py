"""One Settings object, built at start-up and passed down. The only reader of os.environ."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from impasto.backends.utility.catalog import (
    DEFAULT_BACKGROUND_REMOVER,
    DEFAULT_CAPTIONER,
    DEFAULT_PROMPT_ENHANCER,
    DEFAULT_UPSCALER,
)


def _default_data_dir() -> Path:
    return Path.home() / ".local" / "share" / "impasto"


class Settings(BaseSettings):
    """Every knob of impasto; each is also an `IMPASTO_<NAME>` environment variable."""

    # populate_by_name: fields read from a provider's own variable (RUNWAYML_API_SECRET) can
    # still be given by field name in code and tests.
    model_config = SettingsConfigDict(env_prefix="IMPASTO_", extra="ignore", populate_by_name=True)

    # Where state lives: None = the SQLite file in the data dir (one process); redis://… =
    # shared by many API nodes and workers (then images must be in shared storage too).
    state: str | None = Field(
        default=None,
        description="unset: SQLite in the data dir; redis://host:6379/0: shared by nodes",
    )
    redis_prefix: str = Field(
        default="impasto", description="key prefix on Redis (several deployments on one Redis)"
    )
    worker_models: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="AIRs an `impasto worker` serves"
    )
    worker_prefetch: int = Field(default=8, description="queued jobs a worker holds at once")
    worker_lease_s: float = Field(
        default=60.0,
        description="a job's lease, renewed while it runs; another worker takes it over after",
    )
    worker_max_deliveries: int = Field(
        default=3, description="takers of one job (workers that died with it) before it fails"
    )
    worker_port: int | None = Field(
        default=None, description="serve /healthz and /metrics of `impasto worker` on this port"
    )
    host: str = Field(default="127.0.0.1", description="bind address")
    port: int = Field(
        default=8080, description="port of REST, WebSocket, images, the playground and health"
    )
    data_dir: Path = Field(
        default_factory=_default_data_dir,
        description="SQLite state, image files and the models cache",
    )
    models: Path | None = Field(default=None, description="models file (TOML)")
    models_cache: Path | None = Field(
        default=None, description="where built-in models are built/cached; default DATA_DIR/models"
    )
    public_url: str | None = Field(
        default=None, description="base URL of image links; default http://HOST:PORT"
    )
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="operator keys, comma-separated (no limits; see every key's usage); with "
        "none and no managed keys (`impasto keys create`) the server is open",
    )
    auth_failures_per_minute: int = Field(
        default=10,
        ge=0,
        description="failed authentications allowed per client address a minute (a burst of "
        "this many, then one every 60/N s); past it the address gets 429 (0 = no limit)",
    )
    key_refresh_s: float = Field(
        default=2.0,
        gt=0,
        description="how often each node reloads managed keys (revocations, new limits)",
    )
    openai_default_model: str | None = Field(
        default=None,
        description="the model of an OpenAI Images API request without `model`; default the "
        "first of IMPASTO_PRELOAD, else the first model of the registry",
    )
    private_images: bool = Field(
        default=False,
        description="/image/ URLs need the API key that made the image (Bearer header); "
        "otherwise they are capability URLs (unguessable UUIDs)",
    )
    metrics_max_keys: int = Field(
        default=50,
        ge=1,
        description="distinct API key names labelled in /metrics; further keys are `(other)`",
    )
    log_level: str = Field(default="info", description="debug | info | warning | error")
    log_format: Literal["text", "json"] = Field(
        default="text", description="text, or json (one object per line, with the task UUID)"
    )

    # Requests
    max_body_bytes: int = Field(
        default=32 * 1024 * 1024, description="largest REST body or WebSocket frame, in bytes"
    )
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
    sync_timeout_s: float = Field(
        default=300.0,
        description="a sync reply waits this long; then the task goes on (syncTimeout)",
    )
    ws_idle_timeout_s: float = Field(
        default=120.0, description="a WebSocket with no frame either way for this long is closed"
    )
    ws_session_ttl_s: float = Field(
        default=120.0,
        description="results of a detached WebSocket session are kept this long for a resume",
    )
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
    output_retention_s: int = Field(
        default=7 * 24 * 3600, description="seconds generated images are kept (without a task ttl)"
    )
    upload_retention_s: int = Field(
        default=30 * 24 * 3600,
        description="seconds images uploaded with imageUpload / mediaStorage are kept",
    )
    task_retention_s: int = Field(
        default=7 * 24 * 3600, description="seconds finished tasks stay available to getResponse"
    )
    sweep_interval_s: float = Field(
        default=60.0, description="seconds between sweeps of expired images and tasks"
    )

    # Inputs fetched or decoded on behalf of a client
    allow_private_networks: bool = Field(
        default=False,
        description="let outbound URLs reach private, loopback and link-local addresses",
    )
    fetch_timeout_s: float = Field(
        default=15.0, description="timeout fetching a reference or input image URL"
    )
    max_fetch_bytes: int = Field(
        default=20 * 1024 * 1024, description="largest input image fetched or decoded, in bytes"
    )
    max_image_pixels: int = Field(
        default=40_000_000,
        description="largest input image, in pixels (decompression bombs are refused)",
    )
    upload_max_side: int = Field(
        default=2048,
        description="uploaded images are scaled down to at most this many pixels a side",
    )

    # Utility tasks (upscale, removeBackground, caption, promptEnhance)
    upscale_model: str = Field(
        default=DEFAULT_UPSCALER, description="the model of an upscale task without `model`"
    )
    remove_background_model: str = Field(
        default=DEFAULT_BACKGROUND_REMOVER,
        description="the model of a removeBackground task without `model`",
    )
    caption_model: str = Field(
        default=DEFAULT_CAPTIONER, description="the model of a caption task without `model`"
    )
    prompt_enhance_model: str = Field(
        default=DEFAULT_PROMPT_ENHANCER,
        description="the model of a promptEnhance task without `model`",
    )
    upscale_max_side: int = Field(
        default=8192,
        description="longest side of an upscaled image; larger requests are refused",
    )

    # Webhooks and upload endpoints
    webhook_secret: str | None = Field(
        default=None, description="signs webhooks with HMAC-SHA256 when set"
    )
    delivery_max_attempts: int = Field(default=12, description="tries of one webhook or upload PUT")
    delivery_base_delay_s: float = Field(
        default=1.0, description="first retry delay (doubling, with jitter)"
    )
    delivery_max_delay_s: float = Field(default=60.0, description="longest delay between retries")
    delivery_budget_s: float = Field(
        default=30 * 60.0, description="a delivery gives up after this long in all"
    )
    delivery_connect_timeout_s: float = Field(
        default=5.0, description="connect timeout of webhooks and upload PUTs"
    )
    webhook_read_timeout_s: float = Field(
        default=30.0, description="read timeout of a webhook POST"
    )
    upload_read_timeout_s: float = Field(default=120.0, description="read timeout of an upload PUT")

    # Engine
    devices: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["auto"],
        description="auto (every CUDA device, else the CPU) or a list such as cuda:0,cuda:1",
    )
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
    max_batch_size: int = Field(
        default=1, description="jobs of one model run together (a model entry may set its own)"
    )
    batch_wait_ms: float = Field(
        default=5.0, description="how long a runner waits for more jobs to fill a batch"
    )
    encode_threads: int = Field(default=2, description="threads that encode and store images")

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
    runway_poll_interval_s: float = Field(
        default=5.0, gt=0, description="seconds between polls of a running Runway task"
    )
    runway_concurrency: int = Field(default=4, ge=1, description="Runway tasks at once per model")
    runway_request_timeout_s: float = Field(
        default=60.0, gt=0, description="timeout of one request to Runway"
    )
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
    s3_secret_access_key: SecretStr | None = Field(
        default=None, description="S3 secret key (else the AWS credential chain)"
    )
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
