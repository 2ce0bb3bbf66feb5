"""sd_tf against diffusers on this machine: full SD 1.5 architecture, random weights, one markdown table.

    python benchmarks/benchmark.py            # every row (about an hour on 2 CPU cores)
    python benchmarks/benchmark.py --quick    # only the 256 px rows

Needs the test extra (torch, diffusers, transformers). Both libraries get the
same random weights (a diffusers folder made once under --cache), the same
inputs and the same number of threads. Rows of single networks run in this
process, interleaved (sd_tf, diffusers, sd_tf, ...), reporting the median of
--repeats runs after one warm-up run. The generation rows (cold start, then a
whole image with 25 dpmpp_2m steps) run each library in a fresh process,
which also gives its peak memory (RSS). GFLOP/s divides the FLOPs torch's
FlopCounterMode counts for diffusers' network (attention's: 4 N^2 d per head)
by each library's time. --rows picks groups of rows (default: all).
"""

import argparse
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

PROMPT = "a photograph of an astronaut riding a horse"
GENERATION_STEPS = 25
ROW_GROUPS = ("generation", "unet", "attention", "vae", "text")
# sd_tf dtype -> the diffusers mode it is compared with
TORCH_MODES = {"float32": "float32", "mixed_bfloat16": "bfloat16 weights", "bfloat16": "bfloat16 weights"}


def timed(function, repeats):
    """Median seconds of ``repeats`` calls after one warm-up call."""
    function()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_rss_gb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


# ----------------------------------------------------------------------------
# The shared random-weight checkpoint
# ----------------------------------------------------------------------------


def make_checkpoint(folder):
    """A random-weight SD 1.5 diffusers folder (sd_tf's "sd-v1" preset), written once."""
    if (folder / "model_index.json").exists():
        return folder
    import torch
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel
    from transformers import CLIPTokenizer as HFTokenizer

    from sd_tf.config import preset
    from sd_tf.tokenizer import CLIPTokenizer

    config = preset("sd-v1")
    torch.manual_seed(0)
    CLIPTokenizer().save_pretrained(folder.parent / "tokenizer-source")
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL.from_config(config.vae.to_dict()),
        text_encoder=CLIPTextModel(CLIPTextConfig(**config.text_encoder.to_dict())),
        tokenizer=HFTokenizer.from_pretrained(folder.parent / "tokenizer-source"),
        unet=UNet2DConditionModel.from_config(config.unet.to_dict()),
        scheduler=DPMSolverMultistepScheduler.from_config(config.scheduler, algorithm_type="dpmsolver++"),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(folder)
    return folder


# ----------------------------------------------------------------------------
# Single networks, in this process
# ----------------------------------------------------------------------------


class Networks:
    """Both libraries' networks on one checkpoint, and their inputs."""

    def __init__(self, folder, threads):
        import numpy as np
        import torch
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel

        torch.set_num_threads(threads)
        self.np, self.torch, self.folder = np, torch, folder
        self.loaded = (None, None)  # (dtype, StableDiffusion): one at a time, as each holds all the weights
        self.torch_unet = {torch_dtype: UNet2DConditionModel.from_pretrained(folder / "unet", dtype=torch_dtype).eval()
                           for torch_dtype in (torch.float32, torch.bfloat16)}
        self.torch_vae = AutoencoderKL.from_pretrained(folder / "vae", dtype=torch.float32).eval()
        self.torch_text = CLIPTextModel.from_pretrained(folder / "text_encoder", dtype=torch.float32).eval()
        model = self.sd_tf("float32")
        self.factor, self.channels = model.vae_factor, model.latent_channels
        self.token_ids = np.asarray(model.tokenizer([PROMPT, ""]), np.int32)
        width = model.config.unet.cross_attention_dim
        self.context = np.random.default_rng(1).standard_normal((2, 77, width)).astype(np.float32)

    def sd_tf(self, dtype):
        """sd_tf's model of the checkpoint in ``dtype`` (replacing the one loaded before)."""
        from sd_tf.stable_diffusion import StableDiffusion

        if self.loaded[0] != dtype:
            self.loaded = (None, None)
            gc.collect()  # the model and its compiled functions form reference cycles
            self.loaded = (dtype, StableDiffusion.from_pretrained(self.folder, dtype=dtype))
        return self.loaded[1]

    def latents(self, side):
        """CFG-batch latents for ``side``-pixel images."""
        side //= self.factor
        return self.np.random.default_rng(0).standard_normal((2, side, side, self.channels)).astype(self.np.float32)

    def unet_step(self, side, dtype, mode):
        """(sd_tf call, diffusers call, diffusers FLOPs) of one CFG-batch UNet step."""
        import tensorflow as tf

        model = self.sd_tf(dtype)
        latents, timestep = self.latents(side), self.np.full((2,), 500.0, self.np.float32)

        def call(x, t, c):
            return model.unet([x, t, c], training=False)

        fn = call if mode == "eager" else tf.function(call, jit_compile=mode == "xla")
        args = [tf.constant(latents), tf.constant(timestep), tf.constant(self.context)]
        ours = lambda: fn(*args).numpy()  # noqa: E731
        torch_dtype = self.torch.float32 if dtype == "float32" else self.torch.bfloat16
        theirs, torch_forward = self.torch_unet_step(side, torch_dtype)
        return ours, theirs, self.flops(torch_forward)

    def torch_unet_step(self, side, weights_dtype, autocast=False):
        """(timed call, bare forward) of diffusers' CFG-batch UNet step with ``weights_dtype`` weights,
        optionally under bfloat16 autocast (diffusers' other low-precision mode)."""
        torch = self.torch
        unet = self.torch_unet[weights_dtype]
        inputs = [torch.from_numpy(self.latents(side)).permute(0, 3, 1, 2).contiguous().to(weights_dtype),
                  torch.full((2,), 500.0), torch.from_numpy(self.context).to(weights_dtype)]

        def theirs():
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                unet(*inputs).sample.float().numpy()

        return theirs, lambda: unet(*inputs)

    def vae_decode(self, side):
        import tensorflow as tf

        model = self.sd_tf("float32")
        latents = self.latents(side)[:1]
        decode = tf.function(lambda x: model.vae_decoder(x, training=False))
        ours = lambda: decode(tf.constant(latents)).numpy()  # noqa: E731
        x = self.torch.from_numpy(latents).permute(0, 3, 1, 2).contiguous()

        def theirs():
            with self.torch.no_grad():
                self.torch_vae.decode(x).sample.numpy()

        return ours, theirs, self.flops(lambda: self.torch_vae.decode(x))

    def text_encode(self):
        import tensorflow as tf

        model = self.sd_tf("float32")
        encode = tf.function(lambda ids: model.text_encoder(ids, training=False))
        ours = lambda: encode(tf.constant(self.token_ids)).numpy()  # noqa: E731
        ids = self.torch.from_numpy(self.token_ids.astype(self.np.int64))

        def theirs():
            with self.torch.no_grad():
                self.torch_text(ids).last_hidden_state.numpy()

        return ours, theirs, self.flops(lambda: self.torch_text(ids))

    def attention(self, tokens, heads=8, head_dim=40, use_keras=False):
        """SD 1.5's first-level self-attention: sd_tf's (or keras.ops.dot_product_attention) and torch's SDPA."""
        import keras
        import tensorflow as tf

        from sd_tf.models.layers import attention

        q, k, v = (self.np.random.default_rng(i).standard_normal((2, tokens, heads * head_dim)).astype(self.np.float32)
                   for i in range(3))
        if use_keras:
            split = lambda x: tf.reshape(x, (2, tokens, heads, head_dim))  # noqa: E731
            fn = tf.function(lambda q, k, v: keras.ops.dot_product_attention(split(q), split(k), split(v)))
        else:
            fn = tf.function(lambda q, k, v: attention(q, k, v, heads))
        ours = lambda: fn(q, k, v).numpy()  # noqa: E731
        tq, tk, tv = (self.torch.from_numpy(x).view(2, tokens, heads, head_dim).transpose(1, 2) for x in (q, k, v))

        def theirs():
            self.torch.nn.functional.scaled_dot_product_attention(tq, tk, tv).numpy()

        # Two (tokens x tokens x head_dim) matmuls per head; torch's counter misses its CPU SDPA kernel.
        return ours, theirs, 2 * 2 * 2 * heads * tokens * tokens * head_dim

    def flops(self, forward):
        from torch.utils.flop_counter import FlopCounterMode

        with self.torch.no_grad(), FlopCounterMode(display=False) as counter:
            forward()
        return counter.get_total_flops()


# ----------------------------------------------------------------------------
# Whole generations, each in a fresh process
# ----------------------------------------------------------------------------


def generation_worker(library, folder, side, dtype, threads):
    """Cold start (build, load, first UNet step compiled) and one whole image; prints a JSON result line."""
    import numpy as np

    start = time.perf_counter()
    if library == "sd_tf":
        from sd_tf.stable_diffusion import StableDiffusion

        model = StableDiffusion.from_pretrained(folder, dtype=dtype)
        latents = np.random.default_rng(0).standard_normal(
            (1, side // model.vae_factor, side // model.vae_factor, model.latent_channels)).astype(np.float32)
        model.text_to_image(PROMPT, height=side, width=side, num_steps=1, latents=latents)  # builds and compiles
        cold = time.perf_counter() - start
        start = time.perf_counter()
        model.text_to_image(PROMPT, height=side, width=side, num_steps=GENERATION_STEPS, latents=latents,
                            scheduler="dpmpp_2m")
    else:
        import torch
        from diffusers import StableDiffusionPipeline

        torch.set_num_threads(threads)
        pipe = StableDiffusionPipeline.from_pretrained(
            folder, dtype=torch.float32 if dtype == "float32" else torch.bfloat16)
        pipe.set_progress_bar_config(disable=True)
        factor = pipe.vae_scale_factor
        torch_latents = torch.from_numpy(np.random.default_rng(0).standard_normal(
            (1, side // factor, side // factor, pipe.unet.config.in_channels)).astype(np.float32))
        torch_latents = torch_latents.permute(0, 3, 1, 2).to(pipe.unet.dtype)
        with torch.no_grad():
            pipe(PROMPT, num_inference_steps=1, latents=torch_latents, height=side, width=side)
            cold = time.perf_counter() - start
            start = time.perf_counter()
            pipe(PROMPT, num_inference_steps=GENERATION_STEPS, latents=torch_latents, height=side, width=side)
    print("RESULT " + json.dumps({"cold": cold, "image": time.perf_counter() - start, "rss": peak_rss_gb()}),
          flush=True)


def generation(library, folder, side, dtype, threads):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    result = subprocess.run([sys.executable, __file__, "--worker", library, "--model", str(folder), "--side", str(side),
                             "--dtype", dtype, "--threads", str(threads)],
                            capture_output=True, text=True, env=env)
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    if result.returncode or not lines:
        raise RuntimeError(f"{library} generation failed:\n{result.stderr[-3000:]}")
    return json.loads(lines[-1][7:])


# ----------------------------------------------------------------------------
# The table
# ----------------------------------------------------------------------------


def row(name, mode, ours, theirs, theirs_mode, flops=None, rss=("", "")):
    ratio = ours / theirs
    rate = lambda seconds: f"{flops / seconds / 1e9:.0f}" if flops else ""  # noqa: E731
    print(f"| {name} | {mode} | {ours:.3f} | {theirs:.3f} ({theirs_mode}) | {ratio:.2f} | "
          f"{rate(ours)} / {rate(theirs)} | {rss[0]} / {rss[1]} |", flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="only the 256 px rows")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (TensorFlow uses every core)")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/sd_tf_benchmark/sd15-random"),
                        help="where the random-weight SD 1.5 folder is made once")
    parser.add_argument("--model", type=Path, default=None,
                        help="benchmark this diffusers folder instead (e.g. a downloaded SD 1.5)")
    parser.add_argument("--modes", default="eager,graph,xla", help="sd_tf compile modes of the UNet rows")
    parser.add_argument("--rows", default=",".join(ROW_GROUPS), help="the groups of rows to run")
    parser.add_argument("--worker", choices=("sd_tf", "diffusers"), help=argparse.SUPPRESS)
    parser.add_argument("--side", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--dtype", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return generation_worker(args.worker, args.model, args.side, args.dtype, args.threads)

    import platform

    folder = args.model or make_checkpoint(args.cache)
    sides = [256] if args.quick else [512, 256]
    print(f"{time.strftime('%Y-%m-%d')}, {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"torch threads {args.threads}, median of {args.repeats} after a warm-up\n")
    print("| row | sd_tf mode | sd_tf s | diffusers s (mode) | ratio | GFLOP/s sd_tf / diffusers | peak RSS GB |")
    print("|---|---|---|---|---|---|---|")
    rows = args.rows.split(",")
    # Whole generations first, while this process holds no model.
    side = sides[0]
    for dtype in ("float32", "bfloat16") if "generation" in rows else ():
        ours = generation("sd_tf", folder, side, dtype, args.threads)
        theirs = generation("diffusers", folder, side, dtype, args.threads)
        rss = (f"{ours['rss']:.1f}", f"{theirs['rss']:.1f}")
        row(f"cold start: load, build, first step ({side} px)", f"{dtype} auto", ours["cold"], theirs["cold"],
            TORCH_MODES[dtype], rss=rss)
        row(f"whole image, {GENERATION_STEPS} dpmpp_2m steps ({side} px)", f"{dtype} auto", ours["image"],
            theirs["image"], TORCH_MODES[dtype], rss=rss)
    if rows == ["generation"]:
        return
    nets = Networks(folder, args.threads)
    for dtype in TORCH_MODES if "unet" in rows else ():
        for side in sides:
            theirs_time = None
            for mode in args.modes.split(","):
                ours, theirs, flops = nets.unet_step(side, dtype, mode)
                ours_time = timed(ours, args.repeats)
                if theirs_time is None:  # diffusers' faster low-precision mode: bf16 weights or autocast
                    theirs_time, theirs_mode = timed(theirs, args.repeats), TORCH_MODES[dtype]
                    if dtype != "float32":
                        autocast, _ = nets.torch_unet_step(side, nets.torch.float32, autocast=True)
                        autocast_time = timed(autocast, args.repeats)
                        if autocast_time < theirs_time:
                            theirs_time, theirs_mode = autocast_time, "bfloat16 autocast"
                latent = side // nets.factor
                row(f"UNet step, batch 2, {latent}x{latent} latent ({side} px)", f"{dtype} {mode}",
                    ours_time, theirs_time, theirs_mode, flops)
    for side in sides:
        tokens = (side // nets.factor) ** 2
        for use_keras in (False, True) if "attention" in rows else ():
            ours, theirs, flops = nets.attention(tokens, use_keras=use_keras)
            row(f"self-attention, {tokens} tokens, 8 heads x 40, batch 2",
                "keras dot_product_attention" if use_keras else "float32 sd_tf (query-chunked)",
                timed(ours, args.repeats), timed(theirs, args.repeats), "torch SDPA", flops)
        if "vae" in rows:
            ours, theirs, flops = nets.vae_decode(side)
            row(f"VAE decode to {side}x{side}", "float32 graph", timed(ours, args.repeats),
                timed(theirs, args.repeats), "float32", flops)
    if "text" in rows:
        ours, theirs, flops = nets.text_encode()
        row("text encoding, batch 2", "float32 graph", timed(ours, args.repeats), timed(theirs, args.repeats),
            "float32", flops)


if __name__ == "__main__":
    main()
