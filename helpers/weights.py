"""OpenAI's GPT-2 weights in our ``GPTModel`` (Part 08), and our models in GPT-2's Hugging Face layout.

GPT-2's files name and shape tensors differently from the series (``c_attn`` holds query, key
and value side by side; its linear layers are ``Conv1D`` with transposed weights). One table,
``BLOCK_TABLE`` / ``TOP_TABLE`` below, states the correspondence; loading and saving both use it.
"""

from __future__ import annotations

import json
import os
import re
import struct
from pathlib import Path

import torch
from safetensors.torch import save_file

from helpers.model import GPTConfig, GPTModel
from helpers.runtime import write_atomically

__all__ = ["GPT2_NAMES", "WeightsError", "load_gpt2", "save_hf_gpt2"]

GPT2_NAMES = {
    "gpt2": "openai-community/gpt2",
    "gpt2-medium": "openai-community/gpt2-medium",
    "gpt2-large": "openai-community/gpt2-large",
    "gpt2-xl": "openai-community/gpt2-xl",
}
"""The official sizes, by name, and their Hugging Face hub repositories."""

# (GPT-2 name, our name or names, how the tensor changes on the way in)
# "t": Conv1D stores (in, out); nn.Linear stores (out, in). "split": q, k, v side by side.
TOP_TABLE = [
    ("wte.weight", "tok_emb.weight", None),
    ("wpe.weight", "pos_emb.weight", None),
    ("ln_f.weight", "final_norm.weight", None),
    ("ln_f.bias", "final_norm.bias", None),
]
BLOCK_TABLE = [
    ("ln_1.weight", "norm1.weight", None),
    ("ln_1.bias", "norm1.bias", None),
    ("attn.c_attn.weight", ("att.W_query.weight", "att.W_key.weight", "att.W_value.weight"), "split_t"),
    ("attn.c_attn.bias", ("att.W_query.bias", "att.W_key.bias", "att.W_value.bias"), "split"),
    ("attn.c_proj.weight", "att.out_proj.weight", "t"),
    ("attn.c_proj.bias", "att.out_proj.bias", None),
    ("ln_2.weight", "norm2.weight", None),
    ("ln_2.bias", "norm2.bias", None),
    ("mlp.c_fc.weight", "ff.layers.0.weight", "t"),
    ("mlp.c_fc.bias", "ff.layers.0.bias", None),
    ("mlp.c_proj.weight", "ff.layers.2.weight", "t"),
    ("mlp.c_proj.bias", "ff.layers.2.bias", None),
]
_BUFFERS = re.compile(r"h\.\d+\.attn\.(bias|masked_bias)")  # causal-mask buffers some files carry
_HEADS_BY_WIDTH = {768: 12, 1024: 16, 1280: 20, 1600: 25}


class WeightsError(ValueError):
    """Weights could not be found or do not fit; the message names the tensor or file."""


# ---------------------------------------------------------------------------------------------
# finding the files


def _download(name: str) -> tuple[Path, list[Path]]:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    repo = GPT2_NAMES[name]
    try:
        config = Path(hf_hub_download(repo, "config.json"))
        weights = Path(hf_hub_download(repo, "model.safetensors"))
    except LocalEntryNotFoundError as error:
        raise WeightsError(
            f"the {name} weights ({repo}) are not in the Hugging Face cache and cannot be downloaded "
            "(this machine is offline or HF_HUB_OFFLINE=1). Go online once so they are cached, or pass "
            "load_gpt2 a local folder with config.json and model.safetensors"
        ) from error
    return config, [weights]


def _local_files(path: Path) -> tuple[Path | None, list[Path]]:
    if path.is_file():
        if path.suffix != ".safetensors":
            raise WeightsError(f"{path} is not a .safetensors file; convert it (safetensors only, never pickles)")
        config = path.with_name("config.json")
        return (config if config.is_file() else None), [path]
    config = path / "config.json"
    index = path / "model.safetensors.index.json"
    if (path / "model.safetensors").is_file():
        files = [path / "model.safetensors"]
    elif index.is_file():
        shard_names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [path / shard for shard in shard_names]
    else:
        found = ", ".join(sorted(p.name for p in path.iterdir())) or "nothing"
        raise WeightsError(f"{path} holds no model.safetensors (it holds: {found})")
    return (config if config.is_file() else None), files


# ---------------------------------------------------------------------------------------------
# reading


_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


class _Tensors:
    """The tensors of one or more safetensors files, by normalised GPT-2 name, read one at a time.

    A safetensors file is an 8-byte header length, a JSON header (dtype, shape and byte range of
    every tensor) and the raw bytes. ``get`` reads one tensor's bytes straight into a fresh tensor,
    so loading holds one copy of the weights and no mapping of the file.
    """

    def __init__(self, files: list[Path]):
        self.where: dict[str, tuple[Path, int, dict]] = {}
        self.metadata: dict[str, str] = {}
        for file in files:
            try:
                size = file.stat().st_size
                with open(file, "rb") as handle:
                    header_length = struct.unpack("<Q", handle.read(8))[0]
                    if header_length > size - 8:
                        raise ValueError(f"the header claims {header_length} bytes but the file has {size}")
                    header = json.loads(handle.read(header_length))
            except (OSError, ValueError, struct.error) as error:
                raise WeightsError(f"{file} is truncated or not a safetensors file ({error})") from error
            self.metadata.update(header.pop("__metadata__", None) or {})
            data_start = 8 + header_length
            for key, info in header.items():
                if info["dtype"] not in _SAFETENSORS_DTYPES:
                    raise WeightsError(f"{file}: {key} has dtype {info['dtype']}, which this loader does not read")
                if data_start + info["data_offsets"][1] > size:
                    raise WeightsError(f"{file} is truncated: {key} ends past the end of the file")
                self.where[key.removeprefix("transformer.")] = (file, data_start, info)

    def names(self) -> set[str]:
        return set(self.where)

    def shape(self, name: str) -> list[int]:
        return list(self.where[name][2]["shape"])

    def get(self, name: str) -> torch.Tensor:
        file, data_start, info = self.where[name]
        start, end = info["data_offsets"]
        tensor = torch.empty(info["shape"], dtype=_SAFETENSORS_DTYPES[info["dtype"]])
        if end > start:
            with open(file, "rb") as handle:
                handle.seek(data_start + start)
                handle.readinto(memoryview(tensor.view(-1).view(torch.uint8).numpy()))
        return tensor


def _config_from(config_path: Path | None, tensors: _Tensors, drop_rate: float | None) -> GPTConfig:
    if config_path is not None:
        hf = json.loads(config_path.read_text())
        activation = hf.get("activation_function", "gelu_new")
        if activation not in {"gelu_new", "gelu_pytorch_tanh"}:
            raise WeightsError(f"{config_path}: activation_function {activation!r} is not GPT-2's tanh GELU")
        if hf.get("n_inner") not in (None, 4 * hf["n_embd"]):
            raise WeightsError(f"{config_path}: n_inner {hf['n_inner']} is not 4 x n_embd; GPTModel cannot hold it")
        sizes = {"vocab_size": hf["vocab_size"], "context_length": hf["n_positions"], "emb_dim": hf["n_embd"],
                 "n_heads": hf["n_head"], "n_layers": hf["n_layer"]}
        default_drop = hf.get("resid_pdrop", 0.1)
    else:  # infer what the shapes tell; the head count only from GPT-2's known widths
        for required in ("wte.weight", "wpe.weight"):
            if required not in tensors.names():
                raise WeightsError(f"no config.json beside the weights, and no {required} to infer sizes from")
        vocab_size, emb_dim = tensors.shape("wte.weight")
        if emb_dim not in _HEADS_BY_WIDTH:
            raise WeightsError(f"no config.json beside the weights, and width {emb_dim} is not a GPT-2 size, so the "
                               "number of heads is unknown; put the model's config.json beside the file")
        layers = {int(m.group(1)) for n in tensors.names() if (m := re.match(r"h\.(\d+)\.", n))}
        sizes = {"vocab_size": vocab_size, "context_length": tensors.shape("wpe.weight")[0], "emb_dim": emb_dim,
                 "n_heads": _HEADS_BY_WIDTH[emb_dim], "n_layers": len(layers)}
        default_drop = 0.1
    tied = "lm_head.weight" not in tensors.names()
    if not tied:  # an explicit head may still be a copy of the embedding
        tied = torch.equal(tensors.get("lm_head.weight"), tensors.get("wte.weight"))
    return GPTConfig(**sizes, drop_rate=default_drop if drop_rate is None else drop_rate, qkv_bias=True,
                     tie_weights=tied)


def _mapped_names(cfg: GPTConfig) -> dict[str, tuple[str | tuple[str, ...], str | None]]:
    """GPT-2 name -> (our name(s), transform) for every tensor of a model of size ``cfg``."""
    table = {hf: (ours, how) for hf, ours, how in TOP_TABLE}
    for layer in range(cfg.n_layers):
        for hf, ours, how in BLOCK_TABLE:
            names = tuple(f"blocks.{layer}.{n}" for n in ours) if isinstance(ours, tuple) else f"blocks.{layer}.{ours}"
            table[f"h.{layer}.{hf}"] = (names, how)
    if not cfg.tie_weights:
        table["lm_head.weight"] = ("out_head.weight", None)
    return table


def _expected_shape(model: GPTModel, ours: str | tuple[str, ...], how: str | None) -> list[int]:
    params = dict(model.named_parameters(remove_duplicate=False))
    if isinstance(ours, tuple):
        first = list(params[ours[0]].shape)
        return [first[1], 3 * first[0]] if how == "split_t" else [3 * first[0]]
    shape = list(params[ours].shape)
    return shape[::-1] if how == "t" else shape


def _convert(tensor: torch.Tensor, how: str | None) -> list[torch.Tensor]:
    """Our layout of a GPT-2 tensor (``how`` from the name table)."""
    if how == "t":
        return [tensor.t().contiguous()]
    if how == "split_t":
        return [part.t().contiguous() for part in tensor.chunk(3, dim=1)]
    if how == "split":
        return [part.clone() for part in tensor.chunk(3, dim=0)]  # own storage each, so they save separately
    return [tensor]


def _load_ours(tensors: _Tensors, source: str, device, dtype) -> GPTModel:
    """A file written by helpers.train.save_checkpoint or helpers.pretrain: our own names."""
    config = tensors.metadata.get("config")
    if not config or config == "null":
        raise WeightsError(f"{source} uses GPTModel's tensor names but records no config in its metadata")
    cfg = GPTConfig.from_dict(json.loads(config))
    with torch.device("meta"):
        model = GPTModel(cfg)
    state = {}
    expected = dict(model.named_parameters(remove_duplicate=False))
    for name in tensors.names():
        if name not in expected:
            raise WeightsError(f"{source} holds {name}, which GPTModel does not have")
        state[name] = tensors.get(name).to(device=device, dtype=dtype)
    if cfg.tie_weights and "tok_emb.weight" not in state and "out_head.weight" in state:
        state["tok_emb.weight"] = state["out_head.weight"]
    return _assign(model, state, source)


def _assign(model: GPTModel, state: dict[str, torch.Tensor], source: str) -> GPTModel:
    if model.cfg.tie_weights:
        state["out_head.weight"] = state.get("out_head.weight", state.get("tok_emb.weight"))
    for name, param in model.named_parameters(remove_duplicate=False):
        if name not in state:
            raise WeightsError(f"{source} has no tensor for {name} (shape {list(param.shape)})")
        if list(state[name].shape) != list(param.shape):
            raise WeightsError(f"{source}: {name} has shape {list(state[name].shape)}, the model needs "
                               f"{list(param.shape)}")
    model.load_state_dict(state, strict=True, assign=True)
    if model.cfg.tie_weights:
        model.out_head.weight = model.tok_emb.weight
    return model.eval()


def load_gpt2(name_or_path: str | os.PathLike, device: torch.device | str | None = None,
              dtype: torch.dtype | None = None, drop_rate: float | None = None) -> GPTModel:
    """Return a ``GPTModel`` (in eval mode) holding GPT-2 weights.

    ``name_or_path`` is one of ``GPT2_NAMES`` (downloaded from the Hugging Face hub, which caches
    and verifies), a folder in Hugging Face layout (``config.json`` + ``model.safetensors``), or a
    ``.safetensors`` file. Both the hub's GPT-2 names (``h.0.attn.c_attn.weight``) and
    ``GPT2LMHeadModel``'s (``transformer.`` prefix) load, as do files saved by this project.
    Tensors are read from the file one at a time into a model built on the meta device, so at
    most one full copy of the weights (plus one tensor in transit) is in memory. ``device`` defaults to the CPU,
    ``dtype`` to the file's; ``drop_rate`` overrides the config's dropout (for finetuning).
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    key = str(name_or_path)
    if key in GPT2_NAMES or key in GPT2_NAMES.values():
        name = key if key in GPT2_NAMES else next(n for n, repo in GPT2_NAMES.items() if repo == key)
        config_path, files = _download(name)
    else:
        path = Path(name_or_path).expanduser()
        if not path.exists():
            raise WeightsError(f"{key!r} is neither a GPT-2 name ({', '.join(GPT2_NAMES)}) nor an existing "
                               "file or folder")
        config_path, files = _local_files(path)
    tensors = _Tensors(files)
    source = str(files[0] if len(files) == 1 else files[0].parent)
    if tensors.names() & {"tok_emb.weight", "out_head.weight"}:  # GPTModel's own names (a tied file keeps one)
        return _load_ours(tensors, source, device, dtype)

    cfg = _config_from(config_path, tensors, drop_rate)
    table = _mapped_names(cfg)
    stored = {name for name in tensors.names() if not _BUFFERS.fullmatch(name)}
    if cfg.tie_weights:
        stored.discard("lm_head.weight")
    unexpected = sorted(stored - set(table))
    if unexpected:
        raise WeightsError(f"{source} holds {unexpected[0]} (shape {tensors.shape(unexpected[0])}), which a GPT-2 "
                           f"of {cfg.n_layers} layers does not have" + (f" (and {len(unexpected) - 1} more)"
                                                                       if len(unexpected) > 1 else ""))
    with torch.device("meta"):
        model = GPTModel(cfg)
    state: dict[str, torch.Tensor] = {}
    for hf_name, (ours, how) in table.items():
        expected = _expected_shape(model, ours, how)
        if hf_name not in stored:
            raise WeightsError(f"{source} has no tensor {hf_name} (expected shape {expected})")
        actual = tensors.shape(hf_name)
        if actual != expected:
            raise WeightsError(f"{source}: {hf_name} has shape {actual}, but a model with this config needs "
                               f"{expected}")
        converted = _convert(tensors.get(hf_name), how)
        names = ours if isinstance(ours, tuple) else (ours,)
        for our_name, tensor in zip(names, converted):
            state[our_name] = tensor.to(device=device, dtype=dtype or tensor.dtype)
    return _assign(model, state, source)


def _hf_config(cfg: GPTConfig) -> dict:
    special = min(50256, cfg.vocab_size - 1)
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "vocab_size": cfg.vocab_size, "n_positions": cfg.context_length, "n_ctx": cfg.context_length,
        "n_embd": cfg.emb_dim, "n_layer": cfg.n_layers, "n_head": cfg.n_heads, "n_inner": None,
        "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5, "initializer_range": 0.02,
        "resid_pdrop": cfg.drop_rate, "embd_pdrop": cfg.drop_rate, "attn_pdrop": cfg.drop_rate,
        "scale_attn_weights": True, "use_cache": True, "bos_token_id": special, "eos_token_id": special,
        "tie_word_embeddings": cfg.tie_weights, "torch_dtype": "float32",
    }


def save_hf_gpt2(model: GPTModel, directory: str | os.PathLike) -> Path:
    """Write ``model`` in GPT-2's Hugging Face layout (``config.json`` + ``model.safetensors``); return the folder.

    ``transformers.GPT2LMHeadModel.from_pretrained(directory)`` and ``load_gpt2(directory)`` both
    load it. A model without qkv bias gets zero biases (GPT-2 always has them), which computes the same.
    """
    from helpers.train import unwrap_model

    model = unwrap_model(model)
    if not isinstance(model, GPTModel):
        raise TypeError(f"save_hf_gpt2 needs a GPTModel, got {type(model).__name__}")
    cfg = model.cfg
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    params = dict(model.named_parameters(remove_duplicate=False))
    tensors: dict[str, torch.Tensor] = {}
    for hf_name, (ours, how) in _mapped_names(cfg).items():
        names = ours if isinstance(ours, tuple) else (ours,)
        parts = []
        for our_name in names:
            tensor = params.get(our_name)
            if tensor is None:  # qkv bias of a model built without it
                tensor = torch.zeros(cfg.emb_dim, dtype=params["tok_emb.weight"].dtype)
            parts.append(tensor.detach().to("cpu"))
        if how == "t":
            tensor = parts[0].t()
        elif how == "split_t":
            tensor = torch.cat([p.t() for p in parts], dim=1)
        elif how == "split":
            tensor = torch.cat(parts, dim=0)
        else:
            tensor = parts[0]
        prefix = "" if hf_name == "lm_head.weight" else "transformer."
        tensors[prefix + hf_name] = tensor.contiguous().clone()
    weights, config = directory / "model.safetensors", directory / "config.json"
    write_atomically(weights, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
    write_atomically(config, lambda tmp: tmp.write_text(json.dumps(_hf_config(cfg), indent=2)))
    return directory
