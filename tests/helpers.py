"""Helpers the test modules share (pytest puts tests/ on sys.path)."""

from __future__ import annotations


def one_line_error(result, *needles) -> str:
    """A command's refusal of bad input: exit code 2, one line `error: ...` on stderr
    containing every needle, no traceback. Returns the line."""
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert "Traceback" not in result.output
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]
