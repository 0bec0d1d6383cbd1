"""Tests for helpers.lora: a wrapped model starts identical, trains only the adapters, merges, matches peft."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from helpers.classify import count_trainable_parameters, prepare_for_classification
from helpers.lora import LoRALinear, apply_lora, merge_lora
from helpers.model import GPTConfig, GPTModel


@pytest.fixture
def classifier():
    """A tiny GPTModel with a 2-way head, every parameter trainable, in eval mode."""
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=101, context_length=16, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.0)
    return prepare_for_classification(GPTModel(cfg), trainable_blocks=None).eval()


@pytest.fixture
def inputs():
    return torch.randint(0, 101, (3, 10), generator=torch.Generator().manual_seed(1))


def _linear_names(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]


def _randomise_b(model: nn.Module, seed: int = 2) -> None:
    """Give every adapter a non-zero B, as training would."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, LoRALinear):
                module.B.copy_(0.1 * torch.randn(module.B.shape, generator=generator))


def test_lora_linear_computes_the_low_rank_update_by_hand():
    torch.manual_seed(0)
    linear = nn.Linear(6, 4)
    lora = LoRALinear(linear, rank=2, alpha=3.0)
    with torch.no_grad():
        lora.B.normal_()
    x = torch.randn(5, 6)
    expected = x @ linear.weight.T + linear.bias + (3.0 / 2) * x @ lora.A @ lora.B
    torch.testing.assert_close(lora(x), expected)
    bound = 1 / math.sqrt(6)  # Kaiming-uniform with a = sqrt(5), as peft draws A
    assert lora.A.abs().max() <= bound and lora.A.abs().max() > 0.5 * bound and torch.all(lora.B != 0)
    assert torch.all(LoRALinear(linear, 2, 3.0).B == 0)


def test_a_wrapped_model_starts_identical(classifier, inputs):
    before = classifier(inputs, return_hidden=True)
    logits_before = classifier(inputs)

    apply_lora(classifier, rank=4, alpha=8)

    torch.testing.assert_close(classifier(inputs, return_hidden=True), before, rtol=0, atol=0)
    torch.testing.assert_close(classifier(inputs), logits_before, rtol=0, atol=0)


def test_apply_lora_wraps_every_linear_and_trains_only_the_adapters(classifier, inputs):
    linears = {name: (m.in_features, m.out_features) for name, m in classifier.named_modules()
               if isinstance(m, nn.Linear)}
    assert "out_head" in linears and len(linears) == 2 * 6 + 1  # q, k, v, out_proj, two feed-forward layers

    apply_lora(classifier, rank=4, alpha=8)

    wrapped = {name for name, m in classifier.named_modules() if isinstance(m, LoRALinear)}
    assert wrapped == set(linears)
    assert count_trainable_parameters(classifier) == sum(4 * (i + o) for i, o in linears.values())
    frozen = {name: p.detach().clone() for name, p in classifier.named_parameters() if not p.requires_grad}
    adapters = {name: p.detach().clone() for name, p in classifier.named_parameters() if p.requires_grad}
    assert all(name.endswith((".A", ".B")) for name in adapters)

    # when it trains a few steps
    classifier.train()
    optimizer = torch.optim.AdamW([p for p in classifier.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        loss = classifier(inputs)[:, -1].logsumexp(-1).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    # then only the adapters moved
    for name, parameter in classifier.named_parameters():
        if name in frozen:
            assert torch.equal(parameter, frozen[name]), name
        else:
            assert not torch.equal(parameter, adapters[name]), name


def test_merge_lora_gives_plain_linears_with_the_same_outputs(classifier, inputs):
    with torch.no_grad():
        base = classifier(inputs)
    apply_lora(classifier, rank=4, alpha=8)
    _randomise_b(classifier)
    with torch.no_grad():
        adapted = classifier(inputs)
    assert not torch.allclose(adapted, base, atol=1e-4)  # the adapters change the outputs

    merge_lora(classifier)

    assert not any(isinstance(m, LoRALinear) for m in classifier.modules())
    assert len(_linear_names(classifier)) == 13 and "out_head" in _linear_names(classifier)
    torch.testing.assert_close(classifier(inputs), adapted, rtol=1e-5, atol=1e-5)


def test_merging_a_tied_head_leaves_the_embedding_alone(inputs):
    torch.manual_seed(0)
    model = GPTModel(GPTConfig(vocab_size=101, context_length=16, emb_dim=32, n_heads=4, n_layers=1,
                               drop_rate=0.0, tie_weights=True)).eval()
    embedding = model.tok_emb.weight.detach().clone()
    apply_lora(model, rank=2, alpha=4)
    _randomise_b(model)
    with torch.no_grad():
        adapted = model(inputs)

    merge_lora(model)

    torch.testing.assert_close(model.tok_emb.weight, embedding, rtol=0, atol=0)
    torch.testing.assert_close(model(inputs), adapted, rtol=1e-5, atol=1e-5)


def test_lora_matches_peft_on_the_same_base_weights_and_adapters(classifier, inputs):
    peft = pytest.importorskip("peft")
    # given peft's LoRA on a copy of the same base model, with random B so the adapters matter
    reference = copy.deepcopy(classifier)
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=_linear_names(classifier),
                             bias="none")
    reference = peft.inject_adapter_in_model(config, reference)
    apply_lora(classifier, rank=4, alpha=8)
    _randomise_b(classifier)

    # when peft's adapter matrices are set to ours (peft stores A as (rank, in), B as (out, rank))
    peft_layers = dict(reference.named_modules())
    with torch.no_grad():
        for name, module in classifier.named_modules():
            if isinstance(module, LoRALinear):
                peft_layer = peft_layers[name]
                peft_layer.lora_A["default"].weight.copy_(module.A.T)
                peft_layer.lora_B["default"].weight.copy_(module.B.T)
                assert peft_layer.scaling["default"] == module.scaling

    # then both compute the same logits
    torch.testing.assert_close(classifier(inputs), reference(inputs), rtol=1e-5, atol=1e-5)


def test_lora_refuses_bad_arguments(classifier):
    with pytest.raises(ValueError, match="rank must be an integer >= 1, got 0"):
        LoRALinear(nn.Linear(4, 4), rank=0, alpha=1)
    with pytest.raises(ValueError, match="alpha must be a positive number"):
        LoRALinear(nn.Linear(4, 4), rank=2, alpha=-1)
    with pytest.raises(TypeError, match="LoRALinear wraps an nn.Linear, got Conv1d"):
        LoRALinear(nn.Conv1d(2, 2, 1), rank=2, alpha=1)
    with pytest.raises(ValueError, match="no LoRA adapters to merge"):
        merge_lora(classifier)
    apply_lora(classifier, rank=2, alpha=4)
    with pytest.raises(ValueError, match="already has LoRA adapters; call merge_lora"):
        apply_lora(classifier, rank=2, alpha=4)


# ---------------------------------------------------------------------------------------------
# saving after surgery: the config says what the weights are, and a save and a load give the same logits


def _tiny_gpt(tie_weights: bool) -> GPTModel:
    torch.manual_seed(0)
    return GPTModel(GPTConfig(vocab_size=101, context_length=16, emb_dim=32, n_heads=4, n_layers=1,
                              drop_rate=0.0, tie_weights=tie_weights)).eval()


def _logits(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(inputs)


@pytest.mark.parametrize("tie_weights", [False, True], ids=["untied", "tied"])
def test_merge_lora_leaves_a_config_that_says_whether_the_head_is_still_tied(tie_weights):
    model = apply_lora(_tiny_gpt(tie_weights), rank=2, alpha=4)
    assert model.cfg.tie_weights == tie_weights  # unmerged, the base head still is the embedding

    merge_lora(model)

    assert model.cfg.tie_weights is False  # the merged head is a matrix of its own
    assert model.out_head.weight is not model.tok_emb.weight


@pytest.mark.parametrize("save", ["save_hf_gpt2", "save_checkpoint"])
@pytest.mark.parametrize("tie_weights", [False, True], ids=["untied", "tied"])
def test_a_merged_model_saved_and_loaded_with_load_gpt2_gives_its_logits(tmp_path, inputs, tie_weights, save):
    from helpers.checkpoint import save_checkpoint
    from helpers.weights import load_gpt2, save_hf_gpt2

    # given a LoRA model whose adapters change every layer's output, merged
    model = apply_lora(_tiny_gpt(tie_weights), rank=2, alpha=4)
    _randomise_b(model)
    expected = _logits(model, inputs)
    merge_lora(model)

    # when it is saved and loaded back
    if save == "save_hf_gpt2":
        save_hf_gpt2(model, tmp_path / "merged")
    else:
        save_checkpoint(tmp_path / "merged", model)
    back = load_gpt2(tmp_path / "merged")

    # then it computes what the adapted model computed: the merged head was not replaced by the embedding
    torch.testing.assert_close(_logits(back, inputs), expected, rtol=1e-5, atol=1e-5)
    assert back.cfg.tie_weights is False  # (GPT-2's layout always has qkv biases: that field may differ)


@pytest.mark.parametrize("tie_weights", [False, True], ids=["untied", "tied"])
def test_an_unmerged_model_round_trips_through_a_checkpoint_into_a_lora_model(tmp_path, inputs, tie_weights):
    from helpers.checkpoint import load_checkpoint, save_checkpoint

    model = apply_lora(_tiny_gpt(tie_weights), rank=2, alpha=4)
    _randomise_b(model)
    save_checkpoint(tmp_path / "adapted", model)

    fresh = apply_lora(GPTModel(model.cfg), rank=2, alpha=4)
    load_checkpoint(tmp_path / "adapted", fresh)

    torch.testing.assert_close(_logits(fresh, inputs), _logits(model, inputs), rtol=0, atol=0)


@pytest.mark.parametrize("tie_weights", [False, True], ids=["untied", "tied"])
def test_save_hf_gpt2_refuses_an_unmerged_lora_model_saying_to_merge_it(tmp_path, tie_weights):
    from helpers.weights import save_hf_gpt2

    model = apply_lora(_tiny_gpt(tie_weights), rank=2, alpha=4)
    with pytest.raises(ValueError, match=r"LoRA adapters .*call helpers\.lora\.merge_lora\(model\) first"):
        save_hf_gpt2(model, tmp_path / "export")
    assert not (tmp_path / "export").exists()


@pytest.mark.parametrize("merged", [False, True], ids=["unmerged", "merged"])
def test_save_hf_gpt2_refuses_a_classifier_naming_what_saves_it(tmp_path, classifier, merged):
    from helpers.weights import save_hf_gpt2

    if merged:
        merge_lora(apply_lora(classifier, rank=2, alpha=4))
    with pytest.raises(ValueError, match=r"a classifier \(its out_head has 2 outputs.*checkpoint\.save_checkpoint"):
        save_hf_gpt2(classifier, tmp_path / "export")
    assert not (tmp_path / "export").exists()


# ---------------------------------------------------------------------------------------------
# arguments refused where they enter


@pytest.mark.parametrize("rank, alpha, problem", [
    (0, 1, "rank must be an integer >= 1, got 0"),
    (float("nan"), 1, "rank must be an integer >= 1, got nan"),
    (2.0, 1, "rank must be an integer >= 1, got 2.0"),
    (True, 1, "rank must be an integer >= 1, got True"),
    (9, 1, r"rank=9 is larger than the layer it adapts \(in_features=8, out_features=4\).*at most 4"),
    (2, 0, "alpha must be a positive number"),
    (2, float("nan"), "alpha must be a positive number"),
    (2, float("inf"), "alpha must be a positive number"),
    (2, "8", "alpha must be a positive number"),
], ids=["rank-zero", "rank-nan", "rank-float", "rank-bool", "rank-above-the-layer", "alpha-zero", "alpha-nan",
        "alpha-inf", "alpha-string"])
def test_lora_linear_refuses_a_bad_rank_or_alpha_naming_it(rank, alpha, problem):
    with pytest.raises(ValueError, match=problem):
        LoRALinear(nn.Linear(8, 4), rank=rank, alpha=alpha)


def test_a_rank_above_a_narrow_layer_but_within_its_width_is_taken_as_the_book_takes_it():
    # the book wraps a 2-way class head with the model's rank: redundant for that layer, not wrong
    lora = LoRALinear(nn.Linear(8, 2), rank=4, alpha=8)
    assert lora.A.shape == (8, 4) and lora.B.shape == (4, 2)


def test_apply_lora_refuses_a_rank_larger_than_the_layers_and_leaves_the_model_as_it_was(classifier, inputs):
    # given a classifier whose layers are 32 to 128 features wide, every parameter trainable
    before = _logits(classifier, inputs)

    # when / then a rank above a layer's sizes, or a bad alpha, is refused naming the argument
    with pytest.raises(ValueError, match=r"rank=200 is larger than the layer it adapts \(in_features=32"):
        apply_lora(classifier, rank=200, alpha=8)
    with pytest.raises(ValueError, match="alpha must be a positive number"):
        apply_lora(classifier, rank=2, alpha=float("nan"))

    # and the refused calls changed nothing: no adapter, nothing frozen, the same outputs
    assert not any(isinstance(module, LoRALinear) for module in classifier.modules())
    assert all(parameter.requires_grad for parameter in classifier.parameters())
    torch.testing.assert_close(_logits(classifier, inputs), before, rtol=0, atol=0)


def test_load_gpt2_refuses_a_checkpoint_of_an_unmerged_model_or_a_classifier_saying_what_to_do(tmp_path, classifier):
    from helpers.checkpoint import save_checkpoint
    from helpers.weights import load_gpt2

    save_checkpoint(tmp_path / "adapted", apply_lora(_tiny_gpt(tie_weights=True), rank=2, alpha=4))
    save_checkpoint(tmp_path / "classifier", classifier)

    with pytest.raises(ValueError, match=r"holds blocks\.0\.att\.W_key\.A, .*helpers\.lora\.merge_lora before saving"):
        load_gpt2(tmp_path / "adapted")
    with pytest.raises(ValueError, match=r"holds out_head\.bias, .*load a classifier with helpers\.checkpoint"):
        load_gpt2(tmp_path / "classifier")
