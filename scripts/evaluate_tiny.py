"""Scores the shipped tiny-shapes model: how often its images show what the caption asks.

    python scripts/evaluate_tiny.py [--model tiny-shapes] [--per-split 34] [--seeds 3]

Generates images for the held-out combinations (never seen in training) and
for as many seen ones, several seeds each, with the default sampler settings,
reads each image back with ``sd_tf.shapes.analyze`` and prints the accuracy
of background colour, shape colour and shape, per split, as a markdown table.
"""

import argparse

import numpy as np

from sd_tf import shapes

DEFAULT_STEPS = 25
DEFAULT_GUIDANCE = 7.5


def evaluate(model, combinations, seeds, steps=DEFAULT_STEPS, guidance=DEFAULT_GUIDANCE, batch_size=16):
    """Accuracy dict (background, colour, shape) over ``combinations`` x ``seeds``."""
    jobs = [(combo, seed) for combo in combinations for seed in seeds]
    hits = {"background": 0, "colour": 0, "shape": 0}
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start:start + batch_size]
        prompts = [shapes.caption(colour, shape, background) for (colour, background, shape), _ in chunk]
        images = generate_batch(model, prompts, [seed for _, seed in chunk], steps, guidance)
        for ((colour, background, shape), _), image in zip(chunk, images):
            found = shapes.analyze(image)
            hits["background"] += found["background"] == background
            hits["colour"] += found["colour"] == colour
            hits["shape"] += found["shape"] == shape
    return {key: value / len(jobs) for key, value in hits.items()}


def generate_batch(model, prompts, seeds, steps, guidance):
    """Images for ``prompts`` where image i uses ``seeds[i]`` (the noise ``text_to_image(seed=s)`` draws), in one batched loop."""
    import tensorflow as tf

    side = model.config.image_size // model.vae_factor
    latents = np.stack([
        tf.random.stateless_normal((side, side, model.latent_channels), seed=[s, 0]).numpy() for s in seeds
    ])
    return model.text_to_image(prompts, num_steps=steps, guidance_scale=guidance, latents=latents)


def splits(per_split):
    """``per_split`` held-out combinations, evenly spread over the list, and as many seen ones drawn at random."""
    spread = np.linspace(0, len(shapes.HELD_OUT) - 1, per_split).round().astype(int)
    held_out = [shapes.HELD_OUT[i] for i in spread]
    rng = np.random.default_rng(0)
    seen = [shapes.TRAIN_COMBINATIONS[i] for i in rng.choice(len(shapes.TRAIN_COMBINATIONS), per_split, replace=False)]
    return held_out, seen


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-shapes")
    parser.add_argument("--per-split", type=int, default=len(shapes.HELD_OUT),
                        help="combinations per split (held-out and seen)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per combination")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    args = parser.parse_args(argv)

    from sd_tf import StableDiffusion

    model = StableDiffusion.from_pretrained(args.model)
    held_out, seen = splits(args.per_split)
    seeds = list(range(args.seeds))
    print("| split | images | background | shape colour | shape |")
    print("|---|---|---|---|---|")
    for name, combinations in (("held-out", held_out), ("seen", seen)):
        scores = evaluate(model, combinations, seeds, steps=args.steps)
        print(f"| {name} | {len(combinations) * len(seeds)} | {scores['background']:.0%} | "
              f"{scores['colour']:.0%} | {scores['shape']:.0%} |", flush=True)


if __name__ == "__main__":
    main()
