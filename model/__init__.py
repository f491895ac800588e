"""sage: local reasoning that explains itself (SAGE-nano inverse reasoning over llama.cpp).

The Python API (see sage.api): `sage.ask(problem, model=None, **options) -> Trace`,
`sage.open_ask(...)` (streaming), `sage.explain(trace, exact=False)`, and
`sage.convert.convert(src, out_dir, qtype)`. They load lazily: `import sage` alone
imports neither llama.cpp nor torch.

Layout: the runtime `sage ask` runs (numpy + llama.cpp) is this package's modules
(engine, reason, steps, trace, heads, sampling, presets, paths, bench, problems) and
`sage.inverse` (the analysis by stage); the torch side is `sage.reference` (reference
architectures, exact eq. 7, heads training); `sage.kernels`, `sage.convert` and
`sage.cli` are the repository's kernels/, convert/ and sage_cli/ folders.
"""

__version__ = "0.1.0"

_API = {"ask", "open_ask", "explain", "Asking", "Explained"}


def __getattr__(name: str):
    if name in _API:
        from sage import api

        return getattr(api, name)
    raise AttributeError(f"module 'sage' has no attribute {name!r}")


__all__ = sorted(_API)
