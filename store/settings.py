"""Configuration from ``ANTIDOTE_*`` environment variables, shared by the API, the worker and the CLI."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Every setting has an embedded default so that ``antidote serve`` needs no outside service."""

    model_config = SettingsConfigDict(env_prefix="ANTIDOTE_", extra="ignore")

    data_dir: Path = Field(Path("./data"), description="State of the embedded default: database, broker, files.")
    database_url: str | None = Field(None, description="SQLAlchemy URL; default sqlite under data_dir.")
    broker_url: str | None = Field(None, description="Celery broker; default a folder broker under data_dir.")
    storage_url: str | None = Field(None, description="file:///path or s3://bucket[/prefix]; default data_dir/objects.")
    s3_endpoint_url: str | None = Field(None, description="S3-compatible endpoint, e.g. http://127.0.0.1:8333.")
    s3_region: str = "us-east-1"

    queue: str = Field("gpu", description="Celery queue the scan tasks go to; workers bind to it.")
    broker_visibility_timeout_s: int = Field(
        7200, description="Redis: seconds before an unacknowledged scan is delivered again (> scan_time_limit_s)."
    )
    scan_time_limit_s: int = Field(3600, gt=0, description="A scan running longer fails with code time_limit.")
    stale_sweep_interval_s: float = Field(
        60.0, ge=0, description="How often the API fails running scans with no sign of life for longer than "
        "scan_time_limit_s + 180 s, i.e. past Celery's hard limit (0: never)."
    )
    device: str = Field("auto", description="torch device for the worker: auto, cpu, cuda, cuda:N.")

    max_upload_bytes: int = Field(2 * 1024**3, gt=0, description="Whole POST /scans body.")
    max_model_bytes: int = Field(1024**3, gt=0, description="The model part.")
    max_data_bytes: int = Field(1024**3, gt=0, description="Each data part.")
    max_images: int = Field(200_000, gt=0, description="Images in one data file.")
    max_training_images: int = Field(
        60_000, gt=0, description="Images of the training_data of a repair_data scan (each is scored and trained "
        "on; 60,000 holds CIFAR-10's or Fashion-MNIST's whole training set)."
    )
    max_image_pixels: int = Field(4096 * 4096, gt=0, description="Pixels of one image.")
    max_zip_members: int = Field(250_000, gt=0, description="Members of one .zip or .npz.")
    max_zip_expanded_bytes: int = Field(4 * 1024**3, gt=0, description="Bytes one .zip or .npz expands to.")
    max_zip_ratio: float = Field(
        200.0, gt=1, description="How many times its stored size a zip member, an .npz array, or an image "
        "folder's decoded pixels may expand (checked above 16 MiB); bombs expand a thousand-fold."
    )
    max_total_pixels: int = Field(
        256 * 1024**2, gt=0, description="Pixels (N x H x W) of all images of one image-folder upload, read "
        "from the image headers before anything is decoded."
    )
    max_pickle_bytes: int = Field(256 * 1024**2, gt=0, description="data.pkl of a torch or BackdoorBench file.")
    max_pickle_globals: int = Field(
        1000, gt=0, description="Distinct globals a BackdoorBench pickle may name (each is neutralised, not run)."
    )
    max_pickle_memory_ratio: float = Field(
        2.0, gt=0, description="Memory the objects of a data.pkl may take, estimated from its opcodes before "
        "unpickling, as a multiple of its size (plus pickle_memory_slack_bytes)."
    )
    pickle_memory_slack_bytes: int = Field(64 * 1024**2, ge=0, description="See max_pickle_memory_ratio.")

    dependency_retry_after_s: int = Field(
        5, ge=1, description="Retry-After (seconds) of the 503 answered while the database or the broker is down."
    )
    db_connect_timeout_s: int = Field(
        5, ge=1, description="PostgreSQL: seconds one connection attempt may take before the database counts as down."
    )
    db_retry_max_interval_s: float = Field(
        5.0, gt=0, description="Worker: longest pause between retries of a database write during an outage "
        "(the retries go on until the scan's time limit)."
    )
    worker_heartbeat_s: float = Field(
        10.0, ge=0, description="Worker: how often a running scan's row is touched as a sign of life (0: never); "
        "a running scan silent for 3x this long, whose task the broker lost, is sent again."
    )
    broker_recovery_grace_s: float = Field(
        30.0, ge=0, description="A queued scan older than this whose task is nowhere in the Redis broker (lost in a "
        "restart without persistence) is sent again by the API's sweep."
    )

    metrics_token: str | None = Field(
        None, description="When set, /metrics answers only requests with 'Authorization: Bearer <token>' (401 "
        "otherwise); unset, /metrics is open, as before."
    )
    key_cache_s: float = Field(30.0, ge=0, description="How long the API remembers a valid key (0: never).")
    read_pool_size: int = Field(10, ge=1, description="PostgreSQL: connections of each API process's async pool "
                                "for the GET paths (store/reads.py).")
    read_pool_timeout_s: float = Field(2.0, gt=0, description="PostgreSQL: how long a GET waits for a pooled "
                                       "connection before it answers 503 (the database is down or the pool is busy).")

    # server limits (api/http_protocol.py, api/body_guard.py, api/upload_budget.py, create_scan)
    max_header_bytes: int = Field(64 * 1024, ge=1024, description="Bytes of a request head (line + headers); "
                                  "more is refused with 431.")
    header_timeout_s: float = Field(10.0, gt=0, description="A connection whose request head has not fully "
                                    "arrived this long after it opened (or after the head began) is closed "
                                    "(408 if it sent part of one).")
    body_read_timeout_s: float = Field(60.0, gt=0, description="An upload that sends no byte for this long is "
                                       "ended with 408.")
    drain_max_bytes: int = Field(1024**3, ge=0, description="After an early answer (401/413/415/422/429/503) "
                                 "at most this many unread body bytes are read and discarded so that the "
                                 "client can read the answer; a longer rest closes the connection at once.")
    drain_timeout_s: float = Field(60.0, ge=0, description="Time bound of that draining.")
    max_concurrent_uploads: int = Field(8, gt=0, description="POST /scans bodies received at once by one API "
                                        "process; more are answered 503 with Retry-After.")
    max_spool_bytes: int = Field(8 * 1024**3, gt=0, description="Bytes the uploads of one API process may hold "
                                 "in temp files at once (declared lengths are reserved up front); more: 503.")
    max_active_scans_per_tenant: int = Field(100, gt=0, description="Queued + running scans one tenant may "
                                             "have; a new POST /scans over it is answered 429.")
    retry_after_s: int = Field(10, gt=0, description="The Retry-After of the 503 and 429 answers above.")

    # webhooks (worker/webhooks.py, store/webhook_guard.py)
    webhook_allowed_hosts: str = Field("", description="Comma-separated host names or fnmatch patterns "
                                       "(`hooks.example.com`, `*.example.com`) a spec's notify.url may name; "
                                       "empty: no webhook is allowed.")
    webhook_allow_private: bool = Field(False, description="Let webhooks reach loopback, private, link-local, "
                                        "multicast and reserved addresses (cloud metadata addresses stay refused).")
    webhook_max_attempts: int = Field(5, ge=1, le=20, description="Tries of one webhook delivery, the first "
                                      "included.")
    webhook_retry_base_s: float = Field(10.0, ge=0, description="Pause before the 2nd try; it doubles with each "
                                        "further try (10, 20, 40 s ...).")
    webhook_timeout_s: float = Field(5.0, gt=0, le=60, description="Connect and read timeout of one webhook "
                                     "request.")
    webhook_max_redirects: int = Field(3, ge=0, le=10, description="Redirects a webhook follows, each target "
                                       "checked again like the first.")
    webhook_queue: str = Field("", description="Celery queue of the webhook tasks; empty: the scan queue. A "
                               "queue of their own, served by a small CPU worker, keeps deliveries from "
                               "waiting behind long scans.")
    webhook_max_response_bytes: int = Field(64 * 1024, ge=0, description="Bytes of a receiver's answer read "
                                            "at most (the rest is dropped).")
    webhook_sweep_grace_s: float = Field(30.0, ge=0, description="An ended scan whose webhook task was not sent "
                                         "this long after its end (its ender died first) is sent by the API's "
                                         "sweep, every stale_sweep_interval_s.")
    link_secret: str | None = Field(None, description="Server secret (HMAC-SHA256) of the signed page links; "
                                    "unset: a random one generated once and kept in data_dir/link_secret.")
    link_ttl_s: int = Field(900, gt=0, description="How long a signed page link (POST /scans/{id}/links) works.")

    log_level: str = "INFO"
    log_json: bool = True

    @field_validator("storage_url")
    @classmethod
    def _known_scheme(cls, v: str | None) -> str | None:
        if v is not None and not (v.startswith("file://") or v.startswith("s3://")):
            raise ValueError("ANTIDOTE_STORAGE_URL must start with file:// or s3://")
        return v

    @property
    def webhook_host_patterns(self) -> list[str]:
        """ANTIDOTE_WEBHOOK_ALLOWED_HOSTS split, lower-cased, blanks dropped."""
        return [h.strip().lower().rstrip(".") for h in self.webhook_allowed_hosts.split(",") if h.strip()]

    @property
    def resolved_webhook_queue(self) -> str:
        return self.webhook_queue or self.queue

    @property
    def stale_after_s(self) -> float:
        """A running scan silent this long was stopped without a trace: Celery's hard limit (scan_time_limit_s
        + 120 s, store/queue.py) kills the task and acknowledges it, so nobody else will end it. 60 s of grace."""
        return self.scan_time_limit_s + 120 + 60

    def data_limits(self) -> dict[str, int | float]:
        """Keyword arguments for ``core.data.formats.DataLimits`` (which also carries the checkpoint's)."""
        return {"max_images": self.max_images, "max_training_images": self.max_training_images,
                "max_pixels_per_image": self.max_image_pixels,
                "max_zip_members": self.max_zip_members, "max_expanded_bytes": self.max_zip_expanded_bytes,
                "max_compression_ratio": self.max_zip_ratio, "max_total_pixels": self.max_total_pixels,
                "max_pickle_bytes": self.max_pickle_bytes, "max_pickle_globals": self.max_pickle_globals,
                "max_pickle_memory_ratio": self.max_pickle_memory_ratio,
                "pickle_memory_slack_bytes": self.pickle_memory_slack_bytes}

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.data_dir / 'antidote.sqlite').resolve()}"

    @property
    def resolved_broker_url(self) -> str:
        return self.broker_url or "filesystem://"

    @property
    def resolved_storage_url(self) -> str:
        return self.storage_url or (self.data_dir / "objects").resolve().as_uri()

    @property
    def embedded_broker(self) -> bool:
        return self.resolved_broker_url.startswith("filesystem://")

    @property
    def broker_folder(self) -> Path:
        return (self.data_dir / "broker").resolve()


@lru_cache
def get_settings() -> Settings:
    """The process's settings, read once."""
    return Settings()
