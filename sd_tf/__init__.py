"""Stable Diffusion in TensorFlow / Keras 3.

``from sd_tf import StableDiffusion`` imports TensorFlow; ``sd_tf.tokenizer``
and ``sd_tf.shapes`` alone do not.
"""

from sd_tf.tokenizer import CLIPTokenizer

__all__ = ["CLIPTokenizer", "StableDiffusion"]


def __getattr__(name):
    if name == "StableDiffusion":
        from sd_tf.stable_diffusion import StableDiffusion

        return StableDiffusion
    raise AttributeError(f"module 'sd_tf' has no attribute {name!r}")
