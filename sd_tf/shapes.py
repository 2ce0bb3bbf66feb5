"""Procedural "shapes" dataset and an analyzer that judges generated images.

Every image is 64x64 RGB uint8 and shows one filled shape (circle, square or
triangle) in one palette colour on a plain background of another palette
colour, captioned ``"a {colour} {shape} on a {background} background"``.
A shape of size s (10..24 px) fills a 2s x 2s box: a circle of radius s, a
square of half-side s, or an upright isosceles triangle with its apex at the
top middle of the box and its base (2s wide) along the box's bottom edge.
Edges are anti-aliased by 4x4 supersampling.

Some (colour, background, shape) combinations are held out of training so a
model trained on this data can be tested on captions it has never seen.

``analyze`` reads an image back into (background, colour, shape); it is meant
for scoring images produced by a model, so it tolerates blur, noise, small
colour shifts and compression artefacts.

Only numpy and Pillow are used; nothing here imports TensorFlow.
"""

import re

import numpy as np
from PIL import Image, ImageFilter

IMAGE_SIZE = 64
MIN_SIZE = 10  # smallest radius / half-side, in pixels
MAX_SIZE = 24  # largest radius / half-side, in pixels (inclusive)
MARGIN = 1  # pixels of pure background kept between the shape and the image edge
SUPERSAMPLING = 4  # coverage samples per pixel along each axis (edge anti-aliasing)

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 170, 60),
    "blue": (40, 70, 220),
    "yellow": (240, 210, 30),
    "purple": (140, 60, 190),
    "orange": (245, 130, 20),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle")
HELD_OUT_EVERY = 5  # combinations whose index is a multiple of this are held out


# --------------------------------------------------------------------------
# Combinations and captions
# --------------------------------------------------------------------------


def all_combinations():
    """All 168 (colour, background, shape) triples with colour != background.

    Ordered by colour, then background (both in ``COLOURS`` order), then shape
    (in ``SHAPES`` order).
    """
    return [
        (colour, background, shape)
        for colour in COLOURS
        for background in COLOURS
        if colour != background
        for shape in SHAPES
    ]


HELD_OUT = tuple(
    combination
    for index, combination in enumerate(all_combinations())
    if index % HELD_OUT_EVERY == 0
)
TRAIN_COMBINATIONS = tuple(
    combination for combination in all_combinations() if combination not in HELD_OUT
)


def is_held_out(colour, background, shape):
    """True if this (colour, background, shape) never appears in training.

    Arguments follow the combination tuple order, so ``is_held_out(*label)``
    works on labels from ``random_example``.
    """
    return (colour, background, shape) in HELD_OUT


def caption(colour, shape, background):
    """The caption for one image, e.g. ``"a red circle on a green background"``."""
    return f"a {colour} {shape} on a {background} background"


_CAPTION_PATTERN = re.compile(r"a (\w+) (\w+) on a (\w+) background")


def parse_caption(text):
    """Invert ``caption``: return (colour, shape, background).

    Raises ValueError if ``text`` is not a caption of this dataset.
    """
    match = _CAPTION_PATTERN.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"not a shapes caption: {text!r}")
    colour, shape, background = match.groups()
    if colour not in COLOURS or background not in COLOURS or shape not in SHAPES:
        raise ValueError(f"unknown colour or shape in caption: {text!r}")
    return colour, shape, background


# --------------------------------------------------------------------------
# Drawing
# --------------------------------------------------------------------------


def _inside(shape, x, y, size, center):
    """Boolean mask: which points (x, y) lie inside the shape.

    Every shape fills the box ``center ± size``: a circle of radius ``size``,
    a square of half-side ``size``, or an upright isosceles triangle with its
    apex at the middle of the box's top edge and its base on the box's bottom
    edge (base and height both ``2 * size``).
    """
    cx, cy = center
    if shape == "circle":
        return (x - cx) ** 2 + (y - cy) ** 2 <= size**2
    if shape == "square":
        return (np.abs(x - cx) <= size) & (np.abs(y - cy) <= size)
    if shape == "triangle":
        top, bottom = cy - size, cy + size
        # The half-width grows from 0 at the apex to `size` at the base.
        return (y >= top) & (y <= bottom) & (np.abs(x - cx) <= (y - top) / 2)
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def draw(colour, shape, background, size, center):
    """Render one image: a uint8 array of shape (64, 64, 3).

    ``center`` is (x, y) in continuous pixel coordinates (pixel (i, j) covers
    [i, i+1) x [j, j+1)), ``size`` is the radius or half-side in pixels, and
    the box ``center ± size`` must lie inside the image. Edges are
    anti-aliased by supersampling: each pixel blends the two colours by the
    fraction of its SUPERSAMPLING x SUPERSAMPLING sample points inside the
    shape.
    """
    if colour == background:
        raise ValueError(f"shape and background are both {colour!r}")
    cx, cy = center
    if min(cx, cy) - size < 0 or max(cx, cy) + size > IMAGE_SIZE:
        raise ValueError(f"{shape} of size {size} at {center} leaves the image")

    offsets = (np.arange(SUPERSAMPLING) + 0.5) / SUPERSAMPLING
    samples = (np.arange(IMAGE_SIZE)[:, None] + offsets).ravel()
    y, x = np.meshgrid(samples, samples, indexing="ij")
    inside = _inside(shape, x, y, size, center)
    coverage = inside.reshape(
        IMAGE_SIZE, SUPERSAMPLING, IMAGE_SIZE, SUPERSAMPLING
    ).mean(axis=(1, 3))[..., None]

    foreground = np.array(COLOURS[colour], dtype=np.float64)
    backdrop = np.array(COLOURS[background], dtype=np.float64)
    image = coverage * foreground + (1 - coverage) * backdrop
    return np.round(image).astype(np.uint8)


def random_example(rng, combinations=TRAIN_COMBINATIONS):
    """Draw one random example: (image, caption, (colour, background, shape)).

    The combination is uniform over ``combinations``; the size is a uniform
    integer in [MIN_SIZE, MAX_SIZE]; the center is a uniform integer point
    that keeps the shape at least MARGIN pixels from every edge. Only ``rng``
    (a ``np.random.Generator``) supplies randomness, so a seed fixes the output.
    """
    colour, background, shape = combinations[rng.integers(len(combinations))]
    size = int(rng.integers(MIN_SIZE, MAX_SIZE + 1))
    cx, cy = rng.integers(MARGIN + size, IMAGE_SIZE - MARGIN - size + 1, size=2)
    image = draw(colour, shape, background, size, (int(cx), int(cy)))
    return image, caption(colour, shape, background), (colour, background, shape)


def sample_batch(rng, n, combinations=TRAIN_COMBINATIONS):
    """Draw ``n`` examples: (images uint8 (n, 64, 64, 3), captions, labels).

    ``captions`` is a list of n strings and ``labels`` a list of n
    (colour, background, shape) tuples. To feed tf.data::

        rng = np.random.default_rng(seed)
        tf.data.Dataset.from_generator(
            lambda: (sample_batch(rng, n)[:2] for _ in itertools.count()),
            output_signature=(
                tf.TensorSpec((n, IMAGE_SIZE, IMAGE_SIZE, 3), tf.uint8),
                tf.TensorSpec((n,), tf.string),
            ),
        )
    """
    examples = [random_example(rng, combinations) for _ in range(n)]
    images, captions, labels = zip(*examples)
    return np.stack(images), list(captions), list(labels)


# --------------------------------------------------------------------------
# Analyzer
# --------------------------------------------------------------------------

MEDIAN_FILTER_SIZE = 3  # denoising window (pixels) applied before segmenting
EDGE_THRESHOLD = 0.5  # mask = distance above this fraction of the shape's level
MIN_CONTRAST = 12.0  # CIELAB distance below which no shape is seen
MIN_SHAPE_PIXELS = 20  # smaller masks count as "no shape"
BLOB_SEED_RADIUS = 4  # box-filter radius used to find the shape's densest spot
CORNER_FRACTION = 0.2  # corner patches of the shape's bounding box: this fraction of its height and width
# Typical (fill of the two top corner patches, fill of the two bottom ones) of
# each shape drawn by ``draw`` and slightly blurred (Gaussian, 1 px), as
# segmented below: a circle leaves all four corners nearly empty, a square
# fills them, an (apex-up) triangle fills only the bottom ones. Unlike the
# box's overall fill ratio, this still tells a square whose sides bow in
# from a circle.
SHAPE_SIGNATURES = {
    "circle": (0.13, 0.13),
    "square": (0.98, 0.98),
    "triangle": (0.0, 0.87),
}


def _to_lab(rgb):
    """Convert sRGB values (0..255, last axis = channels) to CIELAB (D65)."""
    linear = np.asarray(rgb, dtype=np.float64) / 255
    linear = np.where(
        linear <= 0.04045, linear / 12.92, ((linear + 0.055) / 1.055) ** 2.4
    )
    rgb_to_xyz = np.array(
        [
            [0.4124, 0.3576, 0.1805],
            [0.2126, 0.7152, 0.0722],
            [0.0193, 0.1192, 0.9505],
        ]
    )
    xyz = linear @ rgb_to_xyz.T / np.array([0.95047, 1.0, 1.08883])
    delta = 6 / 29
    f = np.where(xyz > delta**3, np.cbrt(xyz), xyz / (3 * delta**2) + 4 / 29)
    return np.stack(
        [
            116 * f[..., 1] - 16,
            500 * (f[..., 0] - f[..., 1]),
            200 * (f[..., 1] - f[..., 2]),
        ],
        axis=-1,
    )


_PALETTE_NAMES = tuple(COLOURS)
_PALETTE_LAB = _to_lab(np.array([COLOURS[name] for name in _PALETTE_NAMES]))


def _nearest_colour(rgb, exclude=None):
    """Name of the palette colour closest to ``rgb`` in CIELAB, skipping ``exclude``."""
    distances = np.linalg.norm(_PALETTE_LAB - _to_lab(rgb), axis=-1)
    candidates = [i for i, name in enumerate(_PALETTE_NAMES) if name != exclude]
    return _PALETTE_NAMES[min(candidates, key=lambda i: distances[i])]


def _grow(seeds, allowed):
    """The pixels of ``allowed`` 4-connected to ``seeds`` (flood fill)."""
    region = seeds & allowed
    while True:
        grown = region.copy()
        grown[1:] |= region[:-1]
        grown[:-1] |= region[1:]
        grown[:, 1:] |= region[:, :-1]
        grown[:, :-1] |= region[:, 1:]
        grown &= allowed
        if np.array_equal(grown, region):
            return region
        region = grown


def _main_blob(mask):
    """The connected part of ``mask`` around its densest spot, holes filled."""
    density = Image.fromarray(mask.astype(np.uint8) * 255).filter(
        ImageFilter.BoxBlur(BLOB_SEED_RADIUS)
    )
    densest = np.argmax(np.where(mask, np.asarray(density, dtype=np.int32), -1))
    seed = np.zeros_like(mask)
    seed[np.unravel_index(densest, mask.shape)] = True
    blob = _grow(seed, mask)

    edge = np.zeros_like(mask)
    edge[[0, -1], :] = True
    edge[:, [0, -1]] = True
    outside = _grow(edge, ~blob)
    return ~outside


def _classify_mask(mask):
    """Name the shape in a boolean mask by its nearest SHAPE_SIGNATURES entry."""
    rows, cols = np.nonzero(mask)
    box = mask[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
    height, width = max(1, round(box.shape[0] * CORNER_FRACTION)), max(1, round(box.shape[1] * CORNER_FRACTION))
    top = (box[:height, :width].mean() + box[:height, -width:].mean()) / 2
    bottom = (box[-height:, :width].mean() + box[-height:, -width:].mean()) / 2
    return min(
        SHAPE_SIGNATURES,
        key=lambda name: np.hypot(top - SHAPE_SIGNATURES[name][0], bottom - SHAPE_SIGNATURES[name][1]),
    )


def analyze(image):
    """Read an image back into ``dict(background=..., colour=..., shape=...)``.

    1. Denoise with a MEDIAN_FILTER_SIZE median filter.
    2. Background: the median colour of the outermost pixel ring, matched to
       the nearest palette colour (CIELAB distance).
    3. Shape mask: pixels whose CIELAB distance from that measured border
       colour exceeds EDGE_THRESHOLD times the 99th-percentile distance (the
       midpoint between background and shape keeps blurred edges in place),
       reduced to the connected blob around its densest spot, holes filled.
    4. Colour: the median colour of the half of the mask farthest from the
       background (so blended edge pixels are ignored), matched to the
       nearest palette colour other than the background.
    5. Shape: the nearest SHAPE_SIGNATURES entry by how much of the top and
       of the bottom corner patches of the mask's bounding box it fills.

    If nothing stands out (99th percentile below MIN_CONTRAST, or a blob of
    fewer than MIN_SHAPE_PIXELS pixels), ``colour`` and ``shape`` are None.
    """
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(
            f"expected a uint8 HxWx3 image, got {image.dtype} {image.shape}"
        )
    image = np.asarray(
        Image.fromarray(image).filter(ImageFilter.MedianFilter(MEDIAN_FILTER_SIZE)),
        dtype=np.float64,
    )

    border = np.concatenate([image[0], image[-1], image[1:-1, 0], image[1:-1, -1]])
    border_rgb = np.median(border, axis=0)
    background = _nearest_colour(border_rgb)

    distance = np.linalg.norm(_to_lab(image) - _to_lab(border_rgb), axis=-1)
    level = np.percentile(distance, 99)
    no_shape = dict(background=background, colour=None, shape=None)
    if level < MIN_CONTRAST:
        return no_shape
    mask = _main_blob(distance > EDGE_THRESHOLD * level)
    if mask.sum() < MIN_SHAPE_PIXELS:
        return no_shape

    core = mask & (distance >= np.median(distance[mask]))
    colour = _nearest_colour(np.median(image[core], axis=0), exclude=background)
    return dict(background=background, colour=colour, shape=_classify_mask(mask))
