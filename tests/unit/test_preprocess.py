"""Fast preprocessing matches the model's own image processor."""

import io
import random

import pytest
import torch
from PIL import Image, ImageDraw

from blip2.config import ImageLimits
from blip2.images import decode_image
from blip2.preprocess import Preprocessor
from blip2.tiny import TinySizes, build_processor, build_tokenizer

MAD_BOUND = 0.02  # mean absolute difference of normalised pixels we hold


@pytest.fixture(scope="module")
def processor():
    return build_processor(build_tokenizer(), TinySizes())


def photo(size, seed=0, fmt="JPEG") -> bytes:
    rng = random.Random(seed)
    w, h = size
    image = Image.new("RGB", size, (rng.randint(150, 255), rng.randint(150, 255), rng.randint(150, 255)))
    draw = ImageDraw.Draw(image)
    for _ in range(40):
        x, y, r = rng.randrange(w), rng.randrange(h), rng.randint(w // 40 + 1, w // 5 + 2)
        draw.ellipse([x - r, y - r, x + r, y + r], fill=(rng.randrange(256), rng.randrange(256), rng.randrange(256)))
    buf = io.BytesIO()
    image.save(buf, fmt, **({"quality": 85} if fmt == "JPEG" else {}))
    return buf.getvalue()


@pytest.mark.parametrize(
    "size,fmt", [((4032, 3024), "JPEG"), ((3024, 4032), "JPEG"), ((1920, 1080), "PNG"), ((640, 480), "JPEG"), ((150, 90), "PNG"), ((224, 224), "PNG")]
)
def test_pixels_match_the_processor(processor, size, fmt):
    data = photo(size, seed=sum(size), fmt=fmt)
    fast = Preprocessor.from_processor(processor)
    got = fast(decode_image(data, ImageLimits(), draft=fast.draft_size))
    want = processor.image_processor(Image.open(io.BytesIO(data)).convert("RGB"), return_tensors="pt")["pixel_values"][0]
    assert got.shape == want.shape == (3, 224, 224) and got.dtype == torch.float32
    assert float((got - want).abs().mean()) < MAD_BOUND


def test_reads_size_and_normalisation_from_the_processor(processor):
    fast = Preprocessor.from_processor(processor)
    assert (fast.width, fast.height) == (224, 224) and fast.draft_size == (336, 336)
    white = fast(Image.new("RGB", (224, 224), (255, 255, 255)))
    expected = (1.0 - torch.tensor(fast.mean)) / torch.tensor(fast.std)
    assert torch.allclose(white[:, 0, 0], expected, atol=1e-6)


def test_uint8_rows_normalised_as_a_batch_equal_the_per_image_path(processor):
    """The service keeps rows as uint8 and normalises the batch later: bit for bit the same pixels."""
    fast = Preprocessor.from_processor(processor)
    images = [decode_image(photo(size, seed=i), ImageLimits(), draft=fast.draft_size)
              for i, size in enumerate([(640, 480), (150, 90), (1920, 1080)])]
    rows = [fast.resize(im) for im in images]
    assert all(r.dtype == torch.uint8 and r.shape == (3, 224, 224) for r in rows)
    batch = fast.normalize(torch.stack(rows))
    assert batch.dtype == torch.float32
    for got, im in zip(batch, images):
        assert torch.equal(got, fast(im))
    before = rows[0].clone()
    fast.normalize(rows[0])
    assert torch.equal(rows[0], before)  # the input is never modified
