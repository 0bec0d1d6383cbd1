"""Tests for helpers.classify: the spam splits, per-batch padding, the last-real-token head, the loop."""

from __future__ import annotations

import functools

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from helpers.classify import (
    SpamDataset,
    bag_of_words,
    baseline_accuracies,
    calc_accuracy_loader,
    calc_loss_loader,
    class_logits,
    classification_loader,
    classify_text,
    collate_classification,
    count_trainable_parameters,
    fit_length_threshold,
    fit_naive_bayes,
    last_real_positions,
    load_spam_splits,
    predict_length_threshold,
    predict_naive_bayes,
    prepare_for_classification,
    read_spam_collection,
    seen_in_training,
    train_classifier,
)
from helpers.model import GPTConfig, GPTModel, count_parameters
from helpers.train import TrainingDiverged

PAD = 50256


def _file_rows(mirror) -> list[tuple[str, str]]:
    """The SMS Spam Collection parsed by hand: one (label, text) per line, split at the first tab."""
    text = (mirror / "sms_spam" / "SMSSpamCollection").read_text(encoding="utf-8")
    return [tuple(line.split("\t", 1)) for line in text.splitlines()]


@pytest.fixture(scope="module")
def splits(mirror):
    return load_spam_splits(seed=123)


@pytest.fixture
def gpt2_vocab_model():
    """A tiny model with GPT-2's vocabulary (so tiktoken ids fit), context 128, with a 2-way head."""
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=50257, context_length=128, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.0)
    return prepare_for_classification(GPTModel(cfg), num_classes=2).eval()


# ---------------------------------------------------------------------------------------------
# data


def test_spam_splits_have_the_book_sizes_are_balanced_and_share_no_row(splits, mirror):
    # given the file parsed by hand
    rows = _file_rows(mirror)
    spam_lines = {index for index, (label, _) in enumerate(rows) if label == "spam"}
    assert len(rows) == 5574 and len(spam_lines) == 747

    # when the splits are loaded
    train, val, test = splits

    # then they have 1,045 / 149 / 300 rows, no index in two of them, and 747 of each class in all
    assert (len(train), len(val), len(test)) == (1045, 149, 300)
    indices = [set(frame.index) for frame in splits]
    assert not (indices[0] & indices[1] or indices[0] & indices[2] or indices[1] & indices[2])
    everything = indices[0] | indices[1] | indices[2]
    assert len(everything) == 1494 and spam_lines <= everything
    labels = [label for frame in splits for label in frame["Label"]]
    assert labels.count(0) == labels.count(1) == 747
    # and every row carries its own line's text and label (ham 0, spam 1)
    for frame in splits:
        for index, label, text in zip(frame.index, frame["Label"], frame["Text"]):
            assert (rows[index][0] == "spam", rows[index][1]) == (label == 1, text)


def test_spam_splits_are_reproducible_and_follow_the_seed(splits, mirror):
    again = load_spam_splits(seed=123)
    other = load_spam_splits(seed=7)
    assert all(list(a.index) == list(b.index) for a, b in zip(splits, again))
    assert list(other[0].index) != list(splits[0].index)


def test_seen_in_training_marks_test_texts_that_also_occur_in_train(splits):
    train, _, test = splits
    train_texts = set(train["Text"])
    expected = [text in train_texts for text in test["Text"]]

    mask = seen_in_training(test, train)

    assert list(mask) == expected and list(mask.index) == list(test.index)
    assert 0 < mask.sum() < len(test)  # the file repeats texts, but not all of them


def test_spam_dataset_holds_gpt2_ids_unpadded_and_truncates(splits, tiktoken_gpt2, gpt2_tok):
    train = splits[0].iloc[:20]
    full = SpamDataset(train, gpt2_tok)
    short = SpamDataset(train, gpt2_tok, max_length=5)
    for index, text in enumerate(train["Text"]):
        expected = tiktoken_gpt2.encode(text)
        ids, label = full[index]
        assert ids.tolist() == expected and int(label) == train["Label"].iloc[index]
        assert short[index][0].tolist() == expected[:5]
    assert full.longest == max(len(tiktoken_gpt2.encode(text)) for text in train["Text"])


def test_spam_dataset_refuses_a_message_longer_than_the_context(gpt2_tok, tiktoken_gpt2):
    frame = pd.DataFrame({"Label": [0, 1], "Text": ["short one", "word " * 30]})
    longest = len(tiktoken_gpt2.encode("word " * 30))
    with pytest.raises(ValueError, match=rf"message 1 has {longest} tokens but the model's context_length is 8"):
        SpamDataset(frame, gpt2_tok, context_length=8)
    assert [len(ids) for ids, _ in SpamDataset(frame, gpt2_tok, max_length=8, context_length=8)] == [2, 8]


def test_collate_pads_each_batch_to_its_own_longest_message():
    batch = [(torch.tensor([1, 2, 3]), torch.tensor(0)), (torch.tensor([4]), torch.tensor(1))]

    inputs, labels = collate_classification(batch, pad_token_id=PAD)
    fixed, _ = collate_classification(batch, pad_token_id=PAD, pad_to=6)

    assert inputs.tolist() == [[1, 2, 3], [4, PAD, PAD]] and labels.tolist() == [0, 1]
    assert fixed.tolist() == [[1, 2, 3, PAD, PAD, PAD], [4, PAD, PAD, PAD, PAD, PAD]]
    with pytest.raises(ValueError, match="pad_to=2 is shorter than a message of this batch"):
        collate_classification(batch, pad_to=2)


def test_classification_loader_batches_are_no_wider_than_their_longest_message(splits, gpt2_tok):
    dataset = SpamDataset(splits[0].iloc[:40], gpt2_tok)
    widths = [inputs.shape[1] for inputs, _ in classification_loader(dataset, batch_size=8)]
    expected = [max(len(ids) for ids in dataset.encoded[start:start + 8]) for start in range(0, 40, 8)]
    assert widths == expected
    fixed = [inputs.shape[1] for inputs, _ in classification_loader(dataset, batch_size=8, pad_to=dataset.longest)]
    assert fixed == [dataset.longest] * 5


# ---------------------------------------------------------------------------------------------
# reading the class at the last real token


def test_class_logits_do_not_change_with_the_amount_of_padding(gpt2_vocab_model, tiktoken_gpt2):
    ids = tiktoken_gpt2.encode("WINNER!! You have been selected to receive a prize, call now")
    padded = {width: torch.tensor([ids + [PAD] * (width - len(ids))]) for width in (40, 120)}

    ours = {width: class_logits(gpt2_vocab_model, batch) for width, batch in padded.items()}
    books = {width: class_logits(gpt2_vocab_model, batch, position="last") for width, batch in padded.items()}

    torch.testing.assert_close(ours[40], ours[120], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(books[40], books[120], atol=1e-3)  # the last position is a pad token


def test_class_logits_of_a_padded_batch_equal_each_message_run_alone(gpt2_vocab_model, tiktoken_gpt2):
    texts = ["Ok lar... Joking wif u oni...", "Free entry in 2 a wkly comp to win FA Cup final tkts", "Hi"]
    messages = [tiktoken_gpt2.encode(text) for text in texts]
    batch, _ = collate_classification([(torch.tensor(ids), torch.tensor(0)) for ids in messages])

    logits = class_logits(gpt2_vocab_model, batch)

    for row, ids in enumerate(messages):  # reference: the head on the last hidden state of the unpadded message
        hidden = gpt2_vocab_model(torch.tensor([ids]), return_hidden=True)[0, -1]
        torch.testing.assert_close(logits[row], gpt2_vocab_model.out_head(hidden), rtol=1e-5, atol=1e-5)


def test_last_real_positions_are_exact_with_lengths_when_a_row_ends_in_the_pad_id():
    ids = torch.tensor([[5, 6, PAD, PAD], [7, PAD, PAD, PAD], [1, 2, 3, 4]])
    assert last_real_positions(ids).tolist() == [1, 0, 3]
    assert last_real_positions(ids, lengths=torch.tensor([3, 1, 4])).tolist() == [2, 0, 3]
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]])
    assert last_real_positions(ids, attention_mask=mask).tolist() == [2, 0, 3]
    with pytest.raises(ValueError, match="row 0 has 0 real tokens"):
        last_real_positions(torch.tensor([[PAD, PAD]]))


# ---------------------------------------------------------------------------------------------
# the model surgery


def _block_parameters(cfg: GPTConfig) -> int:
    """Parameters of one transformer block, counted from its layers' shapes."""
    e = cfg.emb_dim
    qkv = 3 * (e * e + (e if cfg.qkv_bias else 0))
    out_proj = e * e + e
    feed_forward = (e * 4 * e + 4 * e) + (4 * e * e + e)
    norms = 2 * (2 * e)
    return qkv + out_proj + feed_forward + norms


@pytest.mark.parametrize("trainable_blocks", [0, 1, 2])
def test_prepare_for_classification_trains_the_last_blocks_final_norm_and_head(trainable_blocks):
    cfg = GPTConfig(vocab_size=97, context_length=16, emb_dim=32, n_heads=4, n_layers=3, drop_rate=0.0,
                    qkv_bias=True)
    model = prepare_for_classification(GPTModel(cfg), num_classes=3, trainable_blocks=trainable_blocks)
    head = cfg.emb_dim * 3 + 3
    final_norm = 2 * cfg.emb_dim
    assert model.out_head.weight.shape == (3, cfg.emb_dim)
    assert count_trainable_parameters(model) == trainable_blocks * _block_parameters(cfg) + final_norm + head
    assert all(not p.requires_grad for p in [*model.tok_emb.parameters(), *model.blocks[0].parameters()])


def test_prepare_for_classification_with_none_trains_everything_and_unties_the_head():
    cfg = GPTConfig(vocab_size=97, context_length=16, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.0,
                    tie_weights=True)
    torch.manual_seed(0)
    model = GPTModel(cfg)
    embedding = model.tok_emb.weight.detach().clone()

    prepare_for_classification(model, trainable_blocks=None)

    expected = 97 * 32 + 16 * 32 + 2 * _block_parameters(cfg) + 2 * 32 + (32 * 2 + 2)
    assert count_trainable_parameters(model) == count_parameters(model) == expected
    assert model.out_head.weight is not model.tok_emb.weight and not model.cfg.tie_weights
    torch.testing.assert_close(model.tok_emb.weight, embedding, rtol=0, atol=0)


@pytest.mark.parametrize("tie_weights", [False, True], ids=["untied", "tied"])
def test_a_classifier_round_trips_through_a_checkpoint_with_its_logits(tmp_path, tie_weights):
    # given a classifier made from a tied or untied model, its head moved away from its initial draw
    from helpers.checkpoint import load_checkpoint, save_checkpoint

    cfg = GPTConfig(vocab_size=97, context_length=16, emb_dim=32, n_heads=4, n_layers=1, drop_rate=0.0,
                    tie_weights=tie_weights)
    torch.manual_seed(0)
    model = prepare_for_classification(GPTModel(cfg)).eval()
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(3))

    # when it is saved and loaded into a model prepared the same way from its (untied) config
    save_checkpoint(tmp_path / "classifier", model)
    assert model.cfg.tie_weights is False
    fresh = prepare_for_classification(GPTModel(model.cfg)).eval()
    load_checkpoint(tmp_path / "classifier", fresh)

    # then it reads the same classes
    torch.testing.assert_close(class_logits(fresh, ids, pad_token_id=96), class_logits(model, ids, pad_token_id=96),
                               rtol=0, atol=0)


def test_prepare_for_classification_refuses_bad_arguments(tiny_model):
    with pytest.raises(ValueError, match="trainable_blocks=3 but the model has only 2 blocks"):
        prepare_for_classification(tiny_model, trainable_blocks=3)
    with pytest.raises(ValueError, match="num_classes must be an integer >= 2"):
        prepare_for_classification(tiny_model, num_classes=1)
    with pytest.raises(TypeError, match="expects a GPTModel"):
        prepare_for_classification(torch.nn.Linear(2, 2))


def test_a_model_without_a_classification_head_is_refused_everywhere(tiny_model, gpt2_tok):
    loader = [(torch.tensor([[1, 2]]), torch.tensor([0]))]
    optimizer = torch.optim.SGD(tiny_model.parameters(), lr=0.1)
    calls = [
        lambda: class_logits(tiny_model, torch.tensor([[1, 2]])),
        lambda: calc_loss_loader(loader, tiny_model, "cpu"),
        lambda: calc_accuracy_loader(loader, tiny_model, "cpu"),
        lambda: train_classifier(tiny_model, loader, loader, optimizer, "cpu", 1, 1, 1, progress=False),
        lambda: classify_text("hello", tiny_model, gpt2_tok, "cpu"),
    ]
    for call in calls:
        with pytest.raises(ValueError, match=r"no classification head \(its out_head has 101 outputs\).*"
                                             r"prepare_for_classification"):
            call()


# ---------------------------------------------------------------------------------------------
# loss, accuracy, training, prediction


def _toy_task(n: int, seed: int, pad: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Messages of filler tokens 10..19 holding token 3 (class 0) or token 4 (class 1) at a random place."""
    generator = torch.Generator().manual_seed(seed)
    items = []
    for index in range(n):
        label = index % 2
        length = int(torch.randint(3, 12, (1,), generator=generator))
        ids = torch.randint(10, 20, (length,), generator=generator)
        ids[int(torch.randint(0, length, (1,), generator=generator))] = 3 + label
        items.append((ids, torch.tensor(label)))
    assert all(pad not in ids for ids, _ in items)
    return items


def test_a_tiny_model_learns_a_separable_toy_task_to_full_accuracy(tiny_cfg):
    torch.manual_seed(123)
    pad = 100
    model = prepare_for_classification(GPTModel(tiny_cfg), trainable_blocks=None)
    collate = functools.partial(collate_classification, pad_token_id=pad)
    train = DataLoader(_toy_task(64, 1, pad), batch_size=8, shuffle=True, collate_fn=collate)
    val = DataLoader(_toy_task(32, 2, pad), batch_size=8, collate_fn=collate)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)

    history = train_classifier(model, train, val, optimizer, "cpu", num_epochs=12, eval_freq=16, eval_iter=2,
                               pad_token_id=pad, verbose=False, progress=False)

    assert calc_accuracy_loader(train, model, "cpu", pad_token_id=pad) == 1.0
    assert calc_accuracy_loader(val, model, "cpu", pad_token_id=pad) >= 0.9  # and it generalises (chance: 0.5)
    assert history["train_losses"][-1] < history["train_losses"][0]
    assert len(history["train_accs"]) == len(history["val_accs"]) == 12
    assert history["steps"] == list(range(16, 97, 16)) and history["examples_seen"] == [128 * k for k in range(1, 7)]


def test_loss_and_accuracy_loaders_match_a_hand_computation(gpt2_vocab_model, splits, gpt2_tok):
    dataset = SpamDataset(splits[1].iloc[:24], gpt2_tok, context_length=128, max_length=128)
    loader = classification_loader(dataset, batch_size=8)
    losses, correct = [], 0
    for inputs, labels in loader:  # reference: the head on each message's last hidden state, F.cross_entropy
        rows = [gpt2_vocab_model(ids[ids != PAD][None], return_hidden=True)[0, -1] for ids in inputs]
        logits = gpt2_vocab_model.out_head(torch.stack(rows))
        losses.append(F.cross_entropy(logits, labels).item())
        correct += (logits.argmax(-1) == labels).sum().item()
    gpt2_vocab_model.train()

    loss = calc_loss_loader(loader, gpt2_vocab_model, "cpu")
    accuracy = calc_accuracy_loader(loader, gpt2_vocab_model, "cpu", num_batches=10)

    assert loss == pytest.approx(sum(losses) / 3, rel=1e-5) and accuracy == pytest.approx(correct / 24)
    assert gpt2_vocab_model.training  # the mode is restored
    assert calc_loss_loader(loader, gpt2_vocab_model, "cpu", num_batches=1) == pytest.approx(losses[0], rel=1e-5)


def test_classify_text_answers_the_class_of_the_last_real_token(gpt2_vocab_model, tiktoken_gpt2, gpt2_tok):
    text = "You are a winner! Claim your free prize now"
    ids = torch.tensor([tiktoken_gpt2.encode(text)])
    expected = ("not spam", "spam")[int(class_logits(gpt2_vocab_model, ids).argmax())]
    padded = torch.tensor([tiktoken_gpt2.encode(text) + [PAD] * 20])
    book = ("not spam", "spam")[int(class_logits(gpt2_vocab_model, padded, position="last").argmax())]

    assert classify_text(text, gpt2_vocab_model, gpt2_tok, "cpu") == expected
    assert classify_text(text, gpt2_vocab_model, gpt2_tok, "cpu", max_length=ids.shape[1] + 20,
                         position="last") == book
    with pytest.raises(ValueError, match="has 200 tokens but the model's context_length is 128"):
        classify_text(" a" * 200, gpt2_vocab_model, gpt2_tok, "cpu")
    assert classify_text(" a" * 200, gpt2_vocab_model, gpt2_tok, "cpu", max_length=128) in ("spam", "not spam")


def test_numeric_arguments_are_checked(gpt2_vocab_model):
    loader = [(torch.tensor([[1, 2]]), torch.tensor([0]))]
    optimizer = torch.optim.SGD(gpt2_vocab_model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="eval_freq must be an integer >= 1, got 0"):
        train_classifier(gpt2_vocab_model, loader, loader, optimizer, "cpu", 1, 0, 1, progress=False)
    with pytest.raises(ValueError, match="num_epochs must be an integer >= 1"):
        train_classifier(gpt2_vocab_model, loader, loader, optimizer, "cpu", 0.5, 1, 1, progress=False)
    with pytest.raises(ValueError, match="num_batches must be an integer >= 1 or None, got 0"):
        calc_accuracy_loader(loader, gpt2_vocab_model, "cpu", num_batches=0)
    with pytest.raises(ValueError, match="position must be one of last_real, last"):
        class_logits(gpt2_vocab_model, torch.tensor([[1, 2]]), position="first")


def test_a_nan_loss_stops_training_naming_the_step(gpt2_vocab_model):
    loader = [(torch.tensor([[1, 2, 3]]), torch.tensor([1]))] * 2
    optimizer = torch.optim.SGD(gpt2_vocab_model.parameters(), lr=0.1)
    with torch.no_grad():
        gpt2_vocab_model.out_head.bias.fill_(float("nan"))
    with pytest.raises(TrainingDiverged, match="the loss became nan at step 0") as caught:
        train_classifier(gpt2_vocab_model, loader, loader, optimizer, "cpu", 1, 1, 1, progress=False)
    assert caught.value.step == 0


# ---------------------------------------------------------------------------------------------
# text and labels from outside: encoded as ordinary text, refused where they enter


EOT_TEXT = "Free entry <|endoftext|> reply WIN now"


def test_a_message_holding_the_end_of_text_string_is_encoded_as_ordinary_text(gpt2_tok, tiktoken_gpt2):
    # given a message that spells out GPT-2's special token
    frame = pd.DataFrame({"Label": ["spam", "ham"], "Text": [EOT_TEXT, "ok"]})

    # when it goes into a dataset
    dataset = SpamDataset(frame, gpt2_tok)

    # then it is the characters' tokens, as tiktoken encodes them with no special tokens allowed
    expected = tiktoken_gpt2.encode(EOT_TEXT, disallowed_special=())
    assert dataset[0][0].tolist() == expected and PAD not in expected


def test_classify_text_reads_a_message_holding_the_end_of_text_string_as_ordinary_text(gpt2_vocab_model, gpt2_tok,
                                                                                        tiktoken_gpt2):
    ids = torch.tensor([tiktoken_gpt2.encode(EOT_TEXT, disallowed_special=())])
    expected = ("not spam", "spam")[int(class_logits(gpt2_vocab_model, ids).argmax())]
    assert classify_text(EOT_TEXT, gpt2_vocab_model, gpt2_tok, "cpu") == expected


@pytest.mark.parametrize("text, problem", [
    (float("nan"), r"row 1 \(index 11\) has Text nan \(float\), not a string"),
    (42, r"row 1 \(index 11\) has Text 42 \(int\)"),
], ids=["nan", "int"])
def test_spam_dataset_refuses_a_text_that_is_not_a_string_naming_the_row(gpt2_tok, text, problem):
    frame = pd.DataFrame({"Label": [0, 1], "Text": ["fine", text]}, index=[10, 11])
    with pytest.raises(ValueError, match=problem):
        SpamDataset(frame, gpt2_tok)


@pytest.mark.parametrize("label, problem", [
    (2, r"row 1 \(index 1\) has Label 2; .*range\(2\)"),
    (-1, r"row 1 \(index 1\) has Label -1"),
    ("Spam", r"row 1 \(index 1\) has Label 'Spam'"),
    ("1", r"row 1 \(index 1\) has Label '1'"),
    (1.0, r"row 1 \(index 1\) has Label 1\.0"),
    (True, r"row 1 \(index 1\) has Label True"),
], ids=["too-large", "negative", "unknown-name", "digit-string", "float", "bool"])
def test_spam_dataset_refuses_a_label_that_is_not_a_class_index_naming_the_row(gpt2_tok, label, problem):
    frame = pd.DataFrame({"Label": pd.Series([0, label], dtype=object), "Text": ["fine", "also fine"]})
    with pytest.raises(ValueError, match=problem):
        SpamDataset(frame, gpt2_tok)


def test_spam_dataset_takes_labels_of_more_classes_when_told_how_many(gpt2_tok):
    frame = pd.DataFrame({"Label": [0, 2, "spam"], "Text": ["a", "b", "c"]})
    assert [int(label) for _, label in SpamDataset(frame, gpt2_tok, num_classes=3)] == [0, 2, 1]
    with pytest.raises(ValueError, match="num_classes must be an integer >= 2"):
        SpamDataset(frame, gpt2_tok, num_classes=1)


def test_collate_refuses_float_labels():
    batch = [(torch.tensor([1, 2]), torch.tensor(0.0)), (torch.tensor([3]), torch.tensor(1.0))]
    with pytest.raises(ValueError, match=r"labels must hold integer class indices, got dtype torch\.float32"):
        collate_classification(batch)


def test_labels_outside_the_models_classes_are_refused_naming_the_row(gpt2_vocab_model):
    # given a batch whose second label is not one of the model's two classes
    loader = [(torch.tensor([[1, 2], [3, 4]]), torch.tensor([1, 2]))]
    optimizer = torch.optim.SGD(gpt2_vocab_model.parameters(), lr=0.1)
    calls = {
        "loss": lambda: calc_loss_loader(loader, gpt2_vocab_model, "cpu"),
        "accuracy": lambda: calc_accuracy_loader(loader, gpt2_vocab_model, "cpu"),
        "train": lambda: train_classifier(gpt2_vocab_model, loader, loader, optimizer, "cpu", 1, 1, 1,
                                          progress=False, verbose=False),
    }
    for call in calls.values():
        with pytest.raises(ValueError, match=r"row 1 has label 2, outside range\(2\)"):
            call()


def test_read_spam_collection_keeps_a_tab_inside_a_message_and_refuses_a_line_without_one(tmp_path):
    # given a file in the collection's format whose second message holds a tab
    good = tmp_path / "good.tsv"
    good.write_text("ham\tsee you\nspam\tWIN\tcash now\nham\tok\n", encoding="utf-8")

    # when it is read, then the tab stays in the message and every row keeps its own label
    frame = read_spam_collection(good)
    assert frame.values.tolist() == [["ham", "see you"], ["spam", "WIN\tcash now"], ["ham", "ok"]]
    assert list(frame.index) == [0, 1, 2]

    # and a line that is not a label, a tab and a message is refused naming its line
    bad = tmp_path / "bad.tsv"
    bad.write_text("ham\tsee you\nno tab on this line\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.tsv, line 2: expected ham or spam, a tab and the message"):
        read_spam_collection(bad)


def test_calc_loss_batch_reads_each_row_at_its_last_token_before_the_callers_pad_id(tiny_cfg):
    # given a classifier and a batch right-padded with a custom pad id (100), where the padded end and the
    # last real token give different logits
    from helpers.classify import calc_loss_batch

    torch.manual_seed(0)
    model = prepare_for_classification(GPTModel(tiny_cfg)).eval()
    pad = 100
    inputs = torch.tensor([[5, 6, 7, pad, pad, pad], [8, 9, 10, 11, 12, 13]])
    labels = torch.tensor([1, 0])
    reference = F.cross_entropy(class_logits(model, inputs, pad_token_id=pad), labels)
    at_the_padded_end = F.cross_entropy(class_logits(model, inputs, position="last"), labels)
    assert not torch.isclose(reference, at_the_padded_end, atol=1e-4)  # so reading the wrong place shows

    # when / then the loss is the cross-entropy at the last real tokens
    loss = calc_loss_batch(inputs, labels, model, "cpu", pad_token_id=pad)
    torch.testing.assert_close(loss, reference, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# the baselines without a language model


def test_the_baselines_reproduce_part09s_committed_numbers_on_its_split(splits):
    # given Part 09's split (seed 123) and the numbers its committed outputs print
    train, _, test = splits

    # when the promoted baselines are fitted on the training rows
    accuracies = baseline_accuracies(train, test)

    # then: majority 49.67% (149 of 300), length 82.33% (247), naive Bayes 95.67% (287), unseen 95.08% (251 of 264)
    assert int(train["Label"].mode()[0]) == 0 and fit_length_threshold(train) == 31
    assert round(accuracies["majority class"]["test"] * len(test)) == 149
    assert round(accuracies["length threshold"]["test"] * len(test)) == 247
    assert round(accuracies["naive Bayes over words"]["test"] * len(test)) == 287
    assert round(accuracies["naive Bayes over words"]["unseen texts"] * 264) == 251
    assert f"{accuracies['majority class']['unseen texts']:.2%}" == "55.30%"
    assert f"{accuracies['length threshold']['unseen texts']:.2%}" == "80.68%"


def test_naive_bayes_weighs_the_words_of_each_class_and_survives_unseen_words():
    # given four messages, two of each class
    train = pd.DataFrame({"Text": ["win a prize now", "claim your prize", "see you at lunch", "lunch at noon?"],
                          "Label": [1, 1, 0, 0]})

    model = fit_naive_bayes(train)

    # then a prize message is spam, a lunch message is not, and a message of unseen words takes the prior
    assert predict_naive_bayes(model, ["prize prize", "lunch with you", "zebra"]).tolist() == [1, 0, 0]
    assert model[1]["word"]["prize"] > model[0]["word"]["prize"]
    assert bag_of_words("Call 09061 NOW!") == ["call", "09061", "now"]


def test_the_length_threshold_counts_tokens_of_the_tokenizer_it_is_given(gpt2_tok):
    # given short ham and long spam
    train = pd.DataFrame({"Text": ["ok", "see you", "WIN a brand new car today, call 0800 now to claim it"],
                          "Label": [0, 0, 1]})

    threshold = fit_length_threshold(train, gpt2_tok)

    assert threshold == len(gpt2_tok.encode("see you"))
    assert predict_length_threshold(threshold, ["hi", "a much longer message than the threshold allows"],
                                    gpt2_tok).tolist() == [0, 1]
