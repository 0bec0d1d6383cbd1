"""helpers.tokenizers: word-level V1/V2, GPT-2 via tiktoken, and byte-level BPE from scratch."""

from __future__ import annotations

import contextlib
import json
import random
import re
import string
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import regex
import tiktoken
from hypothesis import example, given
from hypothesis import strategies as st

import helpers.tokenizers as tokenizers_module
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


@contextlib.contextmanager
def tiktoken_unavailable():
    """Inside, tiktoken can be neither imported nor used: ids must come from BPETokenizer's own merges.

    The reference ids are computed with tiktoken before entering; a ``from_gpt2`` that quietly
    delegated to tiktoken would fail here instead of passing by comparing tiktoken with itself.
    """

    def refuse(*args, **kwargs):
        raise AssertionError("tiktoken was called where BPETokenizer must work without it")

    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(sys.modules, "tiktoken", None)  # `import tiktoken` raises ImportError
        patch.setattr(tiktoken, "get_encoding", refuse)
        for method in ("__init__", "encode", "encode_ordinary", "encode_batch", "encode_ordinary_batch",
                       "encode_single_token", "_encode_single_piece", "_encode_bytes", "decode", "decode_bytes"):
            patch.setattr(tiktoken.Encoding, method, refuse)
        patch.setattr(tokenizers_module, "gpt2_tokenizer", refuse)
        yield


@pytest.fixture(scope="module")
def gpt2_bpe() -> BPETokenizer:
    """The from-scratch tokenizer with OpenAI's GPT-2 tables, built without tiktoken (about a second)."""
    with tiktoken_unavailable():
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


def test_tiktoken_unavailable_stops_a_tokenizer_that_delegates_to_tiktoken():
    # given a cheat: a "from-scratch" tokenizer that hands its work to tiktoken
    class Delegating:
        def encode(self, text):
            import tiktoken as hidden

            return hidden.get_encoding("gpt2").encode(text)

    cheat, cached = Delegating(), tiktoken.get_encoding("gpt2")
    # when / then it cannot produce ids while tiktoken is unavailable, even through an encoding made before
    with tiktoken_unavailable():
        with pytest.raises(ImportError):
            cheat.encode("Hello")
        with pytest.raises(AssertionError):
            cached.encode("Hello")
        with pytest.raises(AssertionError):
            tokenizers_module.gpt2_tokenizer()
    assert cheat.encode("Hello") == [15496]  # and it works again afterwards


def test_from_gpt2_matches_tiktoken_on_varied_text(gpt2_bpe, reference):
    assert len(VARIED_TEXT.encode("utf-8")) > 3000
    expected = reference.encode(VARIED_TEXT)
    with tiktoken_unavailable():
        assert gpt2_bpe.encode(VARIED_TEXT) == expected


@pytest.mark.parametrize("line", VARIED_TEXT.split("\n"), ids=lambda line: line.split(":")[0][:20])
def test_from_gpt2_matches_tiktoken_line_by_line(gpt2_bpe, reference, line):
    expected = reference.encode(line)
    with tiktoken_unavailable():
        ids = gpt2_bpe.encode(line)
        assert gpt2_bpe.decode(ids) == line
    assert ids == expected


def test_from_gpt2_matches_tiktoken_on_the_verdict(gpt2_bpe, reference, verdict_text):
    expected = reference.encode(verdict_text)
    with tiktoken_unavailable():
        ids = gpt2_bpe.encode(verdict_text)
        assert gpt2_bpe.decode(ids) == verdict_text
    assert ids == expected


def test_from_gpt2_matches_tiktoken_on_tinyshakespeare(gpt2_bpe, reference, shakespeare_slice):
    expected = reference.encode(shakespeare_slice)
    with tiktoken_unavailable():
        ids = gpt2_bpe.encode(shakespeare_slice)
        assert gpt2_bpe.decode(ids) == shakespeare_slice
    assert ids == expected


def test_from_gpt2_encodes_endoftext_when_all_specials_allowed(gpt2_bpe, reference):
    text = "first document<|endoftext|>second document <|endoftext|>"
    expected = reference.encode(text, allowed_special="all")
    with tiktoken_unavailable():
        ids = gpt2_bpe.encode(text, allowed_special="all")
        assert gpt2_bpe.encode("<|endoftext|>", allowed_special="all") == [50256]
    assert ids == expected
    assert ids.count(50256) == 2
    assert gpt2_bpe.n_vocab == reference.n_vocab == 50257


def test_from_gpt2_accepts_explicit_file_paths(gpt2_bpe, reference):
    expected = reference.encode(VARIED_TEXT)
    with tiktoken_unavailable():
        explicit = BPETokenizer.from_gpt2(fetch("gpt2-encoder"), fetch("gpt2-vocab"))
        assert explicit.encode(VARIED_TEXT) == expected


def random_letters(n: int, seed: int) -> str:
    rng = random.Random(seed)
    return "".join(rng.choice(string.ascii_letters) for _ in range(n))


@pytest.fixture(scope="module")
def glued_words(reference) -> str:
    """One run of 70,000 letters without a space: GPT-2's letter-only tokens, shuffled and glued together.

    GPT-2's pre-tokenizer makes it one chunk, and thousands of different merges apply inside it.
    """
    words = [reference.decode_single_token_bytes(token) for token in range(reference.n_vocab - 1)]
    words = sorted(word.decode("ascii") for word in words if word.isascii() and word.isalpha())
    random.Random(0).shuffle(words)
    return "".join(words)


def test_one_long_run_of_letters_encodes_in_near_linear_time(gpt2_bpe, glued_words):
    # given runs of N and 4N letters (three of each, so that the chunk cache never helps)
    n = 5_000
    runs = {length: [glued_words[offset : offset + length] for offset in (0, 7, 14)] for length in (n, 4 * n)}
    # when each is encoded, timed in alternation by this process's CPU time (other processes do not count)
    seconds = {n: float("inf"), 4 * n: float("inf")}
    with tiktoken_unavailable():
        for round_ in range(3):
            for length, texts in runs.items():
                start = time.process_time()
                gpt2_bpe.encode(texts[round_])
                seconds[length] = min(seconds[length], time.process_time() - start)
    # then four times the letters take about four times the time: O(n log n) measures 5-6x here,
    # while a merge loop that rescans the chunk after each merge (O(n^2)) measured 15x
    assert seconds[4 * n] <= 9 * seconds[n], f"{n} letters: {seconds[n]:.3f} s, {4 * n}: {seconds[4 * n]:.3f} s"


@pytest.mark.parametrize("kind", ["glued words", "random letters", "one letter repeated"])
def test_one_long_run_of_letters_equals_tiktoken(gpt2_bpe, reference, glued_words, kind):
    text = {"glued words": glued_words[:30_000], "random letters": random_letters(30_000, seed=0),
            "one letter repeated": "a" * 30_000}[kind]
    expected = reference.encode(text)
    with tiktoken_unavailable():
        assert gpt2_bpe.encode(text) == expected


def test_disallowed_special_token_raises_like_tiktoken(gpt2_bpe, reference):
    text = "The end.<|endoftext|>A new story."
    with pytest.raises(ValueError):
        reference.encode(text)
    with tiktoken_unavailable(), pytest.raises(ValueError, match=re.escape("<|endoftext|>")):
        gpt2_bpe.encode(text)


def test_disallowed_special_empty_encodes_special_token_as_text(gpt2_bpe, reference):
    text = "The end.<|endoftext|>A new story."
    expected = reference.encode(text, disallowed_special=())
    with tiktoken_unavailable():
        ids = gpt2_bpe.encode(text, disallowed_special=())
        assert gpt2_bpe.decode(ids) == text
    assert ids == expected
    assert 50256 not in ids


# Letters assigned in Unicode 17 (2025) followed by a contraction: Armenian U+0558, Sidetic U+10940,
# CJK Extension J U+323B0. Rare, but "any text" includes them.
UNICODE_17_LETTERS_BEFORE_CONTRACTION = ["\u0558's", "x\U00010940'll go", "\U000323b0've \U000323b0't"]


def test_from_gpt2_matches_tiktoken_around_letters_new_in_unicode_17(gpt2_bpe, reference):
    expected = {text: reference.encode_ordinary(text) for text in UNICODE_17_LETTERS_BEFORE_CONTRACTION}
    with tiktoken_unavailable():
        ours = {text: gpt2_bpe.encode_ordinary(text) for text in UNICODE_17_LETTERS_BEFORE_CONTRACTION}
    assert ours == expected


@given(st.text())
@example(UNICODE_17_LETTERS_BEFORE_CONTRACTION[0])
def test_from_gpt2_equals_tiktoken_encode_ordinary_on_any_text(gpt2_bpe, reference, text):
    expected = reference.encode_ordinary(text)
    with tiktoken_unavailable():
        ids = gpt2_bpe.encode_ordinary(text)
        assert gpt2_bpe.decode(ids) == text
    assert ids == expected


# Whitespace of every kind, contraction letters, digits, punctuation and multi-code-point characters,
# drawn densely so that runs and contractions meet in every combination.
PRETOKENIZER_PIECES = [*" \t\n\r\x0b\x0c\u00a0\u3000'sStTdDmMlLvVrReE0123456789.,!?-_", "👍🏽", "😀", "\u200d",
                       "é", "e\u0301", "中", "ع", "'s", "'LL", "  ", "\n\n"]
PRETOKENIZER_HOSTILE = st.lists(st.sampled_from(PRETOKENIZER_PIECES), max_size=40).map("".join)


@given(PRETOKENIZER_HOSTILE)
def test_from_gpt2_equals_tiktoken_on_whitespace_and_contraction_mixtures(gpt2_bpe, reference, text):
    expected = reference.encode_ordinary(text)
    with tiktoken_unavailable():
        assert gpt2_bpe.encode_ordinary(text) == expected


# Pieces of GPT-2 tokens glued without spaces, so that chunks are long and many merges compete.
LETTER_RUNS = st.lists(st.sampled_from(["a", "aa", "ab", "the", "ing", "tion", "x", "Q", "é", "ll", "er", "re"]),
                       max_size=200).map("".join)


@given(LETTER_RUNS)
def test_from_gpt2_equals_tiktoken_on_long_runs_of_glued_pieces(gpt2_bpe, reference, text):
    expected = reference.encode_ordinary(text)
    with tiktoken_unavailable():
        assert gpt2_bpe.encode_ordinary(text) == expected


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


def textbook_bpe_encode(text: str, merges: list[tuple[int, int]], new_ids: list[int], pattern: str) -> list[int]:
    """A reference written for the test: split ``text`` with ``pattern``, then in each chunk repeatedly
    merge every occurrence of the adjacent pair learned earliest, until no learned pair is left."""
    rank = {pair: order for order, pair in enumerate(merges)}
    ids: list[int] = []
    for chunk in regex.findall(pattern, text):
        word = list(chunk.encode("utf-8"))
        while True:
            present = [pair for pair in zip(word, word[1:], strict=False) if pair in rank]
            if not present:
                break
            first = min(present, key=rank.__getitem__)
            merged, i = [], 0
            while i < len(word):
                if tuple(word[i : i + 2]) == first:
                    merged.append(new_ids[rank[first]])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        ids.extend(word)
    return ids


@pytest.mark.parametrize("fixture", ["verdict_bpe_400", "verdict_bpe_500"])
def test_trained_tokenizer_ids_equal_a_textbook_replay_of_its_merges(request, fixture, reference,
                                                                     shakespeare_slice):
    # given a trained tokenizer, and varied text it has not seen: prose, every script, long runs of letters
    tokenizer = request.getfixturevalue(fixture)
    text = VARIED_TEXT + shakespeare_slice[:5000] + "a" * 700 + random_letters(2000, seed=1) + " " + "ab" * 300
    # when it encodes the text, and the textbook algorithm replays its merges with tiktoken's pre-tokenizer
    ours = tokenizer.encode(text)
    replayed = textbook_bpe_encode(text, list(tokenizer.merges), list(tokenizer.merges.values()),
                                   reference._pat_str)
    # then both give the same ids
    assert ours == replayed
    assert len(ours) < len(text.encode("utf-8"))  # and merges were applied


def test_training_merges_the_most_frequent_pair_first_and_breaks_ties_by_smallest_pair():
    # given text whose chunks are "xyxy", " cdcd", " cdcd"; counted by hand:
    #   (c,d) 2+2 = 4, (x,y) 2, (' ',c) 2, (d,c) 2, (y,x) 1  -> first merge (c,d) = 256
    #   then " cdcd" is (' ', 256, 256): (x,y) 2, (' ',256) 2, (256,256) 2, (y,x) 1
    #   -> a three-way tie at 2, won by the smallest pair (32, 256) = 257
    text = "xyxy cdcd cdcd"
    # when two merges are learned
    tokenizer = BPETokenizer().train(text, vocab_size=258)
    # then
    assert tokenizer.merges == {(ord("c"), ord("d")): 256, (ord(" "), 256): 257}
    assert tokenizer.vocab[256] == b"cd" and tokenizer.vocab[257] == b" cd"
    assert tokenizer.encode(" cdcd") == [257, 256]


@pytest.mark.parametrize("vocab_size", [300.0, float("nan"), True, "300"])
def test_vocab_size_that_is_not_an_integer_is_refused(vocab_size):
    with pytest.raises(ValueError, match="vocab_size"):
        BPETokenizer().train("some text to learn from", vocab_size=vocab_size)


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
    expected = reference.encode(VARIED_TEXT)
    with tiktoken_unavailable():
        loaded = BPETokenizer.load(gpt2_bpe.save(tmp_path / "gpt2.json"))
        assert loaded.encode(VARIED_TEXT) == expected


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


# -- files that are not what they claim -----------------------------------------------------------


@pytest.fixture(scope="module")
def small_bpe() -> BPETokenizer:
    return BPETokenizer().train("low lower lowest newer newest wider " * 5, vocab_size=270,
                                special_tokens=["<|endoftext|>"])


def damaged(document: dict, damage: str) -> str:
    """The JSON text of a saved tokenizer with one kind of damage."""
    document = json.loads(json.dumps(document))
    if damage == "missing key":
        del document["merges"]
    elif damage == "wrong type":
        document["vocab"] = list(document["vocab"])
    elif damage == "string id":
        first = next(iter(document["vocab"]))
        document["vocab"][first] = "0"
    elif damage == "merges disagree with vocab size":
        document["merges"] = document["merges"][:-1]
    elif damage == "id out of range":
        last = list(document["vocab"])[-1]
        document["vocab"][last] = 10**6
    elif damage == "id repeated":
        document["special_tokens"]["<|endoftext|>"] = 0
    elif damage == "merge of unknown tokens":
        document["merges"][-1] = "Ġnonsense Ġtokens"
    elif damage == "newer version":
        document["version"] = 2
    text = json.dumps(document, ensure_ascii=False)
    return text[: len(text) // 2] if damage == "truncated JSON" else text


@pytest.mark.parametrize("damage", ["missing key", "wrong type", "string id", "merges disagree with vocab size",
                                    "id out of range", "id repeated", "merge of unknown tokens", "newer version",
                                    "truncated JSON"])
def test_loading_a_damaged_tokenizer_file_raises_value_error_naming_it(small_bpe, tmp_path, damage):
    # given a saved tokenizer, damaged
    good = small_bpe.save(tmp_path / "good.json")
    assert BPETokenizer.load(good).encode("lowest newer") == small_bpe.encode("lowest newer")
    bad = tmp_path / "bad.json"
    bad.write_text(damaged(json.loads(good.read_text(encoding="utf-8")), damage), encoding="utf-8")
    # when / then loading it is refused with a message naming the file
    with pytest.raises(ValueError, match=re.escape(str(bad))):
        BPETokenizer.load(bad)


@pytest.fixture(scope="module")
def gpt2_files() -> tuple[Path, Path]:
    return fetch("gpt2-encoder"), fetch("gpt2-vocab")


@pytest.mark.parametrize(
    ("damage", "named"),
    [("encoder truncated", "encoder"), ("encoder id not an integer", "encoder"), ("encoder is a list", "encoder"),
     ("a merge dropped", "vocab"), ("a merge of three tokens", "vocab"), ("a merge of an unknown token", "vocab")],
)
def test_from_gpt2_with_damaged_files_raises_value_error_naming_the_file(gpt2_files, tmp_path, damage, named):
    # given copies of GPT-2's encoder.json and vocab.bpe, one of them damaged
    encoder_json, vocab_bpe = tmp_path / "encoder.json", tmp_path / "vocab.bpe"
    encoder_text = gpt2_files[0].read_text(encoding="utf-8")
    lines = gpt2_files[1].read_text(encoding="utf-8").splitlines()
    if damage == "encoder truncated":
        encoder_text = encoder_text[:1000]
    elif damage == "encoder id not an integer":
        encoder_text = encoder_text.replace('"!": 0', '"!": "0"', 1)
    elif damage == "encoder is a list":
        encoder_text = json.dumps(list(json.loads(encoder_text)))
    elif damage == "a merge dropped":
        lines = lines[:-1]
    elif damage == "a merge of three tokens":
        lines[5] += " e"
    elif damage == "a merge of an unknown token":
        lines[5] = "Ġ zzzzzzzzzz"
    encoder_json.write_text(encoder_text, encoding="utf-8")
    vocab_bpe.write_text("\n".join(lines) + "\n", encoding="utf-8")
    damaged_file = encoder_json if named == "encoder" else vocab_bpe
    # when / then
    with pytest.raises(ValueError, match=re.escape(str(damaged_file))):
        BPETokenizer.from_gpt2(encoder_json, vocab_bpe)


def test_a_failed_save_leaves_the_previous_file_intact_and_no_temporary_file(small_bpe, tmp_path, monkeypatch):
    # given a tokenizer saved once
    path = small_bpe.save(tmp_path / "bpe.json")
    before = path.read_bytes()
    # when a second save dies half-way through writing
    original = Path.write_text

    def write_half_then_fail(self, text, *args, **kwargs):
        original(self, text[: len(text) // 2], *args, **kwargs)
        raise OSError("disk full")

    monkeypatch.setattr(Path, "write_text", write_half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        BPETokenizer().train("other text entirely, other text", vocab_size=260).save(path)
    monkeypatch.undo()
    # then the first save is still there, whole, and nothing else
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["bpe.json"]
    assert BPETokenizer.load(path).merges == small_bpe.merges


def test_encode_user_text_treats_special_token_strings_as_ordinary_text():
    from helpers.tokenizers import encode_user_text, gpt2_tokenizer

    tokenizer = gpt2_tokenizer()
    text = "hi <|endoftext|> there"
    ids = encode_user_text(tokenizer, text)
    assert tokenizer.eot_token not in ids
    assert tokenizer.decode(ids) == text
    assert ids == tokenizer.encode(text, disallowed_special=())


def test_encode_user_text_refuses_non_strings():
    from helpers.tokenizers import encode_user_text, gpt2_tokenizer

    with pytest.raises(TypeError, match="text must be a str"):
        encode_user_text(gpt2_tokenizer(), float("nan"))


# -- split patterns in sequence, and bytes without a token (SmolLM2's tables) -------------------


@given(st.text())
def test_split_text_with_several_patterns_loses_nothing(text):
    from helpers.bpe import SMOLLM_SPLIT_PATTERNS, split_text

    compiled = [regex.compile(pattern) for pattern in SMOLLM_SPLIT_PATTERNS]
    assert "".join(split_text(text, compiled)) == text


def test_a_digit_split_first_keeps_every_digit_a_piece_of_its_own():
    from helpers.bpe import SMOLLM_SPLIT_PATTERNS, split_text

    compiled = [regex.compile(pattern) for pattern in SMOLLM_SPLIT_PATTERNS]
    assert split_text("a  12 ½x", compiled) == ["a", "  ", "1", "2", " ", "½", "x"]
    # given a tokenizer trained with digits apart; then no merge joins a digit to anything
    tokenizer = BPETokenizer(SMOLLM_SPLIT_PATTERNS).train("year 2024 and 2025, page 12 of 1200 " * 20, vocab_size=300)
    digits = {ord(d) for d in string.digits}
    assert not any(left in digits or right in digits for left, right in tokenizer.merges)
    assert tokenizer.decode(tokenizer.encode("in 2024  1")) == "in 2024  1"


def _tables_without_byte(missing: int) -> tuple[dict[str, int], dict[str, int]]:
    from helpers.bpe_files import printable

    ordinary = [byte for byte in range(256) if byte != missing]
    vocab = {printable(bytes([byte])): index + 1 for index, byte in enumerate(ordinary)}
    return vocab, {"<unk>": 0}


def test_from_tables_refuses_a_missing_byte_without_an_unknown_token():
    vocab, specials = _tables_without_byte(4)
    with pytest.raises(ValueError, match=r"lacks the single-byte tokens of bytes \[4\]"):
        BPETokenizer.from_tables(vocab, [], specials, source="tables.json")


def test_a_run_of_bytes_without_tokens_is_one_unknown_token_and_survives_save_and_load(tmp_path):
    from helpers.bpe import SMOLLM_SPLIT_PATTERNS

    vocab, specials = _tables_without_byte(4)
    tokenizer = BPETokenizer.from_tables(vocab, [], specials, pattern=SMOLLM_SPLIT_PATTERNS, unk_token="<unk>")
    ids = tokenizer.encode("\x04\x04a1")
    assert ids == [0, vocab["a"], vocab["1"]]
    loaded = BPETokenizer.load(tokenizer.save(tmp_path / "bpe.json"))
    assert loaded.pattern == SMOLLM_SPLIT_PATTERNS and loaded.unk_id == 0
    assert loaded.encode("\x04\x04a1") == ids
