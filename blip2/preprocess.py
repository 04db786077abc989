"""Fast image preprocessing: PIL image -> normalised pixel tensor, like the model's processor.

The BLIP image processor resizes to the model's square input with bicubic
resampling, rescales to [0, 1] and normalises with the CLIP mean and std. This
does the same with one Pillow resize and a few tensor ops, without the
processor's per-call overhead. The service keeps each row as uint8 after the
resize and normalises the whole batch at once on the model's device
(``resize`` and ``normalize``), so request threads run no torch kernels.
Big JPEGs are decoded in draft mode (DCT scaling
by 1/2, 1/4 or 1/8) to no less than 1.5x the model's input on each axis, which
cuts a 12-megapixel decode several times over; other huge images are first
shrunk by box-averaging (Pillow's ``reducing_gap``) to no less than twice the
target. Parity with the processor is tested (mean absolute difference of the
normalised pixels under 0.02; about 0.003 on 12 MP photos).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

_DRAFT_FACTOR = 1.5  # JPEG draft decoding keeps at least 1.5x the model's input per axis
_REDUCING_GAP = 2.0  # other formats: box-reduce to no less than 2x before the bicubic resize


@dataclass(frozen=True)
class Preprocessor:
    width: int
    height: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resample: int = Image.Resampling.BICUBIC
    rescale: float = 1 / 255

    @classmethod
    def from_processor(cls, processor) -> "Preprocessor":
        """Read size, resampling and normalisation from a Blip2Processor (or its image processor)."""
        ip = getattr(processor, "image_processor", processor)
        size = ip.size
        resample = getattr(ip, "resample", Image.Resampling.BICUBIC)
        return cls(
            width=int(size["width"]),
            height=int(size["height"]),
            mean=tuple(float(x) for x in ip.image_mean),
            std=tuple(float(x) for x in ip.image_std),
            resample=int(resample),
            rescale=float(getattr(ip, "rescale_factor", 1 / 255)),
        )

    @property
    def draft_size(self) -> tuple[int, int]:
        """The smallest size a JPEG may be draft-decoded to without hurting the final resize."""
        return (round(self.width * _DRAFT_FACTOR), round(self.height * _DRAFT_FACTOR))

    def resize(self, image: Image.Image) -> torch.Tensor:
        """RGB PIL image -> uint8 tensor 3 x height x width, resized like the processor (not normalised).

        Per-row work stays in Pillow and NumPy: no torch kernels run on the request
        threads, where they would fight the model's intra-op threads for the cores.
        """
        if image.mode != "RGB":
            image = image.convert("RGB")
        if image.size != (self.width, self.height):
            image = image.resize((self.width, self.height), self.resample, reducing_gap=_REDUCING_GAP)
        return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 pixels (... x 3 x H x W, any device) -> float32, rescaled and normalised as the processor does."""
        shape = (3, 1, 1)
        mean = torch.tensor(self.mean, dtype=torch.float32, device=pixels.device).view(shape)
        std = torch.tensor(self.std, dtype=torch.float32, device=pixels.device).view(shape)
        out = pixels.to(torch.float32, copy=True)  # always a fresh tensor: the steps below work in place
        # in place: the same arithmetic as ``(x * rescale - mean) / std`` without three big temporaries
        return out.mul_(self.rescale).sub_(mean).div_(std)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        """RGB PIL image -> float32 tensor 3 x height x width, normalised."""
        return self.normalize(self.resize(image))
