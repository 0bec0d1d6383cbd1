"""Preference alignment by DPO (Part 09): splits, token ids, masks, log-probabilities, the loss, training."""

from __future__ import annotations

import copy
import math
from functools import partial

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from helpers.instruct import RESPONSE_HEADER, format_input, load_instruction_splits
from helpers.model import GPTConfig, GPTModel
from helpers.preference import (
    PreferenceDataError,
    PreferenceDataset,
    check_preference_records,
    collate_preferences,
    dpo_batch_loss,
    dpo_loss,
    evaluate_dpo,
    frozen_reference,
    load_preference_splits,
    model_sequence_logprobs,
    preference_accuracy,
    sequence_logprobs,
    train_dpo,
)

END = 50256


def _record(**changes) -> dict:
    record = {"instruction": "Rewrite the sentence.", "input": "He go home.", "output": "He goes home.",
              "chosen": "He goes home.", "rejected": "He goes home, obviously."}
    record.update(changes)
    return record


def _tiny_gpt(vocab_size: int = 101, seed: int = 123) -> GPTModel:
    torch.manual_seed(seed)
    cfg = GPTConfig(vocab_size=vocab_size, context_length=16, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.0)
    return GPTModel(cfg)


# ---------------------------------------------------------------------------------------------
# data


def test_preference_splits_have_935_110_55_records_and_match_the_instruction_splits():
    # given the preference file and the instruction file (the same 1,100 records in the same order)
    train, test, val = load_preference_splits()
    # then the sizes are the instruction splits' and the file order is kept
    assert (len(train), len(test), len(val)) == (935, 110, 55)
    assert train[1]["rejected"] == "He goes to the stupid park every single day."
    # and a seeded shuffle gives the instruction splits' records, record for record
    for preference_split, instruction_split in zip(load_preference_splits(seed=123), load_instruction_splits(seed=123)):
        assert [(r["instruction"], r["input"]) for r in preference_split] == \
               [(r["instruction"], r["input"]) for r in instruction_split]


def test_dataset_ids_equal_tiktoken_on_the_whole_text(gpt2_tok, tiktoken_gpt2):
    # given every record of the training split
    train, _, _ = load_preference_splits()
    dataset = PreferenceDataset(train, gpt2_tok)
    # then each item is tiktoken's encoding of prompt + header + answer, then <|endoftext|>
    for record, item in zip(train, dataset):
        prefix = format_input(record) + RESPONSE_HEADER
        assert item["prompt"] == tiktoken_gpt2.encode(format_input(record))
        assert item["prompt_length"] == len(tiktoken_gpt2.encode(prefix))
        assert item["chosen"] == tiktoken_gpt2.encode(prefix + record["chosen"]) + [END]
        assert item["rejected"] == tiktoken_gpt2.encode(prefix + record["rejected"]) + [END]


@pytest.mark.parametrize("record, message", [
    (_record(chosen=None), "record 1 field 'chosen' is a NoneType"),
    ({k: v for k, v in _record().items() if k != "chosen"}, "record 1 has no 'chosen' key"),
    ({k: v for k, v in _record().items() if k != "rejected"}, "record 1 has no 'rejected' key"),
    (_record(rejected="   "), "record 1 has an empty 'rejected'"),
    (_record(chosen=""), "record 1 has an empty 'chosen'"),
    (_record(instruction=""), "record 1 has an empty 'instruction'"),
    (_record(input=3), "record 1 field 'input' is a int"),
    (_record(input=float("nan")), "record 1 field 'input' is NaN"),
    (_record(chosen=float("nan")), "record 1 field 'chosen' is NaN"),
    ({1: "a key that is no string", "instruction": "Do it.", "chosen": "Done."}, "record 1 has no 'rejected' key"),
    ("not a record", "record 1 is a str"),
])
def test_bad_records_raise_errors_naming_the_record(gpt2_tok, record, message):
    # given a good record followed by a bad one
    records = [_record(), record]
    # then checking, and building a dataset, name record 1 and the field
    with pytest.raises(PreferenceDataError, match=message):
        check_preference_records(records)
    with pytest.raises(ValueError, match=message):
        PreferenceDataset(records, gpt2_tok)


@pytest.mark.parametrize("end_token_id", [-1, 1.5, "50256", True])
def test_dataset_refuses_an_end_token_id_that_is_no_token_id(gpt2_tok, end_token_id):
    with pytest.raises(ValueError, match="end_token_id must be an integer >= 0 or None"):
        PreferenceDataset([_record()], gpt2_tok, end_token_id=end_token_id)


@pytest.mark.parametrize("seed", [1.5, "123", True])
def test_splits_refuse_a_seed_that_is_not_an_integer(seed):
    with pytest.raises(ValueError, match="seed must be an integer or None"):
        load_preference_splits(seed=seed)


def test_text_with_the_end_of_text_string_is_encoded_as_ordinary_text(gpt2_tok, tiktoken_gpt2):
    # given a record whose instruction and answers contain the literal string <|endoftext|>
    record = _record(instruction="Explain what <|endoftext|> means.", chosen="It marks the end<|endoftext|> of a text.",
                     rejected="<|endoftext|>")
    # when it is tokenized
    item = PreferenceDataset([record], gpt2_tok)[0]
    # then the literal is ordinary text, and the only end-of-text id is the one the dataset appends
    prefix = format_input(record) + RESPONSE_HEADER
    assert item["prompt"] == tiktoken_gpt2.encode(format_input(record), disallowed_special=())
    assert item["prompt_length"] == len(tiktoken_gpt2.encode(prefix, disallowed_special=()))
    for answer in ("chosen", "rejected"):
        assert item[answer] == tiktoken_gpt2.encode(prefix + record[answer], disallowed_special=()) + [END]
        assert item[answer].count(END) == 1
        assert gpt2_tok.decode(item[answer][item["prompt_length"]:-1]) == record[answer]


# ---------------------------------------------------------------------------------------------
# batches and masks

# hand-built items: prompt, a header token (1), the answer, an end token (99)
_ITEMS = [
    {"prompt": [5, 6, 7], "prompt_length": 4, "chosen": [5, 6, 7, 1, 20, 21, 99], "rejected": [5, 6, 7, 1, 30, 99]},
    {"prompt": [8, 9], "prompt_length": 3, "chosen": [8, 9, 1, 40, 99], "rejected": [8, 9, 1, 50, 51, 52, 99]},
]


def test_masks_cover_exactly_the_answer_tokens():
    # when two hand-built pairs are collated with pad id 0
    batch = collate_preferences(_ITEMS, pad_token_id=0)
    # then chosen and rejected share one padded width
    assert batch["chosen"].tolist() == [[5, 6, 7, 1, 20, 21, 99], [8, 9, 1, 40, 99, 0, 0]]
    assert batch["rejected"].tolist() == [[5, 6, 7, 1, 30, 99, 0], [8, 9, 1, 50, 51, 52, 99]]
    # and the masks are True on the answer and its end token only: not the prompt, header or padding
    F_, T_ = False, True
    assert batch["chosen_mask"].tolist() == [[F_, F_, F_, F_, T_, T_, T_], [F_, F_, F_, T_, T_, F_, F_]]
    assert batch["rejected_mask"].tolist() == [[F_, F_, F_, F_, T_, T_, F_], [F_, F_, F_, T_, T_, T_, T_]]
    assert batch["prompt"].tolist() == [[5, 6, 7], [8, 9, 0]]
    assert batch["prompt_lengths"].tolist() == [3, 2]


def test_mask_prompt_false_scores_every_real_token_but_the_first():
    batch = collate_preferences(_ITEMS, pad_token_id=0, mask_prompt=False)
    assert batch["chosen_mask"].sum(dim=1).tolist() == [6, 4]
    assert batch["rejected_mask"].sum(dim=1).tolist() == [5, 6]
    assert not batch["chosen_mask"][:, 0].any()


def test_masked_tokens_of_a_real_record_decode_to_its_answers(gpt2_tok):
    # given a real record, tokenized
    train, _, _ = load_preference_splits()
    batch = collate_preferences(list(PreferenceDataset(train[:3], gpt2_tok)))
    # then the masked tokens of each row are exactly its answer and <|endoftext|>
    for row, record in enumerate(train[:3]):
        for answer in ("chosen", "rejected"):
            scored = batch[answer][row][batch[f"{answer}_mask"][row]].tolist()
            assert gpt2_tok.decode(scored) == record[answer] + "<|endoftext|>"


def test_allowed_max_length_cuts_the_batch_and_refuses_to_leave_no_answer():
    batch = collate_preferences(_ITEMS, pad_token_id=0, allowed_max_length=5)
    assert batch["chosen"].shape == batch["rejected"].shape == (2, 5)
    assert batch["chosen_mask"].tolist()[0] == [False, False, False, False, True]
    with pytest.raises(ValueError, match="batch item 0: its chosen answer starts at token 4 .* allowed_max_length"):
        collate_preferences(_ITEMS, pad_token_id=0, allowed_max_length=4)
    with pytest.raises(ValueError, match="empty batch"):
        collate_preferences([])


@pytest.mark.parametrize("arguments, message", [
    ({"allowed_max_length": 1}, "allowed_max_length must be an integer >= 2 or None, got 1"),
    ({"allowed_max_length": 4.5}, "allowed_max_length must be an integer >= 2 or None, got 4.5"),
    ({"allowed_max_length": "5"}, "allowed_max_length must be an integer >= 2 or None, got '5'"),
    ({"pad_token_id": -1}, "pad_token_id must be an integer >= 0, got -1"),
    ({"pad_token_id": None}, "pad_token_id must be an integer >= 0, got None"),
])
def test_collate_refuses_arguments_out_of_range_naming_them(arguments, message):
    with pytest.raises(ValueError, match=message):
        collate_preferences(_ITEMS, **arguments)


# ---------------------------------------------------------------------------------------------
# log-probabilities


def _reference_logprobs(logits, labels, mask, average=False):
    """The textbook way: a full log-softmax, gather the labels' entries, sum under the shifted mask."""
    token_logprobs = F.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, labels[:, 1:, None]).squeeze(-1)
    total = (token_logprobs * mask[:, 1:]).sum(dim=1)
    return total / mask[:, 1:].sum(dim=1) if average else total


@pytest.mark.parametrize("average", [False, True])
def test_sequence_logprobs_equal_log_softmax_gather(average):
    # given random logits and a mask that skips the first token, part of the prompt and padding
    torch.manual_seed(0)
    logits = torch.randn(3, 7, 50) * 3
    labels = torch.randint(0, 50, (3, 7))
    mask = torch.tensor([[0, 0, 1, 1, 1, 0, 0], [0, 1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0, 1]], dtype=torch.bool)
    # then the gather-minus-logsumexp result equals the log-softmax reference
    torch.testing.assert_close(sequence_logprobs(logits, labels, mask, average=average),
                               _reference_logprobs(logits, labels, mask, average))


@pytest.mark.parametrize("average", [False, True])
def test_chunked_model_logprobs_and_gradients_equal_the_full_logits(average):
    # given a tiny GPT and a collated batch
    model = _tiny_gpt()
    batch = collate_preferences(_ITEMS, pad_token_id=0)
    ids, mask = batch["chosen"], batch["chosen_mask"]
    rows_seen = []
    hook = model.out_head.register_forward_hook(lambda module, inputs, output: rows_seen.append(inputs[0].shape[0]))
    # when the chunked path (3 rows at a time) and the full-logits reference both run and backpropagate
    chunked = model_sequence_logprobs(model, ids, mask, average=average, chunk_rows=3)
    chunked.sum().backward()
    chunked_grads = [p.grad.clone() for p in model.parameters()]
    hook.remove()
    model.zero_grad()
    reference = _reference_logprobs(model(ids), ids, mask, average)
    reference.sum().backward()
    # then values and every parameter's gradient agree
    torch.testing.assert_close(chunked, reference)
    for got, expected in zip(chunked_grads, (p.grad for p in model.parameters())):
        torch.testing.assert_close(got, expected)
    # and the head saw only the rows that predict a scored token, at most 3 at a time (forward and recompute)
    n_scored = int(mask[:, 1:].sum())
    assert max(rows_seen) <= 3 and sum(rows_seen) == 2 * n_scored


def test_logprobs_reject_a_mask_on_the_first_token_or_an_empty_row():
    logits, labels = torch.zeros(2, 4, 5), torch.zeros(2, 4, dtype=torch.long)
    first = torch.tensor([[1, 1, 0, 0], [0, 1, 0, 0]], dtype=torch.bool)
    with pytest.raises(ValueError, match=r"mask\[:, 0\] is True in rows \[0\]"):
        sequence_logprobs(logits, labels, first)
    empty = torch.tensor([[0, 1, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
    with pytest.raises(ValueError, match=r"mask rows \[1\] score no token"):
        sequence_logprobs(logits, labels, empty)
    with pytest.raises(ValueError, match="mask the same shape"):
        sequence_logprobs(logits, labels, empty[:, :3])


@pytest.mark.parametrize("chunk_rows", [0, -2, 2.5, "3"])
def test_model_logprobs_refuse_a_chunk_rows_that_is_not_a_positive_integer(chunk_rows):
    batch = collate_preferences(_ITEMS, pad_token_id=0)
    with pytest.raises(ValueError, match="chunk_rows must be an integer >= 1 or None"):
        model_sequence_logprobs(_tiny_gpt(), batch["chosen"], batch["chosen_mask"], chunk_rows=chunk_rows)


# ---------------------------------------------------------------------------------------------
# the DPO loss


def test_dpo_loss_is_ln2_with_zero_rewards_when_policy_equals_reference():
    logprobs = torch.tensor([-12.5, -40.0, -3.25])
    rejected = torch.tensor([-20.0, -35.0, -8.0])
    loss, chosen_rewards, rejected_rewards = dpo_loss(logprobs, rejected, logprobs.clone(), rejected.clone(), beta=0.1)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-7)
    assert chosen_rewards.item() == 0.0 and rejected_rewards.item() == 0.0


def test_dpo_loss_matches_a_hand_computation():
    # given two pairs: log-ratios chosen (+1, -0.5), rejected (-1, +0.5), beta 0.5
    policy_chosen, ref_chosen = torch.tensor([-1.0, -4.5]), torch.tensor([-2.0, -4.0])
    policy_rejected, ref_rejected = torch.tensor([-3.0, -5.5]), torch.tensor([-2.0, -6.0])
    loss, chosen_rewards, rejected_rewards = dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected,
                                                      beta=0.5)
    # then the logits are 0.5 * (1 + 1) = 1 and 0.5 * (-0.5 - 0.5) = -0.5, and -logsigmoid(z) = log(1 + e^-z)
    expected = (math.log1p(math.exp(-1.0)) + math.log1p(math.exp(0.5))) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert chosen_rewards.item() == pytest.approx(0.5 * (1.0 - 0.5) / 2)
    assert rejected_rewards.item() == pytest.approx(0.5 * (-1.0 + 0.5) / 2)


@pytest.mark.parametrize("beta", [0, -0.1, float("nan"), float("inf"), True, "0.1", None])
def test_dpo_loss_rejects_a_beta_that_is_not_positive_and_finite(beta):
    x = torch.zeros(2)
    with pytest.raises(ValueError, match="beta must be a positive finite number"):
        dpo_loss(x, x, x, x, beta=beta)


def test_dpo_loss_accepts_a_numpy_beta():
    x = torch.zeros(2)
    loss, _, _ = dpo_loss(x, x, x, x, beta=np.float32(0.5))
    assert loss.item() == pytest.approx(math.log(2))


class _Unusable(torch.nn.Module):
    """A model that must never run: the arguments are checked before any forward pass."""

    def forward(self, ids):
        raise AssertionError("the model ran although an argument was invalid")


@pytest.mark.parametrize("beta", [0, -1.0, float("nan")])
def test_batch_loss_and_evaluation_refuse_a_bad_beta_before_running_a_model(beta):
    batch = collate_preferences(_ITEMS, pad_token_id=0)
    with pytest.raises(ValueError, match="beta must be a positive finite number"):
        dpo_batch_loss(_Unusable(), _Unusable(), batch, beta=beta, device="cpu")
    with pytest.raises(ValueError, match="beta must be a positive finite number"):
        evaluate_dpo(_Unusable(), _Unusable(), [batch], beta=beta, device="cpu")


@pytest.mark.parametrize("num_batches", [-1, 0, 1.5, "2", True])
def test_evaluate_dpo_refuses_a_num_batches_that_is_not_a_positive_integer(num_batches):
    batch = collate_preferences(_ITEMS, pad_token_id=0)
    with pytest.raises(ValueError, match="num_batches must be an integer >= 1 or None"):
        evaluate_dpo(_Unusable(), _Unusable(), [batch], beta=0.1, device="cpu", num_batches=num_batches)
    with pytest.raises(ValueError, match="num_batches must be an integer >= 1 or None"):
        preference_accuracy(_Unusable(), _Unusable(), [batch], beta=0.1, device="cpu", num_batches=num_batches)


def test_dpo_loss_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="one shape"):
        dpo_loss(torch.zeros(2), torch.zeros(3), torch.zeros(2), torch.zeros(2))


def test_gradients_reach_the_policy_and_never_the_reference():
    # given a policy and a reference copy whose parameters still require gradients
    policy = _tiny_gpt()
    reference = copy.deepcopy(policy)
    with torch.no_grad():  # move the policy away from the reference so the loss has a slope
        for parameter in policy.parameters():
            parameter.add_(0.01 * torch.randn_like(parameter))
    batch = collate_preferences(_ITEMS, pad_token_id=0)
    # when one batch's DPO loss is backpropagated
    loss, _, _ = dpo_batch_loss(policy, reference, batch, beta=0.1, device="cpu")
    loss.backward()
    # then every policy parameter has a non-zero gradient and no reference parameter has one
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in policy.parameters())
    assert all(p.grad is None for p in reference.parameters())


# ---------------------------------------------------------------------------------------------
# training on a toy preference task


def _toy_pairs(n: int, generator: torch.Generator, exclude: list[dict] = ()) -> list[dict]:
    """Prompts of 3 distinct tokens (2..11) and a header (1); the preferred answer repeats the first prompt token,
    the other the second; end 12. Prompts in ``exclude`` are skipped, so held-out pairs are new."""
    seen = {tuple(item["prompt"]) for item in exclude}
    items = []
    while len(items) < n:
        prompt = (torch.randperm(10, generator=generator)[:3] + 2).tolist()
        if tuple(prompt) in seen:
            continue
        prefix = prompt + [1]
        items.append({"prompt": prompt, "prompt_length": 4,
                      "chosen": prefix + [prompt[0], 12], "rejected": prefix + [prompt[1], 12]})
    return items


def test_train_dpo_raises_held_out_preference_accuracy_to_100_and_never_touches_the_reference():
    # given a tiny GPT, its frozen copy, and toy pairs whose preferred answer copies the prompt's first token
    generator = torch.Generator().manual_seed(0)
    collate = partial(collate_preferences, pad_token_id=0)
    train_pairs = _toy_pairs(192, generator)
    train_loader = DataLoader(train_pairs, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(0),
                              collate_fn=collate)
    val_loader = DataLoader(_toy_pairs(32, generator, exclude=train_pairs), batch_size=32, collate_fn=collate)
    policy = _tiny_gpt(vocab_size=16)
    reference = frozen_reference(policy)
    before = copy.deepcopy(reference.state_dict())
    assert preference_accuracy(policy, reference, val_loader, beta=0.5) == 0.0  # every pair a tie
    optimizer = torch.optim.AdamW(policy.parameters(), lr=5e-3)
    # when DPO trains the policy for a few epochs
    history = train_dpo(policy, reference, train_loader, val_loader, optimizer, "cpu", num_epochs=6, beta=0.5,
                        eval_freq=6, eval_iter=1, progress=False)
    # then every held-out pair prefers the chosen answer, with the loss far below ln 2 and a positive margin
    assert preference_accuracy(policy, reference, val_loader, beta=0.5) == 1.0
    assert history["val_preference_accuracy"][-1] == 1.0 and history["val_preference_accuracy"][0] < 1.0
    assert history["val_losses"][-1] < 0.1 and history["val_reward_margins"][-1] > 0
    assert history["steps"] == [6, 12, 18, 24, 30, 36] and history["tokens_seen"][-1] == 36 * 2 * 32 * 6
    assert all(len(history[key]) == 6 for key in ("train_losses", "val_losses", "train_reward_margins",
                                                  "val_reward_margins", "val_preference_accuracy"))
    # and the reference is bit-identical, in eval mode, with no gradient anywhere
    after = reference.state_dict()
    assert all(torch.equal(before[name], after[name]) for name in before)
    assert not reference.training and all(p.grad is None for p in reference.parameters())


def test_evaluate_dpo_at_the_start_reports_ln2_zero_margin_and_no_preference():
    loader = DataLoader(_toy_pairs(8, torch.Generator().manual_seed(1)), batch_size=4,
                        collate_fn=partial(collate_preferences, pad_token_id=0))
    policy = _tiny_gpt(vocab_size=16)
    result = evaluate_dpo(policy, frozen_reference(policy), loader, beta=0.1, device="cpu")
    assert result == pytest.approx({"loss": math.log(2), "reward_margin": 0.0, "accuracy": 0.0})


def test_train_dpo_refuses_a_reference_shared_with_the_policy_or_the_optimizer():
    policy = _tiny_gpt(vocab_size=16)
    reference = frozen_reference(policy)
    loader = DataLoader(_toy_pairs(4, torch.Generator().manual_seed(2)), batch_size=4,
                        collate_fn=partial(collate_preferences, pad_token_id=0))
    run = partial(train_dpo, train_loader=loader, val_loader=loader, device="cpu", num_epochs=1, beta=0.1,
                  eval_freq=1, eval_iter=1, progress=False)
    with pytest.raises(ValueError, match="shares parameters with the policy"):
        run(policy, policy, optimizer=torch.optim.SGD(policy.parameters(), lr=0.1))
    both = [*policy.parameters(), *reference.parameters()]
    with pytest.raises(ValueError, match="optimizer holds reference parameters"):
        run(policy, reference, optimizer=torch.optim.SGD(both, lr=0.1))
    for name, value in [("num_epochs", 0), ("eval_freq", 0), ("eval_iter", -1), ("num_epochs", 1.5),
                        ("eval_freq", "2"), ("eval_iter", None)]:
        with pytest.raises(ValueError, match=f"{name} must be an integer >= 1, got {value!r}"):
            run(policy, reference, optimizer=torch.optim.SGD(policy.parameters(), lr=0.1), **{name: value})
    for beta in (0.0, -0.1, float("nan")):
        with pytest.raises(ValueError, match="beta must be"):
            run(policy, reference, optimizer=torch.optim.SGD(policy.parameters(), lr=0.1), beta=beta)


@pytest.mark.parametrize("grad_clip", [0.0, -1.0, float("nan"), float("inf"), "1"])
def test_train_dpo_refuses_a_grad_clip_that_is_not_a_positive_number(grad_clip):
    # a negative grad_clip would silently flip every gradient (clip_grad_norm_ scales by grad_clip / norm)
    policy = _tiny_gpt(vocab_size=16)
    loader = DataLoader(_toy_pairs(4, torch.Generator().manual_seed(2)), batch_size=4,
                        collate_fn=partial(collate_preferences, pad_token_id=0))
    with pytest.raises(ValueError, match="grad_clip must be a positive finite number or None"):
        train_dpo(policy, frozen_reference(policy), loader, loader, torch.optim.SGD(policy.parameters(), lr=0.1),
                  "cpu", num_epochs=1, beta=0.1, eval_freq=1, eval_iter=1, grad_clip=grad_clip, progress=False)


def _one_batch_loader() -> DataLoader:
    return DataLoader(_toy_pairs(4, torch.Generator().manual_seed(3)), batch_size=4,
                      collate_fn=partial(collate_preferences, pad_token_id=0))


def test_train_dpo_refuses_a_policy_with_nothing_to_train():
    # given a policy whose parameters are all frozen (say, the reference passed in its place)
    policy = _tiny_gpt(vocab_size=16)
    reference = frozen_reference(policy)
    policy.requires_grad_(False)
    loader = _one_batch_loader()
    # then train_dpo says so before the first step, instead of autograd's "does not require grad"
    with pytest.raises(ValueError, match="no parameter of the policy requires grad"):
        train_dpo(policy, reference, loader, loader, torch.optim.SGD(policy.parameters(), lr=0.1), "cpu",
                  num_epochs=1, beta=0.1, eval_freq=1, eval_iter=1, progress=False)


def test_train_dpo_refuses_to_run_with_gradients_switched_off():
    policy = _tiny_gpt(vocab_size=16)
    reference = frozen_reference(policy)
    loader = _one_batch_loader()
    with torch.no_grad(), pytest.raises(RuntimeError, match=r"gradients are switched off \(torch.no_grad"):
        train_dpo(policy, reference, loader, loader, torch.optim.SGD(policy.parameters(), lr=0.1), "cpu",
                  num_epochs=1, beta=0.1, eval_freq=1, eval_iter=1, progress=False)


# ---------------------------------------------------------------------------------------------
# the book's units: per-token means over the response header and the answer, rewards without beta


def _mean_logprob(logits: torch.Tensor, ids: torch.Tensor, scored: list[list[int]]) -> torch.Tensor:
    """Per row, the mean over the listed positions t of log softmax(logits[t - 1])[ids[t]], one token at a time."""
    means = []
    for row, positions in enumerate(scored):
        terms = [F.log_softmax(logits[row, t - 1].double(), dim=-1)[ids[row, t]] for t in positions]
        means.append(torch.stack(terms).mean())
    return torch.stack(means).float()


# In _ITEMS the header is one token (1) just before each answer; with header_tokens=1 it is scored too.
_CHOSEN_WITH_HEADER = [[3, 4, 5, 6], [2, 3, 4]]
_REJECTED_WITH_HEADER = [[3, 4, 5], [2, 3, 4, 5, 6]]


def test_header_tokens_and_average_give_the_per_token_mean_over_header_and_answer():
    # given a tiny GPT and the chosen answers of two hand-built pairs
    model = _tiny_gpt()
    batch = collate_preferences(_ITEMS, pad_token_id=0)
    ids, mask = batch["chosen"], batch["chosen_mask"]
    with torch.no_grad():
        expected = _mean_logprob(model(ids), ids, _CHOSEN_WITH_HEADER)
        # when the answer masks are widened by the header token and averaged
        from_logits = sequence_logprobs(model(ids), ids, mask, average=True, header_tokens=1)
        from_model = model_sequence_logprobs(model, ids, mask, average=True, header_tokens=1, chunk_rows=2)
    # then both equal the mean over the hand-listed positions, computed token by token
    torch.testing.assert_close(from_logits, expected)
    torch.testing.assert_close(from_model, expected)
    # and a header longer than the prompt stops at column 1 (nothing predicts token 0)
    everything = [list(range(1, 7)), list(range(1, 5))]
    with torch.no_grad():
        torch.testing.assert_close(model_sequence_logprobs(model, ids, mask, average=True, header_tokens=50),
                                   _mean_logprob(model(ids), ids, everything))


def test_header_tokens_reproduce_the_books_mask_on_real_records(gpt2_tok):
    # given real records, tokenized, and random logits over GPT-2's vocabulary
    train, _, _ = load_preference_splits()
    items = list(PreferenceDataset(train[:2], gpt2_tok))
    batch = collate_preferences(items)
    ids, mask = batch["chosen"], batch["chosen_mask"]
    logits = torch.randn(*ids.shape, 50257, generator=torch.Generator().manual_seed(0))
    # the book's rule: every token of the sequence but the prompt and the two newlines before "### Response:"
    books_span = [list(range(len(item["prompt"]) + 2, len(item["chosen"]))) for item in items]
    # when the header tokens are those of "### Response:\n"
    header_tokens = len(gpt2_tok.encode(RESPONSE_HEADER.lstrip("\n")))
    assert header_tokens == 4
    got = sequence_logprobs(logits, ids, mask, average=True, header_tokens=header_tokens)
    # then the scored span is the book's
    torch.testing.assert_close(got, _mean_logprob(logits, ids, books_span))


def test_evaluate_dpo_in_the_books_units_equals_a_direct_computation():
    # given a policy moved away from its reference and two batches of different sizes
    reference = _tiny_gpt()
    policy = copy.deepcopy(reference)
    with torch.no_grad():
        for parameter in policy.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    loader = [collate_preferences(_ITEMS, pad_token_id=0), collate_preferences(_ITEMS[:1], pad_token_id=0)]
    beta = 0.5
    # when it is evaluated per token, over header and answer, with rewards reported without beta
    result = evaluate_dpo(policy, reference, loader, beta, "cpu", average=True, header_tokens=1,
                          rewards_with_beta=False)
    # then loss, margin and accuracy are those of the per-token means, pair by pair
    losses, margins = [], []
    with torch.no_grad():
        for batch in loader:
            rows = len(batch["chosen"])
            logratio = {}
            for answer, spans in (("chosen", _CHOSEN_WITH_HEADER), ("rejected", _REJECTED_WITH_HEADER)):
                ids = batch[answer]
                logratio[answer] = (_mean_logprob(policy(ids), ids, spans[:rows])
                                    - _mean_logprob(reference(ids), ids, spans[:rows]))
            margin = logratio["chosen"] - logratio["rejected"]
            losses += (-F.logsigmoid(beta * margin)).tolist()
            margins += margin.tolist()
    assert result["loss"] == pytest.approx(sum(losses) / 3, rel=1e-5)
    assert result["reward_margin"] == pytest.approx(sum(margins) / 3, rel=1e-4)
    assert result["accuracy"] == pytest.approx(sum(m > 0 for m in margins) / 3)
    assert result["reward_margin"] != pytest.approx(0.0, abs=1e-6)
    # and the default units differ: sums over the answer only, margins times beta
    ours = evaluate_dpo(policy, reference, loader, beta, "cpu")
    assert ours["reward_margin"] != pytest.approx(result["reward_margin"], rel=1e-3)


@pytest.mark.parametrize("header_tokens", [-1, 1.5, None])
def test_header_tokens_must_be_a_count(header_tokens):
    batch = collate_preferences(_ITEMS, pad_token_id=0)
    with pytest.raises(ValueError, match="header_tokens must be an integer >= 0"):
        sequence_logprobs(torch.zeros(2, 7, 101), batch["chosen"], batch["chosen_mask"], header_tokens=header_tokens)
