"""Training data: image-caption folders as deterministic, resumable ``tf.data`` pipelines.

Every element is keyed by its global index ``i`` in the endless stream: the
image order, the augmentation and the diffusion noise of element ``i`` depend
only on ``(seed, i)``. So a run resumed at step ``s`` rebuilds the stream and
skips ``s * batch_size`` indices (cheaply: before any decoding) and sees
exactly what the uninterrupted run would have seen, on any number of replicas:
``distributed_batches`` hands replica ``r`` of step ``s`` its slice of the
indices ``s * batch_size ...``, so the global batch of a step never depends on
the strategy.

With a latent cache (``cache_latents``) the VAE posterior of every image
(centre crop, no flip) is computed once and stored as ``.npy``; the stream then
yields ``latent_mean``/``latent_logvar`` instead of ``pixels``.
"""

import concurrent.futures
import hashlib
import json
import logging
import os
import warnings
from pathlib import Path

import numpy as np
import tensorflow as tf
from PIL import Image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
METADATA_FILE = "metadata.jsonl"
# Files in a data folder that are not training images and are never warned about.
_IGNORED_SUFFIXES = (".txt", ".jsonl", ".json", ".md", ".csv")

log = logging.getLogger(__name__)


class DatasetError(ValueError):
    """A training data folder that cannot be used."""


def _check_image(path):
    """None if ``path`` decodes completely as an image, else the error (as text).

    ``verify()`` alone misses truncated JPEGs; ``load()`` decodes every pixel.
    """
    try:
        with Image.open(path) as image:
            image.verify()
        with Image.open(path) as image:
            image.load()
            if image.width < 1 or image.height < 1:
                return "empty image"
        return None
    except Exception as error:  # PIL raises many types for corrupt files
        return f"{type(error).__name__}: {error}"


def read_captions(folder):
    """(image paths, captions, skipped count) of a folder: ``metadata.jsonl`` or ``<stem>.txt`` files.

    ``metadata.jsonl`` lines are ``{"file_name": ..., "text": ...}``; without it,
    every image needs a ``<stem>.txt`` caption beside it. Images without a
    caption (no ``.txt``, or not named in ``metadata.jsonl``), images that do not
    decode completely, and metadata lines that are not JSON or name no
    readable file are skipped with a warning and counted. Raises
    ``DatasetError`` if nothing usable is left.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError(f"{folder}: no such data folder")
    pairs, skipped = [], 0
    metadata = folder / METADATA_FILE
    images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if metadata.is_file():
        named = set()
        for number, line in enumerate(metadata.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                path, text = folder / record["file_name"], record["text"]
                if not isinstance(text, str):
                    raise TypeError(f"text is {type(text).__name__}, not a string")
            except (json.JSONDecodeError, KeyError, TypeError) as error:
                warnings.warn(f"{metadata}:{number}: skipped ({error!r})")
                skipped += 1
                continue
            named.add(path.resolve())
            pairs.append((path, text))
        for path in images:
            if path.resolve() not in named:
                warnings.warn(f"{path}: no caption in {METADATA_FILE}, skipped")
                skipped += 1
    else:
        for path in images:
            caption = path.with_suffix(".txt")
            if not caption.is_file():
                warnings.warn(f"{path}: no caption file {caption.name}, skipped")
                skipped += 1
                continue
            pairs.append((path, caption.read_text(encoding="utf-8").strip()))
    # Decoding every image once up front keeps a corrupt file from failing the run later.
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        errors = list(pool.map(_check_image, [path for path, _ in pairs]))
    good = []
    for (path, text), error in zip(pairs, errors):
        if error is None:
            good.append((path, text))
        else:
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


# ----------------------------------------------------------------------------
# Latent cache
# ----------------------------------------------------------------------------


def cache_latents(paths, encode, cache_dir, resolution, fingerprint="", batch_size=8, progress=None):
    """The VAE posterior of every image, computed once: a list of ``.npy`` files parallel to ``paths``.

    Each file holds float32 (2, h, w, c): the posterior mean and log-variance
    of the image at ``resolution`` (short side resized, centre crop, no flip).
    ``encode(pixels (B, H, W, 3) in [-1, 1]) -> (mean, logvar)``. A file is named
    by a hash of the image's path, size and modification time, the resolution
    and ``fingerprint`` (identify the VAE weights with it), so a changed image
    or VAE gets a new file and existing ones are reused. Files are written to
    a temporary name and renamed, so an interrupted run leaves no half file.
    """
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    files, todo = [], []
    for path in paths:
        stat = Path(path).stat()
        key = f"{Path(path).resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{resolution}|{fingerprint}"
        file = cache_dir / (hashlib.sha1(key.encode()).hexdigest()[:24] + ".npy")
        files.append(str(file))
        if not file.is_file():
            todo.append((path, file))
    for start in range(0, len(todo), batch_size):
        chunk = todo[start:start + batch_size]
        pixels = np.stack([_load_image(path, resolution, False, False, 0) for path, _ in chunk])
        mean, logvar = encode(tf.constant(pixels))
        mean, logvar = np.asarray(mean, np.float32), np.asarray(logvar, np.float32)
        for k, (_, file) in enumerate(chunk):
            temporary = file.with_name(f".{file.stem}.{os.getpid()}.tmp.npy")
            np.save(temporary, np.stack([mean[k], logvar[k]]))
            os.replace(temporary, file)
        if progress is not None:
            progress(min(start + batch_size, len(todo)), len(todo))
    return files


# ----------------------------------------------------------------------------
# The stream
# ----------------------------------------------------------------------------


class TrainingData:
    """An image-caption folder as an endless, index-keyed stream of training elements.

    Elements: ``pixels`` (resolution², 3) in [-1, 1] (or ``latent_mean`` and
    ``latent_logvar`` with ``latent_files`` from ``cache_latents``), ``token_ids``
    (77,) and the ``diffusion_noise`` fields. ``caption_fn`` rewrites captions
    (e.g. to add a textual-inversion token). ``skipped`` counts unusable files.
    ``scan``: the folder's ``read_captions`` result, if already read.
    """

    def __init__(self, folder, tokenizer, resolution, latent_shape, *, seed=0, random_crop=False, flip=False,
                 num_train_timesteps=1000, caption_fn=None, scan=None):
        self.folder = Path(folder)
        self.paths, self.captions, self.skipped = scan if scan is not None else read_captions(folder)
        if caption_fn is not None:
            self.captions = [caption_fn(text) for text in self.captions]
        self.token_ids = tokenizer(self.captions)
        self.resolution, self.latent_shape = resolution, tuple(latent_shape)
        self.seed, self.random_crop, self.flip = seed, random_crop, flip
        self.num_train_timesteps = num_train_timesteps
        self.latent_files = None

    def __len__(self):
        return len(self.paths)

    def use_latent_cache(self, files):
        """Yield cached ``latent_mean``/``latent_logvar`` (files from ``cache_latents``) instead of pixels."""
        if len(files) != len(self.paths):
            raise ValueError(f"{len(files)} cache files for {len(self.paths)} images")
        self.latent_files = list(files)

    def elements(self, indices):
        """The elements of a dataset of global indices (int64)."""
        count, seed = len(self.paths), self.seed
        token_ids = tf.constant(self.token_ids)
        paths, latent_files = self.paths, self.latent_files
        resolution, random_crop, flip = self.resolution, self.random_crop, self.flip

        def load(index):
            epoch, position = index // count, index % count
            if count > 1:
                order = tf.random.experimental.index_shuffle(position, tf.stack([tf.cast(seed, tf.int64), epoch]), count - 1)
            else:
                order = position
            element = {"token_ids": tf.gather(token_ids, order)}
            if latent_files is None:
                pixels = tf.numpy_function(
                    lambda o, i: _load_image(paths[int(o)], resolution, random_crop, flip, (seed, int(i))),
                    [order, index], tf.float32,
                )
                pixels.set_shape((resolution, resolution, 3))
                element["pixels"] = pixels
            else:
                moments = tf.numpy_function(lambda o: np.load(latent_files[int(o)]), [order], tf.float32)
                moments.set_shape((2, *self.latent_shape))
                element["latent_mean"], element["latent_logvar"] = moments[0], moments[1]
            element.update(diffusion_noise(index, seed, self.latent_shape, self.num_train_timesteps))
            return element

        return indices.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)

    def stream(self, start=0):
        """The endless per-element stream from global index ``start``."""
        return self.elements(tf.data.Dataset.range(start, np.iinfo(np.int64).max))


def distributed_batches(elements, batch_size, strategy, start_step=0):
    """An iterator over the global batches of steps ``start_step, start_step + 1, ...``, distributed.

    ``elements(indices dataset) -> element dataset`` (``TrainingData.elements``).
    Step ``s`` takes the indices ``s * batch_size ... (s + 1) * batch_size - 1``;
    each input pipeline (one per worker) builds only its own contiguous slice
    of them and splits it among its replicas, so every worker decodes only
    its share and the global batch is the same on any strategy.
    """
    replicas = strategy.num_replicas_in_sync
    if batch_size % replicas:
        raise ValueError(f"batch size {batch_size} is not divisible by the {replicas} replicas")
    per_replica = batch_size // replicas

    def dataset_fn(context):
        pipelines, pipeline = context.num_input_pipelines, context.input_pipeline_id
        per_pipeline = batch_size // pipelines
        offset = pipeline * per_pipeline
        steps = tf.data.Dataset.range(start_step, np.iinfo(np.int64).max // (2 * batch_size))
        indices = steps.flat_map(
            lambda s: tf.data.Dataset.range(s * batch_size + offset, s * batch_size + offset + per_pipeline)
        )
        return elements(indices).batch(per_replica, drop_remainder=True).prefetch(2)

    return iter(strategy.distribute_datasets_from_function(dataset_fn))
