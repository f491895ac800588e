"""Write the problem samples sage ships (model/data/), from the full files in ../shared/data.

    python scripts/sample_data.py [--src ../shared/data] [--out model/data] [--seed 0]
        [--gsm8k 300] [--aqua 200]

A seeded sample of each file's lines, copied byte for byte in their original order:
gsm8k_train.jsonl -> gsm8k_sample.jsonl, aqua_dev.jsonl -> aqua_sample.jsonl. The same
sources, seed and sizes give the same files (`git diff` after a rerun shows nothing).
Their sources and licenses are in model/data/LICENSES.md.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FILES = {"gsm8k": ("gsm8k_train.jsonl", "gsm8k_sample.jsonl"), "aqua": ("aqua_dev.jsonl", "aqua_sample.jsonl")}


def sample(src: Path, out: Path, n: int, seed: int) -> int:
    lines = [ln for ln in src.read_text(encoding="utf-8").splitlines() if ln.strip()]
    for i, ln in enumerate(lines, 1):
        obj = json.loads(ln)  # every line is one problem; fail loudly on anything else
        if not ("answer" in obj or {"options", "correct"} <= obj.keys()):
            raise SystemExit(f"{src}:{i}: not a GSM8K or AQuA problem")
    if n > len(lines):
        raise SystemExit(f"{src} has {len(lines)} problems, fewer than {n}")
    idx = sorted(random.Random(seed).sample(range(len(lines)), n))
    out.write_text("".join(lines[i] + "\n" for i in idx), encoding="utf-8")
    return len(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", type=Path, default=REPO.parent / "shared" / "data")
    ap.add_argument("--out", type=Path, default=REPO / "model" / "data")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--gsm8k", type=int, default=300)
    ap.add_argument("--aqua", type=int, default=200)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for kind, n in (("gsm8k", args.gsm8k), ("aqua", args.aqua)):
        src_name, out_name = FILES[kind]
        total = sample(args.src / src_name, args.out / out_name, n, args.seed)
        print(f"{out_name}: {n} of the {total} problems in {src_name} (seed {args.seed})")


if __name__ == "__main__":
    main()
