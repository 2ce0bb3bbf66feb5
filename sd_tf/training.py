"""Fine-tuning: the diffusion loss, clipped AdamW steps, EMA, loss scaling, resumable checkpoints.

The same step runs on one device or under any ``tf.distribute`` strategy:
each replica takes its share of the global batch, gradients are summed
across replicas, clipped by their global norm, and applied only if finite.
All randomness comes with the data (see ``sd_tf.data``), so the step itself
is deterministic and a resumed run repeats the uninterrupted one exactly.

``fit`` is the run loop: progress lines, TensorBoard summaries, checkpoints
every N steps and on SIGTERM/SIGINT, ``resume``, and the final export. The
output folder of a run is::

    OUTPUT/model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/
                                   the exported model (EMA weights when EMA is on)
    OUTPUT/learned_embeds.safetensors   textual inversion only: {token: vector}
    OUTPUT/checkpoints/            tf.train checkpoints (CheckpointManager)
    OUTPUT/logs/                   TensorBoard summaries

so ``OUTPUT`` loads directly in ``StableDiffusion.from_pretrained`` and in
diffusers' ``StableDiffusionPipeline.from_pretrained``; the export replaces
only the model's own entries and never touches ``checkpoints/`` or ``logs/``.
"""

import dataclasses
import logging
import math
import shutil
import signal
import tempfile
import threading
import time
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from sd_tf.data import distributed_batches
from sd_tf.samplers.schedule import cumulative_alphas, make_betas
from sd_tf.stable_diffusion import resolve_compile

log = logging.getLogger(__name__)

LR_SCHEDULES = ("constant", "cosine")
# Dynamic loss scaling (mixed_float16): start, growth interval, factor.
INITIAL_LOSS_SCALE = 2.0**15
LOSS_SCALE_GROWTH_STEPS = 2000
CHECKPOINTS_DIR = "checkpoints"
LOGS_DIR = "logs"


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
        if self.warmup_steps < 0 or self.weight_decay < 0 or self.noise_offset < 0:
            raise ValueError("warmup_steps, weight_decay and noise_offset must not be negative")
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            raise ValueError(f"max_grad_norm must be positive (or None for no clipping), got {self.max_grad_norm}")
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in (0, 1) (or None for no EMA), got {self.ema_decay}")
        if self.snr_gamma is not None and self.snr_gamma <= 0:
            raise ValueError(f"snr_gamma must be positive (or None), got {self.snr_gamma}")


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
    that multiplies its gradient. ``compile``: "xla", "graph", "eager" or
    "auto" (default: the model's mode; see ``sd_tf.stable_diffusion.resolve_compile``).
    """

    def __init__(self, model, config: TrainConfig, trainable=None, gradient_masks=None, compile=None):
        if model.dtype == "bfloat16":
            raise ValueError('a dtype="bfloat16" model has bfloat16 weights and cannot be trained: '
                             'load it with dtype="mixed_bfloat16"')
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
        # The text encoder is differentiated only when one of its variables trains.
        text_variables = {id(v) for v in model.text_encoder.trainable_variables}
        self.text_gradients = any(id(v) in text_variables for v in trainable)
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
            self.schedule = WarmupSchedule(config.learning_rate, config.warmup_steps, config.steps, config.lr_schedule)
            self.optimizer = keras.optimizers.AdamW(
                learning_rate=self.schedule, weight_decay=config.weight_decay, beta_1=config.adam_beta_1,
                beta_2=config.adam_beta_2, epsilon=config.adam_epsilon,
            )
            self.optimizer.build(self.trainable)
            self.ema = None
            if config.ema_decay is not None:
                self.ema = [
                    tf.Variable(v.value, trainable=False, name="ema", aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
                    for v in self.trainable
                ]
        self.compile = resolve_compile(compile or model.compile)
        # XLA compiles each replica's loss and gradients (the bulk of the work). The cross-replica
        # sum, the clipping and the conditional optimizer/EMA update stay in the surrounding graph:
        # a jit_compile'd function cannot hold MirroredStrategy's cross-device all-reduce or the
        # merge_call into cross-replica context. On CPU, XLA compiles every op of this step and
        # its gradient (checked with the tiny test models, including Embedding's sparse gradient),
        # but oneDNN's graph-mode kernels are faster there, hence "auto" -> graph on CPU.
        # The step holds no Python control flow on tensors (tf.cond is explicit), so it is traced
        # without autograph, which saves ~15% of the tracing time.
        if self.compile == "xla":
            self._gradient_fn = tf.function(self._gradients, jit_compile=True, autograph=False)
        else:
            self._gradient_fn = self._gradients
        if self.compile == "eager":
            self._train_step = self._distributed_step
        else:
            self._train_step = tf.function(self._distributed_step, autograph=False)

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
        if not self.text_gradients:
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

    def _gradients(self, batch):
        """(loss, gradients) of this replica's share over ``grad_accum`` micro-batches, unscaled and masked."""
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
        return loss, grads

    def _replica_step(self, batch):
        """This replica's gradients, summed across replicas, clipped, and applied (in merge_call) if finite."""
        c = self.config
        loss, grads = self._gradient_fn(batch)
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
                # shadow - (1 - decay) (shadow - variable): an unchanged variable leaves its shadow
                # bit-identical, which decay * shadow + (1 - decay) * variable would not.
                shadow.assign_sub((1.0 - decay) * (shadow - tf.cast(variable.value, shadow.dtype)))

    def ema_decay(self):
        """EMA decay with warmup: min(decay, (1 + n) / (10 + n)) after n updates."""
        n = tf.cast(self.step - self.skipped_steps, tf.float32) + 1.0
        return tf.minimum(self.config.ema_decay, (1.0 + n) / (10.0 + n))

    def _distributed_step(self, batch):
        metrics = self.strategy.run(self._replica_step, args=(batch,))
        return {key: self.strategy.experimental_local_results(value)[0] for key, value in metrics.items()}

    def train_step(self, batch):
        """One optimizer step on a global batch (a dict of tensors, or a distributed batch).

        Returns floats: loss, grad_norm (before clipping), clipped_grad_norm,
        finite (1 or 0: the step was applied or skipped), learning_rate (of
        this step), loss_scale and skipped_steps (after it).
        """
        learning_rate = float(self.schedule(self.optimizer.iterations))
        with self.strategy.scope():
            metrics = self._train_step(batch)
        metrics = {key: float(value) for key, value in metrics.items()}
        metrics["learning_rate"] = learning_rate
        metrics["loss_scale"] = float(self.loss_scale.numpy())
        metrics["skipped_steps"] = float(self.skipped_steps.numpy())
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


def parameter_count(variables):
    return int(sum(np.prod(v.shape) for v in variables))


# ----------------------------------------------------------------------------
# Export
# ----------------------------------------------------------------------------


def export_model(model, output_dir, dtype="float32"):
    """Writes the diffusers layout into ``output_dir``, replacing only the model's own entries.

    ``StableDiffusion.save_pretrained`` writes a whole folder atomically (it
    replaces its target), so the model is saved to ``output_dir/.export`` and
    its entries are then moved into ``output_dir`` one by one, each with a
    rename: ``model_index.json`` is removed first and written last, so a
    folder with a ``model_index.json`` always holds a complete model. Other
    files (``checkpoints/``, ``logs/``, ``learned_embeds.safetensors``) are kept.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    staging = output_dir / ".export"
    if staging.exists():
        shutil.rmtree(staging)
    kwargs = {} if dtype == "float32" else {"dtype": dtype}
    model.save_pretrained(staging, **kwargs)
    index = output_dir / "model_index.json"
    if index.exists():
        index.unlink()
    entries = sorted(staging.iterdir(), key=lambda entry: entry.name == "model_index.json")
    for entry in entries:
        target = output_dir / entry.name
        old = output_dir / f".{entry.name}.old"
        if old.is_dir():
            shutil.rmtree(old)
        elif old.exists():
            old.unlink()
        if target.exists():
            target.rename(old)
        entry.rename(target)
        if old.is_dir():
            shutil.rmtree(old)
        elif old.exists():
            old.unlink()
    staging.rmdir()


# ----------------------------------------------------------------------------
# The run loop
# ----------------------------------------------------------------------------


@dataclasses.dataclass
class FitResult:
    """What a ``fit`` run did."""

    step: int  # the last step done (steps run in total, over all resumed runs)
    skipped_steps: int  # steps skipped for non-finite gradients
    skipped_files: int  # unusable data files
    resumed_from: int | None = None  # the checkpoint step this run started from
    interrupted: str | None = None  # the signal that stopped the run early ("SIGTERM", "SIGINT")
    exported: bool = False
    seconds: float = 0.0


class _StopFlag:
    """SIGTERM/SIGINT handlers that ask the loop to stop after the current step; a second signal aborts.

    The handler only sets a flag (printing from a handler can hit a print already under way).
    """

    SIGNALS = ("SIGTERM", "SIGINT")

    def __init__(self):
        self.signal = None
        self.previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for name in self.SIGNALS:
                number = getattr(signal, name)
                self.previous[number] = signal.signal(number, self._handle)
        return self

    def _handle(self, number, frame):
        name = signal.Signals(number).name
        if self.signal is not None:  # a second signal: stop now (checkpoints are written atomically)
            raise SystemExit(128 + number)
        self.signal = name

    def __exit__(self, *exc):
        for number, handler in self.previous.items():
            signal.signal(number, handler)
        return False


def _is_multi_worker(strategy):
    return isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy) and getattr(
        strategy.extended, "_num_workers", 1) > 1


def _is_chief(strategy):
    """Whether this process writes checkpoints, summaries and the export (always, but one worker of many)."""
    return bool(getattr(strategy.extended, "should_checkpoint", True))


def restore_latest(checkpoint, directory, print_fn=print):
    """Restores the newest readable checkpoint in ``directory``; returns its path, or None if there is none.

    A checkpoint that fails to restore (e.g. damaged storage) is reported and
    the next older one is tried. Checkpoints are only ever listed in the
    ``checkpoint`` state file once completely written (see ``fit``).
    """
    state = tf.train.get_checkpoint_state(str(directory))
    if state is None:
        return None
    paths = list(state.all_model_checkpoint_paths) or [state.model_checkpoint_path]
    for path in reversed(paths):
        try:
            checkpoint.restore(path).assert_existing_objects_matched()
        except Exception as error:  # TF raises OpError, IndexError, ... for damaged files
            print_fn(f"warning: cannot restore {path} ({type(error).__name__}: {str(error)[:200]}); trying an older one")
            continue
        return path
    raise RuntimeError(f"{directory}: none of the checkpoints {paths} could be restored")


def fit(trainer, data, output_dir, *, checkpoint_every=500, resume=False, log_every=1, max_to_keep=3,
        export=None, print_fn=None):
    """Runs ``trainer`` from its current step to ``config.steps``; checkpoints, logs and exports.

    ``data``: a ``sd_tf.data.TrainingData`` (anything with ``elements(indices)``
    and ``skipped``). The batches of step ``s`` are the stream's indices
    ``s * batch_size ...``, so a resumed run continues the data exactly.

    - Progress: a line per ``log_every`` steps with the step, loss, raw and
      clipped gradient norm, learning rate and images/s; TensorBoard scalars
      every step under ``output_dir/logs``.
    - Checkpoints: every ``checkpoint_every`` steps, at the end, and when
      SIGTERM or SIGINT arrives (the handlers set a flag; the current step
      finishes, a checkpoint is written, and ``fit`` returns with
      ``interrupted`` set). ``tf.train.CheckpointManager`` under
      ``output_dir/checkpoints`` keeps ``max_to_keep`` (None: all). A save cannot damage the
      previous checkpoint: TF writes the tensors under ``ckpt-N_temp/``, merges
      them into ``ckpt-N.index``/``ckpt-N.data-*`` (new names), and only then
      rewrites the ``checkpoint`` state file (write to a temporary file and
      rename) to list ``ckpt-N``; old checkpoints are deleted after that. A kill
      at any point leaves the state file naming complete checkpoints only.
    - ``resume``: restores the newest checkpoint and continues at its step + 1
      (starts from step 0 if there is none). Without ``resume``, existing
      checkpoints in the output folder are an error, not silently mixed in.
    - At the end: the EMA weights are swapped in (if EMA is on),
      ``export(trainer, output_dir)`` runs (default: ``export_model``), and a
      report is printed. Under MultiWorkerMirroredStrategy only the chief
      writes checkpoints (the others write theirs to a temporary folder, as
      TF requires every worker to save), summaries and the export.
    """
    print_fn = print_fn or (lambda text: print(text, flush=True))
    started = time.time()
    config, strategy = trainer.config, trainer.strategy
    output_dir = Path(output_dir)
    chief = _is_chief(strategy)
    checkpoint_dir = output_dir / CHECKPOINTS_DIR
    if chief:
        output_dir.mkdir(parents=True, exist_ok=True)
        write_dir = checkpoint_dir
        writer = tf.summary.create_file_writer(str(output_dir / LOGS_DIR))
    else:
        write_dir = Path(tempfile.mkdtemp(prefix="sd_tf_worker_checkpoints_"))
        writer = tf.summary.create_noop_writer()
    checkpoint = trainer.checkpoint()
    manager = tf.train.CheckpointManager(checkpoint, str(write_dir), max_to_keep=max_to_keep if chief else 1)
    result = FitResult(step=0, skipped_steps=0, skipped_files=int(getattr(data, "skipped", 0)))
    try:
        if resume:
            path = restore_latest(checkpoint, checkpoint_dir, print_fn)
            if path is None:
                print_fn(f"no checkpoint in {checkpoint_dir} to resume from: starting at step 1")
            else:
                result.resumed_from = int(trainer.step.numpy())
                print_fn(f"resumed from step {result.resumed_from} ({path})")
        elif chief and tf.train.latest_checkpoint(str(checkpoint_dir)) is not None:
            raise ValueError(f"{checkpoint_dir} holds checkpoints of an earlier run: pass resume=True (--resume) "
                             "to continue it, or use another output folder")
        step = int(trainer.step.numpy())
        last_saved = step if result.resumed_from is not None else None

        def save(step):
            nonlocal last_saved
            if last_saved == step:
                return
            path = manager.save(checkpoint_number=step)
            last_saved = step
            writer.flush()
            if chief:
                print_fn(f"checkpoint saved at step {step}: {path}")

        agree = _stop_agreement(strategy) if _is_multi_worker(strategy) else None
        with _StopFlag() as stop, writer.as_default():
            if step < config.steps:
                batches = distributed_batches(data.elements, config.batch_size, strategy, start_step=step)
            tick = time.perf_counter()
            while step < config.steps:
                metrics = trainer.train_step(next(batches))
                step = int(trainer.step.numpy())
                now = time.perf_counter()
                images_per_second = config.batch_size / max(now - tick, 1e-9)
                tick = now
                for name in ("loss", "grad_norm", "clipped_grad_norm", "learning_rate", "skipped_steps",
                             "loss_scale"):
                    tf.summary.scalar(name, metrics[name], step=step)
                tf.summary.scalar("images_per_second", images_per_second, step=step)
                if step % log_every == 0 or step == config.steps or not metrics["finite"]:
                    print_fn(
                        f"step {step}/{config.steps} loss {metrics['loss']:.5f} grad_norm {metrics['grad_norm']:.4g} "
                        f"clipped_grad_norm {metrics['clipped_grad_norm']:.4g} lr {metrics['learning_rate']:.4g} "
                        f"{images_per_second:.2f} images/s"
                        + ("" if metrics["finite"] else " SKIPPED: non-finite gradients, weights unchanged")
                    )
                stop_signal = stop.signal
                if agree is not None:  # every worker must stop at the same step: all of them ask, every step
                    anyone = agree(stop_signal is not None)
                    stop_signal = stop_signal or ("a signal to another worker" if anyone else None)
                if stop_signal:
                    print_fn(f"received {stop_signal}: saving a checkpoint at step {step}, then stopping")
                if step % checkpoint_every == 0 or step == config.steps or stop_signal:
                    save(step)
                if stop_signal:
                    result.interrupted = stop_signal
                    break
        result.step = step
        result.skipped_steps = int(trainer.skipped_steps.numpy())
        if result.interrupted:
            print_fn(f"stopped by {result.interrupted} at step {step}/{config.steps}; checkpoint saved; "
                     "run again with --resume to continue")
        else:
            save(step)
            if chief:
                trainer.swap_ema()
                try:
                    (export or (lambda t, folder: export_model(t.model, folder)))(trainer, output_dir)
                finally:
                    trainer.swap_ema()
                result.exported = True
        writer.flush()
    finally:
        if not chief:
            shutil.rmtree(write_dir, ignore_errors=True)
    result.seconds = time.time() - started
    if not result.interrupted:
        weights = "EMA weights" if trainer.ema is not None else "final weights"
        print_fn(
            f"finished: {result.step} steps, {result.skipped_steps} skipped (non-finite gradients), "
            f"{result.skipped_files} data files skipped, {result.seconds:.1f} s"
            + (f"; model ({weights}) saved to {output_dir}" if result.exported else "")
        )
    return result


def _stop_agreement(strategy):
    """A function (local flag) -> whether any worker's flag is set: one small all-reduce."""

    @tf.function(autograph=False)
    def any_set(flag):
        per_replica = strategy.run(lambda: tf.cast(flag, tf.int32))
        return strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)

    return lambda flag: int(any_set(tf.constant(bool(flag))).numpy()) > 0
