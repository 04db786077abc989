import threading

import torch

from blip2.cache import EmbedCache


def t(n, fill=0.0):
    return torch.full((n,), fill, dtype=torch.float32)  # 4 bytes per element


def test_hit_miss_and_lru_eviction_by_bytes():
    cache = EmbedCache(max_bytes=3 * 40)
    for key in "abc":
        cache.put(key, t(10))
    assert cache.get("a") is not None  # a is now most recent
    cache.put("d", t(10))  # evicts b, the least recently used
    assert cache.get("b") is None and cache.get("c") is not None and cache.get("a") is not None
    assert cache.nbytes <= 120 and len(cache) == 3
    assert cache.hits == 3 and cache.misses == 1


def test_oversize_entries_are_not_kept_and_zero_disables():
    cache = EmbedCache(max_bytes=16)
    cache.put("big", t(100))
    assert cache.get("big") is None and cache.nbytes == 0
    off = EmbedCache(0)
    off.put("a", t(1))
    assert off.get("a") is None


def test_replacing_a_key_keeps_the_byte_count_right():
    cache = EmbedCache(max_bytes=1000)
    cache.put("a", t(10))
    cache.put("a", t(20))
    assert cache.nbytes == 80 and len(cache) == 1


def test_concurrent_use_keeps_the_bound():
    cache = EmbedCache(max_bytes=50 * 40)

    def worker(offset):
        for i in range(300):
            cache.put(f"{offset}-{i % 70}", t(10, i))
            cache.get(f"{offset}-{(i * 7) % 70}")

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert cache.nbytes <= cache.max_bytes and cache.nbytes == 40 * len(cache)


def test_a_row_of_a_batch_is_stored_without_the_rest_of_the_batch():
    batch = torch.arange(4 * 10, dtype=torch.float32).view(4, 10)  # e.g. four images' embeddings
    cache = EmbedCache(max_bytes=1000)
    for i, row in enumerate(batch):
        cache.put(str(i), row)
    stored = cache.get("2")
    assert torch.equal(stored, batch[2])
    assert stored.untyped_storage().nbytes() == 40  # its own row only, not the 160-byte batch
    own = t(10)
    cache.put("own", own)
    assert cache.get("own").untyped_storage().data_ptr() == own.untyped_storage().data_ptr()  # not copied
