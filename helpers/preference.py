"""Preference alignment by Direct Preference Optimization (Part 09): answer pairs, masks, log-probabilities, DPO.

A preference record is an instruction record with two answers, ``chosen`` (the one people preferred)
and ``rejected``. DPO (Rafailov et al., 2023) trains a *policy* to raise the log-probability of the
chosen answer, relative to a frozen *reference* model, more than that of the rejected one:

    loss = -log sigmoid(beta * ((log pi(chosen) - log ref(chosen)) - (log pi(rejected) - log ref(rejected))))

and ``beta * (log pi(answer) - log ref(answer))`` is the answer's implicit reward.

Masks refer to input tokens: ``chosen_mask[b, t]`` is True when token ``chosen[b, t]`` is scored. Its
log-probability is read from the logits at position ``t - 1`` (next-token prediction), so column 0 is
always False: nothing predicts the first token. ``sequence_logprobs`` and ``model_sequence_logprobs``
do that shift themselves; pass them the same ids as labels that went into the model.

Our unit is the sum over exactly the answer's tokens, and a reward includes beta. The book's DPO
notebook (Raschka, "Build a Large Language Model (From Scratch)") averages per token over a span that
also holds ``### Response:\n`` and reports rewards without beta; ``evaluate_dpo(..., average=True,
header_tokens=4, rewards_with_beta=False)`` measures in its units (4: those header tokens in GPT-2's BPE).
"""

from __future__ import annotations

import copy
import json
import math
import numbers
import random
from collections.abc import Iterable, Sequence
from itertools import islice

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from torch.utils.data import Dataset
from tqdm import tqdm

from helpers.data import fetch
from helpers.instruct import ALPACA, InstructionDataError, PromptFormat, split_records
from helpers.model import is_decoder
from helpers.runtime import autocast, check_count, compute_dtype, eval_mode, unwrap_model
from helpers.tokenizers import encode_user_text
from helpers.train import TrainingDiverged

__all__ = [
    "PreferenceDataError",
    "PreferenceDataset",
    "check_preference_records",
    "collate_preferences",
    "dpo_batch_loss",
    "dpo_loss",
    "evaluate_dpo",
    "frozen_reference",
    "load_preference_splits",
    "model_sequence_logprobs",
    "preference_accuracy",
    "sequence_logprobs",
    "train_dpo",
]

_ANSWERS = ("chosen", "rejected")
# Rows per chunk of the output head: one chunk's logits hold about this many floats (~128 MB in float32).
_CHUNK_ELEMENTS = 1 << 25


class PreferenceDataError(InstructionDataError):
    """A preference record is malformed; the message names the record and the field."""


# ---------------------------------------------------------------------------------------------
# data: records, splits, token ids, batches


def _describe(value: object) -> str:
    """How an error names a field's value: its type, or NaN (pandas' mark of a missing value)."""
    if isinstance(value, float) and math.isnan(value):
        return "NaN (a missing value, as pandas writes one)"
    return f"a {type(value).__name__}"


def _check_record(index: int, record: object) -> dict:
    """Return ``record`` if it has a non-empty instruction, chosen and rejected answer; else raise naming ``index``."""
    if not isinstance(record, dict):
        raise PreferenceDataError(f"record {index} is a {type(record).__name__}, expected a dict with "
                                  "'instruction', 'input', 'chosen' and 'rejected'")
    for field in ("instruction", *_ANSWERS):
        if field not in record:
            raise PreferenceDataError(f"record {index} has no '{field}' key (keys: {sorted(map(str, record))}); every "
                                      "preference record needs 'instruction', 'chosen' and 'rejected' (and optionally "
                                      "'input')")
        if not isinstance(record[field], str):
            raise PreferenceDataError(f"record {index} field '{field}' is {_describe(record[field])}, "
                                      "expected a string")
        if not record[field].strip():
            raise PreferenceDataError(f"record {index} has an empty '{field}' ({record[field]!r}): there is nothing "
                                      "to score; fill it in or drop the record")
    if not isinstance(record.get("input", ""), str):
        raise PreferenceDataError(f"record {index} field 'input' is {_describe(record['input'])}, "
                                  "expected a string (empty when the instruction needs no input)")
    return record


def check_preference_records(records: Sequence) -> list[dict]:
    """Return ``records`` as a list after checking each; a bad one raises ``PreferenceDataError`` naming its index."""
    return [_check_record(index, record) for index, record in enumerate(records)]


def load_preference_splits(seed: int | None = None) -> tuple[list[dict], list[dict], list[dict]]:
    """Return the preference data as ``(train, test, validation)``: 85% / 10% / the rest (935 / 110 / 55).

    The same rule as ``load_instruction_splits``: ``seed=None`` keeps the file's order, an integer
    shuffles a copy with ``random.Random(seed)`` first (the same permutation, as both files hold 1,100
    records in the same order).
    """
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)):
        raise ValueError(f"seed must be an integer or None (keep the file's order), got {seed!r}")
    path = fetch("instruction-preference")
    records = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(records, list):
        raise PreferenceDataError(f"{path} holds a {type(records).__name__}, expected a list of records")
    data = check_preference_records(records)
    if seed is not None:
        random.Random(seed).shuffle(data)
    return split_records(data)


class PreferenceDataset(Dataset):
    """Token ids of preference records, one dict per record.

    Each item holds ``prompt`` (the ids of ``format_input(record)``), ``chosen`` and ``rejected`` (the
    ids of prompt + ``"\\n\\n### Response:\\n"`` + answer, then ``end_token_id`` unless it is None) and
    ``prompt_length`` (how many ids come before the answer: prompt and response header). The pieces are
    encoded one by one and joined, so the answer starts exactly at ``prompt_length``; the end token is
    part of the answer, as in instruction finetuning, so the preference also covers where an answer stops.
    Record text is encoded with ``encode_user_text``: a literal ``<|endoftext|>`` in it is ordinary text,
    and the only end-of-text id is the one appended here. ``prompt_format`` (``helpers.instruct.PromptFormat``,
    default the book's ``ALPACA``) says what the prompt and the header are: a chat template's turns, with
    ``end_token_id`` its end token's id.
    """

    def __init__(self, data: Sequence[dict], tokenizer, end_token_id: int | None = 50256, *,
                 prompt_format: PromptFormat = ALPACA):
        check_count("end_token_id", end_token_id, minimum=0, allow_none=True)
        records = check_preference_records(data)
        self.items = [self._encode(record, tokenizer, end_token_id, prompt_format) for record in records]

    @staticmethod
    def _encode(record: dict, tokenizer, end_token_id: int | None, prompt_format: PromptFormat) -> dict:
        prompt = prompt_format.instruction_ids(record, tokenizer)
        prefix = prompt + prompt_format.header_ids(tokenizer)
        end = [] if end_token_id is None else [end_token_id]
        item = {"prompt": prompt, "prompt_length": len(prefix)}
        for answer in _ANSWERS:
            item[answer] = prefix + encode_user_text(tokenizer, record[answer]) + end
        return item

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        return self.items[index]


def _pad(ids: Sequence[int], length: int, pad_token_id: int) -> torch.Tensor:
    """``ids`` cut or padded with ``pad_token_id`` to ``length``."""
    padded = torch.full((length,), pad_token_id, dtype=torch.long)
    kept = list(ids[:length])
    padded[:len(kept)] = torch.tensor(kept, dtype=torch.long)
    return padded


def _answer_mask(item: dict, answer: str, length: int, mask_prompt: bool, position: int) -> torch.Tensor:
    """True on the scored tokens of ``item[answer]`` padded to ``length``; raise if none is left."""
    start = item["prompt_length"] if mask_prompt else 1  # token 0 is never predicted
    end = min(len(item[answer]), length)
    mask = torch.zeros(length, dtype=torch.bool)
    mask[start:end] = True
    if not mask.any():
        raise ValueError(f"batch item {position}: its {answer} answer starts at token {start} but the sequence is cut "
                         f"to {length} tokens (allowed_max_length), so no answer token is left to score; raise "
                         "allowed_max_length or drop records whose prompt is that long")
    return mask


def collate_preferences(batch: Sequence[dict], pad_token_id: int = 50256, allowed_max_length: int | None = None,
                        mask_prompt: bool = True, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Pad a list of ``PreferenceDataset`` items into one batch (a dict of tensors on ``device``).

    ``chosen`` and ``rejected`` ``(batch, n_tokens)`` are padded with ``pad_token_id`` to one common
    length (the longest of both, cut to ``allowed_max_length``), so they can share one forward pass.
    ``chosen_mask`` and ``rejected_mask`` (bool, same shape) are True on the answer tokens the
    log-probability sums over: never padding, never the prompt or the response header unless
    ``mask_prompt=False`` (then every real token but the first). ``prompt`` holds the prompts padded
    to the longest, ``prompt_lengths`` their lengths.
    """
    check_count("pad_token_id", pad_token_id, minimum=0)
    check_count("allowed_max_length", allowed_max_length, minimum=2, allow_none=True)  # a token and the one it predicts
    if len(batch) == 0:
        raise ValueError("collate_preferences got an empty batch")
    length = max(len(item[answer]) for item in batch for answer in _ANSWERS)
    if allowed_max_length is not None:
        length = min(length, allowed_max_length)
    prompt_width = max(len(item["prompt"]) for item in batch)
    if allowed_max_length is not None:
        prompt_width = min(prompt_width, allowed_max_length)
    out = {
        "prompt": torch.stack([_pad(item["prompt"], prompt_width, pad_token_id) for item in batch]),
        "prompt_lengths": torch.tensor([min(len(item["prompt"]), prompt_width) for item in batch]),
    }
    for answer in _ANSWERS:
        out[answer] = torch.stack([_pad(item[answer], length, pad_token_id) for item in batch])
        out[f"{answer}_mask"] = torch.stack([_answer_mask(item, answer, length, mask_prompt, position)
                                             for position, item in enumerate(batch)])
    return {key: value.to(device) for key, value in out.items()}


# ---------------------------------------------------------------------------------------------
# log-probabilities of answers


def _check_scored(ids: torch.Tensor, mask: torch.Tensor, header_tokens: int = 0) -> torch.Tensor:
    """``mask`` as bool and widened by ``header_tokens``, once checked to fit ``ids`` and score a token in each row."""
    check_count("header_tokens", header_tokens, minimum=0)
    if ids.dim() != 2 or mask.shape != ids.shape:
        raise ValueError(f"labels must be (batch, n_tokens) and mask the same shape; got labels "
                         f"{tuple(ids.shape)} and mask {tuple(mask.shape)}")
    mask = mask.bool()
    if mask[:, 0].any():
        rows = mask[:, 0].nonzero().flatten().tolist()
        raise ValueError(f"mask[:, 0] is True in rows {rows}: no logit predicts the first token (token t is read "
                         "from the logits at t - 1); leave the first column False")
    empty = ~mask.any(dim=1)
    if empty.any():
        raise ValueError(f"mask rows {empty.nonzero().flatten().tolist()} score no token; each sequence needs at least "
                         "one True position")
    return _with_header(mask, header_tokens)


def _with_header(mask: torch.Tensor, header_tokens: int) -> torch.Tensor:
    """``mask`` also True on the ``header_tokens`` positions before each row's first True one (never on column 0)."""
    if header_tokens == 0:
        return mask
    positions = torch.arange(mask.shape[1], device=mask.device)  # (n_tokens,)
    first = mask.long().argmax(dim=1, keepdim=True)  # (batch, 1): each row's first scored position
    start = (first - header_tokens).clamp(min=1)
    return mask | ((positions >= start) & (positions < first))  # (batch, n_tokens)


def _reduce(totals: torch.Tensor, mask: torch.Tensor, average: bool) -> torch.Tensor:
    """``totals`` (batch,), divided by each row's number of scored tokens when ``average``."""
    return totals / mask.sum(dim=1) if average else totals


def sequence_logprobs(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor,
                      average: bool = False, *, header_tokens: int = 0) -> torch.Tensor:
    """Summed (``average=True``: mean) log-probability of the masked tokens of each sequence, shape ``(batch,)``.

    ``logits`` ``(batch, n_tokens, vocab_size)`` are the model's output for ``labels`` ``(batch, n_tokens)``;
    ``mask[b, t]`` selects token ``labels[b, t]``, scored by the logits at ``t - 1``. Each token's
    log-probability is its logit minus the log-sum-exp of its row: no log-softmax copy of the logits.
    ``header_tokens`` also scores that many tokens just before each row's first masked token (with
    answer-only masks: the end of the response header; the book scores the 4 of ``### Response:\n``),
    never token 0; ``average`` then divides by the widened count.
    """
    mask = _check_scored(labels, mask, header_tokens)
    if logits.shape[:2] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} do not match labels {tuple(labels.shape)} in (batch, n_tokens)")
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    logits, labels, mask = logits[:, :-1], labels[:, 1:], mask[:, 1:]  # position t predicts token t + 1
    picked = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1)  # (batch, n_tokens - 1)
    token_logprobs = picked - torch.logsumexp(logits, dim=-1)
    return _reduce(token_logprobs.masked_fill(~mask, 0.0).sum(dim=1), mask, average)


def _chunk_logprobs(head: nn.Module, states: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Log-probability of ``targets`` (rows,) under ``head(states)`` (rows, vocab_size), computed in float32."""
    logits = head(states).float()
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def _head_logprobs(head: nn.Module, states: torch.Tensor, targets: torch.Tensor, chunk_rows: int) -> torch.Tensor:
    """``_chunk_logprobs`` over row chunks; while training each chunk is recomputed in backward instead of kept."""
    pieces = []
    for start in range(0, states.shape[0], chunk_rows):
        chunk = (states[start:start + chunk_rows], targets[start:start + chunk_rows])
        if torch.is_grad_enabled():
            pieces.append(checkpoint(_chunk_logprobs, head, *chunk, use_reentrant=False))
        else:
            pieces.append(_chunk_logprobs(head, *chunk))
    return torch.cat(pieces)


def model_sequence_logprobs(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, average: bool = False,
                            chunk_rows: int | None = None, *, header_tokens: int = 0) -> torch.Tensor:
    """``sequence_logprobs(model(ids), ids, mask, average, header_tokens=...)``, without a decoder's full logits.

    For a decoder (``GPTModel``, ``ModernModel``, also wrapped) the output head is applied only to the
    hidden states that predict a masked token, ``chunk_rows`` rows at a time (about 2^25 logits a chunk), so no
    ``(batch, n_tokens, vocab_size)`` tensor exists, in forward or backward. Other models go through
    their logits.
    """
    check_count("chunk_rows", chunk_rows, minimum=1, allow_none=True)
    core = unwrap_model(model)
    if not is_decoder(core):
        return sequence_logprobs(model(ids), ids, mask, average, header_tokens=header_tokens)
    mask = _check_scored(ids, mask, header_tokens)
    hidden = model(ids, return_hidden=True)  # (batch, n_tokens, emb_dim)
    rows, positions = mask[:, 1:].nonzero(as_tuple=True)  # hidden[:, t] predicts ids[:, t + 1]
    states = hidden[rows, positions]  # (n_scored, emb_dim)
    targets = ids[rows, positions + 1]  # (n_scored,)
    step = chunk_rows or max(1, _CHUNK_ELEMENTS // core.cfg.vocab_size)
    token_logprobs = _head_logprobs(core.out_head, states, targets, step)
    totals = token_logprobs.new_zeros(ids.shape[0]).index_add(0, rows, token_logprobs)
    return _reduce(totals, mask, average)


# ---------------------------------------------------------------------------------------------
# the DPO loss


def _check_positive(name: str, value: object, hint: str) -> None:
    """Refuse ``value`` unless it is a positive finite real number (Python's or NumPy's), naming the argument."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive finite number {hint}, got {value!r}")


def _check_beta(beta: float) -> None:
    """Refuse a ``beta`` that is not a positive finite number."""
    _check_positive("beta", beta, "(0.1 is usual)")


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float = 0.1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return ``(loss, chosen_rewards, rejected_rewards)``, each the mean over the batch.

    The inputs are ``(batch,)`` sequence log-probabilities of the policy and the reference model. The
    loss is ``-logsigmoid(beta * ((pc - rc) - (pr - rr)))``; the rewards ``beta * (p - r)`` are
    detached (they are for reporting). With policy == reference the loss is ln 2 and the rewards 0.
    """
    _check_beta(beta)
    shapes = {tuple(t.shape) for t in (policy_chosen, policy_rejected, ref_chosen, ref_rejected)}
    if len(shapes) != 1:
        raise ValueError(f"the four log-probability tensors must have one shape (batch,), got {sorted(shapes)}")
    chosen_logratios = policy_chosen - ref_chosen
    rejected_logratios = policy_rejected - ref_rejected
    losses = -F.logsigmoid(beta * (chosen_logratios - rejected_logratios))
    chosen_rewards = (beta * chosen_logratios).detach()
    rejected_rewards = (beta * rejected_logratios).detach()
    return losses.mean(), chosen_rewards.mean(), rejected_rewards.mean()


def _answer_logprobs(model: nn.Module, batch: dict, device: torch.device | str, average: bool = False,
                     header_tokens: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(chosen, rejected)`` sequence log-probabilities of one batch, both answers in one forward pass."""
    if batch["chosen"].shape != batch["rejected"].shape:
        raise ValueError(f"chosen {tuple(batch['chosen'].shape)} and rejected {tuple(batch['rejected'].shape)} must "
                         "be padded to one shape; build batches with collate_preferences")
    ids = torch.cat([batch["chosen"], batch["rejected"]]).to(device)  # (2 * batch, n_tokens)
    mask = torch.cat([batch["chosen_mask"], batch["rejected_mask"]]).to(device)
    logprobs = model_sequence_logprobs(model, ids, mask, average, header_tokens=header_tokens)
    return logprobs[:len(batch["chosen"])], logprobs[len(batch["chosen"]):]


def _pair_logprobs(policy: nn.Module, reference: nn.Module, batch: dict, device: torch.device | str,
                   average: bool = False, header_tokens: int = 0) -> tuple[torch.Tensor, ...]:
    """``(policy_chosen, policy_rejected, ref_chosen, ref_rejected)``; the reference runs in eval mode, no grad."""
    policy_chosen, policy_rejected = _answer_logprobs(policy, batch, device, average, header_tokens)
    with torch.no_grad(), eval_mode(reference):
        ref_chosen, ref_rejected = _answer_logprobs(reference, batch, device, average, header_tokens)
    return policy_chosen, policy_rejected, ref_chosen, ref_rejected


def dpo_batch_loss(policy: nn.Module, reference: nn.Module, batch: dict, beta: float,
                   device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``dpo_loss`` of one ``collate_preferences`` batch: gradients reach the policy, never the reference."""
    _check_beta(beta)
    return dpo_loss(*_pair_logprobs(policy, reference, batch, device), beta)


# ---------------------------------------------------------------------------------------------
# evaluation and training


def frozen_reference(policy: nn.Module) -> nn.Module:
    """A deep copy of ``policy`` in eval mode with every parameter's ``requires_grad`` off: DPO's reference."""
    reference = copy.deepcopy(unwrap_model(policy))
    reference.requires_grad_(False)
    return reference.eval()


@torch.no_grad()
def evaluate_dpo(policy: nn.Module, reference: nn.Module, loader: Iterable, beta: float,
                 device: torch.device | str, num_batches: int | None = None, *, average: bool = False,
                 header_tokens: int = 0, rewards_with_beta: bool = True) -> dict[str, float]:
    """Mean DPO ``loss``, ``reward_margin`` (chosen minus rejected reward) and ``accuracy`` over pairs, in eval mode.

    ``accuracy`` is the share of pairs whose chosen answer gets the strictly higher implicit reward; a
    tie (as for every pair when the policy equals the reference) counts as not preferred.

    By default an answer's log-probability is the sum over its masked tokens and a reward is beta times
    a log-ratio. The book's units: ``average=True`` (mean per scored token), ``header_tokens=4`` (also
    score ``### Response:\n``, 4 tokens in GPT-2's BPE; see ``sequence_logprobs``) and
    ``rewards_with_beta=False`` (the margin without beta). The loss keeps its beta either way, as the
    book's does; ``accuracy`` does not depend on beta.
    """
    _check_beta(beta)
    check_count("num_batches", num_batches, minimum=1, allow_none=True)
    check_count("header_tokens", header_tokens, minimum=0)
    totals = {"loss": 0.0, "reward_margin": 0.0, "accuracy": 0.0}
    pairs = 0
    with eval_mode(policy):
        for batch in islice(loader, num_batches):
            policy_chosen, policy_rejected, ref_chosen, ref_rejected = _pair_logprobs(policy, reference, batch, device,
                                                                                      average, header_tokens)
            loss, chosen_rewards, rejected_rewards = dpo_loss(policy_chosen, policy_rejected, ref_chosen,
                                                              ref_rejected, beta)
            preferred = beta * (policy_chosen - ref_chosen) > beta * (policy_rejected - ref_rejected)
            margin = (chosen_rewards - rejected_rewards).item()
            n = len(policy_chosen)
            totals["loss"] += loss.item() * n
            totals["reward_margin"] += (margin if rewards_with_beta else margin / beta) * n
            totals["accuracy"] += preferred.sum().item()
            pairs += n
    if pairs == 0:
        raise ValueError("the loader yielded no preference pairs (is it empty?)")
    return {key: value / pairs for key, value in totals.items()}


def preference_accuracy(policy: nn.Module, reference: nn.Module, loader: Iterable, beta: float,
                        device: torch.device | str | None = None, num_batches: int | None = None) -> float:
    """Share of the loader's pairs whose chosen answer gets the higher implicit reward (ties count as not)."""
    if device is None:
        device = next(policy.parameters()).device
    return evaluate_dpo(policy, reference, loader, beta, device, num_batches)["accuracy"]


def _check_training(policy: nn.Module, reference: nn.Module, optimizer: torch.optim.Optimizer, beta: float,
                    counts: dict[str, int], grad_clip: float | None) -> None:
    """Refuse a policy with nothing to train, a reference shared with it or the optimizer, an argument out of range."""
    _check_beta(beta)
    for name, value in counts.items():
        check_count(name, value, minimum=1)
    if grad_clip is not None:
        _check_positive("grad_clip", grad_clip, "or None (no clipping; 1.0 is usual)")
    if not any(p.requires_grad for p in policy.parameters()):
        raise ValueError("no parameter of the policy requires grad, so DPO has nothing to train: was the frozen "
                         "reference passed as the policy, or the policy frozen? Unfreeze what should train "
                         "(policy.requires_grad_(True), or the LoRA parameters)")
    if not torch.is_grad_enabled():
        raise RuntimeError("train_dpo was called while gradients are switched off (torch.no_grad() or "
                           "torch.inference_mode()); call it outside that block")
    reference_params = {id(p) for p in reference.parameters()}
    if any(id(p) in reference_params for p in policy.parameters()):
        raise ValueError("the reference shares parameters with the policy; pass a separate frozen copy: "
                         "reference = frozen_reference(policy)")
    if any(id(p) in reference_params for group in optimizer.param_groups for p in group["params"]):
        raise ValueError("the optimizer holds reference parameters; the reference must never be updated: "
                         "build the optimizer from policy.parameters()")


def _record(history: dict, policy: nn.Module, reference: nn.Module, loaders: tuple[Iterable, Iterable], beta: float,
            device: torch.device | str, eval_iter: int) -> None:
    """Evaluate on ``eval_iter`` batches of the train and validation loaders and append to ``history``."""
    for split, loader in zip(("train", "val"), loaders):
        result = evaluate_dpo(policy, reference, loader, beta, device, eval_iter)
        history[f"{split}_losses"].append(result["loss"])
        history[f"{split}_reward_margins"].append(result["reward_margin"])
        history[f"{split}_preference_accuracy"].append(result["accuracy"])


def _train_step(policy: nn.Module, reference: nn.Module, batch: dict, optimizer: torch.optim.Optimizer, beta: float,
                device: torch.device | str, precision: str, grad_clip: float | None, step: int,
                history: dict) -> tuple[float, float]:
    """One optimizer step of the policy on one batch; return its DPO loss and reward margin."""
    with autocast(device, precision):
        loss, chosen_rewards, rejected_rewards = dpo_batch_loss(policy, reference, batch, beta, device)
    if not torch.isfinite(loss):
        raise TrainingDiverged(f"the DPO loss became {loss.item()} at step {step}; lower the learning rate or beta, "
                               "or clip gradients (grad_clip)", step, history)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(policy.parameters(), grad_clip)
    optimizer.step()
    return loss.item(), (chosen_rewards - rejected_rewards).item()


def train_dpo(policy: nn.Module, reference: nn.Module, train_loader: Iterable, val_loader: Iterable,
              optimizer: torch.optim.Optimizer, device: torch.device | str, num_epochs: int, beta: float,
              eval_freq: int, eval_iter: int, *, precision: str = "float32", grad_clip: float | None = None,
              progress: bool = True, verbose: bool = False) -> dict[str, list]:
    """Train ``policy`` with the DPO loss against the frozen ``reference``; return the history.

    The reference runs in eval mode under no_grad and is never updated. Every ``eval_freq`` steps (and
    after the last) the loss, reward margin and preference accuracy are measured over ``eval_iter``
    batches of each loader. The history holds ``train_losses``, ``val_losses``, ``train_reward_margins``,
    ``val_reward_margins``, ``train_preference_accuracy``, ``val_preference_accuracy``, ``tokens_seen``
    and ``steps``, one entry per evaluation. ``precision`` is autocast's (``helpers.runtime.autocast``);
    ``verbose`` writes each evaluation under the tqdm bar. A NaN loss raises ``TrainingDiverged``.
    """
    _check_training(policy, reference, optimizer, beta,
                    {"num_epochs": num_epochs, "eval_freq": eval_freq, "eval_iter": eval_iter}, grad_clip)
    if compute_dtype(device, precision) == torch.float16:
        raise ValueError("float16 training needs loss scaling, which train_dpo does not do; use bfloat16 or float32")
    history: dict[str, list] = {f"{split}_{name}": [] for split in ("train", "val")
                                for name in ("losses", "reward_margins", "preference_accuracy")}
    history.update(tokens_seen=[], steps=[])
    total_steps, step, tokens_seen = len(train_loader) * num_epochs, 0, 0
    policy.train()
    bar = tqdm(total=total_steps, desc="DPO", unit="step", disable=not progress, mininterval=1.0)
    try:
        for _ in range(num_epochs):
            for batch in train_loader:
                loss, margin = _train_step(policy, reference, batch, optimizer, beta, device, precision, grad_clip,
                                           step, history)
                step += 1
                tokens_seen += batch["chosen"].numel() + batch["rejected"].numel()
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3f}", margin=f"{margin:.3f}", refresh=False)
                if step % eval_freq == 0 or step == total_steps:
                    _record(history, policy, reference, (train_loader, val_loader), beta, device, eval_iter)
                    history["tokens_seen"].append(tokens_seen)
                    history["steps"].append(step)
                    if verbose:
                        bar.write(f"step {step:4d}: train loss {history['train_losses'][-1]:.3f}, val loss "
                                  f"{history['val_losses'][-1]:.3f}, val reward margin "
                                  f"{history['val_reward_margins'][-1]:.3f}")
    finally:
        bar.close()
    return history
