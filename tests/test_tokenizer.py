"""sfumato.text.tokenizer against transformers' CLIPTokenizer (the tokenizers backend) built from the shared
vocab.json/merges.txt: exact ids on several hundred prompts, both padding conventions, decode, added tokens,
and the Unicode classes checked over every assigned code point. Measured: 0 differing ids."""

from __future__ import annotations

import random
import re
import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest

from sfumato.text.tokenizer import (
    _WHITESPACE,
    CLIPTokenizer,
    Tokens,
    _normalize,
    _unicode_classes,
    get_tokenizer,
)

# CI clones the repository with shared/ beside it.
SHARED = Path(__file__).parents[2] / "shared" / "clip-bpe"


HAND_WRITTEN = [
    "",
    " ",
    "a photo of a cat",
    "A Photo Of A CAT",
    "  leading and trailing spaces   ",
    "tabs\tand\nnewlines\r\nand\x0bvertical\x0cfeeds",
    "no\u00a0break\u3000ideographic\u2003em\u2028line\u2029para\x85nel",
    "file\x1cgroup\x1dseparators\x1e\x1fare punctuation to the reference",
    "don't stop, it's what we're doing; they've, I'm, you'll, he'd",
    "DON'T IT'S WE'RE",
    "'s't're've'm'll'd'sup 'tis",
    "rock 'n' roll ''quoted'' 'single'",
    "tom &amp; jerry &lt;b&gt; &quot;html&quot; &#39;entities&#39; &nbsp;",
    "(masterpiece:1.2), [bad hands], ((best quality)), {sharp}, <lora:detail:0.8>",
    "(masterpiece:1.2), (best quality:1.4), ultra-detailed, 8k uhd, dslr, soft lighting, film grain",
    "[cat:dog:0.5] AND a forest BREAK sunset",
    "embedding:EasyNegative, bad-artist, (worst quality, low quality:1.4)",
    "!!!???...,,,;;;:::---___***+++===~~~```^^^%%%$$$###@@@",
    "a!b?c.d,e;f:g",
    "http://example.com/path?q=1&x=2#frag",
    "user@example.com",
    "C++ and C# and F#",
    "1234567890 3.14159 1,000,000 1e-5 -42 +7 50% 1/2 2024-01-01 12:30",
    "1girl, 2boys, 3d render, 4k, 16:9",
    "²³¹ ¼½¾ ⅓⅔ Ⅻ ⑳ ٣٤ ४५ ໑໒",
    "café naïve résumé jalapeño über coöperate façade",
    "cafe\u0301 nai\u0308ve e\u0301\u0301 A\u030a \u212b \u1e9b\u0323",
    "ΟΔΟΣ ΟΔΟΣΑ Σ σ ς Ἀθῆναι",
    "İstanbul IĞDIR ıi ǅǈǋ ß ẞ ﬁﬂ ŉ",
    "Москва Київ Беларусь ЁЖИК",
    "東京の夜景、猫と犬。中文提示词：一只可爱的猫",
    "한국어 프롬프트 고양이",
    "ひらがな カタカナ ｶﾀｶﾅ ＦＵＬＬＷＩＤＴＨ ０１２",
    "مرحبا بالعالم שלום עולם",
    "हिन्दी नमस्ते தமிழ் ไทย ລາວ ᠮᠣᠩᠭᠣᠯ",
    "🐱 🐶🐭 👩‍👩‍👧 👍🏽 🇯🇵🇺🇸 ❤️ ☺︎ 🏳️‍🌈",
    "emoji🔥in🔥words and ✨sparkles✨",
    "math ∑∫∂√∞ ≤≥≠ → ⇒ ∀x∃y",
    "box ─│┌┐ └┘ █▓▒░ ■□▲△",
    "zero\u200bwidth\u200cnon\u200djoiner\ufeffbom\u2060wj",
    "soft\u00adhyphen and \u180emongolian",
    "control\x00nul\x01\x07bell\x7fdel",
    "replacement \ufffd char and private \ue000\U000f0000",
    "<|startoftext|>a photo<|endoftext|>",
    "a <|endoftext|> in the middle",
    "<|ENDOFTEXT|> uppercase is not special",
    "<|endoftext|><|endoftext|><|startoftext|>",
    "<|endoftext|",
    "</w> end of word marker typed in",
    "a" * 100,
    "ab" * 60,
    "supercalifragilisticexpialidocious pneumonoultramicroscopicsilicovolcanoconiosis",
    "x " * 100,
    "word " * 80,
    ", ".join(["masterpiece", "best quality", "1girl", "solo", "long hair"] * 8),
    "a photograph of an astronaut riding a horse on mars, highly detailed, 8k, trending on artstation, " * 3,
    "MiXeD CaSe WoRdS AnD SHOUTING and whispering",
    "snake_case camelCase PascalCase kebab-case SCREAMING_CASE",
    "unclosed (bracket [and {brace",
    "nested (((very (deep:1.1)) emphasis)) [[[de-emphasis]]]",
    "\\(escaped parens\\) and \\[brackets\\]",
    "quote \"double\" and 'single' and `back` and «guillemets» and „low“",
    "ellipsis… em—dash en–dash ‘smart’ “quotes”",
    "ｆｕｌｌ－ｗｉｄｔｈ　ｐｕｎｃｔ！？",
    "\u0301 combining mark first",
    "trailing combining a\u0301\u0302\u0303\u0304",
    "\U0001d400\U0001d401 mathematical bold \U0001d7ce\U0001d7cf",
    "\U00020000\U0002a6d6 cjk ext b",
    "\n\n\n",
    "\t",
    "a\tb\nc\rd",
    "end with apostrophe'",
    "'",
    "''",
    "'''s",
    "it''s",
    "x's's's",
]


def _generated_prompts(n: int) -> list[str]:
    """Seeded mixes of prompt fragments, punctuation runs, whitespace and characters from every Unicode 3.2
    category. Unicode 3.2 (``unicodedata.ucd_3_2_0``) keeps the pool the same on every Python and avoids
    combining marks newer than the reference's normalisation tables."""
    rng = random.Random(1234)
    pool = [chr(i) for i in range(0x30000) if unicodedata.ucd_3_2_0.category(chr(i)) not in ("Cn", "Cs")]
    fragments = [
        "a", "photo", "of", "the", "cat", "Cat", "CAT", "masterpiece", "best quality", "(", ")", "[", "]",
        ":1.2", ":0.8", ",", ", ", ".", "...", "!!", "'s", "'t", "'re", "don't", "&amp;", "&lt;", "1", "42",
        "3.5", "é", "e\u0301", "ß", "Σ", "İ", "猫", "東京", "한", "🐱", "👩‍👩‍👧", "❤️", "<|endoftext|>",
        "<|ENDOFTEXT|>", "</w>", "_", "-", "\u00a0",
    ]
    whitespace = [" ", " ", " ", "  ", "\t", "\n", " \n ", "\u3000"]
    prompts = []
    for _ in range(n):
        parts = []
        for _ in range(rng.randint(0, 14)):
            r = rng.random()
            if r < 0.55:
                parts.append(rng.choice(fragments))
            elif r < 0.75:
                parts.append("".join(rng.choice(pool) for _ in range(rng.randint(1, 4))))
            elif r < 0.9:
                parts.append("".join(chr(rng.randint(0x21, 0x7E)) for _ in range(rng.randint(1, 8))))
            else:
                parts.append(rng.choice(whitespace))
            if rng.random() < 0.6:
                parts.append(rng.choice(whitespace))
        prompts.append("".join(parts))
    # Some over the 75-token limit, to exercise truncation.
    prompts += [", ".join(rng.choice(fragments) for _ in range(rng.randint(40, 120))) for _ in range(20)]
    return prompts


PROMPTS = HAND_WRITTEN + _generated_prompts(400)


@pytest.fixture(scope="module")
def ours() -> CLIPTokenizer:
    return CLIPTokenizer()


@pytest.fixture(scope="module")
def reference_cls():  # noqa: ANN201 - transformers type
    """transformers 5 has one CLIPTokenizer on the tokenizers backend (CLIPTokenizerFast is an alias of it); in
    4.x CLIPTokenizer is the slow Python one and CLIPTokenizerFast the backend we match."""
    transformers = pytest.importorskip("transformers")
    if not (SHARED / "vocab.json").is_file():
        pytest.skip(f"reference vocabulary (vocab.json, merges.txt) not found at {SHARED}")
    return getattr(transformers, "CLIPTokenizerFast", transformers.CLIPTokenizer)


@pytest.fixture(scope="module")
def reference(reference_cls):  # noqa: ANN001, ANN201 - transformers types
    return reference_cls.from_pretrained(SHARED)


@pytest.fixture(scope="module")
def reference_pad0(reference):  # noqa: ANN001, ANN201 - transformers types
    """OpenCLIP's convention, pad with id 0, set on the reference's backend. Not ``pad_token="!"`` as diffusers'
    SDXL tokenizer_2 does it: that also makes every "!" typed in a prompt a special token of its own (id 0),
    which OpenCLIP's own tokenizer does not do; see test_pad_token_bang_quirk."""
    from tokenizers import Tokenizer

    backend = Tokenizer.from_str(reference.backend_tokenizer.to_str())
    backend.enable_truncation(max_length=77)
    backend.enable_padding(pad_id=0, pad_token="!", length=77)
    return backend


def _first_mismatches(pairs: list[tuple[str, object, object]], limit: int = 3) -> str:
    bad = [(text, got, want) for text, got, want in pairs if got != want]
    shown = "\n".join(f"  {text!r}:\n    ours {got}\n    ref  {want}" for text, got, want in bad[:limit])
    return f"{len(bad)} of {len(pairs)} prompts differ:\n{shown}"


def test_golden_ids() -> None:
    tok = get_tokenizer()
    assert get_tokenizer() is tok
    out = tok("a photo of a cat")
    assert out.ids[:7] == (49406, 320, 1125, 539, 320, 2368, 49407)
    assert out.ids[7:] == (49407,) * 70 and len(out.ids) == 77
    assert out.eos_index == 6
    assert tok("a photo of a cat", pad_id=0) == Tokens(ids=out.ids[:7] + (0,) * 70, eos_index=6)
    assert tok.token_id("cat</w>") == 2368 and tok.token_id("<|endoftext|>") == 49407
    assert tok.token_id("not a token") is None


def test_vocabulary_matches_reference_files(ours: CLIPTokenizer, reference) -> None:  # noqa: ANN001
    """The vocabulary built from the vendored merges list is vocab.json entry for entry."""
    import json

    vocab = json.loads((SHARED / "vocab.json").read_text(encoding="utf-8"))
    assert len(vocab) == len(ours) == 49408
    wrong = [(token, i, ours.token_id(token)) for token, i in vocab.items() if ours.token_id(token) != i]
    assert not wrong, f"{len(wrong)} vocabulary entries differ, first {wrong[:3]}"


def test_prompts_are_varied() -> None:
    assert len(PROMPTS) >= 200
    assert any(not p.isascii() for p in PROMPTS) and "" in PROMPTS


@pytest.mark.parametrize("pad", ["eos", "zero"])
def test_ids_match_reference(ours: CLIPTokenizer, reference, reference_pad0, pad: str) -> None:  # noqa: ANN001
    """77 ids with truncation and padding as the reference gives them (pad with EOS for CLIP-L, 0 for OpenCLIP);
    eos_index is where the reference's ids hold their first EOS. Measured: 0 prompts differ."""
    if pad == "eos":
        pad_id = 49407
        want = reference(PROMPTS, padding="max_length", max_length=77, truncation=True).input_ids
    else:
        pad_id = 0
        want = [e.ids for e in reference_pad0.encode_batch(PROMPTS)]
    got = [ours(p, pad_id=pad_id) for p in PROMPTS]
    assert all(len(t.ids) == 77 for t in got)
    short = reference(PROMPTS[-1], padding="max_length", max_length=10, truncation=True).input_ids
    assert list(ours(PROMPTS[-1], max_length=10).ids) == short
    assert [list(t.ids) for t in got] == want, _first_mismatches(
        [(p, list(t.ids), w) for p, t, w in zip(PROMPTS, got, want, strict=True)]
    )
    assert [t.eos_index for t in got] == [w.index(49407) for w in want]


def test_pad_token_bang_quirk(ours: CLIPTokenizer, reference_cls) -> None:  # noqa: ANN001
    """transformers' CLIPTokenizer(pad_token="!") (diffusers' SDXL tokenizer_2) agrees with us on every prompt
    without "!", and splits "!" runs into special tokens where we (like OpenCLIP) run BPE over them."""
    bang = reference_cls.from_pretrained(SHARED, pad_token="!")
    texts = [p for p in PROMPTS if "!" not in p]
    want = bang(texts, padding="max_length", max_length=77, truncation=True).input_ids
    got = [list(ours(t, pad_id=0).ids) for t in texts]
    assert got == want, _first_mismatches(list(zip(texts, got, want, strict=True)))
    assert ours.encode("wow!!!") == [2781, 995] and bang("wow!!!").input_ids[1:-1] == [2781, 0, 0, 0]


def test_encode_matches_reference_without_truncation(ours: CLIPTokenizer, reference) -> None:  # noqa: ANN001
    want = reference(PROMPTS, add_special_tokens=False).input_ids
    got = [ours.encode(p) for p in PROMPTS]
    assert got == want, _first_mismatches(list(zip(PROMPTS, got, want, strict=True)))
    assert max(map(len, got)) > 75, "some prompts must be long enough to be truncated"


def test_truncation_keeps_bos_first_tokens_eos(ours: CLIPTokenizer) -> None:
    text = "word " * 80 + "tail"
    body = ours.encode(text)
    out = ours(text)
    assert len(body) == 81
    assert out.ids == (49406, *body[:75], 49407) and out.eos_index == 76
    assert ours(text, max_length=10) == Tokens(ids=(49406, *body[:8], 49407), eos_index=9)
    assert ours("", max_length=2) == Tokens(ids=(49406, 49407), eos_index=1)
    with pytest.raises(ValueError, match="max_length"):
        ours("a", max_length=1)


def test_eos_index_is_first_eos(ours: CLIPTokenizer) -> None:
    """A prompt that spells <|endoftext|> moves the pooled position, as in the reference encoders."""
    out = ours("a <|endoftext|> cat")
    assert out.ids[:5] == (49406, 320, 49407, 2368, 49407) and out.eos_index == 2


def test_unicode_classes_match_reference_regex_engine(reference) -> None:  # noqa: ANN001
    """\\p{L}, \\p{N} and \\s of the reference's regex engine (Oniguruma, via tokenizers.Regex) against ours, and
    the reference's normaliser (NFC, whitespace, lower case) char by char, over every code point assigned in both
    this Python's and the engine's Unicode versions. Measured: identical."""
    tokenizers = pytest.importorskip("tokenizers")
    Regex, normalizers = tokenizers.Regex, tokenizers.normalizers

    def onig_keep(pattern: str, text: str) -> str:
        return normalizers.Replace(Regex(pattern), "").normalize_str(text)

    every = "".join(map(chr, [*range(1, 0xD800), *range(0xE000, sys.maxunicode + 1)]))
    assigned = [c for c in onig_keep(r"\p{Cn}+", every) if unicodedata.category(c) != "Cn"]
    text = "".join(assigned)
    letters, numbers = _unicode_classes()
    for name, onig_other, ours_class in [
        ("letters", r"\P{L}+", letters),
        ("numbers", r"\P{N}+", numbers),
        ("whitespace", r"\S+", _WHITESPACE),
    ]:
        want = onig_keep(onig_other, text)
        got = "".join(re.findall(f"[{ours_class}]+", text))
        only_ref = sorted(f"U+{ord(c):04X}" for c in set(want) - set(got))
        only_ours = sorted(f"U+{ord(c):04X}" for c in set(got) - set(want))
        assert got == want, f"{name}: only the reference has {only_ref[:8]}, only ours {only_ours[:8]}"
    # NUL (left out of `assigned`) separates the chars: each is normalised on its own, no composition or
    # reordering across it.
    separated = "\x00".join(assigned)
    want = reference.backend_tokenizer.normalizer.normalize_str(separated).split("\x00")
    got = _normalize(separated).split("\x00")
    bad = [(f"U+{ord(c):04X}", g, w) for c, g, w in zip(assigned, got, want, strict=True) if g != w]
    assert not bad, f"{len(bad)} characters normalise differently, first {bad[:5]}"


def test_decode(ours: CLIPTokenizer, reference) -> None:  # noqa: ANN001
    for text in ["a photo of a cat", "an astronaut riding a horse on mars highly detailed", "x y z 1 2 3"]:
        assert ours.decode(ours.encode(text)) == text
    assert ours.decode(ours("a photo of a cat").ids[:7]) == "<|startoftext|>a photo of a cat <|endoftext|>"
    ids_lists = [ours.encode(p) for p in PROMPTS]
    # A multi-byte character cut in half decodes to U+FFFD in both.
    ids_lists.append(ours.encode("猫🐱")[:-1])
    got = [ours.decode(ids) for ids in ids_lists]
    want = [reference.decode(ids) for ids in ids_lists]
    assert got == want, _first_mismatches([(str(i), g, w) for i, g, w in zip(ids_lists, got, want, strict=True)])
    with pytest.raises(ValueError, match="not in the vocabulary"):
        ours.decode([49408])


def test_added_tokens_match_reference(reference_cls) -> None:  # noqa: ANN001
    """Textual-inversion style tokens get ids after 49407 and are matched case-insensitively inside words, as
    transformers' add_tokens does."""
    ours = CLIPTokenizer()
    ref = reference_cls.from_pretrained(SHARED)
    added = ["<cat-toy>", "<Cat-Toy2>", "my token", "<cat-toy>x"]
    ref.add_tokens(added)
    assert [ours.add_token(t) for t in added] == [49408, 49409, 49410, 49411]
    assert [ref.convert_tokens_to_ids(t) for t in added] == [49408, 49409, 49410, 49411]
    assert ours.add_token("<cat-toy>") == 49408 and len(ours) == 49412
    assert ours.token_id("<Cat-Toy2>") == 49409
    texts = ["a <cat-toy> photo", "A<CAT-TOY>B", "<cat-toy2>", "my   token", "My\ttoken!", "<cat-toy>x <cat-toy>y",
             "<cat-toy><cat-toy>", "a photo of <cat-toy>, (masterpiece:1.2)", *PROMPTS[:50]]
    got = [list(ours(t).ids) for t in texts]
    want = ref(texts, padding="max_length", max_length=77, truncation=True).input_ids
    assert got == want, _first_mismatches(list(zip(texts, got, want, strict=True)))
    ids = ours.encode("a <cat-toy> photo")
    assert ours.decode(ids) == ref.decode(ids) == "a <cat-toy>photo"
    for bad in ["", "   ", "cat</w>", "<CAT-TOY>"]:
        with pytest.raises(ValueError, match="cannot add"):
            ours.add_token(bad)


def test_slow_reference_agrees_on_plain_ascii(ours: CLIPTokenizer, reference_cls) -> None:  # noqa: ANN001
    """transformers 4's slow CLIPTokenizer cleans text differently (ftfy, or BERT's BasicTokenizer without it,
    which splits CJK per character and drops control characters), so only plain ASCII prompts are compared."""
    import transformers

    if transformers.CLIPTokenizer is reference_cls:
        pytest.skip("transformers >= 5 has no separate slow CLIPTokenizer")
    slow = transformers.CLIPTokenizer.from_pretrained(SHARED)
    texts = [p for p in PROMPTS if p.isascii() and p.isprintable()]
    got = [list(ours(t).ids) for t in texts]
    want = slow(texts, padding="max_length", max_length=77, truncation=True).input_ids
    assert got == want, _first_mismatches(list(zip(texts, got, want, strict=True)))


def test_tokenizer_does_not_import_torch() -> None:
    code = "import sys, sfumato.text.tokenizer as t; t.get_tokenizer()('a cat'); assert 'torch' not in sys.modules"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
