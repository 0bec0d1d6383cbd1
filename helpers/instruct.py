"""Instruction finetuning (Part 09): the Alpaca-style prompt, the data splits, batches, answers and their scores.

Training reuses Part 07's ``helpers.train.train_model`` and ``calc_loss_batch``: its chunked
cross-entropy ignores the -100 targets that ``collate_instructions`` writes, exactly as
``F.cross_entropy`` does. Answers are scored offline by ``rouge_l`` beside two baselines, and
online by an LLM judge over HTTP (``judge_responses``).
"""

from __future__ import annotations

import json
import os
import random
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from helpers.data import fetch
from helpers.generate import generate_batch
from helpers.runtime import check_count, eval_mode, write_atomically
from helpers.tokenizers import encode_user_text

__all__ = [
    "CONSTANT_ANSWER",
    "ALPACA",
    "END_OF_TEXT",
    "PROMPT_PREAMBLE",
    "RESPONSE_HEADER",
    "InstructionDataError",
    "InstructionDataset",
    "JudgeUnavailable",
    "PromptFormat",
    "baseline_scores",
    "collate_instructions",
    "constant_baseline",
    "echo_baseline",
    "extract_response",
    "format_input",
    "format_training_text",
    "generate_responses",
    "judge_prompt",
    "judge_responses",
    "load_instruction_splits",
    "mean_rouge_l",
    "parse_score",
    "rouge_l",
    "split_records",
]

PROMPT_PREAMBLE = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
)
RESPONSE_HEADER = "\n\n### Response:\n"
END_OF_TEXT = "<|endoftext|>"
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


def special_token_id(tokenizer, token: str) -> int:
    """The id of special token ``token`` (``"<|endoftext|>"``, ``"<|im_end|>"``) in ``tokenizer``; ValueError if it has
    none (tiktoken's encodings and ``BPETokenizer`` both take ``allowed_special``)."""
    try:
        ids = tokenizer.encode(token, allowed_special={token})
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(f"the tokenizer has no special token {token!r} ({error}); pass its id explicitly") from error
    if len(ids) != 1:
        raise ValueError(f"the tokenizer has no special token {token!r} (it encodes it as {len(ids)} ids); "
                         "pass its id explicitly")
    return ids[0]


@dataclass(frozen=True)
class PromptFormat:
    """How an instruction record becomes the model's prompt, and which token ends its answer.

    ``instruction_ids(entry, tokenizer)`` encodes what is asked (Alpaca: ``format_input(entry)``; a
    chat template: the turns up to the user's), ``header_ids(tokenizer)`` what opens the answer
    (``RESPONSE_HEADER``; a chat template's assistant turn), and ``end_token`` is the special token
    that closes an answer, which the model learns to write and generation stops at. ``joint_ids``,
    when given, encodes instruction and header in one piece (for a byte-level BPE the two can merge
    across the seam; Part 09's instruction data is encoded that way). ``ALPACA`` is the book's format;
    Part 11 adds a chat template's (``helpers.smollm2.CHATML``).
    """

    name: str
    instruction_ids: Callable[[dict, object], list[int]]
    header_ids: Callable[[object], list[int]]
    end_token: str
    joint_ids: Callable[[dict, object], list[int]] | None = None

    def prompt_ids(self, entry: dict, tokenizer) -> list[int]:
        """The ids the model is given to answer ``entry``: the instruction, then the header."""
        if self.joint_ids is not None:
            return self.joint_ids(entry, tokenizer)
        return self.instruction_ids(entry, tokenizer) + self.header_ids(tokenizer)

    def end_id(self, tokenizer) -> int:
        """The id of ``end_token`` in ``tokenizer``."""
        return special_token_id(tokenizer, self.end_token)


ALPACA = PromptFormat(
    "alpaca",
    instruction_ids=lambda entry, tokenizer: encode_user_text(tokenizer, format_input(entry)),
    header_ids=lambda tokenizer: encode_user_text(tokenizer, RESPONSE_HEADER),
    end_token=END_OF_TEXT,
    joint_ids=lambda entry, tokenizer: encode_user_text(tokenizer, format_input(entry) + RESPONSE_HEADER),
)
"""The book's Alpaca-style prompt (``format_input`` + ``RESPONSE_HEADER``), answers ending at ``<|endoftext|>``."""


def extract_response(generated_text: str, prompt: str | None = None) -> str:
    """Return the answer in ``generated_text``: what follows ``prompt`` and the ``### Response:`` header, stripped.

    Text after an ``<|endoftext|>`` is dropped. Without ``prompt`` the answer is what follows the first
    ``### Response:`` header (the whole text when there is none).
    """
    text = generated_text
    if prompt is not None and text.startswith(prompt):
        text = text[len(prompt):]
    header = RESPONSE_HEADER.strip()
    if prompt is not None:
        text = text.lstrip()
        if text.startswith(header):
            text = text[len(header):]
    elif header in text:
        text = text.split(header, 1)[1]
    return text.split(END_OF_TEXT, 1)[0].strip()


# ---------------------------------------------------------------------------------------------
# batches for training


class InstructionDataset(Dataset):
    """Instruction records tokenized once: the prompt (with the response header), then the response.

    Items are lists of token ids, or ``(ids, prompt_length)`` with ``return_prompt_length=True``, where
    ``prompt_length`` counts the tokens of ``format_input(entry) + "\\n\\n### Response:\\n"``: the part
    the model is given when it answers. Prompt and response are encoded separately and joined, which on
    this data gives the same ids as encoding the whole text at once. Record text is encoded as ordinary
    text (``encode_user_text``): an ``<|endoftext|>`` in it is characters, not the end-of-text id. A
    record that is not a dict of strings raises ``InstructionDataError`` naming its index.
    ``prompt_format`` (default ``ALPACA``) says how a record becomes a prompt: a chat template's
    (``PromptFormat``) makes the prompt its turns; collate then with ``pad_token_id`` its end token's id.
    """

    def __init__(self, data: Sequence[dict], tokenizer, return_prompt_length: bool = False, *,
                 prompt_format: PromptFormat = ALPACA):
        self.return_prompt_length = return_prompt_length
        self.prompt_format = prompt_format
        self.encoded: list[list[int]] = []
        self.prompt_lengths: list[int] = []
        for index, entry in enumerate(data):
            entry = _check_record(index, entry)
            prompt_ids = prompt_format.prompt_ids(entry, tokenizer)
            self.encoded.append(prompt_ids + encode_user_text(tokenizer, entry["output"]))
            self.prompt_lengths.append(len(prompt_ids))

    def __len__(self) -> int:
        return len(self.encoded)

    def __getitem__(self, index: int) -> list[int] | tuple[list[int], int]:
        if self.return_prompt_length:
            return self.encoded[index], self.prompt_lengths[index]
        return self.encoded[index]


def _split_item(index: int, item, mask_prompt: bool) -> tuple[list[int], int]:
    """``(ids, prompt_length)`` of one batch item; ``prompt_length`` is 0 when prompts are not masked."""
    if isinstance(item, tuple):
        ids, prompt_length = item
    elif mask_prompt:
        raise ValueError(f"mask_prompt=True needs items (ids, prompt_length), but batch item {index} is a "
                         f"{type(item).__name__}; build the dataset with return_prompt_length=True")
    else:
        ids, prompt_length = item, 0
    ids = list(ids.tolist() if isinstance(ids, torch.Tensor) else ids)
    if not ids:
        raise ValueError(f"batch item {index} has no tokens")
    if not mask_prompt:
        return ids, 0
    if isinstance(prompt_length, bool) or not isinstance(prompt_length, int) or not 0 <= prompt_length <= len(ids):
        raise ValueError(f"batch item {index}: prompt_length must be an integer from 0 to the item's {len(ids)} "
                         f"tokens, got {prompt_length!r}")
    return ids, prompt_length


def collate_instructions(batch: Sequence, pad_token_id: int = 50256, ignore_index: int = -100,
                         allowed_max_length: int | None = None, device: torch.device | str = "cpu",
                         mask_prompt: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Turn token-id lists into ``(inputs, targets)`` ``(batch, n)`` tensors for next-token training.

    Each sequence gets one ``pad_token_id`` (end-of-text) appended and is padded with it to the longest;
    targets are the inputs shifted by one. The first end-of-text target stays (the model learns to stop),
    every later padding target becomes ``ignore_index``. With ``mask_prompt`` (items
    ``(ids, prompt_length)``) ``targets[:prompt_length - 1]`` are ``ignore_index`` too, so only the
    response and its end-of-text count. Both tensors are then cut to ``allowed_max_length`` tokens; a
    batch that the cut leaves with no target to score (every response cut off) is refused, since its
    loss would be NaN.
    """
    if len(batch) == 0:
        raise ValueError("collate_instructions got an empty batch")
    check_count("allowed_max_length", allowed_max_length, allow_none=True)
    items = [_split_item(index, item, mask_prompt) for index, item in enumerate(batch)]
    width = max(len(ids) for ids, _ in items)  # one more than that with the end-of-text, one less after the shift
    inputs, targets = [], []
    for ids, prompt_length in items:
        padded = ids + [pad_token_id] * (width + 1 - len(ids))
        target = padded[1:]
        target[len(ids):] = [ignore_index] * (width - len(ids))  # padding after the first end-of-text
        target[:max(prompt_length - 1, 0)] = [ignore_index] * max(prompt_length - 1, 0)
        inputs.append(padded[:-1])
        targets.append(target)
    inputs_t = torch.tensor(inputs, dtype=torch.long)[:, :allowed_max_length]
    targets_t = torch.tensor(targets, dtype=torch.long)[:, :allowed_max_length]
    if not (targets_t != ignore_index).any():
        raise ValueError(f"no batch item has a response token left to score: the responses start at tokens "
                         f"{[prompt_length for _, prompt_length in items]} but the sequences are cut to "
                         f"{allowed_max_length} tokens (allowed_max_length), so the loss would be NaN; raise "
                         "allowed_max_length or drop records whose prompt is that long")
    return inputs_t.to(device), targets_t.to(device)


# ---------------------------------------------------------------------------------------------
# answering


def _prompt_ids(entries: Sequence[dict], tokenizer, prompt_format: PromptFormat) -> list[list[int]]:
    return [prompt_format.prompt_ids(_check_record(i, e), tokenizer) for i, e in enumerate(entries)]


def _warn_if_cropped(prompts: Sequence[list[int]], context_size: int | None) -> None:
    """One warning when prompts are longer than ``context_size``: how many, and by how many tokens at most."""
    if context_size is None:  # generate() will ask for one
        return
    over = [len(ids) - context_size for ids in prompts if len(ids) > context_size]
    if over:
        warnings.warn(f"generate_responses: {len(over)} of {len(prompts)} prompts are longer than the "
                      f"{context_size}-token context and are cropped from the left, by up to {max(over)} tokens: "
                      "the model does not see the start of their instructions. Shorten those entries or use a "
                      "model with a longer context", stacklevel=3)


def _length_sorted_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices in order of prompt length, at most ``batch_size`` per batch (so a batch needs little padding)."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    return [order[start:start + batch_size] for start in range(0, len(order), batch_size)]


def _answer_ids(row: list[int], eos_id: int) -> list[int]:
    return row[:row.index(eos_id)] if eos_id in row else row


def generate_responses(model: nn.Module, tokenizer, entries: Sequence[dict], max_new_tokens: int = 256,
                       out_path: str | os.PathLike | None = None, batch_size: int = 8, *,
                       eos_id: int | None = None, context_size: int | None = None, progress: bool = True,
                       device: torch.device | str | None = None, prompt_format: PromptFormat = ALPACA,
                       pad_id: int = 0) -> list[dict]:
    """Answer every entry greedily with the KV cache; return copies of the entries with ``model_response``.

    The model is given the entry's prompt (``prompt_format``: by default ``format_input(entry)`` and
    the response header), generates until ``eos_id`` (default: the format's end token in
    ``tokenizer``, ``<|endoftext|>`` = 50256 for GPT-2's) or ``max_new_tokens``, and the answer is the
    decoded new tokens before it, stripped. ``pad_id`` fills the left padding (any id in the
    vocabulary will do: the mask hides it). Entries are answered
    ``batch_size`` at a time, in order of prompt length (so a batch needs little padding), by
    ``helpers.generate.generate_batch``, which left-pads each batch and masks the padding: the answers
    are the ones generated one at a time. ``device`` is ignored (the model's own is used; kept for
    compatibility). With ``out_path`` the result is written there as JSON (atomically; missing parent
    folders are created).

    A prompt longer than the context (``context_size``, else the model's) is cropped from the left,
    losing the start of its instruction; one warning says how many prompts and by how many tokens at
    most. (As an answer grows past the context, the window slides on the same way.)
    """
    check_count("batch_size", batch_size)
    check_count("max_new_tokens", max_new_tokens, minimum=0)
    if eos_id is None:
        eos_id = prompt_format.end_id(tokenizer)
    prompts = _prompt_ids(entries, tokenizer, prompt_format)
    _warn_if_cropped(prompts, context_size or getattr(getattr(model, "cfg", None), "context_length", None))
    answers: list[str] = [""] * len(entries)
    with eval_mode(model), tqdm(total=len(entries), desc="answering", unit="entry", disable=not progress) as bar:
        for group in _length_sorted_batches([len(ids) for ids in prompts], batch_size):
            # pad id 0 by default: eos_id may lie outside a small vocabulary
            rows = generate_batch(model, [prompts[i] for i in group], max_new_tokens, pad_id=pad_id, eos_id=eos_id,
                                  context_size=context_size)
            for row, i in zip(rows, group):
                answers[i] = tokenizer.decode(_answer_ids(row, eos_id)).strip()
            bar.update(len(group))
    results = [{**entry, "model_response": answer} for entry, answer in zip(entries, answers)]
    if out_path is not None:
        document = json.dumps(results, indent=2, ensure_ascii=False)
        Path(out_path).parent.mkdir(parents=True, exist_ok=True)
        write_atomically(out_path, lambda tmp: tmp.write_text(document, encoding="utf-8"))
    return results


# ---------------------------------------------------------------------------------------------
# scoring offline: ROUGE-L and two baselines

CONSTANT_ANSWER = "The answer is correct."


def _words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def _lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence of ``a`` and ``b``, the table's rows as bits (Allison-Dix, Hyyrö).

    Row ``i`` of the textbook table holds the LCS of ``a[:i]`` with each prefix of ``b``; it never
    drops and rises by at most one per column, so it is stored as bits: bit ``j`` of ``row`` is 0 where
    the row rises at ``b[j]``, and the LCS is the number of 0 bits. One word of ``a`` updates the whole
    row with a few big-integer operations, not ``len(b)`` Python steps: the same number, 20x (100 words)
    to 270x (3,000 words) sooner (benchmarks/rouge_speed.py).
    """
    where: dict[str, int] = {}  # word -> the bits of its positions in b
    for j, word in enumerate(b):
        where[word] = where.get(word, 0) | 1 << j
    all_ones = (1 << len(b)) - 1
    row = all_ones  # row 0: the LCS with an empty prefix of a is 0 everywhere, no rise
    for word in a:
        matches = row & where.get(word, 0)
        row = ((row + matches) | (row - matches)) & all_ones
    return len(b) - row.bit_count()


def rouge_l(candidate: str, reference: str) -> float:
    """ROUGE-L F1 of ``candidate`` against ``reference`` over lower-cased ``\\w+`` words (0 when either is empty).

    Precision and recall are the longest common subsequence's length over each text's word count.
    """
    for name, text in (("candidate", candidate), ("reference", reference)):
        if not isinstance(text, str):
            raise TypeError(f"rouge_l's {name} must be a string, got a {type(text).__name__}")
    cand, ref = _words(candidate), _words(reference)
    if not cand or not ref:
        return 0.0
    lcs = _lcs_length(cand, ref)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(cand), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


def mean_rouge_l(entries: Sequence[dict], response_key: str = "model_response", reference_key: str = "output") -> float:
    """Mean ``rouge_l`` of each entry's ``response_key`` against its ``reference_key``."""
    if not entries:
        raise ValueError("mean_rouge_l needs at least one entry")
    missing = next((i for i, e in enumerate(entries) if response_key not in e or reference_key not in e), None)
    if missing is not None:
        raise KeyError(f"entry {missing} has no '{response_key}' or '{reference_key}'; "
                       "answer the entries with generate_responses first")
    for index, entry in enumerate(entries):
        for key in (response_key, reference_key):
            if not isinstance(entry[key], str):
                raise TypeError(f"entry {index}'s '{key}' is a {type(entry[key]).__name__}, expected a string")
    return sum(rouge_l(e[response_key], e[reference_key]) for e in entries) / len(entries)


def echo_baseline(entries: Sequence[dict]) -> list[dict]:
    """Copies of ``entries`` whose ``model_response`` echoes what it got: the input, or the instruction if none.

    On the test split this scores 0.43 ROUGE-L (echoing only the instruction: 0.35), because many answers
    rework their input (a sentence to rewrite, a list to sort).
    """
    return [{**entry, "model_response": entry["input"] or entry["instruction"]} for entry in entries]


def constant_baseline(entries: Sequence[dict], answer: str = CONSTANT_ANSWER) -> list[dict]:
    """Copies of ``entries`` whose ``model_response`` is always ``answer``."""
    return [{**entry, "model_response": answer} for entry in entries]


def baseline_scores(entries: Sequence[dict]) -> dict[str, float]:
    """Mean ROUGE-L of the echo and the constant baselines on ``entries``."""
    return {"echo": mean_rouge_l(echo_baseline(entries)), "constant": mean_rouge_l(constant_baseline(entries))}


# ---------------------------------------------------------------------------------------------
# scoring by an LLM judge over HTTP: helpers.judge, its names importable from here too

from helpers.judge import JudgeUnavailable, judge_prompt, judge_responses, parse_score  # noqa: E402
