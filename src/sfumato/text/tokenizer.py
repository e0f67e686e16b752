"""CLIP's byte-level BPE tokenizer: prompt text -> the token ids every Stable Diffusion text encoder reads.

Pure Python, no torch. The BPE is OpenAI CLIP's ``clip/simple_tokenizer.py`` (Radford et al. 2021, "Learning
Transferable Visual Models From Natural Language Supervision"; byte-level BPE after GPT-2). The text clean-up is
that of transformers' ``CLIPTokenizer`` (5.x; ``CLIPTokenizerFast`` in 4.x, the tokenizers backend), which is
not OpenAI's: no ftfy and no ``html.unescape``, so ``&amp;`` stays five characters. Per prompt, in its order:

1. ``<|startoftext|>`` and ``<|endoftext|>`` written in the raw text are the special ids (case-sensitive);
2. each stretch between them is normalised: NFC, every whitespace run -> one space, lower case char by char;
3. tokens added with :meth:`CLIPTokenizer.add_token` are matched in the normalised text, leftmost-longest;
4. the rest is split by ``'s|'t|'re|'ve|'m|'ll|'d|[\\p{L}]+|[\\p{N}]|[^\\s\\p{L}\\p{N}]+`` (whitespace is dropped,
   each digit is a word of its own) and each word is BPE-merged over its UTF-8 bytes, ``</w>`` on the last symbol.

The stdlib ``re`` has no ``\\p{..}``, so the letter and number classes are built once from :mod:`unicodedata`; no
third-party regex module is needed. They equal the reference's for every code point this Python's Unicode
database assigns. Characters newer than that database, and canonical reordering of combining marks newer than
the reference's own (older) normalisation tables, can differ: the reference mixes Unicode versions itself.
"""

from __future__ import annotations

import functools
import gzip
import os
import re
import sys
import unicodedata
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from sfumato.errors import InvalidParameterError

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
_BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
# CLIP keeps the first 49152 - 256 - 2 merges, so that with the 512 byte symbols and the two specials the
# vocabulary is 49408 ids (the size of every SD text encoder's token embedding).
_NUM_MERGES = 49152 - 256 - 2
_END_OF_WORD = "</w>"

# Unicode White_Space: what the reference's regex engine (Oniguruma) means by \s. Python's own \s also takes
# U+001C..U+001F, which the reference keeps as punctuation.
_WHITESPACE = r"\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
_WHITESPACE_RUN = re.compile(f"[{_WHITESPACE}]+")
_SPECIAL = re.compile(re.escape(BOS_TOKEN) + "|" + re.escape(EOS_TOKEN))
_NO_MERGE = sys.maxsize
# Words are cached as in OpenAI's tokenizer; the bound keeps a long-running server from growing without limit.
_CACHE_SIZE = 1 << 16


@dataclass(frozen=True)
class Tokens:
    """One prompt, ready for a text encoder."""

    ids: tuple[int, ...]  # BOS + tokens + EOS + padding, length max_length
    eos_index: int  # position of the first EOS id: where CLIP and OpenCLIP read the pooled output


@functools.cache
def _bytes_to_unicode() -> dict[int, str]:
    """Byte -> printable character, as GPT-2 and CLIP define it: printable Latin-1 bytes stand for themselves,
    the other 68 are shifted to U+0100.. so that no BPE symbol is whitespace or a control character. The dict's
    order (printable bytes first) is the order of the first 256 vocabulary ids."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = [b for b in range(256) if b not in printable]
    return {
        **{b: chr(b) for b in printable},
        **{b: chr(256 + n) for n, b in enumerate(shifted)},
    }


def _char_class(majors: str, major: str) -> str:
    """The body of an ``re`` character class holding every code point whose general category starts with
    ``major``; ``majors[i]`` is the first letter of code point i's category."""
    return "".join(rf"\U{m.start():08x}-\U{m.end() - 1:08x}" for m in re.finditer(f"{major}+", majors))


@functools.cache
def _unicode_classes() -> tuple[str, str]:
    """``re`` class bodies for \\p{L} and \\p{N} from this Python's Unicode database (one pass over every code
    point, a few tenths of a second, once per process)."""
    majors = "".join(unicodedata.category(chr(i))[0] for i in range(sys.maxunicode + 1))
    return _char_class(majors, "L"), _char_class(majors, "N")


@functools.cache
def _word_pattern() -> re.Pattern[str]:
    """The reference's pre-tokenizer regex, special-token literals first as there."""
    letters, numbers = _unicode_classes()
    return re.compile(
        rf"{_SPECIAL.pattern}|'s|'t|'re|'ve|'m|'ll|'d|[{letters}]+|[{numbers}]|[^{_WHITESPACE}{letters}{numbers}]+"
    )


def _normalize(text: str) -> str:
    """NFC, whitespace runs -> one space, lower case: the reference's normaliser."""
    text = _WHITESPACE_RUN.sub(" ", unicodedata.normalize("NFC", text))
    # The reference lower-cases char by char, so a word-final capital sigma becomes σ, not the ς that
    # str.lower() chooses from context.
    return text.replace("\u03a3", "\u03c3").lower()


def _pretokenize(text: str) -> list[str]:
    """Normalised text -> the words BPE runs on (whitespace dropped)."""
    words = []
    for word in _word_pattern().findall(text):
        if _SPECIAL.fullmatch(word):
            # Only reached when normalising made the literal (say from "<|ENDOFTEXT|>"): the reference keeps it
            # one piece here, then its byte-level stage splits it again with GPT-2's regex.
            words += ["<|", word[2:-2], "|>"]
        else:
            words.append(word)
    return words


def _split(text: str, pattern: re.Pattern[str] | None) -> Iterator[tuple[str, bool]]:
    """Yield ``(stretch, False)`` for the text between matches of ``pattern`` and ``(match, True)`` for each
    match; empty stretches are skipped."""
    start = 0
    if pattern is not None:
        for m in pattern.finditer(text):
            if m.start() > start:
                yield text[start : m.start()], False
            yield m.group(), True
            start = m.end()
    if start < len(text):
        yield text[start:], False


def _read_merges(bpe_path: str | os.PathLike | None) -> list[tuple[str, str]]:
    """The merges in rank order from CLIP's gzipped list (the vendored copy unless a path is given)."""
    if bpe_path is None:
        data = (resources.files("sfumato") / "data" / "clip-bpe" / _BPE_FILE).read_bytes()
    else:
        data = Path(bpe_path).read_bytes()
    lines = gzip.decompress(data).decode("utf-8").split("\n")
    # Line 0 is the header "#version: 0.2".
    pairs = [line.split() for line in lines[1 : 1 + _NUM_MERGES]]
    if len(pairs) != _NUM_MERGES or any(len(p) != 2 for p in pairs):
        raise InvalidParameterError(f"{bpe_path or _BPE_FILE}: expected {_NUM_MERGES} merges of two symbols each")
    return [(first, second) for first, second in pairs]


class CLIPTokenizer:
    """CLIP BPE over the 49408-id vocabulary shared by CLIP ViT-L/14, OpenCLIP ViT-H/14 and ViT-bigG/14.

    ``tokenizer(text)`` gives the fixed-length ids a text encoder takes; the padding id is the only difference
    between the encoders (49407 = EOS for OpenAI's CLIP, 0 for OpenCLIP's)."""

    bos_id = 49406
    eos_id = 49407

    def __init__(self, bpe_path: str | os.PathLike | None = None) -> None:
        byte_chars = _bytes_to_unicode()
        self._byte_to_char = [byte_chars[b] for b in range(256)]
        self._char_to_byte = {c: b for b, c in byte_chars.items()}
        merges = _read_merges(bpe_path)
        vocab = [*byte_chars.values(), *(c + _END_OF_WORD for c in byte_chars.values())]
        vocab += ["".join(m) for m in merges] + [BOS_TOKEN, EOS_TOKEN]
        self._encoder = {token: i for i, token in enumerate(vocab)}
        self._decoder = vocab
        self._ranks = {m: i for i, m in enumerate(merges)}
        self._cache: dict[str, list[int]] = {}
        self._added: dict[str, int] = {}  # token as given -> id
        self._added_normalized: dict[str, list[int]] = {}  # normalised token -> its ids, matched in prompts
        self._added_pattern: re.Pattern[str] | None = None

    def __len__(self) -> int:
        return len(self._decoder) + len(self._added)

    def _bpe(self, word: str) -> list[int]:
        """One pre-tokenized word -> ids: merge the adjacent pair of lowest rank until none is in the table."""
        ids = self._cache.get(word)
        if ids is not None:
            return ids
        symbols = [self._byte_to_char[b] for b in word.encode("utf-8")]
        symbols[-1] += _END_OF_WORD
        while len(symbols) > 1:
            best = min(zip(symbols, symbols[1:]), key=lambda pair: self._ranks.get(pair, _NO_MERGE))
            if best not in self._ranks:
                break
            # Merging every occurrence left to right in one pass is the same as merging one at a time: a merge
            # made from the new symbol always ranks after the merge that created it.
            merged: list[str] = []
            i = 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    merged.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        ids = [self._encoder[s] for s in symbols]
        if len(self._cache) >= _CACHE_SIZE:
            self._cache.clear()
        self._cache[word] = ids
        return ids

    def encode(self, text: str) -> list[int]:
        """Text -> BPE ids, without BOS/EOS and without truncation."""
        ids: list[int] = []
        for piece, is_special in _split(text, _SPECIAL):
            if is_special:
                ids.append(self._encoder[piece])
                continue
            for chunk, is_added in _split(_normalize(piece), self._added_pattern):
                if is_added:
                    ids.extend(self._added_normalized[chunk])
                    continue
                for word in _pretokenize(chunk):
                    ids.extend(self._bpe(word))
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """Ids -> text: end-of-word marks become spaces, the ends are stripped, special tokens are kept as text,
        and bytes that are not valid UTF-8 become U+FFFD."""
        added = {i: token for token, i in self._added.items()}
        data = bytearray()
        for i in ids:
            if 0 <= i < self.bos_id:
                data += bytes(self._char_to_byte[c] for c in self._decoder[i])
            elif i in (self.bos_id, self.eos_id):
                data += self._decoder[i].encode("utf-8")
            elif i in added:
                data += added[i].encode("utf-8")
            else:
                raise InvalidParameterError(f"token id {i} is not in the vocabulary (0..{len(self) - 1})")
        return data.decode("utf-8", errors="replace").replace(_END_OF_WORD, " ").strip()

    def __call__(self, text: str, *, pad_id: int = 49407, max_length: int = 77) -> Tokens:
        """BOS, the first ``max_length - 2`` tokens, EOS, then ``pad_id`` up to ``max_length``."""
        if max_length < 2:
            raise InvalidParameterError(f"max_length must be at least 2 (BOS and EOS), got {max_length}")
        ids = [self.bos_id, *self.encode(text)[: max_length - 2], self.eos_id]
        # The encoders pool at the first EOS id, which is earlier than ours if the prompt spells <|endoftext|>.
        eos_index = ids.index(self.eos_id)
        ids += [pad_id] * (max_length - len(ids))
        return Tokens(ids=tuple(ids), eos_index=eos_index)

    def vocab_and_merges(self) -> tuple[dict[str, int], list[tuple[str, str]]]:
        """The base vocabulary and merge list in the layout of ``vocab.json`` / ``merges.txt``."""
        return dict(self._encoder), sorted(self._ranks, key=self._ranks.__getitem__)

    def decode_token(self, i: int) -> str:
        """The vocabulary entry of one id, as written (``"!"`` for 0, ``"<|endoftext|>"`` for 49407)."""
        if not 0 <= i < len(self._decoder):
            raise InvalidParameterError(f"token id {i} is not in the base vocabulary (0..{len(self._decoder) - 1})")
        return self._decoder[i]

    def token_id(self, token: str) -> int | None:
        """The id of a vocabulary entry (BPE symbols end words with ``</w>``: ``"cat</w>"``) or added token."""
        i = self._encoder.get(token)
        return i if i is not None else self._added.get(token)

    def add_token(self, token: str) -> int:
        """Give ``token`` the next free id (49408, 49409, ...) and match it whole in prompts from now on; adding
        it again returns the same id. Like the reference's added tokens it is matched in the normalised text,
        so case does not matter. Textual-inversion embeddings are looked up by these ids."""
        if token in self._added:
            return self._added[token]
        normalized = _normalize(token)
        if not normalized.strip():
            raise InvalidParameterError(f"cannot add the token {token!r}: it is empty after normalisation")
        if token in self._encoder or normalized in self._added_normalized:
            raise InvalidParameterError(f"cannot add the token {token!r}: it is already in the vocabulary")
        return self.add_tokens(token, 1)[0]

    def add_tokens(self, token: str, count: int) -> list[int]:
        """Give ``token`` ``count`` new ids, named ``token``, ``token_1`` ... as diffusers names a multi-vector
        textual inversion's tokens; ``token`` in a prompt stands for all of them, in order."""
        normalized = _normalize(token)
        if not normalized.strip():
            raise InvalidParameterError(f"cannot add the token {token!r}: it is empty after normalisation")
        names = [token] + [f"{token}_{i}" for i in range(1, count)]
        if (any(n in self._encoder or n in self._added for n in names) or normalized in self._added_normalized):
            raise InvalidParameterError(f"cannot add the token {token!r}: it is already in the vocabulary")
        ids = list(range(len(self), len(self) + count))
        self._added.update(zip(names, ids))
        self._added_normalized[normalized] = ids
        # Longest first, so that alternation (leftmost-first in `re`) matches leftmost-longest like the reference.
        alternatives = sorted(self._added_normalized, key=len, reverse=True)
        self._added_pattern = re.compile("|".join(re.escape(t) for t in alternatives))
        return ids

    def remove_tokens(self, token: str) -> None:
        """Forget ``token`` and its ``token_N`` siblings (the last ones added: ids must stay dense)."""
        ids = self._added_normalized.pop(_normalize(token), None)
        if ids is None:
            return
        if max(ids) != len(self) - 1:
            self._added_normalized[_normalize(token)] = ids
            raise InvalidParameterError(f"token {token!r} is not the last added: remove later ones first")
        self._added = {t: i for t, i in self._added.items() if i not in ids}
        alternatives = sorted(self._added_normalized, key=len, reverse=True)
        self._added_pattern = re.compile("|".join(re.escape(t) for t in alternatives)) if alternatives else None


@functools.cache
def get_tokenizer() -> CLIPTokenizer:
    """The shared tokenizer over the vendored vocabulary (loaded once per process)."""
    return CLIPTokenizer()
