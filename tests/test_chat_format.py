"""helpers.chat_format: ChatML text equal to what SmolLM2's own Jinja template renders in transformers."""

from __future__ import annotations

import pytest

from helpers.chat_format import SMOLLM2_SYSTEM_PROMPT, format_chat
from helpers.gguf import GGUFError, gguf_chat_template, smollm2_gguf_path

CONVERSATIONS = {
    "one user turn": [{"role": "user", "content": "What is the capital of France?"}],
    "own system prompt": [{"role": "system", "content": "Answer in French."},
                          {"role": "user", "content": "Hello!"}],
    "several turns": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
                      {"role": "user", "content": "Tell me a joke.\nA short one."}],
    "system later only": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}],
    "empty content": [{"role": "user", "content": ""}],
    "markup in content": [{"role": "user", "content": "{{ not jinja }} {% raw %} <b>bold</b>  trailing  \n"}],
}


@pytest.fixture(scope="module")
def rendered_by_transformers():
    """The file's chat template as transformers renders it (apply_chat_template on a tokenizer holding it)."""
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    try:
        template = gguf_chat_template(smollm2_gguf_path())
    except GGUFError as error:
        pytest.skip(str(error))
    holder = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizers.Tokenizer(tokenizers.models.BPE()),
                                                  chat_template=template)
    return lambda messages, add: holder.apply_chat_template(messages, tokenize=False, add_generation_prompt=add)


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_format_chat_equals_the_file_s_template(rendered_by_transformers, name, add_generation_prompt):
    messages = CONVERSATIONS[name]
    assert format_chat(messages, add_generation_prompt=add_generation_prompt) == \
        rendered_by_transformers(messages, add_generation_prompt)


def test_an_empty_conversation_is_the_generation_prompt_alone_as_jinja_renders_it():
    # transformers' apply_chat_template refuses an empty list; jinja2 itself, set up as transformers sets it up
    jinja2 = pytest.importorskip("jinja2.sandbox")
    try:
        template = gguf_chat_template(smollm2_gguf_path())
    except GGUFError as error:
        pytest.skip(str(error))
    compiled = jinja2.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(template)
    for add in (True, False):
        assert format_chat([], add_generation_prompt=add) == compiled.render(messages=[], add_generation_prompt=add)
    assert format_chat([]) == "<|im_start|>assistant\n"


def test_format_chat_writes_chatml_with_the_default_system_prompt_first():
    text = format_chat([{"role": "user", "content": "Hi"}])
    assert text == (f"<|im_start|>system\n{SMOLLM2_SYSTEM_PROMPT}<|im_end|>\n"
                    "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_format_chat_without_a_system_prompt_is_plain_chatml():
    assert format_chat([{"role": "user", "content": "Hi"}], system_prompt=None, add_generation_prompt=False) == \
        "<|im_start|>user\nHi<|im_end|>\n"


@pytest.mark.parametrize(("messages", "error"), [
    ("Hi", TypeError), ({"role": "user", "content": "Hi"}, TypeError), ([{"role": "user"}], ValueError),
    ([{"role": "user", "content": 3}], ValueError), (["Hi"], ValueError), ([{"role": "", "content": "x"}], ValueError),
])
def test_messages_that_are_not_role_and_content_strings_are_refused(messages, error):
    with pytest.raises(error, match="messages"):
        format_chat(messages)
