"""``StableDiffusion``: the tokenizer, the three networks and the scheduler config of one checkpoint."""

import contextlib
import json
import shutil
import tempfile
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from sd_tf import weights
from sd_tf.config import StableDiffusionConfig, preset, read_config_folder
from sd_tf.models import TextEncoder, UNet, VAEDecoder, VAEEncoder
from sd_tf.tokenizer import CLIPTokenizer

DTYPES = ("float32", "mixed_float16", "mixed_bfloat16")
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")


@contextlib.contextmanager
def dtype_policy(name):
    """Keras layers created inside compute in ``name`` ("float32", "mixed_bfloat16", ...)."""
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(name)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


def detect_preset(groups):
    """The preset name that fits an original single file's tensors (see ``weights.split_original``)."""
    in_channels = groups["unet"]["input_blocks.0.0.weight"].shape[1]
    inpaint = "-inpaint" if in_channels == 9 else ""
    if groups["openclip"]:
        return "sd-v2" + (inpaint or "")
    return "sd-v1" + inpaint


class StableDiffusion:
    """A Stable Diffusion checkpoint as Keras models: ``text_encoder``, ``unet``, ``vae_encoder``, ``vae_decoder``."""

    def __init__(self, config: StableDiffusionConfig, tokenizer=None, dtype="float32"):
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, not {dtype!r}")
        self.config = config
        self.dtype = dtype
        self.tokenizer = tokenizer or CLIPTokenizer()
        self.tokenizer.pad_token_id = config.pad_token_id
        with dtype_policy(dtype):
            self.text_encoder = TextEncoder(config.text_encoder)
            self.unet = UNet(config.unet)
            self.vae_encoder = VAEEncoder(config.vae)
        # The SD VAE decoder overflows in float16: it always decodes in float32.
        self.vae_decoder = VAEDecoder(config.vae)

    # ------------------------------------------------------------------
    # Loading and saving
    # ------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path, *, config=None, use_ema=False, variant=None, prediction_type=None, dtype="float32"):
        """Loads a diffusers folder or an original single ``.safetensors``/``.ckpt`` file.

        ``config`` (single files only) is a preset name or a diffusers folder of
        config files; by default the preset is detected from the tensors.
        ``use_ema`` (single files) takes the UNet's ``model_ema.*`` weights;
        off by default, as in diffusers. ``variant`` picks e.g. ``fp16`` files
        in a folder. ``prediction_type`` overrides the scheduler config's.
        """
        path = Path(path)
        if path.is_dir():
            sd_config, tensors, tokenizer = cls._read_folder(path, variant)
        elif path.suffix in SINGLE_FILE_SUFFIXES:
            sd_config, tensors, tokenizer = cls._read_single_file(path, config, use_ema)
        elif not path.exists():
            raise FileNotFoundError(f"{path}: no such model folder or checkpoint file")
        else:
            raise ValueError(f"{path}: not a diffusers folder nor a {'/'.join(SINGLE_FILE_SUFFIXES)} file")
        if prediction_type is not None:
            sd_config = sd_config.with_prediction_type(prediction_type)
        model = cls(sd_config, tokenizer, dtype=dtype)
        model.load_tensors(tensors)
        return model

    @staticmethod
    def _read_folder(path, variant):
        if not (path / "unet").is_dir():
            raise FileNotFoundError(f"{path}: not a diffusers Stable Diffusion folder (no unet/ inside)")
        sd_config = read_config_folder(path)
        tensors = {
            "text_encoder": weights.text_encoder_tensors(weights.read_component(path / "text_encoder", "model", variant)),
            "unet": weights.read_component(path / "unet", "diffusion_pytorch_model", variant),
            "vae": weights.vae_tensors(weights.read_component(path / "vae", "diffusion_pytorch_model", variant)),
        }
        tokenizer = CLIPTokenizer.from_pretrained(path / "tokenizer") if (path / "tokenizer").is_dir() else None
        return sd_config, tensors, tokenizer

    @staticmethod
    def _read_single_file(path, config, use_ema):
        groups = weights.split_original(weights.read_checkpoint(path), use_ema=use_ema)
        if config is None:
            sd_config = preset(detect_preset(groups))
        elif Path(config).is_dir():
            sd_config = read_config_folder(config)
        else:
            sd_config = preset(config)
        if groups["openclip"]:
            text = weights.convert_openclip(groups["openclip"], sd_config.text_encoder.num_hidden_layers)
        else:
            text = weights.text_encoder_tensors(groups["clip"])
        tensors = {
            "text_encoder": text,
            "unet": weights.convert_original_unet(groups["unet"], sd_config.unet),
            "vae": weights.convert_original_vae(groups["vae"], sd_config.vae),
        }
        return sd_config, tensors, None

    def load_tensors(self, tensors):
        """Assigns {"text_encoder", "unet", "vae"} tensor dicts (diffusers keys), all or nothing per network."""
        for name, models in (
            ("text_encoder", [self.text_encoder]),
            ("unet", [self.unet]),
            ("vae", [self.vae_encoder, self.vae_decoder]),
        ):
            try:
                weights.load_weights(models, tensors[name])
            except weights.CheckpointError as error:
                raise weights.CheckpointError(f"{name}: {error}") from None

    def save_pretrained(self, path):
        """Writes the diffusers folder layout; diffusers' ``StableDiffusionPipeline`` loads it.

        The folder is written beside the target and moved into place at the end,
        so an interrupted save leaves any earlier folder at ``path`` intact.
        """
        from safetensors.numpy import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
        try:
            scheduler = dict(self.config.scheduler)
            pipeline = "StableDiffusionInpaintPipeline" if self.config.unet.in_channels == 9 else "StableDiffusionPipeline"
            components = {
                "text_encoder": (self.config.text_encoder.to_dict(), "config.json", "model.safetensors",
                                 {weights.TEXT_MODEL_PREFIX + k: v for k, v in weights.model_tensors([self.text_encoder]).items()}),
                "unet": (self.config.unet.to_dict(), "config.json", "diffusion_pytorch_model.safetensors",
                         weights.model_tensors([self.unet])),
                "vae": (self.config.vae.to_dict(), "config.json", "diffusion_pytorch_model.safetensors",
                        weights.model_tensors([self.vae_encoder, self.vae_decoder])),
                "scheduler": (scheduler, "scheduler_config.json", None, None),
            }
            for name, (config, config_name, weights_name, tensors) in components.items():
                (staging / name).mkdir()
                (staging / name / config_name).write_text(json.dumps(config, indent=2))
                if tensors is not None:
                    save_file(tensors, str(staging / name / weights_name), metadata={"format": "pt"})
            self.tokenizer.save_pretrained(staging / "tokenizer")
            model_index = {
                "_class_name": pipeline,
                "scheduler": ["diffusers", scheduler.get("_class_name", "PNDMScheduler")],
                "text_encoder": ["transformers", "CLIPTextModel"],
                "tokenizer": ["transformers", "CLIPTokenizer"],
                "unet": ["diffusers", "UNet2DConditionModel"],
                "vae": ["diffusers", "AutoencoderKL"],
                "safety_checker": [None, None],
                "feature_extractor": [None, None],
                "requires_safety_checker": False,
            }
            (staging / "model_index.json").write_text(json.dumps(model_index, indent=2))
            if path.exists():
                old = path.with_name(staging.name + ".old")
                path.rename(old)
                staging.rename(path)
                shutil.rmtree(old)
            else:
                staging.rename(path)
        finally:
            if staging.exists():
                shutil.rmtree(staging)

    # ------------------------------------------------------------------
    # Text
    # ------------------------------------------------------------------

    def encode_text(self, prompts):
        """Prompt(s) -> text-encoder hidden states (B, 77, D), float32 numpy."""
        token_ids = self.tokenizer(prompts)
        return np.asarray(self.text_encoder(tf.constant(token_ids), training=False), np.float32)
