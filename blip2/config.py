"""Every knob of the service, read once from the environment and validated.

Nothing here runs at import time: ``Settings.from_env()`` is called explicitly
(in ``score.init()``, the batch entry script, the CLI) and returns a frozen
dataclass. A bad value raises ``ValueError`` naming the variable and what to
set it to.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Mapping

DEFAULT_MODEL = "Salesforce/blip2-opt-2.7b"
DTYPES = ("float16", "bfloat16", "float32")


@dataclass(frozen=True)
class ImageLimits:
    """Limits on fetching and decoding one image."""

    max_bytes: int = 20 * 1024 * 1024  # encoded image bytes (after base64 decoding)
    max_pixels: int = 40_000_000  # width * height
    connect_timeout_s: float = 3.0
    read_timeout_s: float = 10.0
    total_timeout_s: float = 20.0  # whole download, however slowly it trickles
    max_redirects: int = 3
    allow_private_urls: bool = False  # tests and private networks only
    allowed_hosts: tuple[str, ...] = ()  # empty: any public host


@dataclass(frozen=True)
class ParamCaps:
    """Server-side caps on the generation parameters a client may ask for."""

    max_new_tokens: int = 256
    num_beams: int = 8
    top_k: int = 1000


@dataclass(frozen=True)
class Settings:
    model: str | None = None  # BLIP2_MODEL: hub id, local folder, or "demo"
    azureml_model_dir: str | None = None  # AZUREML_MODEL_DIR
    dtype: str | None = None  # BLIP2_DTYPE; None: float16 on CUDA, on CPU bfloat16 if native else float32
    device: str | None = None  # BLIP2_DEVICE; None: cuda if available else cpu
    max_batch_size: int = 16  # BLIP2_MAX_BATCH_SIZE: rows per model batch
    batch_wait_ms: float = 5.0  # BLIP2_BATCH_WAIT_MS: the batcher gathers until this long passes with no new row
    batch_max_wait_ms: float = 50.0  # BLIP2_BATCH_MAX_WAIT_MS: ... but never longer than this per batch
    request_timeout_s: float = 120.0  # BLIP2_REQUEST_TIMEOUT_S: deadline per request
    embed_cache_mb: int = 256  # BLIP2_EMBED_CACHE_MB: image-embedding cache, 0 = off
    preprocess_threads: int = 4  # BLIP2_PREPROCESS_THREADS
    max_body_bytes: int = 64 * 1024 * 1024  # BLIP2_MAX_BODY_MB
    max_rows: int = 64  # BLIP2_MAX_ROWS: rows per request
    max_prompt_tokens: int = 256  # BLIP2_MAX_PROMPT_TOKENS
    warmup: bool = True  # BLIP2_WARMUP=0 skips the warm-up batch
    static_cache: bool = False  # BLIP2_STATIC_CACHE=1: static KV cache (on CUDA transformers also compiles decode)
    fast_greedy: bool = True  # BLIP2_FAST_GREEDY=0: greedy requests use transformers' generate, not our loop
    cuda_graph_mb: int | None = None  # BLIP2_CUDA_GRAPH_MB: keys/values for CUDA-graph decode steps; None auto, 0 off
    stats_interval_s: float = 60.0  # BLIP2_STATS_INTERVAL_S: a batching summary in the log this often; 0 = never
    images: ImageLimits = field(default_factory=ImageLimits)
    caps: ParamCaps = field(default_factory=ParamCaps)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "Settings":
        """Build settings from ``env`` (default ``os.environ``); raise ValueError on bad values."""
        env = os.environ if env is None else env
        r = _Reader(env)
        dtype = r.choice("BLIP2_DTYPE", DTYPES)
        device = r.text("BLIP2_DEVICE")
        if device is not None and not re.fullmatch(r"cpu|cuda(:\d+)?", device):
            raise ValueError(f"BLIP2_DEVICE is {device!r}; set it to 'cpu', 'cuda' or 'cuda:N', or unset it.")
        images = ImageLimits(
            max_bytes=r.mib("BLIP2_MAX_IMAGE_MB", ImageLimits.max_bytes),
            max_pixels=r.integer("BLIP2_MAX_IMAGE_PIXELS", ImageLimits.max_pixels, lo=1),
            connect_timeout_s=r.number("BLIP2_URL_CONNECT_TIMEOUT_S", ImageLimits.connect_timeout_s, lo=0.01),
            read_timeout_s=r.number("BLIP2_URL_READ_TIMEOUT_S", ImageLimits.read_timeout_s, lo=0.01),
            total_timeout_s=r.number("BLIP2_URL_TOTAL_TIMEOUT_S", ImageLimits.total_timeout_s, lo=0.01),
            max_redirects=r.integer("BLIP2_URL_MAX_REDIRECTS", ImageLimits.max_redirects, lo=0),
            allow_private_urls=r.flag("BLIP2_ALLOW_PRIVATE_URLS", False),
            allowed_hosts=r.host_list("BLIP2_URL_ALLOWED_HOSTS"),
        )
        caps = ParamCaps(
            max_new_tokens=r.integer("BLIP2_MAX_NEW_TOKENS_CAP", ParamCaps.max_new_tokens, lo=1),
            num_beams=r.integer("BLIP2_MAX_NUM_BEAMS", ParamCaps.num_beams, lo=1),
            top_k=r.integer("BLIP2_MAX_TOP_K", ParamCaps.top_k, lo=1),
        )
        return cls(
            model=r.text("BLIP2_MODEL"),
            azureml_model_dir=r.text("AZUREML_MODEL_DIR"),
            dtype=dtype,
            device=device,
            max_batch_size=r.integer("BLIP2_MAX_BATCH_SIZE", cls.max_batch_size, lo=1),
            batch_wait_ms=r.number("BLIP2_BATCH_WAIT_MS", cls.batch_wait_ms, lo=0.0),
            batch_max_wait_ms=r.number("BLIP2_BATCH_MAX_WAIT_MS", cls.batch_max_wait_ms, lo=0.0),
            request_timeout_s=r.number("BLIP2_REQUEST_TIMEOUT_S", cls.request_timeout_s, lo=0.1),
            embed_cache_mb=r.integer("BLIP2_EMBED_CACHE_MB", cls.embed_cache_mb, lo=0),
            preprocess_threads=r.integer("BLIP2_PREPROCESS_THREADS", cls.preprocess_threads, lo=1),
            max_body_bytes=r.mib("BLIP2_MAX_BODY_MB", cls.max_body_bytes),
            max_rows=r.integer("BLIP2_MAX_ROWS", cls.max_rows, lo=1),
            max_prompt_tokens=r.integer("BLIP2_MAX_PROMPT_TOKENS", cls.max_prompt_tokens, lo=1),
            warmup=r.flag("BLIP2_WARMUP", True),
            static_cache=r.flag("BLIP2_STATIC_CACHE", False),
            fast_greedy=r.flag("BLIP2_FAST_GREEDY", True),
            cuda_graph_mb=r.optional_integer("BLIP2_CUDA_GRAPH_MB", lo=0),
            stats_interval_s=r.number("BLIP2_STATS_INTERVAL_S", cls.stats_interval_s, lo=0.0),
            images=images,
            caps=caps,
        )


class _Reader:
    """Typed access to environment variables with messages that say how to fix them."""

    def __init__(self, env: Mapping[str, str]):
        self.env = env

    def text(self, name: str) -> str | None:
        value = self.env.get(name, "").strip()
        return value or None

    def choice(self, name: str, allowed: tuple[str, ...]) -> str | None:
        value = self.text(name)
        if value is not None and value not in allowed:
            raise ValueError(f"{name} is {value!r}; set it to one of {', '.join(allowed)}, or unset it.")
        return value

    def integer(self, name: str, default: int, lo: int) -> int:
        value = self.text(name)
        if value is None:
            return default
        try:
            number = int(value)
        except ValueError:
            raise ValueError(f"{name} is {value!r}; set it to a whole number >= {lo}.") from None
        if number < lo:
            raise ValueError(f"{name} is {number}; set it to a whole number >= {lo}.")
        return number

    def optional_integer(self, name: str, lo: int) -> int | None:
        return None if self.text(name) is None else self.integer(name, lo, lo)

    def number(self, name: str, default: float, lo: float) -> float:
        value = self.text(name)
        if value is None:
            return default
        try:
            number = float(value)
        except ValueError:
            raise ValueError(f"{name} is {value!r}; set it to a number >= {lo}.") from None
        if not number >= lo or number == float("inf"):
            raise ValueError(f"{name} is {value!r}; set it to a finite number >= {lo}.")
        return number

    def mib(self, name: str, default_bytes: int) -> int:
        value = self.text(name)
        if value is None:
            return default_bytes
        mb = self.number(name, 0.0, lo=0.001)
        if mb > 1024 * 1024:  # a terabyte: a typo, and past it int() of the bytes may overflow
            raise ValueError(f"{name} is {self.text(name)!r}; set it to a number of megabytes up to {1024 * 1024}.")
        return int(mb * 1024 * 1024)

    def flag(self, name: str, default: bool) -> bool:
        value = self.text(name)
        if value is None:
            return default
        lowered = value.lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{name} is {value!r}; set it to 1 or 0.")

    def host_list(self, name: str) -> tuple[str, ...]:
        value = self.text(name)
        if value is None:
            return ()
        hosts = tuple(h.strip().lower().rstrip(".") for h in value.split(",") if h.strip())
        return hosts
