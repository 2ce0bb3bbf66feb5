"""Shared fixtures: random-weight reference pipelines saved once per session, parity helpers, and
test-only writers of original (CompVis / LDM) single-file checkpoints.

The writers are the inverse of the LDM -> diffusers conversion (diffusers'
``loaders/single_file_utils.py``), as explicit rules by name. They only have to
produce files that diffusers reads back as the reference model: every
single-file test loads the written file with diffusers' own loader too, so a
wrong rule here makes those tests fail rather than pass.
"""

import contextlib
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from reference import nchw, nhwc, reference_pipeline

# Max abs difference allowed between sd_tf and the PyTorch reference, at unit-scale outputs.
TOLERANCE = 1e-4
# Reference outputs must have about this scale for TOLERANCE to mean something.
UNIT_STD_RANGE = (0.2, 5.0)
PROMPTS = ["a photograph of an astronaut riding a horse", "a red cube on a blue sphere, 8k"]
TIMESTEPS = (1.0, 250.0, 999.0)
LATENT_HW = (8, 16)  # non-square on purpose
IMAGE_HW = (32, 64)


# ----------------------------------------------------------------------------
# Reference pipelines and loaded sd_tf models, once per session
# ----------------------------------------------------------------------------


@pytest.fixture(scope="session")
def reference_folder(tmp_path_factory):
    """``reference_folder(kind)`` -> (folder, pipeline): a random-weight diffusers pipeline saved once."""
    cache = {}

    def get(kind):
        if kind not in cache:
            folder = tmp_path_factory.mktemp(f"reference-{kind}") / "pipeline"
            cache[kind] = (folder, reference_pipeline(kind, folder))
        return cache[kind]

    return get


@pytest.fixture(scope="session")
def loaded_model(reference_folder):
    """``loaded_model(kind)`` -> ``StableDiffusion.from_pretrained`` of the reference folder, once.

    Tests that change its weights must restore them.
    """
    from sd_tf.stable_diffusion import StableDiffusion

    cache = {}

    def get(kind):
        if kind not in cache:
            cache[kind] = StableDiffusion.from_pretrained(reference_folder(kind)[0])
        return cache[kind]

    return get


def read_pretrained(path, config=None, use_ema=False, variant=None):
    """What ``StableDiffusion.from_pretrained`` reads, (config, tensors, tokenizer), without building networks.

    Building the Keras networks is the slow part of loading (tens of seconds on
    a busy 2-core machine), so most format tests load these tensors into a
    session model with ``load_tensors`` (inside ``kept_weights``) instead; a few
    tests run ``from_pretrained`` end to end.
    """
    from sd_tf.stable_diffusion import StableDiffusion

    path = Path(path)
    if path.is_dir():
        return StableDiffusion._read_folder(path, variant)
    return StableDiffusion._read_single_file(path, config, use_ema)


def all_variables(model):
    return [v for network in (model.text_encoder, model.unet, model.vae_encoder, model.vae_decoder) for v in network.weights]


@contextlib.contextmanager
def kept_weights(model, scramble=True):
    """Restores every weight of a (session) model on exit; with ``scramble``, fills them with noise first.

    Scrambling makes a load that silently assigned nothing fail the comparison that follows.
    """
    saved = [(v, v.numpy()) for v in all_variables(model)]
    if scramble:
        rng = np.random.default_rng(123)
        for variable, value in saved:
            variable.assign(rng.standard_normal(value.shape).astype(value.dtype))
    try:
        yield model
    finally:
        for variable, value in saved:
            variable.assign(value)


def weight_differences(model, other):
    """The checkpoint keys whose values differ between two models (or that only one has)."""
    from sd_tf import weights

    names = ("text_encoder", "unet", "vae_encoder", "vae_decoder")
    a = weights.model_tensors([getattr(model, name) for name in names])
    b = weights.model_tensors([getattr(other, name) for name in names])
    return sorted(set(a) ^ set(b)) + [k for k in a if k in b and not np.array_equal(a[k], b[k])]


# ----------------------------------------------------------------------------
# Inputs and comparisons shared by the parity tests
# ----------------------------------------------------------------------------


def token_ids(model, prompts=PROMPTS):
    return model.tokenizer(prompts)


def unet_inputs(in_channels, cross_attention_dim, batch=2, hw=LATENT_HW, seed=0):
    """Random NHWC latents and text context, numpy float32."""
    rng = np.random.default_rng(seed)
    latents = rng.standard_normal((batch, *hw, in_channels)).astype(np.float32)
    context = rng.standard_normal((batch, 77, cross_attention_dim)).astype(np.float32)
    return latents, context


def assert_unit_scale(reference, what):
    std = float(np.std(reference))
    assert UNIT_STD_RANGE[0] < std < UNIT_STD_RANGE[1], f"{what}: reference std {std} is not about 1"


def max_error(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, f"shapes differ: {a.shape} vs {b.shape}"
    return float(np.max(np.abs(a - b)))


def text_outputs(model, text_encoder, ids):
    """(sd_tf, reference) final hidden states for the same token ids."""
    with torch.no_grad():
        reference = text_encoder(torch.from_numpy(np.asarray(ids)).long()).last_hidden_state.numpy()
    return np.asarray(model.text_encoder(ids)), reference


def unet_outputs(model, unet, latents, timesteps, context):
    """(sd_tf, reference) UNet predictions; ``timesteps`` is one value per batch item."""
    timesteps = np.asarray(timesteps, np.float32)
    with torch.no_grad():
        reference = nhwc(unet(nchw(latents), torch.from_numpy(timesteps), torch.from_numpy(context)).sample)
    return np.asarray(model.unet([latents, timesteps, context])), reference


def vae_decoder_outputs(model, vae, latents):
    with torch.no_grad():
        reference = nhwc(vae.decode(nchw(latents)).sample)
    return np.asarray(model.vae_decoder(latents)), reference


def vae_encoder_outputs(model, vae, images):
    """((mean, logvar) of sd_tf, (mean, logvar) of the reference)."""
    with torch.no_grad():
        posterior = vae.encode(nchw(images)).latent_dist
    mean, logvar = model.vae_encoder(images)
    return (np.asarray(mean), np.asarray(logvar)), (nhwc(posterior.mean), nhwc(posterior.logvar))


def assert_pipeline_parity(model, pipe, unet_calls=1):
    """The text encoder, UNet and VAE decoder of ``model`` match a diffusers pipeline's within TOLERANCE."""
    text, reference = text_outputs(model, pipe.text_encoder, token_ids(model))
    assert_unit_scale(reference, "text encoder")
    assert max_error(text, reference) <= TOLERANCE, "text encoder"
    config = pipe.unet.config
    latents, _ = unet_inputs(config.in_channels, config.cross_attention_dim)
    for timesteps in [(TIMESTEPS[0], TIMESTEPS[2]), (TIMESTEPS[1], 500.0)][:unet_calls]:
        out, reference = unet_outputs(model, pipe.unet, latents, timesteps, reference_context(pipe))
        assert_unit_scale(reference, "unet")
        assert max_error(out, reference) <= TOLERANCE, "unet"
    out, reference = vae_decoder_outputs(model, pipe.vae, unet_inputs(4, 1)[0])
    assert_unit_scale(reference, "vae decoder")
    assert max_error(out, reference) <= TOLERANCE, "vae decoder"


def reference_context(pipe):
    """The pipeline's own text encoder output for PROMPTS, as UNet context."""
    from sd_tf.tokenizer import CLIPTokenizer

    ids = CLIPTokenizer()(PROMPTS)
    with torch.no_grad():
        return pipe.text_encoder(torch.from_numpy(ids).long()).last_hidden_state.numpy()


def random_images(batch=2, hw=IMAGE_HW, seed=1):
    rng = np.random.default_rng(seed)
    return rng.uniform(-1, 1, (batch, *hw, 3)).astype(np.float32)


# ----------------------------------------------------------------------------
# Writing original (CompVis / LDM) single files: diffusers keys -> original keys
# ----------------------------------------------------------------------------

_UNET_RESNET_TO_ORIGINAL = {
    "norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection",
}


def original_unet_keys(state, config):
    """diffusers UNet2DConditionModel keys -> LDM ``openaimodel`` keys (without ``model.diffusion_model.``)."""
    per_level = config["layers_per_block"] + 1
    last = config["layers_per_block"]
    attention_up = [t == "CrossAttnUpBlock2D" for t in config["up_block_types"]]
    out = {}
    for key, value in state.items():
        if m := re.fullmatch(r"time_embedding\.linear_([12])\.(weight|bias)", key):
            new = f"time_embed.{0 if m[1] == '1' else 2}.{m[2]}"
        elif m := re.fullmatch(r"conv_in\.(weight|bias)", key):
            new = f"input_blocks.0.0.{m[1]}"
        elif m := re.fullmatch(r"conv_norm_out\.(weight|bias)", key):
            new = f"out.0.{m[1]}"
        elif m := re.fullmatch(r"conv_out\.(weight|bias)", key):
            new = f"out.2.{m[1]}"
        elif m := re.fullmatch(r"down_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)\.(weight|bias)", key):
            new = f"input_blocks.{1 + int(m[1]) * per_level + int(m[2])}.0.{_UNET_RESNET_TO_ORIGINAL[m[3]]}.{m[4]}"
        elif m := re.fullmatch(r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.*)", key):
            new = f"input_blocks.{1 + int(m[1]) * per_level + int(m[2])}.1.{m[3]}"
        elif m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(weight|bias)", key):
            new = f"input_blocks.{1 + int(m[1]) * per_level + last}.0.op.{m[2]}"
        elif m := re.fullmatch(r"mid_block\.resnets\.([01])\.(\w+)\.(weight|bias)", key):
            new = f"middle_block.{0 if m[1] == '0' else 2}.{_UNET_RESNET_TO_ORIGINAL[m[2]]}.{m[3]}"
        elif m := re.fullmatch(r"mid_block\.attentions\.0\.(.*)", key):
            new = f"middle_block.1.{m[1]}"
        elif m := re.fullmatch(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)\.(weight|bias)", key):
            new = f"output_blocks.{int(m[1]) * per_level + int(m[2])}.0.{_UNET_RESNET_TO_ORIGINAL[m[3]]}.{m[4]}"
        elif m := re.fullmatch(r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.*)", key):
            new = f"output_blocks.{int(m[1]) * per_level + int(m[2])}.1.{m[3]}"
        elif m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(weight|bias)", key):
            # After the resnet (index 0) and, in attention blocks, the transformer (index 1).
            index = 2 if attention_up[int(m[1])] else 1
            new = f"output_blocks.{int(m[1]) * per_level + last}.{index}.conv.{m[2]}"
        else:
            raise KeyError(f"no original name for UNet key {key}")
        out[new] = value
    return out


_VAE_ATTENTION_TO_ORIGINAL = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def original_vae_keys(state, config):
    """diffusers AutoencoderKL keys -> LDM ``first_stage_model`` keys (without the prefix).

    The decoder's ``up.i`` counts from the lowest resolution; attention projections are 1x1 convs.
    """
    levels = len(config["block_out_channels"])
    out = {}
    for key, value in state.items():
        new = key
        if m := re.fullmatch(r"(encoder|decoder)\.conv_norm_out\.(weight|bias)", key):
            new = f"{m[1]}.norm_out.{m[2]}"
        elif m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", key):
            new = f"encoder.down.{m[1]}.block.{m[2]}.{m[3]}"
        elif m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(weight|bias)", key):
            new = f"encoder.down.{m[1]}.downsample.conv.{m[2]}"
        elif m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", key):
            new = f"decoder.up.{levels - 1 - int(m[1])}.block.{m[2]}.{m[3]}"
        elif m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(weight|bias)", key):
            new = f"decoder.up.{levels - 1 - int(m[1])}.upsample.conv.{m[2]}"
        elif m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.([01])\.(.*)", key):
            new = f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3]}"
        elif m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.(weight|bias)", key):
            new = f"{m[1]}.mid.attn_1.{_VAE_ATTENTION_TO_ORIGINAL[m[2]]}.{m[3]}"
            if m[3] == "weight" and m[2] != "group_norm":
                value = value[:, :, None, None]  # LDM's attention projections are 1x1 convolutions
        elif not re.fullmatch(r"((encoder|decoder)\.conv_(in|out)|quant_conv|post_quant_conv)\.(weight|bias)", key):
            raise KeyError(f"no original name for VAE key {key}")
        out[new.replace(".conv_shortcut.", ".nin_shortcut.")] = value
    return out


def original_clip_keys(state):
    """transformers CLIPTextModel keys -> ``cond_stage_model.transformer.text_model.*`` (without the prefix)."""
    out = {"text_model." + key.removeprefix("text_model."): value for key, value in state.items()}
    # SD 1.x files carry this buffer; it is not a weight.
    out["text_model.embeddings.position_ids"] = torch.arange(77, dtype=torch.int64)[None]
    return out


_OPENCLIP_LAYER_NAMES = {
    "layer_norm1": "ln_1", "layer_norm2": "ln_2", "self_attn.out_proj": "attn.out_proj",
    "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
}


def original_openclip_keys(state, extra_layer_seed=0):
    """transformers CLIPTextModel keys -> OpenCLIP ``cond_stage_model.model.*`` keys (without the prefix).

    q/k/v projections are fused into ``attn.in_proj_*``. As in SD 2.x files, the
    tower has one more layer than the text encoder uses (SD 2.x takes the
    penultimate layer's output), plus ``text_projection`` and ``logit_scale``.
    """
    state = {key.removeprefix("text_model."): value for key, value in state.items()}
    out = {}
    num_layers = 0
    for key, value in state.items():
        if key == "embeddings.token_embedding.weight":
            out["token_embedding.weight"] = value
        elif key == "embeddings.position_embedding.weight":
            out["positional_embedding"] = value
        elif m := re.fullmatch(r"final_layer_norm\.(weight|bias)", key):
            out[f"ln_final.{m[1]}"] = value
        elif m := re.fullmatch(r"encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)", key):
            num_layers = max(num_layers, int(m[1]) + 1)
            if m[2] == "q":
                parts = [state[f"encoder.layers.{m[1]}.self_attn.{p}_proj.{m[3]}"] for p in "qkv"]
                out[f"transformer.resblocks.{m[1]}.attn.in_proj_{m[3]}"] = torch.cat(parts, dim=0)
        elif m := re.fullmatch(r"encoder\.layers\.(\d+)\.(layer_norm1|layer_norm2|self_attn\.out_proj|mlp\.fc1|mlp\.fc2)\.(weight|bias)", key):
            out[f"transformer.resblocks.{m[1]}.{_OPENCLIP_LAYER_NAMES[m[2]]}.{m[3]}"] = value
        else:
            raise KeyError(f"no OpenCLIP name for text encoder key {key}")
    generator = torch.Generator().manual_seed(extra_layer_seed)
    for key in [k for k in out if k.startswith("transformer.resblocks.0.")]:
        extra = key.replace("resblocks.0.", f"resblocks.{num_layers}.")
        out[extra] = torch.randn(out[key].shape, generator=generator)
    width = out["ln_final.weight"].shape[0]
    out["text_projection"] = torch.randn(width, width, generator=generator)
    out["logit_scale"] = torch.tensor(4.6052)
    return out


def original_checkpoint(pipe, openclip=False, unet=None, ema_unet=None):
    """The pipeline's networks as one original-layout state dict of torch tensors.

    ``unet`` replaces the pipeline's UNet. With ``ema_unet``, that UNet's weights
    are stored under ``model_ema.*`` (LDM's flattened names) beside the other
    under ``model.diffusion_model.*``.
    """
    def state(module):
        return {k: v.detach().clone().contiguous() for k, v in module.state_dict().items()}

    unet = unet or pipe.unet
    unet = original_unet_keys(state(unet), unet.config)
    vae = original_vae_keys(state(pipe.vae), pipe.vae.config)
    if openclip:
        text = {"cond_stage_model.model." + k: v for k, v in original_openclip_keys(state(pipe.text_encoder)).items()}
    else:
        text = {"cond_stage_model.transformer." + k: v for k, v in original_clip_keys(state(pipe.text_encoder)).items()}
    tensors = {
        **{"model.diffusion_model." + k: v for k, v in unet.items()},
        **{"first_stage_model." + k: v for k, v in vae.items()},
        **text,
        # Non-network entries real files carry.
        "betas": torch.linspace(1e-4, 2e-2, 1000),
        "alphas_cumprod": torch.linspace(0.999, 0.01, 1000),
    }
    if ema_unet is not None:
        ema = original_unet_keys(state(ema_unet), ema_unet.config)
        tensors.update({"model_ema.diffusion_model" + k.replace(".", ""): v for k, v in ema.items()})
        tensors["model_ema.decay"] = torch.tensor(0.9999)
        tensors["model_ema.num_updates"] = torch.tensor(1000, dtype=torch.int32)
    return tensors


def save_original(tensors, path):
    """Writes an original-layout state dict as ``.safetensors`` or, as LDM does, a ``.ckpt`` with ``state_dict``."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    else:
        torch.save({"state_dict": tensors, "global_step": 470000, "epoch": 6}, path)
    return path
