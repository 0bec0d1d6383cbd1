"""helpers.tokenizers: word-level V1/V2, GPT-2 via tiktoken, and byte-level BPE from scratch."""

from __future__ import annotations

import re
from collections import Counter

import pytest
import regex
import tiktoken
from hypothesis import example, given
from hypothesis import strategies as st

from helpers.data import fetch, read_text
from helpers.tokenizers import (
    GPT2_SPLIT_PATTERN,
    BPETokenizer,
    SimpleTokenizerV1,
    SimpleTokenizerV2,
    build_vocab,
    gpt2_tokenizer,
)

SPECIALS = ("<|endoftext|>", "<|unk|>")
PLAIN_SENTENCE = "His wife glanced at him deprecatingly, but his eyes travelled past her to the portrait."
QUOTED_SENTENCE = '"It\'s the last he painted, you know," Mrs. Gisburn said with pardonable pride.'

# Text chosen to exercise every branch of GPT-2's pre-tokenizer and multi-byte UTF-8.
VARIED_TEXT = "\n".join(
    [
        "Hello, world! Hello,   world!  Two  spaces,   three  "
        " spaces,\t\ttabs\tand\nnewlines\n\n\nand \r\n CRLF.",
        "Trailing spaces at the end of a line   \n    and leading "
        "ones; a lone space \u00a0 and NBSP\u00a0here.",
        "Whitespace runs:          ten spaces, \t \t mixed, "
        "\n \n \n, \x0b\x0c vertical tab and form feed.",
        "Digits: 0 1 12 123 1234 12345 3.14159 1,000,000 "
        "2024-06-01 07:45:00 +49 (0)30 1234567 1e-9 0xFF",
        "Contractions: it's don't they're we've I'm you'll "
        "he'd -- IT'S DON'T THEY'RE WE'VE I'M YOU'LL HE'D",
        "Mixed case: It'S dOn'T tHeY'rE wE'Ve i'M yoU'Ll hE'd; "
        "quotes 'single' and \"double\" and ''' and 's alone.",
        "Punctuation runs: ... !!! ??? ?!?! --- ___ *** ### @@@ "
        "$$$ %%% ^^^ &&& ((( ))) [[[ ]]] {{{ }}} <<< >>> ~~~",
        "Code: def f(x): return {'a': [1, 2, 3], \"b\": x "
        "** 2} # comment\n    if x >= 10 and y != 0: pass",
        "URLs and mail: https://example.com/path?q=1&r=two#frag, "
        "someone@example.org, C:\\Users\\me\\file.txt",
        "Chinese: 我们在阳光明媚的露台上喝茶。自然语言处理很有趣！",
        "Japanese: 今日は良い天気ですね。カタカナとひらがな。",
        "Korean: 안녕하세요, 세계! 한국어 텍스트입니다.",
        "Arabic: مرحبا بالعالم! هذه جملة باللغة العربية.",
        "Hebrew: שלום עולם, זה משפט בעברית.",
        "Hindi: नमस्ते दुनिया! यह हिंदी में एक वाक्य है।",
        "Cyrillic: Привет, мир! Съешь же ещё этих мягких французских булок, да выпей чаю.",
        "Greek: Γειά σου Κόσμε! Ξεσκεπάζω την ψυχοφθόρα βδελυγμία.",
        "Thai: สวัสดีชาวโลก ภาษาไทย",
        "Emoji: 😀 😃 😄 👍 👍🏻 👍🏽 👍🏿 ❤️ 🇩🇪 🇯🇵 👨‍👩‍👧‍👦 👩🏽‍💻 🧑‍🚀 🏳️‍🌈 🤷‍♀️ and 😀😀😀 in a row",
        "Accents: café naïve résumé coöperate façade jalapeño "
        "Ångström Zürich São Paulo Łódź Dvořák Ελληνικά",
        "Combining: e\u0301 a\u0308 n\u0303 (decomposed) vs é ä ñ "
        "(precomposed); Z\u0351\u0368a\u0362\u0361l\u0315go\u0334",
        "Symbols: © ® ™ € £ ¥ ₹ § ¶ † ‡ • … ‰ ′ ″ ← → ↑ ↓ ∀ ∂ ∃ ∅ ∇ ∈ ∑ √ ∞ ≈ ≠ ≤ ≥ ½ ¾ ²³ ⁴",
        "Math digits: ١٢٣ ४५६ 一二三 ⅠⅡⅢ ①②③ 𝟙𝟚𝟛 and fullwidth ＡＢＣ１２３",
        "Rare planes: 𝕳𝖊𝖑𝖑𝖔 𝓦𝓸𝓻𝓵𝓭 𐍈 𓀀 🀄 \U0001f9ec",
        "Control-ish: \x00\x01\x1b[31mred\x1b[0m \x7f \u200b\u200c\u200d "
        "\ufeff BOM \u2028 \u2029 end",
        "Prose: She'd said they'd've come, but we'll see; I've "
        "heard it's 'complicated'. Y'all'd better hurry!!",
        "Prose: \"Well,\" he said -- and paused -- \"I'm not sure "
        "I'd call it art...\" (He didn't.) 100% sure? No: 99.9%.",
        "Indented block:\n\tfirst level\n\t\tsecond level\n    "
        "    eight spaces\n\n\n\n    four, then blank lines\n",
        "Table:\n| name | value |\n|------|------:|\n| pi   | 3.14  |\n| e    | 2.718 |\n",
        "Chinese prose: 在一个阳光明媚的早晨，他走进了花园，"
        "看见一位老人正在读书。老人抬起头，微笑着说：“你好！”",
        "Arabic prose: ذهب الولد إلى المدرسة في الصباح الباكر، "
        "وكان الجو جميلاً ومشمساً. قال المعلم: أهلاً وسهلاً!",
        "Hindi prose: एक समय की बात है, एक छोटे से गाँव में "
        "एक किसान रहता था। वह बहुत मेहनती था और ईमानदार भी।",
        "Cyrillic prose: В чащах юга жил бы цитрус? Да, но фальшивый "
        "экземпляр! Ёжик, щука и эхо — ЮЖНЫЙ ВЕТЕР.",
        "Greek prose: Τάχιστη αλώπηξ βαφής ψημένη γη, δρασκελίζει "
        "υπέρ νωθρού κυνός. ΑΡΧΑΙΑ ΕΛΛΗΝΙΚΑ ΚΕΙΜΕΝΑ.",
        "Emoji prose: I ❤️ tea ☕️☕️ and 🍰! Family: 👨‍👨‍👧 👩‍👩‍👦‍👦; "
        "hands 👋🏼👋🏾; flags 🇫🇷🇧🇷🇮🇳; 🫠🫶🏻 newer ones.",
        "Accented prose: À l'été, Noël et Zoë mangèrent des crêpes "
        "à Besançon; Øystein fikk blåbær på Ærø; İstanbul'da.",
        "Numbers glued: abc123def 123abc 1,2,3 1.2.3 ...123 123... "
        "$1,234.56 €99 v2.0.1-rc1 #42 @home 4x4 3D 2nd",
    ]
)


@pytest.fixture(scope="module")
def gpt2_bpe() -> BPETokenizer:
    """The from-scratch tokenizer with OpenAI's GPT-2 tables (built once: it takes about a second)."""
    return BPETokenizer.from_gpt2()


@pytest.fixture(scope="module")
def reference() -> tiktoken.Encoding:
    return tiktoken.get_encoding("gpt2")


@pytest.fixture(scope="module")
def verdict_bpe_400(verdict_text) -> BPETokenizer:
    return BPETokenizer().train(verdict_text, vocab_size=400)


@pytest.fixture(scope="module")
def verdict_bpe_500(verdict_text) -> BPETokenizer:
    return BPETokenizer().train(verdict_text, vocab_size=500, special_tokens=SPECIALS)


@pytest.fixture(scope="module")
def shakespeare_slice() -> str:
    return read_text("tinyshakespeare")[:50_000]


# -- word-level tokenizers ---------------------------------------------------------------------


def test_build_vocab_on_verdict_has_1130_words(verdict_text):
    vocab = build_vocab(verdict_text)
    assert len(vocab) == 1130
    assert sorted(vocab.values()) == list(range(1130))
    assert list(vocab) == sorted(vocab)


def test_build_vocab_with_special_tokens_has_1132_entries_specials_last(verdict_text):
    vocab = build_vocab(verdict_text, special_tokens=SPECIALS)
    assert len(vocab) == 1132
    assert vocab["<|endoftext|>"] == 1130
    assert vocab["<|unk|>"] == 1131


def test_simple_tokenizer_v1_round_trips_a_sentence_of_the_story(verdict_text):
    # given a tokenizer over the story's vocabulary and a sentence from the story
    assert PLAIN_SENTENCE in verdict_text
    tokenizer = SimpleTokenizerV1(build_vocab(verdict_text))
    # when
    ids = tokenizer.encode(PLAIN_SENTENCE)
    # then decoding gives the sentence back, one id per word or punctuation mark
    assert len(ids) == len(re.findall(r"\w+|[,.]", PLAIN_SENTENCE))
    assert tokenizer.decode(ids) == PLAIN_SENTENCE


def test_simple_tokenizer_v1_ids_survive_decode_and_encode(verdict_text):
    # quotes and apostrophes are split off, so the text is normalised but the ids are stable
    assert QUOTED_SENTENCE in verdict_text
    tokenizer = SimpleTokenizerV1(build_vocab(verdict_text))
    ids = tokenizer.encode(QUOTED_SENTENCE)
    assert tokenizer.encode(tokenizer.decode(ids)) == ids


def test_simple_tokenizer_v1_unknown_word_names_it_and_suggests_v2(verdict_text):
    tokenizer = SimpleTokenizerV1(build_vocab(verdict_text))
    with pytest.raises(KeyError) as caught:
        tokenizer.encode("Hello, do you like tea?")
    message = str(caught.value)
    assert "Hello" in message
    assert "SimpleTokenizerV2" in message


def test_simple_tokenizer_v2_maps_unknown_words_and_knows_endoftext(verdict_text):
    # given the book's example: two texts joined by <|endoftext|>, with words the story lacks
    vocab = build_vocab(verdict_text, special_tokens=SPECIALS)
    tokenizer = SimpleTokenizerV2(vocab)
    text = "Hello, do you like tea? <|endoftext|> In the sunlit terraces of the palace."
    # when
    ids = tokenizer.encode(text)
    # then unknown words become <|unk|> and the separator keeps its own id
    assert ids[0] == vocab["<|unk|>"]
    assert ids[-2] == vocab["<|unk|>"]
    assert ids.count(vocab["<|unk|>"]) == 2
    assert vocab["<|endoftext|>"] in ids
    expected = "<|unk|>, do you like tea? <|endoftext|> In the sunlit terraces of the <|unk|>."
    assert tokenizer.decode(ids) == expected


def test_simple_tokenizer_v2_decode_removes_spaces_before_punctuation(verdict_text):
    tokenizer = SimpleTokenizerV2(build_vocab(verdict_text))
    spaced = "Yes , he said ; and then : nothing ? No ! It was ."
    ids = tokenizer.encode(spaced)
    assert tokenizer.str_to_int["<|unk|>"] not in ids  # every word is in the story
    assert tokenizer.decode(ids) == "Yes, he said; and then: nothing? No! It was."


def test_simple_tokenizer_v2_adds_missing_special_tokens_at_the_end(verdict_text):
    vocab = build_vocab(verdict_text)
    tokenizer = SimpleTokenizerV2(vocab)
    assert tokenizer.encode("<|endoftext|> zebra") == [len(vocab), len(vocab) + 1]


# -- GPT-2 via tiktoken ------------------------------------------------------------------------


def test_gpt2_tokenizer_matches_tiktoken_and_encodes_endoftext(gpt2_tok, reference):
    text = "Hello, do you like tea? <|endoftext|> In the sunlit terraces of someunknownPlace."
    ids = gpt2_tok.encode(text, allowed_special={"<|endoftext|>"})
    assert 50256 in ids
    assert ids == reference.encode(text, allowed_special={"<|endoftext|>"})
    assert gpt2_tok.decode(ids) == text
    assert gpt2_tok.n_vocab == 50257


@pytest.fixture
def fresh_gpt2_tokenizer_cache():
    gpt2_tokenizer.cache_clear()
    yield
    gpt2_tokenizer.cache_clear()


def test_gpt2_tokenizer_failure_mentions_tiktoken_cache_dir(fresh_gpt2_tokenizer_cache, monkeypatch):
    def cannot_load(name):
        raise ConnectionError("offline: cannot reach openaipublic.blob.core.windows.net")

    monkeypatch.setattr(tiktoken, "get_encoding", cannot_load)
    with pytest.raises(RuntimeError) as caught:
        gpt2_tokenizer()
    assert "TIKTOKEN_CACHE_DIR" in str(caught.value)
    assert "offline" in str(caught.value)


# -- byte-level BPE: GPT-2's tables ------------------------------------------------------------


def test_from_gpt2_matches_tiktoken_on_varied_text(gpt2_bpe, reference):
    assert len(VARIED_TEXT.encode("utf-8")) > 3000
    assert gpt2_bpe.encode(VARIED_TEXT) == reference.encode(VARIED_TEXT)


@pytest.mark.parametrize("line", VARIED_TEXT.split("\n"), ids=lambda line: line.split(":")[0][:20])
def test_from_gpt2_matches_tiktoken_line_by_line(gpt2_bpe, reference, line):
    ids = gpt2_bpe.encode(line)
    assert ids == reference.encode(line)
    assert gpt2_bpe.decode(ids) == line


def test_from_gpt2_matches_tiktoken_on_the_verdict(gpt2_bpe, reference, verdict_text):
    ids = gpt2_bpe.encode(verdict_text)
    assert ids == reference.encode(verdict_text)
    assert gpt2_bpe.decode(ids) == verdict_text


def test_from_gpt2_matches_tiktoken_on_tinyshakespeare(gpt2_bpe, reference, shakespeare_slice):
    ids = gpt2_bpe.encode(shakespeare_slice)
    assert ids == reference.encode(shakespeare_slice)
    assert gpt2_bpe.decode(ids) == shakespeare_slice


def test_from_gpt2_encodes_endoftext_when_all_specials_allowed(gpt2_bpe, reference):
    text = "first document<|endoftext|>second document <|endoftext|>"
    ids = gpt2_bpe.encode(text, allowed_special="all")
    assert ids == reference.encode(text, allowed_special="all")
    assert ids.count(50256) == 2
    assert gpt2_bpe.encode("<|endoftext|>", allowed_special="all") == [50256]
    assert gpt2_bpe.n_vocab == reference.n_vocab == 50257


def test_from_gpt2_accepts_explicit_file_paths(gpt2_bpe):
    explicit = BPETokenizer.from_gpt2(fetch("gpt2-encoder"), fetch("gpt2-vocab"))
    assert explicit.encode(VARIED_TEXT) == gpt2_bpe.encode(VARIED_TEXT)


def test_disallowed_special_token_raises_like_tiktoken(gpt2_bpe, reference):
    text = "The end.<|endoftext|>A new story."
    with pytest.raises(ValueError):
        reference.encode(text)
    with pytest.raises(ValueError, match=re.escape("<|endoftext|>")):
        gpt2_bpe.encode(text)


def test_disallowed_special_empty_encodes_special_token_as_text(gpt2_bpe, reference):
    text = "The end.<|endoftext|>A new story."
    ids = gpt2_bpe.encode(text, disallowed_special=())
    assert ids == reference.encode(text, disallowed_special=())
    assert 50256 not in ids
    assert gpt2_bpe.decode(ids) == text


# Letters assigned in Unicode 17 (2025) followed by a contraction: Armenian U+0558, Sidetic U+10940,
# CJK Extension J U+323B0. Rare, but "any text" includes them.
UNICODE_17_LETTERS_BEFORE_CONTRACTION = ["\u0558's", "x\U00010940'll go", "\U000323b0've \U000323b0't"]


def test_from_gpt2_matches_tiktoken_around_letters_new_in_unicode_17(gpt2_bpe, reference):
    mismatches = {
        text: (gpt2_bpe.encode_ordinary(text), reference.encode_ordinary(text))
        for text in UNICODE_17_LETTERS_BEFORE_CONTRACTION
        if gpt2_bpe.encode_ordinary(text) != reference.encode_ordinary(text)
    }
    assert mismatches == {}


@given(st.text())
@example(UNICODE_17_LETTERS_BEFORE_CONTRACTION[0])
def test_from_gpt2_equals_tiktoken_encode_ordinary_on_any_text(gpt2_bpe, reference, text):
    ids = gpt2_bpe.encode_ordinary(text)
    assert ids == reference.encode_ordinary(text)
    assert gpt2_bpe.decode(gpt2_bpe.encode_ordinary(text)) == text


# Whitespace of every kind, contraction letters, digits, punctuation and multi-code-point characters,
# drawn densely so that runs and contractions meet in every combination.
PRETOKENIZER_PIECES = [*" \t\n\r\x0b\x0c\u00a0\u3000'sStTdDmMlLvVrReE0123456789.,!?-_", "👍🏽", "😀", "\u200d",
                       "é", "e\u0301", "中", "ع", "'s", "'LL", "  ", "\n\n"]
PRETOKENIZER_HOSTILE = st.lists(st.sampled_from(PRETOKENIZER_PIECES), max_size=40).map("".join)


@given(PRETOKENIZER_HOSTILE)
def test_from_gpt2_equals_tiktoken_on_whitespace_and_contraction_mixtures(gpt2_bpe, reference, text):
    assert gpt2_bpe.encode_ordinary(text) == reference.encode_ordinary(text)


# -- byte-level BPE: trained from scratch ------------------------------------------------------


@given(st.text())
def test_tokenizer_trained_on_verdict_round_trips_any_unicode(verdict_bpe_400, text):
    ids = verdict_bpe_400.encode(text)
    assert all(0 <= i < 400 for i in ids)
    assert verdict_bpe_400.decode(ids) == text


def test_trained_tokenizer_compresses_its_training_text(verdict_text):
    # given
    tokenizer = BPETokenizer().train(verdict_text, vocab_size=500)
    # when
    ids = tokenizer.encode(verdict_text)
    # then well under one token per byte, with the requested vocabulary
    n_bytes = len(verdict_text.encode("utf-8"))
    assert len(ids) / n_bytes < 0.6
    assert tokenizer.n_vocab == 500
    assert max(ids) < 500
    assert tokenizer.decode(ids) == verdict_text


def test_trained_tokenizer_puts_special_tokens_at_the_end(verdict_bpe_500):
    assert verdict_bpe_500.n_vocab == 500
    assert verdict_bpe_500.special_tokens == {"<|endoftext|>": 498, "<|unk|>": 499}
    assert max(verdict_bpe_500.vocab) == 497
    assert verdict_bpe_500.encode("a<|endoftext|>b", allowed_special="all")[1] == 498
    assert verdict_bpe_500.decode([498, 499]) == "<|endoftext|><|unk|>"


def test_each_learned_merge_is_the_most_frequent_pair_at_its_step(verdict_text):
    # given a tokenizer trained with incremental pair counts
    tokenizer = BPETokenizer().train(verdict_text, vocab_size=320)
    # when the merges are replayed on the story's chunks, recounting every pair from scratch
    chunks = Counter(chunk.encode("utf-8") for chunk in regex.findall(GPT2_SPLIT_PATTERN, verdict_text))
    words = {chunk: list(chunk) for chunk in chunks}
    for (left, right), new_id in tokenizer.merges.items():
        counts: Counter[tuple[int, int]] = Counter()
        for chunk, word in words.items():
            for pair in zip(word, word[1:], strict=False):
                counts[pair] += chunks[chunk]
        # then the pair merged at each step is one with the highest count
        assert counts[(left, right)] == max(counts.values())
        for chunk, word in words.items():
            merged, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == (left, right):
                    merged.append(new_id)
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            words[chunk] = merged
    assert len(tokenizer.merges) == 320 - 256


def test_trained_tokenizer_merges_frequent_words_of_the_story(verdict_bpe_500):
    # " the" is among the story's most frequent chunks; after 242 merges it is one token
    assert len(verdict_bpe_500.encode(" the")) == 1
    assert len(verdict_bpe_500.encode(" Gisburn")) < len(" Gisburn")


def test_saved_and_loaded_tokenizer_encodes_held_out_text_identically(verdict_bpe_500, shakespeare_slice,
                                                                      tmp_path):
    # given a trained tokenizer, saved
    path = verdict_bpe_500.save(tmp_path / "verdict-bpe.json")
    # when it is loaded again
    loaded = BPETokenizer.load(path)
    # then held-out text (not seen in training) gets the same ids
    held_out = shakespeare_slice[:20_000] + VARIED_TEXT + "<|endoftext|>"
    ids = verdict_bpe_500.encode(held_out, allowed_special="all")
    assert loaded.encode(held_out, allowed_special="all") == ids
    assert ids[-1] == verdict_bpe_500.special_tokens["<|endoftext|>"]
    assert loaded.special_tokens == verdict_bpe_500.special_tokens
    assert loaded.n_vocab == verdict_bpe_500.n_vocab
    assert sorted(p.name for p in tmp_path.iterdir()) == ["verdict-bpe.json"]  # no temporary file left


def test_gpt2_tokenizer_survives_save_and_load(gpt2_bpe, reference, tmp_path):
    loaded = BPETokenizer.load(gpt2_bpe.save(tmp_path / "gpt2.json"))
    assert loaded.encode(VARIED_TEXT) == reference.encode(VARIED_TEXT)


def test_loading_a_text_file_raises_value_error_naming_it(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("I HAD always thought Jack Gisburn rather a cheap genius", encoding="utf-8")
    with pytest.raises(ValueError, match=re.escape(str(path))):
        BPETokenizer.load(path)


def test_loading_a_foreign_json_file_raises_value_error_naming_it():
    encoder_json = fetch("gpt2-encoder")  # valid JSON, but not a file BPETokenizer.save wrote
    with pytest.raises(ValueError, match=re.escape(str(encoder_json))):
        BPETokenizer.load(encoder_json)


@pytest.mark.parametrize(("vocab_size", "specials"), [(255, ()), (257, SPECIALS), (0, ())])
def test_vocab_size_below_bytes_plus_specials_raises(verdict_text, vocab_size, specials):
    with pytest.raises(ValueError, match=str(256 + len(specials))):
        BPETokenizer().train(verdict_text, vocab_size=vocab_size, special_tokens=specials)
