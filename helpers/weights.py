"""OpenAI's GPT-2 weights in our ``GPTModel`` (Part 08), and our models in GPT-2's Hugging Face layout.

GPT-2's files name and shape tensors differently from the series (``c_attn`` holds query, key
and value side by side; its linear layers are ``Conv1D`` with transposed weights). One table,
``TOP_TABLE`` / ``BLOCK_TABLE`` below, states the correspondence and, for every row, the
``Transform`` that turns the file's tensor into ours and back; loading and saving both read it.
Reading the files themselves (checked safetensors, shards) is ``helpers.weight_files``' job.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file

from helpers.model import GPTConfig, GPTModel
from helpers.runtime import unwrap_model, write_atomically
from helpers.weight_files import Tensors as _Tensors  # a module global, so a benchmark can swap the reader
from helpers.weight_files import WeightsError, assign_weights, check_shape, loads_json, local_files

__all__ = ["BLOCK_TABLE", "GPT2_NAMES", "TOP_TABLE", "Transform", "WeightsError", "load_gpt2", "save_hf_gpt2"]

GPT2_NAMES = {
    "gpt2": "openai-community/gpt2",
    "gpt2-medium": "openai-community/gpt2-medium",
    "gpt2-large": "openai-community/gpt2-large",
    "gpt2-xl": "openai-community/gpt2-xl",
}
"""The official sizes, by name, and their Hugging Face hub repositories."""


# ---------------------------------------------------------------------------------------------
# the name table


@dataclasses.dataclass(frozen=True)
class Transform:
    """How one GPT-2 tensor becomes our tensor(s) (``to_ours``) and back (``to_hf``).

    ``hf_shape`` gives the file's shape from the shapes of our tensors, so a file can be checked
    before any of its bytes are read.
    """

    description: str
    to_ours: Callable[[torch.Tensor], list[torch.Tensor]]
    to_hf: Callable[[list[torch.Tensor]], torch.Tensor]
    hf_shape: Callable[[list[list[int]]], list[int]]


# Conv1D stores a weight (in, out); nn.Linear stores (out, in). c_attn holds q, k and v side by side,
# along its output dimension: dim 1 of the Conv1D weight, dim 0 of the bias.
AS_IS = Transform("as is", lambda tensor: [tensor], lambda ours: ours[0], lambda shapes: shapes[0])
TRANSPOSE = Transform("transpose", lambda tensor: [tensor.t().contiguous()], lambda ours: ours[0].t(),
                      lambda shapes: shapes[0][::-1])
SPLIT = Transform("split in 3",
                  lambda tensor: [part.clone() for part in tensor.chunk(3, dim=0)],  # own storage each
                  lambda ours: torch.cat(ours, dim=0),
                  lambda shapes: [sum(shape[0] for shape in shapes)])
SPLIT_TRANSPOSE = Transform("split in 3, transpose each",
                            lambda tensor: [part.t().contiguous() for part in tensor.chunk(3, dim=1)],
                            lambda ours: torch.cat([part.t() for part in ours], dim=1),
                            lambda shapes: [shapes[0][1], sum(shape[0] for shape in shapes)])

# (GPT-2 name, our name or names, how the tensor changes on the way in)
TOP_TABLE = [
    ("wte.weight", "tok_emb.weight", AS_IS),
    ("wpe.weight", "pos_emb.weight", AS_IS),
    ("ln_f.weight", "final_norm.weight", AS_IS),
    ("ln_f.bias", "final_norm.bias", AS_IS),
]
BLOCK_TABLE = [  # in block i: "h.{i}." + GPT-2 name, "blocks.{i}." + ours
    ("ln_1.weight", "norm1.weight", AS_IS),
    ("ln_1.bias", "norm1.bias", AS_IS),
    ("attn.c_attn.weight", ("att.W_query.weight", "att.W_key.weight", "att.W_value.weight"), SPLIT_TRANSPOSE),
    ("attn.c_attn.bias", ("att.W_query.bias", "att.W_key.bias", "att.W_value.bias"), SPLIT),
    ("attn.c_proj.weight", "att.out_proj.weight", TRANSPOSE),
    ("attn.c_proj.bias", "att.out_proj.bias", AS_IS),
    ("ln_2.weight", "norm2.weight", AS_IS),
    ("ln_2.bias", "norm2.bias", AS_IS),
    ("mlp.c_fc.weight", "ff.layers.0.weight", TRANSPOSE),
    ("mlp.c_fc.bias", "ff.layers.0.bias", AS_IS),
    ("mlp.c_proj.weight", "ff.layers.2.weight", TRANSPOSE),
    ("mlp.c_proj.bias", "ff.layers.2.bias", AS_IS),
]
HEAD_ROW = ("lm_head.weight", "out_head.weight", AS_IS)  # only in files whose head is not tied
_BUFFERS = re.compile(r"h\.\d+\.attn\.(bias|masked_bias)")  # causal-mask buffers some files carry
_HEADS_BY_WIDTH = {768: 12, 1024: 16, 1280: 20, 1600: 25}


def _mapped_names(cfg: GPTConfig) -> dict[str, tuple[tuple[str, ...], Transform]]:
    """GPT-2 name -> (our names, transform) for every tensor of a model of size ``cfg``."""
    def row(ours: str | tuple[str, ...], prefix: str = "") -> tuple[str, ...]:
        return tuple(prefix + name for name in ((ours,) if isinstance(ours, str) else ours))

    table = {hf: (row(ours), how) for hf, ours, how in TOP_TABLE}
    for layer in range(cfg.n_layers):
        for hf, ours, how in BLOCK_TABLE:
            table[f"h.{layer}.{hf}"] = (row(ours, f"blocks.{layer}."), how)
    if not cfg.tie_weights:
        table[HEAD_ROW[0]] = (row(HEAD_ROW[1]), HEAD_ROW[2])
    return table


# ---------------------------------------------------------------------------------------------
# finding the files


GPT2_REVISIONS = {  # the hub commit of each repository's files, so a change on the hub cannot change ours
    "gpt2": "607a30d783dfa663caf39e06633721c8d4cfcd7e",
    "gpt2-medium": "6dcaa7a952f72f9298047fd5137cd6e4f05f41da",
    "gpt2-large": "32b71b12589c2f8d625668d2335a01cac3249519",
    "gpt2-xl": "15ea56dee5df4983c59b2538573817e1667135e2",
}


def _download(name: str) -> tuple[Path, list[Path]]:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    repo, revision = GPT2_NAMES[name], GPT2_REVISIONS[name]
    try:
        config = Path(hf_hub_download(repo, "config.json", revision=revision))
        weights = Path(hf_hub_download(repo, "model.safetensors", revision=revision))
    except LocalEntryNotFoundError as error:
        raise WeightsError(
            f"the {name} weights ({repo}) are not in the Hugging Face cache and cannot be downloaded "
            "(this machine is offline or HF_HUB_OFFLINE=1). Go online once so they are cached, or pass "
            "load_gpt2 a local folder with config.json and model.safetensors"
        ) from error
    return config, [weights]


def _find_files(name_or_path: str | os.PathLike) -> tuple[Path | None, list[Path]]:
    """The config.json (or None) and the safetensors files ``name_or_path`` stands for."""
    key = os.fspath(name_or_path)
    if key in GPT2_NAMES or key in GPT2_NAMES.values():
        return _download(key if key in GPT2_NAMES else next(n for n, repo in GPT2_NAMES.items() if repo == key))
    path = Path(key).expanduser()
    if not path.exists():
        raise WeightsError(f"{key!r} is neither a GPT-2 name ({', '.join(GPT2_NAMES)}) nor an existing file or folder")
    return local_files(path)


# ---------------------------------------------------------------------------------------------
# the model's sizes

_HF_SIZES = {"vocab_size": "vocab_size", "n_positions": "context_length", "n_embd": "emb_dim", "n_head": "n_heads",
             "n_layer": "n_layers"}  # config.json key -> GPTConfig field


def _read_hf_config(config_path: Path) -> tuple[dict, float]:
    """GPTConfig's sizes and the dropout rate that a Hugging Face GPT-2 ``config.json`` states."""
    try:
        hf = loads_json(config_path.read_text())
    except (OSError, ValueError) as error:
        raise WeightsError(f"{config_path} cannot be read as JSON ({error}); restore the model's "
                           "config.json") from error
    missing = [key for key in _HF_SIZES if not isinstance(hf, dict) or key not in hf]
    if missing:
        raise WeightsError(f"{config_path} lacks {', '.join(missing)}; a GPT-2 config.json states "
                           f"{', '.join(_HF_SIZES)}: restore the model's own config.json")
    _check_value_types(config_path, hf)
    activation = hf.get("activation_function", "gelu_new")
    if activation not in {"gelu_new", "gelu_pytorch_tanh"}:
        raise WeightsError(f"{config_path}: activation_function {activation!r} is not GPT-2's tanh GELU")
    if hf.get("n_inner") not in (None, 4 * hf["n_embd"]):
        raise WeightsError(f"{config_path}: n_inner {hf['n_inner']} is not 4 x n_embd; GPTModel cannot hold it")
    return {ours: hf[key] for key, ours in _HF_SIZES.items()}, hf.get("resid_pdrop", 0.1)


def _check_value_types(config_path: Path, hf: dict) -> None:
    """Refuse a config.json value of the wrong JSON type (``"0.1"`` for a rate, ``12.0`` for a size), naming the key."""
    def is_integer(value: object) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    expected = {key: ("an integer", is_integer) for key in _HF_SIZES}
    expected["n_inner"] = ("an integer or null", lambda value: value is None or is_integer(value))
    expected["resid_pdrop"] = ("a number", lambda value: is_integer(value) or isinstance(value, float))
    expected["activation_function"] = ("a string", lambda value: isinstance(value, str))
    for key, (kind, fits) in expected.items():
        if key in hf and not fits(hf[key]):
            raise WeightsError(f"{config_path}: {key} is {hf[key]!r} ({type(hf[key]).__name__}), not {kind}; "
                               "restore the model's own config.json")


def _infer_sizes(tensors: _Tensors) -> dict:
    """GPTConfig's sizes read off the tensors' shapes (the head count only from GPT-2's known widths)."""
    for required in ("wte.weight", "wpe.weight"):
        if required not in tensors.names():
            raise WeightsError(f"no config.json beside the weights, and no {required} to infer sizes from; put "
                               "the model's config.json beside the file")
    vocab_size, emb_dim = tensors.shape("wte.weight")
    if emb_dim not in _HEADS_BY_WIDTH:
        raise WeightsError(f"no config.json beside the weights, and width {emb_dim} is not a GPT-2 size, so the "
                           "number of heads is unknown; put the model's config.json beside the file")
    layers = {int(m.group(1)) for n in tensors.names() if (m := re.match(r"h\.(\d+)\.", n))}
    return {"vocab_size": vocab_size, "context_length": tensors.shape("wpe.weight")[0], "emb_dim": emb_dim,
            "n_heads": _HEADS_BY_WIDTH[emb_dim], "n_layers": len(layers)}


def _config_from(config_path: Path | None, tensors: _Tensors, drop_rate: float | None, source: str) -> GPTConfig:
    if config_path is not None:
        sizes, file_drop = _read_hf_config(config_path)
    else:
        sizes, file_drop = _infer_sizes(tensors), 0.1
    tied = "lm_head.weight" not in tensors.names()
    if not tied and "wte.weight" in tensors.names():  # an explicit head may still be a copy of the embedding
        tied = torch.equal(tensors.get("lm_head.weight"), tensors.get("wte.weight"))
    try:
        return GPTConfig(**sizes, drop_rate=file_drop if drop_rate is None else drop_rate, qkv_bias=True,
                         tie_weights=tied)
    except (TypeError, ValueError) as error:
        raise WeightsError(f"{config_path or source} states sizes GPTModel cannot take: {error}; restore the "
                           "model's own config.json") from error


# ---------------------------------------------------------------------------------------------
# loading


def _load_ours(tensors: _Tensors, source: str, device: torch.device, dtype: torch.dtype | None,
               drop_rate: float | None) -> GPTModel:
    """A file written by helpers.train.save_checkpoint or helpers.pretrain: our own names."""
    arch = tensors.metadata.get("arch") or "gpt2"
    if arch != "gpt2":  # e.g. Part 10's ModernModel, saved by python -m helpers.pretrain --arch modern
        raise WeightsError(f"{source} holds a {arch} model, not a GPT-2 (its metadata says arch={arch!r}), which "
                           "load_gpt2 cannot build; load it with helpers.checkpoint: model = "
                           "model_from_config(read_config(path), read_arch(path)); load_checkpoint(path, model)")
    try:
        saved = loads_json(tensors.metadata.get("config") or "null")
        if drop_rate is not None and isinstance(saved, dict):
            saved = {**saved, "drop_rate": drop_rate}
        cfg = GPTConfig.from_dict(saved) if saved else None
    except (TypeError, ValueError) as error:
        raise WeightsError(f"{source} records a model config GPTModel cannot take ({error}); load it with "
                           "helpers.checkpoint.load_checkpoint into a model you build") from error
    if cfg is None:
        raise WeightsError(f"{source} uses GPTModel's tensor names but records no config in its metadata; load it "
                           "with helpers.checkpoint.load_checkpoint into a model you build")
    if cfg.tie_weights and _holds_own_head(tensors):  # the tensors are the truth: e.g. a merged LoRA head
        cfg = dataclasses.replace(cfg, tie_weights=False)
    with torch.device("meta"):
        model = GPTModel(cfg)
    expected = dict(model.named_parameters(remove_duplicate=False))
    unknown = sorted(tensors.names() - set(expected))
    if unknown:  # what surgery leaves (see helpers.lora and helpers.classify)
        raise WeightsError(f"{source} holds {unknown[0]}, which GPTModel does not have (LoRA adapters or a class "
                           "head?); merge LoRA adapters with helpers.lora.merge_lora before saving, or load a "
                           "classifier with helpers.checkpoint.load_checkpoint into a model prepared the same way")
    state = {}
    for name in tensors.names():
        check_shape(source, name, tensors.shape(name), list(expected[name].shape))
        state[name] = tensors.get(name).to(device=device, dtype=dtype)
    if cfg.tie_weights and "tok_emb.weight" not in state and "out_head.weight" in state:
        state["tok_emb.weight"] = state["out_head.weight"]
    return assign_weights(model, state, source)


def _holds_own_head(tensors: _Tensors) -> bool:
    """Whether a file of our names holds an output head that differs from its token embedding."""
    both = {"tok_emb.weight", "out_head.weight"} <= tensors.names()
    return both and not torch.equal(tensors.get("tok_emb.weight"), tensors.get("out_head.weight"))


def _load_hf_names(tensors: _Tensors, cfg: GPTConfig, source: str, device: torch.device,
                   dtype: torch.dtype | None) -> GPTModel:
    """A file in GPT-2's names: every tensor through its row of the name table."""
    table = _mapped_names(cfg)
    stored = {name for name in tensors.names() if not _BUFFERS.fullmatch(name)}
    if cfg.tie_weights:
        stored.discard("lm_head.weight")
    unexpected = sorted(stored - set(table))
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise WeightsError(f"{source} holds {unexpected[0]} (shape {tensors.shape(unexpected[0])}), which a GPT-2 "
                           f"of {cfg.n_layers} layers does not have{more}; check that the config belongs to it")
    with torch.device("meta"):
        model = GPTModel(cfg)
    shapes = {name: list(param.shape) for name, param in model.named_parameters(remove_duplicate=False)}
    state: dict[str, torch.Tensor] = {}
    for hf_name, (ours, how) in table.items():
        expected = how.hf_shape([shapes[name] for name in ours])
        if hf_name not in stored:
            raise WeightsError(f"{source} has no tensor {hf_name} (expected shape {expected})")
        check_shape(source, hf_name, tensors.shape(hf_name), expected)
        for our_name, tensor in zip(ours, how.to_ours(tensors.get(hf_name)), strict=True):
            state[our_name] = tensor.to(device=device, dtype=dtype)
    return assign_weights(model, state, source)



def _checked_arguments(name_or_path: object, device: object, dtype: object,
                       drop_rate: object) -> torch.device:
    """load_gpt2's arguments, refused with the argument named; the device to load onto."""
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(f"load_gpt2: name_or_path must be a GPT-2 name or a path, got {type(name_or_path).__name__}")
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"load_gpt2: dtype must be a floating-point torch.dtype (torch.float32, torch.bfloat16, "
                         f"...) or None for the file's, got {dtype!r}")
    if drop_rate is not None and (isinstance(drop_rate, bool) or not isinstance(drop_rate, (int, float))
                                  or not 0.0 <= drop_rate < 1.0):
        raise ValueError(f"load_gpt2: drop_rate must be a number in [0, 1) or None for the config's, got {drop_rate!r}")
    try:
        return torch.device(device) if device is not None else torch.device("cpu")
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"load_gpt2: device {device!r} is not a torch device (cpu, cuda, cuda:1, mps, ...)") from error


def load_gpt2(name_or_path: str | os.PathLike, device: torch.device | str | None = None,
              dtype: torch.dtype | None = None, drop_rate: float | None = None) -> GPTModel:
    """Return a ``GPTModel`` (in eval mode) holding GPT-2 weights.

    ``name_or_path`` is one of ``GPT2_NAMES`` (downloaded from the Hugging Face hub, which caches
    and verifies), a folder in Hugging Face layout (``config.json`` + ``model.safetensors``, or shards
    with their ``model.safetensors.index.json``), or a ``.safetensors`` file. Both the hub's GPT-2 names
    (``h.0.attn.c_attn.weight``) and ``GPT2LMHeadModel``'s (``transformer.`` prefix) load, as do files
    saved by this project. Tensors are read from the file one at a time into a model built on the meta
    device, so at most one full copy of the weights (plus one tensor in transit) is in memory. ``device``
    defaults to the CPU, ``dtype`` to the file's; ``drop_rate`` overrides the config's dropout (for
    finetuning). A file that is damaged or does not fit its config raises ``WeightsError``.
    """
    device = _checked_arguments(name_or_path, device, dtype, drop_rate)
    config_path, files = _find_files(name_or_path)
    tensors = _Tensors(files)
    source = str(files[0] if len(files) == 1 else files[0].parent)
    if tensors.names() & {"pos_emb.weight", "tok_emb.weight", "out_head.weight"}:  # GPTModel's own names
        return _load_ours(tensors, source, device, dtype, drop_rate)
    cfg = _config_from(config_path, tensors, drop_rate, source)
    return _load_hf_names(tensors, cfg, source, device, dtype)


# ---------------------------------------------------------------------------------------------
# saving


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


def _check_plain_gpt(model: GPTModel, params: dict[str, torch.nn.Parameter]) -> None:
    """Refuse a model GPT-2's layout cannot hold: a class head, LoRA adapters, a head its config misstates."""
    classes = getattr(model, "num_classes", None)  # the mark helpers.classify.prepare_for_classification sets
    if classes is not None:
        raise WeightsError(f"save_hf_gpt2: this model is a classifier (its out_head has {classes} outputs, not one per "
                           "token), which GPT-2's layout cannot hold; save it with helpers.checkpoint.save_checkpoint "
                           "and load it with load_checkpoint into a model prepared the same way")
    with torch.device("meta"):
        plain = dict(GPTModel(model.cfg).named_parameters(remove_duplicate=False))
    extra = sorted(set(params) - set(plain))
    if extra:
        raise WeightsError(f"save_hf_gpt2: the model has {extra[0]}, which GPTModel has not (LoRA adapters or another "
                           "wrapped layer) and GPT-2's layout cannot store; call helpers.lora.merge_lora(model) first")
    if model.cfg.tie_weights and params["out_head.weight"] is not params["tok_emb.weight"]:
        raise WeightsError("save_hf_gpt2: the model's config says tie_weights=True but its out_head is not its token "
                           "embedding; set model.cfg = dataclasses.replace(model.cfg, tie_weights=False) first")


def save_hf_gpt2(model: GPTModel, directory: str | os.PathLike) -> Path:
    """Write ``model`` in GPT-2's Hugging Face layout (``config.json`` + ``model.safetensors``); return the folder.

    ``transformers.GPT2LMHeadModel.from_pretrained(directory)`` and ``load_gpt2(directory)`` both
    load it. A model without qkv bias gets zero biases (GPT-2 always has them), which computes the same.
    A classifier, a model with LoRA adapters (merge them first) or one whose config says its head is
    tied when it is not raises ``WeightsError`` before anything is written.
    Each file is written to a temporary name and renamed into place.
    """
    model = unwrap_model(model)
    if not isinstance(model, GPTModel):
        raise TypeError(f"save_hf_gpt2 needs a GPTModel, got {type(model).__name__}")
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise WeightsError(f"save_hf_gpt2: {directory} exists and is not a folder; pass a folder to write into")
    params = dict(model.named_parameters(remove_duplicate=False))
    _check_plain_gpt(model, params)
    if any(param.is_meta for param in params.values()):
        raise WeightsError("save_hf_gpt2: the model's weights are on the meta device (no values); load or "
                           "initialise them first")
    bias = torch.zeros(model.cfg.emb_dim, dtype=params["tok_emb.weight"].dtype)  # for a model without qkv bias
    tensors: dict[str, torch.Tensor] = {}
    for hf_name, (ours, how) in _mapped_names(model.cfg).items():
        parts = [params[name].detach().to("cpu") if name in params else bias for name in ours]
        prefix = "" if hf_name == HEAD_ROW[0] else "transformer."
        tensors[prefix + hf_name] = how.to_hf(parts).contiguous().clone()
    directory.mkdir(parents=True, exist_ok=True)
    write_atomically(directory / "model.safetensors",
                     lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
    write_atomically(directory / "config.json", lambda tmp: tmp.write_text(json.dumps(_hf_config(model.cfg), indent=2)))
    return directory
