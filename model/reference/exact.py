"""Paper eq. 7 in its exact form on the torch reference model, and how well the llama.cpp
path's proxy ranks like it.

    Significance(t_j, i) = w_ij * |grad_{h_j} L_i| * H_i

The llama.cpp path (model/inverse.py) replaces the gradient factor by the attention-
weighted value norm, because llama.cpp has no backward pass. Here one forward pass of
the torch model (model/arch, weights dequantized from the same GGUF) over prompt +
generated tokens gives the attention w, the step NLLs L_i and entropies H_i, and a
backward pass per step (batched) gives |grad_{h_j} L_i| for every position j. Everything
else (which queries make a step's attention row, the candidate positions, the per-step
normalization) is what `sage.inverse.observe.significance_matrix` does, so the two matrices compare
entry for entry.

The heavy reductions (gradient norms, attention rows, the normalized eq. 7 product) go
through sage.kernels.metal: Metal kernels when the model runs on an Apple GPU (`device="mps"`),
their numpy twins in kernels/reference.py everywhere else.

This module imports torch: only `--exact`, tests and scripts import it, never the
default `sage ask` path.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from sage.kernels import metal
from sage.kernels.reference import aggregate_rows
from sage.engine import Engine
from sage.errors import SageError
from sage.inverse.observe import Observation, content_mask, map_prompt, significance_matrix
from sage.trace import Trace

BACKWARD_CHUNK = 8  # steps per batched backward pass
_MODELS: dict[tuple[str, str], torch.nn.Module] = {}


def load_model(path: str | Path, device: str = "cpu") -> torch.nn.Module:
    """The torch reference model of a GGUF (float32) on `device`, loaded once per path,
    device and process. Its weights need no gradient: only activations are differentiated."""
    key = (str(Path(path).resolve()), str(device))
    model = _MODELS.get(key)
    if model is None:
        from sage.reference.arch import load_gguf

        model = load_gguf(path).requires_grad_(False).to(device)
        _MODELS[key] = model
    return model


@dataclass
class ExactResult:
    """Eq. 7 on the torch model for every step of a trace. Positions index the full
    sequence (prompt + generated), as in `sage.inverse.observe.significance_matrix`."""

    significance: np.ndarray  # (n_steps, n_pos) exact eq. 7, normalized per step over `candidates`
    grad_norm: np.ndarray  # (n_steps, n_pos) |grad_{h_j} L_i|, raw
    proxy: np.ndarray  # (n_steps, n_pos) the llama.cpp path's proxy formula on the torch model's tensors
    candidates: np.ndarray  # (n_steps, n_pos) bool: the positions significance is ranked over
    attn: np.ndarray  # (n_gen, n_pos) tracker-layout rows: row k = query that produced token k
    vattn: np.ndarray  # (n_gen, n_pos) the same rows weighted by value norms
    entropy: np.ndarray  # (n_steps,) H_i: mean predictive entropy of the step's tokens (nats)
    nll: np.ndarray  # (n_steps,) L_i: sum of -log p of the step's tokens
    n_prompt: int
    layers: list[int]  # tracked layers: attention aggregated over these and all heads
    grad_layer: int  # hidden[grad_layer] is differentiated (0 = embedding output)
    # forward_s: the forward pass and each token's gradient at the top; backward_s: the
    # per-step passes down to grad_layer; exact_s: both; load_s: loading the model (0 if cached)
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def method(self) -> str:
        """How the gradient factor was computed, in the words of Analysis.proxy."""
        where = f"the residual stream entering layer {self.grad_layer}" if self.grad_layer else "the embedding output"
        return f"exact |grad_h L_i| (torch reference model, w.r.t. {where})"


def candidate_mask(content: np.ndarray, n_prompt: int, token_start: int) -> np.ndarray:
    """Positions a step's significance is ranked over: content tokens before the query
    that produced the step's first token (the same rule as sage.inverse.observe.significance_matrix)."""
    mask = content.copy()
    mask[max(n_prompt + token_start - 1, 0) :] = False
    return mask


def default_layers(model: torch.nn.Module) -> list[int]:
    """The layers the llama.cpp tracker observes by default (sage.kernels.tracker)."""
    from sage.kernels.tracker import default_layers as pick

    types = getattr(model.args, "layer_types", None)
    full = [i for i in range(len(model.layers)) if types is None or types[i] == "full_attention"]
    return [full[i] for i in pick(len(full))]


def exact_from_model(
    model: torch.nn.Module,
    trace: Trace,
    prompt_tokens: list[int],
    content: np.ndarray,
    layers: list[int],
    grad_layer: int | None = None,
    head_weights: np.ndarray | None = None,
) -> ExactResult:
    """Eq. 7 for every step of `trace` on a loaded torch model (no llama.cpp involved).

    content: (n_pos,) bool, the positions that may be significant (problem tokens of the
    prompt, every generated token). The attention rows aggregate `layers` and all heads
    as the llama.cpp tracker does: a plain mean, or weighted by head_weights
    (len(layers), n_head) when given (SAGE heads' tracker weights). grad_layer: which
    residual stream h_j is: hidden[grad_layer] enters layer grad_layer (0 = the embedding
    output); default the first tracked layer, the stream the tracked attention reads from."""
    n_prompt, n_gen = len(prompt_tokens), len(trace.tokens)
    n_layer = len(model.layers)
    n_head = model.layers[0].self_attn.n_heads
    layers = [int(il) for il in layers]
    if not layers or len(set(layers)) != len(layers) or not all(0 <= il < n_layer for il in layers):
        raise SageError(f"tracked layers {layers} do not fit the {n_layer}-layer model")
    if head_weights is None:
        head_weights = np.full((len(layers), n_head), 1.0 / (len(layers) * n_head))
    if np.shape(head_weights) != (len(layers), n_head):
        raise SageError(f"head weights of shape {np.shape(head_weights)} do not fit {len(layers)} layers x {n_head}")
    grad_layer = min(layers) if grad_layer is None else grad_layer
    if not 0 <= grad_layer <= n_layer:
        raise SageError(f"grad_layer {grad_layer} is not in 0..{n_layer}")
    if n_prompt < 1 or n_gen < 1:
        raise SageError("the trace has no prompt or no generated tokens")
    n_pos = n_prompt + n_gen
    if content.shape != (n_pos,):
        raise ValueError(f"content has shape {content.shape}, expected ({n_pos},)")
    dev = next(model.parameters()).device  # where the model runs: the kernels follow it
    ids = torch.tensor([list(prompt_tokens) + [t.id for t in trace.tokens]], device=dev)  # (1, T)
    if int(ids.max()) >= model.args.vocab_size:
        raise SageError("the trace's token ids do not fit this model's vocabulary: a different model made it")

    vnorm: dict[int, torch.Tensor] = {}  # layer -> (nkv, T) norms of the value vectors
    attn_mod = model.layers[0].self_attn
    nkv, hs, group = attn_mod.n_kv_heads, attn_mod.head_dim, attn_mod.n_heads // attn_mod.n_kv_heads

    def keep_values(il):
        def hook(_mod, _inp, out):  # out: (1, T, nkv * hs), as llama.cpp's Vcur-<il>
            vnorm[il] = out.detach()[0].view(-1, nkv, hs).norm(dim=-1).T

        return hook

    hooks = [model.layers[il].self_attn.v_proj.register_forward_hook(keep_values(il)) for il in layers]
    t0 = time.perf_counter()
    try:
        # the weights need no gradient, so the graph starts at the embeddings
        h0 = model.embed(ids).detach().requires_grad_()  # (1, T, C)
        _, hidden, attentions = model(inputs_embeds=h0, output_hidden_states=True, output_attentions=layers)
    finally:
        for h in hooks:
            h.remove()
    q = torch.arange(n_prompt - 1, n_pos - 1, device=dev)  # the query that produced generated token k
    # The final norm and the LM head act on each position alone, so d nll_k / d hidden[-1]
    # is nonzero at row q_k only: get those rows for all tokens in one small backward pass
    # here, and the per-step passes below start at hidden[-1], never through the (V, C) head.
    x = hidden[-1][0, q].detach().requires_grad_()  # (n_gen, C)
    logits = model.lm_logits(model.model.norm(x[None]))[0]  # (n_gen, V)
    logp = logits.to(torch.promote_types(logits.dtype, torch.float32)).log_softmax(-1)  # (n_gen, V)
    nll = -logp.gather(1, ids[0, n_prompt:, None])[:, 0]  # (n_gen,)
    (d_top,) = torch.autograd.grad(nll.sum(), x)  # (n_gen, C): row k = d nll_k / d hidden[-1][q_k]
    ent = -(logp.exp() * logp).sum(-1).detach().cpu().double().numpy()  # (n_gen,)
    with torch.no_grad():
        probs = torch.stack([attentions[il][0][:, q] for il in layers])  # (L, nh, n_gen, T)
        vn = torch.stack([vnorm[il] for il in layers]).repeat_interleave(group, dim=1)  # (L, nh, T)
        hw = np.asarray(head_weights, dtype=np.float64)  # (L, nh)
        attn = metal.host(metal.weighted_rows(probs, hw))  # (n_gen, T)
        vattn = metal.host(metal.weighted_rows(probs, hw, vn))  # (n_gen, T)
    del attentions, probs
    t1 = time.perf_counter()

    target = hidden[grad_layer]
    n_steps = len(trace.steps)
    sig = np.zeros((n_steps, n_pos))
    gnorm = np.zeros((n_steps, n_pos))
    cands = np.zeros((n_steps, n_pos), dtype=bool)
    h_step = np.zeros(n_steps)
    l_step = np.zeros(n_steps)
    live = [s for s in trace.steps if s.token_end > s.token_start]
    # Step n's gradient at hidden[-1] is d_top on its tokens' rows, zero elsewhere. Several
    # steps' backward passes run batched (vmap over grad_outputs): much faster on CPU than one
    # at a time; a chunk at a time bounds the memory (chunk x the graph's activations).
    for c in range(0, len(live), BACKWARD_CHUNK):
        chunk = live[c : c + BACKWARD_CHUNK]
        top = torch.zeros(len(chunk), *hidden[-1].shape, dtype=d_top.dtype, device=dev)  # (chunk, 1, T, C)
        for n, s in enumerate(chunk):
            top[n, 0, q[s.token_start : s.token_end]] = d_top[s.token_start : s.token_end]
        if grad_layer == n_layer:
            g = top
        else:
            (g,) = torch.autograd.grad(
                hidden[-1], target, grad_outputs=top, is_grads_batched=True, retain_graph=c + len(chunk) < len(live)
            )  # (chunk, 1, T, C)
        for s, gn in zip(chunk, metal.host(metal.grad_norm(g[:, 0]))):
            gnorm[s.index] = gn  # (T,)
    nll_np = nll.detach().cpu().double().numpy()
    for s in live:
        a, b = s.token_start, s.token_end
        h_step[s.index] = ent[a:b].mean()
        l_step[s.index] = nll_np[a:b].sum()
        cands[s.index] = candidate_mask(content, n_prompt, a)
    if live:
        i = [s.index for s in live]
        w = np.stack([aggregate_rows(attn[s.token_start : s.token_end]) for s in live])  # (n_live, T)
        on = [metal.place(x, dev) for x in (w, gnorm[i], h_step[i], cands[i])]
        sig[i] = metal.host(metal.eq7_normalized(*on))
    t2 = time.perf_counter()
    return ExactResult(
        significance=sig,
        grad_norm=gnorm,
        proxy=significance_matrix(trace, attn, vattn, content, n_prompt),
        candidates=cands,
        attn=attn,
        vattn=vattn,
        entropy=h_step,
        nll=l_step,
        n_prompt=n_prompt,
        layers=layers,
        grad_layer=grad_layer,
        timings={"forward_s": t1 - t0, "backward_s": t2 - t1, "exact_s": t2 - t0},
    )


def exact_significance(
    trace: Trace,
    model_path: str | Path | None = None,
    layers: list[int] | None = None,
    *,
    grad_layer: int | None = None,
    engine: Engine | None = None,
    head_weights: np.ndarray | None = None,
    device: str = "cpu",
) -> ExactResult:
    """Exact eq. 7 for a finished trace: the torch reference model of the trace's GGUF
    (`model_path`, default trace.model.path; cached per process), one forward pass over
    prompt + generated tokens, a backward pass per step.

    The prompt is re-tokenized with llama.cpp exactly as `sage ask` does; pass `engine`
    (same model) to reuse a loaded one. layers / head_weights: how attention is
    aggregated, as in the tracker; default: the tracking engine's own layers and weights
    when `engine` tracks, else the trace's tracked layers (or the tracker's default
    choice) with a plain mean over them and all heads. grad_layer: the gradient is taken
    w.r.t. hidden[grad_layer], the residual stream entering that layer (default: the first
    tracked layer; 0 = the embedding output). device: where the torch model runs; on "mps"
    (an Apple GPU) the reductions run as Metal kernels (sage.kernels.metal; untested in CI,
    which has no Apple GPU)."""
    path = Path(model_path or trace.model.path)
    t0 = time.perf_counter()
    model = load_model(path, device)
    t1 = time.perf_counter()
    own = engine is None
    eng = Engine(path, n_ctx=256) if own else engine
    try:
        prompt_tokens = eng.tokenize_prompt(trace.prompt, trace.problem)
        pm = map_prompt(eng, prompt_tokens, trace.prompt, trace.problem)
    finally:
        if own:
            eng.close()
    if len(prompt_tokens) != trace.prompt_tokens:
        raise SageError(
            f"the prompt is {len(prompt_tokens)} tokens with {path.name}, the trace says {trace.prompt_tokens}: "
            "another model made this trace"
        )
    tracker = engine.tracker if engine is not None else None
    if layers is None and tracker is not None:
        layers = tracker.layers
        head_weights = tracker.head_w if head_weights is None else head_weights
    elif layers is None:
        layers = trace.analysis.tracked_layers if trace.analysis is not None else default_layers(model)
    content = content_mask(pm, len(trace.tokens))
    res = exact_from_model(model, trace, prompt_tokens, content, layers, grad_layer, head_weights)
    res.timings["load_s"] = t1 - t0
    return res


# --- agreement ---------------------------------------------------------------------------


def rankdata(x: np.ndarray) -> np.ndarray:
    """1-based ranks, ties given the average of the ranks they span (scipy's 'average')."""
    x = np.asarray(x, dtype=np.float64).ravel()
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    # runs of equal values: [starts[r], starts[r + 1])
    starts = np.flatnonzero(np.r_[True, xs[1:] != xs[:-1], True])
    avg = (starts[:-1] + starts[1:] - 1) / 2.0 + 1.0  # mean of the 1-based ranks in each run
    ranks = np.empty(len(x))
    ranks[order] = np.repeat(avg, np.diff(starts))
    return ranks


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation (Pearson on average ranks); nan when either side is
    constant or there are fewer than two values."""
    a, b = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} vs {b.shape}")
    if len(a) < 2:
        return float("nan")
    ra, rb = rankdata(a) - (len(a) + 1) / 2.0, rankdata(b) - (len(b) + 1) / 2.0
    den = np.sqrt((ra * ra).sum() * (rb * rb).sum())
    return float((ra * rb).sum() / den) if den > 0 else float("nan")


def per_step_spearman(a: np.ndarray, b: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """(n_steps,) Spearman between rows of a and b over each step's candidate positions."""
    return np.array([spearman(x[m], y[m]) for x, y, m in zip(a, b, candidates)])


def proxy_agreement(trace: Trace, exact: ExactResult, proxy: np.ndarray | None = None) -> float:
    """Mean per-step Spearman between a proxy significance matrix and the exact one over
    the candidate positions (steps where it is undefined are left out; nan if all are).
    proxy: default the proxy formula on the torch model's own attention and values
    (`exact.proxy`); pass the `Observation.significance` of llama.cpp's rows to rate the
    llama.cpp path (what `sage.reference.compare.compare_on_problem` does)."""
    proxy = exact.proxy if proxy is None else proxy
    shape = (len(trace.steps), exact.n_prompt + len(trace.tokens))
    if proxy.shape != shape or exact.significance.shape != shape:
        raise ValueError(f"matrices {proxy.shape} / {exact.significance.shape} do not fit the trace {shape}")
    rho = per_step_spearman(proxy, exact.significance, exact.candidates)
    return float(np.nanmean(rho)) if np.isfinite(rho).any() else float("nan")


def tracker_proxy(engine: Engine, trace: Trace) -> np.ndarray:
    """(n_steps, n_pos) the llama.cpp path's proxy significance of `trace`, from the rows
    the tracking `engine` recorded while generating it (as inverse.analyze computes it).
    Valid until the engine generates again."""
    if engine.tracker is None:
        raise ValueError("the proxy needs the engine that generated the trace, with track=True")
    return Observation.from_engine(engine, trace, engine.tokenize_prompt(trace.prompt, trace.problem)).significance
