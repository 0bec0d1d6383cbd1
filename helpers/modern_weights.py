"""Qwen3 and Llama checkpoints from Hugging Face in our ``ModernModel`` (Part 10).

Their files keep every tensor in the shape ``ModernModel`` uses (``nn.Linear`` weights, queries and
keys in the "rotate half" layout), so loading is a renaming: ``TOP_TABLE`` / ``BLOCK_TABLE`` below
state it. The safetensors files are read by ``helpers.weights``' checked reader, one tensor at a
time, into a model built on the meta device.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from helpers.modern import ModernConfig, ModernModel, RopeScaling
from helpers.weight_files import Tensors, WeightsError, assign_weights, check_shape, local_files

__all__ = ["BLOCK_TABLE", "LLAMA_NAMES", "QWEN3_NAMES", "TOP_TABLE", "hf_names", "load_llama", "load_qwen3"]

QWEN3_NAMES = {"qwen3-0.6b": "Qwen/Qwen3-0.6B"}
LLAMA_NAMES = {"llama3.2-1b": "meta-llama/Llama-3.2-1B"}  # gated: accept Meta's licence on the hub first
"""Short names for the hub repositories of ``MODERN_CONFIGS``' presets; any other repository id works too."""

# (Hugging Face name, our name); every tensor is taken as it is
TOP_TABLE = [
    ("model.embed_tokens.weight", "tok_emb.weight"),
    ("model.norm.weight", "final_norm.weight"),
]
BLOCK_TABLE = [  # in block i: "model.layers.{i}." + Hugging Face name, "blocks.{i}." + ours
    ("input_layernorm.weight", "norm1.weight"),
    ("self_attn.q_proj.weight", "att.W_query.weight"),
    ("self_attn.k_proj.weight", "att.W_key.weight"),
    ("self_attn.v_proj.weight", "att.W_value.weight"),
    ("self_attn.q_norm.weight", "att.q_norm.weight"),  # QK-norm (Qwen3) only
    ("self_attn.k_norm.weight", "att.k_norm.weight"),  # QK-norm (Qwen3) only
    ("self_attn.o_proj.weight", "att.out_proj.weight"),
    ("post_attention_layernorm.weight", "norm2.weight"),
    ("mlp.gate_proj.weight", "ff.gate_proj.weight"),
    ("mlp.up_proj.weight", "ff.up_proj.weight"),
    ("mlp.down_proj.weight", "ff.down_proj.weight"),
]
HEAD_ROW = ("lm_head.weight", "out_head.weight")  # only in files whose head is not tied
_QK_NORM_ROWS = {"self_attn.q_norm.weight", "self_attn.k_norm.weight"}
_BUFFERS = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")  # some older conversions carry it
_REPO_ID = re.compile(r"[\w.-]+/[\w.-]+")


def hf_names(cfg: ModernConfig) -> dict[str, str]:
    """Hugging Face name -> our name, for every tensor of a model of size ``cfg``."""
    table = dict(TOP_TABLE)
    for layer in range(cfg.n_layers):
        for hf, ours in BLOCK_TABLE:
            if cfg.qk_norm or hf not in _QK_NORM_ROWS:
                table[f"model.layers.{layer}.{hf}"] = f"blocks.{layer}.{ours}"
    if not cfg.tie_weights:
        table[HEAD_ROW[0]] = HEAD_ROW[1]
    return table


@dataclass(frozen=True)
class _Family:
    """What differs between the two loaders."""

    name: str
    loader: str
    model_type: str
    qk_norm: bool
    hub_names: dict[str, str]


QWEN3 = _Family("Qwen3", "load_qwen3", "qwen3", qk_norm=True, hub_names=QWEN3_NAMES)
LLAMA = _Family("Llama", "load_llama", "llama", qk_norm=False, hub_names=LLAMA_NAMES)
_LOADER_FOR = {"qwen3": "load_qwen3", "llama": "load_llama"}


# ---------------------------------------------------------------------------------------------
# finding the files


def _download(repo: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(snapshot_download(repo, allow_patterns=["config.json", "*.safetensors",
                                                            "model.safetensors.index.json"]))
    except GatedRepoError as error:
        raise WeightsError(f"{repo} is gated: accept its licence on https://huggingface.co/{repo}, then log in "
                           "(hf auth login, or set HF_TOKEN) and try again") from error
    except LocalEntryNotFoundError as error:
        raise WeightsError(f"{repo} is not in the Hugging Face cache and cannot be downloaded (this machine is "
                           "offline or HF_HUB_OFFLINE=1). Go online once so it is cached, or pass a local folder "
                           "with config.json and the .safetensors files") from error
    except RepositoryNotFoundError as error:
        raise WeightsError(f"there is no hub repository {repo} (or it is private); check the name") from error


def _find_files(name_or_path: str | os.PathLike, family: _Family) -> tuple[Path, list[Path]]:
    """The config.json and the safetensors files ``name_or_path`` stands for (downloading a hub name)."""
    key = os.fspath(name_or_path)
    path = Path(key).expanduser()
    if not path.exists():
        repo = family.hub_names.get(key, key)
        if not _REPO_ID.fullmatch(repo):
            raise WeightsError(f"{key!r} is neither a {family.name} name ({', '.join(family.hub_names)}), nor a hub "
                               "repository ('owner/name'), nor an existing file or folder")
        path = _download(repo)
    config_path, files = local_files(path)
    if config_path is None:
        raise WeightsError(f"{path} has no config.json beside its weights; {family.loader} needs the model's own "
                           "config.json (the sizes and rotary settings cannot be read off the tensors)")
    return config_path, files


# ---------------------------------------------------------------------------------------------
# the model's sizes

_HF_SIZES = {"vocab_size": "vocab_size", "max_position_embeddings": "context_length", "hidden_size": "emb_dim",
             "num_attention_heads": "n_heads", "num_hidden_layers": "n_layers",
             "intermediate_size": "hidden_dim"}  # config.json key -> ModernConfig field
_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def _read_rope(hf: dict, config_path: Path) -> tuple[float, RopeScaling | None]:
    """``rope_theta`` and the scaling: from ``rope_parameters`` (transformers 5) or ``rope_theta``, ``rope_scaling``."""
    if hf.get("rope_parameters") is not None:
        where, params = "rope_parameters", hf["rope_parameters"]
        theta = params.get("rope_theta", hf.get("rope_theta", 10000.0)) if isinstance(params, dict) else None
    else:
        where, params = "rope_scaling", hf.get("rope_scaling") or {}
        theta = hf.get("rope_theta", 10000.0)
    if not isinstance(params, dict):
        raise WeightsError(f"{config_path}: {where} must be a JSON object of rotary settings, got {params!r}")
    if any(isinstance(value, dict) for value in params.values()):  # one setting per kind of layer
        raise WeightsError(f"{config_path}: {where} gives different rotary settings per kind of layer "
                           f"({', '.join(params)}); ModernModel rotates every layer alike")
    if isinstance(theta, int) and not isinstance(theta, bool):  # Qwen3's config.json writes 1000000
        theta = float(theta)
    rope_type = params.get("rope_type", params.get("type", "default"))
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise WeightsError(f"{config_path}: {where}.partial_rotary_factor {params['partial_rotary_factor']} "
                           "rotates part of each head; ModernModel rotates all of it")
    if rope_type == "default":
        return theta, None
    if rope_type != "llama3":
        raise WeightsError(f"{config_path}: {where}.rope_type {rope_type!r} is not a rotary scaling ModernModel "
                           "computes (default, llama3)")
    missing = [key for key in _LLAMA3_KEYS if key not in params]
    if missing:
        raise WeightsError(f"{config_path}: {where} of type llama3 lacks {', '.join(missing)}")
    try:
        return theta, RopeScaling(factor=params["factor"], low_freq_factor=params["low_freq_factor"],
                                  high_freq_factor=params["high_freq_factor"],
                                  original_context_length=params["original_max_position_embeddings"])
    except (TypeError, ValueError) as error:
        raise WeightsError(f"{config_path}: {where} holds llama3 settings ModernModel cannot take: {error}") from error


def _read_config(config_path: Path, family: _Family) -> ModernConfig:
    """The ``ModernConfig`` a Hugging Face Qwen3 or Llama ``config.json`` states, refusing what the model lacks."""
    try:
        hf = json.loads(config_path.read_text())
    except (OSError, ValueError) as error:
        raise WeightsError(f"{config_path} cannot be read as JSON ({error}); restore the model's "
                           "config.json") from error
    if not isinstance(hf, dict):
        raise WeightsError(f"{config_path} is not a JSON object; restore the model's config.json")
    model_type = hf.get("model_type")
    if model_type != family.model_type:
        other = f"; load it with {_LOADER_FOR[model_type]}" if model_type in _LOADER_FOR else ""
        raise WeightsError(f"{config_path}: model_type {model_type!r} is not {family.model_type!r}, so "
                           f"{family.loader} cannot load it{other}")
    missing = [key for key in _HF_SIZES if key not in hf]
    if missing:
        raise WeightsError(f"{config_path} lacks {', '.join(missing)}; restore the model's own config.json")
    unsupported = [(key, hf.get(key)) for key, fine in (("hidden_act", "silu"), ("attention_bias", False),
                                                        ("mlp_bias", False), ("use_sliding_window", False))
                   if hf.get(key, fine) != fine]
    if unsupported:
        key, value = unsupported[0]
        raise WeightsError(f"{config_path}: {key} is {value!r}, which ModernModel does not implement")
    theta, scaling = _read_rope(hf, config_path)
    n_heads = hf["num_attention_heads"]
    try:
        return ModernConfig(**{ours: hf[key] for key, ours in _HF_SIZES.items()},
                            n_kv_heads=hf.get("num_key_value_heads") or n_heads,
                            head_dim=hf.get("head_dim") or hf["hidden_size"] // n_heads,
                            rope_theta=theta, rope_scaling=scaling, qk_norm=family.qk_norm,
                            tie_weights=bool(hf.get("tie_word_embeddings", False)),
                            norm_eps=hf.get("rms_norm_eps", 1e-6))
    except (TypeError, ValueError) as error:
        raise WeightsError(f"{config_path} states sizes ModernModel cannot take: {error}") from error


# ---------------------------------------------------------------------------------------------
# loading


def _stored_names(tensors: Tensors, cfg: ModernConfig, source: str) -> set[str]:
    """The names in the files that should become parameters; a tied file's head must equal its embedding."""
    stored = {name for name in tensors.names() if not _BUFFERS.fullmatch(name)}
    if cfg.tie_weights and HEAD_ROW[0] in stored:
        if "model.embed_tokens.weight" in stored and not torch.equal(tensors.get(HEAD_ROW[0]),
                                                                     tensors.get("model.embed_tokens.weight")):
            raise WeightsError(f"{source} holds an lm_head.weight that differs from model.embed_tokens.weight, but "
                               "its config says tie_word_embeddings; check that the config belongs to the weights")
        stored.discard(HEAD_ROW[0])
    return stored


def _build(tensors: Tensors, cfg: ModernConfig, source: str, device: torch.device,
           dtype: torch.dtype | None) -> ModernModel:
    """Every tensor through its row of the name table, checked by name and shape, into a ModernModel."""
    table = hf_names(cfg)
    stored = _stored_names(tensors, cfg, source)
    unexpected = sorted(stored - set(table))
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise WeightsError(f"{source} holds {unexpected[0]} (shape {tensors.shape(unexpected[0])}), which a model of "
                           f"this config ({cfg.n_layers} layers, qk_norm={cfg.qk_norm}, tie_weights={cfg.tie_weights}) "
                           f"does not have{more}; check that the config belongs to the weights")
    with torch.device("meta"):
        model = ModernModel(cfg)
    shapes = {name: list(param.shape) for name, param in model.named_parameters(remove_duplicate=False)}
    state: dict[str, torch.Tensor] = {}
    for hf_name, ours in table.items():
        if hf_name not in stored:
            raise WeightsError(f"{source} has no tensor {hf_name} (expected shape {shapes[ours]})")
        check_shape(source, hf_name, tensors.shape(hf_name), shapes[ours])
        state[ours] = tensors.get(hf_name).to(device=device, dtype=dtype)
    return assign_weights(model, state, source)


def _checked_device(loader: str, name_or_path: object, device: object, dtype: object) -> torch.device:
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(f"{loader}: name_or_path must be a name, a hub repository or a path, got "
                        f"{type(name_or_path).__name__}")
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"{loader}: dtype must be a floating-point torch.dtype (torch.float32, torch.bfloat16, ...) "
                         f"or None for the file's, got {dtype!r}")
    try:
        return torch.device(device) if device is not None else torch.device("cpu")
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"{loader}: device {device!r} is not a torch device (cpu, cuda, cuda:1, mps, ...)") from error


def _load(family: _Family, name_or_path: str | os.PathLike, device: torch.device | str | None,
          dtype: torch.dtype | None) -> ModernModel:
    device = _checked_device(family.loader, name_or_path, device, dtype)
    config_path, files = _find_files(name_or_path, family)
    cfg = _read_config(config_path, family)
    tensors = Tensors(files)
    source = str(files[0] if len(files) == 1 else files[0].parent)
    return _build(tensors, cfg, source, device, dtype)


def load_qwen3(name_or_path: str | os.PathLike, device: torch.device | str | None = None,
               dtype: torch.dtype | None = None) -> ModernModel:
    """Return a ``ModernModel`` (in eval mode) holding a Qwen3 checkpoint's weights.

    ``name_or_path`` is a name of ``QWEN3_NAMES``, a hub repository id (``Qwen/Qwen3-1.7B``; downloaded
    and cached by ``huggingface_hub``), or a folder in Hugging Face layout (``config.json`` with
    ``model.safetensors``, or shards with their ``model.safetensors.index.json``). Every tensor is
    checked by name and shape: a missing, misshapen or unexpected one raises ``WeightsError`` naming it.
    ``device`` defaults to the CPU, ``dtype`` to the file's (bfloat16 for the published checkpoints).
    """
    return _load(QWEN3, name_or_path, device, dtype)


def load_llama(name_or_path: str | os.PathLike, device: torch.device | str | None = None,
               dtype: torch.dtype | None = None) -> ModernModel:
    """Return a ``ModernModel`` (in eval mode) holding a Llama (2, 3, 3.1, 3.2) checkpoint's weights.

    As ``load_qwen3``, for ``model_type: llama`` (no QK-norm; Llama 3's ``llama3`` rotary scaling is
    read from ``rope_parameters`` or ``rope_scaling``). Meta's repositories are gated: accept the licence
    on the hub and log in before the first download.
    """
    return _load(LLAMA, name_or_path, device, dtype)
