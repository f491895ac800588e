"""The one rule for untrusted text in a view: the user's input, the model's output, a
trace file, a sidecar's metadata, a file name.

Such text is shown as a rich `Text`, never parsed as markup (`[/]`, `[link=...]` stay
literal), and its control characters are made visible instead of reaching the terminal:
C0 controls and DEL as their Unicode control pictures (ESC -> ␛, CR -> ␍), C1 controls,
bidirectional overrides, line/paragraph separators and lone surrogates (bytes that were
not UTF-8 in argv) as `\\xNN` / `\\uNNNN` escapes. Newlines and tabs are kept where the
text is multi-line, made visible (␊, ␉) where it is one line. Everything a view prints
from such a source goes through `untrusted` (or `text`, its Text form).
"""

from __future__ import annotations

import re

from rich.text import Text

_BIDI = "\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069"
_CONTROL = re.compile(f"[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029{_BIDI}\ud800-\udfff\ufffe\uffff]")
_CONTROL_LINE = re.compile(f"[\x00-\x1f\x7f-\x9f\u2028\u2029{_BIDI}\ud800-\udfff\ufffe\uffff]")


def _visible(m: re.Match) -> str:
    c = m.group(0)
    o = ord(c)
    if o < 0x20:
        return chr(0x2400 + o)  # ␀ … ␟ (␛ for ESC)
    if o == 0x7F:
        return "\u2421"  # ␡
    if 0xDC80 <= o <= 0xDCFF:  # a byte that was not UTF-8 (surrogateescape)
        return f"\\x{o - 0xDC00:02x}"
    if o <= 0xFF:
        return f"\\x{o:02x}"
    return f"\\u{o:04x}"


def untrusted(s: object, multiline: bool = True) -> str:
    """`s` as text that is safe to print: control characters made visible (newlines and
    tabs kept when `multiline`)."""
    s = s if isinstance(s, str) else str(s)
    return (_CONTROL if multiline else _CONTROL_LINE).sub(_visible, s)


def text(s: object, style: str = "", multiline: bool = True) -> Text:
    """`untrusted(s)` as a rich Text (never markup)."""
    return Text(untrusted(s, multiline), style=style)


def token_label(s: str) -> str:
    """A token as the user can see it, in the one quoting style of every view: in single
    quotes, leading spaces kept, newlines and tabs as \\n and \\t."""
    return "'" + untrusted(s.replace("\n", "\\n").replace("\t", "\\t"), multiline=False) + "'"
