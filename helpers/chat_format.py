"""Chat templates (Part 11): a conversation as the exact text a chat model was finetuned to read.

A chat model sees one string: every message wrapped in markers of who speaks. SmolLM2 uses ChatML,
``<|im_start|>role\\ncontent<|im_end|>\\n`` per message, and its template (the Jinja text in its GGUF
file, ``helpers.gguf.gguf_chat_template``) puts a default system message first when the
conversation has none. ``format_chat`` writes the same text without a template engine.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

__all__ = ["IM_END", "IM_START", "SMOLLM2_SYSTEM_PROMPT", "format_chat"]

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
SMOLLM2_SYSTEM_PROMPT = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
"""The system message SmolLM2-Instruct's chat template adds when a conversation starts without one."""


def _checked(messages: Sequence[Mapping[str, str]]) -> list[tuple[str, str]]:
    if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Sequence):
        raise TypeError(f"messages must be a list of {{'role': ..., 'content': ...}} dicts, got "
                        f"{type(messages).__name__}")
    checked = []
    for index, message in enumerate(messages):
        if not (isinstance(message, Mapping) and all(isinstance(message.get(k), str) for k in ("role", "content"))):
            raise ValueError(f"messages[{index}] must be a dict with string 'role' and 'content', got {message!r:.80}")
        if not message["role"]:
            raise ValueError(f"messages[{index}] has an empty role; use 'system', 'user' or 'assistant'")
        checked.append((message["role"], message["content"]))
    return checked


def format_chat(messages: Sequence[Mapping[str, str]], *, system_prompt: str | None = SMOLLM2_SYSTEM_PROMPT,
                add_generation_prompt: bool = True) -> str:
    """The ChatML text of ``messages`` (dicts with ``role`` and ``content``), as SmolLM2's template renders it.

    Each message becomes ``<|im_start|>{role}\\n{content}<|im_end|>\\n``. If the first message is not
    a system message, one holding ``system_prompt`` goes before it (``None``: plain ChatML, no system
    message added); an empty conversation gets none, as the template's loop never runs.
    ``add_generation_prompt`` ends the text with ``<|im_start|>assistant\\n``, where the model's answer
    begins. Contents are not escaped: encode the text with its special tokens allowed.
    """
    turns = _checked(messages)
    if turns and turns[0][0] != "system" and system_prompt is not None:
        turns.insert(0, ("system", system_prompt))
    text = "".join(f"{IM_START}{role}\n{content}{IM_END}\n" for role, content in turns)
    return text + f"{IM_START}assistant\n" if add_generation_prompt else text
