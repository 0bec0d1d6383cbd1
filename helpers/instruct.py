"""Instruction finetuning (Part 09): the Alpaca-style prompt, the data splits, batching, answering and scoring."""

from __future__ import annotations

import json
import random
from collections.abc import Sequence

from helpers.data import fetch

__all__ = [
    "PROMPT_PREAMBLE",
    "RESPONSE_HEADER",
    "InstructionDataError",
    "format_input",
    "format_training_text",
    "load_instruction_splits",
    "split_records",
]

PROMPT_PREAMBLE = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
)
RESPONSE_HEADER = "\n\n### Response:\n"
_FIELDS = ("instruction", "input", "output")


class InstructionDataError(ValueError):
    """An instruction record is malformed; the message names the record and the field."""


def _check_record(index: int, record: object) -> dict[str, str]:
    """Return ``record`` if it is a dict with string instruction/input/output, else raise naming ``index``."""
    if not isinstance(record, dict):
        raise InstructionDataError(f"record {index} is a {type(record).__name__}, expected a dict with keys {_FIELDS}")
    for field in _FIELDS:
        if field not in record:
            raise InstructionDataError(f"record {index} has no '{field}' key (keys: {sorted(record)}); "
                                       f"every record needs {_FIELDS}")
        if not isinstance(record[field], str):
            raise InstructionDataError(f"record {index} field '{field}' is a {type(record[field]).__name__}, "
                                       "expected a string")
    return record


def load_instruction_splits(seed: int | None = None) -> tuple[list[dict], list[dict], list[dict]]:
    """Return the instruction data as ``(train, test, validation)``: 85% / 10% / the rest (935 / 110 / 55).

    ``seed=None`` keeps the file's order; an integer shuffles a copy with ``random.Random(seed)`` first.
    """
    path = fetch("instruction-data")
    records = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(records, list):
        raise InstructionDataError(f"{path} holds a {type(records).__name__}, expected a list of records")
    data = [_check_record(i, record) for i, record in enumerate(records)]
    if seed is not None:
        random.Random(seed).shuffle(data)
    return split_records(data)


def split_records(data: Sequence[dict], train_frac: float = 0.85,
                  test_frac: float = 0.10) -> tuple[list[dict], list[dict], list[dict]]:
    """Split ``data`` in order into ``(train, test, validation)``; validation gets what train and test leave."""
    if train_frac <= 0 or test_frac < 0 or train_frac + test_frac > 1:
        raise ValueError(f"train_frac ({train_frac}) and test_frac ({test_frac}) must be positive and sum to at most 1")
    train_end = int(len(data) * train_frac)
    test_end = train_end + int(len(data) * test_frac)
    return list(data[:train_end]), list(data[train_end:test_end]), list(data[test_end:])


def format_input(entry: dict) -> str:
    """Return the Alpaca-style prompt for ``entry``: preamble, instruction, and the input only when non-empty."""
    prompt = f"{PROMPT_PREAMBLE}\n\n### Instruction:\n{entry['instruction']}"
    if entry.get("input"):
        prompt += f"\n\n### Input:\n{entry['input']}"
    return prompt


def format_training_text(entry: dict) -> str:
    """Return the full training text: ``format_input(entry)`` followed by the response header and the output."""
    return format_input(entry) + RESPONSE_HEADER + entry["output"]
