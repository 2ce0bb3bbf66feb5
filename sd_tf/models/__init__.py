"""Keras 3 functional models of Stable Diffusion's networks, and their configs."""

from sd_tf.models.text_encoder import CLIPTextConfig, TextEncoder
from sd_tf.models.unet import UNet, UNetConfig
from sd_tf.models.vae import VAEConfig, VAEDecoder, VAEEncoder

__all__ = ["CLIPTextConfig", "TextEncoder", "UNet", "UNetConfig", "VAEConfig", "VAEDecoder", "VAEEncoder"]
