"""`sage models`: the presets and which are on this machine."""

from __future__ import annotations

import json

from sage.cli.options import JsonOpt, user_errors
from sage.presets import DEFAULT_MODEL, PRESETS, preset_status


@user_errors
def models(json_out: JsonOpt = False) -> None:
    """List model presets and whether each is available locally (no network).

    Example: sage models
    """
    rows = []
    for p in PRESETS.values():
        path = preset_status(p)
        rows.append((p.name, p.description, p.source, path, p.name == DEFAULT_MODEL))
    if json_out:
        print(json.dumps([
            {"name": n, "description": d, "source": s, "path": path, "default": dflt}
            for n, d, s, path, dflt in rows
        ], indent=1))
        return
    from sage.cli.ui import console, models_table

    console.print(models_table(rows))
