"""Weight files on disk: checked safetensors reading, shards and folders, and putting tensors into a model.

Shared by every loader of published weights (``helpers.weights`` for GPT-2, ``helpers.modern_weights``
for Qwen3 and Llama): a file is checked entry by entry before any byte is allocated, read one tensor at
a time, and the tensors are assigned to a model built on the meta device, so a load holds one copy.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import torch
from torch import nn

__all__ = ["Tensors", "WeightsError", "assign_weights", "check_shape", "loads_json", "local_files"]


class WeightsError(ValueError):
    """Weights could not be found or do not fit; the message names the tensor or file."""


def loads_json(text: str | bytes) -> object:
    """``json.loads``, with a document nested too deeply for Python's parser refused as a ValueError.

    Python's parser recurses once per level and raises RecursionError past about a thousand; the
    callers turn ValueError into a WeightsError naming their file.
    """
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("its JSON is nested too deeply to be parsed") from None


def _shard_files(index: Path) -> list[Path]:
    """The shard files a ``model.safetensors.index.json`` names, each checked to exist beside it."""
    try:
        weight_map = loads_json(index.read_text())["weight_map"]
        shard_names = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise WeightsError(f"{index} is not a safetensors index (a JSON object with a 'weight_map' of tensor "
                           f"name -> shard file): {error!r}; re-save the model") from error
    files = []
    for shard in shard_names:
        if not isinstance(shard, str) or Path(shard).name != shard or not shard.endswith(".safetensors"):
            raise WeightsError(f"{index} names the shard {shard!r}; shards must be .safetensors files in the "
                               "same folder")
        if not (index.parent / shard).is_file():
            raise WeightsError(f"{index} names the shard {shard}, which is not in {index.parent}; copy every "
                               "shard beside the index")
        files.append(index.parent / shard)
    return files


def local_files(path: Path) -> tuple[Path | None, list[Path]]:
    if path.is_file():
        if path.suffix != ".safetensors":
            raise WeightsError(f"{path} is not a .safetensors file; convert it (safetensors only, never pickles)")
        config = path.with_name("config.json")
        return (config if config.is_file() else None), [path]
    config = path / "config.json"
    if (path / "model.safetensors").is_file():
        files = [path / "model.safetensors"]
    elif (path / "model.safetensors.index.json").is_file():
        files = _shard_files(path / "model.safetensors.index.json")
    else:
        found = ", ".join(sorted(p.name for p in path.iterdir())) or "nothing"
        raise WeightsError(f"{path} holds no model.safetensors (it holds: {found}); pass the folder a model was "
                           "saved to (config.json and model.safetensors) or the .safetensors file itself")
    return (config if config.is_file() else None), files



_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


_MAX_HEADER_BYTES = 100_000_000  # the safetensors format's own limit on the JSON header


def _read_header(file: Path) -> tuple[dict, int, int]:
    """A safetensors file's JSON header, where its data starts, and how many bytes of data it holds."""
    try:
        size = file.stat().st_size
        with open(file, "rb") as handle:
            header_length = struct.unpack("<Q", handle.read(8))[0]
            if header_length > size - 8:
                raise ValueError(f"the header claims {header_length} bytes but the file has {size}")
            if header_length > _MAX_HEADER_BYTES:
                raise ValueError(f"the header claims {header_length} bytes, more than safetensors allows "
                                 f"({_MAX_HEADER_BYTES})")
            header = loads_json(handle.read(header_length))
    except (OSError, ValueError, struct.error) as error:
        raise WeightsError(f"{file} is truncated or not a safetensors file ({error}); download or save it "
                           "again") from error
    if not isinstance(header, dict) or not isinstance(header.get("__metadata__") or {}, dict):
        raise WeightsError(f"{file} is not a safetensors file (its header is not a JSON object of tensors)")
    return header, 8 + header_length, size - 8 - header_length


def _check_entry(file: Path, name: str, info: object, data_size: int) -> tuple[int, int]:
    """The byte range of one header entry, refused unless it holds exactly its dtype and shape."""
    def refuse(problem: str) -> WeightsError:
        return WeightsError(f"{file}: tensor {name} {problem}; the file is damaged or was not written by a "
                            "safetensors writer, save or download it again")

    if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
        raise refuse("lacks its dtype, shape or data_offsets")
    if info["dtype"] not in _SAFETENSORS_DTYPES:
        raise refuse(f"has dtype {info['dtype']!r}, which this loader does not read")
    shape, offsets = info["shape"], info["data_offsets"]
    if not isinstance(shape, list) or not all(type(n) is int and n >= 0 for n in shape):
        raise refuse(f"has shape {shape!r}, not a list of sizes >= 0")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(type(n) is int for n in offsets):
        raise refuse(f"has data_offsets {offsets!r}, not [begin, end]")
    begin, end = offsets
    if not 0 <= begin <= end <= data_size:
        raise refuse(f"claims bytes {begin}..{end}, outside the file's {data_size} bytes of data")
    needed = math.prod(shape) * _SAFETENSORS_DTYPES[info["dtype"]].itemsize
    if needed != end - begin:
        raise refuse(f"of shape {shape} and dtype {info['dtype']} needs {needed} bytes, but its range "
                     f"{begin}..{end} holds {end - begin}")
    return begin, end


class Tensors:
    """The tensors of one or more safetensors files, by normalised GPT-2 name, read one at a time.

    A safetensors file is an 8-byte header length, a JSON header (dtype, shape and byte range of
    every tensor) and the raw bytes. Every range is checked against its shape, dtype, the file's size
    and the other ranges before anything is allocated; ``get`` then reads one tensor's bytes straight
    into a fresh tensor, so loading holds one copy of the weights and no mapping of the file.
    """

    def __init__(self, files: list[Path]):
        self.where: dict[str, tuple[Path, int, dict]] = {}
        self.metadata: dict[str, str] = {}
        for file in files:
            header, data_start, data_size = _read_header(file)
            self.metadata.update(header.pop("__metadata__", None) or {})
            ranges = sorted((*_check_entry(file, key, info, data_size), key) for key, info in header.items())
            for (_, previous_end, previous), (begin, _, key) in zip(ranges, ranges[1:]):
                if begin < previous_end:
                    raise WeightsError(f"{file}: tensors {previous} and {key} share bytes; the file is damaged, "
                                       "save or download it again")
            for key, info in header.items():
                name = key.removeprefix("transformer.")
                if name in self.where:
                    raise WeightsError(f"{file} holds {key}, which {self.where[name][0]} holds too; pass one model")
                self.where[name] = (file, data_start, info)

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
                if handle.readinto(memoryview(tensor.view(-1).view(torch.uint8).numpy())) != end - start:
                    raise WeightsError(f"{file} changed or was cut short while {name} was read from it")
        return tensor



def check_shape(source: str, name: str, actual: list[int], expected: list[int]) -> None:
    if actual != expected:
        raise WeightsError(f"{source}: {name} has shape {actual}, but a model with this config needs {expected}; "
                           "check that the config belongs to these weights")



def assign_weights(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> nn.Module:
    """Give ``model`` (built on the meta device) the tensors of ``state`` by name, each checked by shape; tie its head
    to its embedding when its config says so; return it in eval mode."""
    if model.cfg.tie_weights:
        state["out_head.weight"] = state.get("out_head.weight", state.get("tok_emb.weight"))
    for name, param in model.named_parameters(remove_duplicate=False):
        if name not in state:
            raise WeightsError(f"{source} has no tensor for {name} (shape {list(param.shape)})")
        check_shape(source, name, list(state[name].shape), list(param.shape))
    model.load_state_dict(state, strict=True, assign=True)
    if model.cfg.tie_weights:
        model.out_head.weight = model.tok_emb.weight
    return model.eval()

