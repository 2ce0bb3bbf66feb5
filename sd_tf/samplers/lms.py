"""Linear multistep (k-diffusion's LMS), as diffusers' LMSDiscreteScheduler, order 4."""

import numpy as np
from numpy.polynomial import polynomial

from sd_tf.samplers.schedule import SigmaSampler

_MAX_ORDER = 4


def lms_coefficients(sigmas, i):
    """Weights of the derivatives at sigmas[i], sigmas[i-1], ... for the step sigmas[i] -> sigmas[i+1].

    Weight k integrates the Lagrange basis polynomial of node sigmas[i-k] over
    the step; there are min(i + 1, 4) of them (diffusers integrates numerically).
    """
    nodes = sigmas[max(i - _MAX_ORDER + 1, 0):i + 1][::-1].astype(np.float64)
    coefficients = []
    for k, node in enumerate(nodes):
        others = np.delete(nodes, k)
        antiderivative = polynomial.polyint(polynomial.polyfromroots(others) / np.prod(node - others))
        integral = polynomial.polyval(sigmas[i + 1], antiderivative) - polynomial.polyval(sigmas[i], antiderivative)
        coefficients.append(float(integral))
    return coefficients


class LMSSampler(SigmaSampler):
    """LMS: the next sample from the last (up to 4) derivatives dx/dsigma."""

    name = "lms"
    fixed = {"use_karras_sigmas": False, "use_exponential_sigmas": False, "use_beta_sigmas": False}

    def _set_timesteps(self, num_inference_steps):
        super()._set_timesteps(num_inference_steps)
        self._coefficients = [lms_coefficients(self.sigmas, i) for i in range(len(self.timesteps))]
        self._derivatives = []

    def _step(self, model_output, i, sample, noise):
        self._derivatives = (self._derivatives + [self._derivative(model_output, i, sample)])[-_MAX_ORDER:]
        # Like diffusers, a run started at i > 0 (image-to-image) uses the first
        # weights of the order-min(i + 1, 4) rule for the derivatives it has.
        terms = zip(self._coefficients[i], reversed(self._derivatives))
        return sample + sum(coefficient * derivative for coefficient, derivative in terms)
