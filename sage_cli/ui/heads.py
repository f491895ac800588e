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
    "inverse": "training the inverse analysis layer (and the ablation)",
    "meta": "fitting the meta-cognitive head",
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
        for r in metrics_view(m, safe_text(f"SAGE heads · {heads.base_name}", multiline=False)):
            self.out.print(r)
        m = collections.defaultdict(lambda: None, m)
        fork = (f"tracking {m['tracked_heads']} heads in layers {', '.join(map(str, m['tracked_layers'] or []))} "
                f"(best single head AUROC {_f(m['best_head_auroc'])}); threshold {_f(m['threshold'], '{:.2f}')}; "
                f"epoch {m['epoch']}" if heads.trained else
                "fork heads: the analytic ones (no token labels: --fork-problems 0)")
        self.out.print(f"{fork}; collecting {_f(m['collect_s'], '{:.0f}')} s, training + evaluation "
                       f"{_f(m['train_s'], '{:.0f}')} s")
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
            # metrics and the meta head's use: shown as the held-out table (metrics_view)
            "info": {k: v for k, v in heads.info.items() if k not in ("metrics", "meta")},
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
        self.out.print(t)
        if s["metrics"]:
            for r in metrics_view(s["metrics"], Text("measured when it was trained")):
                self.out.print(r)


def _n(x) -> str:
    return str(x) if isinstance(x, int) and not isinstance(x, bool) else "—"


def metrics_view(m: dict, title: Text) -> list:
    """The held-out evaluation of a sidecar's metrics: a table and what its numbers mean
    (the metrics are untrusted: numbers are formatted, nothing else is shown)."""
    m = collections.defaultdict(lambda: None, m)
    t = Table(title=title, title_style="title", show_edge=False)
    t.add_column("held out, as sage ask runs")
    t.add_column("trained heads", justify="right")
    t.add_column("analytic", justify="right")
    t.add_column("entropy alone", justify="right")
    t.add_row(f"fork AUROC, random tokens ({_n(m['test_random_tokens'])}, {_n(m['test_random_forks'])} forks)",
              _f(m["auroc_trained"]), _f(m["auroc_analytic"]), _f(m["auroc_entropy"]))
    t.add_row("recall of the forks among the candidates", _f(m["recall_trained"]), _f(m["recall_analytic"]),
              _f(m["recall_entropy"]))
    # the fitted meta head's numbers are shown even where training did not keep it, marked so:
    # then sage ask shows the samples' share (the analytic column)
    def meta(v) -> str:  # (a number that is not there is not marked)
        s = _f(v)
        return s + " (not used)" if m["meta_used"] is False and s != "—" else s

    t.add_row(f"answer ECE ({_n(m['test_answers'])} answers, {_n(m['test_correct'])} right)",
              meta(m["ece_trained"]), _f(m["ece_share"]), _f(m["ece_entropy"]))
    t.add_row("answer AUROC (right above wrong)", meta(m["auroc_conf_trained"]), _f(m["auroc_conf_share"]),
              _f(m["auroc_conf_entropy"]))
    out: list = [t]
    out.append(Text(
        "fork AUROC: the chance a true fork (its alternatives lead elsewhere: fork score ≥ 0.3, p < 0.1, on samples "
        "of their own) is scored above a token that is not; 0.5 is guessing, 1 perfect. recall: the share of true "
        "forks among the tokens sage samples when their step moves the answer. answer ECE: how far the stated "
        "confidence is from the share of answers that are right, on average; 0 is perfect. 'analytic' for answers "
        "is the share of samples that reach the answer.", style="dim"))
    # the chance ECE of the confidence sage ask shows: the meta head's where it is used, else the share's
    chance, whose = ((m["ece_chance_trained"], "the meta head's") if m["meta_used"] is True
                     else (m["ece_chance_share"], "the samples' share's"))
    if _f(chance) != "—":
        out.append(Text(
            f"on {_n(m['test_answers'])} answers, a perfectly calibrated confidence with {whose} spread would still "
            f"show an ECE of about {_f(chance, '{:.2f}')} by chance alone: an ECE near that is as good as this many "
            "answers can tell.", style="dim"))
    abl = m["ablation"] if isinstance(m["ablation"], dict) else {}
    if abl:
        line = Text("ablation (fork AUROC, random tokens): ", style="dim")
        for i, (name, v) in enumerate(abl.items()):
            line.append((" · " if i else "") + f"{untrusted(str(name), False)} {_f(v)}", style="dim")
        out.append(line)
    used = m["meta_used"]
    if used is not None:
        out.append(Text(
            ("the confidence sage ask shows is the meta-cognitive head's"
             + ({"share": " (the samples' share recalibrated, chosen out of fold on the training answers)",
                 "samples": " (on the samples' features alone, chosen out of fold on the training answers)"}
                .get(str(m["meta_features"]), "")) if used is True else
             "the confidence sage ask shows stays the samples' share (out of fold, the fitted meta head did not beat it in "
             "ECE and Brier score, or ranked right from wrong answers worse, on the training answers, or they were too few)")
            + f"; token probability alone: ECE {_f(m['ece_token_prob'])}. Trained on {_n(m['train_labels'])} "
            f"labelled tokens ({_n(m['train_forks'])} forks) of {_n(m['train_fork_problems'])} problems and "
            f"{_n(m['train_answers'])} answers ({_n(m['train_correct'])} right).", style="dim"))
    return out
