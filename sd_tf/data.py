"""Training data: image-caption folders as deterministic, resumable ``tf.data`` pipelines.

Every element is keyed by its global index ``i`` in the endless stream: the
image order, the augmentation and the diffusion noise of element ``i`` depend
only on ``(seed, i)``. So a run resumed at step ``s`` rebuilds the stream and
skips ``s * batch_size`` indices (cheaply: before any decoding) and sees
exactly what the uninterrupted run would have seen, on any number of replicas.
"""

import json
import logging
import warnings
from pathlib import Path

import numpy as np
import tensorflow as tf
from PIL import Image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
METADATA_FILE = "metadata.jsonl"

log = logging.getLogger(__name__)


class DatasetError(ValueError):
    """A training data folder that cannot be used."""


def read_captions(folder):
    """(image paths, captions) of a folder: ``metadata.jsonl`` (file_name, text) or ``<stem>.txt`` files.

    Images without a caption, unreadable images and metadata lines that name
    no file are skipped with a warning; the count is returned as the third item.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError(f"{folder}: no such data folder")
    pairs, skipped = [], 0
    metadata = folder / METADATA_FILE
    if metadata.is_file():
        for number, line in enumerate(metadata.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                path, text = folder / record["file_name"], str(record["text"])
            except (json.JSONDecodeError, KeyError, TypeError) as error:
                warnings.warn(f"{metadata}:{number}: skipped ({error!r})")
                skipped += 1
                continue
            pairs.append((path, text))
    else:
        for path in sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
            caption = path.with_suffix(".txt")
            if not caption.is_file():
                warnings.warn(f"{path}: no caption file {caption.name}, skipped")
                skipped += 1
                continue
            pairs.append((path, caption.read_text(encoding="utf-8").strip()))
    good = []
    for path, text in pairs:
        try:
            with Image.open(path) as image:
                image.verify()
            good.append((path, text))
        except Exception as error:  # PIL raises many types for corrupt files
            warnings.warn(f"{path}: unreadable image, skipped ({error})")
            skipped += 1
    if not good:
        raise DatasetError(f"{folder}: no usable image-caption pairs ({skipped} skipped)")
    paths, captions = zip(*good)
    return list(map(str, paths)), list(captions), skipped


def _load_image(path, resolution, random_crop, flip, seed):
    """Decodes, resizes the short side to ``resolution`` and crops; float32 in [-1, 1]."""
    with Image.open(path) as image:
        image = image.convert("RGB")
        scale = resolution / min(image.size)
        size = (max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale)))
        image = image.resize(size, Image.BICUBIC)
    rng = np.random.default_rng(seed)
    spare_x, spare_y = image.width - resolution, image.height - resolution
    left = int(rng.integers(spare_x + 1)) if random_crop else spare_x // 2
    top = int(rng.integers(spare_y + 1)) if random_crop else spare_y // 2
    pixels = np.asarray(image.crop((left, top, left + resolution, top + resolution)), np.float32)
    if flip and rng.random() < 0.5:
        pixels = pixels[:, ::-1]
    return pixels / 127.5 - 1.0


def diffusion_noise(index, seed, latent_shape, num_train_timesteps):
    """Per-element training randomness from ``(seed, index)``: noise, posterior noise, timestep, offset noise."""
    keys = tf.random.experimental.stateless_split(tf.stack([tf.cast(seed, tf.int64), index]), 4)
    return {
        "noise": tf.random.stateless_normal(latent_shape, keys[0]),
        "latent_noise": tf.random.stateless_normal(latent_shape, keys[1]),
        "timestep": tf.random.stateless_uniform((), keys[2], 0, num_train_timesteps, dtype=tf.int32),
        "offset_noise": tf.random.stateless_normal((1, 1, latent_shape[-1]), keys[3]),
    }


def folder_dataset(folder, tokenizer, resolution, latent_shape, *, seed=0, start=0, random_crop=False,
                   flip=False, num_train_timesteps=1000):
    """The endless per-element stream of a caption folder, from global index ``start``.

    Elements: ``pixels`` (resolution², 3) in [-1, 1], ``token_ids`` (77,) and the
    ``diffusion_noise`` fields. Returns (dataset, number of skipped files).
    """
    paths, captions, skipped = read_captions(folder)
    token_ids = tokenizer(captions)
    count = len(paths)

    def load(index):
        epoch, position = index // count, index % count
        order = tf.random.experimental.index_shuffle(position, [seed, epoch, 0], count - 1) if count > 1 else position
        pixels = tf.numpy_function(
            lambda o, i: _load_image(paths[int(o)], resolution, random_crop, flip, (seed, int(i))),
            [order, index], tf.float32,
        )
        pixels.set_shape((resolution, resolution, 3))
        element = {"pixels": pixels, "token_ids": tf.gather(token_ids, order)}
        element.update(diffusion_noise(index, seed, latent_shape, num_train_timesteps))
        return element

    dataset = tf.data.Dataset.range(start, np.iinfo(np.int64).max).map(load, num_parallel_calls=tf.data.AUTOTUNE)
    return dataset, skipped
