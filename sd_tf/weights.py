"""Reading checkpoints and porting their tensors into the Keras models, by name.

A Keras variable path is a checkpoint key: ``down_blocks.0.resnets.0/conv1/kernel``
holds ``down_blocks.0.resnets.0.conv1.weight``. Tensors change layout by
explicit rules only: conv kernels OIHW <-> HWIO, linear weights transposed.
Original (CompVis) single files are first renamed to diffusers keys by
``convert_original``; nothing is ever matched by position.
"""

import json
import mmap
import os
import pickle
import re
import zipfile
from pathlib import Path

import numpy as np


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, or does not fit the model."""


# ----------------------------------------------------------------------------
# Readers: path -> {key: numpy array}
# ----------------------------------------------------------------------------


# safetensors dtype names -> numpy element types.
_SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": "bfloat16",
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
# A header larger than this is not a checkpoint's (real ones are well under 1 MB).
_MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024


def _bfloat16():
    import ml_dtypes

    return np.dtype(ml_dtypes.bfloat16)


def read_safetensors(path):
    """All tensors of a ``.safetensors`` file, as read-only numpy arrays (bf16 as ml_dtypes.bfloat16).

    Parsed here rather than by ``safetensors.numpy``, which cannot read bf16:
    an 8-byte little-endian header size, a JSON header of
    ``{name: {dtype, shape, data_offsets}}``, then the tensor bytes. The
    arrays are views of the memory-mapped file (see ``release_pages``).
    """
    try:
        with open(path, "rb") as file:
            data = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) if os.fstat(file.fileno()).st_size else b""
    except OSError as error:
        raise CheckpointError(f"{path}: cannot read ({error})") from error

    def bad(problem):
        return CheckpointError(f"{path}: not a readable safetensors file ({problem})")

    if len(data) < 8:
        raise bad(f"only {len(data)} bytes")
    header_size = int.from_bytes(data[:8], "little")
    if header_size > min(_MAX_SAFETENSORS_HEADER, len(data) - 8):
        raise bad(f"header size {header_size} does not fit a file of {len(data)} bytes; truncated or not safetensors")
    try:
        header = json.loads(data[8 : 8 + header_size])
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise bad(f"header is not JSON: {error}") from error
    if not isinstance(header, dict):
        raise bad("header is not a JSON object")
    buffer = memoryview(data)[8 + header_size :]
    tensors = {}
    for name, record in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = _SAFETENSORS_DTYPES[record["dtype"]]
            dtype = _bfloat16() if dtype == "bfloat16" else np.dtype(dtype)
            shape = tuple(int(n) for n in record["shape"])
            begin, end = (int(n) for n in record["data_offsets"])
        except (KeyError, TypeError, ValueError) as error:
            raise bad(f"tensor {name!r} has a malformed or unsupported record {record!r}") from error
        if end > len(buffer):
            raise bad(f"tensor {name!r} ends at byte {end} of a {len(buffer)}-byte data section; the file is truncated")
        if min(shape, default=0) < 0 or not 0 <= begin <= end or end - begin != int(np.prod(shape)) * dtype.itemsize:
            raise bad(f"tensor {name!r}: {end - begin} bytes do not hold shape {shape} of {record['dtype']}")
        tensors[name] = np.frombuffer(buffer[begin:end], dtype=dtype).reshape(shape)
    return tensors


# torch storage classes a checkpoint may name, and their element types.
_TORCH_STORAGES = {
    "FloatStorage": np.float32, "HalfStorage": np.float16, "DoubleStorage": np.float64,
    "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16,
    "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
    "BFloat16Storage": "bfloat16",
}


def _rebuild_tensor(storage, offset, size, stride, *unused):
    """torch's ``_rebuild_tensor_v2``: a strided view of a storage, checked to lie inside it, copied."""
    if not isinstance(storage, np.ndarray):
        raise CheckpointError(f"tensor record without a storage ({type(storage).__name__})")
    size, stride = tuple(size), tuple(stride)
    numbers = (offset, *size, *stride)
    if len(size) != len(stride) or not all(type(n) is int and n >= 0 for n in numbers):
        raise CheckpointError(f"malformed tensor record: offset {offset!r}, size {size!r}, stride {stride!r}")
    if 0 in size:
        return np.zeros(size, storage.dtype)
    last = offset + sum((n - 1) * s for n, s in zip(size, stride))
    if last >= storage.size:
        raise CheckpointError(f"tensor record reaches element {last} of a storage of {storage.size} elements")
    itemsize = storage.dtype.itemsize
    return np.lib.stride_tricks.as_strided(
        storage[offset:], shape=size, strides=tuple(s * itemsize for s in stride)
    ).copy()


def _rebuild_parameter(tensor, *unused):
    return tensor


class _TrainingState:
    """Stands in for a training-time class (e.g. Lightning's ``ModelCheckpoint``) named in a checkpoint.

    Real SD 1.x ``.ckpt`` files key their ``callbacks`` entry by such a class.
    Nothing is imported or run: the stand-in only absorbs constructor arguments and state.
    """

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass


# Modules whose classes are training metadata, never tensors: unpickled as ``_TrainingState``.
_TRAINING_MODULES = ("pytorch_lightning.callbacks.", "lightning.pytorch.callbacks.")


def _numpy_scalar(dtype, data):
    """numpy's ``multiarray.scalar`` for plain numeric types (e.g. a callback's ``best_model_score``)."""
    if not isinstance(dtype, np.dtype) or dtype.hasobject or not isinstance(data, bytes) or len(data) != dtype.itemsize:
        raise CheckpointError(f"refusing numpy scalar record of dtype {dtype!r}")
    return np.frombuffer(data, dtype=dtype)[0]


def _latin1_encode(text, encoding="latin1"):
    """``_codecs.encode`` as protocol-2 pickles use it: the bytes of a latin-1 string."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise CheckpointError(f"refusing _codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickles torch's ``data.pkl`` allowing only tensor records, plain containers and numbers.

    Every global a pickle names is looked up here and nowhere else; anything not
    listed (``os.system``, ``builtins.eval``, ...) is refused before it can run.
    """

    _ALLOWED = {
        ("collections", "OrderedDict"): dict,
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
        ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
        ("numpy", "dtype"): np.dtype,
        ("numpy.core.multiarray", "scalar"): _numpy_scalar,
        ("numpy._core.multiarray", "scalar"): _numpy_scalar,
        ("_codecs", "encode"): _latin1_encode,
    }

    def __init__(self, file, archive, prefix):
        super().__init__(file)
        self.archive, self.prefix = archive, prefix
        self.storages = {}

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return self._ALLOWED[(module, name)]
        if module == "torch" and name in _TORCH_STORAGES:
            dtype = _TORCH_STORAGES[name]
            return _bfloat16() if dtype == "bfloat16" else np.dtype(dtype)
        if module.startswith(_TRAINING_MODULES):
            return _TrainingState
        raise CheckpointError(
            f"refusing to unpickle {module}.{name}: a checkpoint may hold only tensors and plain "
            "containers (convert it to .safetensors if it is trusted)"
        )

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise CheckpointError(f"unknown persistent record {pid!r:.80}")
        _kind, dtype, key, _location, _numel = pid
        if not isinstance(dtype, np.dtype) or dtype.hasobject:
            raise CheckpointError(f"storage record {key!r} has no tensor element type ({dtype!r:.80})")
        if (key, dtype) not in self.storages:
            raw = self.archive.read(f"{self.prefix}data/{key}")
            self.storages[key, dtype] = np.frombuffer(raw, dtype=dtype, count=len(raw) // dtype.itemsize)
        return self.storages[key, dtype]


def read_ckpt(path):
    """The tensors of a PyTorch zip checkpoint (``.ckpt``, ``.bin``, ``.pt``), without torch.

    A top-level ``state_dict`` entry is unwrapped. Non-tensor entries are dropped.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            pickles = [name for name in archive.namelist() if name.endswith("data.pkl")]
            if len(pickles) != 1:
                raise CheckpointError("not a PyTorch zip checkpoint (no single data.pkl inside)")
            prefix = pickles[0][: -len("data.pkl")]
            with archive.open(pickles[0]) as file:
                obj = _RestrictedUnpickler(file, archive, prefix).load()
    except CheckpointError as error:
        raise CheckpointError(f"{path}: {error}") from None
    except zipfile.BadZipFile as error:
        raise CheckpointError(
            f"{path}: not a PyTorch zip checkpoint ({error}): a truncated download, or a legacy "
            "(torch < 1.6) file, which cannot be read safely"
        ) from error
    except Exception as error:  # any other failure of the archive or the pickle stream
        raise CheckpointError(f"{path}: corrupt PyTorch checkpoint ({type(error).__name__}: {error})") from error
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict of tensors, found {type(obj).__name__}")
    return {key: value for key, value in obj.items() if isinstance(value, np.ndarray)}


def read_checkpoint(path):
    """Tensors of one file, by its suffix: ``.safetensors`` or a PyTorch zip (``.ckpt``, ``.bin``, ``.pt``, ``.pth``)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    if path.suffix in (".ckpt", ".bin", ".pt", ".pth"):
        return read_ckpt(path)
    raise CheckpointError(f"{path}: unknown checkpoint format {path.suffix!r} (use .safetensors or .ckpt)")


# Weights files of a component folder, by the stem of their safetensors name:
# transformers names its PyTorch pickles ``pytorch_model.bin``, diffusers keeps the stem.
_BIN_STEMS = {"model": "pytorch_model"}


def _component_files(stem, suffix, variant):
    """(single file name, shard index name) as transformers / diffusers write them.

    The variant goes before the suffix of a single file (``model.fp16.safetensors``)
    and before ``.json`` of an index (``model.safetensors.index.fp16.json``).
    """
    if variant:
        return f"{stem}.{variant}.{suffix}", f"{stem}.{suffix}.index.{variant}.json"
    return f"{stem}.{suffix}", f"{stem}.{suffix}.index.json"


def read_component(folder, stem, variant=None):
    """The tensors of one diffusers component folder (``stem`` is e.g. ``diffusion_pytorch_model``).

    Takes ``stem.safetensors``, else ``stem.fp16.safetensors`` (or only the given
    ``variant``), single or sharded with an index, else the same as PyTorch ``.bin``.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no such component folder")
    variants = [variant] if variant else [None, "fp16"]
    for suffix, file_stem in (("safetensors", stem), ("bin", _BIN_STEMS.get(stem, stem))):
        for v in variants:
            name, index_name = _component_files(file_stem, suffix, v)
            if (folder / name).is_file():
                return read_checkpoint(folder / name)
            index = folder / index_name
            if index.is_file():
                try:
                    shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
                except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as error:
                    raise CheckpointError(f"{index}: not a shard index with a weight_map ({error!r})") from error
                tensors = {}
                for shard in shards:
                    tensors.update(read_checkpoint(folder / shard))
                return tensors
    wanted = f"{stem}.{variant}" if variant else f"{stem}[.fp16]"
    raise CheckpointError(f"{folder}: no {wanted}.safetensors (single or sharded) or .bin weights found")


# ----------------------------------------------------------------------------
# Keras variables <-> checkpoint keys
# ----------------------------------------------------------------------------

_KERAS_TO_TORCH_NAME = {"kernel": "weight", "gamma": "weight", "embeddings": "weight", "beta": "bias", "bias": "bias"}


def checkpoint_key(variable):
    """The checkpoint key of a Keras variable: its path, dotted, with torch's parameter name."""
    *layers, name = variable.path.split("/")
    return ".".join(layers + [_KERAS_TO_TORCH_NAME[name]])


def to_keras_layout(tensor, variable):
    """A checkpoint tensor in the variable's layout: conv OIHW -> HWIO, linear (out, in) -> (in, out)."""
    if variable.path.endswith("/kernel"):
        if len(variable.shape) == 4:
            return np.transpose(tensor, (2, 3, 1, 0)) if tensor.ndim == 4 else tensor
        if len(variable.shape) == 2 and tensor.ndim == 2:
            return tensor.T
    return tensor


def to_checkpoint_layout(value, variable):
    """The inverse of ``to_keras_layout``."""
    if variable.path.endswith("/kernel"):
        if value.ndim == 4:
            return np.transpose(value, (3, 2, 0, 1))
        if value.ndim == 2:
            return value.T
    return value


def checkpoint_shape(variable):
    """The shape a variable has in a checkpoint."""
    shape = tuple(variable.shape)
    if variable.path.endswith("/kernel") and len(shape) == 4:
        return shape[3], shape[2], shape[0], shape[1]
    if variable.path.endswith("/kernel") and len(shape) == 2:
        return shape[::-1]
    return shape


def match_weights(models, tensors):
    """The (variable, value) assignments that load ``tensors`` (diffusers keys) into ``models``.

    Every missing, unexpected and mis-shaped tensor is reported in one
    ``CheckpointError``; nothing is assigned here.
    """
    assignments, missing, misshaped = [], [], []
    used = set()
    for model in models:
        for variable in model.weights:
            key = checkpoint_key(variable)
            if key not in tensors:
                missing.append(key)
                continue
            used.add(key)
            value = to_keras_layout(tensors[key], variable)
            if tuple(value.shape) != tuple(variable.shape):
                misshaped.append(f"{key}: checkpoint {tuple(tensors[key].shape)}, model needs {checkpoint_shape(variable)}")
                continue
            assignments.append((variable, value))
    unexpected = sorted(set(tensors) - used)
    if missing or unexpected or misshaped:
        report = [f"{len(missing)} missing, {len(unexpected)} unexpected, {len(misshaped)} mis-shaped tensors"]
        for title, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
            report += [f"  {title}: {key}" for key in keys]
        raise CheckpointError("\n".join(report))
    return assignments


def release_pages(array):
    """Drops the pages of the memory-mapped file behind ``array`` (if any) from this process's memory.

    They stay in the page cache and are read again if touched, so this is
    always safe; it keeps a loaded checkpoint from being held in memory twice,
    as file pages and as the variables filled from them.
    """
    while isinstance(array, np.ndarray):
        array = array.base
    if isinstance(array, memoryview):
        array = array.obj
    if isinstance(array, mmap.mmap) and hasattr(mmap, "MADV_DONTNEED"):
        array.madvise(mmap.MADV_DONTNEED)


def assign_weights(assignments):
    """Assigns the values of ``match_weights``, converted to each variable's dtype."""
    for variable, value in assignments:
        variable.assign(np.asarray(value, dtype=np.float32).astype(variable.dtype))
        release_pages(value)


def load_weights(models, tensors):
    """Assigns every variable of ``models`` from ``tensors`` (diffusers keys), all or nothing.

    Every missing, unexpected and mis-shaped tensor is reported in one
    ``CheckpointError``; no variable is touched unless all of them fit.
    """
    assign_weights(match_weights(models, tensors))


def model_tensors(models):
    """All variables of ``models`` as a {checkpoint key: numpy array} dict in checkpoint layout."""
    return {
        checkpoint_key(v): np.ascontiguousarray(to_checkpoint_layout(np.asarray(v.numpy(), np.float32), v))
        for model in models
        for v in model.weights
    }


# ----------------------------------------------------------------------------
# Key renaming for diffusers folders and original single files
# ----------------------------------------------------------------------------

TEXT_MODEL_PREFIX = "text_model."
# Buffers some checkpoints store; they are recomputed, not loaded.
IGNORED_TEXT_KEYS = ("embeddings.position_ids",)
# Pre-0.14 diffusers VAE attention names.
_OLD_VAE_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def text_encoder_tensors(tensors):
    """transformers' CLIPTextModel keys, with or without ``text_model.``, as our keys."""
    out = {}
    for key, value in tensors.items():
        key = key.removeprefix(TEXT_MODEL_PREFIX)
        if key not in IGNORED_TEXT_KEYS:
            out[key] = value
    return out


def vae_tensors(tensors):
    """Renames pre-0.14 diffusers VAE attention keys (query/key/value/proj_attn) to the current ones."""
    pattern = re.compile(r"(mid_block\.attentions\.0\.)(query|key|value|proj_attn)\.")
    return {pattern.sub(lambda m: m[1] + _OLD_VAE_ATTENTION[m[2]] + ".", key): value for key, value in tensors.items()}


ORIGINAL_UNET_PREFIX = "model.diffusion_model."
ORIGINAL_VAE_PREFIX = "first_stage_model."
ORIGINAL_CLIP_PREFIX = "cond_stage_model.transformer."
ORIGINAL_OPENCLIP_PREFIX = "cond_stage_model.model."
ORIGINAL_EMA_PREFIX = "model_ema."

_RESNET_RENAMES = {
    "in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut",
}


def _rename_resnet(rest):
    for old, new in _RESNET_RENAMES.items():
        if rest.startswith(old + "."):
            return new + rest[len(old):]
    return rest


def convert_original_unet(tensors, config):
    """CompVis ``model.diffusion_model.*`` keys -> diffusers UNet keys, by the UNet's layout rules."""
    per_level = config.layers_per_block + 1  # resnets (+ attentions) and one down/upsampler
    out = {}
    for key, value in tensors.items():
        if key.startswith("time_embed."):
            new = key.replace("time_embed.0.", "time_embedding.linear_1.").replace("time_embed.2.", "time_embedding.linear_2.")
        elif key.startswith("input_blocks.0.0."):
            new = "conv_in." + key[len("input_blocks.0.0."):]
        elif key.startswith("out.0."):
            new = "conv_norm_out." + key[len("out.0."):]
        elif key.startswith("out.2."):
            new = "conv_out." + key[len("out.2."):]
        elif m := re.match(r"input_blocks\.(\d+)\.(\d)\.(.*)", key):
            block, layer = divmod(int(m[1]) - 1, per_level)
            if layer == config.layers_per_block:  # the downsampler: input_blocks.N.0.op
                new = f"down_blocks.{block}.downsamplers.0.conv." + m[3].removeprefix("op.")
            elif m[2] == "0":
                new = f"down_blocks.{block}.resnets.{layer}." + _rename_resnet(m[3])
            else:
                new = f"down_blocks.{block}.attentions.{layer}." + m[3]
        elif m := re.match(r"middle_block\.(\d)\.(.*)", key):
            new = {"0": "mid_block.resnets.0.", "1": "mid_block.attentions.0.", "2": "mid_block.resnets.1."}[m[1]]
            new += m[2] if m[1] == "1" else _rename_resnet(m[2])
        elif m := re.match(r"output_blocks\.(\d+)\.(\d)\.(.*)", key):
            block, layer = divmod(int(m[1]), per_level)
            if m[2] == "0":
                new = f"up_blocks.{block}.resnets.{layer}." + _rename_resnet(m[3])
            elif m[3].startswith("conv."):  # the upsampler: output_blocks.N.{1,2}.conv
                new = f"up_blocks.{block}.upsamplers.0." + m[3]
            else:
                new = f"up_blocks.{block}.attentions.{layer}." + m[3]
        else:
            new = key  # reported as unexpected by load_weights
        out[new] = value
    return out


_VAE_RENAMES = [
    (r"^(encoder|decoder)\.norm_out\.", r"\1.conv_norm_out."),
    (r"^(encoder|decoder)\.mid\.block_1\.", r"\1.mid_block.resnets.0."),
    (r"^(encoder|decoder)\.mid\.block_2\.", r"\1.mid_block.resnets.1."),
    (r"^(encoder|decoder)\.mid\.attn_1\.norm\.", r"\1.mid_block.attentions.0.group_norm."),
    (r"^(encoder|decoder)\.mid\.attn_1\.(q|k|v)\.", r"\1.mid_block.attentions.0.to_\2."),
    (r"^(encoder|decoder)\.mid\.attn_1\.proj_out\.", r"\1.mid_block.attentions.0.to_out.0."),
    (r"^encoder\.down\.(\d+)\.block\.(\d+)\.", r"encoder.down_blocks.\1.resnets.\2."),
    (r"^encoder\.down\.(\d+)\.downsample\.", r"encoder.down_blocks.\1.downsamplers.0."),
    (r"\.nin_shortcut\.", ".conv_shortcut."),
]


def convert_original_vae(tensors, config):
    """CompVis ``first_stage_model.*`` keys -> diffusers AutoencoderKL keys.

    The decoder's ``up.i`` counts from the lowest resolution, diffusers' ``up_blocks.i`` from the
    highest; the attention's 1x1 convolutions become linear weights.
    """
    levels = len(config.block_out_channels)
    out = {}
    for key, value in tensors.items():
        for pattern, replacement in _VAE_RENAMES:
            key = re.sub(pattern, replacement, key)
        if m := re.match(r"decoder\.up\.(\d+)\.(block|upsample)\.(.*)", key):
            kind = "resnets." if m[2] == "block" else "upsamplers.0."
            key = f"decoder.up_blocks.{levels - 1 - int(m[1])}.{kind}{m[3]}"
        if ".mid_block.attentions.0.to_" in key and value.ndim == 4:
            value = value[:, :, 0, 0]
        out[key] = value
    return out


_OPENCLIP_RENAMES = [
    (r"^token_embedding\.", "embeddings.token_embedding."),
    (r"^positional_embedding$", "embeddings.position_embedding.weight"),
    (r"^ln_final\.", "final_layer_norm."),
    (r"^transformer\.resblocks\.(\d+)\.ln_1\.", r"encoder.layers.\1.layer_norm1."),
    (r"^transformer\.resblocks\.(\d+)\.ln_2\.", r"encoder.layers.\1.layer_norm2."),
    (r"^transformer\.resblocks\.(\d+)\.attn\.out_proj\.", r"encoder.layers.\1.self_attn.out_proj."),
    (r"^transformer\.resblocks\.(\d+)\.mlp\.c_fc\.", r"encoder.layers.\1.mlp.fc1."),
    (r"^transformer\.resblocks\.(\d+)\.mlp\.c_proj\.", r"encoder.layers.\1.mlp.fc2."),
]
# OpenCLIP tensors SD does not use: the image-text projection and temperature.
OPENCLIP_UNUSED = ("text_projection", "logit_scale")


def convert_openclip(tensors, num_layers):
    """OpenCLIP ``cond_stage_model.model.*`` keys -> our CLIP keys; the fused in_proj split into q/k/v.

    Layers from ``num_layers`` on are dropped: SD 2.x uses the penultimate layer's output.
    """
    out = {}
    for key, value in tensors.items():
        if key in OPENCLIP_UNUSED:
            continue
        m = re.match(r"transformer\.resblocks\.(\d+)\.", key)
        if m and int(m[1]) >= num_layers:
            continue
        if m := re.match(r"transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)$", key):
            for name, part in zip(("q_proj", "k_proj", "v_proj"), np.split(value, 3, axis=0)):
                out[f"encoder.layers.{m[1]}.self_attn.{name}.{m[2]}"] = part
            continue
        for pattern, replacement in _OPENCLIP_RENAMES:
            key = re.sub(pattern, replacement, key)
        out[key] = value
    return out


def split_original(tensors, use_ema=False):
    """An original single file's tensors, grouped by network: {"unet", "vae", "clip" or "openclip"}.

    With ``use_ema`` the UNet weights come from ``model_ema.*`` where the file
    has them; the default, as in diffusers' single-file loader, is the non-EMA
    weights (files named ``*-emaonly`` hold the EMA weights there). Keys of no
    network (optimizer state, ``alphas_cumprod``, ...) are dropped.
    """
    groups = {"unet": {}, "vae": {}, "clip": {}, "openclip": {}}
    prefixes = {ORIGINAL_UNET_PREFIX: "unet", ORIGINAL_VAE_PREFIX: "vae",
                ORIGINAL_CLIP_PREFIX: "clip", ORIGINAL_OPENCLIP_PREFIX: "openclip"}
    for key, value in tensors.items():
        for prefix, group in prefixes.items():
            if key.startswith(prefix):
                groups[group][key[len(prefix):]] = value
    if use_ema:
        # model_ema keys are the UNet keys with the dots removed after "diffusion_model".
        ema = {key[len(ORIGINAL_EMA_PREFIX):]: v for key, v in tensors.items() if key.startswith(ORIGINAL_EMA_PREFIX + "diffusion_model")}
        if ema:
            by_flat_name = {k.replace(".", ""): k for k in groups["unet"]}
            for flat, value in ema.items():
                name = by_flat_name.get(flat[len("diffusion_model"):])
                if name is not None:
                    groups["unet"][name] = value
    if not groups["unet"] or not groups["vae"] or not (groups["clip"] or groups["openclip"]):
        found = sorted({key.split(".")[0] for key in tensors})[:10]
        raise CheckpointError(
            "not an original Stable Diffusion checkpoint: expected model.diffusion_model.*, first_stage_model.* "
            f"and cond_stage_model.* keys, found top-level names {found}"
        )
    return groups
