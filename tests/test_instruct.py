"""Tests for helpers.instruct: splits, the prompt format, batches, the loss on them, answers, ROUGE-L."""

from __future__ import annotations

import copy
import json
import random
import re
import warnings

import pytest
import torch
import torch.nn.functional as F

from helpers.generate import generate
from helpers.instruct import (
    RESPONSE_HEADER,
    InstructionDataError,
    InstructionDataset,
    baseline_scores,
    collate_instructions,
    constant_baseline,
    echo_baseline,
    extract_response,
    format_input,
    format_training_text,
    generate_responses,
    load_instruction_splits,
    mean_rouge_l,
    rouge_l,
)
from helpers.model import GPTConfig, GPTModel
from helpers.tokenizers import encode_user_text
from helpers.train import calc_loss_batch

PREAMBLE = ("Below is an instruction that describes a task. "
            "Write a response that appropriately completes the request.")
WITH_INPUT = {"instruction": "Rewrite the sentence using a simile.", "input": "The car is very fast.",
              "output": "The car is as fast as lightning."}
WITHOUT_INPUT = {"instruction": "Name a primary color.", "input": "", "output": "Red."}


@pytest.fixture(scope="module")
def splits():
    return load_instruction_splits()


@pytest.fixture(scope="module")
def file_records(splits):
    from helpers.data import fetch

    return json.loads(fetch("instruction-data").read_text(encoding="utf-8"))


# --- splits -------------------------------------------------------------------------------------------


def test_splits_are_935_110_55_in_the_files_order(splits, file_records):
    train, test, validation = splits
    assert (len(train), len(test), len(validation)) == (935, 110, 55)
    assert train + test + validation == file_records


def test_a_seed_shuffles_a_copy_with_random_random_before_splitting(file_records):
    expected = list(file_records)
    random.Random(7).shuffle(expected)
    train, test, validation = load_instruction_splits(seed=7)
    assert train + test + validation == expected
    assert load_instruction_splits(seed=7)[1] == test  # the same seed, the same split
    assert test != load_instruction_splits(seed=8)[1]


def test_a_malformed_record_is_refused_naming_its_index(tmp_path, monkeypatch):
    records = [WITH_INPUT, WITHOUT_INPUT, {"instruction": "x", "input": "", "output": 3}]
    path = tmp_path / "instruction-data.json"
    path.write_text(json.dumps(records))
    monkeypatch.setattr("helpers.instruct.fetch", lambda name: path)
    with pytest.raises(InstructionDataError, match=r"record 2 field 'output' is a int"):
        load_instruction_splits()
    path.write_text(json.dumps([WITH_INPUT, {"instruction": "x", "output": "y"}]))
    with pytest.raises(InstructionDataError, match=r"record 1 has no 'input' key"):
        load_instruction_splits()


# --- the prompt ---------------------------------------------------------------------------------------


def test_format_input_with_an_input_shows_both_sections():
    expected = (f"{PREAMBLE}\n\n### Instruction:\nRewrite the sentence using a simile."
                "\n\n### Input:\nThe car is very fast.")
    assert format_input(WITH_INPUT) == expected


def test_format_input_without_an_input_has_no_input_section():
    assert format_input(WITHOUT_INPUT) == f"{PREAMBLE}\n\n### Instruction:\nName a primary color."


def test_training_text_appends_the_response_and_extraction_recovers_it():
    text = format_training_text(WITHOUT_INPUT)
    assert text == f"{PREAMBLE}\n\n### Instruction:\nName a primary color.\n\n### Response:\nRed."
    prompt = format_input(WITHOUT_INPUT)
    assert extract_response(text, prompt) == "Red."
    assert extract_response(text + "<|endoftext|>More text", prompt) == "Red."
    assert extract_response(text) == "Red."  # without the prompt: what follows the header


# --- batches ------------------------------------------------------------------------------------------


def test_collate_matches_the_issues_worked_example():
    inputs, targets = collate_instructions([[0, 1, 2, 3, 4], [5, 6], [7, 8, 9]])
    assert inputs.tolist() == [[0, 1, 2, 3, 4], [5, 6, 50256, 50256, 50256], [7, 8, 9, 50256, 50256]]
    assert targets.tolist() == [[1, 2, 3, 4, 50256], [6, 50256, -100, -100, -100], [8, 9, 50256, -100, -100]]
    assert inputs.dtype == targets.dtype == torch.long


def test_collate_truncates_to_allowed_max_length():
    inputs, targets = collate_instructions([[0, 1, 2, 3, 4], [5, 6]], allowed_max_length=3)
    assert inputs.tolist() == [[0, 1, 2], [5, 6, 50256]]
    assert targets.tolist() == [[1, 2, 3], [6, 50256, -100]]


def test_collate_masks_the_prompt_targets_when_asked():
    # prompt of 3 tokens: targets 0 and 1 (predicting prompt tokens 1 and 2) are ignored; target 2 predicts the answer
    inputs, targets = collate_instructions([([10, 11, 12, 13, 14], 3), ([20, 21, 22], 2)], mask_prompt=True)
    assert inputs.tolist() == [[10, 11, 12, 13, 14], [20, 21, 22, 50256, 50256]]
    assert targets.tolist() == [[-100, -100, 13, 14, 50256], [-100, 22, 50256, -100, -100]]
    unmasked = collate_instructions([([10, 11, 12, 13, 14], 3)])[1]  # items with lengths, mask off
    assert unmasked.tolist() == [[11, 12, 13, 14, 50256]]


def test_collate_refuses_masking_without_prompt_lengths_and_empty_input():
    with pytest.raises(ValueError, match="return_prompt_length=True"):
        collate_instructions([[1, 2, 3]], mask_prompt=True)
    with pytest.raises(ValueError, match="empty batch"):
        collate_instructions([])
    with pytest.raises(ValueError, match="allowed_max_length"):
        collate_instructions([[1, 2]], allowed_max_length=0)


def test_collate_refuses_a_batch_whose_every_response_is_cut_off():
    # given prompt-masked items whose responses start at token 4 and 5
    batch = [([1, 2, 3, 4, 5, 6], 4), ([1, 2, 3, 4, 5, 6, 7], 5)]
    # when the cut leaves only prompt targets, then the batch is refused (its loss would be NaN)
    with pytest.raises(ValueError, match=r"no batch item has a response token left to score.*allowed_max_length"):
        collate_instructions(batch, allowed_max_length=3, mask_prompt=True)
    # while a cut that leaves one scored target is fine
    targets = collate_instructions(batch, allowed_max_length=4, mask_prompt=True)[1]
    assert targets.tolist() == [[-100, -100, -100, 5], [-100, -100, -100, -100]]


@pytest.mark.parametrize("item, argument", [
    (([1, 2, 3], -1), "prompt_length"),
    (([1, 2, 3], 4), "prompt_length"),
    (([1, 2, 3], 1.5), "prompt_length"),
])
def test_collate_refuses_a_prompt_length_outside_its_item(item, argument):
    with pytest.raises(ValueError, match=rf"batch item 0: {argument} must be an integer from 0 to the item's 3"):
        collate_instructions([item], mask_prompt=True)


@pytest.mark.parametrize("length", [0, -3, 2.5, True])
def test_collate_refuses_an_allowed_max_length_that_is_not_a_positive_integer(length):
    with pytest.raises(ValueError, match="allowed_max_length must be an integer >= 1 or None"):
        collate_instructions([[1, 2]], allowed_max_length=length)


SPECIAL = {"instruction": "Repeat <|endoftext|> once.", "input": "a<|endoftext|>b", "output": "<|endoftext|>"}


def test_record_text_with_the_end_of_text_string_is_encoded_as_ordinary_text(tiktoken_gpt2):
    # given a record whose fields hold the literal special-token string
    dataset = InstructionDataset([SPECIAL], tiktoken_gpt2, return_prompt_length=True)
    ids, prompt_length = dataset[0]
    # then its ids are those of the text read as ordinary characters, with no end-of-text id
    assert ids == encode_user_text(tiktoken_gpt2, format_training_text(SPECIAL)) and 50256 not in ids
    assert tiktoken_gpt2.decode(ids[prompt_length:]) == "<|endoftext|>"


def test_generate_responses_answers_a_record_holding_the_end_of_text_string(answer_model, tiktoken_gpt2):
    prompt = encode_user_text(tiktoken_gpt2, format_input(SPECIAL) + "\n\n### Response:\n")
    new = generate(answer_model, torch.tensor([prompt]), 3, eos_id=50256)[0, len(prompt):].tolist()
    expected = tiktoken_gpt2.decode(new[:new.index(50256)] if 50256 in new else new).strip()
    answered = generate_responses(answer_model, tiktoken_gpt2, [SPECIAL], max_new_tokens=3, progress=False)
    assert answered[0]["model_response"] == expected


def test_the_dataset_refuses_a_malformed_record_naming_its_index(tiktoken_gpt2):
    with pytest.raises(InstructionDataError, match="record 1 field 'output' is a int"):
        InstructionDataset([WITH_INPUT, {**WITHOUT_INPUT, "output": 3}], tiktoken_gpt2)
    with pytest.raises(InstructionDataError, match="record 0 has no 'input' key"):
        InstructionDataset([{"instruction": "x", "output": "y"}], tiktoken_gpt2)


def test_dataset_items_are_the_whole_texts_tokens_and_the_prompts_length(splits, tiktoken_gpt2):
    entries = splits[1][:20]
    dataset = InstructionDataset(entries, tiktoken_gpt2, return_prompt_length=True)
    for entry, (ids, prompt_length) in zip(entries, dataset):
        assert ids == tiktoken_gpt2.encode(format_training_text(entry))
        prompt = format_input(entry) + "\n\n### Response:\n"
        assert ids[:prompt_length] == tiktoken_gpt2.encode(prompt)
        assert tiktoken_gpt2.decode(ids[prompt_length:]) == entry["output"]
    assert InstructionDataset(entries, tiktoken_gpt2)[0] == dataset[0][0]


def test_chunked_loss_ignores_masked_targets_as_cross_entropy_does(splits, tiktoken_gpt2):
    # given a tiny GPT-2-vocabulary model and a prompt-masked batch from the real data
    torch.manual_seed(0)
    model = GPTModel(GPTConfig(vocab_size=50257, context_length=64, emb_dim=16, n_heads=2, n_layers=1,
                               drop_rate=0.0))
    dataset = InstructionDataset(splits[0][:4], tiktoken_gpt2, return_prompt_length=True)
    inputs, targets = collate_instructions(list(dataset), allowed_max_length=64, mask_prompt=True)
    assert (targets == -100).sum() > targets.numel() // 2  # most targets are prompt or padding
    # when the loss is computed both ways
    loss = calc_loss_batch(inputs, targets, model, "cpu")
    grads = torch.autograd.grad(loss, [model.out_head.weight, model.tok_emb.weight])
    reference = F.cross_entropy(model(inputs).flatten(0, 1), targets.flatten(), ignore_index=-100)
    ref_grads = torch.autograd.grad(reference, [model.out_head.weight, model.tok_emb.weight])
    # then the values and the gradients agree
    torch.testing.assert_close(loss, reference, rtol=1e-5, atol=1e-6)
    for grad, ref_grad in zip(grads, ref_grads):
        torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-7)


# --- answers ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def answer_model():
    torch.manual_seed(3)
    return GPTModel(GPTConfig(vocab_size=50257, context_length=128, emb_dim=32, n_heads=2, n_layers=2,
                              drop_rate=0.0)).eval()


def test_generate_responses_equal_answers_generated_one_at_a_time(splits, answer_model, tiktoken_gpt2, tmp_path):
    entries = splits[1][:12]
    lengths = [len(tiktoken_gpt2.encode(format_input(e) + "\n\n### Response:\n")) for e in entries]
    assert len(set(lengths)) < len(lengths)  # some prompts share a length, so some batches hold several
    out_path = tmp_path / "answers.json"
    answered = generate_responses(answer_model, tiktoken_gpt2, entries, max_new_tokens=6, out_path=out_path,
                                  batch_size=4, progress=False)
    for entry, result in zip(entries, answered):
        prompt = format_input(entry) + "\n\n### Response:\n"
        idx = torch.tensor([tiktoken_gpt2.encode(prompt)])
        out = generate(answer_model, idx, 6, eos_id=50256)
        text = tiktoken_gpt2.decode(out[0].tolist())
        assert result["model_response"] == extract_response(text, prompt)
        assert {k: v for k, v in result.items() if k != "model_response"} == entry
    assert json.loads(out_path.read_text(encoding="utf-8")) == answered
    single = generate_responses(answer_model, tiktoken_gpt2, entries, max_new_tokens=6, batch_size=1,
                                progress=False)
    assert single == answered


def test_generate_responses_cut_each_answer_where_the_model_emits_end_of_text(splits, answer_model, tiktoken_gpt2):
    # given the answer model with its output rows for <|endoftext|> and for the third token it answers the
    # first entry with swapped, so that it emits <|endoftext|> there instead: a model that stops mid-answer
    entries = splits[1][:6]
    prompts = [encode_user_text(tiktoken_gpt2, format_input(entry) + RESPONSE_HEADER) for entry in entries]
    free = generate(answer_model, torch.tensor([prompts[0]]), 8)[0, len(prompts[0]):].tolist()
    stopper = free[2]
    assert stopper not in free[:2] and 50256 not in free
    model = copy.deepcopy(answer_model)
    with torch.no_grad():
        model.out_head.weight[[stopper, 50256]] = model.out_head.weight[[50256, stopper]]
    # and the reference: each entry alone through generate(..., eos_id), decoded up to its first end-of-text
    alone = [generate(model, torch.tensor([ids]), 8, eos_id=50256)[0, len(ids):].tolist() for ids in prompts]
    assert alone[0][:3] == [*free[:2], 50256]  # it does stop after two tokens
    expected = [tiktoken_gpt2.decode(new[:new.index(50256)] if 50256 in new else new).strip() for new in alone]

    # when the entries are answered in batches of three
    answered = generate_responses(model, tiktoken_gpt2, entries, max_new_tokens=8, batch_size=3, progress=False)

    # then every answer is the reference's: cut at the end-of-text, which never shows in it
    assert [result["model_response"] for result in answered] == expected
    assert expected[0] == tiktoken_gpt2.decode(free[:2]).strip()
    assert not any("<|endoftext|>" in result["model_response"] for result in answered)


def test_generate_responses_creates_the_folder_of_out_path(answer_model, tiktoken_gpt2, tmp_path):
    # given an out_path inside folders that do not exist yet
    out_path = tmp_path / "runs" / "part09" / "answers.json"
    # when the entries are answered
    answered = generate_responses(answer_model, tiktoken_gpt2, [WITH_INPUT], max_new_tokens=2, out_path=out_path,
                                  progress=False)
    # then the folders are made and the file holds the answers
    assert json.loads(out_path.read_text(encoding="utf-8")) == answered


def test_generate_responses_refuses_a_bad_batch_size(answer_model, tiktoken_gpt2):
    with pytest.raises(ValueError, match="batch_size"):
        generate_responses(answer_model, tiktoken_gpt2, [WITH_INPUT], batch_size=0)
    with pytest.raises(ValueError, match="max_new_tokens must be an integer >= 0"):
        generate_responses(answer_model, tiktoken_gpt2, [WITH_INPUT], max_new_tokens=1.5)


def test_generate_responses_warns_once_about_prompts_longer_than_the_context(answer_model, tiktoken_gpt2):
    # given two entries whose prompts are longer than the model's 128-token context, and a short one
    long_entries = [{**WITHOUT_INPUT, "instruction": " ".join(["word"] * n)} for n in (130, 150)]
    lengths = [len(tiktoken_gpt2.encode(format_input(e) + "\n\n### Response:\n")) for e in long_entries]
    # when they are answered, then one warning gives how many prompts were cropped and by how much at most
    with pytest.warns(UserWarning) as caught:
        answered = generate_responses(answer_model, tiktoken_gpt2, [*long_entries, WITH_INPUT], max_new_tokens=1,
                                      progress=False)
    assert len(caught) == 1 and len(answered) == 3
    assert str(caught[0].message).startswith(f"generate_responses: 2 of 3 prompts are longer than the 128-token "
                                             f"context and are cropped from the left, by up to {max(lengths) - 128} "
                                             "tokens")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # prompts that fit: no warning
        generate_responses(answer_model, tiktoken_gpt2, [WITH_INPUT], max_new_tokens=1, progress=False)


# --- ROUGE-L ------------------------------------------------------------------------------------------


def test_rouge_l_of_identical_texts_is_one_and_of_disjoint_texts_zero():
    assert rouge_l("The car is as fast as lightning.", "the car is AS fast as lightning") == 1.0
    assert rouge_l("red green", "blue yellow") == 0.0
    assert rouge_l("", "anything") == 0.0


def test_rouge_l_partial_overlap_matches_a_hand_computation():
    # candidate words: paris is the capital of france (6); reference: the capital is paris (4)
    # longest common subsequence: "the capital" (2) -> P = 2/6, R = 2/4, F1 = 2PR / (P + R) = 0.4
    assert rouge_l("Paris is the capital of France.", "The capital is Paris.") == pytest.approx(0.4)


def test_rouge_l_equals_rouge_score_on_the_echo_baseline(splits):
    rouge_score = pytest.importorskip("rouge_score")
    from rouge_score import rouge_scorer, tokenize

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    compared = 0
    for entry in echo_baseline(splits[1]):
        candidate, reference = entry["model_response"], entry["output"]
        ours_tokenize = [re.findall(r"\w+", text.lower()) for text in (candidate, reference)]
        if ours_tokenize != [tokenize.tokenize(text, None) for text in (candidate, reference)]:
            continue  # the two tokenizers disagree (underscores, accented letters): not comparable
        compared += 1
        expected = scorer.score(reference, candidate)["rougeL"].fmeasure
        assert rouge_l(candidate, reference) == pytest.approx(expected, abs=1e-12), (candidate, reference)
    assert compared >= 100, f"only {compared} of {len(splits[1])} pairs tokenize alike"
    assert rouge_score is not None


def test_baselines_score_as_the_issue_measured(splits):
    scores = baseline_scores(splits[1])
    assert scores["echo"] == pytest.approx(0.43, abs=0.005)
    assert scores["constant"] < scores["echo"]
    assert scores["constant"] == pytest.approx(mean_rouge_l(constant_baseline(splits[1])))
    with pytest.raises(KeyError, match="generate_responses"):
        mean_rouge_l(splits[1])
