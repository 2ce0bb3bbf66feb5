"""PNDM (Liu et al. 2022), as diffusers' PNDMScheduler.

With `skip_prk_steps` (Stable Diffusion's setting) this is PLMS: a linear
multistep method on the noise prediction, warmed up by one Heun-like step.
Without it, the first three steps are Runge-Kutta (PRK) steps of four model
evaluations each, so `timesteps` holds 12 PRK entries before the PLMS ones.

State follows diffusers exactly: a counter of `step` calls since
`set_timesteps`, so a run started at a later index (image-to-image) warms up
from that index, and PRK steps take their base timestep from the counter.
"""

import numpy as np

from sd_tf.samplers.schedule import AlphaSampler

_PRK_STEPS = 12  # 3 Runge-Kutta steps of 4 evaluations


class PNDMSampler(AlphaSampler):
    """PNDM: PLMS when `skip_prk_steps`, else PRK warm-up then PLMS."""

    name = "pndm"
    prediction_types = ("epsilon", "v_prediction")
    defaults = {**AlphaSampler.defaults, "skip_prk_steps": False}

    def _set_timesteps(self, num_inference_steps):
        if not self.config["skip_prk_steps"] and num_inference_steps < 4:
            raise ValueError("pndm: num_inference_steps must be >= 4 when skip_prk_steps is false")
        ascending = self._integer_timesteps(num_inference_steps)[::-1]
        self._step_ratio = self.config["num_train_timesteps"] // num_inference_steps
        if self.config["skip_prk_steps"]:
            self._prk_timesteps = np.array([], dtype=np.int64)
            # The highest timestep's next level is evaluated twice (warm-up correction).
            plms = np.concatenate([ascending[:-1], ascending[-2:-1], ascending[-1:]])[::-1]
        else:
            # Each of the 4 highest timesteps and its midpoint t + ratio // 2, as
            # [t0, mid, mid, t1, t1, mid, mid, t2, ...] from the highest down.
            half = np.tile([0, self._step_ratio // 2], 4)
            points = (ascending[-4:].repeat(2) + half)[:-1]
            self._prk_timesteps = points.repeat(2)[1:-1][::-1]
            plms = ascending[:-3][::-1]
        self.timesteps = np.concatenate([self._prk_timesteps, plms]).astype(np.int64)
        self._counter = 0
        self._noise_history = []  # model outputs at the start of each step (diffusers' `ets`)
        self._start_sample = None  # sample at the start of the current PRK / warm-up step
        self._rk_sum = 0  # running Runge-Kutta combination of model outputs

    def _step(self, model_output, i, sample, noise):
        if self._counter < len(self._prk_timesteps):
            prev_sample = self._step_prk(model_output, int(self.timesteps[i]), sample)
        else:
            prev_sample = self._step_plms(model_output, int(self.timesteps[i]), sample)
        self._counter += 1
        return prev_sample

    def _step_prk(self, model_output, t, sample):
        """One of the four evaluations of a Runge-Kutta step from `_prk_timesteps[counter // 4 * 4]`."""
        phase = self._counter % 4
        prev_t = t - (0 if self._counter % 2 else self._step_ratio // 2)
        start_t = int(self._prk_timesteps[self._counter // 4 * 4])
        if phase == 0:
            self._rk_sum = self._rk_sum + 1 / 6 * model_output
            self._noise_history.append(model_output)
            self._start_sample = sample
        elif phase in (1, 2):
            self._rk_sum = self._rk_sum + 1 / 3 * model_output
        else:
            model_output = self._rk_sum + 1 / 6 * model_output
            self._rk_sum = 0
        return self._prev_sample(self._start_sample, start_t, prev_t, model_output)

    def _step_plms(self, model_output, t, sample):
        """A linear multistep step on the last (up to 4) model outputs."""
        prev_t = t - self._step_ratio
        if self._counter == 1:
            # Warm-up correction: re-do the first step from its start with the
            # mean of the outputs at both of its ends.
            prev_t, t = t, t + self._step_ratio
        else:
            self._noise_history = self._noise_history[-3:] + [model_output]
        history = self._noise_history
        if len(history) == 1 and self._counter == 0:
            self._start_sample = sample
        elif len(history) == 1 and self._counter == 1:
            model_output = (model_output + history[-1]) / 2
            sample, self._start_sample = self._start_sample, None
        elif len(history) == 2:
            model_output = (3 * history[-1] - history[-2]) / 2
        elif len(history) == 3:
            model_output = (23 * history[-1] - 16 * history[-2] + 5 * history[-3]) / 12
        else:
            model_output = (1 / 24) * (55 * history[-1] - 59 * history[-2] + 37 * history[-3] - 9 * history[-4])
        return self._prev_sample(sample, t, prev_t, model_output)

    def _prev_sample(self, sample, t, prev_t, model_output):
        """x at `prev_t` from x at `t` and a noise estimate (PNDM paper, eq. 9)."""
        alpha, prev_alpha = self._alpha_cumprod_at(t), self._alpha_cumprod_at(prev_t)
        beta, prev_beta = 1 - alpha, 1 - prev_alpha
        if self.config["prediction_type"] == "v_prediction":
            model_output = float(np.sqrt(alpha)) * model_output + float(np.sqrt(beta)) * sample
        sample_coeff = np.sqrt(prev_alpha / alpha)
        denominator = alpha * np.sqrt(prev_beta) + np.sqrt(alpha * beta * prev_alpha)
        return float(sample_coeff) * sample - float(prev_alpha - alpha) * model_output / float(denominator)
