"""Write sample-request.json: two pictures as MIME base64 (as the Azure samples send them).

The pictures are drawn here (a red circle and a blue triangle), so the request works
offline against the demo model as well as against the real BLIP-2.
    python scripts/make_sample_request.py > sample-request.json
"""

import base64
import io
import json
import random

from blip2.shapes import make_image


def encoded(color: str, shape: str, seed: int) -> str:
    buf = io.BytesIO()
    make_image(color, shape, size=(160, 120), rng=random.Random(seed)).save(buf, "PNG", optimize=True)
    return base64.encodebytes(buf.getvalue()).decode("ascii")


if __name__ == "__main__":
    body = {
        "input_data": {
            "columns": ["image", "text"],
            "index": [0, 1],
            "data": [
                [encoded("red", "circle", 1), "Question: what color is the shape? Answer: "],
                [encoded("blue", "triangle", 2), "Question: what shape is this? Answer: "],
            ],
        }
    }
    print(json.dumps(body, indent=2))
