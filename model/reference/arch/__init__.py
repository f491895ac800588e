"""Torch reference architectures: a registry from `model_type` (HF config) or
`general.architecture` (GGUF) to the module that implements it, and the two loaders.

Each module holds a `ModelArgs` dataclass (`from_dict` of an HF config) and a `Model`
whose parameter names are the HF checkpoint keys. Only exact gradients, head training
and conversion checks import this package: it imports torch, `sage ask` must not.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from types import ModuleType

import torch

from sage.errors import SageError

# model_type / general.architecture -> module under sage.reference.arch
ARCHITECTURES = {
    "llama": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "gemma3": "gemma3",
    "gemma3_text": "gemma3",  # HF's text-only Gemma 3 (270M, 1B); GGUF calls it gemma3
}

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def get_arch(name: str) -> ModuleType:
    """The module implementing architecture `name`; a SageError naming the supported
    ones for anything else."""
    module = ARCHITECTURES.get(name)
    if module is None:
        supported = ", ".join(sorted(set(ARCHITECTURES.values())))
        why = ""
        if "loopcoder" in str(name).lower():
            why = (
                " (LoopCoder, SAGE-OSS-40B's architecture, re-runs a window of layers in a loop"
                " that stock llama.cpp cannot execute)"
            )
        raise SageError(f"unsupported architecture {name!r}{why}; supported: {supported}")
    return importlib.import_module(f"sage.reference.arch.{module}")


def safetensors_files(path: Path) -> list[Path]:
    """The *.safetensors files of a checkpoint directory, sorted; a pickle checkpoint (or
    none at all) is an error: loading pickles can run code."""
    files = sorted(path.glob("*.safetensors"))
    if not files:
        pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise SageError(
                f"{path}: {pickles[0]} is a pickle checkpoint, refused (loading pickles can run code); "
                "sage reads safetensors only: re-save it with safetensors"
            )
        raise SageError(f"{path}: no *.safetensors weights")
    return files


def load_hf(path: str | Path, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A Hugging Face checkpoint directory (config.json + *.safetensors) as a torch Model.
    Pickle checkpoints (*.bin, *.pt, ...) are refused: loading them can run arbitrary code."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise SageError(f"{path}: not a Hugging Face checkpoint directory (no config.json)")
    files = safetensors_files(path)
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise SageError(f"{path / 'config.json'}: unreadable ({e})") from None
    if "model_type" not in config:
        raise SageError(f"{path / 'config.json'}: no model_type")
    arch = get_arch(config["model_type"])
    args = arch.ModelArgs.from_dict(config)
    with torch.device("meta"):  # no init cost or memory: every tensor comes from the files
        model = arch.Model(args)

    from safetensors import SafetensorError
    from safetensors.torch import load_file

    weights = {}
    for f in files:
        try:
            weights.update(load_file(f))
        except (SafetensorError, OSError) as e:
            raise SageError(f"{f}: unreadable safetensors file ({e})") from None
    load_weights(model, model.sanitize(weights), str(path), dtype)
    return model.eval()


def load_gguf(path: str | Path, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A llama.cpp GGUF model as a torch Model: every tensor dequantized with gguf-py,
    names mapped back with gguf-py's own table, converter permutes/shifts undone."""
    import gguf

    path = Path(path)
    if not path.is_file():
        raise SageError(f"{path}: no such file")
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, OSError) as e:
        raise SageError(f"{path}: not a readable GGUF file ({e})") from None
    field = reader.fields.get("general.architecture")
    if field is None:
        raise SageError(f"{path}: no general.architecture in the GGUF metadata")
    arch_name = field.contents()
    arch = get_arch(arch_name)
    tensors = {t.name: t for t in reader.tensors}
    args = arch.ModelArgs.from_dict(gguf_config(reader, arch_name, tensors))
    with torch.device("meta"):
        model = arch.Model(args)

    arch_ids = {name: a for a, name in gguf.MODEL_ARCH_NAMES.items()}
    names = gguf.get_tensor_name_map(arch_ids[arch_name], args.num_hidden_layers)
    weights = {}
    for key in model.state_dict():
        gname = names.get_name(key, try_suffixes=(".weight", ".bias"))
        t = tensors.pop(gname, None) if gname else None
        if t is None:
            raise SageError(f"{path}: tensor {gname or key} missing for {arch_name}")
        data = gguf.quants.dequantize(t.data, t.tensor_type)
        # GGUF lists dims fastest-first (ne0 = columns); torch wants rows first
        weights[key] = torch.from_numpy(data.reshape(tuple(reversed(t.shape.tolist()))).copy())
    rope_freqs = tensors.pop("rope_freqs.weight", None)
    if tensors:
        raise SageError(f"{path}: tensors the {arch_name} reference does not use: {', '.join(sorted(tensors)[:5])}")
    load_weights(model, model.sanitize_gguf(weights), str(path), dtype)
    if rope_freqs is not None:
        # llama3-style rope scaling, stored by llama.cpp as per-frequency divisors
        factors = gguf.quants.dequantize(rope_freqs.data, rope_freqs.tensor_type)
        model.model.rotary_emb.freq_factors = torch.from_numpy(factors.copy())
    return model.eval()


def gguf_config(reader, arch: str, tensors: dict) -> dict:
    """An HF-style config dict from GGUF metadata (`{arch}.embedding_length`, ...)."""

    def get(key, default=None):
        f = reader.fields.get(f"{arch}.{key}")
        return f.contents() if f is not None else default

    n_head = get("attention.head_count")
    n_kv = get("attention.head_count_kv", n_head)
    if isinstance(n_head, list) or isinstance(n_kv, list):
        raise SageError(f"{arch}: per-layer head counts are not supported")
    config = {
        "model_type": arch,
        "hidden_size": get("embedding_length"),
        "num_hidden_layers": get("block_count"),
        "intermediate_size": get("feed_forward_length"),
        "num_attention_heads": n_head,
        "num_key_value_heads": n_kv,
        "head_dim": get("attention.key_length"),  # absent: hidden / heads
        "rms_norm_eps": get("attention.layer_norm_rms_epsilon"),
        "rope_theta": get("rope.freq_base"),
        "max_position_embeddings": get("context_length"),
        # token_embd is (n_embd, n_vocab) in GGUF order
        "vocab_size": int(tensors["token_embd.weight"].shape[1]),
        # llama.cpp reuses token_embd as the output matrix when there is no output.weight
        "tie_word_embeddings": "output.weight" not in tensors,
        "attention_bias": "blk.0.attn_output.bias" in tensors,
        # absent: llama.cpp runs no sliding window at all (0 turns it off in gemma3)
        "sliding_window": get("attention.sliding_window", 0),
        "rope_local_base_freq": get("rope.freq_base_swa"),
        "final_logit_softcapping": get("final_logit_softcapping"),
    }
    if (kind := get("rope.scaling.type")) not in (None, "none"):
        if kind != "linear":
            raise SageError(f"{arch}: rope scaling {kind!r} in the GGUF is not supported (linear only)")
        config["rope_scaling"] = {"rope_type": "linear", "factor": get("rope.scaling.factor")}
    pattern = get("attention.sliding_window_pattern")
    if isinstance(pattern, list):  # one bool per layer
        config["layer_types"] = ["sliding_attention" if s else "full_attention" for s in pattern]
    elif pattern is not None:
        config["sliding_window_pattern"] = pattern
    return config


def load_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor], source: str, dtype: torch.dtype) -> None:
    """Check names and shapes against the model in one place, then assign the tensors."""
    expected = model.state_dict()
    missing = sorted(expected.keys() - weights.keys())
    unexpected = sorted(weights.keys() - expected.keys())
    if missing or unexpected:
        parts = [f"missing {', '.join(missing[:3])}"] if missing else []
        parts += [f"unexpected {', '.join(unexpected[:3])}"] if unexpected else []
        raise SageError(f"{source}: weights do not match the {model.model_type} architecture: {'; '.join(parts)}")
    for k, v in weights.items():
        if v.shape != expected[k].shape:
            raise SageError(f"{source}: {k} has shape {tuple(v.shape)}, the config implies {tuple(expected[k].shape)}")
    model.load_state_dict({k: v.to(dtype) for k, v in weights.items()}, strict=True, assign=True)
