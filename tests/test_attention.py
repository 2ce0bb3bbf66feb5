"""The memory-efficient (query-chunked) attention equals plain softmax attention."""

import numpy as np
import pytest
import tensorflow as tf

from sd_tf.models import layers


def reference_attention(q, k, v, heads, causal=False):
    """Plain multi-head attention in float64 numpy."""
    b, n, c = q.shape
    d = c // heads
    split = lambda x: x.reshape(b, -1, heads, d).transpose(0, 2, 1, 3).astype(np.float64)  # noqa: E731
    scores = split(q) @ split(k).transpose(0, 1, 3, 2) / np.sqrt(d)
    if causal:
        scores = np.where(np.triu(np.ones((n, k.shape[1]), bool), 1), -np.inf, scores)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    return (weights @ split(v)).transpose(0, 2, 1, 3).reshape(b, n, c)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("chunk_elements", [None, 2 * 4 * 50 * 7])  # None: one chunk; else 7-row chunks
def test_chunked_attention_equals_plain(monkeypatch, causal, chunk_elements):
    if chunk_elements is not None:
        monkeypatch.setattr(layers, "ATTENTION_CHUNK_ELEMENTS", chunk_elements)
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((2, 50, 32)).astype(np.float32) * 3 for _ in range(3))
    out = tf.function(lambda q, k, v: layers.attention(q, k, v, num_heads=4, causal=causal))(q, k, v)
    np.testing.assert_allclose(np.asarray(out), reference_attention(q, k, v, 4, causal), atol=2e-5)


def test_chunking_happens_for_long_sequences(monkeypatch):
    """With a small budget the query axis is really split (the score tensor never has all rows)."""
    monkeypatch.setattr(layers, "ATTENTION_CHUNK_ELEMENTS", 2 * 4 * 64 * 16)
    shapes = []
    original = tf.matmul

    def recording_matmul(a, b, *args, **kwargs):
        shapes.append(tuple(a.shape))
        return original(a, b, *args, **kwargs)

    monkeypatch.setattr(layers.ops, "matmul", recording_matmul)
    q = np.zeros((2, 64, 32), np.float32)
    layers.attention(q, q, q, num_heads=4)
    assert max(shape[2] for shape in shapes) == 16
