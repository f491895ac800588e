"""Rich views of `sage heads`: training progress and results, and a sidecar's contents."""

from __future__ import annotations

import collections
import json
import math
from contextlib import contextmanager
from pathlib import Path

from rich.console import Console
from rich.table import Table
from rich.text import Text

from sage.cli.ui import console
from sage.cli.ui.safe import text as safe_text, untrusted

STAGES = {
    "collect": "collecting labels",
    "heads": "choosing tracking heads",
    "inverse": "training the inverse analysis layer",
    "evaluate": "evaluating on held-out problems",
}


def _f(x, fmt: str = "{:.3f}") -> str:
    # metrics come from the sidecar's JSON: anything but a finite number is shown as —
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
        return "—"
    return fmt.format(x)


class HeadsView:
    def __init__(self, out: Console = console) -> None:
        self.out = out

    @contextmanager
    def live(self, n: int):
        """Yields the on_event callback of sage.reference.train.train."""
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=self.out, transient=True, disable=not self.out.is_terminal) as prog:
            task = prog.add_task(STAGES["collect"], total=n)
            seen = {"labels": 0, "right": 0}

            def on_event(kind: str, info: dict) -> None:
                if kind == "problem":
                    seen["labels"] += info["labels"]
                    seen["right"] += int(info["correct"])
                    prog.update(task, advance=1, description=f"{STAGES['collect']} · {seen['labels']} labels · "
                                f"{seen['right']} right")
                elif kind == "collect":
                    self.out.print(Text(f"labels: {untrusted(info['path'])}", style="dim"))
                elif kind in STAGES:
                    prog.update(task, description=STAGES[kind])
                    if kind != "collect":
                        prog.update(task, completed=n)

            yield on_event

    def results(self, heads, m: dict, out: Path, labels: Path) -> None:
        t = Table(title=safe_text(f"SAGE heads · {heads.base_name} · held-out {m['test_problems']} problems", multiline=False),
                  title_style="title", show_edge=False)
        t.add_column("measure")
        t.add_column("analytic", justify="right")
        t.add_column("trained", justify="right")
        t.add_row("decision AUROC (all labelled tokens)", f"{_f(m['auroc_analytic'])} / {_f(m['auroc_analytic_rank'])}",
                  _f(m["auroc_trained"]))
        t.add_row("decision AUROC (random-sample tokens)",
                  f"{_f(m['auroc_analytic_sampled'])} / {_f(m['auroc_analytic_rank_sampled'])}",
                  _f(m["auroc_trained_sampled"]))
        t.add_row("confidence ECE", _f(m["ece_analytic"]), _f(m["ece_trained"]))
        self.out.print(t)
        self.out.print(
            f"[dim]analytic AUROC: significance / significance x (1 - p). Labels: {m['train_labels']} train "
            f"({m['train_positive']} change the answer), {m['test_labels']} held out ({m['test_positive']}); "
            f"ECE over {m['test_answers']} held-out answers ({m['test_correct']} right).[/dim]"
        )
        self.out.print(
            f"tracking {m['tracked_heads']} heads in layers {', '.join(map(str, m['tracked_layers']))} "
            f"(best single head AUROC {m['best_head_auroc']:.3f}); threshold {m['threshold']:.2f}; "
            f"epoch {m['epoch']}; collecting {m['collect_s']:.0f} s, training + evaluation {m['train_s']:.0f} s"
        )
        self.out.print(Text.assemble((f"wrote {untrusted(out)}", "answer"), (f"  (labels kept in {untrusted(labels)})", "dim")))

    @staticmethod
    def summary(heads, path: Path) -> dict:
        metrics = heads.info.get("metrics")
        return {
            "path": str(path),
            "base": heads.base_name,
            "fingerprint": heads.fingerprint,
            "trained": heads.trained,
            "tracked_layers": heads.tracked_layers,
            "tracked_heads": [[int(l), int(h)] for i, l in enumerate(heads.tracked_layers)
                              for h in range(heads.head_weights.shape[1]) if heads.head_weights[i, h] > 0],
            "threshold": heads.threshold,
            "inverse_depth": heads.inverse.depth,
            "inverse_width": int(heads.inverse.w_in.shape[1]),
            "info": {k: v for k, v in heads.info.items() if k != "metrics"},
            "metrics": json.loads(metrics) if metrics else None,
        }

    def show(self, heads, path: Path) -> None:
        s = self.summary(heads, path)
        # everything from the file is untrusted: Text, never markup
        t = Table(title=safe_text(f"{path.name} · {heads.describe()}", multiline=False), title_style="title",
                  show_header=False, show_edge=False)
        t.add_column(style="dim")
        t.add_column()
        t.add_row("base model", safe_text(f"{s['base']} (fingerprint {s['fingerprint'][:12]}…)"))
        heads_txt = ", ".join(f"L{l}.h{h}" for l, h in s["tracked_heads"])
        t.add_row("tracking heads", f"{len(s['tracked_heads'])}: {heads_txt}")
        t.add_row("inverse layer", f"depth {s['inverse_depth']}, width {s['inverse_width']}, threshold {s['threshold']:.2f}")
        for k, v in sorted(s["info"].items()):
            t.add_row(safe_text(k, multiline=False), safe_text(v))
        m = s["metrics"]
        if m:
            m = collections.defaultdict(lambda: None, m)
            t.add_row("decision AUROC", f"analytic {_f(m['auroc_analytic'])}, trained {_f(m['auroc_trained'])} "
                      f"(held-out, {m['test_labels']} labels); on the random-sample tokens alone analytic "
                      f"{_f(m['auroc_analytic_sampled'])}, trained {_f(m['auroc_trained_sampled'])} "
                      f"({m['test_sampled_labels']} labels)")
            t.add_row("confidence ECE", f"analytic {_f(m['ece_analytic'])}, trained {_f(m['ece_trained'])} "
                      f"({m['test_answers']} answers)")
        self.out.print(t)
