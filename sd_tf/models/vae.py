"""The VAE (diffusers' ``AutoencoderKL``): image <-> latent.

``VAEEncoder`` maps images in [-1, 1] to the latent posterior's mean and
log-variance (after ``quant_conv``); ``VAEDecoder`` maps latents (already
divided by the scaling factor) back to images (``post_quant_conv`` first).
Layers are named after diffusers' module paths (``encoder.down_blocks.0.resnets.0``).
"""

import dataclasses

import keras
from keras import ops

from sd_tf.models.layers import Attention, Downsample, GroupNorm, ResnetBlock, Upsample

# Stable Diffusion 1.x/2.x latents are the VAE's latents times this.
SD_LATENT_SCALING_FACTOR = 0.18215
VAE_NORM_EPS = 1e-6
# diffusers clamps the posterior's log-variance to this range.
LOGVAR_RANGE = (-30.0, 20.0)


@dataclasses.dataclass
class VAEConfig:
    """diffusers' ``AutoencoderKL`` config fields used by Stable Diffusion."""

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int = 512
    scaling_factor: float = SD_LATENT_SCALING_FACTOR

    def __post_init__(self):
        self.block_out_channels = tuple(self.block_out_channels)

    @property
    def downsampling_factor(self):
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def from_dict(cls, config):
        """Reads a diffusers ``config.json`` dict; refuses options SD never uses."""
        for key, default in {"act_fn": "silu", "use_quant_conv": True, "use_post_quant_conv": True,
                             "mid_block_add_attention": True, "shift_factor": None}.items():
            if config.get(key, default) != default:
                raise ValueError(f"VAE config {key}={config[key]!r} is not supported (only {default!r})")
        names = {field.name for field in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in config.items() if key in names})

    def to_dict(self):
        """A diffusers ``AutoencoderKL`` config dict."""
        n = len(self.block_out_channels)
        return {
            "_class_name": "AutoencoderKL",
            **{k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()},
            "down_block_types": ["DownEncoderBlock2D"] * n,
            "up_block_types": ["UpDecoderBlock2D"] * n,
            "act_fn": "silu",
        }


class PixelSelfAttention(Attention):
    """The VAE's ``Attention``: GroupNorm, single-head self-attention over all pixels, residual."""

    def __init__(self, channels, groups, **kwargs):
        super().__init__(channels, num_heads=1, qkv_bias=True, upcast=True, **kwargs)
        self.group_norm = GroupNorm(groups, VAE_NORM_EPS, name="group_norm")

    def call(self, x):
        _, height, width, channels = ops.shape(x)
        pixels = ops.reshape(self.group_norm(x), (-1, height * width, channels))
        return x + ops.reshape(super().call(pixels), (-1, height, width, channels))


class MidBlock(keras.layers.Layer):
    """Resnet, self-attention, resnet at the lowest resolution."""

    def __init__(self, channels, groups, **kwargs):
        super().__init__(**kwargs)
        self.resnet_0 = ResnetBlock(channels, groups, VAE_NORM_EPS, name="resnets.0")
        self.attention = PixelSelfAttention(channels, groups, name="attentions.0")
        self.resnet_1 = ResnetBlock(channels, groups, VAE_NORM_EPS, name="resnets.1")

    def call(self, x):
        return self.resnet_1(self.attention(self.resnet_0(x)))


class VAEEncoder(keras.Model):
    """Images (B, H, W, 3) in [-1, 1] -> (mean, logvar), each (B, H/f, W/f, latent_channels)."""

    def __init__(self, config: VAEConfig, name="vae_encoder", **kwargs):
        c = config
        image = keras.Input((None, None, c.in_channels), name="image")
        x = keras.layers.Conv2D(c.block_out_channels[0], 3, padding="same", name="encoder.conv_in")(image)
        last = len(c.block_out_channels) - 1
        for i, channels in enumerate(c.block_out_channels):
            for j in range(c.layers_per_block):
                x = ResnetBlock(channels, c.norm_num_groups, VAE_NORM_EPS, name=f"encoder.down_blocks.{i}.resnets.{j}")(x)
            if i < last:
                x = Downsample(channels, ((0, 1), (0, 1)), name=f"encoder.down_blocks.{i}.downsamplers.0")(x)
        x = MidBlock(c.block_out_channels[-1], c.norm_num_groups, name="encoder.mid_block")(x)
        x = GroupNorm(c.norm_num_groups, VAE_NORM_EPS, silu=True, name="encoder.conv_norm_out")(x)
        x = keras.layers.Conv2D(2 * c.latent_channels, 3, padding="same", name="encoder.conv_out")(x)
        moments = keras.layers.Conv2D(2 * c.latent_channels, 1, name="quant_conv", dtype="float32")(x)
        mean, logvar = ops.split(moments, 2, axis=-1)
        logvar = ops.clip(logvar, *LOGVAR_RANGE)
        super().__init__(image, [mean, logvar], name=name, **kwargs)
        self.config = config


class VAEDecoder(keras.Model):
    """Latents (B, h, w, latent_channels), unscaled -> images (B, h*f, w*f, 3), about [-1, 1]."""

    def __init__(self, config: VAEConfig, name="vae_decoder", **kwargs):
        c = config
        latents = keras.Input((None, None, c.latent_channels), name="latents")
        x = keras.layers.Conv2D(c.latent_channels, 1, name="post_quant_conv")(latents)
        x = keras.layers.Conv2D(c.block_out_channels[-1], 3, padding="same", name="decoder.conv_in")(x)
        x = MidBlock(c.block_out_channels[-1], c.norm_num_groups, name="decoder.mid_block")(x)
        last = len(c.block_out_channels) - 1
        for i, channels in enumerate(c.block_out_channels[::-1]):
            for j in range(c.layers_per_block + 1):
                x = ResnetBlock(channels, c.norm_num_groups, VAE_NORM_EPS, name=f"decoder.up_blocks.{i}.resnets.{j}")(x)
            if i < last:
                x = Upsample(channels, name=f"decoder.up_blocks.{i}.upsamplers.0")(x)
        x = GroupNorm(c.norm_num_groups, VAE_NORM_EPS, silu=True, name="decoder.conv_norm_out")(x)
        x = keras.layers.Conv2D(c.out_channels, 3, padding="same", name="decoder.conv_out", dtype="float32")(x)
        super().__init__(latents, x, name=name, **kwargs)
        self.config = config
