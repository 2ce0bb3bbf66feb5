"""The CLIP text encoder: CLIP ViT-L/14 (SD 1.x) or OpenCLIP ViT-H/14 (SD 2.x) text tower.

Layers are named after transformers' ``CLIPTextModel`` keys without the
``text_model.`` prefix (``encoder.layers.0/self_attn.q_proj/kernel`` is
``text_model.encoder.layers.0.self_attn.q_proj.weight``).
"""

import dataclasses

import keras
from keras import ops

from sd_tf.models.layers import attention
from sd_tf.tokenizer import MAX_LENGTH

ACTIVATIONS = {
    "quick_gelu": lambda x: x * ops.sigmoid(1.702 * x),
    "gelu": lambda x: ops.gelu(x, approximate=False),
}


@dataclasses.dataclass
class CLIPTextConfig:
    """transformers' ``CLIPTextConfig`` fields that shape the network."""

    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = MAX_LENGTH
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    def __post_init__(self):
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act {self.hidden_act!r} is not one of {sorted(ACTIVATIONS)}")

    @classmethod
    def from_dict(cls, config):
        """Reads a transformers ``config.json`` dict; other keys are ignored."""
        config = config.get("text_config", config)
        names = {field.name for field in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in config.items() if key in names})

    def to_dict(self):
        """A transformers ``CLIPTextConfig`` dict."""
        return {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model", **dataclasses.asdict(self)}


class CLIPEmbeddings(keras.layers.Layer):
    """Token embedding plus learned position embedding."""

    def __init__(self, config, **kwargs):
        super().__init__(**kwargs)
        self.token_embedding = keras.layers.Embedding(
            config.vocab_size, config.hidden_size, name="token_embedding"
        )
        self.position_embedding = keras.layers.Embedding(
            config.max_position_embeddings, config.hidden_size, name="position_embedding"
        )

    def call(self, token_ids):
        positions = ops.arange(ops.shape(token_ids)[1])
        return self.token_embedding(token_ids) + self.position_embedding(positions)[None]


class CLIPEncoderLayer(keras.layers.Layer):
    """Pre-norm transformer layer with causal self-attention."""

    def __init__(self, config, **kwargs):
        super().__init__(**kwargs)
        width, eps = config.hidden_size, config.layer_norm_eps
        self.num_heads = config.num_attention_heads
        self.activation = ACTIVATIONS[config.hidden_act]
        self.layer_norm1 = keras.layers.LayerNormalization(epsilon=eps, name="layer_norm1")
        self.q_proj = keras.layers.Dense(width, name="self_attn.q_proj")
        self.k_proj = keras.layers.Dense(width, name="self_attn.k_proj")
        self.v_proj = keras.layers.Dense(width, name="self_attn.v_proj")
        self.out_proj = keras.layers.Dense(width, name="self_attn.out_proj")
        self.layer_norm2 = keras.layers.LayerNormalization(epsilon=eps, name="layer_norm2")
        self.fc1 = keras.layers.Dense(config.intermediate_size, name="mlp.fc1")
        self.fc2 = keras.layers.Dense(width, name="mlp.fc2")

    def call(self, x):
        h = self.layer_norm1(x)
        h = attention(self.q_proj(h), self.k_proj(h), self.v_proj(h), self.num_heads, causal=True)
        x = x + self.out_proj(h)
        return x + self.fc2(self.activation(self.fc1(self.layer_norm2(x))))


class TextEncoder(keras.Model):
    """Token ids (B, 77) -> final-layer-normed hidden states (B, 77, hidden_size)."""

    def __init__(self, config: CLIPTextConfig, name="text_encoder", **kwargs):
        token_ids = keras.Input((config.max_position_embeddings,), dtype="int32", name="token_ids")
        x = CLIPEmbeddings(config, name="embeddings")(token_ids)
        for i in range(config.num_hidden_layers):
            x = CLIPEncoderLayer(config, name=f"encoder.layers.{i}")(x)
        x = keras.layers.LayerNormalization(epsilon=config.layer_norm_eps, name="final_layer_norm")(x)
        super().__init__(token_ids, x, name=name, **kwargs)
        self.config = config
