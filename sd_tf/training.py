"""Fine-tuning: the diffusion loss, clipped AdamW steps, EMA, loss scaling, resumable checkpoints.

The same step runs on one device or under any ``tf.distribute`` strategy:
each replica takes its share of the global batch, gradients are summed
across replicas, clipped by their global norm, and applied only if finite.
All randomness comes with the data (see ``sd_tf.data``), so the step itself
is deterministic and a resumed run repeats the uninterrupted one exactly.
"""

import dataclasses
import logging
import math

import keras
import numpy as np
import tensorflow as tf

from sd_tf.samplers.schedule import cumulative_alphas, make_betas

log = logging.getLogger(__name__)

LR_SCHEDULES = ("constant", "cosine")
# Dynamic loss scaling (mixed_float16): start, growth interval, factor.
INITIAL_LOSS_SCALE = 2.0**15
LOSS_SCALE_GROWTH_STEPS = 2000


@dataclasses.dataclass
class TrainConfig:
    """Fine-tuning settings. ``batch_size`` is the global batch of one optimizer step."""

    steps: int = 1000
    batch_size: int = 1
    grad_accum: int = 1
    learning_rate: float = 1e-5
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    weight_decay: float = 1e-2
    adam_beta_1: float = 0.9
    adam_beta_2: float = 0.999
    adam_epsilon: float = 1e-8
    max_grad_norm: float | None = 1.0
    ema_decay: float | None = 0.9999
    noise_offset: float = 0.0
    snr_gamma: float | None = None
    train_text_encoder: bool = False
    seed: int = 0

    def __post_init__(self):
        if self.steps < 1 or self.batch_size < 1 or self.grad_accum < 1:
            raise ValueError("steps, batch_size and grad_accum must be at least 1")
        if self.batch_size % self.grad_accum:
            raise ValueError(f"batch_size {self.batch_size} is not divisible by grad_accum {self.grad_accum}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, not {self.lr_schedule!r}")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be positive, got {self.learning_rate}")
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            raise ValueError(f"max_grad_norm must be positive (or None for no clipping), got {self.max_grad_norm}")
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in (0, 1) (or None for no EMA), got {self.ema_decay}")


class WarmupSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warmup to ``peak``, then constant or cosine decay to 0 at ``total`` steps."""

    def __init__(self, peak, warmup, total, kind):
        self.peak, self.warmup, self.total, self.kind = peak, warmup, total, kind

    def __call__(self, step):
        step = tf.cast(step, tf.float32)
        warm = tf.minimum(1.0, (step + 1) / max(self.warmup, 1))
        if self.kind == "constant":
            return self.peak * warm
        progress = tf.clip_by_value((step - self.warmup) / max(self.total - self.warmup, 1), 0.0, 1.0)
        return self.peak * warm * 0.5 * (1 + tf.cos(math.pi * progress))

    def get_config(self):
        return {"peak": self.peak, "warmup": self.warmup, "total": self.total, "kind": self.kind}


class Trainer:
    """Trains ``model.unet`` (and the text encoder if asked) of a ``StableDiffusion``.

    ``trainable`` overrides which variables train (textual inversion passes the
    token embedding); ``gradient_masks`` maps a variable's path to a 0/1 tensor
    that multiplies its gradient.
    """

    def __init__(self, model, config: TrainConfig, trainable=None, gradient_masks=None):
        self.model = model
        self.config = config
        self.strategy = model.strategy
        self.loss_scaling = model.dtype == "mixed_float16"
        alphas = cumulative_alphas(make_betas(**{k: model.config.scheduler.get(k, d) for k, d in (
            ("num_train_timesteps", 1000), ("beta_start", 0.00085), ("beta_end", 0.012),
            ("beta_schedule", "scaled_linear"), ("trained_betas", None))}))
        self.alphas_cumprod = tf.constant(alphas, tf.float32)
        self.prediction_type = model.config.prediction_type
        if trainable is None:
            trainable = list(model.unet.trainable_variables)
            if config.train_text_encoder:
                trainable += model.text_encoder.trainable_variables
        self.trainable = trainable
        self.gradient_masks = gradient_masks or {}
        with self.strategy.scope():
            self.step = tf.Variable(0, dtype=tf.int64, trainable=False, name="step",
                                    aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
            self.skipped_steps = tf.Variable(0, dtype=tf.int64, trainable=False, name="skipped_steps",
                                             aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
            self.loss_scale = tf.Variable(INITIAL_LOSS_SCALE if self.loss_scaling else 1.0, trainable=False,
                                          name="loss_scale", aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
            self.good_steps = tf.Variable(0, dtype=tf.int64, trainable=False, name="good_steps",
                                          aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
            schedule = WarmupSchedule(config.learning_rate, config.warmup_steps, config.steps, config.lr_schedule)
            self.optimizer = keras.optimizers.AdamW(
                learning_rate=schedule, weight_decay=config.weight_decay, beta_1=config.adam_beta_1,
                beta_2=config.adam_beta_2, epsilon=config.adam_epsilon,
            )
            self.optimizer.build(self.trainable)
            self.ema = None
            if config.ema_decay is not None:
                self.ema = [
                    tf.Variable(v.value, trainable=False, name="ema", aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
                    for v in self.trainable
                ]
        self._train_step = tf.function(self._distributed_step, jit_compile=False)

    # ------------------------------------------------------------------
    # The loss
    # ------------------------------------------------------------------

    def latents_of(self, batch):
        """Latents sampled from the VAE posterior (or cached mean/logvar), times the scaling factor."""
        if "latent_mean" in batch:
            mean, logvar = batch["latent_mean"], batch["latent_logvar"]
        else:
            mean, logvar = self.model.vae_encoder(batch["pixels"], training=False)
        mean, logvar = tf.cast(mean, tf.float32), tf.cast(logvar, tf.float32)
        sample = mean + tf.exp(0.5 * logvar) * batch["latent_noise"]
        return tf.stop_gradient(sample * self.model.config.vae.scaling_factor)

    def loss(self, batch, latents, global_batch):
        """Sum over the micro-batch of the per-example MSE (min-SNR weighted), divided by ``global_batch``."""
        c = self.config
        noise = batch["noise"] + c.noise_offset * batch["offset_noise"]
        timestep = batch["timestep"]
        alpha = tf.gather(self.alphas_cumprod, timestep)[:, None, None, None]
        noisy = tf.sqrt(alpha) * latents + tf.sqrt(1 - alpha) * noise
        context = self.model.text_encoder(batch["token_ids"], training=False)
        if not c.train_text_encoder:
            context = tf.stop_gradient(context)
        prediction = tf.cast(self.model.unet([noisy, tf.cast(timestep, tf.float32), context], training=True), tf.float32)
        if self.prediction_type == "v_prediction":
            target = tf.sqrt(alpha) * noise - tf.sqrt(1 - alpha) * latents
        else:
            target = noise
        per_example = tf.reduce_mean(tf.square(prediction - target), axis=[1, 2, 3])
        if c.snr_gamma is not None:
            snr = alpha[:, 0, 0, 0] / (1 - alpha[:, 0, 0, 0])
            weight = tf.minimum(snr, c.snr_gamma) / (snr + 1 if self.prediction_type == "v_prediction" else snr)
            per_example = per_example * weight
        return tf.reduce_sum(per_example) / global_batch

    # ------------------------------------------------------------------
    # One optimizer step
    # ------------------------------------------------------------------

    def _replica_step(self, batch):
        """Gradients of this replica's share over ``grad_accum`` micro-batches, summed across replicas."""
        c = self.config
        global_batch = float(c.batch_size)
        latents = self.latents_of(batch)
        micro = tf.shape(latents)[0] // c.grad_accum
        grads = [tf.zeros_like(v) for v in self.trainable]
        loss = 0.0
        for k in range(c.grad_accum):
            part = {key: value[k * micro:(k + 1) * micro] for key, value in batch.items()}
            with tf.GradientTape() as tape:
                part_loss = self.loss(part, latents[k * micro:(k + 1) * micro], global_batch)
                scaled = part_loss * self.loss_scale
            part_grads = tape.gradient(scaled, self.trainable)
            grads = [g + tf.convert_to_tensor(p) / self.loss_scale for g, p in zip(grads, part_grads)]
            loss += part_loss
        grads = [g * self.gradient_masks[v.path] if v.path in self.gradient_masks else g
                 for g, v in zip(grads, self.trainable)]
        context = tf.distribute.get_replica_context()
        grads = context.all_reduce(tf.distribute.ReduceOp.SUM, grads)
        loss = context.all_reduce(tf.distribute.ReduceOp.SUM, loss)
        raw_norm = tf.linalg.global_norm(grads)
        if c.max_grad_norm is not None:
            grads, _ = tf.clip_by_global_norm(grads, c.max_grad_norm, use_norm=raw_norm)
        clipped_norm = tf.linalg.global_norm(grads)
        finite = tf.math.is_finite(raw_norm)
        # Keras' optimizer sums gradients across replicas again: give it each replica's share.
        replicas = self.strategy.num_replicas_in_sync
        shares = [g / replicas for g in grads]
        context.merge_call(self._apply_if_finite, args=(shares, finite))
        return {"loss": loss, "grad_norm": raw_norm, "clipped_grad_norm": clipped_norm, "finite": finite}

    def _apply_if_finite(self, strategy, shares, finite):
        """In cross-replica context: the optimizer and EMA update if finite, else count a skipped step."""
        finite = strategy.experimental_local_results(finite)[0]

        def apply():
            strategy.extended.call_for_each_replica(self._apply, args=(shares,))
            return tf.constant(True)

        def skip():
            self.skipped_steps.assign_add(1)
            if self.loss_scaling:
                self.loss_scale.assign(tf.maximum(self.loss_scale * 0.5, 1.0))
                self.good_steps.assign(0)
            return tf.constant(False)

        tf.cond(finite, apply, skip)
        self.step.assign_add(1)

    def _apply(self, shares):
        self.optimizer.apply(shares, self.trainable)
        if self.loss_scaling:
            grow = self.good_steps + 1 >= LOSS_SCALE_GROWTH_STEPS
            self.loss_scale.assign(tf.where(grow, self.loss_scale * 2.0, self.loss_scale))
            self.good_steps.assign(tf.where(grow, tf.constant(0, tf.int64), self.good_steps + 1))
        if self.ema is not None:
            decay = self.ema_decay()
            for shadow, variable in zip(self.ema, self.trainable):
                shadow.assign(decay * shadow + (1.0 - decay) * tf.cast(variable.value, shadow.dtype))

    def ema_decay(self):
        """EMA decay with warmup: min(decay, (1 + n) / (10 + n)) after n updates."""
        n = tf.cast(self.step - self.skipped_steps, tf.float32) + 1.0
        return tf.minimum(self.config.ema_decay, (1.0 + n) / (10.0 + n))

    def _distributed_step(self, batch):
        metrics = self.strategy.run(self._replica_step, args=(batch,))
        return {key: self.strategy.experimental_local_results(value)[0] for key, value in metrics.items()}

    def train_step(self, batch):
        """One optimizer step on a global batch (a dict of tensors, or a distributed batch)."""
        with self.strategy.scope():
            metrics = self._train_step(batch)
        metrics = {key: float(value) for key, value in metrics.items()}
        metrics["learning_rate"] = float(self.optimizer.learning_rate)
        return metrics

    # ------------------------------------------------------------------
    # Weights
    # ------------------------------------------------------------------

    def swap_ema(self):
        """Exchanges the trained weights and their EMA (call twice to swap back)."""
        if self.ema is None:
            return
        for shadow, variable in zip(self.ema, self.trainable):
            value = variable.numpy()
            variable.assign(shadow.numpy().astype(value.dtype))
            shadow.assign(value.astype(shadow.dtype.as_numpy_dtype))

    def checkpoint(self):
        """A ``tf.train.Checkpoint`` of everything a resumed run needs."""
        parts = dict(unet=self.model.unet, text_encoder=self.model.text_encoder, optimizer=self.optimizer,
                     step=self.step, skipped_steps=self.skipped_steps, loss_scale=self.loss_scale,
                     good_steps=self.good_steps)
        if self.ema is not None:
            parts["ema"] = self.ema
        return tf.train.Checkpoint(**parts)


def global_batches(dataset, batch_size, strategy):
    """Batches the per-element stream and distributes it over the strategy's replicas."""
    dataset = dataset.batch(batch_size, drop_remainder=True).prefetch(2)
    return iter(strategy.experimental_distribute_dataset(dataset))


def parameter_count(variables):
    return int(sum(np.prod(v.shape) for v in variables))
