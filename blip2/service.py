"""The scoring service: validated rows -> images -> engine -> answers.

Used by ``score.py`` (online endpoint), the batch entry script and the local
batch CLI. It turns each row's image cell into pixels (in parallel threads, so
URL fetches overlap), checks prompt lengths, and hands the rows to the runner,
which is the micro-batcher (several requests share one model batch).
"""

from __future__ import annotations

import hashlib
import logging
import time
from concurrent.futures import ThreadPoolExecutor

from .batcher import Batcher
from .cache import EmbedCache
from .config import Settings
from .engine import Engine, GenItem
from .errors import PayloadTooLarge, ServiceError
from .images import decode_image, read_image_bytes
from .params import GenerationParams
from .payload import Row, ScoreRequest, parse_body, parse_request
from .preprocess import Preprocessor

log = logging.getLogger("blip2.service")


class Service:
    def __init__(self, settings: Settings, engine: Engine):
        self.settings = settings
        self.engine = engine
        self.preprocessor = Preprocessor.from_processor(engine.processor)
        self._pool = ThreadPoolExecutor(max_workers=settings.preprocess_threads, thread_name_prefix="blip2-img")
        self.batcher = Batcher(
            engine.generate,
            max_batch_size=settings.max_batch_size,
            wait_s=settings.batch_wait_ms / 1000.0,
            max_wait_s=settings.batch_max_wait_ms / 1000.0,
        )

    @classmethod
    def from_settings(cls, settings: Settings) -> "Service":
        """Load the model named by ``settings``, warm it up and start the batcher."""
        from . import model as model_loader

        loaded = model_loader.load(settings)
        cache = EmbedCache(settings.embed_cache_mb * 1024 * 1024) if settings.embed_cache_mb > 0 else None
        engine = Engine(
            loaded.model, loaded.processor, device=loaded.device, dtype=loaded.dtype,
            max_batch_size=settings.max_batch_size, cache=cache, static_cache=settings.static_cache,
        )
        if settings.warmup:
            started = time.perf_counter()
            engine.warm_up()
            log.info("Warm-up batch of %d rows took %.2f s", settings.max_batch_size, time.perf_counter() - started)
        return cls(settings, engine)

    def close(self) -> None:
        self.batcher.close()
        self._pool.shutdown(wait=False, cancel_futures=True)

    # -- entry points ---------------------------------------------------------------------
    def score_body(self, raw: str | bytes) -> list[dict]:
        """A raw HTTP body -> ``[{"text": ...}, ...]``; raises ServiceError for the client's mistakes."""
        body = parse_body(raw, self.settings.max_body_bytes)
        request = parse_request(body, max_rows=self.settings.max_rows, caps=self.settings.caps)
        return [{"text": text} for text in self.score(request)]

    def score(self, request: ScoreRequest) -> list[str]:
        """Answers in row order; the first bad row raises its error (tagged with the row index)."""
        results = self.score_rows(request.rows, request.params)
        for result in results:
            if isinstance(result, ServiceError):
                raise result
        return results

    def score_rows(self, rows: tuple[Row, ...] | list[Row], params: GenerationParams) -> list[str | ServiceError]:
        """Answers or per-row errors, in row order: one bad row does not sink the others."""
        deadline = time.monotonic() + self.settings.request_timeout_s
        # announced first, so the batcher waits for these rows while their images are decoded
        with self.batcher.announce(len(rows)) as announced:
            if len(rows) == 1:  # no thread hand-off for the common one-row request
                prepared = [self._prepare(rows[0])]
            else:
                prepared = list(self._pool.map(self._prepare, rows))
            good = [(i, item) for i, item in enumerate(prepared) if isinstance(item, GenItem)]
            results: list[str | ServiceError] = list(prepared)  # errors stay where they are
            if good:
                answers = self.batcher.submit([item for _, item in good], params, deadline, announced=announced)
                for (i, _), answer in zip(good, answers):
                    results[i] = answer
        return results

    # -- one row --------------------------------------------------------------------------
    def _prepare(self, row: Row) -> GenItem | ServiceError:
        try:
            limit = self.settings.max_prompt_tokens
            if len(row.prompt) > limit * 32:  # no tokenizer makes fewer tokens than that: skip the work
                raise PayloadTooLarge(
                    f"Row {row.index}: the prompt is {len(row.prompt)} characters, far over the limit of "
                    f"{limit} tokens; shorten it (for chat, drop the oldest turns).",
                    code="prompt_too_long",
                )
            prompt_ids = self.engine.tokenize([row.prompt])[0]
            n_tokens = len(prompt_ids)
            if n_tokens > self.settings.max_prompt_tokens:
                raise PayloadTooLarge(
                    f"Row {row.index}: the prompt is {n_tokens} tokens, over the limit of "
                    f"{self.settings.max_prompt_tokens}; shorten it (for chat, drop the oldest turns).",
                    code="prompt_too_long",
                )
            data = read_image_bytes(row.image, self.settings.images)
            key = hashlib.sha256(data).hexdigest()
            cache = self.engine.cache
            embed = cache.get(key) if cache is not None else None
            if embed is not None:  # held here, so a later eviction cannot lose it
                return GenItem(key=key, pixels=None, prompt=row.prompt, embed=embed, prompt_ids=prompt_ids)
            image = decode_image(data, self.settings.images, draft=self.preprocessor.draft_size)
            # uint8: the engine normalises the whole batch on its device
            return GenItem(key=key, pixels=self.preprocessor.resize(image), prompt=row.prompt, prompt_ids=prompt_ids)
        except ServiceError as err:
            return err.with_row(row.index)
        except Exception:  # noqa: BLE001 - a row must never take the request down with an internal error
            log.exception("Unexpected failure preparing row %d", row.index)
            return ServiceError(
                f"Row {row.index}: the server failed to read this image; retry, or send it in another format.",
                row=row.index,
            )
