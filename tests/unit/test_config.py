import pytest

from blip2.config import Settings


def test_defaults_without_environment():
    s = Settings.from_env({})
    assert s.model is None and s.dtype is None and s.max_batch_size == 16
    assert s.images.allow_private_urls is False and s.embed_cache_mb > 0


def test_values_are_read_and_typed():
    s = Settings.from_env(
        {
            "BLIP2_MODEL": " demo ",
            "BLIP2_DTYPE": "bfloat16",
            "BLIP2_MAX_BATCH_SIZE": "32",
            "BLIP2_BATCH_WAIT_MS": "2.5",
            "BLIP2_BATCH_MAX_WAIT_MS": "40",
            "BLIP2_MAX_IMAGE_MB": "1.5",
            "BLIP2_ALLOW_PRIVATE_URLS": "yes",
            "BLIP2_URL_ALLOWED_HOSTS": "Example.com., .cdn.example.org",
            "BLIP2_MAX_NEW_TOKENS_CAP": "64",
            "BLIP2_EMBED_CACHE_MB": "0",
            "BLIP2_FAST_GREEDY": "0",
        }
    )
    assert s.model == "demo" and s.dtype == "bfloat16" and s.max_batch_size == 32 and s.batch_wait_ms == 2.5
    assert s.batch_max_wait_ms == 40.0 and Settings().batch_max_wait_ms == 50.0
    assert s.images.max_bytes == int(1.5 * 1024 * 1024) and s.images.allow_private_urls
    assert s.images.allowed_hosts == ("example.com", ".cdn.example.org")
    assert s.caps.max_new_tokens == 64 and s.embed_cache_mb == 0
    assert not s.fast_greedy and Settings.from_env({}).fast_greedy


@pytest.mark.parametrize(
    "name,value",
    [
        ("BLIP2_DTYPE", "fp16"),
        ("BLIP2_MAX_BATCH_SIZE", "0"),
        ("BLIP2_MAX_BATCH_SIZE", "many"),
        ("BLIP2_BATCH_WAIT_MS", "-1"),
        ("BLIP2_BATCH_WAIT_MS", "nan"),
        ("BLIP2_BATCH_MAX_WAIT_MS", "-5"),
        ("BLIP2_ALLOW_PRIVATE_URLS", "maybe"),
        ("BLIP2_FAST_GREEDY", "fast"),
        ("BLIP2_DEVICE", "tpu"),
        ("BLIP2_MAX_IMAGE_MB", "0"),
    ],
)
def test_bad_values_name_the_variable(name, value):
    with pytest.raises(ValueError, match=name):
        Settings.from_env({name: value})
