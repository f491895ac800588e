"""Segment a chain of thought into steps and extract its final answer.

Pure text functions: they see only the generated text (and the problem, for its answer
options), so they are tested on fixtures without a model. Spans are character offsets
into the text; the caller maps them onto tokens.
"""

from __future__ import annotations

import re
from typing import NamedTuple


class Span(NamedTuple):
    start: int
    end: int
    kind: str  # "numbered" | "sentence" | "block" | "think"


class Found(NamedTuple):
    text: str
    value: str | None
    kind: str  # "number" | "option" | "none"
    start: int
    end: int
    note: str | None = None  # a caveat the view shows: an option letter against its own text


_THINK = re.compile(r"<think>(.*?)(?:</think>|$)", re.S)
# "1.", "1)", "Step 1:", "- ", "* ", "• " at the start of a line
_ITEM = re.compile(r"^\s*(?:(?:step\s*)?\d{1,3}\s*[.):]|[-*•])\s+", re.I)
# a sentence ends at . ! ? followed by white space (3.5 has none); abbreviations are
# skipped in _sentences
_SENT_END = re.compile(r"(?<=[.!?])\s+(?=\S)")
_ABBREV = re.compile(r"(?:\b[A-Za-z]\.[A-Za-z]|\b(?:etc|vs|Mr|Mrs|Ms|Dr|St|approx|no))\.$")


def _trim(text: str, start: int, end: int) -> tuple[int, int]:
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return start, end


def _sentences(text: str, start: int, end: int, kind: str) -> list[Span]:
    out = []
    pos = start
    for m in _SENT_END.finditer(text, start, end):
        before = text[pos : m.start()]
        # "e.g. ", "Dr. " and a bare list number "3. " do not end a sentence
        if _ABBREV.search(before) or re.fullmatch(r"\s*\d+\.", before):
            continue
        s, e = _trim(text, pos, m.start())
        if e > s:
            out.append(Span(s, e, kind))
        pos = m.end()
    s, e = _trim(text, pos, end)
    if e > s:
        out.append(Span(s, e, kind))
    return out


def _segment_region(text: str, start: int, end: int, think: bool) -> list[Span]:
    spans: list[Span] = []
    # blocks separated by blank lines
    block_starts = [start]
    for m in re.finditer(r"\n[ \t]*\n", text[start:end]):
        block_starts.append(start + m.end())
    bounds = list(zip(block_starts, block_starts[1:] + [end]))
    for bs, be in bounds:
        bs, be = _trim(text, bs, be)
        if be <= bs:
            continue
        lines = []
        pos = bs
        for line in text[bs:be].split("\n"):
            lines.append((pos, pos + len(line)))
            pos += len(line) + 1
        numbered = [i for i, (ls, le) in enumerate(lines) if _ITEM.match(text[ls:le])]
        if numbered:
            # each item runs until the next item; text before the first is its own step
            cuts = [lines[i][0] for i in numbered] + [be]
            if cuts[0] > bs:
                spans.extend(_sentences(text, bs, cuts[0], "think" if think else "sentence"))
            for a, b in zip(cuts, cuts[1:]):
                s, e = _trim(text, a, b)
                if e > s:
                    spans.append(Span(s, e, "think" if think else "numbered"))
        else:
            # each line is a step of its own (split further into sentences)
            kind = "think" if think else "sentence"
            sents = [sp for ls, le in lines for sp in _sentences(text, ls, le, kind)]
            if len(sents) == 1 and not think:
                sents = [Span(sents[0].start, sents[0].end, "block")]
            spans.extend(sents)
    return spans


def segment_steps(text: str) -> list[Span]:
    """Split generated reasoning into steps.

    `<think>` sections are segmented on their own (kind "think"); elsewhere numbered or
    bulleted lines each make a step (with their continuation lines), other lines are
    split into sentences; a blank-line block that is one sentence is kind "block".
    """
    spans: list[Span] = []
    pos = 0
    for m in _THINK.finditer(text):
        spans.extend(_segment_region(text, pos, m.start(), think=False))
        spans.extend(_segment_region(text, m.start(1), m.end(1), think=True))
        pos = m.end()
    spans.extend(_segment_region(text, pos, len(text), think=False))
    return spans


# --- answers -----------------------------------------------------------------------

# a number: "-3.5", "$1,200", "$ 12", "3/4"; white space only after a "$" (never a newline)
_NUM = r"-?(?:\$ ?)?\d[\d,]*(?:\.\d+)?(?:/\d+)?"
_OPTION_LINE = re.compile(r"(?:^|\s|\()([A-E])\s*[).:]\s*\S", re.M)
# an option and its text: "A) 40 km/h", "(B) 45", "C: 50" up to the next option or line end
_OPTION_TEXT = re.compile(r"(?:^|(?<=\s)|(?<=\())\(?([A-E])\s*[).:]\s*(.*?)(?=\s*\(?[A-E]\s*[).:]\s*\S|\n|$)", re.M)
# a list number or step label: "2. ", "3) ", "Step 4:", at the start of a line; also one
# that ends the text ("...\n2."), where a cut-off chain began its next item
_LIST_NUMBER = re.compile(r"(?:^[ \t]*(?:step\s*)?\d{1,3}\s*[.):](?=[ \t]+\S|[ \t]*$)|\bstep\s+\d{1,3}\b)",
                          re.I | re.M)
_CUES = [
    re.compile(r"\\boxed\{([^{}]*)\}"),
    re.compile(r"####\s*(.+)"),
    re.compile(
        r"(?:final answer|the answer|answer)\s*(?:is|:|=|would be|will be)?\s*[:=]?\s*(.{1,40})", re.I
    ),
]
# what a question asks for when it has no options: a number if it has digits, number words
# or asks for a quantity; otherwise an open answer that sage cannot compare across samples
_NUMBER_WORDS = re.compile(
    r"\b(?:zero|one|two|three|four|five|six|seven|eight|nine|ten|eleven|twelve|thirteen|fourteen|"
    r"fifteen|sixteen|seventeen|eighteen|nineteen|twenty|thirty|forty|fifty|sixty|seventy|eighty|"
    r"ninety|hundred|thousand|million|billion|dozen|half|twice|double|triple|"
    r"how (?:many|much|long|far|old|fast|often|tall|big|heavy)|what (?:number|percent|percentage|fraction)|"
    r"calculate|compute|solve|evaluate|simplify|sum|product|total|average|mean|percent|plus|minus|"
    r"times|divided|multiplied|squared|cubed|square root|cost|price|profit|speed|area|volume|"
    r"perimeter|probability|ratio)\b",
    re.I,
)


def problem_options(problem: str) -> list[str]:
    """Option letters a multiple-choice problem offers ("A) 12 B) 15 ..."), else []."""
    letters = sorted(set(_OPTION_LINE.findall(problem)))
    return letters if len(letters) >= 2 and letters[0] == "A" else []


def option_texts(problem: str) -> dict[str, str]:
    """The text of each option of a multiple-choice problem: {"A": "40 km/h", ...}."""
    if not problem_options(problem):
        return {}
    out: dict[str, str] = {}
    for m in _OPTION_TEXT.finditer(problem):
        out.setdefault(m.group(1), m.group(2).strip())
    return out


def problem_kind(problem: str) -> str:
    """What the problem asks for: "option" (it lists options A-E), "number" (it has digits
    or number words, or asks for a quantity), else "open" ("Why is the sky blue?"), whose
    answers sage does not extract: there is no short value to compare across samples."""
    if problem_options(problem):
        return "option"
    if not problem.strip():  # no problem to go by (text-only callers): a number, as before
        return "number"
    if re.search(r"\d", problem) or _NUMBER_WORDS.search(problem):
        return "number"
    return "open"


def normalize_number(raw: str) -> str | None:
    """"$1,200.00" -> "1200", "-3.50" -> "-3.5", "3/4" stays "3/4"; None if no number."""
    m = re.search(_NUM, raw)
    if not m:
        return None
    s = re.sub(r"[\s$,]", "", m.group(0))
    if "/" in s:
        return s
    if "." in s:
        s = s.rstrip("0").rstrip(".")
    if s in ("-0", "", "-"):
        s = "0"
    return s


def _list_numbers(text: str) -> list[tuple[int, int]]:
    return [m.span() for m in _LIST_NUMBER.finditer(text)]


def _option_note(text: str, found: "Found", problem: str) -> str | None:
    """When the chain names an option letter followed by a value that is another option's
    ("D) 45 km/h" where D is 50 and 45 is C): a note saying so, else None."""
    options = option_texts(problem)
    mine = options.get(found.value or "")
    if not mine:
        return None
    value = normalize_number(mine)

    def other_option(said: str | None) -> str | None:
        if said is None or said == value:
            return None
        return next((k for k, v in options.items() if k != found.value and normalize_number(v) == said), None)

    m = re.match(r"\s*\)?\s*[:.)]?\s*(" + _NUM + ")", text[found.end : found.end + 40])
    if m:
        said = normalize_number(m.group(1))
        other = other_option(said)
        if other:
            return (f"the chain wrote option {found.value} with the value {said}, but option {found.value} is "
                    f"'{mine}' and {said} is option {other}: the letter and the value disagree")
    # the last value the chain worked out before the letter (an option it restates, "E) 55",
    # is not one it worked out)
    last = None
    before = text[: found.start]
    for x in re.finditer(_NUM, before):
        if not re.search(r"\b[A-E]\s*[).:]\s*$", before[max(0, x.start() - 4) : x.start()]):
            last = x
    said = normalize_number(last.group(0)) if last else None
    other = other_option(said)
    if other:
        return (f"the chain worked out {said}, which is option {other}, but answered {found.value} "
                f"('{mine}'): the letter and the value disagree")
    return None


def extract_answer(text: str, problem: str = "", complete: bool = True) -> Found:
    """Find the final answer in the text after any `<think>` section.

    Multiple-choice problems (options A-E in the problem) give an option letter, others a
    number; open questions (`problem_kind` "open") none. Answer cues ("the answer is",
    "####", \\boxed{}) win over a bare last value. A text that did not end on its own
    (`complete=False`: cut off by the token limit) has only the answers it stated with a
    cue: its last number may be the middle of a sentence ("6 times 7 gives us"). List
    numbers ("2. ", "Step 3:") are never an answer.
    """
    kind = problem_kind(problem)
    if kind == "open":
        return Found("", None, "none", len(text), len(text))
    think_end = text.rfind("</think>")
    base = think_end + len("</think>") if think_end >= 0 else 0
    body = text[base:]
    if think_end < 0 and "<think>" in text:
        base, body = 0, text  # unfinished think: best effort over everything
    options = problem_options(problem)
    markers = _list_numbers(body)

    def is_list_number(a: int, b: int) -> bool:
        return any(s <= a and b <= e for s, e in markers)

    def number(m: re.Match, offset: int) -> Found:
        raw = m.group(0)
        lead = len(raw) - len(raw.lstrip())
        return Found(raw.strip(), normalize_number(raw), "number", offset + m.start() + lead, offset + m.end())

    def find_in(segment: str, offset: int) -> Found | None:
        if options:
            m = None
            for m in re.finditer(r"(?<![A-Za-z])\(?([A-E])\)?(?![A-Za-z])", segment):
                pass
            if m and m.group(1) in options:
                return Found(m.group(0), m.group(1), "option", offset + m.start(), offset + m.end())
            return None
        m = re.search(_NUM, segment)
        return number(m, offset) if m else None

    def with_note(f: Found) -> Found:
        if f.kind != "option":
            return f
        note = _option_note(text, f, problem)
        return f._replace(note=note) if note else f

    # cue-based: the last cue in the text wins
    best: Found | None = None
    best_pos = -1
    for cue in _CUES:
        for m in cue.finditer(body):
            if m.start() < best_pos:
                continue
            if options:
                # only the first option-like token right after the cue
                seg = m.group(1)
                mm = re.match(r"\s*(?:option\s*)?\(?([A-E])\)?(?![A-Za-z])", seg, re.I)
                found = None
                if mm and mm.group(1).upper() in options:
                    s = base + m.start(1) + mm.start(1)
                    found = Found(mm.group(1), mm.group(1).upper(), "option", s, s + 1)
            else:
                found = find_in(m.group(1), base + m.start(1))
            if found:
                best, best_pos = found, m.start()
    if best:
        return with_note(best)
    if not complete:
        return Found("", None, "none", len(text), len(text))
    # fallback: the last number (or option letter) in the text, list numbers aside
    if options:
        f = find_in(body, base)
        if f:
            return with_note(f)
    else:
        last = None
        for m in re.finditer(_NUM, body):
            if not is_list_number(m.start(), m.end()):
                last = m
        if last:
            return number(last, base)
    return Found("", None, "none", len(text), len(text))
