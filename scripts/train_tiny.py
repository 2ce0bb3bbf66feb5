"""Trains the shipped "tiny-shapes" model from scratch on the procedural shapes data.

    python scripts/train_tiny.py --output sd_tf/pretrained/tiny-shapes

Two stages, on a 2-core CPU in about 80 minutes: (1) a small VAE learns to reconstruct
64x64 shape images through 16x16x4 latents; (2) with the VAE frozen, a fixed
set of training images is encoded once, and the UNet and a small CLIP text
encoder learn to denoise those latents from the captions, through
``sd_tf.training.Trainer`` (AdamW, gradient clipping, EMA). Captions of
held-out combinations (``sd_tf.shapes.HELD_OUT``) are never shown.
"""

import argparse
import time

import keras
import numpy as np
import tensorflow as tf

from sd_tf import shapes
from sd_tf.config import StableDiffusionConfig
from sd_tf.data import diffusion_noise
from sd_tf.models import CLIPTextConfig, UNetConfig, VAEConfig
from sd_tf.samplers.schedule import SD1_SCHEDULER_CONFIG
from sd_tf.stable_diffusion import StableDiffusion
from sd_tf.training import Trainer, TrainConfig

# Captions replaced by "" so that classifier-free guidance has an unconditional model to contrast with.
CAPTION_DROPOUT = 0.1
KL_WEIGHT = 1e-6


def tiny_config():
    """The tiny model's architecture.

    The VAE downsamples 4x (64 px -> 16x16x4 latents), not SD's 8x: shape
    edges and corners must survive the round trip, and a 16x16 latent still
    keeps the UNet cheap on a CPU. Cross-attention on the text sits at the
    8x8 and 4x4 levels and in the middle, where it is cheapest. The text
    encoder (2 layers, width 64) is trained jointly with the UNet.
    """
    return StableDiffusionConfig(
        text_encoder=CLIPTextConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                                    num_attention_heads=4, hidden_act="quick_gelu"),
        unet=UNetConfig(
            sample_size=16, block_out_channels=(32, 64, 128), layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=4, cross_attention_dim=64, norm_num_groups=8,
        ),
        vae=VAEConfig(block_out_channels=(16, 32, 64), layers_per_block=1, norm_num_groups=8,
                      sample_size=shapes.IMAGE_SIZE),
        scheduler={**SD1_SCHEDULER_CONFIG, "_class_name": "DPMSolverMultistepScheduler",
                   "algorithm_type": "dpmsolver++", "solver_order": 2},
    )


def draw_examples(seed, count):
    """``count`` random training images (float in [-1, 1]) and captions, from ``seed``."""
    images, captions, _ = shapes.sample_batch(np.random.default_rng(seed), count)
    return images.astype(np.float32) / 127.5 - 1.0, captions


def image_stream(seed, batch_size):
    """Endless batches of random training images, for the VAE."""
    def draw(index):
        return draw_examples([seed, int(index)], batch_size)[0]

    def batch(index):
        pixels = tf.numpy_function(draw, [index], tf.float32)
        pixels.set_shape((batch_size, shapes.IMAGE_SIZE, shapes.IMAGE_SIZE, 3))
        return {"pixels": pixels}

    return tf.data.Dataset.range(np.iinfo(np.int64).max).map(batch, num_parallel_calls=2).prefetch(2)


def latent_stream(model, seed, count, batch_size=256):
    """The diffusion training stream over ``count`` images encoded once by the trained VAE.

    Element i: a uniformly drawn example's posterior mean/logvar (flipped
    left-right half the time), its caption's tokens (or the empty caption's,
    with probability CAPTION_DROPOUT), and the diffusion noise of (seed, i).
    """
    images, captions = draw_examples([seed, 2**31], count)
    encode = tf.function(lambda pixels: model.vae_encoder(pixels, training=False))
    means, logvars = [], []
    for start in range(0, count, batch_size):
        mean, logvar = encode(images[start:start + batch_size])
        means.append(np.asarray(mean))
        logvars.append(np.asarray(logvar))
    mean, logvar = tf.constant(np.concatenate(means)), tf.constant(np.concatenate(logvars))
    token_ids = tf.constant(model.tokenizer(captions))
    empty = tf.constant(model.tokenizer([""])[0])
    latent_shape = mean.shape[1:]

    def element(index):
        keys = tf.random.experimental.stateless_split(tf.stack([tf.constant(seed, tf.int64), index]), 3)
        pick = tf.random.stateless_uniform((), keys[0], 0, count, dtype=tf.int32)
        flip = tf.random.stateless_uniform((), keys[1]) < 0.5
        drop = tf.random.stateless_uniform((), keys[2]) < CAPTION_DROPOUT
        flipped = lambda x: tf.where(flip, x[:, ::-1], x)  # noqa: E731
        return {
            "latent_mean": flipped(mean[pick]), "latent_logvar": flipped(logvar[pick]),
            "token_ids": tf.where(drop, empty, token_ids[pick]),
            **diffusion_noise(index, seed, latent_shape, 1000),
        }

    return tf.data.Dataset.range(np.iinfo(np.int64).max).map(element, num_parallel_calls=2)


def train_vae(model, steps, batch_size, seed, lr=1e-3):
    """Reconstruction (MSE) plus a small KL term, on both VAE halves; returns the latent scaling factor."""
    variables = model.vae_encoder.trainable_variables + model.vae_decoder.trainable_variables
    optimizer = keras.optimizers.Adam(keras.optimizers.schedules.CosineDecay(lr, steps))
    stream = iter(image_stream(seed + 1, batch_size))

    @tf.function
    def step(batch):
        with tf.GradientTape() as tape:
            mean, logvar = model.vae_encoder(batch["pixels"], training=True)
            latents = mean + tf.exp(0.5 * logvar) * tf.random.normal(tf.shape(mean))
            reconstruction = model.vae_decoder(latents, training=True)
            mse = tf.reduce_mean(tf.square(reconstruction - batch["pixels"]))
            kl = 0.5 * tf.reduce_mean(tf.reduce_sum(tf.square(mean) + tf.exp(logvar) - 1 - logvar, axis=[1, 2, 3]))
            loss = mse + KL_WEIGHT * kl
        grads = tape.gradient(loss, variables)
        grads, _ = tf.clip_by_global_norm(grads, 1.0)
        optimizer.apply(grads, variables)
        return mse, kl, tf.math.reduce_std(mean)

    start = time.time()
    for i in range(1, steps + 1):
        mse, kl, std = step(next(stream))
        if i % 50 == 0 or i == steps or i == 10:
            print(f"vae step {i}/{steps}: mse {float(mse):.5f} kl {float(kl):.1f} "
                  f"latent std {float(std):.3f} ({time.time() - start:.0f}s)", flush=True)
    # SD's convention: latents times the scaling factor have unit variance.
    batch = next(stream)
    mean, _ = model.vae_encoder(batch["pixels"])
    return float(1.0 / np.std(np.asarray(mean)))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="sd_tf/pretrained/tiny-shapes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vae-steps", type=int, default=1200)
    parser.add_argument("--vae-batch-size", type=int, default=16)
    parser.add_argument("--unet-steps", type=int, default=6000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--examples", type=int, default=20000, help="training images encoded for the UNet stage")
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--minutes", type=float, default=None,
                        help="stop the UNet stage early after this many minutes (the EMA weights are saved)")
    args = parser.parse_args(argv)

    keras.utils.set_random_seed(args.seed)
    model = StableDiffusion(tiny_config(), compile="graph")
    model.config.vae.scaling_factor = train_vae(model, args.vae_steps, args.vae_batch_size, args.seed)
    print(f"latent scaling factor {model.config.vae.scaling_factor:.5f}", flush=True)

    config = TrainConfig(steps=args.unet_steps, batch_size=args.batch_size, learning_rate=args.lr,
                         lr_schedule="cosine", warmup_steps=200, max_grad_norm=1.0, ema_decay=0.999,
                         train_text_encoder=True, seed=args.seed)
    trainer = Trainer(model, config)
    stream = iter(latent_stream(model, args.seed, args.examples).batch(args.batch_size).prefetch(2))
    start = time.time()
    for i in range(1, args.unet_steps + 1):
        metrics = trainer.train_step(next(stream))
        if i % 50 == 0 or i == args.unet_steps or i == 10:
            print(f"unet step {i}/{args.unet_steps}: loss {metrics['loss']:.4f} grad norm {metrics['grad_norm']:.3f} "
                  f"lr {metrics['learning_rate']:.2e} ({time.time() - start:.0f}s)", flush=True)
            if args.minutes is not None and time.time() - start > 60 * args.minutes:
                print(f"time budget of {args.minutes} minutes reached at step {i}", flush=True)
                break
    trainer.swap_ema()
    model.save_pretrained(args.output, dtype="float16")
    print(f"saved {args.output}")


if __name__ == "__main__":
    main()
