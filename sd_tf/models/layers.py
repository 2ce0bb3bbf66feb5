"""Building blocks shared by the UNet and the VAE.

Every layer is named after the diffusers module it mirrors, so that a Keras
variable path such as ``down_blocks.0.resnets.0/conv1/kernel`` is the
checkpoint key ``down_blocks.0.resnets.0.conv1.weight`` (see ``sd_tf.weights``).
All tensors are NHWC.
"""

import keras
from keras import ops

# Largest attention score tensor computed at once, in elements (256 MiB of
# float32). Longer sequences are processed in query chunks below this size.
ATTENTION_CHUNK_ELEMENTS = 64 * 1024 * 1024


def attention(q, k, v, num_heads, upcast=False, causal=False):
    """Multi-head scaled dot-product attention of (B, N, C) queries on (B, M, C) keys/values.

    Queries are split into chunks so that no score tensor exceeds
    ``ATTENTION_CHUNK_ELEMENTS``; the result is the same as one big softmax.
    With ``upcast`` the scores are computed in float32 (the softmax always is).
    With ``causal`` query i attends to keys 0..i only.
    """
    batch, n, channels = q.shape
    m = k.shape[1]
    head_dim = channels // num_heads

    def split_heads(x):  # (B, L, C) -> (B, heads, L, head_dim)
        x = ops.reshape(x, (-1, ops.shape(x)[1], num_heads, head_dim))
        return ops.transpose(x, (0, 2, 1, 3))

    q, k, v = split_heads(q), split_heads(k), split_heads(v)
    q = q * ops.cast(head_dim**-0.5, q.dtype)
    if upcast:
        q, k = ops.cast(q, "float32"), ops.cast(k, "float32")

    def attend(q_chunk, start):
        scores = ops.cast(ops.matmul(q_chunk, ops.transpose(k, (0, 1, 3, 2))), "float32")
        if causal:
            rows = start + ops.arange(ops.shape(q_chunk)[2])[:, None]
            scores = ops.where(ops.arange(ops.shape(k)[2])[None, :] > rows, -float("inf"), scores)
        weights = ops.softmax(scores, axis=-1)
        return ops.matmul(ops.cast(weights, v.dtype), v)

    chunk = None
    if None not in (batch, n, m):  # static shapes: chunk when the scores are large
        rows = max(1, ATTENTION_CHUNK_ELEMENTS // (batch * num_heads * m))
        chunk = rows if rows < n else None
    if chunk is None:
        out = attend(q, 0)
    else:
        out = ops.concatenate(
            [attend(q[:, :, start : start + chunk], start) for start in range(0, n, chunk)], axis=2
        )
    out = ops.transpose(out, (0, 2, 1, 3))
    return ops.reshape(out, (-1, ops.shape(out)[1], channels))


class GroupNorm(keras.layers.Layer):
    """Group normalization of NHWC tensors (torch's ``nn.GroupNorm``), optionally followed by SiLU.

    Statistics are per-channel reductions over the pixels, then summed per group
    (two passes, in float32): several times faster on CPU than reducing over
    (pixels, channels-in-group) at once as ``keras.layers.GroupNormalization`` does.
    """

    def __init__(self, groups, epsilon=1e-5, silu=False, **kwargs):
        super().__init__(**kwargs)
        self.groups, self.epsilon, self.silu = groups, epsilon, silu

    def build(self, input_shape):
        channels = input_shape[-1]
        self.gamma = self.add_weight(shape=(channels,), initializer="ones", name="gamma")
        self.beta = self.add_weight(shape=(channels,), initializer="zeros", name="beta")

    def call(self, x):
        shape, channels = ops.shape(x), x.shape[-1]
        per_group = channels // self.groups
        flat = ops.reshape(ops.cast(x, "float32"), (shape[0], -1, channels))
        count = ops.cast(ops.shape(flat)[1] * per_group, "float32")

        def group_mean(per_channel_sum):  # (B, C) -> (B, 1, C): each channel gets its group's mean
            sums = ops.sum(ops.reshape(per_channel_sum, (-1, self.groups, per_group)), axis=-1)
            return ops.repeat(sums / count, per_group, axis=-1)[:, None, :]

        centered = flat - group_mean(ops.sum(flat, axis=1))
        variance = group_mean(ops.sum(ops.square(centered), axis=1))
        scale = ops.rsqrt(variance + self.epsilon) * ops.cast(self.gamma, "float32")
        y = centered * scale + ops.cast(self.beta, "float32")
        if self.silu:
            y = ops.silu(y)
        return ops.cast(ops.reshape(y, shape), self.compute_dtype)


class Attention(keras.layers.Layer):
    """diffusers ``Attention``: to_q/to_k/to_v projections, heads, to_out.0."""

    def __init__(self, channels, num_heads, qkv_bias=False, upcast=False, **kwargs):
        super().__init__(**kwargs)
        self.num_heads = num_heads
        self.upcast = upcast
        self.to_q = keras.layers.Dense(channels, use_bias=qkv_bias, name="to_q")
        self.to_k = keras.layers.Dense(channels, use_bias=qkv_bias, name="to_k")
        self.to_v = keras.layers.Dense(channels, use_bias=qkv_bias, name="to_v")
        self.to_out = keras.layers.Dense(channels, name="to_out.0")

    def call(self, x, context=None):
        context = x if context is None else context
        out = attention(
            self.to_q(x), self.to_k(context), self.to_v(context), self.num_heads, self.upcast
        )
        return self.to_out(out)


class ResnetBlock(keras.layers.Layer):
    """diffusers ``ResnetBlock2D``: two GroupNorm-SiLU-conv stages, optional time embedding."""

    def __init__(self, channels, groups=32, eps=1e-5, time_embedding=False, **kwargs):
        super().__init__(**kwargs)
        self.channels = channels
        self.norm1 = GroupNorm(groups, eps, silu=True, name="norm1")
        self.conv1 = keras.layers.Conv2D(channels, 3, padding="same", name="conv1")
        self.time_emb_proj = keras.layers.Dense(channels, name="time_emb_proj") if time_embedding else None
        self.norm2 = GroupNorm(groups, eps, silu=True, name="norm2")
        self.conv2 = keras.layers.Conv2D(channels, 3, padding="same", name="conv2")

    def build(self, x_shape, time_embedding_shape=None):
        # A 1x1 shortcut convolution exists only where the channel count changes.
        self.conv_shortcut = None
        if x_shape[-1] != self.channels:
            self.conv_shortcut = keras.layers.Conv2D(self.channels, 1, name="conv_shortcut")

    def call(self, x, time_embedding=None):
        h = self.conv1(self.norm1(x))
        if self.time_emb_proj is not None:
            h = h + self.time_emb_proj(ops.silu(time_embedding))[:, None, None, :]
        h = self.conv2(self.norm2(h))
        shortcut = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return shortcut + h


class Downsample(keras.layers.Layer):
    """Stride-2 3x3 convolution (``downsamplers.0.conv``).

    ``padding`` is torch's: ``((1, 1), (1, 1))`` in the UNet, ``((0, 1), (0, 1))`` in the VAE.
    """

    def __init__(self, channels, padding, **kwargs):
        super().__init__(**kwargs)
        self.pad = keras.layers.ZeroPadding2D(padding)
        self.conv = keras.layers.Conv2D(channels, 3, strides=2, name="conv")

    def call(self, x):
        return self.conv(self.pad(x))


class Upsample(keras.layers.Layer):
    """Nearest-neighbour upsampling, then a 3x3 convolution (``upsamplers.0.conv``).

    Upsamples 2x, or to the spatial size of ``size_like`` (the UNet's next skip
    connection, which is not exactly 2x when the latent side is not a multiple
    of 2**levels), picking source pixel floor(i * in / out) as torch's
    ``F.interpolate(mode="nearest")`` does.
    """

    def __init__(self, channels, **kwargs):
        super().__init__(**kwargs)
        self.conv = keras.layers.Conv2D(channels, 3, padding="same", name="conv")

    def call(self, x, size_like=None):
        if size_like is None:
            x = ops.repeat(ops.repeat(x, 2, axis=1), 2, axis=2)
        else:
            for axis in (1, 2):
                size_in, size_out = ops.shape(x)[axis], ops.shape(size_like)[axis]
                x = ops.take(x, (ops.arange(size_out) * size_in) // size_out, axis=axis)
        return self.conv(x)
