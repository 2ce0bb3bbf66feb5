"""``sd-tf generate`` (and ``scripts/generate.py``): images from text, to PNG files with their settings.

Each PNG carries its settings in a ``parameters`` text chunk, in the form
AUTOMATIC1111's web UI writes and tools such as sd-parsers read.
"""

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, PngImagePlugin

from sd_tf.pretrained import DEFAULT_MODEL

# Our sampler names -> the names AUTOMATIC1111 writes in "Sampler:".
A1111_SAMPLER_NAMES = {
    "ddim": "DDIM", "pndm": "PLMS", "lms": "LMS", "euler": "Euler", "euler_a": "Euler a",
    "dpmpp_2m": "DPM++ 2M", "dpmpp_2m_karras": "DPM++ 2M Karras",
}
# Settings a --prompts-file JSON line may give, with their flag names.
PER_LINE_SETTINGS = ("prompt", "negative_prompt", "seed", "steps", "guidance", "sampler", "height", "width",
                     "num_images")


class UsageError(Exception):
    """A bad argument or input file: reported in one line, exit status 2."""


def parameters_text(prompt, negative_prompt, steps, sampler, guidance, seed, width, height, model):
    """The A1111 ``parameters`` text of one image."""
    lines = [prompt]
    if negative_prompt:
        lines.append(f"Negative prompt: {negative_prompt}")
    lines.append(
        f"Steps: {steps}, Sampler: {A1111_SAMPLER_NAMES[sampler]}, CFG scale: {guidance}, Seed: {seed}, "
        f"Size: {width}x{height}, Model: {model}"
    )
    return "\n".join(lines)


def write_png(image, path, parameters, overwrite=False):
    """Writes ``image`` atomically (a temporary file, then a rename); returns the path written.

    An existing file is kept: the image goes to the first free ``name-N.png``
    instead, unless ``overwrite``.
    """
    path = Path(path)
    if not overwrite:
        number = 1
        stem = path.stem
        while path.exists():
            path = path.with_name(f"{stem}-{number}{path.suffix}")
            number += 1
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", parameters)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as file:
            Image.fromarray(image).save(file, format="PNG", pnginfo=info)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


class Progress:
    """A one-line progress bar with ETA on stderr, for steps within batches of images."""

    def __init__(self, total_images, enabled=True):
        self.total_images, self.enabled = total_images, enabled
        self.done, self.batch, self.start = 0, 0, time.time()

    def next_batch(self, size):
        self.done += self.batch
        self.batch = size

    def __call__(self, step, steps, latents):
        if not self.enabled:
            return
        fraction = (self.done + self.batch * step / steps) / self.total_images
        elapsed = time.time() - self.start
        eta = elapsed / fraction * (1 - fraction) if fraction > 0 else 0.0
        bar = "#" * int(30 * fraction)
        sys.stderr.write(f"\r[{bar:<30}] images {self.done + self.batch}/{self.total_images} step {step}/{steps} "
                         f"ETA {eta:5.1f}s ")
        sys.stderr.flush()
        if step == steps and self.done + self.batch == self.total_images:
            sys.stderr.write("\n")


def build_parser():
    parser = argparse.ArgumentParser(prog="sd-tf generate", description="Generate images with Stable Diffusion (TensorFlow).")
    parser.add_argument("prompt", nargs="?", help="the text prompt (or use --prompts-file)")
    parser.add_argument("--negative-prompt", default="")
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help=f"a diffusers folder, a .safetensors/.ckpt file, or a shipped model name (default {DEFAULT_MODEL})")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale (CFG)")
    parser.add_argument("--sampler", default=None, choices=sorted(A1111_SAMPLER_NAMES),
                        help="default: the model's scheduler")
    parser.add_argument("--seed", type=int, default=None, help="image i of a run uses seed+i (default: random)")
    parser.add_argument("-n", "--num-images", type=int, default=1)
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--init-image", help="image-to-image: the starting image")
    parser.add_argument("--strength", type=float, default=None, help="image-to-image strength in [0, 1] (default 0.8; inpainting 1.0)")
    parser.add_argument("--mask", help="inpainting: white repaints, black keeps (needs --init-image)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "mixed_float16", "mixed_bfloat16", "bfloat16"],
                        help="bfloat16: mixed_bfloat16 with bfloat16 UNet weights (fastest on CPUs with AMX)")
    parser.add_argument("--compile", default="auto", choices=["auto", "xla", "graph", "eager"])
    parser.add_argument("--strategy", default="default", choices=["default", "mirrored", "tpu"],
                        help="tf.distribute: the images of a prompt are split across the replicas")
    parser.add_argument("--output", default="outputs", help="a .png file, or a folder (default: outputs/)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing files instead of numbering new names")
    parser.add_argument("--prompts-file", help="one prompt per line, or JSON lines with per-line settings; "
                        "outputs go to the --output folder and a rerun skips those already written")
    parser.add_argument("--no-progress", action="store_true")
    return parser


def read_prompts_file(path, args):
    """The jobs of a prompts file: a dict of settings per line, with defaults from the flags."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as error:
        raise UsageError(f"{path}: cannot read prompts file ({error.strerror})") from None
    jobs = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        settings = {"prompt": line.strip()}
        if line.lstrip().startswith("{"):
            try:
                settings = json.loads(line)
            except json.JSONDecodeError as error:
                raise UsageError(f"{path}:{number}: bad JSON ({error.msg})") from None
            unknown = set(settings) - set(PER_LINE_SETTINGS)
            if unknown or "prompt" not in settings:
                raise UsageError(f"{path}:{number}: needs 'prompt'; allowed keys: {', '.join(PER_LINE_SETTINGS)}")
        job = {key: getattr(args, key) for key in PER_LINE_SETTINGS if key != "prompt"}
        job.update(settings, line=number)
        jobs.append(job)
    return jobs


def check(args, parser):
    """Argument errors that need no model."""
    if bool(args.prompt) == bool(args.prompts_file):
        parser.error("give a prompt or --prompts-file (one of them)")
    for name in ("height", "width"):
        value = getattr(args, name)
        if value is not None and (value <= 0 or value % 8):
            parser.error(f"--{name} must be a positive multiple of 8, got {value}")
    if args.steps < 1 or args.num_images < 1:
        parser.error("--steps and --num-images must be at least 1")
    if args.strength is not None and not 0 <= args.strength <= 1:
        parser.error(f"--strength must be in [0, 1], got {args.strength}")
    if args.mask and not args.init_image:
        parser.error("--mask needs --init-image")
    if args.prompts_file and args.output.endswith(".png"):
        parser.error("with --prompts-file, --output must be a folder")


def runs(indices):
    """Consecutive runs of sorted indices: [0, 1, 3] -> [[0, 1], [3]]."""
    groups = []
    for i in indices:
        if groups and i == groups[-1][-1] + 1:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def generate(model, job, args, indices, progress):
    """Images ``indices`` of ``job`` (image i uses seed + i); returns the images (uint8) and their seeds.

    Each run of consecutive indices is one batch, which the model's strategy splits across replicas.
    """
    seed = job["seed"] if job["seed"] is not None else int(np.random.default_rng().integers(2**31 - 1000))
    common = dict(negative_prompt=job["negative_prompt"] or None, num_steps=job["steps"],
                  guidance_scale=job["guidance"], scheduler=job["sampler"], callback=progress)
    images = []
    for run in runs(indices):
        progress.next_batch(len(run))
        common.update(seed=seed + run[0], batch_size=len(run))
        if args.init_image and args.mask:
            images.extend(model.inpaint(job["prompt"], args.init_image, args.mask,
                                        strength=1.0 if args.strength is None else args.strength, **common))
        elif args.init_image:
            images.extend(model.image_to_image(job["prompt"], args.init_image,
                                               strength=0.8 if args.strength is None else args.strength, **common))
        else:
            images.extend(model.text_to_image(job["prompt"], height=job["height"], width=job["width"], **common))
    return images, [seed + i for i in indices]


def output_paths(args, job, count):
    """Where the images of a job go: the --output file, or numbered files in the --output folder."""
    output = Path(args.output)
    if args.prompts_file:
        return [output / f"{job['line']:05d}-{i}.png" for i in range(count)]
    if output.suffix.lower() == ".png":
        return [output] if count == 1 else [output.with_name(f"{output.stem}-{i}.png") for i in range(count)]
    existing = sorted(int(p.stem) for p in output.glob("[0-9]" * 5 + ".png")) if output.is_dir() else []
    first = existing[-1] + 1 if existing else 0
    return [output / f"{first + i:05d}.png" for i in range(count)]


def run(args, parser):
    from sd_tf.stable_diffusion import StableDiffusion, make_strategy
    from sd_tf.weights import CheckpointError

    check(args, parser)
    jobs = read_prompts_file(args.prompts_file, args) if args.prompts_file else [
        {**{key: getattr(args, key) for key in PER_LINE_SETTINGS}, "line": 1}]
    if args.init_image:  # unreadable or mismatched images fail before the model loads
        from sd_tf.images import load_image

        image = load_image(args.init_image)
        if args.mask and load_image(args.mask, mode="L").shape != image.shape[:2]:
            raise UsageError(f"--mask {args.mask} is not the size of --init-image {args.init_image} "
                             f"({image.shape[1]}x{image.shape[0]})")
    try:
        model = StableDiffusion.from_pretrained(args.model, dtype=args.dtype, compile=args.compile,
                                                strategy=make_strategy(args.strategy))
    except (FileNotFoundError, ValueError, CheckpointError) as error:
        raise UsageError(str(error)) from None
    model_name = Path(args.model).stem if Path(args.model).suffix else Path(args.model).name
    todo = []  # (job, indices of its images to make, their paths)
    for job in jobs:
        paths = output_paths(args, job, job["num_images"])
        indices = list(range(job["num_images"]))
        if args.prompts_file and not args.overwrite:  # a rerun resumes: images already written are done
            indices = [i for i in indices if not paths[i].exists()]
        if indices:
            todo.append((job, indices, [paths[i] for i in indices]))
    progress = Progress(sum(len(indices) for _, indices, _ in todo), enabled=not args.no_progress)
    written = []
    for job, indices, paths in todo:
        paths[0].parent.mkdir(parents=True, exist_ok=True)
        images, seeds = generate(model, job, args, indices, progress)
        height, width = images[0].shape[:2]
        for image, seed, path in zip(images, seeds, paths):
            text = parameters_text(job["prompt"], job["negative_prompt"], job["steps"],
                                   job["sampler"] or model.make_sampler().name, job["guidance"], seed, width, height,
                                   model_name)
            written.append(write_png(image, path, text, overwrite=args.overwrite))
    for path in written:
        print(path)
    return written


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        run(args, parser)
    except UsageError as error:
        print(f"sd-tf generate: error: {error}", file=sys.stderr)
        return 2
    except ValueError as error:  # bad sizes, masks, images found once the model is known
        print(f"sd-tf generate: error: {error}", file=sys.stderr)
        return 2
    return 0
