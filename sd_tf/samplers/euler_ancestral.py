"""Euler ancestral (k-diffusion's euler_a), as diffusers' EulerAncestralDiscreteScheduler."""

import numpy as np

from sd_tf.samplers.schedule import SigmaSampler


class EulerAncestralSampler(SigmaSampler):
    """Euler-a: an Euler step down to sigma_down, then fresh noise of std sigma_up.

    sigma_down**2 + sigma_up**2 = sigma_next**2; `step` needs `noise` every step.
    """

    name = "euler_a"
    prediction_types = ("epsilon", "v_prediction")
    defaults = {**SigmaSampler.defaults, "rescale_betas_zero_snr": False}

    @property
    def needs_noise(self):
        return True

    def _step(self, model_output, i, sample, noise):
        sigma, sigma_next = self.sigmas[i], self.sigmas[i + 1]
        sigma_up = np.sqrt(sigma_next * sigma_next * (sigma * sigma - sigma_next * sigma_next) / (sigma * sigma))
        sigma_down = np.sqrt(sigma_next * sigma_next - sigma_up * sigma_up)
        step_size = sigma_down - sigma
        return (sample + self._derivative(model_output, i, sample) * float(step_size)) + noise * float(sigma_up)
