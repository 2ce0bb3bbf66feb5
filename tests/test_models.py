"""Numerical parity of the Keras networks with transformers' CLIPTextModel and diffusers' UNet and VAE.

Random-weight reference pipelines (tests/reference.py) are saved by diffusers
in its folder layout and loaded by ``StableDiffusion.from_pretrained``; every
output must agree within TOLERANCE (max abs error) at unit-scale outputs. Each
check is shown to fail when one weight of the loaded model is perturbed.
"""

import numpy as np
import pytest
import torch

from conftest import (
    TIMESTEPS,
    TOLERANCE,
    assert_unit_scale,
    max_error,
    random_images,
    text_outputs,
    token_ids,
    unet_inputs,
    unet_outputs,
    vae_decoder_outputs,
    vae_encoder_outputs,
)
from reference import CONFIGS, reference_components
from sd_tf import weights
from sd_tf.config import preset
from sd_tf.models import CLIPTextConfig, TextEncoder, UNet, UNetConfig, VAEConfig, VAEDecoder, VAEEncoder

KINDS = ["sd1", "sd2", "inpaint"]
COMPONENTS = ["text_encoder", "unet", "vae_encoder", "vae_decoder"]
# Batch-2 timestep pairs: every batch item has its own timestep.
TIMESTEP_PAIRS = [(TIMESTEPS[0], TIMESTEPS[2]), (TIMESTEPS[1], 500.0)]


def component_outputs(component, model, pipe, unet_calls=2):
    """[(sd_tf output, reference output), ...] of one network on fixed inputs."""
    if component == "text_encoder":
        return [text_outputs(model, pipe.text_encoder, token_ids(model))]
    if component == "unet":
        config = pipe.unet.config
        latents, context = unet_inputs(config.in_channels, config.cross_attention_dim)
        return [unet_outputs(model, pipe.unet, latents, pair, context) for pair in TIMESTEP_PAIRS[:unet_calls]]
    if component == "vae_encoder":
        (mean, logvar), (ref_mean, ref_logvar) = vae_encoder_outputs(model, pipe.vae, random_images())
        return [(mean, ref_mean), (logvar, ref_logvar)]
    if component == "vae_decoder":
        latents, _ = unet_inputs(pipe.vae.config.latent_channels, 1)
        return [vae_decoder_outputs(model, pipe.vae, latents)]
    raise ValueError(component)


def worst_error(pairs):
    return max(max_error(out, ref) for out, ref in pairs)


@pytest.mark.parametrize("component", COMPONENTS)
@pytest.mark.parametrize("kind", KINDS)
def test_matches_reference(kind, component, reference_folder, loaded_model):
    _, pipe = reference_folder(kind)
    pairs = component_outputs(component, loaded_model(kind), pipe)
    for _, reference in pairs:
        assert_unit_scale(reference, f"{kind} {component}")
    assert worst_error(pairs) <= TOLERANCE


def test_unet_outputs_depend_on_timestep_and_context(reference_folder, loaded_model):
    """Guards the parity test's inputs: different timesteps and contexts give different predictions."""
    _, pipe = reference_folder("sd1")
    model = loaded_model("sd1")
    latents, context = unet_inputs(4, 32)
    same_latents = np.repeat(latents[:1], 2, axis=0)
    same_context = np.repeat(context[:1], 2, axis=0)
    out, _ = unet_outputs(model, pipe.unet, same_latents, (1.0, 999.0), same_context)
    assert max_error(out[0], out[1]) > 100 * TOLERANCE
    out, _ = unet_outputs(model, pipe.unet, same_latents, (500.0, 500.0), context)
    assert max_error(out[0], out[1]) > 100 * TOLERANCE


# (kind, network, checkpoint key): a conv kernel in an up block, q/k projections, norm gammas, biases.
PERTURBED = [
    ("sd1", "text_encoder", "encoder.layers.1.self_attn.q_proj.weight"),
    ("sd1", "text_encoder", "final_layer_norm.weight"),
    ("sd2", "text_encoder", "encoder.layers.0.mlp.fc2.bias"),
    ("sd1", "unet", "up_blocks.1.resnets.2.conv2.weight"),
    ("sd1", "unet", "mid_block.attentions.0.transformer_blocks.0.attn1.to_q.weight"),
    ("sd1", "unet", "up_blocks.2.attentions.2.transformer_blocks.0.attn2.to_k.weight"),
    ("sd1", "unet", "down_blocks.0.attentions.1.norm.weight"),
    ("sd2", "unet", "down_blocks.1.attentions.0.proj_in.weight"),
    ("inpaint", "unet", "conv_in.weight"),
    ("sd1", "vae_encoder", "encoder.mid_block.attentions.0.to_q.weight"),
    ("sd1", "vae_encoder", "encoder.down_blocks.1.resnets.0.norm2.weight"),
    ("sd1", "vae_decoder", "decoder.up_blocks.2.resnets.1.conv1.weight"),
    ("sd1", "vae_decoder", "post_quant_conv.bias"),
]
DELTA = 0.05


@pytest.mark.parametrize("kind,component,key", PERTURBED)
def test_perturbed_weight_breaks_parity(kind, component, key, reference_folder, loaded_model):
    _, pipe = reference_folder(kind)
    model = loaded_model(kind)
    network = getattr(model, component)
    [variable] = [v for v in network.weights if weights.checkpoint_key(v) == key]
    original = variable.numpy()
    # A random pattern: a constant shift can cancel (e.g. after a LayerNorm, whose outputs sum to 0).
    noise = np.random.default_rng(0).standard_normal(original.shape).astype(np.float32)
    variable.assign(original + DELTA * noise)
    try:
        perturbed = worst_error(component_outputs(component, model, pipe, unet_calls=1))
    finally:
        variable.assign(original)
    assert perturbed > 10 * TOLERANCE, f"perturbing {key} moved the outputs by only {perturbed}"


# ----------------------------------------------------------------------------
# Tiled VAE decoding
# ----------------------------------------------------------------------------


def column_steps(images):
    """Mean |difference| between neighbouring columns, per column: a vertical seam shows as a spike."""
    return np.abs(np.diff(images, axis=2)).mean(axis=(0, 1, 3))


@pytest.mark.parametrize("tile_size", [12, 16])
def test_tiled_vae_decode_is_as_close_and_seamless_as_diffusers_tiling(tile_size, reference_folder, loaded_model):
    """Tiles change the decoder's GroupNorm statistics and attention span, so no tiling equals the whole
    decode; ours must stay at least as close to it as diffusers' ``tiled_decode`` (same tile size and
    overlap) and add no sharper column-to-column steps at the tile edges."""
    from sd_tf.stable_diffusion import tiled_decode

    _, pipe = reference_folder("sd1")
    model = loaded_model("sd1")
    factor = model.vae_factor
    latents = np.random.default_rng(0).standard_normal((1, 24, 40, 4)).astype(np.float32)
    whole = np.asarray(model.vae_decoder(latents))
    ours = tiled_decode(model.vae_decoder, latents, tile_size, factor)
    theirs_whole = vae_decoder_outputs(model, pipe.vae, latents)[1]
    pipe.vae.enable_tiling()
    pipe.vae.tile_latent_min_size, pipe.vae.tile_sample_min_size = tile_size, tile_size * factor
    try:
        with torch.no_grad():
            theirs = np.moveaxis(pipe.vae.tiled_decode(torch.from_numpy(np.moveaxis(latents, -1, 1))).sample.numpy(), 1, -1)
    finally:
        pipe.vae.disable_tiling()
    assert max_error(whole, theirs_whole) < TOLERANCE
    assert ours.shape == whole.shape
    our_error, their_error = np.abs(ours - whole).mean(), np.abs(theirs - theirs_whole).mean()
    print(f"tile {tile_size}: mean error ours {our_error:.4f}, diffusers {their_error:.4f} (output std {whole.std():.3f})")
    assert our_error <= their_error
    assert (column_steps(ours) - column_steps(whole)).max() <= (column_steps(theirs) - column_steps(theirs_whole)).max()

    # Latents that fit in one tile decode exactly as without tiling.
    small = latents[:, :tile_size, :tile_size]
    np.testing.assert_array_equal(tiled_decode(model.vae_decoder, small, tile_size, factor),
                                  np.asarray(model.vae_decoder(small)))


# ----------------------------------------------------------------------------
# Full-size SD 1.5
# ----------------------------------------------------------------------------


def torch_tensors(module):
    return {key: value.detach().numpy() for key, value in module.state_dict().items()}


@pytest.mark.slow
def test_full_size_sd15():
    """Every network at the real SD 1.5 size, with the preset's config, against diffusers/transformers."""
    from diffusers import AutoencoderKL

    text_encoder, unet, _, _ = reference_components("sd15")
    # reference_components("sd15") builds AutoencoderKL's default of one resnet per level;
    # SD's VAE has two (layers_per_block=2), as in the preset.
    torch.manual_seed(0)
    vae = AutoencoderKL(**dict(CONFIGS["sd15"]["vae"], layers_per_block=2)).eval()

    config = preset("sd-v1")
    assert CLIPTextConfig.from_dict(text_encoder.config.to_dict()) == config.text_encoder
    assert UNetConfig.from_dict(dict(unet.config)) == config.unet
    assert VAEConfig.from_dict(dict(vae.config)) == config.vae

    class Model:  # the attributes the comparison helpers use
        pass

    model = Model()
    model.text_encoder = TextEncoder(config.text_encoder)
    weights.load_weights([model.text_encoder], weights.text_encoder_tensors(torch_tensors(text_encoder)))
    from sd_tf.tokenizer import CLIPTokenizer

    out, ref = text_outputs(model, text_encoder, CLIPTokenizer()(["a photograph of an astronaut riding a horse"]))
    assert_unit_scale(ref, "sd15 text encoder")
    assert max_error(out, ref) <= TOLERANCE
    del model.text_encoder, text_encoder

    model.unet = UNet(config.unet)
    weights.load_weights([model.unet], torch_tensors(unet))
    latents, context = unet_inputs(4, 768, batch=1, hw=(32, 32))
    out, ref = unet_outputs(model, unet, latents, (500.0,), context)
    assert_unit_scale(ref, "sd15 unet")
    assert max_error(out, ref) <= TOLERANCE
    del model.unet, unet

    model.vae_encoder, model.vae_decoder = VAEEncoder(config.vae), VAEDecoder(config.vae)
    weights.load_weights([model.vae_encoder, model.vae_decoder], torch_tensors(vae))
    latents, _ = unet_inputs(4, 1, batch=1, hw=(8, 8))
    out, ref = vae_decoder_outputs(model, vae, latents)
    assert_unit_scale(ref, "sd15 vae decoder")
    assert max_error(out, ref) <= TOLERANCE
    (mean, logvar), (ref_mean, ref_logvar) = vae_encoder_outputs(model, vae, random_images(batch=1, hw=(64, 64)))
    assert_unit_scale(ref_mean, "sd15 vae mean")
    assert max(max_error(mean, ref_mean), max_error(logvar, ref_logvar)) <= TOLERANCE
