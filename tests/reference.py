"""Random-weight reference models (diffusers / transformers, PyTorch) for parity tests.

``reference_pipeline(kind)`` builds a small Stable Diffusion pipeline in
diffusers with the architecture of SD 1.x ("sd1"), SD 2.x ("sd2": linear
projections, per-block heads, GELU text encoder, v-prediction) or a 9-channel
inpainting UNet ("inpaint"), or the full SD 1.5 architecture ("sd15").
The UNet's output convolution is scaled so that predictions have about unit
variance, as a trained model's do; at the default initialisation they are
near zero and differences would hide.
"""

import numpy as np
import torch

from sd_tf.samplers.schedule import SD1_SCHEDULER_CONFIG, SD2_SCHEDULER_CONFIG

SMALL_TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
SMALL_UNET = dict(
    sample_size=8,
    block_out_channels=(32, 64, 64),
    layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    norm_num_groups=8,
)
SMALL_VAE = dict(
    block_out_channels=(16, 32, 32),
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    norm_num_groups=8,
    sample_size=32,
)

CONFIGS = {
    "sd1": dict(
        text=dict(SMALL_TEXT, hidden_act="quick_gelu"),
        unet=dict(SMALL_UNET, attention_head_dim=2, cross_attention_dim=32),
        vae=SMALL_VAE,
        scheduler=SD1_SCHEDULER_CONFIG,
        pad_token="<|endoftext|>",
    ),
    "sd2": dict(
        text=dict(SMALL_TEXT, hidden_act="gelu"),
        unet=dict(SMALL_UNET, attention_head_dim=(2, 4, 4), cross_attention_dim=32,
                  use_linear_projection=True, upcast_attention=True),
        vae=SMALL_VAE,
        scheduler=SD2_SCHEDULER_CONFIG,
        pad_token="!",
    ),
    "inpaint": dict(
        text=dict(SMALL_TEXT, hidden_act="quick_gelu"),
        unet=dict(SMALL_UNET, attention_head_dim=2, cross_attention_dim=32, in_channels=9),
        vae=SMALL_VAE,
        scheduler=SD1_SCHEDULER_CONFIG,
        pad_token="<|endoftext|>",
    ),
    "sd15": dict(
        text=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                  hidden_act="quick_gelu"),
        unet=dict(sample_size=64, attention_head_dim=8, cross_attention_dim=768),
        vae=dict(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                 up_block_types=("UpDecoderBlock2D",) * 4, sample_size=512),
        scheduler=SD1_SCHEDULER_CONFIG,
        pad_token="<|endoftext|>",
    ),
}


def scale_to_unit_variance(unet, generator_seed=0):
    """Scales ``conv_out`` so that the UNet's predictions on random inputs have std 1."""
    config = unet.config
    g = torch.Generator().manual_seed(generator_seed)
    sample = torch.randn(2, config.in_channels, 8, 8, generator=g)
    context = torch.randn(2, 7, config.cross_attention_dim, generator=g)
    with torch.no_grad():
        std = unet(sample, torch.tensor([10.0, 700.0]), context).sample.std()
        unet.conv_out.weight /= std
        unet.conv_out.bias /= std


def reference_components(kind, seed=0):
    """(text_encoder, unet, vae, scheduler config) with random weights, as PyTorch modules."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    spec = CONFIGS[kind]
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(**spec["text"])).eval()
    unet = UNet2DConditionModel(**spec["unet"]).eval()
    vae = AutoencoderKL(**spec["vae"]).eval()
    scale_to_unit_variance(unet, seed)
    return text_encoder, unet, vae, dict(spec["scheduler"])


def reference_pipeline(kind, folder, seed=0):
    """Builds a random-weight diffusers pipeline of ``kind`` and saves it to ``folder``; returns it."""
    from diffusers import StableDiffusionInpaintPipeline, StableDiffusionPipeline
    import diffusers
    from transformers import CLIPTokenizer as HFTokenizer

    from sd_tf.tokenizer import CLIPTokenizer

    text_encoder, unet, vae, scheduler_config = reference_components(kind, seed)
    tokenizer_dir = folder / "_tokenizer_source"
    tokenizer = CLIPTokenizer()
    tokenizer.save_pretrained(tokenizer_dir)
    hf_tokenizer = HFTokenizer.from_pretrained(tokenizer_dir, pad_token=CONFIGS[kind]["pad_token"])
    scheduler_class = getattr(diffusers, scheduler_config.get("_class_name", "PNDMScheduler"))
    scheduler = scheduler_class.from_config(scheduler_config)
    cls = StableDiffusionInpaintPipeline if kind == "inpaint" else StableDiffusionPipeline
    pipe = cls(vae=vae, text_encoder=text_encoder, tokenizer=hf_tokenizer, unet=unet, scheduler=scheduler,
               safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder)
    return pipe


def nchw(x):
    """NHWC numpy -> NCHW torch."""
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def nhwc(x):
    """NCHW torch -> NHWC numpy."""
    return x.detach().numpy().transpose(0, 2, 3, 1)
