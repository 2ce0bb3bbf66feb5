"""Training noise schedule, timestep spacing and the base classes of the samplers.

Every sampler reproduces one diffusers scheduler. The per-step scalars are
computed in numpy with the same float32/float64 choices as diffusers; the
tensor arithmetic of `step` runs in TensorFlow (float32).

Class tree:
    Sampler                      config, training schedule, the step() contract
    ├── AlphaSampler             works on alphas_cumprod[t]: DDIM, PNDM
    ├── SigmaSampler             works on x = x0 + sigma * eps: LMS, Euler, Euler-a
    └── DPMSolverMultistep       (in dpm_solver.py)
"""

import math

import numpy as np
import tensorflow as tf

# scheduler/scheduler_config.json of Stable Diffusion 1.x (e.g. v1-5).
SD1_SCHEDULER_CONFIG = {
    "_class_name": "PNDMScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "clip_sample": False,
    "trained_betas": None,
}

# scheduler/scheduler_config.json of Stable Diffusion 2.1 (768 px, v-prediction).
SD2_SCHEDULER_CONFIG = {
    "_class_name": "DDIMScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "prediction_type": "v_prediction",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "clip_sample": False,
    "trained_betas": None,
}

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
TIMESTEP_SPACINGS = ("leading", "linspace", "trailing")


def make_betas(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas=None):
    """The float32 betas of a diffusers beta schedule (`trained_betas`, if given, wins)."""
    if trained_betas is not None:
        return np.asarray(trained_betas, dtype=np.float32)
    if beta_schedule == "linear":
        return np.linspace(beta_start, beta_end, num_train_timesteps).astype(np.float32)
    if beta_schedule == "scaled_linear":
        roots = np.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps).astype(np.float32)
        return roots * roots
    if beta_schedule == "squaredcos_cap_v2":
        # The Glide cosine schedule, alpha_bar(t) = cos((t + 0.008) / 1.008 * pi / 2) ** 2.
        def alpha_bar(t):
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

        n = num_train_timesteps
        betas = [min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), 0.999) for i in range(n)]
        return np.array(betas, dtype=np.float32)
    raise ValueError(f"beta_schedule must be one of {BETA_SCHEDULES}, got {beta_schedule!r}")


def cumulative_alphas(betas):
    """alphas_cumprod = cumprod(1 - betas), accumulated in float64 and stored as float32 (as torch does)."""
    alphas = np.float32(1.0) - betas
    return np.cumprod(alphas.astype(np.float64)).astype(np.float32)


def rescale_zero_terminal_snr(betas):
    """Betas rescaled so the last timestep has zero SNR (arXiv:2305.08891, Algorithm 1), in float32."""
    root = np.sqrt(cumulative_alphas(betas))
    first, last = root[0], root[-1]
    root = (root - last) * (first / (first - last))
    alphas_bar = root * root
    alphas = np.concatenate([alphas_bar[:1], alphas_bar[1:] / alphas_bar[:-1]])
    return np.float32(1.0) - alphas


def spaced_timesteps(spacing, num_train_timesteps, num_steps, steps_offset):
    """`num_steps` descending timesteps in [0, num_train_timesteps) as float64.

    "linspace" values are not rounded (Euler-type samplers keep the fractions);
    "leading" adds `steps_offset`; "trailing" may return one value more than
    asked when num_train_timesteps / num_steps is inexact, as diffusers does.
    """
    if spacing == "linspace":
        return np.linspace(0, num_train_timesteps - 1, num_steps)[::-1].copy()
    if spacing == "leading":
        step_ratio = num_train_timesteps // num_steps
        return (np.arange(num_steps) * step_ratio)[::-1] + float(steps_offset)
    if spacing == "trailing":
        return np.round(np.arange(num_train_timesteps, 0, -num_train_timesteps / num_steps)) - 1
    raise ValueError(f"timestep_spacing must be one of {TIMESTEP_SPACINGS}, got {spacing!r}")


def training_sigmas(alphas_cumprod):
    """sigma_t = sqrt((1 - alphas_cumprod) / alphas_cumprod) for every training timestep, float32."""
    return np.sqrt((np.float32(1.0) - alphas_cumprod) / alphas_cumprod)


def interpolated_sigmas(timesteps, alphas_cumprod):
    """Sigmas at (possibly fractional) timesteps, linearly interpolated in float64."""
    sigmas = training_sigmas(alphas_cumprod)
    return np.interp(np.asarray(timesteps, dtype=np.float64), np.arange(len(sigmas)), sigmas)


def karras_sigmas(sigma_min, sigma_max, num_steps, rho=7.0):
    """The Karras et al. (2022) noise levels from sigma_max down to sigma_min, float64."""
    ramp = np.linspace(0, 1, num_steps)
    min_inv_rho = sigma_min ** (1 / rho)
    max_inv_rho = sigma_max ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def sigmas_to_timesteps(sigmas, alphas_cumprod):
    """Fractional timesteps whose sigma is `sigmas`, interpolating log sigma linearly (float64)."""
    log_sigmas = np.log(training_sigmas(alphas_cumprod))
    log_sigma = np.log(np.maximum(sigmas, 1e-10))
    # Index of the last training log sigma <= log_sigma, kept one below the end.
    low = np.cumsum(log_sigma - log_sigmas[:, None] >= 0, axis=0).argmax(axis=0)
    low = low.clip(max=len(log_sigmas) - 2)
    weight = np.clip((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[low + 1]), 0, 1)
    return (1 - weight) * low + weight * (low + 1)


def as_float32(x):
    """`x` (array or tensor of any float dtype) as a float32 tf.Tensor."""
    return tf.cast(x, tf.float32)


class Sampler:
    """Base of all samplers: config handling, the training noise schedule and the step() contract.

    Use: `set_timesteps(n)`, then for each index `i` of `timesteps` evaluate the
    model on `scale_model_input(x, i)` at `timesteps[i]` and call
    `x = step(model_output, i, x, noise)`, with consecutive `i`.
    """

    name = None
    order = 1
    init_noise_sigma = 1.0
    prediction_types = ("epsilon", "sample", "v_prediction")
    # Config keys honoured, with the defaults of the diffusers class.
    defaults = {
        "num_train_timesteps": 1000,
        "beta_start": 0.0001,
        "beta_end": 0.02,
        "beta_schedule": "linear",
        "trained_betas": None,
        "prediction_type": "epsilon",
        "timestep_spacing": "linspace",
        "steps_offset": 0,
    }
    # Keys the diffusers class knows but that are supported at this value only.
    fixed = {}
    # True when the sampler divides by sigma: zero-SNR rescaling then keeps the
    # last alphas_cumprod at 2**-24 instead of 0, as diffusers does.
    uses_sigmas = False

    def __init__(self, scheduler_config=None, **overrides):
        """Configures from a diffusers scheduler config; keys the diffusers class does not know are ignored.

        `overrides` must be keys of `defaults` or `fixed`; they win over the config.
        """
        known = {**self.defaults, **self.fixed}
        for key in overrides:
            if key not in known:
                raise ValueError(f"{self.name}: unknown option {key!r}; options: {sorted(known)}")
        given = {k: v for k, v in (scheduler_config or {}).items() if k in known}
        config = {**known, **given, **overrides}
        for key, supported in self.fixed.items():
            value = config.pop(key)
            if value != supported:
                raise ValueError(f"{self.name}: {key}={value!r} is not supported, only {key}={supported!r}")
        self.config = config
        self._validate()

        betas = make_betas(config["num_train_timesteps"], config["beta_start"], config["beta_end"],
                           config["beta_schedule"], config["trained_betas"])
        if config.get("rescale_betas_zero_snr", False):
            betas = rescale_zero_terminal_snr(betas)
        self.alphas_cumprod = cumulative_alphas(betas)
        if config.get("rescale_betas_zero_snr", False) and self.uses_sigmas:
            self.alphas_cumprod[-1] = 2.0**-24
        self.num_inference_steps = None
        self.timesteps = None
        self._next_index = None

    def _validate(self):
        """Raises ValueError naming the first config key with a bad value."""
        c = self.config
        n = c["num_train_timesteps"]
        if not isinstance(n, int) or isinstance(n, bool) or n < 2:
            raise ValueError(f"{self.name}: num_train_timesteps must be an int >= 2, got {n!r}")
        choices = {"beta_schedule": BETA_SCHEDULES, "timestep_spacing": TIMESTEP_SPACINGS,
                   "prediction_type": self.prediction_types}
        for key, allowed in choices.items():
            if c[key] not in allowed:
                raise ValueError(f"{self.name}: {key} must be one of {allowed}, got {c[key]!r}")
        if c["trained_betas"] is not None and len(c["trained_betas"]) != n:
            raise ValueError(f"{self.name}: trained_betas has {len(c['trained_betas'])} values, "
                             f"num_train_timesteps is {n}")
        if not isinstance(c["steps_offset"], int) or isinstance(c["steps_offset"], bool):
            raise ValueError(f"{self.name}: steps_offset must be an int, got {c['steps_offset']!r}")

    def set_timesteps(self, num_inference_steps):
        """Builds `timesteps` (and `init_noise_sigma`) for `num_inference_steps` and resets all state."""
        n = num_inference_steps
        if not isinstance(n, (int, np.integer)) or not 1 <= n <= self.config["num_train_timesteps"]:
            raise ValueError(f"{self.name}: num_inference_steps must be an int in "
                             f"[1, {self.config['num_train_timesteps']}], got {n!r}")
        self.num_inference_steps = int(n)
        self._next_index = None
        self._set_timesteps(int(n))

    def _set_timesteps(self, num_inference_steps):
        """Sets `timesteps`, the per-step scalars, and clears any history."""
        raise NotImplementedError

    def scale_model_input(self, sample, i):
        """The UNet input for `sample` at `timesteps[i]` (identity unless overridden)."""
        return as_float32(sample)

    @property
    def needs_noise(self):
        """True when `step` needs a standard normal `noise` tensor shaped like the sample."""
        return False

    def step(self, model_output, i, sample, noise=None):
        """The sample after denoising step `i` (from `timesteps[i]` to the next, less noisy, level)."""
        i = int(i)
        if self.timesteps is None:
            raise RuntimeError(f"{self.name}: call set_timesteps() before step()")
        if self.needs_noise and noise is None:
            raise ValueError(f"{self.name}: step() needs a `noise` tensor (standard normal, shaped like the sample)")
        if self._next_index is not None and i != self._next_index:
            raise ValueError(f"{self.name}: step({i}) after step({self._next_index - 1}); steps must use "
                             "consecutive indices (call set_timesteps() to start again)")
        self._next_index = i + 1
        if noise is not None:
            noise = as_float32(noise)
        return self._step(as_float32(model_output), i, as_float32(sample), noise)

    def _step(self, model_output, i, sample, noise):
        """`step` on float32 tensors (`noise` may be None when not `needs_noise`)."""
        raise NotImplementedError

    def add_noise(self, original, noise, i):
        """`original` noised to the level of `timesteps[i]` (image-to-image start)."""
        raise NotImplementedError


class AlphaSampler(Sampler):
    """Base of the samplers working on alphas_cumprod at integer timesteps (DDIM, PNDM)."""

    defaults = {**Sampler.defaults, "timestep_spacing": "leading", "set_alpha_to_one": False}

    def _integer_timesteps(self, num_inference_steps):
        """Descending int64 timesteps for the configured spacing."""
        c = self.config
        steps = spaced_timesteps(c["timestep_spacing"], c["num_train_timesteps"], num_inference_steps,
                                 c["steps_offset"])
        return np.round(steps).astype(np.int64)

    def _alpha_cumprod_at(self, t):
        """alphas_cumprod[t]; for t < 0, 1 if set_alpha_to_one else alphas_cumprod[0]."""
        if t >= 0:
            return self.alphas_cumprod[t]
        return np.float32(1.0) if self.config["set_alpha_to_one"] else self.alphas_cumprod[0]

    def add_noise(self, original, noise, i):
        alpha = self.alphas_cumprod[self.timesteps[i]]
        return float(np.sqrt(alpha)) * as_float32(original) + float(np.sqrt(1 - alpha)) * as_float32(noise)


class SigmaSampler(Sampler):
    """Base of the samplers working on x = x0 + sigma * eps with float timesteps (LMS, Euler, Euler-a).

    `sigmas[i]` is the noise level of `timesteps[i]`; `sigmas[-1]` is 0.
    """

    init_noise_sigma = None  # set by set_timesteps
    uses_sigmas = True

    def _set_timesteps(self, num_inference_steps):
        c = self.config
        self.timesteps = spaced_timesteps(c["timestep_spacing"], c["num_train_timesteps"], num_inference_steps,
                                          c["steps_offset"]).astype(np.float32)
        sigmas = interpolated_sigmas(self.timesteps, self.alphas_cumprod)
        self.sigmas = np.append(sigmas, 0.0).astype(np.float32)
        max_sigma = self.sigmas.max()
        if c["timestep_spacing"] == "leading":
            max_sigma = np.sqrt(max_sigma * max_sigma + 1)
        self.init_noise_sigma = float(max_sigma)

    def scale_model_input(self, sample, i):
        sigma = self.sigmas[i]
        return as_float32(sample) / float(np.sqrt(sigma * sigma + 1))

    def add_noise(self, original, noise, i):
        return as_float32(original) + as_float32(noise) * float(self.sigmas[i])

    def _derivative(self, model_output, i, sample):
        """dx/dsigma = (x - x0) / sigma at `sigmas[i]`, x0 being the model's denoised estimate."""
        sigma = self.sigmas[i]
        prediction = self.config["prediction_type"]
        if prediction == "epsilon":
            denoised = sample - float(sigma) * model_output
        elif prediction == "v_prediction":
            variance = sigma * sigma + 1
            denoised = model_output * float(-sigma / np.sqrt(variance)) + sample / float(variance)
        else:
            denoised = model_output
        return (sample - denoised) / float(sigma)
