"""The `local:` config section: models that Pluggably runs itself."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from pluggably.core.configmodel import StrictModel


class LocalModelConfig(StrictModel):
    name: str = Field(min_length=1)
    path: Path
    # text: a transformers causal-LM folder; image: a diffusers text-to-image pipeline folder;
    # mesh: a diffusers Shap-E (text-to-3D) pipeline folder.
    modality: Literal["text", "image", "mesh"] = "text"
    device: str = "auto"
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    max_concurrency: int = Field(1, ge=1)
    max_queue: int = Field(16, ge=0)
    # Seconds a request may wait in this model's queue (behind `max_concurrency` running ones)
    # before it is refused with RESOURCE_EXHAUSTED (reason MODEL_QUEUE_TIMEOUT) and a retry hint.
    queue_timeout_s: float = Field(30.0, gt=0, allow_inf_nan=False)
    default_max_tokens: int = Field(256, ge=1)
    context_length: int | None = Field(None, ge=1)
    description: str = ""
    # Image models: denoising steps when a request does not say (default: the pipeline's 50).
    default_steps: int | None = Field(None, ge=1, le=500)
    # Text models: `vllm` serves the model with vLLM's engine (`pip install vllm` on a CUDA
    # host); without vLLM or a GPU the model is listed UNSERVABLE with the reason.
    runner: Literal["transformers", "vllm"] = "transformers"
    # vLLM only.
    tensor_parallel_size: int = Field(1, ge=1)
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)
    max_model_len: int | None = Field(None, ge=1)

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        if value in ("auto", "cpu", "cuda") or (value.startswith("cuda:") and value[5:].isdigit()):
            return value
        raise ValueError("must be 'auto', 'cpu', 'cuda' or 'cuda:<index>'")


class RemoteModelConfig(StrictModel):
    # The model's id on the remote server (`local/tiny`); served here as `<provider>/<id>`.
    name: str = Field(min_length=1)
    modality: Literal["text", "image", "mesh"] = "text"
    description: str = ""


class RemoteConfig(StrictModel):
    """Another v1 server (a runner on a GPU host, another gateway): `providers: {gpu1: {kind:
    remote, target: "10.0.0.5:50051", models: [{name: local/llama}]}}`."""

    kind: Literal["remote"] = "remote"
    # host:port, or unix:/path.
    target: str = Field(min_length=1)
    models: list[RemoteModelConfig] = Field(default_factory=list)
    # The environment variable holding the remote's API key, sent as `authorization: Bearer`.
    api_key_env: str | None = None
    # TLS to the remote: the CA that signed its certificate (None: plaintext).
    ca_file: Path | None = None


class WorkersConfig(StrictModel):
    """Local models in worker processes instead of the gateway's own interpreter."""

    enabled: bool = False
    # Worker processes at most (one model each); the least recently used idle one is stopped
    # to start another.
    max_workers: int = Field(2, ge=1)
    # torch threads per worker; 0: the cores divided among max_workers.
    threads_per_worker: int = Field(0, ge=0)
    # Resident memory of all workers together; over it, the least recently used idle workers
    # are stopped (after a call ends, and before one starts). None: no memory budget.
    max_memory_bytes: int | None = Field(None, ge=1)


class LocalConfig(StrictModel):
    # Empty by default: a gateway configured only for hosted providers serves no local model
    # (the demo model comes from `make run`'s demo config, never from built-in defaults).
    models: list[LocalModelConfig] = Field(default_factory=list)
    workers: WorkersConfig = Field(default_factory=WorkersConfig)

    @field_validator("models")
    @classmethod
    def _unique_names(cls, models: list[LocalModelConfig]) -> list[LocalModelConfig]:
        names = [m.name for m in models]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"duplicate model names: {', '.join(duplicates)}")
        return models
