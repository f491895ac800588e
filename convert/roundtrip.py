"""GGUF -> Hugging Face checkpoint directory: the converter's inverse, to check it on
files llama.cpp's own tools made (tests/test_convert.py, scripts/bench_convert.py).

Weights are dequantized by gguf-py and un-permuted by the torch reference's GGUF loader
(sage.reference.arch.load_gguf); tokenizer.json, tokenizer_config.json (with the chat template) and
config.json are rebuilt from the GGUF metadata.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import gguf
import torch

from sage.errors import SageError

# tokenizer.json pre-tokenizers of the tokenizers behind llama.cpp's pre-tokenizer names
_LLAMA3 = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_QWEN2 = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"


def _split_then_bytes(regex: str) -> dict:
    return {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
    ]}


PRE_TOKENIZERS = {
    "smollm": {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
    ]},
    "llama-bpe": _split_then_bytes(_LLAMA3),
    "qwen2": _split_then_bytes(_QWEN2),
}
HF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}


@dataclass
class GGUFVocab:
    tokens: list[str]
    types: list[int]
    merges: list[str]
    pre: str
    special: dict[str, int]  # bos/eos/unk/pad -> id
    add_bos: bool
    chat_template: str | None


def read_vocab(reader: gguf.GGUFReader) -> GGUFVocab:
    """A GGUF's byte-level BPE vocabulary (tokenizer.ggml.*)."""

    def val(key, default=None):
        f = reader.fields.get(key)
        return f.contents() if f is not None else default

    if val("tokenizer.ggml.model") != "gpt2":
        raise SageError(f"the GGUF's tokenizer is {val('tokenizer.ggml.model')!r}, not byte-level BPE (gpt2)")
    special = {}
    for kind, key in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("unk", "unknown_token_id"),
                      ("pad", "padding_token_id")):
        if (v := val(f"tokenizer.ggml.{key}")) is not None:
            special[kind] = int(v)
    return GGUFVocab(
        tokens=list(val("tokenizer.ggml.tokens")),
        types=[int(t) for t in val("tokenizer.ggml.token_type")],
        merges=list(val("tokenizer.ggml.merges")),
        pre=val("tokenizer.ggml.pre", "default"),
        special=special,
        add_bos=bool(val("tokenizer.ggml.add_bos_token", False)),
        chat_template=val("tokenizer.chat_template"),
    )


def write_tokenizer(vocab: GGUFVocab, out: Path, pre: str | None = None) -> None:
    """tokenizer.json and tokenizer_config.json; `pre` picks the pre-tokenizer (default:
    the GGUF's)."""
    pre = pre or vocab.pre
    if pre not in PRE_TOKENIZERS:
        raise SageError(f"no tokenizer.json pre-tokenizer known for {pre!r} ({', '.join(PRE_TOKENIZERS)})")
    control, user = int(gguf.TokenType.CONTROL), int(gguf.TokenType.USER_DEFINED)
    added = [
        {"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
         "special": ty == control}
        for i, (t, ty) in enumerate(zip(vocab.tokens, vocab.types)) if ty in (control, user)
    ]
    unused = int(gguf.TokenType.UNUSED)
    tokenizer = {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": PRE_TOKENIZERS[pre],
        "post_processor": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {
            "type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
            "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
            "vocab": {t: i for i, (t, ty) in enumerate(zip(vocab.tokens, vocab.types)) if ty != unused},
            "merges": vocab.merges,
        },
    }
    (out / "tokenizer.json").write_text(json.dumps(tokenizer, ensure_ascii=False), encoding="utf-8")
    config = {f"{k}_token": vocab.tokens[i] for k, i in vocab.special.items()}
    config.update(add_bos_token=vocab.add_bos, add_eos_token=False, tokenizer_class="PreTrainedTokenizerFast")
    if vocab.chat_template:
        config["chat_template"] = vocab.chat_template
    (out / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False), encoding="utf-8")


def export_hf(path: Path, out: Path, dtype: torch.dtype = torch.float32, reader: gguf.GGUFReader | None = None) -> Path:
    """Write the GGUF at `path` as a Hugging Face checkpoint directory `out`."""
    from safetensors.torch import save_file

    from sage.reference.arch import load_gguf

    reader = reader or gguf.GGUFReader(path)
    model = load_gguf(path, dtype=dtype)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, out / "model.safetensors",
              metadata={"format": "pt"})
    vocab = read_vocab(reader)
    config = {k: v for k, v in dataclasses.asdict(model.args).items() if v is not None}
    config.update(architectures=[HF_ARCHITECTURES[model.model_type]], torch_dtype=str(dtype).split(".")[-1],
                  **{f"{k}_token_id": i for k, i in vocab.special.items() if k in ("bos", "eos", "pad")})
    (out / "config.json").write_text(json.dumps(config, indent=1))
    write_tokenizer(vocab, out)
    return out
