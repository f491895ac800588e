"""Measurements of `sage convert` (convert.convert):

    .venv/bin/python scripts/bench_convert.py [--layers 5] [--skip-memory] [--skip-agreement] [--workdir DIR]

1. Memory: a synthetic llama checkpoint (hidden 4096, GQA 32/8 heads, FFN 11008, untied
   49152-token embeddings, bf16 in two safetensors shards; 5 layers = 2.6 GB) is written
   to a temp dir, then converted to F16 with verify off in a child process. Printed: peak
   RSS of the child (getrusage), its RSS after imports, its peak when the GGUF is written
   (VmHWM before the heads step, which loads the result in llama.cpp, whose mmap counts in
   RSS), against the checkpoint and its largest tensor; conversion throughput in MB/s.
2. Agreement: the embedded SmolLM2-135M-Instruct Q4_1 GGUF is exported to an HF directory
   (sage.convert.roundtrip: dequantized to float32, q/k un-permuted) and converted to F16,
   Q8_0, Q4_K_M and Q4_0 with verification on. Printed per type: top-1 agreement and mean
   KL(torch || llama.cpp) over the probes (sage.convert.verify.PROBE_TEXTS), size, bits per
   weight, time; and, for the quantized types, the same numbers for llama.cpp's default
   pipeline (convert_hf_to_gguf --outtype f16, then llama-quantize), i.e. quantizing the
   F16 GGUF, which is the tensors llama.cpp's converter writes (both round f32 to f16).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CHILD = r"""
import json, resource, sys, time
def hwm():  # peak RSS so far, bytes
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
from sage.convert import convert
import sage.engine  # what convert imports at its start, so the baseline includes it
marks = {"after_imports_rss": rss()}
def on_stage(stage):
    marks[f"peak_before_{stage}"] = hwm()
r = convert(sys.argv[1], sys.argv[2], "F16", verify=False, on_stage=on_stage)
marks.update(result=r.to_dict(), peak_rss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
print(json.dumps(marks))
"""


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def synthetic_checkpoint(path: Path, layers: int) -> tuple[int, int]:
    """Write the checkpoint; returns (bytes of the safetensors, bytes of the largest tensor)."""
    import torch
    from safetensors.torch import save_file

    from sage.convert.roundtrip import read_vocab, write_tokenizer
    from sage.reference.arch import get_arch
    from sage.presets import resolve_model

    import gguf

    config = dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=4096, intermediate_size=11008,
                  num_hidden_layers=layers, num_attention_heads=32, num_key_value_heads=8, vocab_size=49152,
                  tie_word_embeddings=False, rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=8192)
    arch = get_arch("llama")
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in arch.Model(arch.ModelArgs.from_dict(config)).state_dict().items()}
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(config))
    write_tokenizer(read_vocab(gguf.GGUFReader(resolve_model("smollm2-135m").path)), path, "smollm")
    g = torch.Generator().manual_seed(0)
    names = list(shapes)
    half = len(names) // 2
    largest = 0
    for i, part in enumerate((names[:half], names[half:])):  # two shards, written one at a time
        tensors = {k: (torch.randn(shapes[k], generator=g) * 0.02).to(torch.bfloat16) for k in part}
        largest = max([largest] + [t.numel() * 2 for t in tensors.values()])
        save_file(tensors, path / f"model-{i + 1:05d}-of-00002.safetensors", metadata={"format": "pt"})
        del tensors
    return sum(f.stat().st_size for f in path.glob("*.safetensors")), largest


def bench_memory(work: Path, layers: int) -> None:
    src = work / "synthetic-llama"
    t = time.perf_counter()
    size, largest = synthetic_checkpoint(src, layers)
    print(f"synthetic checkpoint: {layers} layers, {gib(size)} bf16 safetensors (largest tensor {gib(largest)}), "
          f"written in {time.perf_counter() - t:.0f} s")
    out = work / "out"
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", CHILD, str(src), str(out)], capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        sys.exit(f"conversion failed:\n{proc.stderr[-3000:]}")
    m = json.loads(proc.stdout.strip().splitlines()[-1])
    r = m["result"]
    print(f"converted to F16 (--no-verify) in a child process: {wall:.1f} s wall, "
          f"read + convert + write {r['seconds_write']:.1f} s = {r['write_mb_per_s']:.0f} MB/s of checkpoint "
          f"(output {gib(r['model_bytes'])})")
    print(f"  RSS after imports (torch, llama.cpp)     {gib(m['after_imports_rss'])}")
    print(f"  peak RSS before the first tensor         {gib(m['peak_before_write'])}  (+ vocabulary, plan, GGUF metadata)")
    grew = m["peak_before_heads"] - m["peak_before_write"]
    print(f"  peak RSS when the GGUF is written        {gib(m['peak_before_heads'])}"
          f"  (+{gib(grew)} = {grew / largest:.2f} x the largest tensor; {m['peak_before_heads'] / size:.2f} x the checkpoint)")
    print(f"  peak RSS of the whole run (getrusage)    {gib(m['peak_rss'])}"
          "  (includes llama.cpp's mmap of the output while the heads are made)")


def bench_agreement(work: Path) -> None:
    import torch

    from sage.convert import VerificationError, convert, read_config, converter_class
    from sage.convert.base import Checkpoint
    from sage.convert.quantize import quantize
    from sage.convert.roundtrip import export_hf
    from sage.convert.verify import verify
    from sage.engine import Engine, default_threads
    from sage.presets import resolve_model

    t = time.perf_counter()
    src = export_hf(resolve_model("smollm2-135m").path, work / "SmolLM2-135M-Instruct", torch.float32)
    print(f"\nSmolLM2-135M-Instruct Q4_1 GGUF -> HF dir (float32) in {time.perf_counter() - t:.0f} s; "
          "sage convert of it, verified against torch on the exported weights:")
    print(f"{'type':8} {'top-1':>7} {'mean KL':>9} {'size':>10} {'bits/w':>7} {'time':>7}   llama.cpp pipeline (F16 -> quantize)")
    out = work / "rt"
    f16 = None
    config = read_config(src)
    conv = converter_class(config)(config, Checkpoint(src))
    for q in ("F16", "Q8_0", "Q4_K_M", "Q4_0"):
        t = time.perf_counter()
        try:
            r = convert(src, out, q, force=True)
        except VerificationError as e:
            r = e.result
        v = r.verification
        line = (f"{q:8} {v.top1:7.3f} {v.kl_mean:9.4f} {r.model_bytes / 2**20:7.1f} MiB {r.bits_per_weight:7.2f} "
                f"{time.perf_counter() - t:6.1f}s   {'pass' if v.passed else 'FAIL'} (>= {v.threshold})")
        if q == "F16":
            f16 = out / "f16-copy.gguf"
            f16.write_bytes(r.model_path.read_bytes())
        else:
            ref = out / f"llamacpp-{q}.gguf"
            quantize(f16, ref, q, default_threads())
            with Engine(ref, n_ctx=256) as eng:
                w = verify(conv, eng, q)
            line += f"   top-1 {w.top1:.3f}, KL {w.kl_mean:.4f}"
        print(line, flush=True)
    print(f"positions compared: {v.n_tokens}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=5, help="layers of the synthetic checkpoint (5: 2.6 GB)")
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--skip-agreement", action="store_true")
    ap.add_argument("--workdir", type=Path, help="where checkpoints and outputs go (default: a temp dir, removed)")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-convert-", dir=a.workdir) as tmp:
        work = Path(tmp)
        if not a.skip_memory:
            bench_memory(work, a.layers)
        if not a.skip_agreement:
            bench_agreement(work)


if __name__ == "__main__":
    main()
