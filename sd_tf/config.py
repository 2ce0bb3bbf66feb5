"""A whole Stable Diffusion model's configuration, the named presets, and diffusers config folders."""

import dataclasses
import json
from pathlib import Path

from sd_tf.models import CLIPTextConfig, UNetConfig, VAEConfig
from sd_tf.samplers.schedule import SD1_SCHEDULER_CONFIG, SD2_SCHEDULER_CONFIG
from sd_tf.tokenizer import END_TOKEN_ID

# OpenCLIP (SD 2.x) pads with "!", token 0.
OPENCLIP_PAD_TOKEN_ID = 0


@dataclasses.dataclass
class StableDiffusionConfig:
    """The configs of the three networks, the scheduler config (a diffusers dict) and the pad token."""

    text_encoder: CLIPTextConfig
    unet: UNetConfig
    vae: VAEConfig
    scheduler: dict
    pad_token_id: int = END_TOKEN_ID

    @property
    def image_size(self):
        """The native image side in pixels."""
        return self.unet.sample_size * self.vae.downsampling_factor

    @property
    def prediction_type(self):
        return self.scheduler.get("prediction_type", "epsilon")

    def with_prediction_type(self, prediction_type):
        if prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction', not {prediction_type!r}")
        return dataclasses.replace(self, scheduler={**self.scheduler, "prediction_type": prediction_type})


def _sd1(in_channels=4):
    return StableDiffusionConfig(
        text_encoder=CLIPTextConfig(),
        unet=UNetConfig(in_channels=in_channels),
        vae=VAEConfig(),
        scheduler=dict(SD1_SCHEDULER_CONFIG),
    )


def _sd2(in_channels=4, sample_size=96, prediction_type="v_prediction"):
    return StableDiffusionConfig(
        text_encoder=CLIPTextConfig(
            hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
            num_attention_heads=16, hidden_act="gelu",
        ),
        unet=UNetConfig(
            sample_size=sample_size, in_channels=in_channels, attention_head_dim=(5, 10, 20, 20),
            cross_attention_dim=1024, use_linear_projection=True, upcast_attention=sample_size == 96,
        ),
        vae=VAEConfig(sample_size=sample_size * 8),
        scheduler={**SD2_SCHEDULER_CONFIG, "prediction_type": prediction_type},
        pad_token_id=OPENCLIP_PAD_TOKEN_ID,
    )


PRESETS = {
    "sd-v1": _sd1,  # SD 1.4 / 1.5
    "sd-v1-inpaint": lambda: _sd1(in_channels=9),
    "sd-v2": _sd2,  # SD 2.0 / 2.1 at 768 px, v-prediction
    "sd-v2-base": lambda: _sd2(sample_size=64, prediction_type="epsilon"),  # 2.x base at 512 px
    "sd-v2-inpaint": lambda: _sd2(in_channels=9, sample_size=64, prediction_type="epsilon"),
}


def preset(name):
    """The ``StableDiffusionConfig`` of a named preset."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}")
    return PRESETS[name]()


def _read_json(path):
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: missing (a diffusers Stable Diffusion folder needs it)") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from error


def read_config_folder(folder):
    """The config of a diffusers folder: ``unet/``, ``vae/``, ``text_encoder/`` configs, scheduler, tokenizer."""
    from sd_tf.tokenizer import CLIPTokenizer

    folder = Path(folder)
    return StableDiffusionConfig(
        text_encoder=CLIPTextConfig.from_dict(_read_json(folder / "text_encoder" / "config.json")),
        unet=UNetConfig.from_dict(_read_json(folder / "unet" / "config.json")),
        vae=VAEConfig.from_dict(_read_json(folder / "vae" / "config.json")),
        scheduler=_read_json(folder / "scheduler" / "scheduler_config.json"),
        pad_token_id=CLIPTokenizer.from_pretrained(folder / "tokenizer").pad_token_id
        if (folder / "tokenizer").is_dir() else END_TOKEN_ID,
    )
