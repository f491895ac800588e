"""The tokenizer, from tokenizer.json (byte-level BPE, as Llama 3, SmolLM2 and Qwen use),
into the GGUF: tokens by id with their types, merges, special token ids, add-BOS/EOS
flags and the chat template.

Merges, special ids, flags and the template come from gguf-py's `SpecialVocab` (it reads
tokenizer.json, tokenizer_config.json and config.json). The token list and types follow
llama.cpp's converter (`get_vocab_base`), which asks transformers; transformers is not a
dependency here, so the same rules are applied to tokenizer.json directly.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import gguf

from sage.errors import SageError


def read_tokenizer(path: Path) -> dict:
    """tokenizer.json of a checkpoint dir; a byte-level BPE tokenizer is required."""
    f = path / "tokenizer.json"
    if not f.is_file():
        if (path / "tokenizer.model").is_file():
            raise SageError(
                f"{path}: only a sentencepiece tokenizer.model; sage convert reads byte-level BPE "
                "tokenizers from tokenizer.json"
            )
        raise SageError(f"{path}: no tokenizer.json")
    try:
        tok = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SageError(f"{f}: unreadable ({e})") from None
    model = tok.get("model") or {}
    decoder = tok.get("decoder") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback") or "ByteLevel" not in json.dumps(decoder):
        raise SageError(
            f"{f}: a {model.get('type', 'unknown')} tokenizer{' with byte fallback' if model.get('byte_fallback') else ''}; "
            "sage convert supports byte-level BPE tokenizers (Llama 3, SmolLM2, Qwen)"
        )
    return tok


def looks_special(token: str) -> bool:
    """Added tokens some checkpoints forget to mark special (llama.cpp's converter,
    does_token_look_special): <|...|>, <｜...｜>, <pad>, <mask>."""
    return (
        token in ("<pad>", "<mask>")
        or (token.startswith("<|") and token.endswith("|>"))
        or (token.startswith("<｜") and token.endswith("｜>"))
    )


@dataclass
class Vocab:
    tokens: list[str]  # by id, n_vocab long
    types: list[int]  # gguf.TokenType per token
    pre: str  # llama.cpp's pre-tokenizer name
    special: gguf.SpecialVocab

    def add_to_gguf(self, w: gguf.GGUFWriter) -> None:
        w.add_tokenizer_model("gpt2")  # llama.cpp's name for byte-level BPE
        w.add_tokenizer_pre(self.pre)
        w.add_token_list(self.tokens)
        w.add_token_types(self.types)
        self.special.add_to_gguf(w, quiet=True)


def load_vocab(path: Path, tokenizer: dict, n_vocab: int, pre: str) -> Vocab:
    """The vocabulary padded to the model's n_vocab (embedding rows): ids the tokenizer
    does not use become UNUSED [PADi] tokens, as llama.cpp's converter writes them."""
    vocab: dict[str, int] = tokenizer["model"]["vocab"]
    added = {int(t["id"]): t for t in tokenizer.get("added_tokens") or []}
    by_id: dict[int, str] = {i: s for s, i in vocab.items()}
    by_id.update({i: t["content"] for i, t in added.items()})
    top = max(by_id, default=-1)
    if top >= n_vocab:
        raise SageError(f"{path}: the tokenizer has token id {top}, but the model's vocab_size is {n_vocab}")
    tokens, types = [], []
    for i in range(n_vocab):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        text = by_id[i]
        tokens.append(text)
        if i in added:
            special = added[i].get("special") or looks_special(text)
            types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
    special = gguf.SpecialVocab(path, load_merges=True, n_vocab=n_vocab)
    if not special.merges:
        raise SageError(f"{path / 'tokenizer.json'}: no BPE merges")
    return Vocab(tokens, [int(t) for t in types], pre, special)
