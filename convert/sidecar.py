"""The SAGE heads sidecar of a converted model (`NAME.sage.gguf`).

A checkpoint that ships heads (`*.sage.gguf` in its directory) keeps them: if their
fingerprint already names the converted model they are copied as they are; if not (made
for another GGUF of the same model, say) they are re-bound to it, but only when they were
made for this model (base name) and fit its shape. Otherwise analytic heads are made for
the converted model, on the tracker's default layers.
"""

from __future__ import annotations

from pathlib import Path

from sage.errors import SageError
from sage.heads import SUFFIX, SageHeads, fingerprint


def make_heads(src: Path, name: str, engine, path: Path) -> str:
    """Write the sidecar for the model loaded in `engine` to `path`; returns where the
    heads came from: "analytic", "checkpoint" or "checkpoint, re-bound"."""
    fp = fingerprint(engine)
    shipped = sorted(src.glob(f"*{SUFFIX}"))
    if len(shipped) > 1:
        raise SageError(f"{src}: several SAGE heads files ({', '.join(p.name for p in shipped)}); keep one")
    if not shipped:
        from sage.kernels.tracker import default_layers

        full = engine.full_attention_layers()
        layers = [full[i] for i in default_layers(len(full))]
        SageHeads.analytic(fp, name, layers, engine.n_head).save(path, force=True)
        return "analytic"
    heads = SageHeads.load(shipped[0])
    how = "checkpoint"
    if heads.fingerprint != fp:
        problem = misfit(heads, name, engine)
        if problem:
            raise SageError(f"{shipped[0]}: SAGE heads for {heads.base_name!r} do not fit {name}: {problem}")
        heads.info["rebound_from"] = heads.fingerprint
        heads.fingerprint = fp
        how = "checkpoint, re-bound"
    heads.save(path, force=True)
    return how


def misfit(heads: SageHeads, name: str, engine) -> str | None:
    """Why heads made for another file cannot serve this model, or None."""
    if heads.base_name.strip().lower() != name.lower():
        return "they were made for another model"
    full = engine.full_attention_layers()
    bad = [il for il in heads.tracked_layers if il not in full]
    if bad:
        return f"layers {bad} are not full-attention layers of this {engine.n_layer}-layer model"
    if heads.head_weights.shape != (len(heads.tracked_layers), engine.n_head):
        return f"head weights of shape {heads.head_weights.shape}, the model has {engine.n_head} heads per layer"
    return None
