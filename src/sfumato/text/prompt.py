"""The AUTOMATIC1111 prompt language: emphasis weights, prompt editing and alternation, AND, and
75-token chunks.

Pure Python, no torch. Behaviour follows stable-diffusion-webui's ``modules/prompt_parser.py`` and the
chunking of ``modules/sd_hijack_clip.py`` (``tokenize_line``), quirks included, so a prompt copied from an
A1111 infotext conditions the model the same way:

* ``(word)`` x1.1, ``[word]`` /1.1, ``(word:1.3)``; ``\\(`` ``\\)`` ``\\[`` ``\\]`` ``\\\\`` are literal; an
  unmatched closer is literal text and an unclosed opener still weights everything after it; ``BREAK``
  starts a new chunk.
* ``[from:to:when]``, ``[to:when]``, ``[from::when]`` (``when`` with a ``.`` is a fraction of the steps,
  otherwise a step number) and ``[a|b|c]`` (one per step), nested. A1111 parses these with a lark Earley
  grammar in which any bracket or colon may also be literal text outside constructs; where a prompt is not
  in the language (a ``|`` outside ``[a|b]``, a trailing backslash) it is used as written. When a prompt
  needs literal brackets outside constructs, lark breaks the tie between a bracket that could open a
  construct and the same bracket as text by set iteration order, so A1111's schedule then depends on the
  process's hash seed. :func:`get_prompt_schedule` is a recursive-descent parser of the same language that
  always takes the outermost bracket that forms a valid construct: one of A1111's outcomes, and its only one
  whenever no literal bracket is needed (the prompts people write).
* ``a AND b:0.5``: composable diffusion sub-prompts (Liu et al. 2022, "Compositional Visual Generation
  with Composable Diffusion Models").

Where A1111 raises instead these functions still return: in a weight such as ``(a:1.2.3)`` the colon is
literal text, a step such as ``1e999`` is clamped, and brackets nested over 100 deep (A1111 overflows the
stack somewhat deeper) leave the prompt as written.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Protocol

__all__ = [
    "PromptChunk",
    "get_prompt_schedule",
    "parse_prompt_attention",
    "split_and",
    "tokenize_chunks",
]

EMPHASIS_UP = 1.1  # the factor of one pair of round brackets
BREAK = ("BREAK", -1.0)  # the marker item of parse_prompt_attention; weight -1 is how A1111 tags it

# --- emphasis --------------------------------------------------------------------------------------

# One token of the emphasis syntax per match; the alternatives start with different characters except
# ":" (a weighted close is tried before a bare colon) and "\" (an escape before a lone backslash).
_ATTENTION_TOKEN = re.compile(
    r"""
    (?P<escape>\\[()\[\]\\])            # \( \) \[ \] \\ : the character itself
    | (?P<lone>\\)                      # any other backslash is dropped
    | (?P<open>[(\[])
    | :\s*(?P<weight>[+-]?[.\d]+)\s*\)  # (text:1.3)
    | (?P<close>[)\]])
    | (?P<text>[^\\()\[\]:]+)
    | (?P<colon>:)
    """,
    re.VERBOSE,
)
_BREAK_SPLIT = re.compile(r"\s*\bBREAK\b\s*", re.DOTALL)


def parse_prompt_attention(text: str) -> list[tuple[str, float]]:
    """Split a prompt into ``(text, weight)`` runs, A1111's ``parse_prompt_attention``.

    ``"a (b:1.5) [c]"`` -> ``[("a ", 1.0), ("b", 1.5), (" ", 1.0), ("c", 1/1.1)]``. ``BREAK`` (a whole word,
    upper case) becomes the item ``("BREAK", -1.0)``. Adjacent runs of exactly equal weight are merged; an
    empty prompt gives ``[("", 1.0)]``.
    """
    res: list[list] = []  # [text, weight], mutable while brackets close over them
    round_open: list[int] = []  # index into res where each unclosed "(" started
    square_open: list[int] = []

    def scale_from(start: int, factor: float) -> None:
        for item in res[start:]:
            item[1] *= factor

    def add_literal(piece: str) -> None:
        for i, part in enumerate(_BREAK_SPLIT.split(piece)):
            if i > 0:
                res.append(list(BREAK))
            res.append([part, 1.0])

    pos = 0
    while pos < len(text):
        m = _ATTENTION_TOKEN.match(text, pos)
        assert m is not None  # the alternatives cover every character
        pos = m.end()
        kind = m.lastgroup
        token = m.group(0)
        if kind == "escape":
            res.append([token[1], 1.0])
        elif kind == "lone":
            res.append(["", 1.0])
        elif kind == "open":
            (round_open if token == "(" else square_open).append(len(res))
        elif kind == "weight" and round_open:
            try:
                factor = float(m.group("weight"))
            except ValueError:
                # "1.2.3": A1111 raises here; read the colon as text and go on after it instead.
                add_literal(":")
                pos = m.start() + 1
                continue
            scale_from(round_open.pop(), factor)
        elif token == ")" and round_open:
            scale_from(round_open.pop(), EMPHASIS_UP)
        elif token == "]" and square_open:
            scale_from(square_open.pop(), 1 / EMPHASIS_UP)
        else:
            add_literal(token)

    # Unclosed brackets still apply, from where they opened to the end: round ones first.
    for start in round_open:
        scale_from(start, EMPHASIS_UP)
    for start in square_open:
        scale_from(start, 1 / EMPHASIS_UP)

    if not res:
        res = [["", 1.0]]
    merged = [res[0]]
    for item in res[1:]:
        if item[1] == merged[-1][1]:
            merged[-1][0] += item[0]
        else:
            merged.append(item)
    return [(t, w) for t, w in merged]


# --- prompt editing and alternation ------------------------------------------------------------------

# lark's common.SIGNED_NUMBER, matched the way its dynamic lexer does: one greedy match, ASCII digits.
_NUMBER = re.compile(r"[+-]?(?:[0-9]+[eE][+-]?[0-9]+|(?:[0-9]+\.(?:[0-9]+)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?|[0-9]+)")
_SPACE = re.compile(r"\s*")
_SPECIAL = "[]():|"


@dataclass(eq=False)
class _Scheduled:
    """``[before:after:when]``; ``before`` is None for ``[after:when]``."""

    before: list | None
    after: list
    when: str  # the number as written


@dataclass(eq=False)
class _Alternate:
    options: list  # one node list per option; an empty option is an empty list


class _NoParse(Exception):
    """No construct here (inside one: the whole prompt is not in the language)."""


class _TooDeep(Exception):
    """Brackets nested deeper than _MAX_DEPTH: the prompt is used as written (A1111 overflows the stack)."""


_MAX_DEPTH = 100


def _lex(prompt: str) -> list[str]:
    """Prompt -> tokens: each of ``[]():|`` alone, the text between them in one token (with backslash
    escapes kept, as the grammar's ``plain`` terminal keeps them)."""
    tokens: list[str] = []
    text: list[str] = []
    i = 0
    while i < len(prompt):
        c = prompt[i]
        if c == "\\":
            # The escape is "\\." without DOTALL: a trailing backslash or one before a newline has no parse.
            if i + 1 >= len(prompt) or prompt[i + 1] == "\n":
                raise _NoParse
            text.append(prompt[i : i + 2])
            i += 2
            continue
        if c in _SPECIAL:
            if text:
                tokens.append("".join(text))
                text = []
            tokens.append(c)
        else:
            text.append(c)
        i += 1
    if text:
        tokens.append("".join(text))
    return tokens


def _is_special(token: str) -> bool:
    return len(token) == 1 and token in _SPECIAL


def _number(nodes: list) -> str | None:
    """The NUMBER of ``[... : when]`` if ``nodes`` is exactly optional space, a number, optional space."""
    if len(nodes) != 1 or not isinstance(nodes[0], str):
        return None
    text = nodes[0]
    start = _SPACE.match(text).end()
    m = _NUMBER.match(text, start)
    if m is None or _SPACE.match(text, m.end()).end() != len(text):
        return None
    return m.group(0)


class _Parser:
    """Recursive descent over the tokens; inside a construct every bracket must close properly."""

    def __init__(self, tokens: list[str]) -> None:
        self.tokens = tokens
        self.depth = 0

    def peek(self, i: int) -> str | None:
        return self.tokens[i] if i < len(self.tokens) else None

    def prompt(self, i: int) -> tuple[list, int]:
        """Text and constructs up to the next ``:``, ``|``, closer or the end."""
        nodes: list = []
        while (t := self.peek(i)) is not None:
            if t == "[" or t == "(":
                self.depth += 1
                if self.depth > _MAX_DEPTH:
                    raise _TooDeep
                node, i = self.square(i) if t == "[" else self.round(i)
                self.depth -= 1
            elif _is_special(t):
                break
            else:
                node, i = t, i + 1
            nodes.append(node)
        return nodes, i

    def round(self, i: int) -> tuple[list, int]:
        """``(a)`` or ``(a:b)``: kept as written, constructs inside still apply."""
        first, i = self.prompt(i + 1)
        if self.peek(i) == ")":
            return ["(", *first, ")"], i + 1
        if self.peek(i) == ":":
            second, i = self.prompt(i + 1)
            if self.peek(i) == ")":
                return ["(", *first, ":", *second, ")"], i + 1
        raise _NoParse

    def square(self, i: int) -> tuple[object, int]:
        """``[a]`` (kept as written), ``[a|b|...]``, ``[to:when]`` or ``[from:to:when]``."""
        first, i = self.prompt(i + 1)
        t = self.peek(i)
        if t == "]":
            return ["[", *first, "]"], i + 1
        if t == "|":
            options = [first]
            while self.peek(i) == "|":
                option, i = self.prompt(i + 1)
                options.append(option)
            if self.peek(i) == "]":
                return _Alternate(options), i + 1
            raise _NoParse
        if t == ":":
            second, i = self.prompt(i + 1)
            if self.peek(i) == "]" and (when := _number(second)) is not None:
                return _Scheduled(None, first, when), i + 1
            if self.peek(i) == ":":
                third, i = self.prompt(i + 1)
                if self.peek(i) == "]" and (when := _number(third)) is not None:
                    return _Scheduled(first, second, when), i + 1
        raise _NoParse

    def top(self) -> list:
        """The whole prompt: outside constructs, brackets and colons that form none are literal text."""
        nodes: list = []
        i = 0
        while (t := self.peek(i)) is not None:
            if t == "[" or t == "(":
                self.depth = 0
                try:
                    node, i = self.square(i) if t == "[" else self.round(i)
                except _NoParse:
                    node, i = t, i + 1
            elif t == "|":
                raise _NoParse  # alternation bars exist only inside [a|b]
            else:
                node, i = t, i + 1
            nodes.append(node)
        return nodes


def _walk(nodes: list):
    for node in nodes:
        if isinstance(node, _Scheduled):
            yield node
            yield from _walk(node.before or [])
            yield from _walk(node.after)
        elif isinstance(node, _Alternate):
            yield node
            for option in node.options:
                yield from _walk(option)
        elif isinstance(node, list):
            yield from _walk(node)


def _render(nodes: list, step: int, when: dict[int, int]) -> str:
    out: list[str] = []
    for node in nodes:
        if isinstance(node, str):
            out.append(node)
        elif isinstance(node, _Scheduled):
            out.append(_render((node.before or []) if step <= when[id(node)] else node.after, step, when))
        elif isinstance(node, _Alternate):
            out.append(_render(node.options[(step - 1) % len(node.options)], step, when))
        else:
            out.append(_render(node, step, when))
    return "".join(out)


def _end_step(number: str, steps: int, int_offset: int, float_offset: float, old: bool) -> int:
    """The last step of a ``[from:to:when]`` part, clamped to ``steps``."""
    v = float(number)
    if old:
        v = v * steps if v < 1 else v
    elif "." in number:
        v = (v - float_offset) * steps
    else:
        v = v - int_offset
    if math.isinf(v):  # A1111 raises OverflowError on int(inf)
        return steps if v > 0 else 0
    return min(steps, int(v))


def get_prompt_schedule(
    prompt: str, steps: int, *, hires_steps: int | None = None, old_scheduling: bool = False
) -> list[tuple[int, str]]:
    """``[(end_at_step, text), ...]`` for one prompt, A1111's ``get_learned_conditioning_prompt_schedules``.

    Steps count from 1; ``text`` is used for every step ``s`` with ``previous end < s <= end_at_step``, and
    the last ``end_at_step`` is ``steps``. ``when`` written with a ``.`` is a fraction of ``steps``
    (``[a:b:0.5]``), otherwise a step number (``[a:b:10]``). With ``hires_steps`` the schedule is the hires
    pass's: integers count on from ``steps`` and fractions from 1.0. ``old_scheduling`` is A1111's "Old
    prompt editing timelines" (< 1 a fraction, else a step number, hires pass ignored).

    >>> get_prompt_schedule("a [b:c:0.5] d", 10)
    [(5, 'a b d'), (10, 'a c d')]
    """
    if hires_steps is None or old_scheduling:
        int_offset, float_offset = 0, 0.0
    else:
        int_offset, float_offset, steps = steps, 1.0, hires_steps
    try:
        tree = _Parser(_lex(prompt)).top()
    except (_NoParse, _TooDeep):
        return [(steps, prompt)]

    ends = {steps}
    when: dict[int, int] = {}
    for node in _walk(tree):
        if isinstance(node, _Scheduled):
            end = _end_step(node.when, steps, int_offset, float_offset, old_scheduling)
            when[id(node)] = end
            if end >= 1:
                ends.add(end)
        else:
            ends.update(range(1, steps + 1))
    return [(end, _render(tree, end, when)) for end in sorted(ends)]


# --- AND -------------------------------------------------------------------------------------------

_AND = re.compile(r"\bAND\b")
_AND_WEIGHT = re.compile(r"^(.*?)(?:\s*:\s*([-+]?(?:\d+\.?|\d*\.\d+)))?\s*$", re.DOTALL)


def split_and(prompt: str) -> list[tuple[str, float]]:
    """``"a AND b :0.5"`` -> ``[("a", 1.0), (" b", 0.5)]``, A1111's ``get_multicond_prompt_list`` for one
    prompt: split at the word ``AND``, an optional trailing ``:weight`` per part, trailing space dropped."""
    parts = []
    for sub in _AND.split(prompt):
        m = _AND_WEIGHT.match(sub)
        assert m is not None  # every group is optional
        parts.append((m.group(1), float(m.group(2)) if m.group(2) is not None else 1.0))
    return parts


# --- 75-token chunks -------------------------------------------------------------------------------


class _Tokenizer(Protocol):
    bos_id: int
    eos_id: int

    def encode(self, text: str) -> list[int]: ...

    def token_id(self, token: str) -> int | None: ...


@dataclass(frozen=True)
class PromptChunk:
    """One text-encoder input: BOS, up to ``chunk_length`` prompt tokens, EOS, padding."""

    ids: tuple[int, ...]  # (chunk_length + 2,)
    weights: tuple[float, ...]  # per id; 1.0 at BOS, EOS and padding
    eos_index: int  # the first EOS: where the pooled output is read


def _close_chunk(
    ids: list[int], weights: list[float], tokenizer: _Tokenizer, pad_id: int, chunk_length: int
) -> PromptChunk:
    """A1111's ``next_chunk`` and ``process_tokens``: fill with EOS, wrap in BOS/EOS, then, if ``pad_id`` is
    not EOS (OpenCLIP's 0), every id after the first EOS becomes ``pad_id``, even prompt tokens after an
    ``<|endoftext|>`` written in the prompt."""
    fill = chunk_length - len(ids)
    ids = [tokenizer.bos_id, *ids, *[tokenizer.eos_id] * fill, tokenizer.eos_id]
    weights = [1.0, *weights, *[1.0] * fill, 1.0]
    eos = ids.index(tokenizer.eos_id)
    if pad_id != tokenizer.eos_id:
        ids[eos + 1 :] = [pad_id] * (len(ids) - eos - 1)
    return PromptChunk(ids=tuple(ids), weights=tuple(weights), eos_index=eos)


def tokenize_chunks(
    tokenizer: _Tokenizer,
    text: str,
    *,
    pad_id: int,
    chunk_length: int = 75,
    comma_backtrack: int = 20,
) -> list[PromptChunk]:
    """A prompt -> its 77-id chunks with per-token weights, A1111's ``tokenize_line``.

    Each weighted run is tokenized on its own; tokens fill chunks of ``chunk_length``; ``BREAK`` closes the
    current chunk (even an empty one). When a chunk is full and the next token comes, and the chunk's last
    comma is at most ``comma_backtrack`` tokens from its end, the tokens after that comma move to the next
    chunk (0 turns this off). An empty prompt gives one chunk of BOS, EOS and padding.
    """
    comma = tokenizer.token_id(",</w>")
    chunks: list[PromptChunk] = []
    ids: list[int] = []
    weights: list[float] = []
    last_comma = -1  # index in ids of the chunk's last comma

    def close() -> None:
        nonlocal ids, weights, last_comma
        chunks.append(_close_chunk(ids, weights, tokenizer, pad_id, chunk_length))
        ids, weights, last_comma = [], [], -1

    for piece, weight in parse_prompt_attention(text):
        if (piece, weight) == BREAK:
            close()
            continue
        for token in tokenizer.encode(piece):
            if token == comma:
                last_comma = len(ids)
            elif (
                comma_backtrack
                and len(ids) == chunk_length
                and last_comma != -1
                and len(ids) - last_comma <= comma_backtrack
            ):
                moved = ids[last_comma + 1 :], weights[last_comma + 1 :]
                ids, weights = ids[: last_comma + 1], weights[: last_comma + 1]
                close()
                ids, weights = list(moved[0]), list(moved[1])
            if len(ids) == chunk_length:
                close()
            ids.append(token)
            weights.append(weight)
    if ids or not chunks:
        close()
    return chunks

