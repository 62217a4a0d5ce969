"""`ptm serve` configuration: one pydantic settings model, from flags and PTM_SERVE_* env.

The operator configures pods through the environment (`PTM_SERVE_MODEL_PATH`,
`PTM_SERVE_MODEL_NAME`, `PTM_SERVE_HOST=0.0.0.0`, `PTM_SERVE_OPTIONS` as the RuntimeOptions JSON
from the CRD); on a laptop the same fields come from flags. Flags win over the environment.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from ptm_runtime.options import RuntimeOptions

MiB = 1 << 20


class ServeSettings(BaseSettings):
    """Everything `ptm serve` needs to know."""

    model_config = SettingsConfigDict(env_prefix="PTM_SERVE_", extra="forbid", protected_namespaces=())

    model_path: Path
    """Artifact directory (model.onnx + report.json, sha256 verified) or a bare .onnx file."""
    model_name: str = Field(
        default="model", min_length=1, max_length=253, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"
    )
    """Name clients use in /v2/models/NAME."""
    model_version: str = Field(default="1", min_length=1, max_length=63, pattern=r"^[A-Za-z0-9_.-]+$")
    """The one version served."""
    host: str = "127.0.0.1"
    """Address to listen on (pods pass 0.0.0.0)."""
    http_port: int = Field(default=8080, ge=0, le=65535)
    """REST port (0: any free port, see ports_file)."""
    grpc_port: int = Field(default=8081, ge=0, le=65535)
    """gRPC port (0: any free port)."""
    metrics_port: int = Field(default=8082, ge=0, le=65535)
    """Prometheus /metrics port (0: any free port)."""
    options: RuntimeOptions = Field(default_factory=RuntimeOptions)
    """Runtime options (execution providers, batching, threads, timeouts), as in the CRD."""
    max_body_bytes: int = Field(default=64 * MiB, ge=1024, le=2048 * MiB)
    """Largest request body (REST) or message (gRPC); larger ones get 413 / RESOURCE_EXHAUSTED."""
    drain_timeout_s: float = Field(default=30.0, ge=0, le=3600)
    """On SIGTERM: how long queued and in-flight requests may take to finish."""
    ports_file: Path | None = None
    """When set, the bound ports are written here as JSON once the sockets listen."""
    trt_cache_dir: Path | None = None
    """TensorRT engine cache directory (a volume, so restarts skip the engine build)."""
    termination_log: Path = Path("/dev/termination-log")
    """Start-up failures are written here when the file exists (Kubernetes shows them)."""
    log_level: str = Field(default="info", pattern=r"^(debug|info|warning|error)$")
