"""The baseline for bench/serve.py: the Azure catalog's way of serving BLIP-2.

One request at a time per worker (azmlinfsrv's default sync worker), fp32, the
transformers processor and one ``generate`` call for the whole request, no
limits, no batching across requests. Written for the benchmark only; it is not
part of the service.
"""

import base64
import io
import json
import os

import torch
from PIL import Image
from transformers import AutoProcessor, Blip2ForConditionalGeneration

model = processor = None


def init():
    global model, processor
    path = os.environ["BLIP2_MODEL"]
    processor = AutoProcessor.from_pretrained(path)
    processor.tokenizer.padding_side = "left"
    model = Blip2ForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()


def run(raw):
    body = json.loads(raw)
    data = body["input_data"]["data"]
    images = [Image.open(io.BytesIO(base64.b64decode(img))).convert("RGB") for img, _ in data]
    prompts = [text.strip() for _, text in data]
    inputs = processor(images=images, text=prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=body.get("parameters", {}).get("max_new_tokens", 30))
    texts = processor.tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    return [{"text": t.strip()} for t in texts]
