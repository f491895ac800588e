"""Problem sets for the bench, the heads training and the scripts: fixed samples of
GSM8K / AQuA (from $SAGE_DATA, else a developer's ../shared/data, else the samples that
ship in the package, model/data/), generated arithmetic problems, and scoring an
extracted answer against the gold one."""

from __future__ import annotations

import json
import math
import os
import random
from dataclasses import dataclass
from pathlib import Path

from sage.errors import SageError
from sage.steps import normalize_number


@dataclass
class Problem:
    text: str  # what the model is asked (AQuA: question + options)
    gold: str  # normalized answer: a number or an option letter
    kind: str  # "number" | "option"



# the full files' names (in $SAGE_DATA or ../shared/data) and the shipped samples' names
FULL_FILES = {"gsm8k": "gsm8k_train.jsonl", "aqua": "aqua_dev.jsonl"}
SHIPPED_FILES = {"gsm8k": "gsm8k_sample.jsonl", "aqua": "aqua_sample.jsonl"}


def shipped_data_dir() -> Path:
    """The problem samples inside the package (their licenses in LICENSES.md there)."""
    return Path(__file__).resolve().parent / "data"


def default_data_dir() -> Path | None:
    """../shared/data beside the checkout (or $SAGE_DATA)."""
    env = os.environ.get("SAGE_DATA")
    if env:
        return Path(env)
    here = Path(__file__).resolve().parents[1]
    for cand in (here.parent / "shared" / "data", here / "shared" / "data"):
        if cand.is_dir():
            return cand
    return None


def _gsm8k(obj: dict) -> Problem:
    gold = normalize_number(obj["answer"].rsplit("####", 1)[-1])
    if gold is None:
        raise ValueError("no '#### N' answer")
    return Problem(obj["question"].strip(), gold, "number")


def _aqua(obj: dict) -> Problem:
    opts = " ".join(o.strip() for o in obj["options"])
    return Problem(f"{obj['question'].strip()}\nOptions: {opts}", obj["correct"].strip().upper(), "option")


def load_problems(path: Path) -> list[Problem]:
    """GSM8K (question, answer '#### N') or AQuA (question, options, correct) JSONL."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise SageError(f"cannot read problems file {path}: {e.strerror or e}") from None
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            if "options" in obj and "correct" in obj:
                out.append(_aqua(obj))
            elif "answer" in obj:
                out.append(_gsm8k(obj))
            else:
                raise ValueError("neither GSM8K (question, answer) nor AQuA (question, options, correct)")
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise SageError(f"{path}:{n}: not a GSM8K or AQuA problem ({e})") from None
    if not out:
        raise SageError(f"{path} holds no problems")
    return out


def arithmetic_problems(n: int, seed: int = 0) -> list[Problem]:
    """Simple one- or two-operation word problems with known answers, seeded."""
    rng = random.Random(seed)
    things = ["apples", "pens", "books", "stickers", "coins", "marbles", "cookies", "cards"]
    names = ["Tom", "Sara", "Ali", "Mia", "Ben", "Lena", "Omar", "Eva"]
    out = []
    for _ in range(n):
        who, what = rng.choice(names), rng.choice(things)
        a, b = rng.randint(2, 40), rng.randint(2, 20)
        op = rng.choice(["add", "sub", "mul"])
        if op == "add":
            text, gold = f"{who} has {a} {what} and gets {b} more. How many {what} does {who} have now?", a + b
        elif op == "sub":
            a = a + b
            text, gold = f"{who} has {a} {what} and gives away {b}. How many {what} are left?", a - b
        else:
            a = rng.randint(2, 12)
            text, gold = f"{who} buys {a} bags with {b} {what} in each bag. How many {what} is that?", a * b
        out.append(Problem(text, str(gold), "number"))
    return out


def data_file(kind: str) -> tuple[Path, str]:
    """(file, where) of the 'gsm8k' or 'aqua' problems: FULL_FILES[kind] in $SAGE_DATA
    when it is set (a missing file is an error then), else in ../shared/data when that
    holds it (the developers' checkout), else the sample shipped in the package."""
    name = FULL_FILES[kind]
    env = os.environ.get("SAGE_DATA")
    if env:
        path = Path(env).expanduser() / name
        if not path.is_file():
            raise SageError(f"$SAGE_DATA is {env}, which holds no {name}; unset it to use the shipped sample")
        return path, "$SAGE_DATA"
    data = default_data_dir()
    if data is not None and (data / name).is_file():
        return data / name, "shared/data"
    return shipped_data_dir() / SHIPPED_FILES[kind], "shipped sample"


def problem_set(spec: str | None, n: int, seed: int = 0) -> tuple[str, list[Problem]]:
    """(label, problems): a JSONL path, or 'gsm8k' / 'aqua' (a fixed seeded sample of the
    file data_file() finds; the label says which), or 'arithmetic' (generated)."""
    spec = spec or "gsm8k"
    if n < 1:
        raise SageError("a problem set needs at least 1 problem")
    if spec == "arithmetic":
        return f"arithmetic (seed {seed})", arithmetic_problems(n, seed)
    if spec in ("gsm8k", "aqua"):
        path, where = data_file(spec)
        probs = load_problems(path)
        idx = sorted(random.Random(seed).sample(range(len(probs)), min(n, len(probs))))
        return f"{spec} sample of {len(idx)} (seed {seed}, {where})", [probs[i] for i in idx]
    path = Path(spec)
    if not path.exists():
        raise SageError(f"no problems file {spec} (or use gsm8k, aqua, arithmetic)")
    probs = load_problems(path)
    return f"{path.name} ({min(n, len(probs))} of {len(probs)})", probs[:n]


def score(answer: str | None, p: Problem) -> bool:
    if answer is None:
        return False
    if p.kind == "option":
        return answer.upper() == p.gold
    try:
        return math.isclose(_as_float(answer), _as_float(p.gold), rel_tol=1e-6, abs_tol=1e-9)
    except (ValueError, ZeroDivisionError):
        return answer == p.gold


def _as_float(s: str) -> float:
    if "/" in s:
        a, b = s.split("/", 1)
        return float(a) / float(b)
    return float(s)
