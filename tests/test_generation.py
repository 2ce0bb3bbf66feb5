"""Generation tests: sd_tf's text-to-image, image-to-image and inpainting against diffusers' pipelines.

Every comparison runs diffusers' own pipeline on a small random-weight
reference (``tests/reference.py``: "sd1" epsilon/PNDM, "sd2" v-prediction/DDIM,
"inpaint" 9-channel UNet) and sd_tf on the same weights loaded from the saved
folder, with the same starting latents and noise (diffusers' random draws are
patched to return sd_tf's), and compares float images to TOLERANCE. The
references' UNets predict unit-scale outputs, so that different samplers give
images far more than TOLERANCE apart (``test_samplers_give_different_images``):
an equality here is not an accident of near-zero predictions.
"""

import copy
import json
import math
import os
import subprocess
import sys
import textwrap
import time

import diffusers
import numpy as np
import pytest
import tensorflow as tf
import torch
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion_img2img as img2img_module
from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion_inpaint as inpaint_module
from diffusers.schedulers import scheduling_ddim, scheduling_euler_ancestral_discrete
from PIL import Image

from reference import nchw, reference_pipeline
from sd_tf.samplers import SAMPLER_NAMES
from sd_tf.stable_diffusion import StableDiffusion, _Job

pytestmark = [
    pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]

TOLERANCE = 2 / 255  # max abs difference of float images in [0, 1]
# Two images that should differ (other sampler, seed, prompt...) must differ by more than this.
DIFFERENT = 20 / 255
STEPS = 6
HEIGHT, WIDTH = 32, 48  # non-square; the small references' native size is 32x32
PROMPTS = ["a red circle on a blue background", "a green square, studio lighting"]
NEGATIVE_PROMPTS = ["blurry, low quality", "dark"]

# sampler name -> (diffusers scheduler class, config entries that select the variant)
DIFFUSERS_SCHEDULERS = {
    "ddim": (diffusers.DDIMScheduler, {}),
    "pndm": (diffusers.PNDMScheduler, {}),
    "lms": (diffusers.LMSDiscreteScheduler, {}),
    "euler": (diffusers.EulerDiscreteScheduler, {}),
    "euler_a": (diffusers.EulerAncestralDiscreteScheduler, {}),
    "dpmpp_2m": (diffusers.DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpmpp_2m_karras": (diffusers.DPMSolverMultistepScheduler,
                        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True}),
}
DETERMINISTIC = ("ddim", "pndm", "lms", "euler", "dpmpp_2m", "dpmpp_2m_karras")
STOCHASTIC_MODULES = {"euler_a": scheduling_euler_ancestral_discrete, "ddim": scheduling_ddim}


# ----------------------------------------------------------------------------
# Fixtures: reference pipelines and sd_tf models, built lazily once per module
# ----------------------------------------------------------------------------


class References:
    """Reference pipelines of each kind (saved under ``root``) and the sd_tf models loaded from them."""

    def __init__(self, root):
        self.root = root
        self._pipes = {}
        self._models = {}
        self._background = None

    def pipe(self, kind):
        """The diffusers pipeline of ``kind`` (its scheduler is replaced by ``scheduler``)."""
        if kind not in self._pipes:
            pipe = reference_pipeline(kind, self.root / kind)
            pipe.set_progress_bar_config(disable=True)
            # The saved config, as sd_tf reads it. (The in-memory one marks the entries it left at their
            # defaults, and from_config of another class then drops them: e.g. timestep_spacing
            # "leading" would become EulerDiscreteScheduler's default "linspace".)
            config = json.loads((self.root / kind / "scheduler" / "scheduler_config.json").read_text())
            self._pipes[kind] = (pipe, config)
        return self._pipes[kind][0]

    def folder(self, kind):
        self.pipe(kind)
        return self.root / kind

    def scheduler(self, kind, sampler):
        """A diffusers scheduler equal to sd_tf's ``sampler``, from the checkpoint's saved config."""
        self.pipe(kind)
        cls, extra = DIFFUSERS_SCHEDULERS[sampler]
        return cls.from_config(self._pipes[kind][1], **extra)

    def model(self, kind, dtype="float32"):
        if (kind, dtype) not in self._models:
            self._models[kind, dtype] = StableDiffusion.from_pretrained(self.folder(kind), dtype=dtype,
                                                                        compile="graph")
        return self._models[kind, dtype]

    def start_background(self, parts):
        """Starts the background process running ``parts`` (see BACKGROUND_CODE) on the sd1 reference."""
        if self._background is None:
            log_path = self.root / "background.log"
            log = open(log_path, "w")
            env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
            process = subprocess.Popen(
                [sys.executable, "-c", BACKGROUND_CODE, str(self.folder("sd1")), *parts],
                stdout=log, stderr=subprocess.STDOUT, env=env,
            )
            self._background = (process, log, log_path)
        return self._background

    def background(self, part, timeout=600):
        """The result dict the background process reported for ``part``, waiting for it."""
        process, log, log_path = self.start_background(BACKGROUND_PARTS)
        deadline = time.monotonic() + timeout
        while True:
            finished = process.poll() is not None
            log.flush()
            for line in log_path.read_text().splitlines():
                if line.startswith(("RESULT ", "ERROR ")):
                    result = json.loads(line.split(" ", 1)[1])
                    if result["part"] == part:
                        if "error" in result:
                            pytest.fail(f"background part {part!r} failed:\n{result['error']}")
                        return result
            if finished:
                pytest.fail(f"the background process exited ({process.returncode}) without a result for "
                            f"{part!r}:\n{log_path.read_text()[-5000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"no result for {part!r} after {timeout} s:\n{log_path.read_text()[-5000:]}")
            time.sleep(1)

    def close(self):
        if self._background is not None:
            process, log, _ = self._background
            if process.poll() is None:
                process.kill()
                process.wait()
            log.close()


@pytest.fixture(scope="module")
def refs(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the reference runs are tiny; avoid fighting TensorFlow's threads
    references = References(tmp_path_factory.mktemp("generation"))
    yield references
    references.close()
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", autouse=True)
def _start_background_early(request, refs):
    """Launches the background process first, with the parts the selected tests need.

    Model construction and tracing are single-threaded Python, so on two cores the background
    process (its own model loads, the MirroredStrategy run, XLA) mostly runs while this one does.
    """
    parts = set()
    for item in request.session.items:
        callspec = getattr(item, "callspec", None)
        params = callspec.params if callspec else {}
        if item.originalname in BACKGROUND_TESTS:
            parts.add(params.get("dtype", BACKGROUND_TESTS[item.originalname]))
    if parts:
        refs.start_background([part for part in BACKGROUND_PARTS if part in parts])


@pytest.fixture
def vae_posterior_mean(monkeypatch):
    """diffusers encodes images to the VAE posterior mean, as sd_tf does."""
    monkeypatch.setattr(DiagonalGaussianDistribution, "sample", lambda self, generator=None: self.mean)


# ----------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------


def normal(shape, seed):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def latent_shape(sd, batch, height=HEIGHT, width=WIDTH):
    return (batch, height // sd.vae_factor, width // sd.vae_factor, sd.latent_channels)


def max_diff(a, b):
    assert np.shape(a) == np.shape(b), (np.shape(a), np.shape(b))
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


def assert_equal_images(ours, theirs, label, tolerance=TOLERANCE):
    assert np.isfinite(ours).all()
    diff = max_diff(ours, theirs)
    print(f"{label}: max |sd_tf - diffusers| = {diff * 255:.4f}/255")
    assert diff <= tolerance, f"{label}: images differ by {diff * 255:.2f}/255 (> {tolerance * 255:.1f}/255)"
    return diff


def assert_different(a, b, label):
    diff = max_diff(a, b)
    assert diff > DIFFERENT, f"{label}: expected different images, max difference {diff * 255:.2f}/255"
    return diff


def psnr(a, b):
    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


def feed_noise(monkeypatch, module, noises):
    """Makes ``module``'s ``randn_tensor`` return ``noises`` (NHWC numpy), in order; returns the queue."""
    queue = [nchw(n) for n in noises]

    def fake_randn_tensor(shape, generator=None, device=None, dtype=None, layout=None):
        assert queue, "diffusers drew more noise than given"
        tensor = queue.pop(0)
        assert tuple(tensor.shape) == tuple(shape), (tuple(tensor.shape), tuple(shape))
        return tensor.clone().to(dtype or tensor.dtype)

    monkeypatch.setattr(module, "randn_tensor", fake_randn_tensor)
    return queue


def record_noise(monkeypatch):
    """Records every ``_Job.noise`` draw as (step, numpy array)."""
    draws = []
    original = _Job.noise

    def recording(self, shape, step):
        noise = original(self, shape, step)
        draws.append((step, noise.numpy()))
        return noise

    monkeypatch.setattr(_Job, "noise", recording)
    return draws


def test_image(height=HEIGHT, width=WIDTH):
    """A smooth RGB test image with a few shapes, as PIL (what both libraries read)."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    y, x = y / height, x / width
    r = 0.5 + 0.4 * np.sin(6 * x + 1)
    g = 0.3 + 0.6 * y
    b = 0.5 + 0.4 * np.cos(5 * x * y + 2)
    image = np.stack([r, g, b], axis=-1)
    disc = (y - 0.5) ** 2 + (x - 0.35) ** 2 < 0.06
    image[disc] = [0.9, 0.85, 0.1]
    return Image.fromarray((np.clip(image, 0, 1) * 255).round().astype(np.uint8))


test_image.__test__ = False  # a helper, not a test


def test_mask(height=HEIGHT, width=WIDTH):
    """White (repaint) rectangle not aligned to the latent grid, with grey values either side of 0.5."""
    mask = np.zeros((height, width), np.uint8)
    mask[7:22, 10:37] = 255
    mask[7:22, 37:40] = 140  # >= 0.5: repainted
    mask[22:25, 10:37] = 110  # < 0.5: kept
    return Image.fromarray(mask, mode="L")


test_mask.__test__ = False


# ----------------------------------------------------------------------------
# 1. Text-to-image equals diffusers' StableDiffusionPipeline
# ----------------------------------------------------------------------------


def diffusers_text_to_image(refs, kind, sampler, latents, prompts=PROMPTS, height=HEIGHT, width=WIDTH, **kwargs):
    pipe = refs.pipe(kind)
    pipe.scheduler = refs.scheduler(kind, sampler)
    return pipe(prompts, height=height, width=width, num_inference_steps=STEPS, latents=nchw(latents.copy()),
                output_type="np", **kwargs).images


@pytest.mark.parametrize("kind", ["sd1", "sd2"])
@pytest.mark.parametrize("sampler", DETERMINISTIC)
def test_text_to_image_matches_diffusers(refs, kind, sampler):
    sd = refs.model(kind)
    latents = normal(latent_shape(sd, len(PROMPTS)), seed=1)
    ours = sd.text_to_image(PROMPTS, height=HEIGHT, width=WIDTH, num_steps=STEPS, scheduler=sampler,
                            latents=latents, guidance_scale=7.5, output_type="float")
    theirs = diffusers_text_to_image(refs, kind, sampler, latents, guidance_scale=7.5)
    assert ours.shape == (2, HEIGHT, WIDTH, 3) and ours.dtype == np.float32
    assert_equal_images(ours, theirs, f"text_to_image {kind} {sampler}")
    # The batch's two images differ (the prompts matter).
    assert_different(ours[0], ours[1], "two prompts")


@pytest.mark.parametrize("kind,sampler", [("sd1", "dpmpp_2m")])  # (one more trace per case)
def test_text_to_image_without_guidance_matches_diffusers(refs, kind, sampler):
    """guidance_scale 1 (a single, unguided UNet call per step), square image."""
    sd = refs.model(kind)
    latents = normal(latent_shape(sd, 2, 32, 32), seed=2)
    ours = sd.text_to_image(PROMPTS, height=32, width=32, num_steps=STEPS, scheduler=sampler, latents=latents,
                            guidance_scale=1.0, output_type="float")
    theirs = diffusers_text_to_image(refs, kind, sampler, latents, height=32, width=32, guidance_scale=1.0)
    assert_equal_images(ours, theirs, f"text_to_image {kind} {sampler} no guidance")
    guided = diffusers_text_to_image(refs, kind, sampler, latents, height=32, width=32, guidance_scale=7.5)
    assert_different(ours, guided, "guidance 1 vs 7.5")


@pytest.mark.parametrize("kind,sampler", [("sd1", "lms"), ("sd2", "dpmpp_2m_karras")])
def test_text_to_image_negative_prompt_matches_diffusers(refs, kind, sampler):
    sd = refs.model(kind)
    latents = normal(latent_shape(sd, 2), seed=3)
    ours = sd.text_to_image(PROMPTS, negative_prompt=NEGATIVE_PROMPTS, height=HEIGHT, width=WIDTH,
                            num_steps=STEPS, scheduler=sampler, latents=latents, output_type="float")
    theirs = diffusers_text_to_image(refs, kind, sampler, latents, negative_prompt=NEGATIVE_PROMPTS)
    assert_equal_images(ours, theirs, f"text_to_image {kind} {sampler} negative prompt")
    without = diffusers_text_to_image(refs, kind, sampler, latents)
    assert_different(ours, without, "with vs without negative prompt")


def test_default_sampler_is_the_checkpoints(refs):
    """No ``scheduler`` argument: sd1's saved PNDMScheduler, sd2's DDIMScheduler."""
    assert refs.model("sd1").make_sampler().name == "pndm"
    assert refs.model("sd2").make_sampler().name == "ddim"
    sd = refs.model("sd1")
    latents = normal(latent_shape(sd, 2), seed=4)
    ours = sd.text_to_image(PROMPTS, height=HEIGHT, width=WIDTH, num_steps=STEPS, latents=latents,
                            output_type="float")
    pipe = refs.pipe("sd1")
    pipe.scheduler = refs.scheduler("sd1", "pndm")
    theirs = pipe(PROMPTS, height=HEIGHT, width=WIDTH, num_inference_steps=STEPS, latents=nchw(latents.copy()),
                  output_type="np").images
    assert_equal_images(ours, theirs, "text_to_image sd1 default sampler")
    # uint8 output is the float output rounded, as diffusers' numpy_to_pil does.
    as_uint8 = sd.text_to_image(PROMPTS, height=HEIGHT, width=WIDTH, num_steps=STEPS, latents=latents)
    assert as_uint8.dtype == np.uint8
    assert np.abs(as_uint8.astype(int) - (ours * 255).round().astype(int)).max() <= 1


# ----------------------------------------------------------------------------
# 4. The references make equality meaningful
# ----------------------------------------------------------------------------


def test_samplers_give_different_images(refs):
    """(Not DDIM against Euler: for epsilon prediction DDIM with eta 0 is the Euler method in sigma, and
    with the same "leading" timesteps they differ only by the last step's end point.)"""
    sd = refs.model("sd1")
    latents = normal(latent_shape(sd, 2), seed=1)
    images = {
        sampler: sd.text_to_image(PROMPTS, height=HEIGHT, width=WIDTH, num_steps=STEPS, scheduler=sampler,
                                  latents=latents, output_type="float")
        for sampler in ("pndm", "euler", "dpmpp_2m", "lms")
    }
    for a, b in (("pndm", "euler"), ("euler", "dpmpp_2m"), ("dpmpp_2m", "lms"), ("lms", "pndm")):
        diff = assert_different(images[a], images[b], f"{a} vs {b}")
        print(f"{a} vs {b}: max difference {diff * 255:.1f}/255 (tolerance {TOLERANCE * 255:.0f}/255)")
        assert diff > 10 * TOLERANCE


# ----------------------------------------------------------------------------
# 2. Image-to-image equals diffusers' StableDiffusionImg2ImgPipeline
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind,sampler,strength", [
    ("sd1", "pndm", 0.5), ("sd1", "euler", 0.8), ("sd1", "dpmpp_2m", 0.5), ("sd2", "ddim", 0.8),
    ("sd1", "pndm", 0.0),  # PNDM's doubled first step: still one step at t=1, as in diffusers
])
def test_image_to_image_matches_diffusers(refs, monkeypatch, vae_posterior_mean, kind, sampler, strength):
    sd = refs.model(kind)
    image = test_image()
    noise = normal(latent_shape(sd, 2), seed=5)
    ours = sd.image_to_image(PROMPTS, image, strength=strength, noise=noise, num_steps=STEPS, scheduler=sampler,
                             output_type="float")

    pipe = diffusers.StableDiffusionImg2ImgPipeline(**refs.pipe(kind).components, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = refs.scheduler(kind, sampler)
    queue = feed_noise(monkeypatch, img2img_module, [noise])
    theirs = pipe(PROMPTS, image=[image, image], strength=strength, num_inference_steps=STEPS,
                  output_type="np").images
    assert not queue, "diffusers did not draw the start noise"
    assert_equal_images(ours, theirs, f"image_to_image {kind} {sampler} strength {strength}")
    if strength > 0:
        pixels = np.asarray(image, np.float32) / 255
        assert_different(ours[0], pixels, "image_to_image changed the image")


@pytest.mark.parametrize("sampler,strength", [("ddim", 0.0), ("euler", 0.1)])
def test_strength_without_steps_returns_the_encoded_image(refs, sampler, strength):
    """Strength below 1/num_steps runs no step (PNDM aside): image_to_image and inpaint give the VAE
    round trip of the image, whatever the seed. (diffusers' inpaint pipeline refuses such strengths.)"""
    sd = refs.model("sd1")
    image, mask = test_image(), test_mask()
    kwargs = dict(strength=strength, num_steps=STEPS, scheduler=sampler, output_type="float")
    pixels = np.asarray(image, np.float32)[None] / 255
    round_trip = sd.decode_latents(tf.repeat(sd.encode_image(pixels), 2, axis=0), "float")
    for seed in (1, 2):
        assert max_diff(sd.image_to_image(PROMPTS, image, seed=seed, **kwargs), round_trip) < 1e-5
        assert max_diff(sd.inpaint(PROMPTS, image, mask, seed=seed, keep_unmasked=False, **kwargs), round_trip) < 1e-5
    repaint = np.asarray(mask) >= 128
    kept = sd.inpaint(PROMPTS, image, mask, seed=1, **kwargs)
    np.testing.assert_array_equal(kept[:, ~repaint], np.broadcast_to(pixels[0][~repaint], kept[:, ~repaint].shape))
    assert max_diff(kept[:, repaint], round_trip[:, repaint]) < 1e-5


# ----------------------------------------------------------------------------
# 3. Inpainting equals diffusers' StableDiffusionInpaintPipeline
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind,sampler,strength", [
    ("inpaint", "pndm", 1.0), ("inpaint", "euler", 0.7),  # 9-channel UNet
    ("sd1", "ddim", 1.0), ("sd1", "dpmpp_2m", 0.7),  # 4-channel UNet: latent blending
])
def test_inpaint_matches_diffusers(refs, monkeypatch, vae_posterior_mean, kind, sampler, strength):
    sd = refs.model(kind)
    image, mask = test_image(), test_mask()
    noise = normal(latent_shape(sd, 2), seed=6)
    kwargs = dict(strength=strength, noise=noise, num_steps=STEPS, scheduler=sampler)
    ours_full = sd.inpaint(PROMPTS, image, mask, keep_unmasked=False, output_type="float", **kwargs)
    ours = sd.inpaint(PROMPTS, image, mask, output_type="float", **kwargs)
    ours_uint8 = sd.inpaint(PROMPTS, image, mask, **kwargs)

    pipe = refs.pipe(kind)
    if kind != "inpaint":
        pipe = diffusers.StableDiffusionInpaintPipeline(**pipe.components, requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = refs.scheduler(kind, sampler)
    queue = feed_noise(monkeypatch, inpaint_module, [noise])
    theirs = pipe(PROMPTS, image=image, mask_image=mask, height=HEIGHT, width=WIDTH, strength=strength,
                  num_inference_steps=STEPS, output_type="np").images
    assert not queue, "diffusers did not draw the start noise"

    label = f"inpaint {kind} {sampler} strength {strength}"
    assert_equal_images(ours_full, theirs, label + " keep_unmasked=False")
    repaint = (np.asarray(mask, np.float32) / 255 >= 0.5)  # diffusers binarises at 0.5
    assert_equal_images(ours[:, repaint], theirs[:, repaint], label + " inside the mask")
    # Outside the mask, the input pixels exactly (the float ones as load_image reads them).
    pixels = np.asarray(image)
    np.testing.assert_array_equal(ours[:, ~repaint], np.stack([pixels[~repaint] / np.float32(255)] * 2))
    np.testing.assert_array_equal(ours_uint8[:, ~repaint], np.stack([pixels[~repaint]] * 2))
    # The model's own decode outside the mask is not the input (so keeping it is a real change), and
    # the inside was repainted.
    assert_different(ours_full[:, ~repaint], ours[:, ~repaint], "decoded vs kept unmasked pixels")
    assert_different(ours[:, repaint], np.broadcast_to(pixels[repaint] / 255, ours[:, repaint].shape),
                     "repainted region")


# ----------------------------------------------------------------------------
# 5. Seeded randomness: euler_a and ddim with eta > 0
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("sampler,eta", [("euler_a", 0.0), ("ddim", 0.7)])
def test_stochastic_sampler_matches_diffusers_with_its_noise(refs, monkeypatch, sampler, eta):
    """The step noise sd_tf draws from the seed is standard normal, and with it diffusers gives the same images."""
    sd = refs.model("sd1")
    draws = record_noise(monkeypatch)
    ours = sd.text_to_image(PROMPTS, height=HEIGHT, width=WIDTH, num_steps=STEPS, scheduler=sampler, eta=eta,
                            seed=123, output_type="float")
    steps = [step for step, _ in draws]
    assert steps == list(range(STEPS + 1)), steps  # start latents, then one draw per step
    noises = [noise for _, noise in draws]
    assert all(n.shape == latent_shape(sd, 2) for n in noises)
    step_noise = np.stack(noises[1:])
    print(f"{sampler} step noise: mean {step_noise.mean():.4f}, std {step_noise.std():.4f}, n={step_noise.size}")
    assert abs(step_noise.mean()) < 0.1 and abs(step_noise.std() - 1) < 0.1
    # Independent between steps and between the images of the batch.
    flat = step_noise.reshape(STEPS, 2, -1)
    assert abs(np.corrcoef(flat[0, 0], flat[1, 0])[0, 1]) < 0.2
    assert abs(np.corrcoef(flat[0, 0], flat[0, 1])[0, 1]) < 0.2
    assert abs(np.corrcoef(noises[0][0].ravel(), noises[0][1].ravel())[0, 1]) < 0.2
    # Image i draws from seed 123 + i.
    expected = tf.random.stateless_normal(noises[0].shape[1:], seed=[124, 3]).numpy()
    np.testing.assert_array_equal(noises[3][1], expected)

    pipe = refs.pipe("sd1")
    pipe.scheduler = refs.scheduler("sd1", sampler)
    queue = feed_noise(monkeypatch, STOCHASTIC_MODULES[sampler], noises[1:])
    theirs = pipe(PROMPTS, height=HEIGHT, width=WIDTH, num_inference_steps=STEPS, latents=nchw(noises[0].copy()),
                  eta=eta, output_type="np").images
    assert not queue, f"diffusers drew {len(queue)} fewer step noises than sd_tf"
    assert_equal_images(ours, theirs, f"text_to_image sd1 {sampler} eta {eta} with sd_tf's noise")


@pytest.mark.parametrize("sampler,eta", [("euler_a", 0.0), ("ddim", 1.0)])
def test_seed_determines_images(refs, sampler, eta):
    sd = refs.model("sd1")
    kwargs = dict(height=HEIGHT, width=WIDTH, num_steps=4, scheduler=sampler, eta=eta, output_type="float")
    first = sd.text_to_image(PROMPTS[0], batch_size=2, seed=7, **kwargs)
    again = sd.text_to_image(PROMPTS[0], batch_size=2, seed=7, **kwargs)
    np.testing.assert_array_equal(first, again)
    other = sd.text_to_image(PROMPTS[0], batch_size=2, seed=8, **kwargs)
    assert_different(first[0], other[0], "seed 7 vs 8")
    # Image i of a batch with seed s is the single image with seed s + i: other[0] (seed 8) is first[1].
    assert max_diff(first[1], other[0]) < 1e-4
    single = sd.text_to_image(PROMPTS[0], batch_size=1, seed=8, **kwargs)
    print(f"{sampler}: batch of 2 vs single image, max difference {max_diff(first[1], single[0]) * 255:.5f}/255")
    assert max_diff(first[1], single[0]) < 1e-4
    # Two images of one batch differ (each has its own noise).
    assert_different(first[0], first[1], "images of one batch")
    # The step noise matters too, not only the start latents: with the same start latents, other step noise.
    start = sd.text_to_image(PROMPTS[0], batch_size=2, seed=7, latents=normal(latent_shape(sd, 2), 9), **kwargs)
    start2 = sd.text_to_image(PROMPTS[0], batch_size=2, seed=8, latents=normal(latent_shape(sd, 2), 9), **kwargs)
    assert_different(start, start2, "same start latents, other step noise")


def test_random_seed_when_none(refs):
    sd = refs.model("sd1")
    kwargs = dict(height=HEIGHT, width=WIDTH, num_steps=2, scheduler="euler", output_type="float")
    assert_different(sd.text_to_image(PROMPTS, **kwargs), sd.text_to_image(PROMPTS, **kwargs), "seed=None twice")


# ----------------------------------------------------------------------------
# 7. Compilation: no retracing; eager agrees with graph mode (XLA: at the end)
# ----------------------------------------------------------------------------


def tracing_counts(sd):
    return {name: getattr(sd, name).experimental_get_tracing_count()
            for name in ("_encode_tokens", "_guided_noise", "_vae_encode", "_vae_decode")}


def test_same_shapes_do_not_retrace(refs):
    sd = refs.model("sd1")
    assert sd.compile == "graph"
    kwargs = dict(height=HEIGHT, width=WIDTH, output_type="float")
    sd.text_to_image(PROMPTS, num_steps=3, scheduler="ddim", seed=1, **kwargs)
    sd.image_to_image(PROMPTS, test_image(), strength=0.5, num_steps=4, scheduler="ddim", seed=1,
                      output_type="float")
    counts = tracing_counts(sd)
    assert counts["_guided_noise"] >= 1 and counts["_vae_encode"] >= 1
    # Other prompts, seed, sampler, step count, strength and guidance scale: same shapes, no new trace.
    sd.text_to_image(PROMPTS, num_steps=3, scheduler="ddim", seed=1, **kwargs)
    assert tracing_counts(sd) == counts
    sd.image_to_image(PROMPTS, test_image(), strength=0.8, num_steps=5, scheduler="euler", seed=2,
                      guidance_scale=4.0, output_type="float")
    sd.text_to_image(["another prompt", "and one more"], negative_prompt=NEGATIVE_PROMPTS, num_steps=4,
                     scheduler="euler_a", seed=2, guidance_scale=5.0, **kwargs)
    sd.text_to_image(PROMPTS[0], batch_size=2, num_steps=2, scheduler="dpmpp_2m_karras", seed=3,
                     guidance_scale=3.5, **kwargs)
    assert tracing_counts(sd) == counts


def test_eager_mode_agrees_with_graph_mode(refs):
    graph = refs.model("sd1")
    # The same networks and weights, with the network calls not compiled.
    sd = copy.copy(graph)
    sd.compile = "eager"
    sd._compile_functions()
    assert not hasattr(sd._guided_noise, "experimental_get_tracing_count")
    kwargs = dict(height=HEIGHT, width=WIDTH, num_steps=3, scheduler="euler", output_type="float",
                  latents=normal(latent_shape(sd, 2), seed=11))
    expected = graph.text_to_image(PROMPTS, **kwargs)
    images = sd.text_to_image(PROMPTS, **kwargs)
    diff = max_diff(images, expected)
    print(f"compile=eager vs graph: max difference {diff * 255:.4f}/255")
    assert diff <= TOLERANCE


# ----------------------------------------------------------------------------
# 9. Argument errors (raised before any denoising)
# ----------------------------------------------------------------------------


@pytest.fixture
def no_denoising(refs, monkeypatch):
    sd = refs.model("sd1")

    def fail(*args, **kwargs):
        raise AssertionError("the error should be raised before denoising")

    monkeypatch.setattr(sd, "_denoise", fail)
    return sd


def test_bad_size(no_denoising):
    sd = no_denoising
    f = sd.vae_factor
    for size in (dict(height=30), dict(width=42), dict(height=0), dict(width=-8)):
        with pytest.raises(ValueError, match=f"multiple of {f}"):
            sd.text_to_image("x", num_steps=2, **size)
    odd = test_image(30, 48)
    with pytest.raises(ValueError, match=f"multiple of {f}"):
        sd.image_to_image("x", odd, num_steps=2)
    with pytest.raises(ValueError, match=f"multiple of {f}"):
        sd.inpaint("x", odd, test_mask(30, 48), num_steps=2)


def test_unknown_sampler(no_denoising):
    with pytest.raises(ValueError) as error:
        no_denoising.text_to_image("x", num_steps=2, scheduler="heun")
    assert "heun" in str(error.value)
    for name in SAMPLER_NAMES:
        assert name in str(error.value)


def test_bad_strength(no_denoising):
    sd = no_denoising
    for strength in (-0.1, 1.5):
        with pytest.raises(ValueError, match="strength"):
            sd.image_to_image("x", test_image(), strength=strength, num_steps=2)
        with pytest.raises(ValueError, match="strength"):
            sd.inpaint("x", test_image(), test_mask(), strength=strength, num_steps=2)


def test_mask_size_mismatch(no_denoising):
    with pytest.raises(ValueError, match="mask size"):
        no_denoising.inpaint("x", test_image(32, 48), test_mask(32, 32), num_steps=2)


def test_bad_latents_or_noise_shape(no_denoising):
    sd = no_denoising
    good = latent_shape(sd, 2)
    for shape in (latent_shape(sd, 2, 32, 32), latent_shape(sd, 1), (2, good[3], good[1], good[2])):
        with pytest.raises(ValueError, match="latents must have shape"):
            sd.text_to_image(PROMPTS, height=HEIGHT, width=WIDTH, num_steps=2, latents=np.zeros(shape, np.float32))
    with pytest.raises(ValueError, match="noise must have shape"):
        sd.image_to_image(PROMPTS, test_image(), num_steps=2, noise=np.zeros(latent_shape(sd, 1), np.float32))
    with pytest.raises(ValueError, match="noise must have shape"):
        sd.inpaint(PROMPTS, test_image(), test_mask(), num_steps=2, noise=np.zeros(latent_shape(sd, 1), np.float32))


def test_bad_output_type(no_denoising):
    sd = no_denoising
    for output_type in ("np", "pil", None):
        with pytest.raises(ValueError, match="output_type"):
            sd.text_to_image("x", num_steps=2, output_type=output_type)
        with pytest.raises(ValueError, match="output_type"):
            sd.image_to_image("x", test_image(), num_steps=2, output_type=output_type)
        with pytest.raises(ValueError, match="output_type"):
            sd.inpaint("x", test_image(), test_mask(), num_steps=2, output_type=output_type)
        with pytest.raises(ValueError, match="output_type"):
            sd.decode_latents(np.zeros(latent_shape(sd, 1), np.float32), output_type=output_type)


def test_negative_prompt_count_mismatch(no_denoising):
    with pytest.raises(ValueError, match="negative prompts"):
        no_denoising.text_to_image(PROMPTS, negative_prompt=["a", "b", "c"], num_steps=2)


# ----------------------------------------------------------------------------
# 10. Non-finite decodes raise
# ----------------------------------------------------------------------------


def test_nan_decode_raises(refs):
    sd = refs.model("sd1")
    variable = sd.vae_decoder.weights[0]
    saved = variable.numpy()
    try:
        variable.assign(np.full_like(saved, np.nan))
        with pytest.raises(FloatingPointError):
            sd.decode_latents(np.zeros(latent_shape(sd, 2), np.float32))
        with pytest.raises(FloatingPointError):
            sd.text_to_image(PROMPTS, height=HEIGHT, width=WIDTH, num_steps=1, seed=0)
    finally:
        variable.assign(saved)
    assert np.isfinite(sd.decode_latents(np.zeros(latent_shape(sd, 2), np.float32), "float")).all()


# ----------------------------------------------------------------------------
# 6-8. Mixed precision, XLA and MirroredStrategy, in a background process
# ----------------------------------------------------------------------------
#
# The process splits the CPU into two logical devices (this must happen before TensorFlow
# initialises, hence a separate process), loads the sd1 reference on one device in float32 (the
# reference of every part), then runs the parts named on its command line and prints one
# "RESULT {json}" line per part (or "ERROR {json}" with the traceback).

BACKGROUND_PARTS = ("mirrored", "xla", "mixed_bfloat16", "bfloat16", "mixed_float16")
# test function -> its part (the mixed precision test's part is its dtype parameter)
BACKGROUND_TESTS = {"test_mirrored_strategy_matches_single_device": "mirrored",
                    "test_xla_mode_agrees_with_graph_mode": "xla",
                    "test_mixed_precision_close_to_float32": None}
BACKGROUND_CODE = textwrap.dedent("""
    import copy
    import json
    import sys
    import time
    import traceback

    import numpy as np
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    from sd_tf.stable_diffusion import StableDiffusion

    folder, parts = sys.argv[1], sys.argv[2:]
    single = StableDiffusion.from_pretrained(folder, compile="graph")
    PROMPTS = ["a red circle on a blue background", "a green square, studio lighting"]

    def max_diff(a, b):
        return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())

    def mirrored():
        # Three images split 1 + 2 over the two logical CPUs, against the single-device model.
        strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
        sd = StableDiffusion.from_pretrained(folder, compile="graph", strategy=strategy)
        # Records the batch each replica's UNet call is traced with (strategy.run traces one
        # function holding every replica's call).
        batches = []

        def recording(latents, *args):
            batches.append(int(latents.shape[0]))
            return type(sd)._guided_noise_fn(sd, latents, *args)

        sd._guided_noise_fn = recording
        sd._compile_functions()
        kwargs = dict(height=32, width=48, num_steps=4, scheduler="euler_a", seed=21, output_type="float")
        prompts = ["a red circle", "a green square", "a blue star"]
        images = sd.text_to_image(prompts, **kwargs)
        expected = single.text_to_image(prompts, **kwargs)
        return dict(replicas=strategy.num_replicas_in_sync, batches=sorted(batches), shape=images.shape,
                    max_diff=max_diff(images, expected), spread=max_diff(expected[0], expected[1]))

    def xla():
        sd = copy.copy(single)  # the same networks, their calls compiled with XLA
        sd.compile = "xla"
        sd._compile_functions()
        latents = np.random.default_rng(11).standard_normal((2, 8, 12, 4)).astype(np.float32)
        kwargs = dict(height=32, width=48, num_steps=3, scheduler="euler", latents=latents, output_type="float")
        images = sd.text_to_image(PROMPTS, **kwargs)
        expected = single.text_to_image(PROMPTS, **kwargs)
        return dict(max_diff=max_diff(images, expected), jit_compile=bool(sd._guided_noise._jit_compile))

    def mixed(dtype):
        sd = StableDiffusion.from_pretrained(folder, compile="graph", dtype=dtype)
        latents = np.random.default_rng(10).standard_normal((2, 8, 12, 4)).astype(np.float32)
        kwargs = dict(height=32, width=48, num_steps=6, scheduler="dpmpp_2m", latents=latents,
                      output_type="float")
        images = sd.text_to_image(PROMPTS, **kwargs)
        expected = single.text_to_image(PROMPTS, **kwargs)
        mse = float(np.mean((images.astype(np.float64) - expected) ** 2))
        return dict(compute_dtype=sd.unet.compute_dtype, weights_dtype=sd.unet.weights[0].dtype,
                    output_dtype=str(images.dtype),
                    finite=bool(np.isfinite(images).all()), psnr=10 * np.log10(1 / max(mse, 1e-20)),
                    max_diff=max_diff(images, expected))

    for part in parts:
        try:
            result = mixed(part) if "float16" in part else globals()[part]()
            result["cpu_seconds"] = time.process_time()  # of the whole process so far
            print("RESULT", json.dumps(dict(part=part, **result)), flush=True)
        except Exception:
            print("ERROR", json.dumps(dict(part=part, error=traceback.format_exc())), flush=True)
""")


def test_mirrored_strategy_matches_single_device(refs):
    """Three images split 1 + 2 over two logical CPUs equal a single-device run with the same seeds."""
    result = refs.background("mirrored")
    print(f"MirroredStrategy (2 replicas, batch 3 split {result['batches']}) vs single device: "
          f"max difference {result['max_diff'] * 255:.5f}/255")
    assert result["replicas"] == 2
    assert result["batches"] == [1, 2]
    assert result["shape"] == [3, 32, 48, 3]
    assert result["spread"] > DIFFERENT  # the images differ, so a mix-up of the batch would show
    assert result["max_diff"] <= TOLERANCE


def test_xla_mode_agrees_with_graph_mode(refs):
    result = refs.background("xla")
    print(f"compile=xla vs graph: max difference {result['max_diff'] * 255:.4f}/255")
    assert result["jit_compile"]
    assert result["max_diff"] <= TOLERANCE


# Observed: 42 dB for bfloat16 (8-bit mantissa), 62 dB for float16.
@pytest.mark.parametrize("dtype,min_psnr", [("mixed_bfloat16", 30.0), ("bfloat16", 30.0), ("mixed_float16", 40.0)])
def test_mixed_precision_close_to_float32(refs, dtype, min_psnr):
    result = refs.background(dtype)
    print(f"{dtype}: PSNR vs float32 {result['psnr']:.2f} dB, max difference {result['max_diff'] * 255:.1f}/255 "
          f"(background process CPU so far: {result['cpu_seconds']:.0f} s)")
    assert result["compute_dtype"] == dtype.removeprefix("mixed_")
    assert result["weights_dtype"] == ("bfloat16" if dtype == "bfloat16" else "float32")
    assert result["output_dtype"] == "float32" and result["finite"]
    assert result["psnr"] >= min_psnr
