"""DPM-Solver++(2M) (Lu et al. 2022), as diffusers' DPMSolverMultistepScheduler
with algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint".

It steps in lambda = log(alpha_t / sigma_t) using the model's data (x0)
prediction at the current and the previous step. The sampler name fixes
algorithm_type, solver_order and use_karras_sigmas; config values for them are ignored.
"""

import numpy as np

from sd_tf.samplers.schedule import (
    Sampler,
    as_float32,
    interpolated_sigmas,
    karras_sigmas,
    sigmas_to_timesteps,
    spaced_timesteps,
    training_sigmas,
)


def _alpha_sigma(sigma):
    """(alpha_t, sigma_t) of the variance-preserving process with noise level sigma, float32."""
    alpha = np.float32(1.0) / np.sqrt(sigma * sigma + 1)
    return alpha, sigma * alpha


class DPMSolverPP2MSampler(Sampler):
    """DPM-Solver++(2M): first order at the first step (and at the last, per
    `lower_order_final` / `euler_at_final` / `final_sigmas_type`), second order otherwise.
    """

    name = "dpmpp_2m"
    karras = False  # use Karras sigmas (forced by the sampler name, not read from the config)
    defaults = {
        **Sampler.defaults,
        "lower_order_final": True,
        "euler_at_final": False,
        "final_sigmas_type": "zero",
        "rescale_betas_zero_snr": False,
    }
    fixed = {
        "solver_type": "midpoint",
        "thresholding": False,
        "variance_type": None,
        "lambda_min_clipped": -float("inf"),
        "use_exponential_sigmas": False,
        "use_beta_sigmas": False,
        "use_lu_lambdas": False,
        "use_flow_sigmas": False,
        "use_dynamic_shifting": False,
    }
    uses_sigmas = True

    def _validate(self):
        super()._validate()
        if self.config["final_sigmas_type"] not in ("zero", "sigma_min"):
            raise ValueError(f"{self.name}: final_sigmas_type must be 'zero' or 'sigma_min', "
                             f"got {self.config['final_sigmas_type']!r}")

    def _set_timesteps(self, num_inference_steps):
        c, n = self.config, num_inference_steps
        if self.karras:
            train_sigmas = training_sigmas(self.alphas_cumprod)
            sigmas = karras_sigmas(float(train_sigmas[0]), float(train_sigmas[-1]), n)
            timesteps = sigmas_to_timesteps(sigmas, self.alphas_cumprod)
            if c["beta_schedule"] != "squaredcos_cap_v2":
                timesteps = np.round(timesteps)
        else:
            if c["timestep_spacing"] == "trailing":
                timesteps = spaced_timesteps("trailing", c["num_train_timesteps"], n, c["steps_offset"])
            else:  # n + 1 levels down to 0, without the 0
                timesteps = spaced_timesteps(c["timestep_spacing"], c["num_train_timesteps"], n + 1,
                                             c["steps_offset"])[:-1]
            timesteps = np.round(timesteps)
            sigmas = interpolated_sigmas(timesteps, self.alphas_cumprod)
        self.timesteps = timesteps.astype(np.int64)

        if c["final_sigmas_type"] == "zero":
            final_sigma = 0.0
        else:
            final_sigma = training_sigmas(self.alphas_cumprod)[0]
        self.sigmas = np.append(sigmas, final_sigma).astype(np.float32)
        self._alphas, self._sigma_ts = _alpha_sigma(self.sigmas)
        with np.errstate(divide="ignore"):  # sigma_t = 0 at the end gives lambda = inf, as in diffusers
            self._lambdas = np.log(self._alphas) - np.log(self._sigma_ts)
        self._data_predictions = []

    def add_noise(self, original, noise, i):
        return float(self._alphas[i]) * as_float32(original) + float(self._sigma_ts[i]) * as_float32(noise)

    def _data_prediction(self, model_output, i, sample):
        """The model's estimate of x0 at `sigmas[i]`."""
        alpha, sigma = float(self._alphas[i]), float(self._sigma_ts[i])
        if self.config["prediction_type"] == "epsilon":
            return (sample - sigma * model_output) / alpha
        if self.config["prediction_type"] == "v_prediction":
            return alpha * sample - sigma * model_output
        return model_output

    def _first_order_final(self, i):
        """Whether the last step falls back to first order."""
        c = self.config
        short = c["lower_order_final"] and len(self.timesteps) < 15
        return i == len(self.timesteps) - 1 and (c["euler_at_final"] or short or c["final_sigmas_type"] == "zero")

    def _step(self, model_output, i, sample, noise):
        x0 = self._data_prediction(model_output, i, sample)
        self._data_predictions = (self._data_predictions + [x0])[-2:]
        h = self._lambdas[i + 1] - self._lambdas[i]
        sample_coeff = self._sigma_ts[i + 1] / self._sigma_ts[i]
        x0_coeff = self._alphas[i + 1] * (np.exp(-h) - 1)
        prev_sample = float(sample_coeff) * sample - float(x0_coeff) * x0
        if len(self._data_predictions) == 2 and not self._first_order_final(i):
            # Second order: D1 = (x0 - previous x0) / r0 with r0 = h_previous / h.
            with np.errstate(divide="ignore"):  # h = 0 (a Karras end at sigma_min) gives D1 = 0
                r0 = (self._lambdas[i] - self._lambdas[i - 1]) / h
            d1 = float(1 / r0) * (x0 - self._data_predictions[0])
            prev_sample = prev_sample - float(np.float32(0.5) * x0_coeff) * d1
        return prev_sample


class DPMSolverPP2MKarrasSampler(DPMSolverPP2MSampler):
    """DPM-Solver++(2M) on the Karras et al. (2022) noise levels (diffusers' use_karras_sigmas=True)."""

    name = "dpmpp_2m_karras"
    karras = True
