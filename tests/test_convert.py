"""`sage convert`: tiny random checkpoints of every supported architecture (built with
model/arch, tokenizer rebuilt from the embedded SmolLM2 vocabulary) converted and run in
llama.cpp against the torch reference; the round trip of the real SmolLM2 GGUF; the
refusals, the guards on outputs, the heads sidecar, and the command through CliRunner.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import typer
from safetensors.torch import save_file
from typer.testing import CliRunner

from sage.convert import REGISTRY, VerificationError, convert
from sage.convert.base import Checkpoint
from sage.convert.llama import permute
from sage.convert.roundtrip import export_hf, read_vocab, write_tokenizer
from sage.convert.verify import PROBE_TEXTS, THRESHOLDS, llama_logits, reference_logits
from sage.reference.arch import get_arch, load_hf
from sage.reference.arch.llama import unpermute
from sage.reference.arch.parity import compare_logits
from sage.engine import Engine
from sage.errors import SageError
from sage.heads import SageHeads, fingerprint
from helpers import one_line_error

N_VOCAB = 49152  # SmolLM2's
BASE = dict(hidden_size=64, num_hidden_layers=2, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)

# one tiny checkpoint per supported architecture, each exercising what its converter does:
# llama: q/k permutation, llama3 rope factors, tied embeddings, Llama 3's pre-tokenizer;
# qwen2: biases, untied output, a vocab padded past the tokenizer, bf16 weights;
# qwen3: q/k norms, head_dim != hidden / heads, f16 weights
TINY = {
    "llama": (dict(BASE, model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=N_VOCAB,
                   tie_word_embeddings=True,
                   rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                     original_max_position_embeddings=16)),
              "llama-bpe", torch.float32),
    "qwen2": (dict(BASE, model_type="qwen2", architectures=["Qwen2ForCausalLM"], vocab_size=N_VOCAB + 8,
                   tie_word_embeddings=False),
              "qwen2", torch.bfloat16),
    "qwen3": (dict(BASE, model_type="qwen3", architectures=["Qwen3ForCausalLM"], vocab_size=N_VOCAB, head_dim=32,
                   tie_word_embeddings=True),
              "qwen2", torch.float16),
}


def test_every_registered_converter_has_a_tiny_checkpoint():
    assert sorted(REGISTRY) == sorted(c["architectures"][0] for c, _, _ in TINY.values())


@pytest.fixture(scope="session")
def smol_reader(smollm2_path):
    return gguf.GGUFReader(smollm2_path)  # ~3 s: once per session


@pytest.fixture(scope="session")
def smol_vocab(smol_reader):
    return read_vocab(smol_reader)


def make_checkpoint(path: Path, vocab, kind: str, **overrides) -> Path:
    """A random checkpoint of architecture `kind` as Hugging Face would save it."""
    config, pre, dtype = TINY[kind]
    config = dict(config, **overrides)
    arch = get_arch(config["model_type"])
    torch.manual_seed(0)
    model = arch.Model(arch.ModelArgs.from_dict(config))
    with torch.no_grad():  # default init leaves norms at 1 and biases at 0: perturb all
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    path.mkdir(parents=True)
    save_file({k: v.to(dtype).contiguous() for k, v in model.state_dict().items()}, path / "model.safetensors")
    (path / "config.json").write_text(json.dumps(config))
    write_tokenizer(vocab, path, pre)
    return path


def files(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir()) if d.exists() else []


def read_gguf(path: Path) -> tuple[dict, dict]:
    r = gguf.GGUFReader(path)
    fields = {k: f.contents() for k, f in r.fields.items() if not k.startswith("tokenizer.ggml.")}
    for k in ("tokenizer.ggml.pre", "tokenizer.ggml.model", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id"):
        if k in r.fields:
            fields[k] = r.fields[k].contents()
    fields["tokenizer.ggml.token_type"] = r.fields["tokenizer.ggml.token_type"].contents()
    return fields, {t.name: t for t in r.tensors}


# --- tiny checkpoints of every architecture -------------------------------------------


@pytest.mark.parametrize("kind", sorted(TINY))
def test_tiny_checkpoint_to_f16_matches_torch(kind, smol_vocab, tmp_path):
    src = make_checkpoint(tmp_path / f"tiny-{kind}", smol_vocab, kind)
    out = tmp_path / "out"
    r = convert(src, out, "F16")
    assert files(out) == [f"tiny-{kind}-F16.gguf", f"tiny-{kind}.sage.gguf"]
    assert r.model_path == out / f"tiny-{kind}-F16.gguf" and r.architecture == TINY[kind][0]["architectures"][0]
    v = r.verification
    # F16 rounding moves logits by ~1e-3: the same top-1 where the lead is clear (near-ties
    # flip with the CPU's instruction set; a random tiny model has few clear leads), KL ~ 0
    assert v.passed and v.n_clear > 0 and v.top1_clear == 1.0 and v.kl_mean < 1e-4, v
    assert v.n_tokens > 200

    fields, tensors = read_gguf(r.model_path)
    config, pre, _ = TINY[kind]
    assert fields["general.architecture"] == config["model_type"]
    assert fields["tokenizer.ggml.pre"] == pre and fields["tokenizer.ggml.model"] == "gpt2"
    assert (fields["tokenizer.ggml.bos_token_id"], fields["tokenizer.ggml.eos_token_id"]) == (1, 2)
    types = fields["tokenizer.ggml.token_type"]
    assert len(types) == config["vocab_size"]
    assert types[:17] == [gguf.TokenType.CONTROL] * 17  # SmolLM2's special tokens
    assert types[N_VOCAB:] == [gguf.TokenType.UNUSED] * (config["vocab_size"] - N_VOCAB)  # qwen2's padding
    assert ("output.weight" in tensors) == (not config["tie_word_embeddings"])
    assert ("rope_freqs.weight" in tensors) == (kind == "llama")
    assert tensors["blk.0.attn_q.weight"].tensor_type == gguf.GGMLQuantizationType.F16
    assert tensors["blk.0.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32

    # logits within F16 rounding of the reference on the source weights (F16 KV cache)
    with Engine(r.model_path, n_ctx=256) as eng:
        tokens = eng.tokenize(PROBE_TEXTS[1])
        ours = torch.from_numpy(llama_logits(eng, tokens))
        heads = SageHeads.load(r.heads_path)
        assert heads.fingerprint == fingerprint(eng) and r.heads == "analytic"
        assert heads.base_name == f"tiny-{kind}" and heads.tracked_layers == [1]
    ref = reference_logits(converter_for(src), [tokens])[0]
    assert (ours - ref).abs().max() <= 5e-3 * ref.abs().max()


def converter_for(src: Path):
    config = json.loads((src / "config.json").read_text())
    return REGISTRY[config["architectures"][0]](config, Checkpoint(src))


def test_streamed_reference_equals_the_whole_model(smol_vocab, tmp_path):
    """Verification's layer-by-layer reference computes what load_hf's model does."""
    for kind in ("llama", "qwen2"):
        src = make_checkpoint(tmp_path / kind, smol_vocab, kind)
        seqs = [[5, 900, 17, 3000, 42], list(range(100, 120))]
        streamed = reference_logits(converter_for(src), seqs)
        model = load_hf(src)
        with torch.no_grad():
            for s, got in zip(seqs, streamed):
                torch.testing.assert_close(got, model(torch.tensor([s]))[0], atol=1e-5, rtol=1e-5)


def test_permute_is_undone_by_the_reference_loader():
    w, b = torch.randn(4 * 16, 8), torch.randn(4 * 16)
    assert torch.equal(unpermute(permute(w, 4), 4), w) and torch.equal(unpermute(permute(b, 4), 4), b)
    assert not torch.equal(permute(w, 4), w)


@pytest.mark.parametrize("qtype, kl_max", [("Q8_0", 0.01), ("Q4_0", 0.2)])
def test_tiny_checkpoint_quantized_by_llama_cpp(qtype, kl_max, smol_vocab, tmp_path):
    src = make_checkpoint(tmp_path / "tiny", smol_vocab, "qwen3")
    out = tmp_path / "out"
    events = []
    try:
        r = convert(src, out, qtype, on_tensor=lambda *e: events.append(e))
    except VerificationError as e:  # random tiny models have near-flat distributions: top-1 is fragile
        r = e.result
    assert files(out) == [f"tiny-{qtype}.gguf", "tiny.sage.gguf"]  # the intermediate is gone
    _, tensors = read_gguf(r.model_path)
    assert tensors["blk.0.ffn_up.weight"].tensor_type == gguf.GGMLQuantizationType[qtype]
    assert r.model_bytes < r.source_bytes and r.seconds_quantize is not None  # f16 source
    assert r.verification.kl_mean < kl_max, r.verification
    stages = {e[0] for e in events}
    assert stages == {"write", "quantize"}
    assert max(e[1] for e in events if e[0] == "quantize") == len(tensors)  # llama.cpp's progress lines


# --- the round trip of the real model --------------------------------------------------


@pytest.mark.slow  # ~10 s alone, several times that on a busy machine
def test_smollm2_round_trip_generates_the_same_tokens(smollm2_path, smol_reader, tmp_path):
    """Embedded SmolLM2 GGUF -> HF dir (dequantized, un-permuted) -> convert at F16: the same
    greedy continuation as the original, the same vocabulary and tensors."""
    src = export_hf(smollm2_path, tmp_path / "SmolLM2-135M-Instruct", torch.float16, reader=smol_reader)
    r = convert(src, tmp_path / "out", "F16")
    v = r.verification
    assert v.passed and v.n_clear > 150 and v.top1_clear == 1.0 and v.kl_mean < 1e-4, v

    # F16 weights and the original's Q4_1 (whose matmuls round activations to 8 bits) are not
    # the same computation, and a greedy path parts ways at any near tie, which one CPU has
    # and another has not. So the original's own greedy chain is teacher-forced through both:
    # the same next token wherever the original leads clearly, and a small KL everywhere
    with Engine(smollm2_path, n_ctx=512) as eng:
        prompt, _ = eng.build_prompt("Explain why the sky is blue.")
        tokens = eng.tokenize(prompt)
        tokens += [t.id for t in eng.generate(tokens, 48)]
        original = llama_logits(eng, tokens)
    with Engine(r.model_path, n_ctx=512) as eng:
        converted = llama_logits(eng, tokens)
    a = compare_logits(original, converted)
    print(f"round trip F16 vs the original Q4_1: {a}")
    assert a.n_clear > a.n // 2 and a.top1_clear >= 0.98 and a.kl_mean < 0.02, a

    orig = smol_reader
    new = gguf.GGUFReader(r.model_path)
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges", "tokenizer.ggml.pre",
                "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.padding_token_id",
                "tokenizer.ggml.add_bos_token", "tokenizer.chat_template", "llama.block_count",
                "llama.embedding_length", "llama.attention.head_count_kv", "llama.rope.freq_base",
                "llama.context_length", "llama.vocab_size", "llama.rope.dimension_count"):
        assert new.fields[key].contents() == orig.fields[key].contents(), key
    shapes = {t.name: t.shape.tolist() for t in orig.tensors}
    assert {t.name: t.shape.tolist() for t in new.tensors} == shapes


# --- refusals and guards -----------------------------------------------------------------


def test_pickle_checkpoint_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(TINY["llama"][0]))
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04not loaded")
    with pytest.raises(SageError, match="pickle.*safetensors only"):
        convert(tmp_path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("arch", ["MambaForCausalLM", "GPT2LMHeadModel"])
def test_unsupported_architecture_names_the_supported_ones(arch, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(dict(architectures=[arch], model_type="x")))
    with pytest.raises(SageError, match="LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM") as e:
        convert(tmp_path, tmp_path / "out")
    assert arch in str(e.value)


def test_loopcoder_is_explained(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(dict(architectures=["SAGELoopCoderForCausalLM"])))
    with pytest.raises(SageError, match="llama.cpp has no loop attention.*cannot run it") as e:
        convert(tmp_path, tmp_path / "out")
    assert "SAGE-OSS-40B" in str(e.value) and "Qwen2ForCausalLM" in str(e.value)


def test_unknown_qtype_and_missing_source(tmp_path):
    with pytest.raises(SageError, match="Q4_K_M, Q4_0, Q8_0, F16"):
        convert(tmp_path, tmp_path, "Q3_K")
    with pytest.raises(SageError, match="no such directory"):
        convert(tmp_path / "nope" / "deeper" / "x", tmp_path)


def test_existing_output_needs_force_and_nothing_is_touched(smol_vocab, tmp_path):
    src = make_checkpoint(tmp_path / "tiny", smol_vocab, "llama")
    out = tmp_path / "out"
    out.mkdir()
    (out / "tiny.sage.gguf").write_bytes(b"mine")
    before = (out / "tiny.sage.gguf").stat().st_mtime_ns
    with pytest.raises(SageError, match="tiny.sage.gguf exists; pass --force"):
        convert(src, out, "F16")
    assert files(out) == ["tiny.sage.gguf"] and (out / "tiny.sage.gguf").read_bytes() == b"mine"
    assert (out / "tiny.sage.gguf").stat().st_mtime_ns == before
    r = convert(src, out, "F16", force=True, verify=False)
    assert r.verification is None and SageHeads.load(r.heads_path).base_name == "tiny"
    # another type into the same directory keeps the one sidecar of the model
    heads_bytes = r.heads_path.read_bytes()
    r2 = convert(src, out, "Q8_0", verify=False)
    assert r2.heads == "existing sidecar kept" and r2.heads_path.read_bytes() == heads_bytes
    assert files(out) == ["tiny-F16.gguf", "tiny-Q8_0.gguf", "tiny.sage.gguf"]


def test_interrupted_write_leaves_nothing(smol_vocab, tmp_path, monkeypatch):
    src = make_checkpoint(tmp_path / "tiny", smol_vocab, "qwen2")
    written = []
    real = gguf.GGUFWriter.write_tensor_data

    def flaky(self, tensor, *a, **k):
        if len(written) == 5:
            raise KeyboardInterrupt
        written.append(tensor.nbytes)
        return real(self, tensor, *a, **k)

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", flaky)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        convert(src, out, "F16")
    assert len(written) == 5 and not out.exists()  # no output, no temp file, no directory it made


def test_float16_overflow_is_refused(smol_vocab, tmp_path):
    src = make_checkpoint(tmp_path / "tiny", smol_vocab, "qwen2")  # bf16: its range is float32's
    weights = Checkpoint(src)
    tensors = {k: weights.read(k).clone() for k in weights.tensors}
    tensors["model.layers.1.mlp.up_proj.weight"][3, 5] = 1e5
    save_file(tensors, src / "model.safetensors")
    with pytest.raises(SageError, match="blk.1.ffn_up.weight.*beyond float16's range.*Q8_0"):
        convert(src, tmp_path / "out", "F16")
    assert not (tmp_path / "out").exists()
    r = convert(src, tmp_path / "out", "Q8_0", verify=False)  # the lossless bf16 intermediate keeps it
    assert r.model_path.is_file()


def test_interrupted_quantizer_is_stopped_and_leaves_nothing(smol_vocab, tmp_path):
    src = make_checkpoint(tmp_path / "tiny", smol_vocab, "llama")

    def on_tensor(stage, done, total, name):
        if stage == "quantize":
            raise KeyboardInterrupt

    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        convert(src, out, "Q8_0", on_tensor=on_tensor)
    assert files(out) == []


def test_offline_hub_id_says_how_to_fetch_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SageError, match="hub cannot be reached.*hf download someorg/tiny-model") as e:
        convert("someorg/tiny-model", tmp_path / "out")
    assert "\n" not in str(e.value) and not (tmp_path / "out").exists()


def test_sentencepiece_only_tokenizer_is_refused(smol_vocab, tmp_path):
    src = make_checkpoint(tmp_path / "tiny", smol_vocab, "llama")
    (src / "tokenizer.json").unlink()
    (src / "tokenizer.model").write_bytes(b"sp")
    with pytest.raises(SageError, match="sentencepiece"):
        convert(src, tmp_path / "out")
    assert files(tmp_path / "out") == []


# --- the heads sidecar ---------------------------------------------------------------------


def ship_heads(src: Path, base_name: str, n_head: int = 4, layers=(1,)) -> None:
    heads = SageHeads.analytic("0" * 32, base_name, list(layers), n_head)
    heads.threshold = 0.42  # tell shipped heads from analytic ones
    heads.save(src / "shipped.sage.gguf")


def test_shipped_heads_are_rebound_to_the_converted_model(smol_vocab, tmp_path):
    src = make_checkpoint(tmp_path / "tiny", smol_vocab, "llama")
    ship_heads(src, "tiny")
    r = convert(src, tmp_path / "out", "F16", verify=False)
    heads = SageHeads.load(r.heads_path)
    assert r.heads == "checkpoint, re-bound" and heads.threshold == pytest.approx(0.42)
    assert heads.info["rebound_from"] == "0" * 32
    with Engine(r.model_path, n_ctx=64) as eng:
        assert heads.fingerprint == fingerprint(eng)


@pytest.mark.parametrize("base_name, n_head, why", [("other-model", 4, "made for another model"),
                                                     ("tiny", 8, "4 heads per layer")])
def test_shipped_heads_that_do_not_fit_are_refused(base_name, n_head, why, smol_vocab, tmp_path):
    src = make_checkpoint(tmp_path / "tiny", smol_vocab, "llama")
    ship_heads(src, base_name, n_head)
    with pytest.raises(SageError, match=why):
        convert(src, tmp_path / "out", "F16", verify=False)
    assert files(tmp_path / "out") == []


# --- the command -------------------------------------------------------------------------

from sage.cli.convert import convert as convert_cmd  # noqa: E402

app = typer.Typer()
app.command("convert")(convert_cmd)


@app.command("other")
def _other() -> None:
    """Keeps typer in subcommand mode, as in the real app."""


runner = CliRunner()




def test_command_help_has_an_example():
    r = runner.invoke(app, ["convert", "--help"])
    assert r.exit_code == 0 and "Example: sage convert --q4" in r.stdout


def test_command_converts_and_prints_json(smol_vocab, tmp_path):
    src = make_checkpoint(tmp_path / "tiny", smol_vocab, "qwen2")
    r = runner.invoke(app, ["convert", str(src), "--qtype", "f16", "--out", str(tmp_path / "o"), "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["qtype"] == "F16" and d["verification"]["passed"] and Path(d["model_path"]).is_file()
    assert "\x1b" not in r.stdout


def test_command_summary_and_failed_verification(smol_vocab, tmp_path, monkeypatch):
    src = make_checkpoint(tmp_path / "tiny", smol_vocab, "qwen2")
    monkeypatch.setitem(THRESHOLDS, "F16", 1.01)  # unreachable: verification must fail
    r = runner.invoke(app, ["convert", str(src), "--qtype", "F16", "--out", str(tmp_path / "o")])
    line = one_line_error(r, "verification failed", "top-1 agreement 1.000 < 1.010", "kept")
    assert "FAILED" in r.stdout and "bits per weight" in r.stdout
    assert files(tmp_path / "o") == ["tiny-F16.gguf", "tiny.sage.gguf"], line  # kept, complete


def test_command_refusals_are_one_line(tmp_path):
    one_line_error(runner.invoke(app, ["convert", str(tmp_path), "--q4", "--qtype", "Q8_0"]), "--q4 means Q4_K_M")
    (tmp_path / "config.json").write_text(json.dumps(dict(architectures=["SAGELoopCoderForCausalLM"])))
    one_line_error(runner.invoke(app, ["convert", str(tmp_path), "--q4"]), "loop attention")
