"""Text from outside (argv, file names, the Python API) made safe to encode.

Python hands bytes that are not UTF-8 in argv or a file name over as lone surrogates
(surrogateescape: `x\\xff` arrives as 'x\\udcff'), which UTF-8 cannot encode: llama.cpp's
tokenizer, the trace file and the terminal would all raise UnicodeEncodeError. `encodable`
replaces each with U+FFFD, as a UTF-8 decoder replaces a bad byte.
"""

from __future__ import annotations

import re

_SURROGATE = re.compile("[\ud800-\udfff]")


def encodable(s: str) -> str:
    """`s` with lone surrogates replaced by U+FFFD (unchanged when it has none)."""
    return _SURROGATE.sub("\ufffd", s)
