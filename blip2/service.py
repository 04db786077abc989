"""The scoring service: validated rows -> images -> engine -> answers.

Used by ``score.py`` (online endpoint), the batch entry script and the local
batch CLI. It turns each row's image cell into pixels (in parallel threads, so
URL fetches overlap), checks prompt lengths, and hands the rows to the runner,
which is the micro-batcher (several requests share one model batch).
"""

from __future__ import annotations

import copy
import hashlib
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import ExitStack
from dataclasses import dataclass, replace

from . import modelthread
from .batcher import Announcement, Batcher, deadline_error
from .cache import EmbedCache
from .config import Settings
from .engine import Engine, GenItem
from .errors import InvalidInput, PayloadTooLarge, ServiceError
from .images import decode_image, is_url, read_image_bytes
from .params import GenerationParams
from .payload import Row, ScoreRequest, parse_body, parse_request
from .preprocess import Preprocessor
from .stats import BatchStats

log = logging.getLogger("blip2.service")


class Service:
    def __init__(self, settings: Settings, engine: Engine):
        self.settings = settings
        self.engine = engine
        self.preprocessor = Preprocessor.from_processor(engine.processor)
        self._pool = ThreadPoolExecutor(max_workers=settings.preprocess_threads, thread_name_prefix="blip2-img")
        # big decodes at once, over every request thread and the pool (images.HEAVY_PIXELS)
        self._heavy = threading.BoundedSemaphore(settings.preprocess_threads)
        self._fetch_pool = ThreadPoolExecutor(max_workers=4 * settings.preprocess_threads, thread_name_prefix="blip2-fetch")
        self._counted = (0, 0)  # the engine's embedding counts at the last stats line
        self.batcher = Batcher(
            engine.generate,
            max_batch_size=settings.max_batch_size,
            wait_s=settings.batch_wait_ms / 1000.0,
            max_wait_s=settings.batch_max_wait_ms / 1000.0,
            stats=BatchStats(settings.stats_interval_s, extra=self._embedding_counts),
        )

    @classmethod
    def from_settings(cls, settings: Settings) -> "Service":
        """Load the model named by ``settings``, warm it up and start the batcher."""
        # all of it on the thread that runs every batch: one OpenMP team on the CPU (see modelthread)
        return cls(settings, modelthread.run(_load_engine, settings))

    def close(self) -> None:
        self.batcher.close()
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._fetch_pool.shutdown(wait=False, cancel_futures=True)

    def _embedding_counts(self) -> str:
        """Since the last call: images run through the vision tower, and rows that reused an embedding."""
        now = (self.engine.images_embedded, self.engine.rows_cached)
        embedded, cached = now[0] - self._counted[0], now[1] - self._counted[1]
        self._counted = now
        return f"{embedded} images embedded, {cached} rows reused an embedding (cache or same image)"

    # -- entry points ---------------------------------------------------------------------
    def score_body(self, raw: str | bytes) -> list[dict]:
        """A raw HTTP body -> ``[{"text": ...}, ...]``; raises ServiceError for the client's mistakes."""
        # announced from the moment the body is in hand: the batcher waits for it while it is parsed
        with self.batcher.announce() as announced:
            body = parse_body(raw, self.settings.max_body_bytes)
            request = parse_request(body, max_rows=self.settings.max_rows, caps=self.settings.caps)
            return [{"text": text} for text in self.score(request, announced)]

    def score(self, request: ScoreRequest, announced: Announcement | None = None) -> list[str]:
        """Answers in row order; the first bad row raises its error (tagged with the row index),
        before the model runs for the others."""
        return self.score_rows(request.rows, request.params, announced, fail_fast=True)

    def score_rows(
        self, rows: tuple[Row, ...] | list[Row], params: GenerationParams, announced: Announcement | None = None,
        *, fail_fast: bool = False,
    ) -> list[str | ServiceError]:
        """Answers or per-row errors, in row order: one bad row does not sink the others.

        ``fail_fast``: raise the first bad row's error instead, without running the model. Fetching
        and decoding count against the request's deadline like the model does (504 past it).
        """
        deadline = time.monotonic() + self.settings.request_timeout_s
        with ExitStack() as stack:
            announced = stack.enter_context(announced or self.batcher.announce())
            fetching = any(is_url(row.image) for row in rows)
            if fetching:  # a URL fetch can take seconds: the batcher must not hold a batch for it
                announced.withdraw()
            read = self._fit_positions(self._read_rows(rows, deadline), params)
            if fetching:  # the bytes are here; decoding is quick
                announced = stack.enter_context(self.batcher.announce())
            prepared = self._decode_rows(read, deadline)
            if time.monotonic() > deadline:
                raise deadline_error()
            if fail_fast:
                for item in prepared:
                    if isinstance(item, ServiceError):
                        raise item
            good = [(i, item) for i, item in enumerate(prepared) if isinstance(item, GenItem)]
            results: list[str | ServiceError] = list(prepared)  # errors stay where they are
            if good:
                answers = self.batcher.submit([item for _, item in good], params, deadline, announced=announced)
                for (i, _), answer in zip(good, answers):
                    results[i] = answer
        return results

    # -- rows -----------------------------------------------------------------------------
    def _map(self, pool: ThreadPoolExecutor, fn, values: list, deadline: float | None) -> list:
        """``fn`` over ``values``, in ``pool`` (URL fetches and decodes overlap) unless there is one.

        Past ``deadline`` the request gives up with a 504: work not yet started is cancelled, and
        each fetch already running ends by then (``_read_row`` gives it no more time than is left).
        """
        if len(values) <= 1:  # no thread hand-off for the common one-row request
            return [fn(v) for v in values]
        futures = [pool.submit(fn, v) for v in values]
        try:
            return [f.result(timeout=None if deadline is None else max(deadline - time.monotonic(), 0)) for f in futures]
        except FutureTimeout:
            for f in futures:
                f.cancel()
            raise deadline_error() from None

    def _fit_positions(self, read: list["_Read | ServiceError"], params: GenerationParams) -> list["_Read | ServiceError"]:
        """Rows whose image tokens, prompt and longest answer would not fit the model's positions -> 413."""
        limit, image = self.engine.max_positions, self.engine.num_query_tokens
        if limit is None:
            return read
        out: list[_Read | ServiceError] = []
        for r in read:
            if isinstance(r, _Read) and image + len(r.prompt_ids) + params.max_new_tokens > limit:
                room = limit - image - params.max_new_tokens
                r = PayloadTooLarge(
                    f"Row {r.row.index}: the prompt is {len(r.prompt_ids)} tokens; with max_new_tokens="
                    f"{params.max_new_tokens} and the image's {image} tokens it needs more than the model's "
                    f"{limit} positions. Shorten the prompt to at most {max(room, 0)} tokens or lower max_new_tokens.",
                    code="prompt_too_long", row=r.row.index,
                )
            out.append(r)
        return out

    def _prepare_rows(self, rows) -> list[GenItem | ServiceError]:
        """Rows -> model-ready items or per-row errors. Each distinct image is decoded once per request."""
        return self._decode_rows(self._read_rows(rows))

    def _read_rows(self, rows, deadline: float | None = None) -> list["_Read | ServiceError"]:
        rows = list(rows)
        # URL fetches wait on the network: their own pool, so that they never hold up decoding
        pool = self._fetch_pool if any(is_url(row.image) for row in rows) else self._pool
        return self._map(pool, lambda row: self._read_row(row, deadline), rows, deadline)

    def _decode_rows(self, read: list["_Read | ServiceError"], deadline: float | None = None) -> list[GenItem | ServiceError]:
        first: dict[str, _Read] = {}  # image hash -> the first row that needs its pixels
        for r in read:
            if isinstance(r, _Read) and r.embed is None:
                first.setdefault(r.key, r)
        pixels = dict(zip(first, self._map(self._pool, self._pixels, list(first.values()), deadline)))
        out: list[GenItem | ServiceError] = []
        for r in read:
            if isinstance(r, ServiceError):
                out.append(r)
            elif r.embed is not None:  # held here, so a later eviction cannot lose it
                out.append(GenItem(key=r.key, pixels=None, prompt=r.row.prompt, embed=r.embed, prompt_ids=r.prompt_ids))
            elif isinstance(pixels[r.key], ServiceError):
                out.append(_for_row(pixels[r.key], r.row.index))
            else:
                out.append(GenItem(key=r.key, pixels=pixels[r.key], prompt=r.row.prompt, prompt_ids=r.prompt_ids))
        return out

    def _read_row(self, row: Row, deadline: float | None = None) -> "_Read | ServiceError":
        """Check the prompt, tokenize it, fetch or decode the image's bytes and hash them."""
        try:
            limit = self.settings.max_prompt_tokens
            if len(row.prompt) > limit * 32:  # no tokenizer makes fewer tokens than that: skip the work
                raise PayloadTooLarge(
                    f"Row {row.index}: the prompt is {len(row.prompt)} characters, far over the limit of "
                    f"{limit} tokens; shorten it (for chat, drop the oldest turns).",
                    code="prompt_too_long",
                )
            prompt_ids = self.engine.tokenize([row.prompt])[0]
            if self.engine.image_token_id in prompt_ids:
                raise InvalidInput(
                    f"Row {row.index}: the prompt contains {self.engine.image_token!r}, which the model reserves "
                    "for the image's place in its input; remove it or write it another way.",
                    code="invalid_text",
                )
            n_tokens = len(prompt_ids)
            if n_tokens > self.settings.max_prompt_tokens:
                raise PayloadTooLarge(
                    f"Row {row.index}: the prompt is {n_tokens} tokens, over the limit of "
                    f"{self.settings.max_prompt_tokens}; shorten it (for chat, drop the oldest turns).",
                    code="prompt_too_long",
                )
            limits = self.settings.images
            if deadline is not None and is_url(row.image):  # a fetch gets no more time than the request has left
                left = deadline - time.monotonic()
                if left <= 0:
                    raise deadline_error()
                if left < limits.total_timeout_s:
                    limits = replace(limits, total_timeout_s=left)
            data = read_image_bytes(row.image, limits)
            key = hashlib.sha256(data).hexdigest()
            cache = self.engine.cache
            return _Read(row, prompt_ids, key, data, cache.get(key) if cache is not None else None)
        except ServiceError as err:
            return err.with_row(row.index)
        except Exception:  # noqa: BLE001 - a row must never take the request down with an internal error
            log.exception("Unexpected failure preparing row %d", row.index)
            return _unreadable(row.index)

    def _pixels(self, r: "_Read"):
        """Decode and resize one image -> uint8 pixels (the engine normalises whole batches), or the error."""
        try:
            image = decode_image(r.data, self.settings.images, draft=self.preprocessor.draft_size, heavy=self._heavy)
            return self.preprocessor.resize(image)
        except ServiceError as err:
            return err.with_row(r.row.index)
        except Exception:  # noqa: BLE001
            log.exception("Unexpected failure decoding the image of row %d", r.row.index)
            return _unreadable(r.row.index)


def _load_engine(settings: Settings) -> Engine:
    from . import model as model_loader

    loaded = model_loader.load(settings)
    cache = EmbedCache(settings.embed_cache_mb * 1024 * 1024) if settings.embed_cache_mb > 0 else None
    engine = Engine(
        loaded.model, loaded.processor, device=loaded.device, dtype=loaded.dtype,
        max_batch_size=settings.max_batch_size, cache=cache, static_cache=settings.static_cache,
        fast_greedy=settings.fast_greedy, cuda_graph_mb=settings.cuda_graph_mb,
    )
    if settings.warmup:
        started = time.perf_counter()
        engine.warm_up()
        log.info("Warm-up batch of %d rows took %.2f s", settings.max_batch_size, time.perf_counter() - started)
    return engine


@dataclass
class _Read:
    row: Row
    prompt_ids: list[int]
    key: str  # sha256 of the image bytes
    data: bytes
    embed: object | None  # the cached embedding, if there was one


def _unreadable(index: int) -> ServiceError:
    return ServiceError(
        f"Row {index}: the server failed to read this image; retry, or send it in another format.", row=index,
    )


def _for_row(err: ServiceError, index: int) -> ServiceError:
    """The error of the row that decoded a shared image, for another row with the same image."""
    if err.row == index:
        return err
    twin = copy.copy(err)
    twin.row = index
    return twin
