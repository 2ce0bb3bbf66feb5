"""Diffusion samplers equal to diffusers' schedulers, stepping TensorFlow tensors.

    sampler = make_sampler("euler", scheduler_config)   # config: the checkpoint's scheduler_config.json
    sampler.set_timesteps(30)
    x = noise * sampler.init_noise_sigma
    for i, t in enumerate(sampler.timesteps):
        eps = unet(sampler.scale_model_input(x, i), t)
        x = sampler.step(eps, i, x, noise=None)         # euler_a / ddim with eta > 0 need noise

Image-to-image starts at i0 = t_start * sampler.order from `sampler.add_noise(x0, noise, i0)`.
"""

from sd_tf.samplers.ddim import DDIMSampler
from sd_tf.samplers.dpm_solver import DPMSolverPP2MKarrasSampler, DPMSolverPP2MSampler
from sd_tf.samplers.euler import EulerSampler
from sd_tf.samplers.euler_ancestral import EulerAncestralSampler
from sd_tf.samplers.lms import LMSSampler
from sd_tf.samplers.pndm import PNDMSampler
from sd_tf.samplers.schedule import SD1_SCHEDULER_CONFIG, SD2_SCHEDULER_CONFIG, Sampler

_SAMPLERS = {
    cls.name: cls
    for cls in (DDIMSampler, PNDMSampler, LMSSampler, EulerSampler, EulerAncestralSampler,
                DPMSolverPP2MSampler, DPMSolverPP2MKarrasSampler)
}
SAMPLER_NAMES = tuple(_SAMPLERS)


def make_sampler(name, scheduler_config=None, **overrides):
    """The sampler `name` configured from a diffusers scheduler config dict, then `overrides`.

    Without a config, the defaults of the matching diffusers class apply (not
    Stable Diffusion's betas: pass the checkpoint's config or SD1_SCHEDULER_CONFIG).
    Raises ValueError for an unknown name, option or bad config value.
    """
    if name not in _SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; valid names: {', '.join(SAMPLER_NAMES)}")
    return _SAMPLERS[name](scheduler_config, **overrides)


__all__ = ["SAMPLER_NAMES", "SD1_SCHEDULER_CONFIG", "SD2_SCHEDULER_CONFIG", "Sampler", "make_sampler"]
