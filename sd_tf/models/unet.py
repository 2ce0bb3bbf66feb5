"""The diffusion UNet (diffusers' ``UNet2DConditionModel`` as used by SD 1.x and 2.x).

Layers are named after diffusers' module paths, so each variable path is a
checkpoint key (``mid_block.attentions.0/transformer_blocks.0/attn2/to_k/kernel``
is ``mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight``).
"""

import dataclasses
import math

import keras
from keras import ops

from sd_tf.models.layers import Attention, Downsample, GroupNorm, ResnetBlock, Upsample

ATTENTION_DOWN_BLOCK = "CrossAttnDownBlock2D"
PLAIN_DOWN_BLOCK = "DownBlock2D"
ATTENTION_UP_BLOCK = "CrossAttnUpBlock2D"
PLAIN_UP_BLOCK = "UpBlock2D"
MID_BLOCK = "UNetMidBlock2DCrossAttn"
# Transformer2DModel's GroupNorm epsilon and BasicTransformerBlock's LayerNorm epsilon.
TRANSFORMER_NORM_EPS = 1e-6
TRANSFORMER_LAYER_NORM_EPS = 1e-5


@dataclasses.dataclass
class UNetConfig:
    """diffusers' ``UNet2DConditionModel`` config fields used by Stable Diffusion."""

    sample_size: int = 64
    in_channels: int = 4
    out_channels: int = 4
    block_out_channels: tuple = (320, 640, 1280, 1280)
    layers_per_block: int = 2
    down_block_types: tuple = (ATTENTION_DOWN_BLOCK,) * 3 + (PLAIN_DOWN_BLOCK,)
    up_block_types: tuple = (PLAIN_UP_BLOCK,) + (ATTENTION_UP_BLOCK,) * 3
    mid_block_type: str = MID_BLOCK
    # diffusers' historical misnomer: for SD this is the number of heads.
    attention_head_dim: int | tuple = 8
    num_attention_heads: int | tuple | None = None
    cross_attention_dim: int = 768
    use_linear_projection: bool = False
    upcast_attention: bool = False
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    transformer_layers_per_block: int = 1

    # Options SD never changes; a config that changes them is refused.
    _FIXED = {
        "center_input_sample": False, "act_fn": "silu", "downsample_padding": 1,
        "mid_block_scale_factor": 1, "only_cross_attention": False, "dual_cross_attention": False,
        "resnet_time_scale_shift": "default", "class_embed_type": None, "addition_embed_type": None,
        "encoder_hid_dim": None, "time_embedding_type": "positional", "conv_in_kernel": 3,
        "conv_out_kernel": 3, "num_class_embeds": None, "time_cond_proj_dim": None,
        "class_embeddings_concat": False, "projection_class_embeddings_input_dim": None,
        "resnet_skip_time_act": False, "resnet_out_scale_factor": 1.0, "attention_type": "default",
        "mid_block_only_cross_attention": None, "cross_attention_norm": None,
        "time_embedding_act_fn": None, "timestep_post_act": None, "time_embedding_dim": None,
        "addition_time_embed_dim": None, "encoder_hid_dim_type": None, "dropout": 0.0,
    }

    def __post_init__(self):
        for name in ("block_out_channels", "down_block_types", "up_block_types"):
            setattr(self, name, tuple(getattr(self, name)))
        for name in ("attention_head_dim", "num_attention_heads"):
            if isinstance(getattr(self, name), list):
                setattr(self, name, tuple(getattr(self, name)))
        known_down = {ATTENTION_DOWN_BLOCK, PLAIN_DOWN_BLOCK}
        known_up = {ATTENTION_UP_BLOCK, PLAIN_UP_BLOCK}
        if not set(self.down_block_types) <= known_down or not set(self.up_block_types) <= known_up:
            raise ValueError(
                f"unsupported UNet block types {self.down_block_types} / {self.up_block_types}; "
                f"supported: {sorted(known_down | known_up)}"
            )
        if self.mid_block_type != MID_BLOCK:
            raise ValueError(f"unsupported mid_block_type {self.mid_block_type!r}; supported: {MID_BLOCK!r}")
        if not isinstance(self.transformer_layers_per_block, int):
            raise ValueError("transformer_layers_per_block must be one int for every block")

    @property
    def heads_per_block(self):
        """Attention heads of each down block (up blocks use them reversed)."""
        heads = self.num_attention_heads or self.attention_head_dim
        if isinstance(heads, int):
            heads = (heads,) * len(self.block_out_channels)
        return tuple(heads)

    @classmethod
    def from_dict(cls, config):
        """Reads a diffusers ``config.json`` dict; refuses options SD never uses."""
        for key, default in cls._FIXED.items():
            if config.get(key, default) != default:
                raise ValueError(f"UNet config {key}={config[key]!r} is not supported (only {default!r})")
        names = {field.name for field in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in config.items() if key in names})

    def to_dict(self):
        """A diffusers ``UNet2DConditionModel`` config dict."""
        config = {key: list(v) if isinstance(v, tuple) else v for key, v in dataclasses.asdict(self).items()}
        return {"_class_name": "UNet2DConditionModel", **config}


class TimestepEmbedding(keras.layers.Layer):
    """Sinusoidal embedding of the timestep, then ``time_embedding.linear_1``, SiLU, ``linear_2``."""

    def __init__(self, channels, flip_sin_to_cos, freq_shift, **kwargs):
        super().__init__(**kwargs)
        self.half = channels // 2
        self.flip_sin_to_cos = flip_sin_to_cos
        self.freq_shift = freq_shift
        self.linear_1 = keras.layers.Dense(channels * 4, name="linear_1")
        self.linear_2 = keras.layers.Dense(channels * 4, name="linear_2")

    def call(self, timestep):
        exponent = -math.log(10000.0) * ops.arange(self.half, dtype="float32") / (self.half - self.freq_shift)
        angles = ops.cast(timestep, "float32")[:, None] * ops.exp(exponent)[None, :]
        sin_cos = [ops.cos(angles), ops.sin(angles)] if self.flip_sin_to_cos else [ops.sin(angles), ops.cos(angles)]
        return self.linear_2(ops.silu(self.linear_1(ops.concatenate(sin_cos, axis=-1))))


class BasicTransformerBlock(keras.layers.Layer):
    """Self-attention, cross-attention on the text, and a GEGLU feed-forward, each pre-normed."""

    def __init__(self, channels, num_heads, upcast, **kwargs):
        super().__init__(**kwargs)
        eps = TRANSFORMER_LAYER_NORM_EPS
        self.norm1 = keras.layers.LayerNormalization(epsilon=eps, name="norm1")
        self.attn1 = Attention(channels, num_heads, upcast=upcast, name="attn1")
        self.norm2 = keras.layers.LayerNormalization(epsilon=eps, name="norm2")
        self.attn2 = Attention(channels, num_heads, upcast=upcast, name="attn2")
        self.norm3 = keras.layers.LayerNormalization(epsilon=eps, name="norm3")
        self.geglu = keras.layers.Dense(channels * 8, name="ff.net.0.proj")
        self.ff_out = keras.layers.Dense(channels, name="ff.net.2")

    def call(self, x, context):
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        hidden, gate = ops.split(self.geglu(self.norm3(x)), 2, axis=-1)
        return x + self.ff_out(hidden * ops.gelu(gate, approximate=False))


class SpatialTransformer(keras.layers.Layer):
    """diffusers' ``Transformer2DModel``: GroupNorm, proj_in, transformer blocks, proj_out, residual.

    ``linear_projection`` (SD 2.x) projects with Dense layers after flattening;
    otherwise (SD 1.x) with 1x1 convolutions before it.
    """

    def __init__(self, channels, num_heads, groups, depth, linear_projection, upcast, **kwargs):
        super().__init__(**kwargs)
        self.linear_projection = linear_projection
        self.norm = GroupNorm(groups, TRANSFORMER_NORM_EPS, name="norm")
        project = (lambda name: keras.layers.Dense(channels, name=name)) if linear_projection else (
            lambda name: keras.layers.Conv2D(channels, 1, name=name)
        )
        self.proj_in = project("proj_in")
        self.blocks = [
            BasicTransformerBlock(channels, num_heads, upcast, name=f"transformer_blocks.{i}")
            for i in range(depth)
        ]
        self.proj_out = project("proj_out")

    def call(self, x, context):
        _, height, width, channels = ops.shape(x)
        h = self.norm(x)
        if not self.linear_projection:
            h = self.proj_in(h)
        h = ops.reshape(h, (-1, height * width, channels))
        if self.linear_projection:
            h = self.proj_in(h)
        for block in self.blocks:
            h = block(h, context)
        if self.linear_projection:
            h = self.proj_out(h)
        h = ops.reshape(h, (-1, height, width, channels))
        if not self.linear_projection:
            h = self.proj_out(h)
        return x + h


class UNet(keras.Model):
    """(noisy latents NHWC, timestep (B,), text context (B, 77, D)) -> predicted noise or v."""

    def __init__(self, config: UNetConfig, name="unet", **kwargs):
        c = config
        latents = keras.Input((None, None, c.in_channels), name="latents")
        timestep = keras.Input((), name="timestep")
        context = keras.Input((None, c.cross_attention_dim), name="context")

        def resnet(channels, name):
            return ResnetBlock(channels, c.norm_num_groups, c.norm_eps, time_embedding=True, name=name)

        def transformer(channels, heads, name):
            return SpatialTransformer(
                channels, heads, c.norm_num_groups, c.transformer_layers_per_block,
                c.use_linear_projection, c.upcast_attention, name=name,
            )

        t_emb = TimestepEmbedding(c.block_out_channels[0], c.flip_sin_to_cos, c.freq_shift, name="time_embedding")(timestep)
        x = keras.layers.Conv2D(c.block_out_channels[0], 3, padding="same", name="conv_in")(latents)
        skips = [x]

        # Down: resnets (with transformers), then a stride-2 conv, per resolution.
        heads = c.heads_per_block
        last = len(c.block_out_channels) - 1
        for i, (block_type, channels) in enumerate(zip(c.down_block_types, c.block_out_channels)):
            for j in range(c.layers_per_block):
                x = resnet(channels, f"down_blocks.{i}.resnets.{j}")(x, t_emb)
                if block_type == ATTENTION_DOWN_BLOCK:
                    x = transformer(channels, heads[i], f"down_blocks.{i}.attentions.{j}")(x, context)
                skips.append(x)
            if i < last:
                x = Downsample(channels, ((1, 1), (1, 1)), name=f"down_blocks.{i}.downsamplers.0")(x)
                skips.append(x)

        # Middle: resnet, transformer, resnet at the lowest resolution.
        channels = c.block_out_channels[-1]
        x = resnet(channels, "mid_block.resnets.0")(x, t_emb)
        x = transformer(channels, heads[-1], "mid_block.attentions.0")(x, context)
        x = resnet(channels, "mid_block.resnets.1")(x, t_emb)

        # Up: each resnet takes a skip connection from the down path; then a 2x upsample.
        up_heads = heads[::-1]
        for i, (block_type, channels) in enumerate(zip(c.up_block_types, c.block_out_channels[::-1])):
            for j in range(c.layers_per_block + 1):
                x = keras.layers.Concatenate()([x, skips.pop()])
                x = resnet(channels, f"up_blocks.{i}.resnets.{j}")(x, t_emb)
                if block_type == ATTENTION_UP_BLOCK:
                    x = transformer(channels, up_heads[i], f"up_blocks.{i}.attentions.{j}")(x, context)
            if i < last:
                x = Upsample(channels, name=f"up_blocks.{i}.upsamplers.0")(x, skips[-1])

        x = GroupNorm(c.norm_num_groups, c.norm_eps, silu=True, name="conv_norm_out")(x)
        x = keras.layers.Conv2D(c.out_channels, 3, padding="same", name="conv_out")(x)
        super().__init__([latents, timestep, context], x, name=name, **kwargs)
        self.config = config
