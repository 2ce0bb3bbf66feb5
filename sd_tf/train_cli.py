"""``sd-tf train``: fine-tune a Stable Diffusion model (or learn a textual-inversion token) on a caption folder.

    sd-tf train --model path/to/model --data my_images/ --output runs/mine --resolution 512 \\
        --batch-size 4 --steps 2000 --lr 1e-5 --mixed-precision bf16

The data folder holds images with captions: ``metadata.jsonl`` lines of
``{"file_name": ..., "text": ...}``, or a ``.txt`` beside each image. Unusable
files are skipped with a warning and counted in the final report.

The output folder receives the exported model (diffusers layout, EMA weights
when EMA is on; loads in sd_tf and diffusers), ``checkpoints/`` and ``logs/``
(TensorBoard). SIGTERM or SIGINT stop after the current step with a
checkpoint; ``--resume`` continues from the newest checkpoint exactly as the
uninterrupted run would have. Bad flags, data or models exit with status 2
before any training.
"""

import argparse
import contextlib
import hashlib
import sys
import warnings
from pathlib import Path

from sd_tf.pretrained import DEFAULT_MODEL

MIXED_PRECISION = {"no": "float32", "fp16": "mixed_float16", "bf16": "mixed_bfloat16"}
FULL_FINE_TUNE_LR, TEXTUAL_INVERSION_LR = 1e-5, 5e-4
DEFAULT_EMA_DECAY = 0.9999


def _positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _non_negative_int(text):
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative, got {text}")
    return value


def _positive_float(text):
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def _non_negative_float(text):
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must not be negative, got {text}")
    return value


def build_parser():
    parser = argparse.ArgumentParser(prog="sd-tf train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--data", required=True, help="folder of images with metadata.jsonl or .txt captions")
    add("--model", default=DEFAULT_MODEL,
        help=f"a diffusers folder, a .safetensors/.ckpt file, or a shipped model name (default {DEFAULT_MODEL})")
    add("--output", required=True, help="output folder: the exported model, checkpoints/ and logs/")
    add("--resolution", type=_positive_int, default=None,
        help="training image side in pixels (default: the model's native size); a multiple of the VAE's factor")
    add("--batch-size", type=_positive_int, default=1, help="global batch of one optimizer step")
    add("--steps", type=_positive_int, default=1000, help="optimizer steps in total")
    add("--lr", type=_positive_float, default=None,
        help=f"peak learning rate (default {FULL_FINE_TUNE_LR}; {TEXTUAL_INVERSION_LR} for textual inversion)")
    add("--lr-schedule", choices=("constant", "cosine"), default="constant")
    add("--warmup-steps", type=_non_negative_int, default=0)
    add("--max-grad-norm", type=_non_negative_float, default=1.0,
        help="clip gradients to this global norm (0: no clipping)")
    add("--grad-accum", type=_positive_int, default=1, help="micro-batches per step (divides --batch-size)")
    add("--weight-decay", type=_non_negative_float, default=None,
        help="AdamW weight decay (default 0.01; textual inversion needs 0)")
    add("--ema-decay", type=_non_negative_float, default=None,
        help=f"EMA decay of the exported weights, 0 disables (default {DEFAULT_EMA_DECAY}; 0 for textual inversion)")
    add("--mixed-precision", choices=tuple(MIXED_PRECISION), default="no",
        help="fp16 uses dynamic loss scaling (GPU); bf16 for TPUs and CPUs with AMX")
    add("--train-text-encoder", action="store_true", help="train the text encoder too")
    add("--textual-inversion", metavar="TOKEN", default=None,
        help="learn only a new token's embedding (e.g. '<my-cat>'); captions without it get it prepended")
    add("--initializer-token", metavar="WORD", default=None,
        help="textual inversion: start from this single-token word's embedding (default: the mean embedding)")
    add("--noise-offset", type=_non_negative_float, default=0.0)
    add("--snr-gamma", type=_positive_float, default=None, help="min-SNR loss weighting gamma (e.g. 5)")
    add("--checkpoint-every", type=_positive_int, default=500, help="steps between checkpoints")
    add("--keep-checkpoints", type=_non_negative_int, default=3, help="newest checkpoints kept (0: all)")
    add("--resume", action="store_true", help="continue from the newest checkpoint in OUTPUT/checkpoints")
    add("--seed", type=int, default=0, help="data order, augmentation and diffusion noise")
    add("--random-crop", action="store_true", help="random instead of centre crops")
    add("--flip", action="store_true", help="random horizontal flips")
    add("--cache-latents", metavar="DIR", default=None,
        help="compute each image's VAE posterior once (centre crop, no flip) into DIR and train from it")
    add("--compile", choices=("auto", "xla", "graph", "eager"), default="auto",
        help="the train step: XLA, a graph, or eager; auto = XLA on GPU/TPU, graph on CPU")
    add("--strategy", choices=("default", "mirrored", "multiworker", "tpu"), default="default",
        help="tf.distribute: one device, MirroredStrategy (local devices), "
             "MultiWorkerMirroredStrategy (TF_CONFIG), TPUStrategy")
    add("--log-every", type=_positive_int, default=1, help="steps between progress lines")
    return parser


class UsageError(Exception):
    """A problem with the command line, the data or the model, found before training."""


def check_resolution(sd_config, resolution):
    """The UNet takes any latent size (its upsamplers match the skip connections' sizes), so an
    image side only has to be a positive multiple of the VAE's downsampling factor."""
    factor = sd_config.vae.downsampling_factor
    if resolution % factor:
        raise UsageError(f"--resolution {resolution} is not a multiple of the VAE's downsampling factor {factor} "
                         f"(the model's native size is {sd_config.image_size})")


def train_config(args):
    from sd_tf.training import TrainConfig

    textual_inversion = args.textual_inversion is not None
    ema = args.ema_decay if args.ema_decay is not None else (0.0 if textual_inversion else DEFAULT_EMA_DECAY)
    weight_decay = args.weight_decay if args.weight_decay is not None else (0.0 if textual_inversion else 1e-2)
    if textual_inversion and weight_decay:
        raise UsageError("textual inversion needs --weight-decay 0 (decay would change every embedding row)")
    if not 0 <= ema < 1:
        raise UsageError(f"--ema-decay must be in [0, 1), got {ema}")
    try:
        return TrainConfig(
            steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum,
            learning_rate=args.lr or (TEXTUAL_INVERSION_LR if textual_inversion else FULL_FINE_TUNE_LR),
            lr_schedule=args.lr_schedule, warmup_steps=args.warmup_steps, weight_decay=weight_decay,
            max_grad_norm=args.max_grad_norm or None, ema_decay=ema or None, noise_offset=args.noise_offset,
            snr_gamma=args.snr_gamma, train_text_encoder=args.train_text_encoder, seed=args.seed,
        )
    except ValueError as error:
        raise UsageError(str(error)) from None


def check_arguments(args):
    """Everything that can be checked without TensorFlow work; raises UsageError."""
    if args.textual_inversion is not None and args.train_text_encoder:
        raise UsageError("--textual-inversion trains only the new token; it excludes --train-text-encoder")
    if args.initializer_token is not None and args.textual_inversion is None:
        raise UsageError("--initializer-token needs --textual-inversion")
    if args.cache_latents and (args.random_crop or args.flip):
        raise UsageError("--cache-latents stores centre-cropped, unflipped latents; "
                         "it cannot be combined with --random-crop or --flip")
    output = Path(args.output)
    if output.exists() and not output.is_dir():
        raise UsageError(f"--output {output} exists and is not a folder")
    if not args.resume and (output / "checkpoints" / "checkpoint").exists():
        raise UsageError(f"{output} holds checkpoints of an earlier run: pass --resume to continue it, "
                         "or choose another --output")
    return train_config(args)


def read_model_config(model):
    """(path, config or None): the model's config read without its weights when it is a folder."""
    from sd_tf.config import read_config_folder
    from sd_tf.pretrained import resolve_model

    try:
        path = resolve_model(model)
    except FileNotFoundError as error:
        raise UsageError(str(error)) from None
    if path.is_dir():
        if not (path / "unet").is_dir():
            raise UsageError(f"--model {path}: not a diffusers Stable Diffusion folder (no unet/ inside)")
        try:
            return path, read_config_folder(path)
        except (FileNotFoundError, ValueError) as error:
            raise UsageError(f"--model {path}: {error}") from None
    if path.suffix not in (".safetensors", ".ckpt"):
        raise UsageError(f"--model {path}: not a diffusers folder nor a .safetensors/.ckpt file")
    return path, None


def vae_fingerprint(model):
    """A hash of the VAE encoder's weights: the latent cache's key for "the same VAE"."""
    digest = hashlib.sha1()
    for variable in model.vae_encoder.weights:
        digest.update(variable.path.encode())
        digest.update(variable.numpy().tobytes())
    return digest.hexdigest()[:16]


def run(args):
    """Checks everything, then trains; returns (``sd_tf.training.FitResult``, the ``Trainer``)."""
    from sd_tf.data import DatasetError, TrainingData, cache_latents

    config = check_arguments(args)
    # The data folder first: a scan (every image decoded once) is cheap next to loading a model.
    try:
        from sd_tf.data import read_captions

        scan = read_captions(args.data)
    except DatasetError as error:
        raise UsageError(f"--data: {error}") from None
    path, sd_config = read_model_config(args.model)
    if sd_config is not None and args.resolution is not None:
        check_resolution(sd_config, args.resolution)

    import tensorflow as tf

    from sd_tf import textual_inversion as ti
    from sd_tf.stable_diffusion import StableDiffusion, make_strategy
    from sd_tf.training import Trainer, export_model, fit, parameter_count
    from sd_tf.weights import CheckpointError

    try:
        strategy = make_strategy(args.strategy)
    except (ValueError, RuntimeError, tf.errors.OpError) as error:
        raise UsageError(f"--strategy {args.strategy}: {error}") from None
    if config.batch_size % (strategy.num_replicas_in_sync * config.grad_accum):
        raise UsageError(f"--batch-size {config.batch_size} must be divisible by the {strategy.num_replicas_in_sync} "
                         f"replicas times --grad-accum {config.grad_accum}")
    try:
        model = StableDiffusion.from_pretrained(path, dtype=MIXED_PRECISION[args.mixed_precision],
                                                compile=args.compile, strategy=strategy)
    except (FileNotFoundError, ValueError, CheckpointError) as error:
        raise UsageError(f"--model: {error}") from None
    resolution = args.resolution or model.config.image_size
    check_resolution(model.config, resolution)

    trainable, masks, caption_fn, token = None, None, None, args.textual_inversion
    if token is not None:
        try:
            token_id = ti.add_placeholder_token(model, token, args.initializer_token)
        except ValueError as error:
            raise UsageError(f"--textual-inversion: {error}") from None
        trainable, masks = ti.trainable_embedding(model, token_id)

        def caption_fn(text):
            return text if token.lower() in text.lower() else f"{token}, {text}"

    latent_side = resolution // model.vae_factor
    data = TrainingData(args.data, model.tokenizer, resolution, (latent_side, latent_side, model.latent_channels),
                        seed=args.seed, random_crop=args.random_crop, flip=args.flip,
                        num_train_timesteps=int(model.config.scheduler.get("num_train_timesteps", 1000)),
                        caption_fn=caption_fn, scan=scan)
    if args.cache_latents:
        encode = tf.function(lambda pixels: model.vae_encoder(pixels, training=False))
        files = cache_latents(data.paths, encode, args.cache_latents, resolution, vae_fingerprint(model),
                              progress=lambda done, total: print(f"caching latents: {done}/{total}", flush=True))
        data.use_latent_cache(files)

    trainer = Trainer(model, config, trainable=trainable, gradient_masks=masks, compile=args.compile)
    print(f"training {parameter_count(trainer.trainable):,} parameters "
          f"({'textual inversion ' + token if token else 'UNet' + (' + text encoder' if config.train_text_encoder else '')}) "
          f"on {len(data)} images ({data.skipped} skipped) at {resolution}px, batch {config.batch_size} over "
          f"{strategy.num_replicas_in_sync} replica(s), {trainer.compile} mode", flush=True)

    def export(trainer, output_dir):
        export_model(trainer.model, output_dir)
        if token is not None:
            ti.save_learned_embeds(trainer.model, token, Path(output_dir) / ti.LEARNED_EMBEDS_FILE)

    try:
        result = fit(trainer, data, args.output, checkpoint_every=args.checkpoint_every, resume=args.resume,
                     log_every=args.log_every, max_to_keep=args.keep_checkpoints or None, export=export)
    except ValueError as error:  # e.g. checkpoints of another run in the output folder
        raise UsageError(str(error)) from None
    return result, trainer


@contextlib.contextmanager
def _plain_warnings():
    """Warnings (skipped data files) as one "warning: ..." line each."""
    previous = warnings.formatwarning
    warnings.formatwarning = lambda message, category, *args, **kwargs: f"warning: {message}\n"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always", UserWarning)
            yield
    finally:
        warnings.formatwarning = previous


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    with _plain_warnings():
        try:
            run(args)
        except UsageError as error:
            parser.error(str(error))  # exit status 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
