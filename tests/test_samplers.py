"""Tests of sd_tf.samplers against diffusers' schedulers (the reference), on a fake model.

A full denoising loop runs twice, through our sampler and through the diffusers
scheduler, with the same fake deterministic "model" (numpy, unit-scale outputs
that depend on the input and the timestep). Final samples must agree to
TOLERANCE relative to max(1, max |reference|).
"""

import importlib.util

import numpy as np
import pytest
import tensorflow as tf
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
)
from diffusers.schedulers import scheduling_euler_ancestral_discrete

from sd_tf.samplers import SAMPLER_NAMES, SD1_SCHEDULER_CONFIG, SD2_SCHEDULER_CONFIG, make_sampler

# diffusers' np.array(torch_tensor) calls, under numpy 2.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")

TOLERANCE = 1e-5
# With zero terminal SNR the Euler-type samplers start at sigma = 4096 and their
# first step cancels two ~4096-sized float32 terms, so a 1-ulp difference in
# sigma (torch's float32 sqrt(16777215) gives 4096.0, the correctly rounded
# value is 4095.9998) moves the result by ~2.4e-4: diffusers' own rounding noise.
ZERO_SNR_EULER_TOLERANCE = 5e-4
SHAPE = (2, 4, 8, 8)

# name -> (diffusers class, config entries that select the variant)
REFERENCE = {
    "ddim": (DDIMScheduler, {}),
    "pndm": (PNDMScheduler, {}),
    "lms": (LMSDiscreteScheduler, {}),
    "euler": (EulerDiscreteScheduler, {}),
    "euler_a": (EulerAncestralDiscreteScheduler, {}),
    "dpmpp_2m": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpmpp_2m_karras": (DPMSolverMultistepScheduler,
                        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True}),
}

SD1, SD2 = SD1_SCHEDULER_CONFIG, SD2_SCHEDULER_CONFIG
# Rescaling to zero terminal SNR subtracts nearly equal numbers, so the 1-ulp
# differences between numpy's and torch's float32 linspace (the betas) grow to
# ~4e-5 relative near t = 999. The zero-SNR configs thus give both sides torch's betas.
TORCH_SD_BETAS = (torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float32) ** 2).tolist()
ALL = set(SAMPLER_NAMES)
DPM = {"dpmpp_2m", "dpmpp_2m_karras"}
# config id -> (config, samplers it applies to)
CONFIGS = {
    "sd1": (SD1, ALL),
    "sd2_v": (SD2, ALL),
    "leading": ({**SD1, "timestep_spacing": "leading"}, ALL),
    "linspace": ({**SD1, "timestep_spacing": "linspace"}, ALL),
    "trailing": ({**SD1, "timestep_spacing": "trailing"}, ALL),
    "trailing_v": ({**SD2, "timestep_spacing": "trailing"}, ALL),
    "offset0": ({**SD1, "steps_offset": 0, "timestep_spacing": "leading"}, ALL),
    "diffusers_defaults": ({}, ALL),  # linear betas; DDIM clips x0 to [-1, 1]
    "cosine": ({**SD1, "beta_schedule": "squaredcos_cap_v2"}, ALL),
    "sample_prediction": ({**SD1, "prediction_type": "sample"}, ALL - {"pndm", "euler_a"}),
    "zero_snr": ({**SD2, "trained_betas": TORCH_SD_BETAS, "rescale_betas_zero_snr": True,
                  "timestep_spacing": "trailing"}, ALL),
    "alpha_one": ({**SD1, "set_alpha_to_one": True}, {"ddim", "pndm"}),
    "offset0_alpha_one": ({**SD1, "steps_offset": 0, "set_alpha_to_one": True}, {"ddim", "pndm"}),
    "clip": ({**SD1, "clip_sample": True, "clip_sample_range": 1.5}, {"ddim"}),
    "prk": ({**SD1, "skip_prk_steps": False}, {"pndm"}),
    "prk_v_linspace": ({**SD2, "skip_prk_steps": False, "timestep_spacing": "linspace"}, {"pndm"}),
    "sigma_min": ({**SD1, "final_sigmas_type": "sigma_min"}, DPM),
    "sigma_min_no_lower_final": ({**SD1, "final_sigmas_type": "sigma_min", "lower_order_final": False}, DPM),
    "sigma_min_euler_final": ({**SD1, "final_sigmas_type": "sigma_min", "euler_at_final": True}, DPM),
}
STEP_COUNTS = (1, 2, 7, 25)
MAIN_CONFIGS = ("sd1", "sd2_v", "prk")  # also run with 50 steps


def cases(configs=tuple(CONFIGS), step_counts=None):
    """pytest params (name, config id, steps) for every applicable combination.

    Without `step_counts`: STEP_COUNTS, plus 50 for MAIN_CONFIGS.
    """
    params = []
    for name in SAMPLER_NAMES:
        for config_id in configs:
            config, names = CONFIGS[config_id]
            counts = step_counts or STEP_COUNTS + ((50,) if config_id in MAIN_CONFIGS else ())
            for steps in counts:
                prk = name == "pndm" and not config.get("skip_prk_steps", False)
                if name in names and not (prk and steps < 4):  # PRK needs 4 steps
                    params.append(pytest.param(name, config_id, steps, id=f"{name}-{config_id}-{steps}"))
    return params


def reference_scheduler(name, config):
    if name == "lms" and importlib.util.find_spec("scipy") is None:
        pytest.skip("diffusers' LMSDiscreteScheduler needs scipy")
    cls, variant = REFERENCE[name]
    return cls.from_config({**config, **variant})


def fake_model(x, t):
    """A deterministic stand-in for the UNet: unit-scale, nonlinear in x, dependent on t."""
    x = np.asarray(x, dtype=np.float32)
    return (np.tanh(0.7 * x + float(t) / 1000) * 1.3 + 0.1 * x).astype(np.float32)


def random(seed, shape=SHAPE):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def run_ours(sampler, x, start=0, noises=None):
    """Our denoising loop from index `start`; `noises[k]` is given to the k-th step."""
    x = tf.constant(x)
    for k, i in enumerate(range(start, len(sampler.timesteps))):
        model_output = fake_model(sampler.scale_model_input(x, i).numpy(), sampler.timesteps[i])
        x = sampler.step(model_output, i, x, noise=None if noises is None else noises[k])
    return x.numpy()


def run_reference(scheduler, x, start=0, noises=None, eta=0.0, monkeypatch=None):
    """The diffusers pipelines' loop from index `start`, feeding `noises` to the stochastic steps."""
    if noises is not None and isinstance(scheduler, EulerAncestralDiscreteScheduler):
        draws = iter(noises)
        monkeypatch.setattr(scheduling_euler_ancestral_discrete, "randn_tensor",
                            lambda shape, **kwargs: torch.from_numpy(next(draws)))
    if hasattr(scheduler, "set_begin_index"):
        # Index by position, as our samplers do. Without it diffusers looks the first
        # timestep up, which fails when it repeats (Karras sigmas on the cosine schedule).
        scheduler.set_begin_index(start)
    x = torch.from_numpy(x)
    for k, t in enumerate(scheduler.timesteps[start:]):
        model_input = scheduler.scale_model_input(x, t)
        model_output = torch.from_numpy(fake_model(model_input.numpy(), t.item()))
        kwargs = {}
        if isinstance(scheduler, DDIMScheduler):
            kwargs["eta"] = eta
            if eta > 0:
                kwargs["variance_noise"] = torch.from_numpy(noises[k])
        x = scheduler.step(model_output, t, x, **kwargs).prev_sample
    return x.numpy()


def assert_close(ours, reference, tolerance=TOLERANCE):
    scale = max(1.0, float(np.abs(reference).max()))
    error = float(np.abs(ours - reference).max()) / scale
    assert np.all(np.isfinite(reference))
    assert error <= tolerance, f"relative error {error:.3g} > {tolerance:g}"


@pytest.mark.parametrize("name, config_id, steps", cases())
def test_timesteps_and_init_noise_sigma_match(name, config_id, steps):
    config = CONFIGS[config_id][0]
    sampler = make_sampler(name, config)
    sampler.set_timesteps(steps)
    reference = reference_scheduler(name, config)
    reference.set_timesteps(steps)
    expected = reference.timesteps.numpy()
    assert sampler.timesteps.dtype == expected.dtype
    np.testing.assert_array_equal(sampler.timesteps, expected)
    assert sampler.order == reference.order
    assert sampler.init_noise_sigma == pytest.approx(float(reference.init_noise_sigma), rel=1e-6)
    np.testing.assert_allclose(sampler.alphas_cumprod, reference.alphas_cumprod.numpy(), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("name, config_id, steps", cases())
def test_denoising_loop_matches(name, config_id, steps, monkeypatch):
    config = CONFIGS[config_id][0]
    sampler = make_sampler(name, config)
    sampler.set_timesteps(steps)
    reference = reference_scheduler(name, config)
    reference.set_timesteps(steps)
    latents = random(0) * np.float32(sampler.init_noise_sigma)
    noises = [random(100 + k) for k in range(len(sampler.timesteps))] if sampler.needs_noise else None
    expected = run_reference(reference, latents, noises=noises, monkeypatch=monkeypatch)
    loose = config_id == "zero_snr" and name in ("euler", "euler_a")
    assert_close(run_ours(sampler, latents, noises=noises), expected,
                 ZERO_SNR_EULER_TOLERANCE if loose else TOLERANCE)


@pytest.mark.parametrize("name, config_id, steps", cases(
    ("sd1", "sd2_v", "trailing", "leading", "prk", "sigma_min_no_lower_final"), step_counts=(7, 25)))
@pytest.mark.parametrize("strength", [0.3, 0.75])
def test_image_to_image_matches(name, config_id, steps, strength, monkeypatch):
    """Start at t_start * order after add_noise, as diffusers' img2img pipeline does."""
    config = CONFIGS[config_id][0]
    sampler = make_sampler(name, config)
    sampler.set_timesteps(steps)
    reference = reference_scheduler(name, config)
    reference.set_timesteps(steps)
    t_start = steps - int(steps * strength)
    start = t_start * sampler.order
    if hasattr(reference, "set_begin_index"):
        reference.set_begin_index(start)  # before add_noise, as the pipeline does
    original, noise = random(1), random(2)

    noised = sampler.add_noise(original, noise, start).numpy()
    timestep = reference.timesteps[start:start + 1]
    expected_noised = reference.add_noise(torch.from_numpy(original), torch.from_numpy(noise), timestep).numpy()
    assert_close(noised, expected_noised, 1e-6)

    noises = [random(100 + k) for k in range(len(sampler.timesteps))] if sampler.needs_noise else None
    expected = run_reference(reference, expected_noised, start, noises, monkeypatch=monkeypatch)
    assert_close(run_ours(sampler, noised, start, noises), expected)


@pytest.mark.parametrize("name, overrides", [("ddim", {"eta": 0.3}), ("ddim", {"eta": 1.0}), ("euler_a", {})])
@pytest.mark.parametrize("config_id", ["sd1", "sd2_v", "leading", "trailing", "zero_snr"])
@pytest.mark.parametrize("steps", [1, 7, 25])
def test_stochastic_samplers_match_with_same_noise(name, overrides, config_id, steps, monkeypatch):
    if config_id == "zero_snr" and overrides.get("eta") == 1.0:
        pytest.skip("diffusers gives NaN: sqrt(1 - alpha_prev - std**2) of a value rounded below 0")
    config = CONFIGS[config_id][0]
    sampler = make_sampler(name, config, **overrides)
    assert sampler.needs_noise
    sampler.set_timesteps(steps)
    reference = reference_scheduler(name, config)
    reference.set_timesteps(steps)
    latents = random(0) * np.float32(sampler.init_noise_sigma)
    noises = [random(100 + k) for k in range(len(sampler.timesteps))]
    expected = run_reference(reference, latents, noises=noises, eta=overrides.get("eta", 0.0),
                             monkeypatch=monkeypatch)
    ours = run_ours(sampler, latents, noises=noises)
    assert_close(ours, expected)
    if steps > 1:  # the noise matters (euler_a's last step adds none)
        sampler.set_timesteps(steps)
        other = run_ours(sampler, latents, noises=[random(200 + k) for k in range(len(noises))])
        assert np.abs(other - expected).max() > 1e-3


@pytest.mark.parametrize("name, overrides", [("euler_a", {}), ("ddim", {"eta": 0.5})])
def test_missing_noise_raises(name, overrides):
    sampler = make_sampler(name, SD1, **overrides)
    sampler.set_timesteps(5)
    x = random(0)
    with pytest.raises(ValueError, match="noise"):
        sampler.step(fake_model(x, sampler.timesteps[0]), 0, x)


@pytest.mark.parametrize("name", ["ddim", "pndm", "euler"])
def test_deterministic_samplers_need_no_noise(name):
    sampler = make_sampler(name, SD1)
    assert not sampler.needs_noise


@pytest.mark.parametrize("name", SAMPLER_NAMES)
def test_set_timesteps_resets_state(name):
    sampler = make_sampler(name, SD1)
    latents = random(0)
    noises = [random(100 + k) for k in range(40)] if sampler.needs_noise else None
    sampler.set_timesteps(7)
    first = run_ours(sampler, latents * np.float32(sampler.init_noise_sigma), noises=noises)
    sampler.set_timesteps(20)
    x = tf.constant(latents)
    for i in range(3):  # a partial run leaves history behind
        x = sampler.step(fake_model(x.numpy(), sampler.timesteps[i]), i, x, None if noises is None else noises[i])
    sampler.set_timesteps(7)
    again = run_ours(sampler, latents * np.float32(sampler.init_noise_sigma), noises=noises)
    np.testing.assert_array_equal(first, again)


def test_steps_must_be_consecutive():
    sampler = make_sampler("dpmpp_2m", SD1)
    sampler.set_timesteps(10)
    x = random(0)
    x = sampler.step(fake_model(x, sampler.timesteps[0]), 0, x)
    with pytest.raises(ValueError, match="consecutive"):
        sampler.step(fake_model(x, sampler.timesteps[2]), 2, x)


@pytest.mark.parametrize("name, array, index", [
    ("ddim", "_alphas", 1),
    ("pndm", "alphas_cumprod", 801),
    ("euler", "sigmas", 1),
    ("euler_a", "sigmas", 1),
    ("lms", "sigmas", 1),
    ("dpmpp_2m", "_lambdas", 1),
    ("dpmpp_2m_karras", "_lambdas", 1),
])
def test_loop_comparison_detects_a_perturbed_scalar(name, array, index, monkeypatch):
    """The tolerance catches one schedule scalar of the second step off by 0.1%."""
    sampler = make_sampler(name, SD1)
    sampler.set_timesteps(10)
    getattr(sampler, array)[index] *= 1 + 1e-3
    reference = reference_scheduler(name, SD1)
    reference.set_timesteps(10)
    latents = random(0) * np.float32(sampler.init_noise_sigma)
    noises = [random(100 + k) for k in range(10)] if sampler.needs_noise else None
    expected = run_reference(reference, latents, noises=noises, monkeypatch=monkeypatch)
    with pytest.raises(AssertionError, match="relative error"):
        assert_close(run_ours(sampler, latents, noises=noises), expected)


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError) as error:
        make_sampler("nope", SD1)
    for name in SAMPLER_NAMES:
        assert name in str(error.value)


@pytest.mark.parametrize("name", SAMPLER_NAMES)
def test_bad_beta_schedule_names_the_key(name):
    with pytest.raises(ValueError, match="beta_schedule"):
        make_sampler(name, {**SD1, "beta_schedule": "quadratic"})


@pytest.mark.parametrize("name, config, overrides, key", [
    ("euler", {**SD1, "timestep_spacing": "sometimes"}, {}, "timestep_spacing"),
    ("pndm", SD1, {"prediction_type": "sample"}, "prediction_type"),
    ("euler_a", SD2, {"prediction_type": "flow_prediction"}, "prediction_type"),
    ("euler", {**SD1, "use_karras_sigmas": True}, {}, "use_karras_sigmas"),
    ("ddim", {**SD1, "thresholding": True}, {}, "thresholding"),
    ("dpmpp_2m", {**SD1, "solver_type": "heun"}, {}, "solver_type"),
    ("dpmpp_2m", {**SD1, "final_sigmas_type": "max"}, {}, "final_sigmas_type"),
    ("ddim", SD1, {"eta": -1.0}, "eta"),
    ("lms", SD1, {"eta": 0.5}, "eta"),
    ("ddim", {**SD1, "trained_betas": [0.01] * 10}, {}, "trained_betas"),
    ("ddim", {**SD1, "num_train_timesteps": 0}, {}, "num_train_timesteps"),
])
def test_bad_values_name_the_key(name, config, overrides, key):
    with pytest.raises(ValueError, match=key):
        make_sampler(name, config, **overrides)


def test_unknown_config_keys_are_ignored():
    config = {**SD1, "_diffusers_version": "0.6.0", "some_future_key": 3, "use_karras_sigmas": True}
    sampler = make_sampler("ddim", config)  # DDIM has no use_karras_sigmas: ignored, as diffusers does
    sampler.set_timesteps(5)
    np.testing.assert_array_equal(sampler.timesteps, [801, 601, 401, 201, 1])


def test_sampler_name_decides_the_dpm_sigmas():
    plain = make_sampler("dpmpp_2m", {**SD1, "use_karras_sigmas": True})
    karras = make_sampler("dpmpp_2m_karras", SD1)
    plain.set_timesteps(10)
    karras.set_timesteps(10)
    assert not np.array_equal(plain.timesteps, karras.timesteps)


def test_trained_betas_match():
    betas = list(np.linspace(1e-4, 2e-2, 1000))
    sampler = make_sampler("euler", {"trained_betas": betas})
    reference = EulerDiscreteScheduler.from_config({"trained_betas": betas})
    np.testing.assert_allclose(sampler.alphas_cumprod, reference.alphas_cumprod.numpy(), rtol=1e-6)


def test_step_before_set_timesteps_raises():
    sampler = make_sampler("euler", SD1)
    with pytest.raises(RuntimeError, match="set_timesteps"):
        sampler.step(random(0), 0, random(1))


@pytest.mark.parametrize("name, config, steps", [
    ("pndm", {**SD1, "skip_prk_steps": False}, 3),  # diffusers fails inside numpy here
    ("euler", SD1, 0),
    ("ddim", SD1, 1001),
])
def test_bad_step_counts_raise(name, config, steps):
    with pytest.raises(ValueError, match="num_inference_steps"):
        make_sampler(name, config).set_timesteps(steps)
