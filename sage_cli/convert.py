"""`sage convert --q4 SRC`: a Hugging Face checkpoint becomes NAME-Q4_K_M.gguf plus
NAME.sage.gguf, verified against the source. The work is convert.convert()."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from sage.cli.options import JsonOpt, user_errors


@user_errors
def convert(
    src: Annotated[
        str,
        typer.Argument(metavar="SRC", help="A Hugging Face checkpoint: a local directory or a hub repo id (ORG/NAME).",
                       show_default=False),
    ],
    q4: Annotated[bool, typer.Option("--q4", help="Quantize to 4 bits: Q4_K_M (the default).")] = False,
    qtype: Annotated[
        Optional[str],
        typer.Option("--qtype", metavar="Q4_K_M|Q4_0|Q8_0|F16", help="Output type. Default: Q4_K_M.", show_default=False),
    ] = None,
    out: Annotated[Path, typer.Option("--out", metavar="DIR", help="Output directory.")] = Path("."),
    force: Annotated[bool, typer.Option("--force", help="Overwrite existing outputs.")] = False,
    verify: Annotated[
        bool, typer.Option("--verify/--no-verify", help="Compare the result with the source model (torch).")
    ] = True,
    json_out: JsonOpt = False,
) -> None:
    """Convert a Hugging Face checkpoint (safetensors) into a GGUF for llama.cpp plus its
    SAGE heads sidecar.

    Writes DIR/NAME-QTYPE.gguf and DIR/NAME.sage.gguf (the checkpoint's own heads if it
    ships a *.sage.gguf, else analytic heads), then loads the result in llama.cpp and
    compares its next-token predictions with the torch reference on the source weights;
    below the threshold for the type it exits with code 2 (the outputs are kept).
    Supported: LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM.

    Example: sage convert --q4 HuggingFaceTB/SmolLM2-135M-Instruct --out models/
    """
    from sage.convert import VerificationError, convert as run_convert
    from sage.errors import SageError
    from sage.cli.ui.convert import ConvertView

    if qtype is None:
        qtype = "Q4_K_M"
    elif q4 and qtype.strip().upper() != "Q4_K_M":
        raise SageError(f"--q4 means Q4_K_M; it conflicts with --qtype {qtype}")
    from sage.convert import normalize_qtype

    qtype = normalize_qtype(qtype)
    view = None if json_out else ConvertView()
    try:
        if view:
            with view.progress() as (on_tensor, on_stage):
                started = []

                def stage(name: str) -> None:
                    if not started:  # the header once the input passed its checks: bad input gets one line
                        started.append(name)
                        view.header(src, qtype)
                    on_stage(name)

                result = run_convert(src, out, qtype, force=force, verify=verify, on_tensor=on_tensor, on_stage=stage)
        else:
            result = run_convert(src, out, qtype, force=force, verify=verify)
    except VerificationError as e:
        show(e.result, view)
        raise
    show(result, view)


def show(result, view) -> None:
    if view:
        view.summary(result)
    else:
        print(json.dumps(result.to_dict()))
