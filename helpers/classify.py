"""Classification finetuning (Part 09): the SMS spam data, a class head on GPTModel, its loss, loop and accuracy.

The class of a message is read from the hidden state of its *last real token*: with causal
attention that token has seen the whole message, and, unlike the last position of a padded row,
it does not depend on how much padding follows. Every loss, accuracy and prediction here goes
through ``class_logits``.

Three baselines without a language model give every score its yardstick (Part 09 built them, Part 11
promoted them): the majority class, a length threshold and multinomial naive Bayes over words
(``baseline_accuracies``).
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
import os
import re
import warnings
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from helpers.data import fetch
from helpers.model import is_decoder
from helpers.runtime import check_count, eval_mode, unwrap_model
from helpers.tokenizers import encode_user_text, gpt2_tokenizer
from helpers.train import TrainingDiverged

__all__ = [
    "CLASS_NAMES", "LABELS", "POSITIONS", "SpamDataset", "baseline_accuracies", "bag_of_words",
    "calc_accuracy_loader", "calc_loss_batch", "calc_loss_loader", "class_logits", "classification_loader",
    "classify_text", "collate_classification", "count_trainable_parameters", "fit_length_threshold",
    "fit_naive_bayes", "last_real_positions", "load_spam_splits", "predict_length_threshold",
    "predict_naive_bayes", "prepare_for_classification", "read_spam_collection", "seen_in_training",
    "train_classifier",
]

LABELS = {"ham": 0, "spam": 1}
"""The class index of each label of the SMS Spam Collection."""
CLASS_NAMES = ("not spam", "spam")
"""What ``classify_text`` answers for class 0 and class 1."""
POSITIONS = ("last_real", "last")
"""Where ``class_logits`` reads a row: its last real token (ours) or its last position (the book's)."""
GPT2_PAD_ID = 50256  # <|endoftext|>: GPT-2 has no padding token, so the series pads with this one


# ---------------------------------------------------------------------------------------------
# the data


def read_spam_collection(path: str | os.PathLike | None = None) -> pd.DataFrame:
    """All 5,574 rows of the SMS Spam Collection as a DataFrame with columns ``Label`` ("ham"/"spam") and ``Text``.

    Each line is a label, a tab and the message, read as it stands: quote characters are text, and
    a tab inside a message stays in ``Text`` (a CSV reader would shift such a row into the index).
    The index is the line number minus one. A line that is not a label and a tab raises ValueError
    naming it. ``path`` defaults to ``fetch("sms-spam")``.
    """
    path = fetch("sms-spam") if path is None else Path(path)
    lines = path.read_text(encoding="utf-8").removesuffix("\n").split("\n")
    return pd.DataFrame([_spam_row(path, number, line.removesuffix("\r")) for number, line in enumerate(lines, 1)],
                        columns=["Label", "Text"])


def _spam_row(path: Path, number: int, line: str) -> tuple[str, str]:
    """``(label, message)`` of one line of the collection: split at its first tab."""
    label, tab, text = line.partition("\t")
    if not tab or label not in LABELS:
        raise ValueError(f"{path}, line {number}: expected {' or '.join(LABELS)}, a tab and the message, got "
                         f"{line!r:.80}; restore the file (delete it and fetch('sms-spam') again)")
    return label, text


def load_spam_splits(seed: int = 123, train_frac: float = 0.7,
                     val_frac: float = 0.1) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Balanced train / validation / test DataFrames (1,045 / 149 / 300 rows by default).

    Ham is undersampled to the 747 spam messages, the 1,494 rows are shuffled and cut 70/10/20, all
    with ``random_state=seed``. ``Label`` holds ints (ham 0, spam 1); the index is the row's line in
    the file, so no index appears in two splits. The file repeats some texts: see ``seen_in_training``.
    """
    if not (train_frac > 0 and val_frac >= 0 and train_frac + val_frac < 1):
        raise ValueError(f"train_frac ({train_frac}) and val_frac ({val_frac}) must be positive and sum to "
                         "less than 1 (the test split gets the rest)")
    df = read_spam_collection()
    spam = df[df["Label"] == "spam"]
    ham = df[df["Label"] == "ham"].sample(len(spam), random_state=seed)  # undersample to balance
    balanced = pd.concat([ham, spam]).sample(frac=1, random_state=seed)  # shuffle
    balanced["Label"] = balanced["Label"].map(LABELS)
    train_end = int(len(balanced) * train_frac)
    val_end = train_end + int(len(balanced) * val_frac)
    return balanced.iloc[:train_end], balanced.iloc[train_end:val_end], balanced.iloc[val_end:]


def seen_in_training(test_df: pd.DataFrame, train_df: pd.DataFrame) -> pd.Series:
    """A boolean Series over ``test_df``: True where the same text also occurs in ``train_df``.

    ``.sum()`` counts the repeated texts; ``test_df[~mask]`` keeps the unseen ones.
    """
    return test_df["Text"].isin(set(train_df["Text"]))


class SpamDataset(Dataset):
    """Token ids and class labels of a DataFrame's ``Text`` and ``Label`` columns, one message per item.

    Items are ``(ids, label)`` with ``ids`` unpadded; ``collate_classification`` pads each batch.
    Texts are encoded by ``encode_user_text`` (a literal ``<|endoftext|>`` is ordinary text). Labels
    are "ham"/"spam" or integer class indices in ``range(num_classes)``; a row with another label or
    a text that is not a string (NaN) is refused, naming the row. ``max_length`` truncates every
    message to its first ``max_length`` tokens; a message still longer than ``context_length`` (the
    model's) is refused, naming both numbers.
    """

    def __init__(self, df: pd.DataFrame, tokenizer, max_length: int | None = None,
                 pad_token_id: int = GPT2_PAD_ID, *, context_length: int = 1024, num_classes: int = len(LABELS)):
        missing = {"Text", "Label"} - set(df.columns)
        if missing:
            raise ValueError(f"the DataFrame needs the columns Text and Label; missing {sorted(missing)}")
        check_count("max_length", max_length, minimum=1, allow_none=True)
        check_count("context_length", context_length, minimum=1)
        check_count("num_classes", num_classes, minimum=2)
        self.pad_token_id = pad_token_id
        self.max_length = max_length
        rows = [f"row {position} (index {index})" for position, index in enumerate(df.index)]
        self.labels = [_class_index(label, num_classes, row) for label, row in zip(df["Label"], rows)]
        self.encoded = [_encode_text(tokenizer, text, row)[:max_length] for text, row in zip(df["Text"], rows)]
        for index, ids in enumerate(self.encoded):
            if not ids:
                raise ValueError(f"message {index} has no tokens: drop empty texts before building the dataset")
            if len(ids) > context_length:
                raise ValueError(f"message {index} has {len(ids)} tokens but the model's context_length is "
                                 f"{context_length}; pass max_length={context_length} (or less) to truncate")

    @property
    def longest(self) -> int:
        """The number of tokens of the longest message (what the book pads every message to)."""
        return max(len(ids) for ids in self.encoded)

    def __len__(self) -> int:
        return len(self.encoded)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.tensor(self.encoded[index]), torch.tensor(self.labels[index])


def _class_index(label: object, num_classes: int, row: str) -> int:
    """A row's label as a class index: "ham"/"spam", or an integer in ``range(num_classes)``."""
    if isinstance(label, str):
        label = LABELS.get(label, label)
    if isinstance(label, numbers.Integral) and not isinstance(label, bool) and 0 <= label < num_classes:
        return int(label)
    raise ValueError(f"{row} has Label {label!r}; a label must be {' or '.join(map(repr, LABELS))} or an integer "
                     f"class index in range({num_classes}) (not a float or other string): fix or drop that row")


def _encode_text(tokenizer, text: object, row: str) -> list[int]:
    """A row's message as token ids, refused naming the row unless it is a string (NaN is a missing text)."""
    if not isinstance(text, str):
        raise ValueError(f"{row} has Text {text!r} ({type(text).__name__}), not a string; drop or fill missing "
                         "texts first (df.dropna(subset=['Text']))")
    return encode_user_text(tokenizer, text)


def _check_labels(name: str, labels: torch.Tensor, num_classes: int | None = None) -> None:
    """Refuse labels that are not integer class indices (in ``range(num_classes)`` when given), naming the row."""
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise ValueError(f"{name} must hold integer class indices, got dtype {labels.dtype}: use torch.long labels")
    if num_classes is not None:
        flat = labels.reshape(-1)
        outside = (flat < 0) | (flat >= num_classes)
        if bool(outside.any()):
            row = int(outside.nonzero()[0, 0])
            raise ValueError(f"{name} row {row} has label {int(flat[row])}, outside range({num_classes}) of the "
                             f"model's {num_classes} classes")


def collate_classification(batch: Sequence[tuple[torch.Tensor, torch.Tensor]], pad_token_id: int = GPT2_PAD_ID,
                           pad_to: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack ``(ids, label)`` items into ``(inputs (batch, n_tokens), labels (batch,))``, padding on the right.

    Rows are padded with ``pad_token_id`` to the longest message of this batch, or to ``pad_to``
    tokens when given (the book pads every batch to the longest message of the dataset).
    """
    longest = max(len(ids) for ids, _ in batch)
    check_count("pad_to", pad_to, minimum=1, allow_none=True)
    if pad_to is not None and pad_to < longest:
        raise ValueError(f"pad_to={pad_to} is shorter than a message of this batch ({longest} tokens)")
    width = longest if pad_to is None else pad_to
    inputs = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
    for row, (ids, _) in enumerate(batch):
        inputs[row, :len(ids)] = ids
    labels = torch.stack([torch.as_tensor(label) for _, label in batch])
    _check_labels("labels", labels)
    return inputs, labels


def classification_loader(dataset: SpamDataset, batch_size: int = 8, shuffle: bool = False,
                          drop_last: bool = False, pad_to: int | None = None, num_workers: int = 0,
                          generator: torch.Generator | None = None) -> DataLoader:
    """A DataLoader over ``dataset`` whose batches are padded by ``collate_classification``."""
    collate = functools.partial(collate_classification, pad_token_id=dataset.pad_token_id, pad_to=pad_to)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last,
                      num_workers=num_workers, collate_fn=collate, generator=generator)


# ---------------------------------------------------------------------------------------------
# the model: a class head, and where to read it


def count_trainable_parameters(model: nn.Module) -> int:
    """Number of parameters that will receive gradients (``requires_grad``)."""
    return sum(parameter.numel() for parameter in model.parameters() if parameter.requires_grad)


def prepare_for_classification(model: nn.Module, num_classes: int = 2, trainable_blocks: int | None = 1) -> nn.Module:
    """Give ``model`` a ``num_classes``-way output head and freeze what should not train; return it.

    ``model`` is a decoder of ``helpers.model``'s protocol: a ``GPTModel`` or a ``ModernModel``.

    The new head is ``nn.Linear(emb_dim, num_classes)`` (a head tied to the embedding is untied by
    the replacement). Everything is frozen except the last ``trainable_blocks`` transformer blocks,
    the final LayerNorm and the head; ``trainable_blocks=None`` trains everything. Changed in place.
    """
    core = unwrap_model(model)
    if not is_decoder(core):
        raise TypeError(f"prepare_for_classification expects a GPTModel or ModernModel (helpers.model's decoder "
                        f"protocol), got {type(core).__name__}")
    check_count("num_classes", num_classes, minimum=2)
    check_count("trainable_blocks", trainable_blocks, minimum=0, allow_none=True)
    n_layers = len(core.blocks)
    if trainable_blocks is not None and trainable_blocks > n_layers:
        raise ValueError(f"trainable_blocks={trainable_blocks} but the model has only {n_layers} blocks; "
                         "pass None to train everything")
    old = core.out_head.weight
    core.out_head = nn.Linear(core.cfg.emb_dim, num_classes).to(device=old.device, dtype=old.dtype)
    core.cfg = dataclasses.replace(core.cfg, tie_weights=False)
    core.num_classes = num_classes  # the mark class_logits checks
    train_all = trainable_blocks is None
    for parameter in core.parameters():
        parameter.requires_grad_(train_all)
    if not train_all:
        trained = [core.final_norm, core.out_head, *(core.blocks[n_layers - trainable_blocks:])]
        for module in trained:
            module.requires_grad_(True)
    return model


def _require_classifier(model: nn.Module) -> nn.Module:
    """The unwrapped model, or a ValueError if it has no classification head."""
    core = unwrap_model(model)
    if getattr(core, "num_classes", None) is None:
        outputs = getattr(getattr(core, "out_head", None), "out_features", "?")
        raise ValueError(f"this model has no classification head (its out_head has {outputs} outputs); "
                         "call helpers.classify.prepare_for_classification(model, num_classes=2) first")
    return core


def last_real_positions(input_ids: torch.Tensor, pad_token_id: int = GPT2_PAD_ID, *,
                        lengths: torch.Tensor | None = None,
                        attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The index ``(batch,)`` of each right-padded row's last real token.

    Without ``lengths`` or ``attention_mask``, the real tokens are those before the trailing run of
    ``pad_token_id``. GPT-2's pad id is also ``<|endoftext|>``, which a text encoded without special
    tokens never contains; for rows that may end in it, pass ``lengths`` (real tokens per row) or
    ``attention_mask`` (1 on real tokens) to be exact.
    """
    batch, n_tokens = input_ids.shape
    if attention_mask is not None:
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)} but input_ids has "
                             f"{tuple(input_ids.shape)}")
        lengths = attention_mask.sum(dim=1)
    elif lengths is None:
        is_pad = (input_ids == pad_token_id).long()  # (batch, n_tokens)
        trailing_pads = is_pad.flip(1).cumprod(dim=1).sum(dim=1)  # (batch,): length of the trailing run
        lengths = n_tokens - trailing_pads
    lengths = torch.as_tensor(lengths, device=input_ids.device).long()
    if lengths.shape != (batch,):
        raise ValueError(f"lengths must have shape ({batch},), one per row, got {tuple(lengths.shape)}")
    if bool((lengths < 1).any()) or bool((lengths > n_tokens).any()):
        row = int(((lengths < 1) | (lengths > n_tokens)).nonzero()[0, 0])
        raise ValueError(f"row {row} has {int(lengths[row])} real tokens; every row needs between 1 and "
                         f"{n_tokens} (a row of nothing but pad_token_id={pad_token_id} has no token to read)")
    return lengths - 1


def class_logits(model: nn.Module, input_ids: torch.Tensor, pad_token_id: int = GPT2_PAD_ID, *,
                 position: str = "last_real", lengths: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The class logits ``(batch, num_classes)`` of right-padded token ids ``(batch, n_tokens)``.

    ``position="last_real"`` reads each row at its last real token (see ``last_real_positions``), so
    extra padding does not change the result; ``"last"`` reads the last position, as the book does.
    Only the selected hidden states go through the head.
    """
    core = _require_classifier(model)
    if position not in POSITIONS:
        raise ValueError(f"position must be one of {', '.join(POSITIONS)}, got {position!r}")
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (batch, n_tokens) token ids, got shape {tuple(input_ids.shape)}")
    hidden = model(input_ids, return_hidden=True)  # (batch, n_tokens, emb_dim)
    if position == "last":
        return core.out_head(hidden[:, -1, :])
    positions = last_real_positions(input_ids, pad_token_id, lengths=lengths, attention_mask=attention_mask)
    rows = torch.arange(input_ids.shape[0], device=input_ids.device)
    return core.out_head(hidden[rows, positions])  # (batch, emb_dim) -> (batch, num_classes)


# ---------------------------------------------------------------------------------------------
# loss, accuracy, the training loop, one prediction


def calc_loss_batch(input_batch: torch.Tensor, target_batch: torch.Tensor, model: nn.Module,
                    device: torch.device | str, *, pad_token_id: int = GPT2_PAD_ID,
                    position: str = "last_real") -> torch.Tensor:
    """Mean cross-entropy of one batch's class logits against its labels (a scalar that can be backpropagated).

    Labels must be integer class indices of the model's classes; others raise ValueError.
    """
    _check_labels("target_batch", target_batch, _require_classifier(model).num_classes)
    logits = class_logits(model, input_batch.to(device), pad_token_id, position=position)
    return F.cross_entropy(logits, target_batch.to(device))


def _evaluate_batches(data_loader: Iterable, model: nn.Module, num_batches: int | None,
                      measure: Callable[[torch.Tensor, torch.Tensor], tuple[float, int]]) -> float:
    """Sum ``measure(inputs, labels) -> (value, count)`` over the first ``num_batches`` batches in eval mode;
    return sum(value) / sum(count), or NaN (with a warning) for an empty loader."""
    check_count("num_batches", num_batches, minimum=1, allow_none=True)
    limit = len(data_loader) if num_batches is None else min(num_batches, len(data_loader))
    if limit == 0:
        warnings.warn("the loader yields no batches (too little data, or drop_last with a large batch_size?); "
                      "returning NaN", stacklevel=3)
        return float("nan")
    total, count = 0.0, 0
    with eval_mode(model), torch.no_grad():
        for index, (input_batch, target_batch) in enumerate(data_loader):
            if index >= limit:
                break
            value, n = measure(input_batch, target_batch)
            total, count = total + value, count + n
    return total / count


def calc_loss_loader(data_loader: Iterable, model: nn.Module, device: torch.device | str,
                     num_batches: int | None = None, *, pad_token_id: int = GPT2_PAD_ID,
                     position: str = "last_real") -> float:
    """Mean batch loss over the first ``num_batches`` batches (all by default), in eval mode; NaN if none."""
    def batch_loss(inputs, labels):
        return calc_loss_batch(inputs, labels, model, device, pad_token_id=pad_token_id, position=position).item(), 1
    return _evaluate_batches(data_loader, model, num_batches, batch_loss)


def calc_accuracy_loader(data_loader: Iterable, model: nn.Module, device: torch.device | str,
                         num_batches: int | None = None, *, pad_token_id: int = GPT2_PAD_ID,
                         position: str = "last_real") -> float:
    """Fraction of examples classified correctly over the first ``num_batches`` batches, in eval mode."""
    def batch_correct(inputs, labels):
        _check_labels("labels", labels, _require_classifier(model).num_classes)
        logits = class_logits(model, inputs.to(device), pad_token_id, position=position)
        return (logits.argmax(dim=-1) == labels.to(device)).sum().item(), len(labels)
    return _evaluate_batches(data_loader, model, num_batches, batch_correct)


def _train_step(model: nn.Module, optimizer: torch.optim.Optimizer, batch: tuple[torch.Tensor, torch.Tensor],
                device, step: int, history: dict, reading: dict) -> float:
    """Zero the gradients, compute the loss, backpropagate, step; return the loss."""
    input_batch, target_batch = batch
    optimizer.zero_grad(set_to_none=True)
    loss = calc_loss_batch(input_batch, target_batch, model, device, **reading)
    if not torch.isfinite(loss):
        raise TrainingDiverged(f"the loss became {loss.item()} at step {step}; lower the learning rate",
                               step, history)
    loss.backward()
    optimizer.step()
    return loss.item()


def _record_losses(history: dict, model: nn.Module, loaders: tuple[Iterable, Iterable], device,
                   eval_iter: int | None, reading: dict, step: int, examples_seen: int) -> str:
    """Measure the train and validation losses, append them to ``history``; return a line for the log."""
    train_loss, val_loss = (calc_loss_loader(loader, model, device, eval_iter, **reading) for loader in loaders)
    for key, value in (("train_losses", train_loss), ("val_losses", val_loss), ("steps", step),
                       ("examples_seen", examples_seen)):
        history[key].append(value)
    return f"step {step:4d}: train loss {train_loss:.3f}, val loss {val_loss:.3f}"


def _record_accuracies(history: dict, model: nn.Module, loaders: tuple[Iterable, Iterable], device,
                       eval_iter: int | None, reading: dict, epoch: int) -> str:
    """Measure the train and validation accuracies, append them to ``history``; return a line for the log."""
    train_acc, val_acc = (calc_accuracy_loader(loader, model, device, eval_iter, **reading) for loader in loaders)
    history["train_accs"].append(train_acc)
    history["val_accs"].append(val_acc)
    return f"epoch {epoch + 1}: train accuracy {train_acc:.2%}, val accuracy {val_acc:.2%}"


def train_classifier(model: nn.Module, train_loader: Iterable, val_loader: Iterable,
                     optimizer: torch.optim.Optimizer, device: torch.device | str, num_epochs: int, eval_freq: int,
                     eval_iter: int | None, *, pad_token_id: int = GPT2_PAD_ID, position: str = "last_real",
                     verbose: bool = True, progress: bool = True) -> dict:
    """Finetune a classifier for ``num_epochs``; return the history.

    For every batch: zero the gradients, compute the loss at the class position, backpropagate, step.
    Every ``eval_freq`` steps (and after the last) the train and validation losses are measured over
    ``eval_iter`` batches (None: all); after each epoch, the train and validation accuracies. The
    history has ``train_losses``, ``val_losses``, ``steps`` and ``examples_seen`` (one per loss
    evaluation), and ``train_accs``, ``val_accs`` (one per epoch). ``verbose`` prints each
    evaluation; ``progress`` shows a tqdm bar. A NaN or infinite loss raises ``TrainingDiverged``.
    """
    _require_classifier(model)
    for name, value in (("num_epochs", num_epochs), ("eval_freq", eval_freq)):
        check_count(name, value, minimum=1)
    check_count("eval_iter", eval_iter, minimum=1, allow_none=True)
    if len(train_loader) == 0:
        raise ValueError("train_loader yields no batches: use a smaller batch_size or drop_last=False")
    reading = {"pad_token_id": pad_token_id, "position": position}
    loaders = (train_loader, val_loader)
    history: dict[str, list] = {key: [] for key in
                                ("train_losses", "val_losses", "steps", "examples_seen", "train_accs", "val_accs")}
    total_steps, step, examples_seen = num_epochs * len(train_loader), 0, 0
    bar = tqdm(total=total_steps, desc="finetuning", unit="step", disable=not progress, mininterval=1.0)
    report = bar.write if verbose else (lambda _: None)  # bar.write keeps the bar below the printed lines
    with bar:
        for epoch in range(num_epochs):
            model.train()
            for batch in train_loader:
                loss = _train_step(model, optimizer, batch, device, step, history, reading)
                step, examples_seen = step + 1, examples_seen + len(batch[1])
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
                if step % eval_freq == 0 or step == total_steps:
                    report(_record_losses(history, model, loaders, device, eval_iter, reading, step, examples_seen))
            report(_record_accuracies(history, model, loaders, device, eval_iter, reading, epoch))
    return history


def classify_text(text: str, model: nn.Module, tokenizer, device: torch.device | str, max_length: int | None = None,
                  *, pad_token_id: int = GPT2_PAD_ID, position: str = "last_real",
                  class_names: Sequence[str] = CLASS_NAMES) -> str:
    """``"spam"`` or ``"not spam"`` (``class_names[predicted class]``) for one message.

    The text is encoded by ``encode_user_text`` (a literal ``<|endoftext|>`` is ordinary text).
    ``max_length`` truncates the message to its first ``max_length`` tokens; with
    ``position="last"`` the ids are then padded to ``max_length``, as the book's batches were.
    A message longer than the model's context without ``max_length`` is refused, naming both numbers.
    """
    core = _require_classifier(model)
    if len(class_names) != core.num_classes:
        raise ValueError(f"class_names has {len(class_names)} names but the model has {core.num_classes} classes")
    check_count("max_length", max_length, minimum=1, allow_none=True)
    ids = encode_user_text(tokenizer, text)[:max_length]
    context = core.cfg.context_length
    if not ids:
        raise ValueError("the text has no tokens; give a non-empty message")
    if len(ids) > context:
        raise ValueError(f"the message has {len(ids)} tokens but the model's context_length is {context}; "
                         f"pass max_length={context} (or less) to truncate")
    real_tokens = len(ids)
    if position == "last" and max_length is not None:
        ids = ids + [pad_token_id] * (max_length - real_tokens)
    inputs = torch.tensor([ids], device=device)  # (1, n_tokens)
    with eval_mode(model), torch.no_grad():
        logits = class_logits(model, inputs, pad_token_id, position=position, lengths=torch.tensor([real_tokens]))
    return class_names[int(logits.argmax(dim=-1))]


# ---------------------------------------------------------------------------------------------
# three baselines without a language model (Part 09's, the same code)


def bag_of_words(text: str) -> list[str]:
    """Lowercased runs of letters, digits and underscores: ``"Call 09061 NOW!"`` -> ``["call", "09061", "now"]``."""
    return re.findall(r"\w+", text.lower())


def fit_naive_bayes(train: pd.DataFrame) -> dict:
    """Multinomial naive Bayes over words, fitted on ``train`` (columns ``Text`` and ``Label`` 0/1).

    Per class: ``prior`` (the log of its share of training messages), ``word`` (each training word's
    log-probability, every count plus one, Laplace smoothing) and ``unseen`` (that of a word never
    seen in training: one extra slot in the vocabulary).
    """
    counts = {label: pd.Series([w for text in train["Text"][train["Label"] == label] for w in bag_of_words(text)],
                               dtype=object).value_counts() for label in (0, 1)}
    vocabulary = counts[0].index.union(counts[1].index)
    model = {}
    for label, count in counts.items():
        total = count.sum() + len(vocabulary) + 1  # add one to every count, and one slot for unseen words
        word_logp = np.log((count.reindex(vocabulary, fill_value=0) + 1) / total)
        model[label] = {"prior": np.log((train["Label"] == label).mean()), "word": word_logp.to_dict(),
                        "unseen": np.log(1 / total)}
    return model


def predict_naive_bayes(model: dict, texts: Iterable[str]) -> np.ndarray:
    """The class (0 or 1) whose log prior plus summed word log-probabilities is larger, per text."""
    scores = [[m["prior"] + sum(m["word"].get(w, m["unseen"]) for w in bag_of_words(text)) for m in model.values()]
              for text in texts]
    return np.argmax(scores, axis=1)


def _token_counts(texts: Iterable[str], tokenizer) -> np.ndarray:
    tokenizer = gpt2_tokenizer() if tokenizer is None else tokenizer
    return np.array([len(encode_user_text(tokenizer, text)) for text in texts])


def fit_length_threshold(train: pd.DataFrame, tokenizer=None) -> int:
    """The ``n`` for which "spam if longer than ``n`` tokens" labels the most training messages right.

    Lengths are counted in ``tokenizer``'s tokens (default GPT-2's, as Part 09 counts them); of equally
    good thresholds the smallest wins.
    """
    n_tokens, labels = _token_counts(train["Text"], tokenizer), train["Label"].to_numpy()
    candidates = np.unique(n_tokens)
    return int(candidates[np.argmax([((n_tokens > n) == labels).mean() for n in candidates])])


def predict_length_threshold(threshold: int, texts: Iterable[str], tokenizer=None) -> np.ndarray:
    """1 (spam) for each text longer than ``threshold`` tokens of ``tokenizer`` (default GPT-2's), else 0."""
    return (_token_counts(texts, tokenizer) > threshold).astype(int)


def baseline_accuracies(train: pd.DataFrame, test: pd.DataFrame, tokenizer=None) -> dict[str, dict[str, float]]:
    """Each baseline fitted on ``train``: its accuracy on ``test`` and on the test texts not in ``train``.

    The keys are ``"majority class"``, ``"length threshold"`` (in ``tokenizer``'s tokens, default
    GPT-2's) and ``"naive Bayes over words"``; each value holds ``"test"`` and ``"unseen texts"``
    (see ``seen_in_training``). On Part 09's split: 49.67%, 82.33% and 95.67% of the test messages.
    """
    majority = int(train["Label"].mode()[0])
    threshold, bayes = fit_length_threshold(train, tokenizer), fit_naive_bayes(train)
    predictions = {"majority class": np.full(len(test), majority),
                   "length threshold": predict_length_threshold(threshold, test["Text"], tokenizer),
                   "naive Bayes over words": predict_naive_bayes(bayes, test["Text"])}
    unseen = ~seen_in_training(test, train).to_numpy()
    right = {name: guess == test["Label"].to_numpy() for name, guess in predictions.items()}
    return {name: {"test": float(r.mean()), "unseen texts": float(r[unseen].mean())} for name, r in right.items()}
