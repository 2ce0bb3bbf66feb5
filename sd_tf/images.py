"""Image inputs and outputs: paths, PIL images and arrays to float arrays, and back."""

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError


def load_image(image, mode="RGB"):
    """A path, PIL image or HWC array (uint8, or float in [0, 1]) as a float32 array in [0, 1].

    ``mode`` "RGB" gives (H, W, 3); "L" (masks) gives (H, W).
    """
    if isinstance(image, (str, Path)):
        try:
            with Image.open(image) as opened:
                image = opened.convert(mode)
        except (OSError, UnidentifiedImageError) as error:
            raise ValueError(f"{image}: cannot read image ({error})") from error
    if isinstance(image, Image.Image):
        image = image.convert(mode)
    array = np.asarray(image)
    if array.dtype == np.uint8:
        array = array.astype(np.float32) / 255.0
    array = np.asarray(array, np.float32)
    channels = 3 if mode == "RGB" else 1
    if mode == "L" and array.ndim == 3:
        array = array.mean(axis=-1) if array.shape[-1] == 3 else array[..., 0]
    if array.ndim != (3 if channels == 3 else 2) or (channels == 3 and array.shape[-1] != 3):
        raise ValueError(f"expected an {'HxWx3 image' if channels == 3 else 'HxW mask'}, got shape {array.shape}")
    if not np.isfinite(array).all() or array.min() < 0 or array.max() > 1:
        raise ValueError("float images must hold finite values in [0, 1]")
    return array


def to_uint8(images):
    """Float images in [0, 1] -> uint8, rounding as diffusers' ``numpy_to_pil`` does."""
    return (np.clip(images, 0.0, 1.0) * 255).round().astype(np.uint8)
