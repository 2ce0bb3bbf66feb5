"""Textual inversion: a new token whose embedding row is the only thing trained.

``add_placeholder_token`` adds the token to the tokenizer, grows the text
encoder's token embedding by one row (a new ``TextEncoder`` with
``vocab_size + 1``, every weight copied), and initialises the row from an
initializer word. ``trainable_embedding`` gives what ``Trainer`` needs: the
embedding variable and a gradient mask that is 1 on the new row only. With
weight decay 0 the other rows, and every other variable, stay bit-identical.
``save_learned_embeds`` writes diffusers' ``learned_embeds.safetensors``
({token: vector}), which ``StableDiffusionPipeline.load_textual_inversion`` reads.
"""

import dataclasses

import numpy as np
import tensorflow as tf

from sd_tf.models import TextEncoder
from sd_tf.stable_diffusion import dtype_policy

LEARNED_EMBEDS_FILE = "learned_embeds.safetensors"


def token_embedding(model):
    """The text encoder's token embedding variable (vocab_size, hidden_size)."""
    return model.text_encoder.get_layer("embeddings").token_embedding.embeddings


def add_placeholder_token(model, token, initializer_token=None):
    """Adds ``token`` to ``model``'s tokenizer and text encoder; returns its id.

    The new embedding row is a copy of ``initializer_token``'s (which must be
    a single token), or the mean of all rows if none is given. The model's
    ``text_encoder`` and ``config.text_encoder`` are replaced.
    """
    tokenizer = model.tokenizer
    old_config = model.config.text_encoder
    if tokenizer.vocab_size != old_config.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens but the text encoder "
                         f"{old_config.vocab_size}: add tokens to a model whose sizes agree")
    old_rows = token_embedding(model).numpy()
    if initializer_token is not None:
        ids = tokenizer.encode(initializer_token)
        if len(ids) != 1:
            raise ValueError(f"the initializer token {initializer_token!r} is {len(ids)} tokens, not one; "
                             "pick a single word the tokenizer knows")
        row = old_rows[ids[0]]
    else:
        row = old_rows.mean(axis=0)
    token_id = tokenizer.add_token(token)
    if token_id != old_config.vocab_size:
        raise ValueError(f"{token!r} got id {token_id}, expected {old_config.vocab_size}")
    config = dataclasses.replace(old_config, vocab_size=old_config.vocab_size + 1)
    old = model.text_encoder
    with model.strategy.scope(), dtype_policy(model.dtype):
        new = TextEncoder(config)
    def key(variable):  # the path inside the model
        return variable.path.split("/", 1)[-1]

    old_values = {key(v): v for v in old.weights}
    embedding_key = key(token_embedding(model))
    for variable in new.weights:
        if key(variable) == embedding_key:
            variable.assign(np.concatenate([old_rows, row[None]], axis=0).astype(old_rows.dtype))
        else:
            variable.assign(old_values[key(variable)].numpy())
    model.text_encoder = new
    model.config = dataclasses.replace(model.config, text_encoder=config)
    model._compile_functions()  # the generation functions were traced with the old text encoder
    return token_id


def trainable_embedding(model, token_id):
    """(variables, gradient masks) for ``Trainer``: the token embedding, masked to row ``token_id``."""
    variable = token_embedding(model)
    mask = np.zeros(variable.shape, np.float32)
    mask[token_id] = 1.0
    return [variable], {variable.path: tf.constant(mask)}


def learned_embeds(model, token):
    """{token: its embedding vector (hidden_size,) float32}."""
    token_id = model.tokenizer.added_tokens[token]
    return {token: np.ascontiguousarray(token_embedding(model).numpy()[token_id], np.float32)}


def save_learned_embeds(model, token, path):
    """Writes diffusers' textual-inversion file: safetensors with one tensor named ``token``."""
    import os
    from pathlib import Path

    from safetensors.numpy import save_file

    path = Path(path)
    temporary = path.with_name(f".{path.name}.tmp")
    save_file(learned_embeds(model, token), str(temporary))
    os.replace(temporary, path)  # never a half-written file
