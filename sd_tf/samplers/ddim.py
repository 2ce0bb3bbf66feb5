"""DDIM (Song et al. 2020), as diffusers' DDIMScheduler, with `eta` for added noise."""

import numpy as np
import tensorflow as tf

from sd_tf.samplers.schedule import AlphaSampler


class DDIMSampler(AlphaSampler):
    """DDIM; `eta` = 0 is deterministic, `eta` = 1 is DDPM-like (then `step` needs `noise`).

    As in diffusers, the previous timestep is always `t - num_train_timesteps // num_inference_steps`,
    whatever the timestep spacing.
    """

    name = "ddim"
    defaults = {
        **AlphaSampler.defaults,
        "set_alpha_to_one": True,
        "clip_sample": True,
        "clip_sample_range": 1.0,
        "rescale_betas_zero_snr": False,
        "eta": 0.0,
    }
    fixed = {"thresholding": False}

    def _validate(self):
        super()._validate()
        if not self.config["eta"] >= 0:
            raise ValueError(f"ddim: eta must be >= 0, got {self.config['eta']!r}")
        if not self.config["clip_sample_range"] > 0:
            raise ValueError(f"ddim: clip_sample_range must be > 0, got {self.config['clip_sample_range']!r}")

    @property
    def needs_noise(self):
        return self.config["eta"] > 0

    def _set_timesteps(self, num_inference_steps):
        self.timesteps = self._integer_timesteps(num_inference_steps)
        step_ratio = self.config["num_train_timesteps"] // num_inference_steps
        self._alphas = self.alphas_cumprod[self.timesteps]
        self._prev_alphas = np.array([self._alpha_cumprod_at(t - step_ratio) for t in self.timesteps])

    def _step(self, model_output, i, sample, noise):
        c = self.config
        alpha, prev_alpha = self._alphas[i], self._prev_alphas[i]
        beta, prev_beta = 1 - alpha, 1 - prev_alpha
        sqrt_alpha, sqrt_beta = float(np.sqrt(alpha)), float(np.sqrt(beta))
        if c["prediction_type"] == "epsilon":
            original = (sample - sqrt_beta * model_output) / sqrt_alpha
            epsilon = model_output
        elif c["prediction_type"] == "sample":
            original = model_output
            epsilon = (sample - sqrt_alpha * original) / sqrt_beta
        else:  # v_prediction
            original = sqrt_alpha * sample - sqrt_beta * model_output
            epsilon = sqrt_alpha * model_output + sqrt_beta * sample
        if c["clip_sample"]:
            limit = float(c["clip_sample_range"])
            original = tf.clip_by_value(original, -limit, limit)

        variance = (prev_beta / beta) * (1 - alpha / prev_alpha)
        std = np.float32(c["eta"]) * np.sqrt(variance)
        direction = float(np.sqrt(1 - prev_alpha - std * std)) * epsilon
        prev_sample = float(np.sqrt(prev_alpha)) * original + direction
        if c["eta"] > 0:
            prev_sample = prev_sample + float(std) * noise
        return prev_sample
