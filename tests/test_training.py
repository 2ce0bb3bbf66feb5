"""Fine-tuning: clipping, non-finite steps, learning, resume after SIGKILL/SIGTERM, tf.distribute, textual
inversion, export, CLI errors and bad data.

Everything runs on a "nano" random-weight diffusers pipeline (a one-level UNet
with 8 channels, a one-layer text encoder, a two-level VAE: 16 px images, 8x8x4
latents), because building and tracing a train step costs tens of seconds per
process on a shared CPU. So there are few traced steps, all reused:

- the reference run, in-process through ``sd_tf.train_cli.run`` (30 steps,
  a checkpoint after every step); the step-level tests (clipping, non-finite
  gradients, latent cache) then use its trainer;
- background ``scripts/train.py`` processes, all started when the module
  starts: a run killed with SIGKILL and resumed (then stopped with SIGTERM),
  MirroredStrategy over two logical CPUs, two MultiWorkerMirroredStrategy
  workers on 127.0.0.1, and textual inversion (XLA, latent cache). Each test
  waits for the runs it checks."""

import inspect
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
TRAIN_SCRIPT = ROOT / "scripts" / "train.py"
HELPER_SCRIPT = ROOT / "tests" / "multiworker_train.py"
RUN_TIMEOUT = 900  # seconds; a run normally takes one to three minutes on a loaded 2-core machine
TOKEN = "<sks-shape>"
DATA_COLOUR = (215, 45, 35)
# Flags shared by the reference run and every run compared with it.
RUN_FLAGS = ["--batch-size", "2", "--steps", "30", "--lr", "3e-3", "--ema-decay", "0.99", "--seed", "3"]
TI_FLAGS = ["--batch-size", "2", "--steps", "20", "--lr", "5e-2", "--textual-inversion", TOKEN,
            "--initializer-token", "red", "--compile", "xla", "--checkpoint-every", "100"]
MAX_GRAD_NORM = 1.0


# ----------------------------------------------------------------------------
# The nano pipeline and the data folder
# ----------------------------------------------------------------------------


def nano_pipeline(folder, seed=0):
    """Saves a tiny random-weight diffusers StableDiffusionPipeline to ``folder``."""
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel
    from transformers import CLIPTokenizer as HFTokenizer

    from sd_tf.samplers.schedule import SD1_SCHEDULER_CONFIG
    from sd_tf.tokenizer import CLIPTokenizer

    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                                num_attention_heads=2)).eval()
    unet = UNet2DConditionModel(sample_size=8, block_out_channels=(8,), layers_per_block=1,
                                down_block_types=("DownBlock2D",), up_block_types=("UpBlock2D",),
                                norm_num_groups=4, attention_head_dim=2, cross_attention_dim=16).eval()
    vae = AutoencoderKL(block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=4,
                        sample_size=16).eval()
    CLIPTokenizer().save_pretrained(folder / "_tokenizer_source")
    tokenizer = HFTokenizer.from_pretrained(folder / "_tokenizer_source")
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=PNDMScheduler.from_config(SD1_SCHEDULER_CONFIG), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder)
    return folder


def write_data_folder(folder):
    """Four reddish 24x20 images with .txt captions, one corrupt image (with a caption), one without caption."""
    from PIL import Image

    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(4):
        pixels = np.clip(np.array(DATA_COLOUR) + rng.integers(-20, 21, (20, 24, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"red{i}.png")
        (folder / f"red{i}.txt").write_text(f"a red square, number {i}")
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(folder / "uncaptioned.png")
    (folder / "corrupt.png").write_bytes((folder / "red0.png").read_bytes()[:80])  # a truncated PNG
    (folder / "corrupt.txt").write_text("a broken file")
    return folder


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("training")


@pytest.fixture(scope="module")
def nano(workdir):
    return nano_pipeline(workdir / "nano")


@pytest.fixture(scope="module")
def data_folder(workdir):
    return write_data_folder(workdir / "data")


# ----------------------------------------------------------------------------
# Background runs of scripts/train.py
# ----------------------------------------------------------------------------


def _env(**extra):
    env = {key: value for key, value in os.environ.items() if key != "TF_CONFIG"}
    env.update(PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]), TF_CPP_MIN_LOG_LEVEL="2",
               CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1", **extra)
    return env


class Run:
    """One training process; its stdout and stderr go to ``<name>.log``."""

    def __init__(self, name, args, folder, script=TRAIN_SCRIPT, env=None):
        self.name, self.log = name, folder / f"{name}.log"
        with open(self.log, "w") as log:
            self.process = subprocess.Popen([sys.executable, str(script), *map(str, args)], stdout=log,
                                            stderr=subprocess.STDOUT, env=env or _env(), cwd=ROOT)

    def text(self):
        return self.log.read_text(errors="replace")

    def steps(self):
        return [int(n) for n in re.findall(r"^step (\d+)/", self.text(), re.M)]

    def wait(self, timeout=RUN_TIMEOUT):
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise AssertionError(f"{self.name} did not finish in {timeout} s:\n{self.text()[-3000:]}") from None

    def wait_for(self, predicate, timeout=RUN_TIMEOUT, poll=0.005):
        """Polls the log until ``predicate(text)``; fails if the process ends first."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            text = self.text()
            if predicate(text):
                return text
            if self.process.poll() is not None:
                raise AssertionError(f"{self.name} ended (status {self.process.returncode}) before the expected "
                                     f"output:\n{self.text()[-3000:]}")
            time.sleep(poll)
        raise AssertionError(f"{self.name}: timed out waiting:\n{self.text()[-3000:]}")


def _free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _resume_chain(common, folder, results):
    """Killed with SIGKILL once step >= 3 is logged, then resumed and stopped with SIGTERM two steps later."""
    try:
        killed = results["killed"] = Run("killed", common, folder)
        killed.wait_for(lambda text: max(map(int, re.findall(r"^step (\d+)/", text, re.M)), default=0) >= 3)
        killed.process.send_signal(signal.SIGKILL)
        killed.wait()
        resumed = results["resumed"] = Run("resumed", [*common, "--resume"], folder)
        text = resumed.wait_for(lambda text: "resumed from step" in text)
        start = int(re.search(r"resumed from step (\d+)", text).group(1))
        resumed.wait_for(lambda text: re.search(rf"^step {start + 2}/", text, re.M) is not None)
        resumed.process.send_signal(signal.SIGTERM)
        resumed.wait()
    except BaseException as error:  # reported by the test that needs the chain
        results["error"] = error


@pytest.fixture(scope="module", autouse=True)
def background(request, workdir):
    """Starts every scripts/train.py run at once (only if a selected test needs them); kills leftovers."""
    wanted = any(getattr(item, "module", None) is request.module
                 and "background" in inspect.signature(item.function).parameters for item in request.session.items)
    if not wanted:
        yield None
        return
    nano, data_folder = request.getfixturevalue("nano"), request.getfixturevalue("data_folder")
    folder = workdir / "runs"
    folder.mkdir()
    common = ["--model", nano, "--data", data_folder, *RUN_FLAGS]
    runs = {
        "mirrored": Run("mirrored", ["--logical-cpus", "2", *common, "--output", folder / "mirrored",
                                     "--checkpoint-every", "100", "--strategy", "mirrored"], folder,
                        script=HELPER_SCRIPT),
        "textual_inversion": Run("textual_inversion", ["--model", nano, "--data", data_folder, *TI_FLAGS,
                                                       "--output", folder / "textual_inversion",
                                                       "--cache-latents", folder / "latent_cache"], folder),
    }
    ports = _free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{port}" for port in ports]}
    for index in range(2):
        tf_config = json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})
        runs[f"worker{index}"] = Run(
            f"worker{index}", [*common, "--output", folder / "multiworker", "--checkpoint-every", "100",
                               "--strategy", "multiworker"], folder, script=HELPER_SCRIPT, env=_env(TF_CONFIG=tf_config))
    chain = {}
    chain_thread = threading.Thread(
        target=_resume_chain, args=([*common, "--output", folder / "resumed", "--checkpoint-every", "2"], folder, chain),
        daemon=True)
    chain_thread.start()
    runs["chain"], runs["chain_thread"], runs["folder"] = chain, chain_thread, folder
    yield runs
    chain_thread.join(timeout=5)
    for run in [*(r for r in runs.values() if isinstance(r, Run)), *(r for r in chain.values() if isinstance(r, Run))]:
        if run.process.poll() is None:
            run.process.kill()
            run.process.wait()


def finished(background, name):
    """The run ``name`` after it ended with status 0."""
    run = background[name]
    status = run.wait()
    assert status == 0, f"{name} exited with {status}:\n{run.text()[-3000:]}"
    return run


def chain_runs(background):
    background["chain_thread"].join(RUN_TIMEOUT * 2)
    chain = background["chain"]
    if "error" in chain:
        raise AssertionError(f"the kill/resume chain failed: {chain['error']!r}\n"
                             + "\n".join(f"--- {n}:\n{r.text()[-2000:]}" for n, r in chain.items() if isinstance(r, Run)))
    return chain["killed"], chain["resumed"]


def read_component(folder, component):
    from safetensors.numpy import load_file

    name = "model.safetensors" if component == "text_encoder" else "diffusion_pytorch_model.safetensors"
    return load_file(str(Path(folder) / component / name))


def assert_same_model(folder, reference, atol, components=("unet", "text_encoder", "vae")):
    for component in components:
        ours, theirs = read_component(folder, component), read_component(reference, component)
        assert ours.keys() == theirs.keys()
        for key in ours:
            np.testing.assert_allclose(ours[key], theirs[key], rtol=0, atol=atol, err_msg=f"{component} {key}")


# ----------------------------------------------------------------------------
# The in-process reference run; its trainer serves the step-level tests (one traced step for all)
# ----------------------------------------------------------------------------


class Reference:
    """The uninterrupted run: its output folder, log text, FitResult, Trainer and model."""

    def __init__(self, output, log, result, trainer):
        self.output, self.log, self.result, self.trainer = output, log, result, trainer
        self.model = trainer.model


@pytest.fixture(scope="module")
def reference(workdir, nano, data_folder):
    import contextlib
    import io

    from sd_tf import train_cli

    output = workdir / "reference"
    argv = ["--model", nano, "--data", data_folder, *RUN_FLAGS, "--output", output, "--checkpoint-every", "1",
            "--keep-checkpoints", "0", "--compile", "graph"]
    log = io.StringIO()
    with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log), pytest.warns(UserWarning):
        result, trainer = train_cli.run(train_cli.build_parser().parse_args([str(a) for a in argv]))
    return Reference(output, log.getvalue(), result, trainer)


@pytest.fixture(scope="module")
def trainer(reference):
    assert reference.trainer.config.max_grad_norm == MAX_GRAD_NORM
    return reference.trainer


@pytest.fixture(scope="module")
def model(reference):
    return reference.model


@pytest.fixture(scope="module")
def training_data(model, data_folder):
    from sd_tf.data import TrainingData

    with pytest.warns(UserWarning):
        return TrainingData(data_folder, model.tokenizer, 16, (8, 8, 4), seed=5)


def take_batch(data, start, size=2):
    import tensorflow as tf

    return {key: tf.identity(value) for key, value in next(iter(data.stream(start).batch(size))).items()}


def snapshot(variables):
    return [np.array(v.numpy(), copy=True) for v in variables]


def raw_gradients(trainer, batch):
    """The unclipped gradient of the step's loss, computed here with a tape (eagerly)."""
    import tensorflow as tf

    with tf.GradientTape() as tape:
        loss = trainer.loss(batch, trainer.latents_of(batch), float(trainer.config.batch_size))
    return [np.asarray(tf.convert_to_tensor(g)) for g in tape.gradient(loss, trainer.trainable)]


def global_norm(arrays):
    return float(np.sqrt(sum(np.sum(np.square(a, dtype=np.float64)) for a in arrays)))


# ----------------------------------------------------------------------------
# Data and command-line errors
# ----------------------------------------------------------------------------


def test_read_captions_skips_and_counts_bad_files(tmp_path):
    from PIL import Image

    from sd_tf.data import DatasetError, read_captions

    folder = tmp_path / "meta"
    folder.mkdir()
    Image.new("RGB", (8, 8), (255, 0, 0)).save(folder / "a.png")
    Image.new("RGB", (64, 64), (0, 255, 0)).save(folder / "b.jpg", quality=90)
    (folder / "c.jpg").write_bytes((folder / "b.jpg").read_bytes()[:-200])  # truncated: verify() passes, load() fails
    Image.new("RGB", (8, 8)).save(folder / "unlisted.png")
    lines = [{"file_name": "a.png", "text": "red"}, {"file_name": "b.jpg", "text": "green"},
             {"file_name": "c.jpg", "text": "cut"}, {"file_name": "missing.png", "text": "gone"}]
    (folder / "metadata.jsonl").write_text("\n".join(map(json.dumps, lines)) + "\nnot json\n")
    with pytest.warns(UserWarning) as caught:
        paths, captions, skipped = read_captions(folder)
    assert [Path(p).name for p in paths] == ["a.png", "b.jpg"] and captions == ["red", "green"]
    assert skipped == 4  # the bad JSON line, unlisted.png, the truncated c.jpg and missing.png
    messages = " ".join(str(w.message) for w in caught)
    for name in ("metadata.jsonl:5", "unlisted.png", "c.jpg", "missing.png"):
        assert name in messages

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetError, match="no usable"):
        read_captions(empty)


def _cli_error(capsys, argv):
    from sd_tf.train_cli import main

    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in argv])
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_cli_errors_exit_2_before_training(tmp_path, capsys, nano, data_folder):
    empty = tmp_path / "empty"
    empty.mkdir()
    base = ["--model", nano, "--data", data_folder, "--output", tmp_path / "out"]
    cases = [
        (["--bogus-flag", *base], "unrecognized arguments"),
        ([*base, "--steps", "0"], "--steps: must be a positive integer"),
        ([*base, "--lr", "-1"], "--lr: must be positive"),
        ([*base, "--mixed-precision", "fp8"], "invalid choice"),
        ([*base, "--batch-size", "3", "--grad-accum", "2"], "not divisible by grad_accum"),
        (["--model", nano, "--data", empty, "--output", tmp_path / "out"], "no usable image-caption pairs"),
        (["--model", nano, "--data", tmp_path / "nowhere", "--output", tmp_path / "out"], "no such data folder"),
        (["--model", tmp_path / "no-model", "--data", data_folder, "--output", tmp_path / "out"],
         "no such model file or folder"),
        ([*base, "--resolution", "15"], "not a multiple of the VAE's downsampling factor 2"),
        ([*base, "--cache-latents", tmp_path / "cache", "--flip"], "cannot be combined"),
        ([*base, "--initializer-token", "red"], "needs --textual-inversion"),
        ([*base, "--textual-inversion", "<x>", "--train-text-encoder"], "excludes --train-text-encoder"),
    ]
    for argv, message in cases:
        err = _cli_error(capsys, argv)
        assert message in err, f"{argv}: {err}"
        assert "Traceback" not in err
    (tmp_path / "out" / "checkpoints").mkdir(parents=True)
    (tmp_path / "out" / "checkpoints" / "checkpoint").write_text('model_checkpoint_path: "ckpt-2"\n')
    assert "pass --resume" in _cli_error(capsys, base)
    assert not (tmp_path / "out" / "logs").exists()

    # The script itself: status 2, a message, no traceback.
    result = subprocess.run([sys.executable, str(TRAIN_SCRIPT), "--model", str(nano), "--data", str(empty),
                             "--output", str(tmp_path / "o2")], capture_output=True, text=True, env=_env(),
                            cwd=ROOT, timeout=300)
    assert result.returncode == 2 and "error:" in result.stderr and "Traceback" not in result.stderr, result.stderr


# ----------------------------------------------------------------------------
# One step: clipping, non-finite gradients
# ----------------------------------------------------------------------------


def test_clipping_bounds_the_applied_update(trainer, training_data):
    """An outlier batch (noise targets x100): the applied gradient is the raw one scaled to max_grad_norm."""
    batch = take_batch(training_data, 0)
    batch["noise"] = batch["noise"] * 100.0
    grads = raw_gradients(trainer, batch)
    raw_norm = global_norm(grads)
    assert raw_norm > 10 * MAX_GRAD_NORM  # without clipping the step would exceed the bound
    beta_1 = trainer.config.adam_beta_1
    momentums_before = snapshot(trainer.optimizer._momentums)

    metrics = trainer.train_step(batch)

    assert metrics["finite"] == 1.0
    assert metrics["grad_norm"] == pytest.approx(raw_norm, rel=1e-4)
    assert metrics["clipped_grad_norm"] <= MAX_GRAD_NORM * (1 + 1e-5)
    assert metrics["clipped_grad_norm"] == pytest.approx(MAX_GRAD_NORM, rel=1e-5)
    # Reconstruct the gradient the optimizer applied from Adam's first moment: m' = b1 m + (1 - b1) g.
    applied = [(after - beta_1 * before) / (1 - beta_1)
               for before, after in zip(momentums_before, snapshot(trainer.optimizer._momentums))]
    assert global_norm(applied) == pytest.approx(MAX_GRAD_NORM, rel=1e-4)
    scale = MAX_GRAD_NORM / raw_norm
    for g, a in zip(grads, applied):
        np.testing.assert_allclose(a, g * scale, rtol=0, atol=1e-4 * MAX_GRAD_NORM)


def test_non_finite_step_is_skipped_and_changes_nothing(trainer, training_data):
    batch = take_batch(training_data, 2)
    import tensorflow as tf

    pixels = batch["pixels"].numpy()
    pixels[0, 3, 4, 1] = np.nan
    batch["pixels"] = tf.constant(pixels)
    optimizer_variables = trainer.optimizer.variables
    weights, ema, state = snapshot(trainer.trainable), snapshot(trainer.ema), snapshot(optimizer_variables)
    iterations, step, skipped = (int(trainer.optimizer.iterations.numpy()), int(trainer.step.numpy()),
                                 int(trainer.skipped_steps.numpy()))

    metrics = trainer.train_step(batch)

    assert metrics["finite"] == 0.0 and not np.isfinite(metrics["grad_norm"])
    assert int(trainer.skipped_steps.numpy()) == skipped + 1 and metrics["skipped_steps"] == skipped + 1
    assert int(trainer.step.numpy()) == step + 1
    assert int(trainer.optimizer.iterations.numpy()) == iterations
    for before, after in [(weights, trainer.trainable), (ema, trainer.ema), (state, optimizer_variables)]:
        for b, v in zip(before, after):
            np.testing.assert_array_equal(b, v.numpy())  # bit-identical

    # The next finite batch trains again.
    metrics = trainer.train_step(take_batch(training_data, 4))
    assert metrics["finite"] == 1.0 and int(trainer.optimizer.iterations.numpy()) == iterations + 1
    assert any(not np.array_equal(b, v.numpy()) for b, v in zip(weights, trainer.trainable))


def eager_trainer(nano, dtype="float32", **settings):
    """A fresh eager Trainer on the untrained nano weights."""
    from sd_tf.stable_diffusion import StableDiffusion
    from sd_tf.training import Trainer, TrainConfig

    model = StableDiffusion.from_pretrained(nano, dtype=dtype, compile="eager")
    config = TrainConfig(**{"batch_size": 4, "max_grad_norm": MAX_GRAD_NORM, "ema_decay": None, **settings})
    return Trainer(model, config)


def test_bfloat16_weights_cannot_be_trained(nano):
    with pytest.raises(ValueError, match="mixed_bfloat16"):
        eager_trainer(nano, dtype="bfloat16")


def test_gradient_accumulation_equals_the_whole_batch_at_once(nano, training_data):
    """Two micro-batches of 2 give the loss and gradients of one batch of 4."""
    batch = take_batch(training_data, 6, size=4)
    loss, grads = eager_trainer(nano)._gradients(batch)
    accumulated_loss, accumulated = eager_trainer(nano, grad_accum=2)._gradients(batch)
    assert float(accumulated_loss) == pytest.approx(float(loss), rel=1e-6)
    for g, a in zip(grads, accumulated):
        np.testing.assert_allclose(a.numpy(), g.numpy(), rtol=1e-5, atol=1e-7)


def test_mixed_float16_loss_scaling(nano, training_data):
    """Gradients are unscaled before clipping; overflows halve the scale and skip; good steps grow it."""
    from sd_tf.training import INITIAL_LOSS_SCALE, LOSS_SCALE_GROWTH_STEPS

    trainer = eager_trainer(nano, dtype="mixed_float16")
    assert all(v.dtype == "float32" for v in trainer.trainable)
    assert float(trainer.loss_scale.numpy()) == INITIAL_LOSS_SCALE
    batch = take_batch(training_data, 8, size=4)
    _, reference_grads = eager_trainer(nano)._gradients(batch)
    _, grads = trainer._gradients(batch)
    error = global_norm([g.numpy() - r.numpy() for g, r in zip(grads, reference_grads)])
    assert error < 0.02 * global_norm([r.numpy() for r in reference_grads])  # unscaled: float32's within fp16 error

    # An outlier batch overflows float16 at the initial scale: skipped steps, each halving the scale,
    # until the scaled gradients fit; then the unscaled gradient is clipped to max_grad_norm.
    batch["noise"] = batch["noise"] * 100.0
    _, reference_grads = eager_trainer(nano)._gradients(batch)
    raw_norm = global_norm([r.numpy() for r in reference_grads])
    assert raw_norm > 10 * MAX_GRAD_NORM
    weights = snapshot(trainer.trainable)
    scale, skipped = INITIAL_LOSS_SCALE, 0
    while True:
        momentums_before = snapshot(trainer.optimizer._momentums)
        metrics = trainer.train_step(batch)
        if metrics["finite"]:
            break
        scale, skipped = scale / 2, skipped + 1
        assert metrics["loss_scale"] == scale and metrics["skipped_steps"] == skipped
        assert int(trainer.optimizer.iterations.numpy()) == 0
        for before, variable in zip(weights, trainer.trainable):
            np.testing.assert_array_equal(before, variable.numpy())
    assert skipped >= 1 and metrics["loss_scale"] == scale
    assert metrics["grad_norm"] == pytest.approx(raw_norm, rel=0.02)
    assert metrics["clipped_grad_norm"] == pytest.approx(MAX_GRAD_NORM, rel=1e-5)
    beta_1 = trainer.config.adam_beta_1
    applied = [(after - beta_1 * before) / (1 - beta_1)
               for before, after in zip(momentums_before, snapshot(trainer.optimizer._momentums))]
    assert global_norm(applied) == pytest.approx(MAX_GRAD_NORM, rel=1e-4)

    # Growth: the scale doubles after LOSS_SCALE_GROWTH_STEPS finite steps in a row.
    trainer.good_steps.assign(LOSS_SCALE_GROWTH_STEPS - 2)
    assert trainer.train_step(batch)["loss_scale"] == scale
    assert trainer.train_step(batch)["loss_scale"] == 2 * scale
    assert int(trainer.good_steps.numpy()) == 0


# ----------------------------------------------------------------------------
# Checkpoint safety and the latent cache
# ----------------------------------------------------------------------------

_SAVER = """
import sys, numpy as np, tensorflow as tf
variable = tf.Variable(np.zeros(8_000_000, np.float32))
manager = tf.train.CheckpointManager(tf.train.Checkpoint(v=variable), sys.argv[1], max_to_keep=2)
for n in range(1, 1000):
    variable.assign(tf.fill([8_000_000], float(n)))
    print("saving", n, flush=True)
    manager.save(checkpoint_number=n)
"""


def test_kill_during_checkpoint_save_keeps_the_previous_one(tmp_path):
    """SIGKILL while a 32 MB checkpoint is being written: the newest listed checkpoint restores whole."""
    import tensorflow as tf

    from sd_tf.training import restore_latest

    folder = tmp_path / "ckpt"
    process = subprocess.Popen([sys.executable, "-c", _SAVER, str(folder)], stdout=subprocess.PIPE, text=True,
                               env=_env())
    for line in process.stdout:
        if line.strip() == "saving 4":
            time.sleep(0.02)  # inside the save of checkpoint 4
            break
    process.kill()
    process.wait()
    variable = tf.Variable(np.full(8_000_000, -1.0, np.float32))
    path = restore_latest(tf.train.Checkpoint(v=variable), folder)
    number = int(path.rsplit("-", 1)[1])
    assert number >= 3
    assert np.all(variable.numpy() == number)  # no mixture of two saves

    # A damaged newest checkpoint (e.g. a disk error) falls back to the one before.
    data_file = next(folder.glob(f"ckpt-{number}.data-*"))
    data_file.write_bytes(data_file.read_bytes()[:1000])
    messages = []
    path = restore_latest(tf.train.Checkpoint(v=variable), folder, print_fn=messages.append)
    assert int(path.rsplit("-", 1)[1]) == number - 1 and np.all(variable.numpy() == number - 1)
    assert "cannot restore" in messages[0]


def test_latent_cache(model, trainer, training_data, tmp_path):
    """Cached posterior moments equal the VAE's on the centre crop; the stream then carries them, not pixels."""
    import tensorflow as tf

    from sd_tf.data import TrainingData, _load_image, cache_latents

    calls = []

    def encode(pixels):
        calls.append(len(pixels))
        return model.vae_encoder(pixels, training=False)

    files = cache_latents(training_data.paths, encode, tmp_path / "cache", 16, "fingerprint", batch_size=3)
    assert sorted(calls) == [1, 3] and len(set(files)) == 4
    pixels = np.stack([_load_image(p, 16, False, False, 0) for p in training_data.paths])
    mean, logvar = model.vae_encoder(pixels)
    for k, file in enumerate(files):
        moments = np.load(file)
        assert moments.shape == (2, 8, 8, 4)
        np.testing.assert_allclose(moments[0], mean[k], atol=1e-5)
        np.testing.assert_allclose(moments[1], logvar[k], atol=1e-5)
    assert cache_latents(training_data.paths, encode, tmp_path / "cache", 16, "fingerprint") == files
    assert len(calls) == 2  # reused, not recomputed
    assert cache_latents(training_data.paths, encode, tmp_path / "cache", 16, "other vae") != files

    cached = TrainingData(training_data.folder, model.tokenizer, 16, (8, 8, 4), seed=5,
                          scan=(training_data.paths, training_data.captions, training_data.skipped))
    cached.use_latent_cache(files)
    cached_batch, pixel_batch = take_batch(cached, 7), take_batch(training_data, 7)
    assert "pixels" not in cached_batch and cached_batch["latent_mean"].shape == (2, 8, 8, 4)
    np.testing.assert_array_equal(cached_batch["noise"], pixel_batch["noise"])
    np.testing.assert_allclose(trainer.latents_of(cached_batch), trainer.latents_of(pixel_batch), atol=1e-5)
    assert isinstance(cached_batch["latent_mean"], tf.Tensor)


# ----------------------------------------------------------------------------
# The scripts/train.py runs
# ----------------------------------------------------------------------------


def load_folder_weights(model, folder):
    from sd_tf.stable_diffusion import StableDiffusion

    _, tensors, _ = StableDiffusion._read_folder(Path(folder), None)
    model.load_tensors(tensors)


def run_output(background, name):
    return background["folder"] / {"mirrored": "mirrored", "worker0": "multiworker",
                                   "textual_inversion": "textual_inversion"}[name]


def checkpoint_values(path):
    """{key: array} of every variable in a tf.train checkpoint except the save counter."""
    import tensorflow as tf

    reader = tf.train.load_checkpoint(str(path))
    return {key: reader.get_tensor(key) for key in reader.get_variable_to_shape_map()
            if "save_counter" not in key and key != "_CHECKPOINTABLE_OBJECT_GRAPH"}


def test_training_lowers_the_loss_and_moves_generations_to_the_data(reference, trainer, nano, training_data):
    """30 steps: lower loss on the data, and samples nearer the data's latents (same seeds, before vs after).

    The nano VAE has random weights, so its decoder does not render colours
    faithfully (a mean-colour comparison would measure the random decoder);
    "toward the data" is measured where the UNet works, on the sampled latents:
    their distance to the nearest image's posterior mean, and their per-channel means.
    """
    from sd_tf.data import _load_image

    model = reference.model
    model.compile = "eager"  # generation without tracing the guided UNet step
    model._compile_functions()
    batch = take_batch(training_data, 100, size=16)
    pixels = np.stack([_load_image(p, 16, False, False, 0) for p in training_data.paths])
    weights = snapshot(trainer.trainable)
    scores = {}
    try:
        for name, folder in (("before", nano), ("after", reference.output)):
            load_folder_weights(model, folder)
            loss = float(trainer.loss(batch, trainer.latents_of(batch), 16.0))
            data_latents = np.asarray(model.vae_encoder(pixels)[0]) * model.config.vae.scaling_factor
            final = {}
            model.text_to_image("a red square", num_steps=20, guidance_scale=1.0, seed=0, batch_size=8,
                                callback=lambda i, n, latents: final.update(latents=np.asarray(latents)))
            samples = final["latents"]
            nearest = np.mean([min(np.mean((s - d) ** 2) for d in data_latents) for s in samples])
            mean_distance = np.linalg.norm(samples.mean(axis=(0, 1, 2)) - data_latents.mean(axis=(0, 1, 2)))
            scores[name] = (loss, nearest, mean_distance)
    finally:
        for variable, value in zip(trainer.trainable, weights):
            variable.assign(value)
    (loss_before, nearest_before, mean_before), (loss_after, nearest_after, mean_after) = scores["before"], scores["after"]
    assert loss_after < 0.8 * loss_before, scores
    assert nearest_after < 0.7 * nearest_before, scores
    assert mean_after < 0.5 * mean_before, scores


def test_progress_lines_and_summaries(reference):
    """Progress lines carry step/loss/norms/lr/images/s; TensorBoard has every scalar for every step."""
    import tensorflow as tf

    log = reference.log
    assert [int(n) for n in re.findall(r"^step (\d+)/30 ", log, re.M)] == list(range(1, 31))
    line = re.search(r"^step 7/30 .*$", log, re.M).group(0)
    assert re.fullmatch(r"step 7/30 loss [\d.]+ grad_norm [\d.e+-]+ clipped_grad_norm [\d.e+-]+ lr 0\.003 "
                        r"[\d.]+ images/s", line), line
    assert re.search(r"^finished: 30 steps, 0 skipped \(non-finite gradients\), 2 data files skipped, .*"
                     r"model \(EMA weights\) saved to", log, re.M), log[-500:]
    assert reference.result.step == 30 and reference.result.exported and reference.result.skipped_files == 2

    events = list((reference.output / "logs").glob("events.out.tfevents.*"))
    assert len(events) == 1
    steps = {}
    for event in tf.compat.v1.train.summary_iterator(str(events[0])):
        for value in event.summary.value:
            steps.setdefault(value.tag, set()).add(event.step)
    for tag in ("loss", "grad_norm", "clipped_grad_norm", "learning_rate", "skipped_steps", "loss_scale"):
        assert steps.get(tag) == set(range(1, 31)), tag


def test_bad_data_files_are_warned_and_reported(background):
    """A corrupt image and an image without caption: a warning each, counted in the final report."""
    run = finished(background, "mirrored")
    text = run.text()
    assert re.search(r"^warning: .*uncaptioned\.png: no caption file uncaptioned\.txt, skipped", text, re.M)
    assert re.search(r"^warning: .*corrupt\.png: unreadable image, skipped", text, re.M)
    assert re.search(r"on 4 images \(2 skipped\)", text)
    assert re.search(r"^finished: 30 steps, 0 skipped \(non-finite gradients\), 2 data files skipped", text, re.M)


def test_export_loads_in_diffusers_and_sd_tf(reference):
    import torch
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    from sd_tf.stable_diffusion import StableDiffusion
    from sd_tf.weights import model_tensors

    output = reference.output
    # The export sits at the root of the output folder, beside the checkpoints and logs.
    assert (output / "model_index.json").is_file() and (output / "checkpoints" / "checkpoint").is_file()
    assert (output / "logs").is_dir() and not (output / ".export").exists()
    for cls, component in ((UNet2DConditionModel, "unet"), (AutoencoderKL, "vae"), (CLIPTextModel, "text_encoder")):
        _, info = cls.from_pretrained(output / component, output_loading_info=True)
        assert not any(info[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys")), (component, info)
    pipe = StableDiffusionPipeline.from_pretrained(output)
    images = pipe("a red square", num_inference_steps=2, height=16, width=16, output_type="np",
                  generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (1, 16, 16, 3) and np.isfinite(images).all()

    loaded = StableDiffusion.from_pretrained(output)
    ours, exported = model_tensors([loaded.unet]), read_component(output, "unet")
    assert ours.keys() == exported.keys()
    for key in ours:
        np.testing.assert_array_equal(ours[key], exported[key])
    # The export holds the EMA weights; the checkpoint holds both.
    trained = model_tensors([reference.model.unet])
    assert any(not np.array_equal(trained[key], exported[key]) for key in trained)


def test_resume_after_sigkill_matches_the_uninterrupted_run_and_sigterm_saves(background, reference):
    killed, resumed = chain_runs(background)
    # SIGKILL after step >= 3 was logged: the run died mid-training.
    assert killed.process.returncode == -signal.SIGKILL and max(killed.steps()) >= 3
    assert "finished" not in killed.text()
    saved = [int(n) for n in re.findall(r"^checkpoint saved at step (\d+)", killed.text(), re.M)]
    # Resumed at the newest checkpoint (every 2 steps), not at step 1.
    start = int(re.search(r"^resumed from step (\d+) ", resumed.text(), re.M).group(1))
    assert start >= max(saved) >= 2 and start % 2 == 0 and start <= max(killed.steps())
    assert resumed.steps()[0] == start + 1
    # SIGTERM: the current step ends, a checkpoint is written, the process exits cleanly.
    assert resumed.process.returncode == 0, resumed.text()[-2000:]
    end = int(re.search(r"^stopped by SIGTERM at step (\d+)/30", resumed.text(), re.M).group(1))
    assert end == max(resumed.steps()) > start and f"checkpoint saved at step {end}:" in resumed.text()
    assert "finished" not in resumed.text()
    # Everything at that step (weights, EMA, optimizer moments, counters) equals the uninterrupted run's.
    ours = checkpoint_values(background["folder"] / "resumed" / "checkpoints" / f"ckpt-{end}")
    theirs = checkpoint_values(reference.output / "checkpoints" / f"ckpt-{end}")
    assert ours.keys() == theirs.keys() and len(ours) > 100
    for key in ours:
        np.testing.assert_allclose(ours[key], theirs[key], rtol=0, atol=1e-6, err_msg=key)
    assert any(key.startswith("ema/") for key in ours) and int(ours["step/.ATTRIBUTES/VARIABLE_VALUE"]) == end


def test_mirrored_strategy_matches_one_device(background, reference):
    run = finished(background, "mirrored")
    assert "over 2 replica(s)" in run.text()
    assert_same_model(run_output(background, "mirrored"), reference.output, atol=1e-4)


@pytest.mark.slow
def test_multiworker_strategy_matches_one_device(background, reference):
    chief, other = finished(background, "worker0"), finished(background, "worker1")
    assert "over 2 replica(s)" in chief.text() and "saved to" in chief.text()
    assert "saved to" not in other.text()  # only the chief exports
    assert other.steps() == chief.steps() == list(range(1, 31))
    assert_same_model(run_output(background, "worker0"), reference.output, atol=1e-4)


def test_textual_inversion_changes_only_the_new_embedding_row(background, nano):
    import torch
    from diffusers import StableDiffusionPipeline
    from safetensors.numpy import load_file
    from transformers import CLIPTokenizer as HFTokenizer

    from sd_tf.stable_diffusion import StableDiffusion
    from sd_tf.tokenizer import VOCAB_SIZE

    run = finished(background, "textual_inversion")
    output = run_output(background, "textual_inversion")
    assert "xla mode" in run.text() and "caching latents: 4/4" in run.text()
    assert len(list((background["folder"] / "latent_cache").glob("*.npy"))) == 4
    # Every variable bit-identical, except the embedding's new row.
    assert_same_model(output, nano, atol=0, components=("unet", "vae"))
    ours, base = read_component(output, "text_encoder"), read_component(nano, "text_encoder")
    embedding_key = "text_model.embeddings.token_embedding.weight"
    base = {("text_model." + k).replace("text_model.text_model.", "text_model."): v for k, v in base.items()}
    assert ours.keys() == base.keys()
    for key in ours:
        if key != embedding_key:
            np.testing.assert_array_equal(ours[key], base[key], err_msg=key)
    rows = ours[embedding_key]
    assert rows.shape == (VOCAB_SIZE + 1, 16)
    np.testing.assert_array_equal(rows[:VOCAB_SIZE], base[embedding_key])
    initial = base[embedding_key][HFTokenizer.from_pretrained(nano / "tokenizer").convert_tokens_to_ids("red</w>")]
    assert not np.allclose(rows[VOCAB_SIZE], initial, atol=1e-3)  # it learned

    learned = load_file(str(output / "learned_embeds.safetensors"))
    assert list(learned) == [TOKEN]
    np.testing.assert_array_equal(learned[TOKEN], rows[VOCAB_SIZE])

    # sd_tf and diffusers read the token back; the full model equals base + load_textual_inversion.
    prompt = f"a photo of {TOKEN}"
    model = StableDiffusion.from_pretrained(output)
    assert model.tokenizer([prompt])[0][4] == VOCAB_SIZE
    tuned = StableDiffusionPipeline.from_pretrained(output)
    base_pipe = StableDiffusionPipeline.from_pretrained(nano)
    base_pipe.load_textual_inversion(str(output / "learned_embeds.safetensors"))
    ids = tuned.tokenizer(prompt, padding="max_length", max_length=77, return_tensors="pt").input_ids
    assert ids[0, 4] == VOCAB_SIZE
    np.testing.assert_array_equal(ids, base_pipe.tokenizer(prompt, padding="max_length", max_length=77,
                                                           return_tensors="pt").input_ids)
    np.testing.assert_array_equal(ids[0].numpy(), model.tokenizer([prompt])[0])
    with torch.no_grad():
        a = tuned.text_encoder(ids).last_hidden_state.numpy()
        b = base_pipe.text_encoder(ids).last_hidden_state.numpy()
    np.testing.assert_allclose(a, b, atol=1e-6)
    np.testing.assert_allclose(model.encode_text([prompt]), a, atol=1e-4)
