"""Models shipped inside the package, by name (diffusers folder layout)."""

from pathlib import Path

SHIPPED_MODELS = {
    # 64x64 procedural shapes, trained by scripts/train_tiny.py; see its README.md.
    "tiny-shapes": Path(__file__).with_name("tiny-shapes"),
}
DEFAULT_MODEL = "tiny-shapes"


def resolve_model(name_or_path):
    """A path as given if it exists, else the folder of a shipped model name.

    Raises FileNotFoundError naming the shipped models for anything else.
    """
    path = Path(name_or_path)
    if path.exists():
        return path
    if str(name_or_path) in SHIPPED_MODELS:
        folder = SHIPPED_MODELS[str(name_or_path)]
        if not (folder / "model_index.json").is_file():
            raise FileNotFoundError(f"shipped model {name_or_path!r} is missing from {folder} (a broken install?)")
        return folder
    raise FileNotFoundError(
        f"{name_or_path}: no such model file or folder, and not a shipped model name "
        f"(shipped: {', '.join(SHIPPED_MODELS)})"
    )
