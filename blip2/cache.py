"""A thread-safe LRU cache of image embeddings, bounded in bytes.

Keys are content hashes of the encoded image bytes; values are the tensors the
language model reads for that image (``num_query_tokens x hidden``), so a second
question about the same picture skips the ViT and the Q-Former.
"""

from __future__ import annotations

import threading
from collections import OrderedDict


class EmbedCache:
    def __init__(self, max_bytes: int):
        """``max_bytes`` <= 0 disables the cache (every lookup misses, nothing is kept)."""
        self.max_bytes = max_bytes
        self._items: OrderedDict[str, object] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @staticmethod
    def _size(tensor) -> int:
        return tensor.numel() * tensor.element_size()

    def get(self, key: str):
        """The cached tensor for ``key`` (marked most recently used), or None."""
        with self._lock:
            value = self._items.get(key)
            if value is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return value

    def put(self, key: str, tensor) -> None:
        """Store ``tensor`` (detached); evicts least recently used entries to stay under max_bytes.

        A view into a bigger tensor (one row of a batch's output) is copied first: kept as a
        view it would hold the whole batch's memory while counting as one row.
        """
        size = self._size(tensor)
        if size > self.max_bytes:
            return
        tensor = tensor.detach()
        if tensor.untyped_storage().nbytes() > size:
            tensor = tensor.clone()
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= self._size(old)
            self._items[key] = tensor
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, evicted = self._items.popitem(last=False)
                self._bytes -= self._size(evicted)

    def __len__(self) -> int:
        return len(self._items)

    @property
    def nbytes(self) -> int:
        return self._bytes
