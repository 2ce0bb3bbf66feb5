"""Checkpoint reading and writing: original single files, diffusers folder variants, interchange, bad input.

Single files are written in the original (CompVis) layout by test-only writers
(conftest.py) and read by diffusers' own single-file loader too: sd_tf's
outputs are compared with what diffusers makes of the same file, so diffusers,
not sd_tf's key mapping, decides what the keys mean.

Building the Keras networks takes tens of seconds, so most tests load what
``from_pretrained`` reads (``read_pretrained``) into a session model whose
weights were scrambled first (``kept_weights``); a few run ``from_pretrained``
end to end.
"""

import io
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
import time
import types
import zipfile
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import (
    PROMPTS,
    TOLERANCE,
    assert_pipeline_parity,
    kept_weights,
    max_error,
    original_checkpoint,
    read_pretrained,
    save_original,
    unet_inputs,
    weight_differences,
)
from reference import nchw, nhwc, reference_components
from sd_tf import weights
from sd_tf.config import preset, read_config_folder
from sd_tf.stable_diffusion import StableDiffusion, detect_preset
from sd_tf.weights import CheckpointError

# Offline: every diffusers / transformers load below reads local folders only.
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def pipeline_class(kind):
    from diffusers import StableDiffusionInpaintPipeline, StableDiffusionPipeline

    return StableDiffusionInpaintPipeline if kind == "inpaint" else StableDiffusionPipeline


def diffusers_single_file(kind, path, folder, **kwargs):
    """diffusers' own reading of an original single file, configured by the reference folder."""
    return pipeline_class(kind).from_single_file(str(path), config=str(folder), local_files_only=True, **kwargs)


def torch_state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def unet_outputs_torch(unet, latents, context):
    with torch.no_grad():
        return nhwc(unet(nchw(latents), torch.tensor([10.0, 700.0]), torch.from_numpy(context)).sample), None


def assert_same_parameters(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    different = [k for k in sa if not torch.equal(sa[k], sb[k])]
    assert not different, different[:5]


# ----------------------------------------------------------------------------
# Original single files
# ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def single_files(reference_folder, tmp_path_factory):
    """Original-layout files of the reference pipelines: {name: path}, written once.

    "sd1-ema.ckpt" holds a second random UNet under ``model.diffusion_model.*`` and
    the reference UNet under ``model_ema.*``.
    """
    root = tmp_path_factory.mktemp("single-files")
    paths = {}
    for kind, suffix in (("sd1", ".safetensors"), ("sd1", ".ckpt"), ("sd2", ".safetensors"), ("sd2", ".ckpt"),
                         ("inpaint", ".ckpt")):
        _, pipe = reference_folder(kind)
        paths[kind + suffix] = save_original(original_checkpoint(pipe, openclip=kind == "sd2"), root / (kind + suffix))
    _, pipe = reference_folder("sd1")
    other_unet = reference_components("sd1", seed=1)[1]
    tensors = original_checkpoint(pipe, unet=other_unet, ema_unet=pipe.unet)
    paths["sd1-ema.ckpt"] = save_original(tensors, root / "sd1-ema.ckpt")
    paths["other_unet"] = other_unet
    return paths


@pytest.mark.parametrize("kind", ["sd1", "sd2"])
def test_ckpt_and_safetensors_hold_the_same_tensors(kind, single_files, reference_folder):
    from_ckpt = weights.read_checkpoint(single_files[kind + ".ckpt"])
    from_safetensors = weights.read_checkpoint(single_files[kind + ".safetensors"])
    expected = original_checkpoint(reference_folder(kind)[1], openclip=kind == "sd2")
    assert from_ckpt.keys() == from_safetensors.keys() == expected.keys()
    for key, value in expected.items():
        assert np.array_equal(from_ckpt[key], value.numpy()), key
        assert np.array_equal(from_safetensors[key], value.numpy()), key
        assert from_ckpt[key].dtype == value.numpy().dtype, key


@pytest.mark.parametrize("name", ["sd1.safetensors", "sd2.safetensors", "inpaint.ckpt"])
def test_single_file_matches_diffusers_single_file_loader(name, single_files, reference_folder, loaded_model):
    kind = name.split(".")[0]
    folder, reference = reference_folder(kind)
    expected = diffusers_single_file(kind, single_files[name], folder)
    # The writer is right if diffusers reads the reference networks back.
    for component in ("text_encoder", "unet", "vae"):
        assert_same_parameters(getattr(expected, component), getattr(reference, component))
    config, tensors, _ = read_pretrained(single_files[name], config=folder)
    model = loaded_model(kind)
    assert config == model.config
    with kept_weights(model):
        model.load_tensors(tensors)
        assert_pipeline_parity(model, expected)


def test_from_pretrained_sd2_ckpt_end_to_end(single_files, reference_folder):
    """SD 2.x ``.ckpt``: OpenCLIP text tower with fused q/k/v and one layer more than used, v-prediction."""
    folder, _ = reference_folder("sd2")
    expected = diffusers_single_file("sd2", single_files["sd2.ckpt"], folder)
    model = StableDiffusion.from_pretrained(single_files["sd2.ckpt"], config=folder)
    assert model.config == read_config_folder(folder)
    assert model.config.prediction_type == expected.scheduler.config.prediction_type == "v_prediction"
    assert model.tokenizer.pad_token_id == expected.tokenizer.pad_token_id == 0
    assert_pipeline_parity(model, expected, unet_calls=2)


@pytest.fixture(scope="module")
def ema_pipelines(single_files, reference_folder):
    """diffusers' reading of sd1-ema.ckpt: (default = non-EMA, extract_ema=True)."""
    folder, _ = reference_folder("sd1")
    path = single_files["sd1-ema.ckpt"]
    return diffusers_single_file("sd1", path, folder), diffusers_single_file("sd1", path, folder, extract_ema=True)


def test_ema_file_means_what_it_was_written_to(ema_pipelines, single_files, reference_folder):
    default, ema = ema_pipelines
    assert_same_parameters(default.unet, single_files["other_unet"])
    assert_same_parameters(ema.unet, reference_folder("sd1")[1].unet)
    latents, context = unet_inputs(4, 32)
    a, _ = unet_outputs_torch(default.unet, latents, context)
    b, _ = unet_outputs_torch(ema.unet, latents, context)
    assert max_error(a, b) > 1000 * TOLERANCE  # the two UNets are told apart by the parity check


@pytest.mark.parametrize("use_ema", [False, True])
def test_single_file_ema_choice_matches_diffusers(use_ema, ema_pipelines, single_files, reference_folder, loaded_model):
    """Default: the non-EMA UNet, as diffusers' default; ``use_ema=True``: model_ema.*, as ``extract_ema=True``."""
    folder, _ = reference_folder("sd1")
    expected = ema_pipelines[use_ema]
    config, tensors, _ = read_pretrained(single_files["sd1-ema.ckpt"], config=folder, use_ema=use_ema)
    model = loaded_model("sd1")
    with kept_weights(model):
        model.load_tensors(tensors)
        assert_pipeline_parity(model, expected, unet_calls=2)


def test_use_ema_without_ema_weights_takes_the_only_unet(single_files):
    plain = read_pretrained(single_files["sd1.ckpt"], config="sd-v1")[1]["unet"]
    ema = read_pretrained(single_files["sd1.ckpt"], config="sd-v1", use_ema=True)[1]["unet"]
    assert plain.keys() == ema.keys()
    assert all(np.array_equal(plain[k], ema[k]) for k in plain)


@pytest.mark.parametrize("in_channels,text,expected", [
    (4, "clip", "sd-v1"), (9, "clip", "sd-v1-inpaint"), (4, "openclip", "sd-v2"), (9, "openclip", "sd-v2-inpaint"),
])
def test_detect_preset_from_tensor_shapes(in_channels, text, expected):
    groups = {
        "unet": {"input_blocks.0.0.weight": np.zeros((320, in_channels, 3, 3), np.float16)},
        "vae": {"encoder.conv_in.weight": np.zeros((128, 3, 3, 3), np.float16)},
        "clip": {}, "openclip": {},
    }
    groups[text]["token_embedding.weight" if text == "openclip" else "text_model.embeddings.token_embedding.weight"] = (
        np.zeros((49408, 1024 if text == "openclip" else 768), np.float16))
    assert detect_preset(groups) == expected
    assert preset(expected).unet.in_channels == in_channels


def test_detect_preset_refuses_what_it_cannot_tell():
    groups = {"unet": {"input_blocks.0.0.weight": np.zeros((320, 8, 3, 3))}, "clip": {"x": np.zeros(1)}, "openclip": {}}
    with pytest.raises(CheckpointError, match=r"no preset for a UNet with 8 input channels .*pass config="):
        detect_preset(groups)
    groups["unet"] = {"time_embed.0.weight": np.zeros((1280, 320))}
    with pytest.raises(CheckpointError, match=r"cannot detect the model: no UNet input convolution"):
        detect_preset(groups)


@pytest.mark.parametrize("name,expected", [("sd1.ckpt", "sd-v1"), ("sd2.safetensors", "sd-v2"), ("inpaint.ckpt", "sd-v1-inpaint")])
def test_single_file_without_config_is_detected(name, expected, single_files):
    assert detect_preset(weights.split_original(weights.read_checkpoint(single_files[name]))) == expected
    config, tensors, _ = read_pretrained(single_files[name])
    assert config == preset(expected)


# ----------------------------------------------------------------------------
# Interchange: save_pretrained <-> diffusers
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["sd1", "sd2", "inpaint"])
def test_save_pretrained_loads_in_diffusers(kind, reference_folder, loaded_model, tmp_path):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    _, reference = reference_folder(kind)
    model = loaded_model(kind)
    out = tmp_path / "saved"
    model.save_pretrained(out)

    cls = pipeline_class(kind)
    loaded = cls.from_pretrained(out, local_files_only=True)
    assert type(loaded) is cls
    for component in ("text_encoder", "unet", "vae"):
        assert_same_parameters(getattr(loaded, component), getattr(reference, component))
    for loader, sub in ((CLIPTextModel, "text_encoder"), (UNet2DConditionModel, "unet"), (AutoencoderKL, "vae")):
        _, info = loader.from_pretrained(out / sub, output_loading_info=True)
        assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), (sub, info)

    latents, context = unet_inputs(reference.unet.config.in_channels, 32)
    assert np.array_equal(unet_outputs_torch(loaded.unet, latents, context)[0],
                          unet_outputs_torch(reference.unet, latents, context)[0])
    assert loaded.scheduler.config.prediction_type == reference.scheduler.config.prediction_type
    assert loaded.tokenizer.pad_token_id == reference.tokenizer.pad_token_id == model.tokenizer.pad_token_id
    assert loaded.tokenizer.pad_token_id == (0 if kind == "sd2" else 49407)  # OpenCLIP pads with "!"
    ids = loaded.tokenizer(PROMPTS, padding="max_length", max_length=77, truncation=True).input_ids
    assert np.array_equal(np.array(ids), model.tokenizer(PROMPTS))


def test_save_pretrained_reloads_identically(loaded_model, tmp_path):
    model = loaded_model("sd2")
    model.save_pretrained(tmp_path / "saved")
    reloaded = StableDiffusion.from_pretrained(tmp_path / "saved")
    assert weight_differences(model, reloaded) == []
    assert reloaded.config == model.config
    assert reloaded.tokenizer.pad_token_id == 0  # OpenCLIP pads with "!"
    assert np.array_equal(reloaded.tokenizer(PROMPTS), model.tokenizer(PROMPTS))


def folder_snapshot(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_save_over_existing_folder_replaces_it(loaded_model, tmp_path):
    out = tmp_path / "saved"
    loaded_model("sd1").save_pretrained(out)
    (out / "stale.txt").write_text("from an earlier save")
    (out / "unet" / "diffusion_pytorch_model.fp16.safetensors").write_bytes(b"stale")
    loaded_model("sd2").save_pretrained(out)
    assert read_config_folder(out) == loaded_model("sd2").config
    assert not (out / "stale.txt").exists()
    assert not (out / "unet" / "diffusion_pytorch_model.fp16.safetensors").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["saved"]  # no staging or backup folders left


def test_failed_save_keeps_existing_folder(loaded_model, tmp_path, monkeypatch):
    import safetensors.numpy

    out = tmp_path / "saved"
    loaded_model("sd1").save_pretrained(out)
    before = folder_snapshot(out)

    def fail(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(safetensors.numpy, "save_file", fail)
    with pytest.raises(OSError, match="No space left"):
        loaded_model("sd2").save_pretrained(out)
    assert folder_snapshot(out) == before
    assert [p.name for p in tmp_path.iterdir()] == ["saved"]


def test_failed_final_move_keeps_existing_folder(loaded_model, tmp_path, monkeypatch):
    """The last step moves the new folder into place; if that fails, the old folder is put back."""
    out = tmp_path / "saved"
    loaded_model("sd1").save_pretrained(out)
    before = folder_snapshot(out)
    rename = Path.rename
    failures = []

    def rename_failing_into_place(self, target):
        if Path(target) == out and not failures:  # only the first move into place fails
            failures.append(self)
            raise OSError("rename failed")
        return rename(self, target)

    monkeypatch.setattr(Path, "rename", rename_failing_into_place)
    with pytest.raises(OSError, match="rename failed"):
        loaded_model("sd2").save_pretrained(out)
    assert failures and failures[0].name != "saved"  # the new folder's move failed
    assert folder_snapshot(out) == before
    assert [p.name for p in tmp_path.iterdir()] == ["saved"]


# ----------------------------------------------------------------------------
# Diffusers folder variants
# ----------------------------------------------------------------------------


def write_layout(layout, folder, reference_dir, reference):
    """A copy of the sd1 reference folder in another layout; returns the pipeline it must match."""
    from safetensors.torch import save_file

    shutil.copytree(reference_dir, folder, ignore=shutil.ignore_patterns("*.safetensors"))
    if layout in ("fp16", "sharded-fp16"):
        half = pipeline_class("sd1").from_pretrained(reference_dir, dtype=torch.float16, local_files_only=True)
        shard = {"max_shard_size": "100KB"} if layout == "sharded-fp16" else {}
        for name in ("text_encoder", "unet", "vae"):
            getattr(half, name).save_pretrained(folder / name, variant="fp16", **shard)
        return half.to(torch.float32)
    if layout == "legacy":
        # transformers 4: text_model.* keys and a position_ids buffer, as pytorch_model.bin.
        text = {"text_model." + k: v for k, v in torch_state(reference.text_encoder).items()}
        text["text_model.embeddings.position_ids"] = torch.arange(77)[None]
        torch.save(text, folder / "text_encoder" / "pytorch_model.bin")
        # diffusers < 0.14: VAE attention as query/key/value/proj_attn.
        old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
        vae = {}
        for key, value in torch_state(reference.vae).items():
            for new_name, old_name in old.items():
                key = key.replace(f"attentions.0.{new_name}.", f"attentions.0.{old_name}.")
            vae[key] = value.contiguous()
        assert any(".query." in k for k in vae)
        save_file(vae, str(folder / "vae" / "diffusion_pytorch_model.safetensors"))
        # Sharded UNet with an index.
        reference.unet.save_pretrained(folder / "unet", max_shard_size="100KB")
        return reference
    raise ValueError(layout)


@pytest.mark.parametrize("layout,variant", [("fp16", None), ("fp16", "fp16"), ("sharded-fp16", "fp16"), ("legacy", None)])
def test_folder_layouts_load_to_the_same_outputs(layout, variant, reference_folder, loaded_model, tmp_path):
    reference_dir, reference = reference_folder("sd1")
    folder = tmp_path / layout
    expected = write_layout(layout, folder, reference_dir, reference)
    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*.safetensors"))
    if layout.endswith("fp16"):
        assert files and all(".fp16" in name for name in files), files
    if layout.startswith("sharded") or layout == "legacy":
        assert list(folder.glob("unet/*.index*.json")) and len(list(folder.glob("unet/*.safetensors"))) > 1
    config, tensors, tokenizer = read_pretrained(folder, variant=variant)
    model = loaded_model("sd1")
    assert config == model.config
    with kept_weights(model):
        model.load_tensors(tensors)
        assert_pipeline_parity(model, expected)


def test_reference_folders_have_transformers_5_text_encoder_keys(reference_folder):
    """transformers 5 saves CLIPTextModel without ``text_model.``; the parity tests load such folders."""
    folder, _ = reference_folder("sd1")
    keys = weights.read_checkpoint(folder / "text_encoder" / "model.safetensors").keys()
    assert "encoder.layers.0.self_attn.q_proj.weight" in keys
    assert not any(key.startswith("text_model.") for key in keys)


def test_variant_that_is_not_there(reference_folder):
    folder, _ = reference_folder("sd1")
    with pytest.raises(CheckpointError, match=r"text_encoder: no model\.fp16\.safetensors"):
        read_pretrained(folder, variant="fp16")


def test_bfloat16_safetensors(tmp_path):
    from safetensors.torch import save_file

    values = torch.randn(3, 5)
    save_file({"w": values.to(torch.bfloat16), "f": values}, str(tmp_path / "bf16.safetensors"))
    tensors = weights.read_checkpoint(tmp_path / "bf16.safetensors")
    assert str(tensors["w"].dtype) == "bfloat16"
    assert np.array_equal(tensors["w"].astype(np.float32), values.to(torch.bfloat16).float().numpy())
    assert np.array_equal(tensors["f"], values.numpy())


def file_pages_mb():
    """Megabytes of file-backed pages this process holds (RssFile, Linux)."""
    status = Path("/proc/self/status").read_text()
    return int(re.search(r"RssFile:\s+(\d+) kB", status)[1]) / 1024


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux's /proc")
def test_safetensors_are_mapped_and_released_after_assignment(tmp_path):
    """Tensors are views of the mapped file; assigning one drops its pages, and the values stay intact."""
    import keras
    from safetensors.numpy import save_file

    values = np.random.default_rng(0).standard_normal((64, 1024, 256)).astype(np.float32)  # 64 MB
    save_file({"w": values}, str(tmp_path / "big.safetensors"))
    tensor = weights.read_checkpoint(tmp_path / "big.safetensors")["w"]
    before = file_pages_mb()
    variable = keras.Variable(np.zeros(values.shape, np.float32))
    weights.assign_weights([(variable, tensor)])
    assert file_pages_mb() - before < 16  # touched while copied, then released
    assert np.array_equal(variable.numpy(), values) and np.array_equal(tensor, values)


def test_lightning_training_checkpoint_reads(tmp_path, monkeypatch):
    """Real SD 1.x .ckpt files key ``callbacks`` by Lightning's ModelCheckpoint class and hold numpy scalars."""
    module = types.ModuleType("pytorch_lightning.callbacks.model_checkpoint")

    class ModelCheckpoint:
        pass

    ModelCheckpoint.__module__, ModelCheckpoint.__qualname__ = module.__name__, "ModelCheckpoint"
    module.ModelCheckpoint = ModelCheckpoint
    for name in ("pytorch_lightning", "pytorch_lightning.callbacks", module.__name__):
        monkeypatch.setitem(sys.modules, name, module if name == module.__name__ else types.ModuleType(name))
    state = {"model.diffusion_model.out.2.bias": torch.randn(4), "w": torch.nn.Parameter(torch.randn(2, 3))}
    torch.save({"state_dict": state, "global_step": 470000, "pytorch-lightning_version": "1.4.2",
                "callbacks": {ModelCheckpoint: {"best_model_score": np.float64(0.25), "best_model_path": "x"}}},
               tmp_path / "trained.ckpt")
    tensors = weights.read_checkpoint(tmp_path / "trained.ckpt")
    assert tensors.keys() == state.keys()
    assert all(np.array_equal(tensors[k], v.detach().numpy()) for k, v in state.items())


# ----------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------


class Payload:
    """Pickles as a call of ``function(*args)``: what a malicious checkpoint does."""

    def __init__(self, function, *args):
        self.function, self.args = function, args

    def __reduce__(self):
        return self.function, self.args


def malicious_checkpoint(path, function_name, marker):
    payloads = {
        "os.system": Payload(os.system, f"touch {marker}"),
        "builtins.eval": Payload(eval, f"open({str(marker)!r}, 'w').close()"),
        "subprocess.Popen": Payload(subprocess.Popen, ["touch", str(marker)]),
    }
    state = {"model.diffusion_model.out.2.bias": torch.zeros(4)}
    torch.save({"state_dict": state, "callbacks": payloads[function_name]}, path)
    return path


# The global each payload names; pickle protocol 2 (torch.save's) writes Python 2 module names.
PAYLOAD_GLOBALS = {
    "os.system": r"(posix|os)\.system",
    "builtins.eval": r"(builtins|__builtin__)\.eval",
    "subprocess.Popen": r"(subprocess|commands)\.Popen",
}


@pytest.mark.parametrize("function_name", sorted(PAYLOAD_GLOBALS))
def test_malicious_ckpt_is_refused_and_never_runs(function_name, tmp_path):
    marker = tmp_path / "payload-ran"
    path = malicious_checkpoint(tmp_path / "evil.ckpt", function_name, marker)
    with pytest.raises(CheckpointError, match=rf"evil\.ckpt: refusing to unpickle {PAYLOAD_GLOBALS[function_name]}:"):
        weights.read_checkpoint(path)
    with pytest.raises(CheckpointError, match="refusing to unpickle"):
        StableDiffusion.from_pretrained(path)
    time.sleep(0.2)  # a spawned process would have touched the marker by now
    assert not marker.exists()


def test_malicious_payload_does_run_under_plain_unpickling(tmp_path):
    """Shows the refused file really is malicious: an unrestricted load runs it (a harmless touch)."""
    marker = tmp_path / "payload-ran"
    path = malicious_checkpoint(tmp_path / "evil.ckpt", "os.system", marker)
    torch.load(path, weights_only=False)
    assert marker.exists()


class _Storage:
    """Pickled as a persistent storage record by ``write_torch_zip``."""

    def __init__(self, key, numel):
        self.pid = ("storage", torch.FloatStorage, key, "cpu", numel)


class _TensorRecord:
    def __init__(self, storage, offset, size, stride):
        self.args = (storage, offset, size, stride, False, OrderedDict())

    def __reduce__(self):
        return torch._utils._rebuild_tensor_v2, self.args


def write_torch_zip(path, obj, storages):
    """A PyTorch zip checkpoint written by hand, so that tensor records can be malformed."""

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            return obj.pid if isinstance(obj, _Storage) else None

    buffer = io.BytesIO()
    Pickler(buffer, protocol=2).dump(obj)
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", buffer.getvalue())
        for key, data in storages.items():
            archive.writestr(f"archive/data/{key}", data)
        archive.writestr("archive/version", "3\n")
    return path


def test_hand_written_torch_zip_reads(tmp_path):
    values = np.arange(6, dtype=np.float32)
    storage = _Storage("0", 6)
    path = write_torch_zip(tmp_path / "ok.ckpt", {"a": _TensorRecord(storage, 0, (2, 3), (3, 1)),
                                                  "b": _TensorRecord(storage, 1, (2, 2), (1, 3))},
                           {"0": values.tobytes()})
    tensors = weights.read_checkpoint(path)
    assert np.array_equal(tensors["a"], values.reshape(2, 3))
    assert np.array_equal(tensors["b"], np.array([[1, 4], [2, 5]], np.float32))
    assert torch.equal(torch.load(path, weights_only=True)["b"], torch.from_numpy(tensors["b"]))


@pytest.mark.parametrize("offset,size,stride,message", [
    (0, (1000000,), (1,), "reaches element 999999 of a storage of 6"),
    (5, (2,), (1,), "reaches element 6 of a storage of 6"),
    (0, (2, 3), (1000000, 1), "reaches element"),
    (0, (2,), (-1,), "malformed tensor record"),
    (0, (2, 3), (1,), "malformed tensor record"),
])
def test_tensor_record_outside_its_storage_is_refused(offset, size, stride, message, tmp_path):
    path = write_torch_zip(tmp_path / "bad.ckpt", {"a": _TensorRecord(_Storage("0", 6), offset, size, stride)},
                           {"0": np.zeros(6, np.float32).tobytes()})
    with pytest.raises(CheckpointError, match=rf"bad\.ckpt: .*{message}"):
        weights.read_checkpoint(path)


def test_truncated_and_garbage_files(reference_folder, single_files, tmp_path):
    folder, _ = reference_folder("sd1")
    data = (folder / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    (tmp_path / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"truncated\.safetensors: .*the file is truncated"):
        weights.read_checkpoint(tmp_path / "truncated.safetensors")
    (tmp_path / "header.safetensors").write_bytes(data[:100])
    with pytest.raises(CheckpointError, match=r"header\.safetensors: .*header size \d+ does not fit"):
        weights.read_checkpoint(tmp_path / "header.safetensors")
    (tmp_path / "tiny.safetensors").write_bytes(b"abc")
    with pytest.raises(CheckpointError, match=r"tiny\.safetensors: not a readable safetensors file \(only 3 bytes\)"):
        weights.read_checkpoint(tmp_path / "tiny.safetensors")
    (tmp_path / "garbage.safetensors").write_bytes(b"<html>404 Not Found</html>" * 40)
    with pytest.raises(CheckpointError, match=r"garbage\.safetensors: not a readable safetensors file"):
        weights.read_checkpoint(tmp_path / "garbage.safetensors")
    header = json.dumps({"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 12]}}).encode()
    (tmp_path / "short.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + bytes(12))
    with pytest.raises(CheckpointError, match=r"short\.safetensors: .*'w': 12 bytes do not hold shape \(2, 2\)"):
        weights.read_checkpoint(tmp_path / "short.safetensors")
    ckpt = single_files["sd1.ckpt"].read_bytes()
    (tmp_path / "truncated.ckpt").write_bytes(ckpt[: len(ckpt) // 2])
    with pytest.raises(CheckpointError, match=r"truncated\.ckpt: not a PyTorch zip checkpoint"):
        weights.read_checkpoint(tmp_path / "truncated.ckpt")
    (tmp_path / "garbage.ckpt").write_bytes(b"\x80\x02}q\x00." * 10)  # a bare pickle: legacy torch format
    with pytest.raises(CheckpointError, match=r"garbage\.ckpt: not a PyTorch zip checkpoint"):
        weights.read_checkpoint(tmp_path / "garbage.ckpt")


def test_truncated_file_in_a_folder_is_named(reference_folder, tmp_path):
    folder, _ = reference_folder("sd1")
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    unet_file = broken / "unet" / "diffusion_pytorch_model.safetensors"
    unet_file.write_bytes(unet_file.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match=r"unet/diffusion_pytorch_model\.safetensors: .*truncated"):
        StableDiffusion.from_pretrained(broken)


def test_shard_index_naming_a_missing_shard(reference_folder, tmp_path):
    folder, reference = reference_folder("sd1")
    reference.unet.save_pretrained(tmp_path / "unet", max_shard_size="100KB")
    shard = sorted((tmp_path / "unet").glob("*-00002-of-*.safetensors"))[0]
    shard.unlink()
    with pytest.raises(CheckpointError, match=rf"{shard.name}: no such checkpoint file"):
        weights.read_component(tmp_path / "unet", "diffusion_pytorch_model")


def assert_unchanged(model, before):
    after = weights.model_tensors([model.text_encoder, model.unet, model.vae_encoder, model.vae_decoder])
    assert after.keys() == before.keys()
    assert all(np.array_equal(after[k], before[k]) for k in before)


def test_mismatched_checkpoints_are_refused_whole(reference_folder, loaded_model):
    model = loaded_model("sd1")
    everything = [model.text_encoder, model.unet, model.vae_encoder, model.vae_decoder]
    before = weights.model_tensors(everything)
    _, good, _ = read_pretrained(reference_folder("sd1")[0])
    changed_text = {k: v + 1.0 for k, v in good["text_encoder"].items()}

    # A UNet of another config (SD 2.x style linear projections), with good text encoder and VAE tensors.
    sd2_unet = read_pretrained(reference_folder("sd2")[0])[1]["unet"]
    with pytest.raises(CheckpointError) as error:
        model.load_tensors({"text_encoder": changed_text, "unet": sd2_unet, "vae": good["vae"]})
    message = str(error.value)
    projections = [k for k in sd2_unet if k.endswith(("proj_in.weight", "proj_out.weight"))]
    assert len(projections) == 22
    assert message.startswith(f"unet: 0 missing, 0 unexpected, {len(projections)} mis-shaped tensors")
    assert "mis-shaped: down_blocks.0.attentions.0.proj_in.weight: checkpoint (32, 32), model needs (32, 32, 1, 1)" in message
    assert "mis-shaped: up_blocks.2.attentions.2.proj_out.weight" in message
    assert "text_encoder" not in message and "vae" not in message
    assert_unchanged(model, before)

    # Missing and unexpected keys, in two networks at once: both reported.
    unet = dict(good["unet"])
    del unet["mid_block.resnets.1.conv2.weight"], unet["conv_out.bias"]
    vae = dict(good["vae"], **{"decoder.up_blocks.9.resnets.0.conv1.weight": np.zeros(3, np.float32),
                               "loss.logvar": np.zeros((), np.float32)})
    with pytest.raises(CheckpointError) as error:
        model.load_tensors({"text_encoder": changed_text, "unet": unet, "vae": vae})
    message = str(error.value)
    assert "unet: 2 missing, 0 unexpected, 0 mis-shaped tensors" in message
    assert "missing: mid_block.resnets.1.conv2.weight" in message and "missing: conv_out.bias" in message
    assert "vae: 0 missing, 2 unexpected, 0 mis-shaped tensors" in message
    assert "unexpected: decoder.up_blocks.9.resnets.0.conv1.weight" in message and "unexpected: loss.logvar" in message
    assert_unchanged(model, before)

    # The same through load_weights on one network.
    with pytest.raises(CheckpointError, match=r"1 missing, 0 unexpected, 0 mis-shaped tensors\n  missing: final_layer_norm\.bias"):
        weights.load_weights([model.text_encoder], {k: v for k, v in changed_text.items() if k != "final_layer_norm.bias"})
    assert_unchanged(model, before)


def test_paths_that_are_not_models(single_files, reference_folder, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nowhere: no such model file or folder"):
        StableDiffusion.from_pretrained(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"missing\.safetensors: no such model file or folder"):
        StableDiffusion.from_pretrained(tmp_path / "missing.safetensors")
    with pytest.raises(CheckpointError, match=r"missing\.safetensors: no such checkpoint file"):
        weights.read_checkpoint(tmp_path / "missing.safetensors")
    (tmp_path / "model.onnx").write_bytes(b"onnx")
    with pytest.raises(ValueError, match=r"model\.onnx: not a diffusers folder nor a \.safetensors/\.ckpt file"):
        StableDiffusion.from_pretrained(tmp_path / "model.onnx")
    with pytest.raises(CheckpointError, match=r"model\.onnx: unknown checkpoint format '\.onnx'"):
        weights.read_checkpoint(tmp_path / "model.onnx")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty: not a diffusers Stable Diffusion folder \(no unet/ inside\)"):
        StableDiffusion.from_pretrained(tmp_path / "empty")

    folder, _ = reference_folder("sd1")
    no_vae_config = tmp_path / "no-vae-config"
    shutil.copytree(folder, no_vae_config)
    (no_vae_config / "vae" / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"vae/config\.json: missing"):
        StableDiffusion.from_pretrained(no_vae_config)
    no_weights = tmp_path / "no-weights"
    shutil.copytree(folder, no_weights)
    (no_weights / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"unet: no diffusion_pytorch_model\[\.fp16\]\.safetensors"):
        StableDiffusion.from_pretrained(no_weights)

    with pytest.raises(ValueError, match=r"unknown preset 'sd-v3'; known presets: sd-v1, "):
        StableDiffusion.from_pretrained(single_files["sd1.safetensors"], config="sd-v3")
    with pytest.raises(CheckpointError, match=r"vae-only\.safetensors: not an original Stable Diffusion checkpoint"):
        shutil.copy(folder / "vae" / "diffusion_pytorch_model.safetensors", tmp_path / "vae-only.safetensors")
        StableDiffusion.from_pretrained(tmp_path / "vae-only.safetensors")
