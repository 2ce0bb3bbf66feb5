"""Tests for the procedural shapes dataset and its image analyzer."""

import io

import numpy as np
import pytest
from PIL import Image, ImageFilter

from sd_tf import shapes

# The spec, restated literally so the module is checked against it.
SPEC_COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 170, 60),
    "blue": (40, 70, 220),
    "yellow": (240, 210, 30),
    "purple": (140, 60, 190),
    "orange": (245, 130, 20),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
SPEC_SHAPES = ["circle", "square", "triangle"]


def _non_background_box(image, background):
    """(top, bottom, left, right) of the pixels that differ from ``background``."""
    rows, cols = np.nonzero(np.any(image != shapes.COLOURS[background], axis=-1))
    return rows.min(), rows.max() + 1, cols.min(), cols.max() + 1


# --------------------------------------------------------------------------
# Combinations
# --------------------------------------------------------------------------


def test_palette_and_shapes_match_spec():
    assert list(shapes.COLOURS.items()) == list(SPEC_COLOURS.items())
    assert list(shapes.SHAPES) == SPEC_SHAPES


def test_enumeration_order_matches_spec():
    expected = []
    for colour in SPEC_COLOURS:
        for background in SPEC_COLOURS:
            if colour == background:
                continue
            for shape in SPEC_SHAPES:
                expected.append((colour, background, shape))
    assert shapes.all_combinations() == expected
    assert len(expected) == 168


def test_held_out_split():
    combinations = shapes.all_combinations()
    assert len(shapes.HELD_OUT) == 34
    assert len(shapes.TRAIN_COMBINATIONS) == 168 - 34
    assert shapes.HELD_OUT[0] == ("red", "green", "circle")
    assert shapes.HELD_OUT[1] == ("red", "blue", "triangle")  # index 5
    assert list(shapes.HELD_OUT) == combinations[::5]
    assert set(shapes.HELD_OUT).isdisjoint(shapes.TRAIN_COMBINATIONS)
    assert set(shapes.HELD_OUT) | set(shapes.TRAIN_COMBINATIONS) == set(combinations)
    for combination in combinations:
        assert shapes.is_held_out(*combination) == (combination in shapes.HELD_OUT)


def test_held_out_spans_every_colour_background_and_shape():
    colours, backgrounds, held_shapes = zip(*shapes.HELD_OUT)
    assert set(colours) == set(SPEC_COLOURS)
    assert set(backgrounds) == set(SPEC_COLOURS)
    assert set(held_shapes) == set(SPEC_SHAPES)


# --------------------------------------------------------------------------
# Captions
# --------------------------------------------------------------------------


def test_caption_format():
    assert (
        shapes.caption("red", "circle", "green")
        == "a red circle on a green background"
    )


def test_parse_caption_round_trip():
    for colour, background, shape in shapes.all_combinations():
        text = shapes.caption(colour, shape, background)
        assert shapes.parse_caption(text) == (colour, shape, background)


@pytest.mark.parametrize(
    "text",
    [
        "a red circle on a green",
        "a pink circle on a green background",
        "a red hexagon on a green background",
        "the red circle on a green background",
    ],
)
def test_parse_caption_rejects_other_text(text):
    with pytest.raises(ValueError):
        shapes.parse_caption(text)


# --------------------------------------------------------------------------
# Drawing and sampling
# --------------------------------------------------------------------------


def test_draw_square_is_pixel_exact():
    image = shapes.draw("red", "square", "green", 10, (32, 32))
    expected = np.empty((64, 64, 3), np.uint8)
    expected[:] = SPEC_COLOURS["green"]
    expected[22:42, 22:42] = SPEC_COLOURS["red"]
    np.testing.assert_array_equal(image, expected)


def test_draw_triangle_points_up():
    image = shapes.draw("white", "triangle", "black", 20, (32, 32))
    mask = np.all(image == SPEC_COLOURS["white"], axis=-1)
    top_row_width, bottom_row_width = mask[13].sum(), mask[50].sum()
    assert top_row_width < 5 < 35 < bottom_row_width
    assert mask[32:].sum() > 2 * mask[:32].sum()


def test_draw_rejects_bad_arguments():
    with pytest.raises(ValueError):
        shapes.draw("red", "circle", "red", 10, (32, 32))
    with pytest.raises(ValueError):
        shapes.draw("red", "circle", "green", 20, (10, 32))
    with pytest.raises(ValueError):
        shapes.draw("red", "hexagon", "green", 10, (32, 32))


def test_random_examples_follow_the_spec():
    rng = np.random.default_rng(0)
    sizes = set()
    for _ in range(500):
        image, text, (colour, background, shape) = shapes.random_example(rng)
        assert image.dtype == np.uint8 and image.shape == (64, 64, 3)
        assert (colour, background, shape) in shapes.TRAIN_COMBINATIONS
        assert colour != background
        assert text == f"a {colour} {shape} on a {background} background"

        # Fully inside: the shape's box keeps a background margin on every side.
        top, bottom, left, right = _non_background_box(image, background)
        assert top >= shapes.MARGIN and left >= shapes.MARGIN
        assert bottom <= 64 - shapes.MARGIN and right <= 64 - shapes.MARGIN

        # Every shape fills a box of side 2 * size, size in [10, 24].
        assert bottom - top == right - left
        size = (bottom - top) // 2
        assert 2 * size == bottom - top and 10 <= size <= 24
        sizes.add(size)

        # The shape's own colour is present, unblended.
        assert np.any(np.all(image == SPEC_COLOURS[colour], axis=-1))
    assert sizes == set(range(10, 25))


def test_sample_batch_shapes_and_combinations():
    images, captions, labels = shapes.sample_batch(
        np.random.default_rng(1), 16, combinations=shapes.HELD_OUT
    )
    assert images.shape == (16, 64, 64, 3) and images.dtype == np.uint8
    assert len(captions) == len(labels) == 16
    assert all(isinstance(text, str) for text in captions)
    for text, (colour, background, shape) in zip(captions, labels):
        assert shapes.is_held_out(colour, background, shape)
        assert shapes.parse_caption(text) == (colour, shape, background)


def test_sampling_is_deterministic_by_seed():
    first = shapes.sample_batch(np.random.default_rng(7), 8)
    again = shapes.sample_batch(np.random.default_rng(7), 8)
    other = shapes.sample_batch(np.random.default_rng(8), 8)
    np.testing.assert_array_equal(first[0], again[0])
    assert first[1:] == again[1:]
    assert not np.array_equal(first[0], other[0])


# --------------------------------------------------------------------------
# Analyzer
# --------------------------------------------------------------------------


def _blur(image, rng):
    return np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(1.5)))


def _noise(image, rng):
    noisy = image + rng.normal(0, 12, image.shape)
    return np.clip(noisy, 0, 255).astype(np.uint8)


def _colour_shift(image, rng):
    shifted = image + rng.uniform(-15, 15, size=3)
    return np.clip(shifted, 0, 255).astype(np.uint8)


def _jpeg(image, rng):
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=30)
    return np.asarray(Image.open(buffer))


def _everything(image, rng):
    return _jpeg(_noise(_colour_shift(_blur(image, rng), rng), rng), rng)


def _accuracy(degrade, n, seed):
    """(background, colour, shape) accuracy of ``analyze`` on n degraded examples."""
    rng = np.random.default_rng(seed)
    correct = np.zeros(3)
    for _ in range(n):
        image, _, (colour, background, shape) = shapes.random_example(
            rng, shapes.all_combinations()
        )
        result = shapes.analyze(degrade(image, rng))
        correct += [
            result["background"] == background,
            result["colour"] == colour,
            result["shape"] == shape,
        ]
    return correct / n


def test_analyzer_on_clean_images():
    background, colour, shape = _accuracy(lambda image, rng: image, n=500, seed=0)
    assert background == 1.0 and colour == 1.0
    assert shape >= 0.98


@pytest.mark.parametrize(
    "degrade, n",
    [
        (_blur, 200),
        (_noise, 200),
        (_colour_shift, 200),
        (_jpeg, 200),
        (_everything, 300),
    ],
)
def test_analyzer_on_degraded_images(degrade, n):
    background, colour, shape = _accuracy(degrade, n=n, seed=1)
    assert background >= 0.95 and colour >= 0.95
    assert shape >= 0.90


def test_analyzer_without_a_shape():
    plain = np.empty((64, 64, 3), np.uint8)
    plain[:] = SPEC_COLOURS["purple"]
    assert shapes.analyze(plain) == dict(background="purple", colour=None, shape=None)
    noisy = _noise(plain, np.random.default_rng(0))
    assert shapes.analyze(noisy)["shape"] is None


def test_analyzer_rejects_non_images():
    with pytest.raises(ValueError):
        shapes.analyze(np.zeros((64, 64), np.uint8))
    with pytest.raises(ValueError):
        shapes.analyze(np.zeros((64, 64, 3), np.float32))
