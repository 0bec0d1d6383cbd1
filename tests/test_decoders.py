"""Part 09's finetuning code on both decoders of helpers.model's protocol: GPTModel and ModernModel.

Each check compares against an independent computation on the same model: a row alone against the
same row in a left-padded batch, one-at-a-time generation against batched, full logits against the
head applied to selected states, an unmerged LoRA model against its merge.
"""

from __future__ import annotations

import copy

import pytest
import torch

from helpers.checkpoint import load_checkpoint, model_from_config, read_arch, read_config, save_checkpoint
from helpers.classify import class_logits, prepare_for_classification
from helpers.generate import generate, generate_batch
from helpers.instruct import ALPACA, InstructionDataset, PromptFormat, collate_instructions, generate_responses
from helpers.lora import apply_lora, merge_lora
from helpers.model import GPTConfig, GPTModel, is_decoder
from helpers.modern import ModernConfig, ModernModel
from helpers.preference import (
    PreferenceDataset,
    collate_preferences,
    dpo_batch_loss,
    frozen_reference,
    model_sequence_logprobs,
    sequence_logprobs,
)

VOCAB = 101


def _model(arch: str, tie: bool = False) -> torch.nn.Module:
    torch.manual_seed(7)
    if arch == "gpt2":
        return GPTModel(GPTConfig(vocab_size=VOCAB, context_length=48, emb_dim=32, n_heads=4, n_layers=2,
                                  drop_rate=0.0, tie_weights=tie)).eval()
    return ModernModel(ModernConfig(vocab_size=VOCAB, context_length=48, emb_dim=32, n_heads=4, n_kv_heads=2,
                                    head_dim=8, hidden_dim=64, n_layers=2, tie_weights=tie)).eval()


ARCHS = ["gpt2", "modern"]
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17]]


def _left_padded(prompts, pad_id=0):
    width = max(map(len, prompts))
    idx = torch.full((len(prompts), width), pad_id)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for row, ids in enumerate(prompts):
        idx[row, width - len(ids):] = torch.tensor(ids)
        mask[row, width - len(ids):] = 1
    return idx, mask


@pytest.mark.parametrize("arch", ARCHS)
def test_both_models_offer_the_decoder_protocol(arch):
    model = _model(arch)
    assert is_decoder(model)
    assert not is_decoder(torch.nn.Linear(3, 3))


@pytest.mark.parametrize("arch", ARCHS)
def test_a_left_padded_row_gets_the_logits_it_gets_alone(arch):
    model = _model(arch)
    idx, mask = _left_padded(PROMPTS, pad_id=99)
    with torch.no_grad():
        batched = model(idx, attention_mask=mask)
        for row, ids in enumerate(PROMPTS):
            alone = model(torch.tensor([ids]))[0]
            torch.testing.assert_close(batched[row, -len(ids):], alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_cached_decoding_of_a_padded_batch_follows_each_row_alone(arch):
    model = _model(arch)
    idx, mask = _left_padded(PROMPTS)
    with torch.no_grad():
        cache = model.new_kv_cache()
        logits = model(idx, cache, attention_mask=mask)
        following = logits[:, -1].argmax(-1, keepdim=True)
        step = model(following, cache)[:, -1]
        for row, ids in enumerate(PROMPTS):
            alone = model(torch.tensor([ids + [int(following[row])]]))[0, -1]
            torch.testing.assert_close(step[row], alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_batched_greedy_answers_equal_answering_one_prompt_at_a_time(arch):
    model = _model(arch)
    eos = 3
    batched = generate_batch(model, PROMPTS, 12, pad_id=0, eos_id=eos)
    for ids, answer in zip(PROMPTS, batched):
        alone = generate(model, torch.tensor([ids]), 12, eos_id=eos, use_cache=True)[0, len(ids):].tolist()
        assert answer == (alone[: alone.index(eos) + 1] if eos in alone else alone)


@pytest.mark.parametrize("arch", ARCHS)
def test_a_class_head_reads_the_last_real_token_whatever_the_padding(arch):
    model = prepare_for_classification(_model(arch), num_classes=2, trainable_blocks=1)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(name.startswith(("blocks.1.", "final_norm", "out_head")) for name in trainable)
    ids = torch.tensor([[5, 6, 7, 8]])
    padded = torch.tensor([[5, 6, 7, 8, 0, 0, 0]])
    with torch.no_grad():
        expected = model.out_head(model(ids, return_hidden=True)[:, -1])
        got = class_logits(model, padded, pad_token_id=0)
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("tie", [False, True])
def test_lora_starts_as_the_model_and_merges_into_the_same_outputs(arch, tie, tmp_path):
    model = _model(arch, tie)
    ids = torch.tensor([PROMPTS[0]])
    with torch.no_grad():
        before = model(ids)
    apply_lora(model, rank=4, alpha=8)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), before)  # B starts at zero
        for name, parameter in model.named_parameters():
            if name.endswith(".B"):
                parameter.normal_(0, 0.05)
        adapted = model(ids)
    assert (adapted - before).abs().max() > 1e-3
    merge_lora(model)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), adapted, atol=1e-5, rtol=1e-5)
    assert model.cfg.tie_weights is False  # the merged head is its own matrix now
    save_checkpoint(tmp_path, model)
    loaded = model_from_config(read_config(tmp_path), read_arch(tmp_path))
    load_checkpoint(tmp_path, loaded)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(ids), adapted, atol=1e-5, rtol=1e-5)


class CharTokenizer:
    """Characters as ids 10.. and two special tokens, enough to exercise prompt formats without a BPE."""

    specials = {"<|endoftext|>": 1, "<|end|>": 2}

    def encode(self, text, allowed_special=frozenset(), disallowed_special=None):
        if text in self.specials and text in allowed_special:
            return [self.specials[text]]
        return [10 + (ord(char) % (VOCAB - 10)) for char in text]

    def decode(self, ids):
        return "".join(chr(97 + (i - 10) % 26) if i >= 10 else "" for i in ids)


TURNS = PromptFormat(
    "turns",
    instruction_ids=lambda entry, tok: [2] + tok.encode("user:" + entry["instruction"]) + [2],
    header_ids=lambda tok: tok.encode("bot:"),
    end_token="<|end|>",
)


def test_a_prompt_format_decides_the_prompt_and_the_end_id():
    tokenizer, entry = CharTokenizer(), {"instruction": "hi", "input": "", "output": "yo"}
    assert TURNS.prompt_ids(entry, tokenizer) == [2, *tokenizer.encode("user:hi"), 2, *tokenizer.encode("bot:")]
    assert TURNS.end_id(tokenizer) == 2 and ALPACA.end_id(tokenizer) == 1
    dataset = InstructionDataset([entry], tokenizer, return_prompt_length=True, prompt_format=TURNS)
    ids, prompt_length = dataset[0]
    assert ids == TURNS.prompt_ids(entry, tokenizer) + tokenizer.encode("yo")
    assert prompt_length == len(TURNS.prompt_ids(entry, tokenizer))
    inputs, targets = collate_instructions([dataset[0]], pad_token_id=TURNS.end_id(tokenizer), mask_prompt=True)
    assert targets[0].tolist()[-3:] == [*tokenizer.encode("yo"), 2]  # the answer, then the format's end id
    assert (targets[0, : prompt_length - 1] == -100).all()


@pytest.mark.parametrize("arch", ARCHS)
def test_generate_responses_prompts_with_the_format_and_stops_at_its_end_token(arch):
    model, tokenizer = _model(arch), CharTokenizer()
    entries = [{"instruction": "say a", "input": "", "output": "a"},
               {"instruction": "a much longer instruction", "input": "", "output": "b"}]
    with torch.no_grad():  # make the end token the likeliest after a few tokens: every answer stops early
        model.out_head.weight[2] += 5 * model.final_norm(model.tok_emb.weight).mean(0)
    results = generate_responses(model, tokenizer, entries, max_new_tokens=10, batch_size=2, progress=False,
                                 prompt_format=TURNS)
    for entry, result in zip(entries, results):
        prompt = TURNS.prompt_ids(entry, tokenizer)
        alone = generate(model, torch.tensor([prompt]), 10, eos_id=2, use_cache=True)[0, len(prompt):].tolist()
        answer = alone[: alone.index(2)] if 2 in alone else alone
        assert result["model_response"] == tokenizer.decode(answer).strip()


@pytest.mark.parametrize("arch", ARCHS)
def test_answer_log_probabilities_and_the_first_dpo_loss_on_both_models(arch):
    policy, tokenizer = _model(arch), CharTokenizer()
    records = [{"instruction": "pick", "input": "", "chosen": "good", "rejected": "bad answer"},
               {"instruction": "pick again", "input": "x", "chosen": "yes", "rejected": "no"}]
    dataset = PreferenceDataset(records, tokenizer, end_token_id=2, prompt_format=TURNS)
    assert dataset[0]["prompt_length"] == len(TURNS.prompt_ids(records[0], tokenizer))
    batch = collate_preferences([dataset[0], dataset[1]], pad_token_id=2)
    with torch.no_grad():
        full = sequence_logprobs(policy(batch["chosen"]), batch["chosen"], batch["chosen_mask"])
        selected = model_sequence_logprobs(policy, batch["chosen"], batch["chosen_mask"])
    torch.testing.assert_close(selected, full, atol=1e-4, rtol=1e-5)
    reference = frozen_reference(copy.deepcopy(policy))
    loss, _, _ = dpo_batch_loss(policy, reference, batch, beta=0.1, device="cpu")
    assert loss.item() == pytest.approx(torch.log(torch.tensor(2.0)).item(), abs=1e-5)  # policy = reference
