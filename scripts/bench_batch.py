"""Why batched decoding tops out where it does: what llama.cpp's kernels reach, in multiply-adds.

    .venv/bin/python scripts/bench_batch.py [--types Q4_1,Q4_0,Q8_0] [--threads 2] [--reps 2]

The branch sampler decodes B sequences that share a prefix's KV cells, one token each per
llama_decode. For every weight type (the model file as shipped, plus copies llama.cpp
requantizes from it into a temporary folder: a measurement of the kernels, not a model to
use) this prints:

  - B = 1, 2, 4, 8, 16: aggregate decode tokens/s (sage.bench.multi_sequence_throughput,
    the configuration `sage bench` reports), its multiple of B = 1, and the multiply-adds
    per second it reaches (weights, output head and attention over the cells each pass sees);
  - prompt: 256 tokens in one llama_decode with the last token's logits only, where every
    weight is reused 256 times: what the matrix kernels reach when compute, not memory, is
    the bound. Its GMAC/s over B = 1's is the most batching can give on this CPU.

Multiply-adds per token come from the GGUF's tensor shapes: every 2-D weight of the blocks,
the output head (the token embedding where tied), and 2 * n_head * head_dim per KV cell per
layer for attention (a unified cache's attention pass sees every used cell, masked or not).
"""

from __future__ import annotations

import argparse
import ctypes
import tempfile
import time
from pathlib import Path

PREFIX = 150
STEPS = 32
PROMPT = 256


def weight_macs(path: Path) -> tuple[int, int, dict]:
    """(block weight elements, output head elements, shape facts) from the GGUF."""
    import gguf

    r = gguf.GGUFReader(str(path))
    blocks = head = embd = 0
    for t in r.tensors:
        n = int(t.n_elements)
        if t.name.startswith("blk.") and len(t.shape) == 2:
            blocks += n
        elif t.name == "output.weight":
            head = n
        elif t.name == "token_embd.weight":
            embd = n
    arch = bytes(r.fields["general.architecture"].parts[-1]).decode()
    f = lambda k: int(r.fields[f"{arch}.{k}"].parts[-1][0])  # noqa: E731
    facts = {"n_layer": f("block_count"), "n_head": f("attention.head_count"), "n_embd": f("embedding_length")}
    facts["head_dim"] = facts["n_embd"] // facts["n_head"]
    facts["type"] = gguf.GGMLQuantizationType(int(next(t.tensor_type for t in r.tensors if t.name.endswith("attn_q.weight")))).name
    return blocks, head or embd, facts


def attn_macs(facts: dict, cells: float) -> float:
    return 2 * facts["n_layer"] * facts["n_head"] * facts["head_dim"] * cells


def requantize(src: Path, dst: Path, qtype: str, threads: int) -> None:
    import gguf
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(getattr(gguf.LlamaFileType, f"MOSTLY_{qtype}"))
    params.nthread = threads
    params.allow_requantize = True
    if llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)) != 0:
        raise SystemExit(f"llama.cpp could not requantize to {qtype}")


def prompt_speed(path: Path, threads: int, reps: int) -> float:
    from sage.engine import Engine

    text = "Question: A farmer has 17 sheep and buys 5 more, then sells 8. How many are left? " * 24
    best = 0.0
    with Engine(path, n_ctx=PROMPT + 8, n_threads=threads, n_batch=PROMPT) as eng:
        toks = eng.tokenize(text)[:PROMPT]
        for _ in range(reps + 1):  # the first is a warm-up
            eng.reset()
            t0 = time.perf_counter()
            eng.decode(toks, 0)
            best = max(best, len(toks) / (time.perf_counter() - t0))
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--types", default="Q4_1,Q4_0,Q8_0", help="as shipped first, then requantized copies")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=2)
    args = ap.parse_args()

    from sage.bench import cpu_name, multi_sequence_throughput
    from sage.presets import resolve_model

    src = resolve_model(args.model).path
    seqs = (1, 2, 4, 8, 16)
    print(f"{args.model}, {args.threads} threads, best of {args.reps}; CPU: {cpu_name()}")
    with tempfile.TemporaryDirectory() as tmp:
        for qtype in args.types.split(","):
            path = src
            shipped = weight_macs(src)[2]["type"]
            if qtype != shipped:
                path = Path(tmp) / f"{qtype}.gguf"
                requantize(src, path, qtype, args.threads)
            blocks, head, facts = weight_macs(path)
            rates = multi_sequence_throughput(path, n_threads=args.threads, sequences=seqs,
                                              prefix_tokens=PREFIX, steps=STEPS, reps=args.reps)
            pp = prompt_speed(path, args.threads, args.reps)
            pp_mac = pp * (blocks + attn_macs(facts, PROMPT / 2)) + pp / PROMPT * head
            label = qtype + (" (as shipped)" if path == src else " (requantized)")
            print(f"\n{label}: {blocks / 1e6:.0f} M block weights + {head / 1e6:.0f} M output head, "
                  f"{path.stat().st_size / 2**20:.0f} MiB")
            print(f"{'':10} {'tok/s':>8} {'× B=1':>7} {'cells seen':>11} {'GMAC/s':>8}")
            one = rates["1"]
            for b in seqs:
                cells = PREFIX + b * STEPS / 2  # mean over the measured steps
                mac = rates[str(b)] * (blocks + head + attn_macs(facts, cells))
                print(f"{'B = ' + str(b):10} {rates[str(b)]:8.1f} {rates[str(b)] / one:7.2f} {cells:11.0f} {mac / 1e9:8.1f}")
            one_mac = one * (blocks + head + attn_macs(facts, PREFIX))
            print(f"{'prompt':10} {pp:8.1f} {'':>7} {PROMPT / 2:11.0f} {pp_mac / 1e9:8.1f}"
                  f"   (the kernels' ceiling: ×{pp_mac / one_mac:.2f} the GMAC/s of B = 1)")


if __name__ == "__main__":
    main()
