"""Turning decoded images into model input. One function, used by every stage that runs a model."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image


def image_to_tensor(im: Image.Image, size: int, mean, std) -> torch.Tensor:
    """RGB, resized to size x size, scaled to [0, 1] and normalised: (3, size, size) float32."""
    im = im.convert("RGB").resize((size, size), Image.BILINEAR)
    x = torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255.0)
    m = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return (x - m) / s
