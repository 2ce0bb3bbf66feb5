"""``StableDiffusion``: the tokenizer, the three networks and the scheduler config of one checkpoint."""

import contextlib
import dataclasses
import json
import shutil
import tempfile
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from sd_tf import weights
from sd_tf.config import StableDiffusionConfig, preset, read_config_folder
from sd_tf.images import load_image, to_uint8
from sd_tf.models import TextEncoder, UNet, VAEDecoder, VAEEncoder
from sd_tf.pretrained import resolve_model
from sd_tf.samplers import make_sampler
from sd_tf.tokenizer import CLIPTokenizer

# dtype -> Keras dtype policy of (the text encoder and VAE encoder, the UNet). "bfloat16" is
# mixed_bfloat16 with the UNet's weights stored in bfloat16 too: the same precision (mixed
# precision rounds each weight to bfloat16 before use anyway) without casting 860M weights
# every step. Inference only: training needs float32 master weights.
NETWORK_POLICIES = {
    "float32": ("float32", "float32"),
    "mixed_float16": ("mixed_float16", "mixed_float16"),
    "mixed_bfloat16": ("mixed_bfloat16", "mixed_bfloat16"),
    "bfloat16": ("mixed_bfloat16", "bfloat16"),
}
DTYPES = tuple(NETWORK_POLICIES)
COMPILE_MODES = ("auto", "xla", "graph", "eager")
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")
VAE_TILE_OVERLAP = 0.25  # the fraction of a VAE decoder tile shared with each neighbour, blended linearly


@contextlib.contextmanager
def dtype_policy(name):
    """Keras layers created inside compute in ``name`` ("float32", "mixed_bfloat16", ...)."""
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(name)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


def resolve_compile(mode):
    """The compile mode to use: "xla", "graph" (a tf.function without XLA) or "eager".

    "auto" picks XLA on GPU and TPU; on CPU it picks graph mode, where oneDNN's
    kernels (AMX for bfloat16) run much faster than XLA's CPU code.
    """
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile must be one of {COMPILE_MODES}, not {mode!r}")
    if mode == "auto":
        accelerators = tf.config.list_logical_devices("GPU") + tf.config.list_logical_devices("TPU")
        return "xla" if accelerators else "graph"
    return mode


def connect_tpu():
    """A ``TPUStrategy`` on the attached TPU; ValueError when there is none.

    Finds a TPU named by TPU_NAME or Colab's environment, else a TPU VM's own
    chips (``/dev/accel*`` or ``/dev/vfio``).
    """
    try:
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver()
    except ValueError:
        if not (list(Path("/dev").glob("accel*")) or list(Path("/dev/vfio").glob("[0-9]*"))):
            raise ValueError("no TPU found (no TPU_NAME, no Colab TPU, no local TPU chips)") from None
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver("local")
    tf.config.experimental_connect_to_cluster(resolver)
    tf.tpu.experimental.initialize_tpu_system(resolver)
    return tf.distribute.TPUStrategy(resolver)


def make_strategy(name):
    """The ``tf.distribute`` strategy of a command-line name: "default" (the current strategy),
    "mirrored" (every local GPU, else every logical CPU device), "multiworker" (from TF_CONFIG), "tpu"."""
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        devices = tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("CPU")
        return tf.distribute.MirroredStrategy([device.name for device in devices])
    if name == "multiworker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    if name == "tpu":
        return connect_tpu()
    raise ValueError(f"unknown strategy {name!r}")


def tpu_or_default_strategy():
    """``TPUStrategy`` when a TPU is attached, else the current strategy (one device by default)."""
    try:
        return connect_tpu()
    except ValueError:
        return tf.distribute.get_strategy()


def compiled(function, mode):
    """``function`` as a tf.function (with XLA for "xla"), or itself for "eager"."""
    if mode == "eager":
        return function
    return tf.function(function, jit_compile=mode == "xla")


def tiled_decode(decode, latents, tile_size, factor):
    """``decode`` applied to overlapping ``tile_size``² tiles of ``latents``, blended into one image.

    Memory is bounded by one tile. Neighbouring tiles share VAE_TILE_OVERLAP of
    a tile; across the shared band each tile's weight ramps linearly, so tile
    edges leave no seam. All tiles have one shape (the last row and column
    are shifted inwards), so a compiled ``decode`` is traced once.
    """
    _, height, width, _ = latents.shape
    overlap = max(1, int(tile_size * VAE_TILE_OVERLAP))
    stride = tile_size - overlap

    def starts(size):
        if size <= tile_size:
            return [0]
        return sorted({*range(0, size - tile_size, stride), size - tile_size})

    def ramp(start, length, size):
        """Blend weights (length * factor,) of a tile at ``start``: rising over the band shared with a
        tile before it, falling over the band shared with a tile after it."""
        weight = np.ones(length * factor, np.float32)
        band = (np.arange(overlap * factor, dtype=np.float32) + 0.5) / (overlap * factor)
        if start > 0:
            weight[:band.size] = band
        if start + length < size:
            weight[-band.size:] = np.minimum(weight[-band.size:], band[::-1])
        return weight

    images = weights = None
    for top in starts(height):
        for left in starts(width):
            tile = latents[:, top:top + tile_size, left:left + tile_size]
            decoded = np.asarray(decode(tile), np.float32)
            if images is None:
                images = np.zeros((decoded.shape[0], height * factor, width * factor, decoded.shape[-1]), np.float32)
                weights = np.zeros((1, height * factor, width * factor, 1), np.float32)
            mask = np.outer(ramp(top, tile.shape[1], height), ramp(left, tile.shape[2], width))[None, :, :, None]
            window = np.s_[:, top * factor:top * factor + decoded.shape[1], left * factor:left * factor + decoded.shape[2]]
            images[window] += decoded * mask
            weights[window] += mask
    return images / weights


def detect_preset(groups):
    """The preset name that fits an original single file's tensors (see ``weights.split_original``)."""
    conv_in = groups["unet"].get("input_blocks.0.0.weight")
    if conv_in is None or conv_in.ndim != 4:
        raise weights.CheckpointError("cannot detect the model: no UNet input convolution (input_blocks.0.0.weight)")
    in_channels = conv_in.shape[1]
    if in_channels not in (4, 9):
        raise weights.CheckpointError(
            f"no preset for a UNet with {in_channels} input channels (4: text-to-image, 9: inpainting); "
            "pass config= a diffusers folder of config files"
        )
    inpaint = "-inpaint" if in_channels == 9 else ""
    if groups["openclip"]:
        return "sd-v2" + (inpaint or "")
    return "sd-v1" + inpaint


class StableDiffusion:
    """A Stable Diffusion checkpoint as Keras models: ``text_encoder``, ``unet``, ``vae_encoder``, ``vae_decoder``."""

    def __init__(self, config: StableDiffusionConfig, tokenizer=None, dtype="float32", compile="auto", strategy=None):
        """Builds the networks (random weights) under ``dtype`` and ``strategy`` (default: the current one).

        ``dtype``: "float32", "mixed_float16" or "mixed_bfloat16" for the text
        encoder, UNet and VAE encoder, or "bfloat16" (mixed_bfloat16 with the UNet's
        weights stored in bfloat16: faster, inference only); the VAE decoder always
        runs in float32, as the SD VAE overflows in float16. ``compile``: see
        ``resolve_compile``.
        """
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, not {dtype!r}")
        self.config = config
        self.dtype = dtype
        self.compile = resolve_compile(compile)
        self.strategy = strategy or tf.distribute.get_strategy()
        self.tokenizer = tokenizer or CLIPTokenizer()
        self.tokenizer.pad_token_id = config.pad_token_id
        # Latents larger than this (in latent pixels) are decoded in overlapping tiles; None: never.
        self.vae_tile_size = None
        with self.strategy.scope():
            encoders_policy, unet_policy = NETWORK_POLICIES[dtype]
            with dtype_policy(encoders_policy):
                self.text_encoder = TextEncoder(config.text_encoder)
                self.vae_encoder = VAEEncoder(config.vae)
            with dtype_policy(unet_policy):
                self.unet = UNet(config.unet)
            self.vae_decoder = VAEDecoder(config.vae)
        self._compile_functions()

    # ------------------------------------------------------------------
    # Loading and saving
    # ------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path, *, config=None, use_ema=False, variant=None, prediction_type=None,
                        dtype="float32", compile="auto", strategy=None):
        """Loads a diffusers folder, an original single ``.safetensors``/``.ckpt`` file, or a shipped model by name.

        ``config`` (single files only) is a preset name or a diffusers folder of
        config files; by default the preset is detected from the tensors.
        ``use_ema`` (single files) takes the UNet's ``model_ema.*`` weights;
        off by default, as in diffusers. ``variant`` picks e.g. ``fp16`` files
        in a folder. ``prediction_type`` overrides the scheduler config's.
        ``dtype``, ``compile`` and ``strategy`` are as in ``__init__``.
        """
        path = resolve_model(path)
        if path.is_dir():
            sd_config, tensors, tokenizer = cls._read_folder(path, variant)
        elif path.suffix in SINGLE_FILE_SUFFIXES:
            sd_config, tensors, tokenizer = cls._read_single_file(path, config, use_ema)
        else:
            raise ValueError(f"{path}: not a diffusers folder nor a {'/'.join(SINGLE_FILE_SUFFIXES)} file")
        if prediction_type is not None:
            sd_config = sd_config.with_prediction_type(prediction_type)
        model = cls(sd_config, tokenizer, dtype=dtype, compile=compile, strategy=strategy)
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
        try:
            groups = weights.split_original(weights.read_checkpoint(path), use_ema=use_ema)
        except weights.CheckpointError as error:
            raise weights.CheckpointError(str(error) if str(path) in str(error) else f"{path}: {error}") from None
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
        """Assigns {"text_encoder", "unet", "vae"} tensor dicts (diffusers keys), all or nothing.

        Every network is checked before any variable is assigned; the problems
        of all of them are reported in one ``CheckpointError``.
        """
        assignments, problems = [], []
        for name, models in (
            ("text_encoder", [self.text_encoder]),
            ("unet", [self.unet]),
            ("vae", [self.vae_encoder, self.vae_decoder]),
        ):
            if name not in tensors:
                problems.append(f"{name}: no tensors given")
                continue
            try:
                assignments += weights.match_weights(models, tensors[name])
            except weights.CheckpointError as error:
                problems.append(f"{name}: {error}")
        if problems:
            raise weights.CheckpointError("\n".join(problems))
        weights.assign_weights(assignments)

    def save_pretrained(self, path, dtype="float32"):
        """Writes the diffusers folder layout; diffusers' ``StableDiffusionPipeline`` loads it.

        ``dtype`` "float16" stores the weights in half precision (half the size).

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
                    tensors = {key: value.astype(dtype) for key, value in tensors.items()}
                    save_file(tensors, str(staging / name / weights_name), metadata={"format": "pt"})
            self.tokenizer.save_pretrained(staging / "tokenizer")
            model_index = {
                "_class_name": pipeline,
                # The folder layout written (to_q/to_k/... attention names) is diffusers >= 0.14's;
                # diffusers reads this version (e.g. to tell the inpainting pipeline from its legacy one).
                "_diffusers_version": "0.30.0",
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
                try:
                    staging.rename(path)
                except BaseException:
                    old.rename(path)  # put the earlier folder back
                    raise
                shutil.rmtree(old)
            else:
                staging.rename(path)
        finally:
            if staging.exists():
                shutil.rmtree(staging)

    # ------------------------------------------------------------------
    # Compiled network calls
    # ------------------------------------------------------------------

    def _compile_functions(self):
        """The network calls used by generation, compiled once per input shape."""
        self._encode_tokens = compiled(lambda ids: tf.cast(self.text_encoder(ids, training=False), tf.float32), self.compile)
        self._guided_noise = compiled(self._guided_noise_fn, self.compile)
        self._vae_encode = compiled(lambda image: self.vae_encoder(image, training=False)[0], self.compile)
        self._vae_decode = compiled(lambda latents: self.vae_decoder(latents, training=False), self.compile)

    def _guided_noise_fn(self, latents, timestep, context, uncond_context, guidance_scale):
        """One UNet evaluation with classifier-free guidance (one batched call), float32 out.

        ``uncond_context`` is None when not guiding.
        """
        batch = tf.shape(latents)[0]
        if uncond_context is not None:
            latents = tf.concat([latents, latents], axis=0)
            context = tf.concat([uncond_context, context], axis=0)
        timesteps = tf.fill([tf.shape(latents)[0]], tf.cast(timestep, tf.float32))
        prediction = tf.cast(self.unet([latents, timesteps, context], training=False), tf.float32)
        if uncond_context is None:
            return prediction
        uncond, cond = prediction[:batch], prediction[batch:]
        return uncond + guidance_scale * (cond - uncond)

    def _predict_noise(self, latents, timestep, context, uncond_context, guidance_scale):
        """``_guided_noise`` with the batch split across the strategy's replicas, gathered back."""
        if self.strategy.num_replicas_in_sync == 1:
            return self._guided_noise(latents, timestep, context, uncond_context, guidance_scale)
        replicas = self.strategy.num_replicas_in_sync
        batch = int(latents.shape[0])
        bounds = [batch * r // replicas for r in range(replicas + 1)]

        def per_replica(tensor):
            if tensor is None:
                return None
            return self.strategy.experimental_distribute_values_from_function(
                lambda ctx: tensor[bounds[ctx.replica_id_in_sync_group]: bounds[ctx.replica_id_in_sync_group + 1]]
            )

        outputs = self.strategy.run(
            self._guided_noise,
            args=(per_replica(latents), timestep, per_replica(context), per_replica(uncond_context), guidance_scale),
        )
        return self.strategy.gather(outputs, axis=0)

    # ------------------------------------------------------------------
    # Text and images in and out
    # ------------------------------------------------------------------

    def encode_text(self, prompts):
        """Prompt(s) -> text-encoder hidden states (B, 77, D), float32 numpy."""
        return np.asarray(self._encode_tokens(tf.constant(self.tokenizer(prompts))))

    def encode_image(self, images):
        """Images (B, H, W, 3) in [0, 1] -> latents (B, H/8, W/8, C): posterior mean times the scaling factor."""
        mean = self._vae_encode(tf.constant(np.asarray(images, np.float32) * 2 - 1))
        return tf.cast(mean, tf.float32) * self.config.vae.scaling_factor

    def decode_latents(self, latents, output_type="uint8"):
        """Latents as the sampler produces them -> images (B, H, W, 3): uint8, or float in [0, 1].

        Raises FloatingPointError if any value is not finite, rather than return a black image.
        """
        check_output_type(output_type)
        latents = tf.convert_to_tensor(latents, tf.float32) / self.config.vae.scaling_factor
        if self.vae_tile_size is not None and max(latents.shape[1:3]) > self.vae_tile_size:
            images = tiled_decode(self._vae_decode, latents, self.vae_tile_size, self.vae_factor)
        else:
            images = np.asarray(self._vae_decode(latents), np.float32)
        if not np.isfinite(images).all():
            raise FloatingPointError("the decoded images hold NaN or infinite values (try dtype='float32')")
        images = np.clip(images / 2 + 0.5, 0.0, 1.0)
        return to_uint8(images) if output_type == "uint8" else images

    # ------------------------------------------------------------------
    # Generation
    # ------------------------------------------------------------------

    def text_to_image(self, prompt, *, negative_prompt=None, height=None, width=None, num_steps=50,
                      guidance_scale=7.5, scheduler=None, seed=None, latents=None, batch_size=1,
                      callback=None, output_type="uint8", eta=0.0):
        """Images (B, H, W, 3) for ``prompt`` (a string or a list), ``batch_size`` images per prompt.

        ``latents``: optional float32 NHWC standard normal noise (B, H/8, W/8, C),
        scaled by the sampler's initial sigma. Otherwise image i of the batch
        draws its noise from seed ``seed + i``. ``scheduler``: a sampler name
        (default: the checkpoint's scheduler); ``eta`` for "ddim".
        """
        check_output_type(output_type)
        job = self._prepare(prompt, negative_prompt, height, width, batch_size, seed, scheduler, eta, guidance_scale)
        sampler = job.sampler
        sampler.set_timesteps(num_steps)
        shape = (job.batch, job.height // self.vae_factor, job.width // self.vae_factor, self.latent_channels)
        if latents is None:
            latents = job.noise(shape[1:], step=0)
        elif tuple(np.shape(latents)) != shape:
            raise ValueError(f"latents must have shape {shape}, got {tuple(np.shape(latents))}")
        latents = tf.convert_to_tensor(latents, tf.float32) * sampler.init_noise_sigma
        latents = self._denoise(job, latents, 0, callback)
        return self.decode_latents(latents, output_type)

    def image_to_image(self, prompt, image, *, strength=0.8, noise=None, negative_prompt=None, num_steps=50,
                       guidance_scale=7.5, scheduler=None, seed=None, batch_size=1, callback=None,
                       output_type="uint8", eta=0.0):
        """Images like ``image`` (path, PIL image or HWC array) re-drawn for ``prompt``.

        ``strength`` in [0, 1] is the fraction of the schedule run, from the
        image noised to that level. ``noise`` replaces the random noise added
        at the starting step. Encoding uses the VAE posterior mean.
        """
        check_output_type(output_type)
        pixels = load_image(image)
        job = self._prepare(prompt, negative_prompt, pixels.shape[0], pixels.shape[1], batch_size, seed,
                            scheduler, eta, guidance_scale)
        start = self._start_index(job.sampler, num_steps, strength)
        image_latents = tf.repeat(self.encode_image(pixels[None]), job.batch, axis=0)
        noise = self._initial_noise(job, noise, image_latents.shape)
        if start < len(job.sampler.timesteps):
            latents = job.sampler.add_noise(image_latents, noise, start)
        else:
            latents = image_latents
        latents = self._denoise(job, latents, start, callback)
        return self.decode_latents(latents, output_type)

    def inpaint(self, prompt, image, mask, *, strength=1.0, noise=None, keep_unmasked=True, negative_prompt=None,
                num_steps=50, guidance_scale=7.5, scheduler=None, seed=None, batch_size=1, callback=None,
                output_type="uint8", eta=0.0):
        """Repaints the white (1) part of ``mask`` in ``image`` for ``prompt``; black (0) is kept.

        9-channel inpainting checkpoints get the mask and the masked image's
        latents as extra UNet inputs (diffusers' StableDiffusionInpaintPipeline);
        ordinary checkpoints blend the known latents back in after every step.
        With ``keep_unmasked`` the original pixels outside the mask are pasted
        back after decoding.
        """
        check_output_type(output_type)
        pixels, mask = load_image(image), load_image(mask, mode="L")
        if mask.shape != pixels.shape[:2]:
            raise ValueError(f"mask size {mask.shape[::-1]} differs from image size {pixels.shape[1::-1]}")
        mask = (mask >= 0.5).astype(np.float32)  # binarised, as diffusers does
        job = self._prepare(prompt, negative_prompt, pixels.shape[0], pixels.shape[1], batch_size, seed,
                            scheduler, eta, guidance_scale)
        sampler = job.sampler
        start = self._start_index(sampler, num_steps, strength)
        image_latents = tf.repeat(self.encode_image(pixels[None]), job.batch, axis=0)
        noise = self._initial_noise(job, noise, image_latents.shape)
        if strength == 1.0:
            latents = noise * sampler.init_noise_sigma
        elif start < len(sampler.timesteps):
            latents = sampler.add_noise(image_latents, noise, start)
        else:  # strength too low for any step, as in image_to_image
            latents = image_latents
        f = self.vae_factor
        latent_mask = tf.constant(np.repeat(mask[None, ::f, ::f, None], job.batch, axis=0))
        if self.config.unet.in_channels == 9:
            # diffusers zeroes the masked pixels in [-1, 1], i.e. makes them mid-grey.
            masked = self.encode_image(np.where(mask[..., None] > 0, 0.5, pixels)[None])
            job.extra_channels = tf.concat([latent_mask, tf.repeat(masked, job.batch, axis=0)], axis=-1)
        else:
            def blend_known(i, latents):
                known = image_latents
                if i + 1 < len(sampler.timesteps):
                    known = sampler.add_noise(image_latents, noise, i + 1)
                return (1 - latent_mask) * known + latent_mask * latents

            job.after_step = blend_known
        latents = self._denoise(job, latents, start, callback)
        images = self.decode_latents(latents, "float")
        if keep_unmasked:
            images = pixels * (1 - mask[..., None]) + images * mask[..., None]
        return to_uint8(images) if output_type == "uint8" else images.astype(np.float32)

    @property
    def vae_factor(self):
        return self.config.vae.downsampling_factor

    @property
    def latent_channels(self):
        return self.config.vae.latent_channels

    def _prepare(self, prompt, negative_prompt, height, width, batch_size, seed, scheduler, eta, guidance_scale):
        """Checks the arguments and encodes the text: a ``_Job`` for the denoising loop."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts or batch_size < 1:
            raise ValueError("give at least one prompt and batch_size >= 1")
        negatives = negative_prompt if negative_prompt is not None else ""
        negatives = [negatives] * len(prompts) if isinstance(negatives, str) else list(negatives)
        if len(negatives) != len(prompts):
            raise ValueError(f"{len(negatives)} negative prompts for {len(prompts)} prompts")
        height = self.config.image_size if height is None else int(height)
        width = self.config.image_size if width is None else int(width)
        for name, size in (("height", height), ("width", width)):
            if size <= 0 or size % self.vae_factor:
                raise ValueError(f"{name} must be a positive multiple of {self.vae_factor}, got {size}")
        prompts = [p for p in prompts for _ in range(batch_size)]
        negatives = [n for n in negatives for _ in range(batch_size)]
        context = tf.constant(self.encode_text(prompts))
        uncond = tf.constant(self.encode_text(negatives)) if guidance_scale > 1 else None
        return _Job(
            sampler=self.make_sampler(scheduler, eta=eta), batch=len(prompts), height=height, width=width,
            context=context, uncond_context=uncond, guidance_scale=tf.constant(guidance_scale, tf.float32),
            seeds=self._seeds(seed, len(prompts)),
        )

    def make_sampler(self, name=None, eta=0.0):
        """The sampler ``name`` (default: the checkpoint's scheduler class) configured from the checkpoint."""
        name = name or default_sampler_name(self.config.scheduler)
        return make_sampler(name, self.config.scheduler, **({"eta": eta} if name == "ddim" else {}))

    @staticmethod
    def _seeds(seed, count):
        if seed is None:
            seed = int(np.random.default_rng().integers(2**31 - count))
        return [int(seed) + i for i in range(count)]

    @staticmethod
    def _start_index(sampler, num_steps, strength):
        """Sets the sampler's timesteps; the index image-to-image starts from, as diffusers' ``get_timesteps``."""
        if not 0.0 <= strength <= 1.0:
            raise ValueError(f"strength must be in [0, 1], got {strength}")
        sampler.set_timesteps(num_steps)
        init_steps = min(int(num_steps * strength), num_steps)
        return max(num_steps - init_steps, 0) * sampler.order

    @staticmethod
    def _initial_noise(job, noise, shape):
        if noise is None:
            return job.noise(shape[1:], step=0)
        if tuple(np.shape(noise)) != tuple(shape):
            raise ValueError(f"noise must have shape {tuple(shape)}, got {tuple(np.shape(noise))}")
        return tf.convert_to_tensor(noise, tf.float32)

    def _denoise(self, job, latents, start, callback):
        """The denoising loop from timestep index ``start``: one compiled UNet call and one sampler step each."""
        sampler = job.sampler
        total = len(sampler.timesteps)
        for i in range(start, total):
            model_input = sampler.scale_model_input(latents, i)
            if job.extra_channels is not None:
                model_input = tf.concat([model_input, job.extra_channels], axis=-1)
            prediction = self._predict_noise(
                model_input, tf.constant(sampler.timesteps[i], tf.float32), job.context, job.uncond_context,
                job.guidance_scale,
            )
            step_noise = job.noise(latents.shape[1:], step=i + 1) if sampler.needs_noise else None
            latents = sampler.step(prediction, i, latents, noise=step_noise)
            if job.after_step is not None:
                latents = job.after_step(i, latents)
            if callback is not None:
                callback(i - start + 1, total - start, latents)
        return latents


OUTPUT_TYPES = ("uint8", "float")


def check_output_type(output_type):
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, not {output_type!r}")

# diffusers scheduler classes -> sampler names.
_SAMPLER_OF_SCHEDULER = {
    "DDIMScheduler": "ddim", "PNDMScheduler": "pndm", "LMSDiscreteScheduler": "lms",
    "EulerDiscreteScheduler": "euler", "EulerAncestralDiscreteScheduler": "euler_a",
    "DPMSolverMultistepScheduler": "dpmpp_2m",
}


def default_sampler_name(scheduler_config):
    """The sampler matching a checkpoint's scheduler class (PNDM when it names none we know)."""
    name = _SAMPLER_OF_SCHEDULER.get(scheduler_config.get("_class_name"), "pndm")
    if name == "dpmpp_2m" and scheduler_config.get("use_karras_sigmas"):
        name = "dpmpp_2m_karras"
    return name


@dataclasses.dataclass
class _Job:
    """What one generation call's denoising loop needs."""

    sampler: object
    batch: int
    height: int
    width: int
    context: tf.Tensor
    uncond_context: tf.Tensor | None
    guidance_scale: tf.Tensor
    seeds: list
    extra_channels: tf.Tensor | None = None  # mask and masked-image latents of inpainting UNets
    after_step: object = None  # (i, latents) -> latents, for latent-blending inpainting

    def noise(self, shape, step):
        """Standard normal noise (batch, *shape): image i's from seed (seeds[i], step)."""
        return tf.stack([tf.random.stateless_normal(shape, seed=[s, step]) for s in self.seeds])
