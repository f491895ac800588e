"""Rich view of `sage convert`: a progress bar over tensors while it writes and
quantizes, then a summary (outputs, sizes, bits per weight, time, verification)."""

from __future__ import annotations

from contextlib import contextmanager

from rich.console import Console
from rich.table import Table
from rich.text import Text

from sage.cli.ui import console
from sage.cli.ui.safe import text as safe_text, untrusted

STAGES = {
    "download": "downloading from the hub",
    "write": "writing tensors",
    "quantize": "quantizing (llama.cpp)",
    "heads": "SAGE heads",
    "verify": "verifying against the source (torch)",
}


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB" if n < 2**30 else f"{n / 2**30:,.2f} GiB"


class ConvertView:
    def __init__(self, out: Console = console) -> None:
        self.out = out

    def header(self, src: str, qtype: str) -> None:
        self.out.print(Text.assemble(("Convert ", "title"), untrusted(src), (f" → {qtype} GGUF + SAGE heads", "dim")))

    @contextmanager
    def progress(self):
        """Yields (on_tensor, on_stage) callbacks for convert.convert."""
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        with Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            TextColumn("{task.fields[tensor]}", style="dim", markup=False),
            console=self.out, transient=True, disable=not self.out.is_terminal,
        ) as prog:
            tasks: dict[str, int] = {}

            def on_stage(stage: str) -> None:
                for t in tasks.values():  # a new stage ends the one before
                    prog.update(t, visible=False)
                tasks[stage] = prog.add_task(STAGES.get(stage, stage), total=None, tensor="")

            def on_tensor(stage: str, done: int, total: int, name: str) -> None:
                if stage not in tasks:
                    on_stage(stage)
                prog.update(tasks[stage], completed=done, total=total, tensor=untrusted(name, False))

            yield on_tensor, on_stage

    def summary(self, r) -> None:
        """r: convert.ConvertResult."""
        table = Table(show_header=False, show_edge=False, box=None, padding=(0, 2))
        table.add_column(style="dim", no_wrap=True)
        table.add_column()
        table.add_row("model", safe_text(f"{r.model_path}  ({_mib(r.model_bytes)}, {r.qtype})"))
        table.add_row("heads", safe_text(f"{r.heads_path}  ({_mib(r.heads_bytes)}, {r.heads})"))
        table.add_row("architecture", safe_text(f"{r.architecture} → {r.gguf_architecture}, "
                                                f"{r.n_params / 1e6:,.1f} M parameters, {r.n_tensors} tensors"))
        table.add_row("size", f"{_mib(r.source_bytes)} safetensors → {_mib(r.model_bytes)}, "
                              f"{r.bits_per_weight:.2f} bits per weight")
        times = f"{r.seconds:.1f} s in all; read + write {r.seconds_write:.1f} s ({r.write_mb_per_s:,.0f} MB/s)"
        if r.seconds_quantize is not None:
            times += f", quantize {r.seconds_quantize:.1f} s"
        table.add_row("time", times)
        v = r.verification
        if v is None:
            table.add_row("verification", Text("skipped (--no-verify)", style="warn"))
        else:
            verdict = Text("passed", style="same") if v.passed else Text("FAILED", style="changed")
            table.add_row("verification", Text.assemble(
                verdict,
                f"  top-1 agreement {v.top1:.3f} (needs ≥ {v.threshold:.3f}), mean KL(torch ‖ llama.cpp) "
                f"{v.kl_mean:.4f} nats (max {v.kl_max:.4f}) over {v.n_tokens} tokens",
            ))
        self.out.print(table)
