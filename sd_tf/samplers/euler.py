"""Euler (Karras et al. 2022, Algorithm 2 without churn), as diffusers' EulerDiscreteScheduler."""

from sd_tf.samplers.schedule import SigmaSampler


class EulerSampler(SigmaSampler):
    """Euler: x += dx/dsigma * (sigma_next - sigma)."""

    name = "euler"
    defaults = {**SigmaSampler.defaults, "rescale_betas_zero_snr": False}
    fixed = {
        "interpolation_type": "linear",
        "use_karras_sigmas": False,
        "use_exponential_sigmas": False,
        "use_beta_sigmas": False,
        "timestep_type": "discrete",
        "final_sigmas_type": "zero",
    }

    def _step(self, model_output, i, sample, noise):
        step_size = self.sigmas[i + 1] - self.sigmas[i]
        return sample + self._derivative(model_output, i, sample) * float(step_size)
