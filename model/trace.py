"""The reasoning trace: what one `sage ask` run produced, as versioned JSON.

The dataclasses are the in-memory form; `TRACE_SCHEMA` (a JSON Schema, draft 2020-12
subset) is the contract for the file. `load_trace` validates a file against it with
jsonschema, so a corrupt or foreign file is refused with one clear line
instead of failing somewhere in a view.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sage.paths import write_text_atomic

SCHEMA_NAME = "sage.trace"
SCHEMA_VERSION = 3
# versions load_trace still reads (version 2: one greedy rollout per alternative, no
# outcome distributions; its analyses load with outcomes None)
READABLE_VERSIONS = (2, 3)


class TraceError(ValueError):
    """A trace file that is missing, not JSON, or not a sage trace of this version."""


@dataclass
class Alternative:
    id: int
    text: str
    prob: float


@dataclass
class TokenRecord:
    """One generated token and the uncertainty of the distribution it was drawn from."""

    id: int
    text: str  # decoded text this token added to the output ("" mid UTF-8 sequence)
    logprob: float  # log p of the chosen token under the model (temperature 1)
    entropy: float  # nats
    varentropy: float  # nats^2
    top: list[Alternative]  # the 6 most probable tokens, most probable first

    @property
    def prob(self) -> float:
        return math.exp(self.logprob)


@dataclass
class Step:
    index: int
    text: str
    char_start: int  # span in Trace.text
    char_end: int
    token_start: int  # span in Trace.tokens, end exclusive
    token_end: int
    kind: str  # "numbered" | "sentence" | "block" | "think"
    confidence: float  # geometric mean of the step's token probabilities


@dataclass
class Answer:
    text: str  # the answer as written in the output
    value: str | None  # normalized: "72", "-3.5", "B"; None when none was found
    kind: str  # "number" | "option" | "none"
    char_start: int
    char_end: int
    confidence: float | None  # geometric mean of the answer tokens' probabilities
    expected: str = "number"  # what the problem asks for: "number" | "option" | "open" (no short answer)
    note: str | None = None  # a caveat: the option letter disagrees with the value written beside it


@dataclass
class AnswerCount:
    value: str  # normalized answer
    n: int  # samples that reached it


@dataclass
class Outcome:
    """The outcome distribution of a branch: the final answers of `n` continuations
    sampled from the model itself after a prefix of the chain (plus a forced token)."""

    prefix: int  # generated tokens of the chain before the branch
    forced: int | None  # the token put after the prefix (None: the model samples from there)
    answers: list[AnswerCount]  # most frequent first
    none: int  # samples that gave no answer
    n: int  # samples
    tokens: int  # tokens decoded for them (forced tokens included)
    stop: str  # "settled" (the stopping rule), "max" (most samples), "budget"
    leader: str | None  # the most frequent answer (None: "no answer" leads or no samples)
    share: float  # its share of the n samples
    interval: list[float]  # 90 % Wilson interval of that share
    example: str  # one sample's continuation text (the first)

    def count(self, value: str | None) -> int:
        if value is None:
            return self.none
        return next((a.n for a in self.answers if a.value == value), 0)

    def share_of(self, value: str | None) -> float:
        return self.count(value) / self.n if self.n else 0.0


@dataclass
class Outcomes:
    """The sampled analysis of a chain: how the answer distribution moves along it."""

    sampling: dict[str, Any]  # temperature, top_k, top_p, seed of the samples
    rule: str  # the sequential stopping rule, in words
    budget: int  # tokens allowed
    spent: int  # tokens decoded
    start: Outcome | None  # from the prompt alone: self-consistency
    steps: list[Outcome | None]  # after each step of the chain (None: not sampled, budget)
    movement: list[float | None]  # total-variation distance of step i's distribution from the last sampled one before it
    movement_p: list[float | None]  # permutation p-value of that distance (small: not chance)
    anchors: list[int]  # steps where the distribution moved most
    proposed: int  # candidate tokens the heads and the entropy proposed in the anchor steps
    measured: int  # of those, how many got outcome distributions
    vote: str | None  # the majority answer at the start (None: no answer leads)
    parallel: int  # sequences decoded together


@dataclass
class Branch:
    """An alternative token at a decision point: forced after the chain's prefix, then
    continuations sampled from the model (its outcome distribution; schema 2: one greedy
    rollout)."""

    token_id: int
    token_text: str
    prob: float  # probability the model gave the alternative at the decision point
    text: str  # the forced token's text and everything generated after it
    token_ids: list[int]  # the forced token and the generated ones
    answer: str | None  # normalized answer the branch reaches (None: none found)
    changed: bool  # the answer differs from the chosen path's
    n_tokens: int
    finish_reason: str  # "stop" | "length" | "context"
    mean_logprob: float  # mean log-probability of the branch's own generated tokens
    outcome: Outcome | None = None  # its sampled outcome distribution (text etc. are its example's)


@dataclass
class Dependency:
    """An earlier token a decision's steps depended on (eq. 7 significance, normalized)."""

    position: int  # position in the full sequence (prompt + output)
    text: str
    source: str  # "prompt" | "output"
    weight: float  # normalized significance in [0, 1]


@dataclass
class Decision:
    rank: int  # 1 = strongest after any refinement
    token_index: int  # index into Trace.tokens
    position: int  # position in the full sequence
    step: int  # index of the step that contains the token
    text: str
    prob: float  # probability of the chosen token
    entropy: float  # nats, of the distribution the token was drawn from
    significance: float  # max normalized eq. 7 significance over the dependent steps
    score: float  # the ranking score: significance x (1 - prob) with analytic heads, the trained heads' decision score otherwise
    dependents: list[int]  # steps whose significance for this token >= threshold
    merged: int  # other candidate tokens of the same step merged into this one
    alternatives: list[Alternative]  # the 5 most probable tokens other than the chosen one
    branches: list[Branch]  # rollouts of the strongest alternatives
    dependencies: list[Dependency]  # what the dependent steps attended to most
    confirmed: bool | None  # the fork was measured and is one (None: nothing measured)
    # with sampled outcomes: the chosen token's outcome distribution, and the fork score
    # (probability-weighted total-variation distance of the alternatives' distributions
    # from it, DESIGN.md); None when not measured or in schema-2 traces
    outcome: Outcome | None = None
    fork: float | None = None
    fork_p: float | None = None  # permutation p-value: chosen vs the alternatives' samples pooled


@dataclass
class Explanation:
    """The paper's four parts, each a list of sentences built from measured facts."""

    justification: list[str]
    alternatives: list[str]
    confidence: list[str]
    dependencies: list[str]


@dataclass
class Analysis:
    heads: str  # which SAGE heads scored the decisions and the confidence
    tracked_layers: list[int]
    tracker: str  # "native" | "python"
    proxy: str  # how the gradient factor of eq. 7 was estimated
    threshold: float  # candidates' least normalized significance (analytic heads) or decision score (trained)
    max_decisions: int
    alternatives: int  # rollouts per decision point
    candidates: int  # tokens at or above the threshold before merging
    decisions: list[Decision]
    consistency: float | None  # share of decision points confirmed by rollouts
    refined: bool
    notes: list[str]
    answer_confidence: float | None
    explanation: Explanation
    timings: dict[str, float]
    # with `sage ask --exact`: the significance came from exact eq. 7 (torch reference
    # model) and this holds spearman_vs_proxy (mean per-step Spearman of the llama.cpp
    # proxy against it; None where undefined) and its times exact_s, forward_s,
    # backward_s, load_s. None otherwise, and in traces made before it existed.
    exact: dict[str, float | None] | None = None
    outcomes: Outcomes | None = None  # sampled outcome distributions (schema 3)
    # with trained heads whose meta-cognitive head was fitted (sampled analysis):
    # answer_confidence is that head's estimate of P(the answer is right) from the
    # samples; this holds the samples' own share ("share") and what the sidecar measured
    # on held-out answers: "ece", "answers" (how many), "right" (of them). None otherwise.
    calibration: dict[str, float | None] | None = None


@dataclass
class ModelInfo:
    name: str
    path: str
    architecture: str
    description: str
    size_bytes: int
    n_params: int
    n_ctx_train: int
    chat_template: bool


@dataclass
class Settings:
    temperature: float
    seed: int
    max_tokens: int
    n_ctx: int
    n_threads: int


@dataclass
class Trace:
    problem: str
    prompt: str
    prompt_tokens: int
    model: ModelInfo
    settings: Settings
    tokens: list[TokenRecord] = field(default_factory=list)
    text: str = ""
    steps: list[Step] = field(default_factory=list)
    answer: Answer | None = None
    finish_reason: str = "length"  # "stop" | "length" | "context" | "interrupted"
    analysis: Analysis | None = None
    timings: dict[str, float] = field(default_factory=dict)
    created: str = ""
    sage_version: str = ""

    def to_dict(self) -> dict[str, Any]:
        d = {"schema": SCHEMA_NAME, "version": SCHEMA_VERSION}
        d.update(asdict(self))
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Trace":
        validate(d, TRACE_SCHEMA)
        d = known_keys(d, TRACE_SCHEMA)  # keys a newer minor version added are ignored
        tokens = [
            TokenRecord(**{**t, "top": [Alternative(**a) for a in t["top"]]}) for t in d["tokens"]
        ]
        return cls(
            problem=d["problem"],
            prompt=d["prompt"],
            prompt_tokens=d["prompt_tokens"],
            model=ModelInfo(**d["model"]),
            settings=Settings(**d["settings"]),
            tokens=tokens,
            text=d["text"],
            steps=[Step(**s) for s in d["steps"]],
            answer=Answer(**d["answer"]) if d["answer"] is not None else None,
            analysis=_analysis_from_dict(d["analysis"]) if d["analysis"] is not None else None,
            finish_reason=d["finish_reason"],
            timings=dict(d["timings"]),
            created=d["created"],
            sage_version=d["sage_version"],
        )


def _outcome(o: dict[str, Any] | None) -> Outcome | None:
    if o is None:
        return None
    return Outcome(**{**o, "answers": [AnswerCount(**x) for x in o["answers"]]})


def _analysis_from_dict(a: dict[str, Any]) -> Analysis:
    decisions = [
        Decision(
            **{
                **dd,
                "alternatives": [Alternative(**x) for x in dd["alternatives"]],
                "branches": [Branch(**{**b, "outcome": _outcome(b.get("outcome"))}) for b in dd["branches"]],
                "dependencies": [Dependency(**x) for x in dd["dependencies"]],
                "outcome": _outcome(dd.get("outcome")),
            }
        )
        for dd in a["decisions"]
    ]
    outcomes = None
    if a.get("outcomes") is not None:
        o = a["outcomes"]
        outcomes = Outcomes(**{**o, "start": _outcome(o["start"]), "steps": [_outcome(x) for x in o["steps"]]})
    return Analysis(**{**a, "decisions": decisions, "explanation": Explanation(**a["explanation"]),
                       "outcomes": outcomes})


# --- schema ------------------------------------------------------------------------

_num = {"type": "number"}
_int = {"type": "integer"}
_str = {"type": "string"}


def _obj(props: dict[str, Any], optional: dict[str, Any] | None = None) -> dict[str, Any]:
    """An object with the keys of `props` required and those of `optional` allowed."""
    return {"type": "object", "required": list(props), "properties": {**props, **(optional or {})}}


_alt = _obj({"id": _int, "text": _str, "prob": _num})
_opt_num = {"type": ["number", "null"]}
OUTCOME_SCHEMA: dict[str, Any] = _obj(
    {
        "prefix": _int,
        "forced": {"type": ["integer", "null"]},
        "answers": {"type": "array", "items": _obj({"value": _str, "n": _int})},
        "none": _int,
        "n": _int,
        "tokens": _int,
        "stop": {"enum": ["settled", "max", "budget"]},
        "leader": {"type": ["string", "null"]},
        "share": _num,
        "interval": {"type": "array", "items": _num, "minItems": 2, "maxItems": 2},
        "example": _str,
    }
)
_opt_outcome = {"anyOf": [{"type": "null"}, OUTCOME_SCHEMA]}
OUTCOMES_SCHEMA: dict[str, Any] = _obj(
    {
        "sampling": {"type": "object"},
        "rule": _str,
        "budget": _int,
        "spent": _int,
        "start": _opt_outcome,
        "steps": {"type": "array", "items": _opt_outcome},
        "movement": {"type": "array", "items": _opt_num},
        "movement_p": {"type": "array", "items": _opt_num},
        "anchors": {"type": "array", "items": _int},
        "proposed": _int,
        "measured": _int,
        "vote": {"type": ["string", "null"]},
        "parallel": _int,
    }
)
_strs = {"type": "array", "items": _str}
_ints = {"type": "array", "items": _int}
EXACT_SCHEMA: dict[str, Any] = {
    **_obj({"spearman_vs_proxy": {"type": ["number", "null"]}, "exact_s": _num, "load_s": _num}),
    "additionalProperties": _num,
}
ANALYSIS_SCHEMA: dict[str, Any] = _obj(
    {
        "heads": _str,
        "tracked_layers": _ints,
        "tracker": {"enum": ["native", "python"]},
        "proxy": _str,
        "threshold": _num,
        "max_decisions": _int,
        "alternatives": _int,
        "candidates": _int,
        "decisions": {
            "type": "array",
            "items": _obj(
                {
                    "rank": _int,
                    "token_index": _int,
                    "position": _int,
                    "step": _int,
                    "text": _str,
                    "prob": _num,
                    "entropy": _num,
                    "significance": _num,
                    "score": _num,
                    "dependents": _ints,
                    "merged": _int,
                    "alternatives": {"type": "array", "items": _alt},
                    "branches": {
                        "type": "array",
                        "items": _obj(
                            {
                                "token_id": _int,
                                "token_text": _str,
                                "prob": _num,
                                "text": _str,
                                "token_ids": _ints,
                                "answer": {"type": ["string", "null"]},
                                "changed": {"type": "boolean"},
                                "n_tokens": _int,
                                "finish_reason": {"enum": ["stop", "length", "context"]},
                                "mean_logprob": _num,
                            },
                            optional={"outcome": _opt_outcome},
                        ),
                    },
                    "dependencies": {
                        "type": "array",
                        "items": _obj(
                            {"position": _int, "text": _str, "source": {"enum": ["prompt", "output"]}, "weight": _num}
                        ),
                    },
                    "confirmed": {"type": ["boolean", "null"]},
                },
                optional={"outcome": _opt_outcome, "fork": _opt_num, "fork_p": _opt_num},
            ),
        },
        "consistency": {"type": ["number", "null"]},
        "refined": {"type": "boolean"},
        "notes": _strs,
        "answer_confidence": {"type": ["number", "null"]},
        "explanation": _obj(
            {"justification": _strs, "alternatives": _strs, "confidence": _strs, "dependencies": _strs}
        ),
        "timings": {"type": "object", "additionalProperties": _num},
    },
    # optional, so that traces from before `--exact` still load
    optional={"exact": {"anyOf": [{"type": "null"}, EXACT_SCHEMA]},
              "outcomes": {"anyOf": [{"type": "null"}, OUTCOMES_SCHEMA]},
              "calibration": {"anyOf": [{"type": "null"}, _obj({"share": _num}, optional={
                  "ece": _opt_num, "answers": _opt_num, "right": _opt_num, "chain": _opt_num})]}},
)

TRACE_SCHEMA: dict[str, Any] = _obj(
    {
        "schema": {"const": SCHEMA_NAME},
        "version": {"enum": list(READABLE_VERSIONS)},
        "problem": _str,
        "prompt": _str,
        "prompt_tokens": _int,
        "model": _obj(
            {
                "name": _str,
                "path": _str,
                "architecture": _str,
                "description": _str,
                "size_bytes": _int,
                "n_params": _int,
                "n_ctx_train": _int,
                "chat_template": {"type": "boolean"},
            }
        ),
        "settings": _obj(
            {"temperature": _num, "seed": _int, "max_tokens": _int, "n_ctx": _int, "n_threads": _int}
        ),
        "tokens": {
            "type": "array",
            "items": _obj(
                {
                    "id": _int,
                    "text": _str,
                    "logprob": _num,
                    "entropy": _num,
                    "varentropy": _num,
                    "top": {"type": "array", "items": _alt},
                }
            ),
        },
        "text": _str,
        "steps": {
            "type": "array",
            "items": _obj(
                {
                    "index": _int,
                    "text": _str,
                    "char_start": _int,
                    "char_end": _int,
                    "token_start": _int,
                    "token_end": _int,
                    "kind": {"enum": ["numbered", "sentence", "block", "think"]},
                    "confidence": _num,
                }
            ),
        },
        "answer": {
            "anyOf": [
                {"type": "null"},
                _obj(
                    {
                        "text": _str,
                        "value": {"type": ["string", "null"]},
                        "kind": {"enum": ["number", "option", "none"]},
                        "char_start": _int,
                        "char_end": _int,
                        "confidence": {"type": ["number", "null"]},
                    },
                    {"expected": {"enum": ["number", "option", "open"]}, "note": {"type": ["string", "null"]}},
                ),
            ]
        },
        "finish_reason": {"enum": ["stop", "length", "context", "interrupted"]},
        "analysis": {"anyOf": [{"type": "null"}, ANALYSIS_SCHEMA]},
        "timings": {"type": "object", "additionalProperties": _num},
        "created": _str,
        "sage_version": _str,
    }
)

def validate(value: Any, schema: dict[str, Any]) -> None:
    """Check `value` against a JSON Schema (jsonschema); raise TraceError naming the
    offending path, e.g. `$.analysis.decisions[0].prob: 'x' is not of type 'number'`."""
    from jsonschema import Draft202012Validator
    from jsonschema.exceptions import best_match

    err = best_match(Draft202012Validator(schema).iter_errors(value))
    if err is None:
        return
    where = "$" + "".join(f"[{k}]" if isinstance(k, int) else f".{k}" for k in err.absolute_path)
    msg = err.message if len(err.message) <= 160 else err.message[:157] + "..."
    raise TraceError(f"{where}: {msg}")


# --- files -------------------------------------------------------------------------


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to `path` through a temp file in the same directory and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(data, ensure_ascii=False, indent=1) + "\n")


def save_trace(trace: Trace, home: Path) -> Path:
    """Save under `home/traces/` and as `home/last.json`; return the trace's own path."""
    from sage.paths import write_new

    data = trace.to_dict()
    stamp = trace.created.replace(":", "").replace("-", "").replace("+0000", "Z")
    # exclusive create: two runs with the same timestamp get two files
    path = write_new(home / "traces", stamp, ".json", json.dumps(data, ensure_ascii=False, indent=1) + "\n")
    write_json_atomic(home / "last.json", data)
    return path


def load_trace(path: Path) -> Trace:
    """Read and validate a trace file; raise TraceError with a one-line reason (the only
    exception it raises, whatever the file holds)."""
    p = Path(path)
    try:
        if p.exists() and not p.is_file():
            raise TraceError(f"{path} is not a file")
        if p.exists() and p.stat().st_size > MAX_TRACE_BYTES:
            raise TraceError(f"{path} is {p.stat().st_size} bytes, too large for a trace")
        raw = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TraceError(f"no trace at {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise TraceError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from None
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as e:
        raise TraceError(f"{path} is not valid JSON (line {e.lineno}: {e.msg})") from None
    except (ValueError, RecursionError) as e:  # a 5000-digit integer, [[[[... nested too deep
        raise TraceError(f"{path} is not a sage trace ({str(e).split(':')[0].split(';')[0]})") from None
    if not isinstance(data, dict) or data.get("schema") != SCHEMA_NAME:
        raise TraceError(f"{path} is not a sage trace")
    if data.get("version") not in READABLE_VERSIONS:
        raise TraceError(
            f"{path} is a sage trace of version {data.get('version')!r}; "
            f"this sage reads versions {', '.join(map(str, READABLE_VERSIONS))}"
        )
    try:
        trace = Trace.from_dict(data)
        check_spans(trace)
        return trace
    except TraceError as e:
        raise TraceError(f"{path} is not a valid sage trace: {e}") from None
    except (TypeError, ValueError, KeyError, IndexError, AttributeError, RecursionError) as e:
        raise TraceError(f"{path} is not a valid sage trace ({type(e).__name__})") from None


MAX_TRACE_BYTES = 1 << 30


def known_keys(value: Any, schema: dict[str, Any]) -> Any:
    """`value` without the object keys `schema` does not name, at every depth (objects
    that allow additionalProperties, like timings, are kept whole), so that the
    dataclasses are built from the fields they have."""
    if isinstance(value, dict):
        for sub in schema.get("anyOf", ()):
            if sub.get("type") == "object":
                return known_keys(value, sub)
        props = schema.get("properties")
        if props is None or "additionalProperties" in schema:
            return value
        return {k: known_keys(v, props[k]) for k, v in value.items() if k in props}
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        return [known_keys(v, schema["items"]) for v in value]
    return value


def check_spans(trace: Trace) -> None:
    """The indices a trace holds point into it (the schema checks types, not this)."""
    n_tok, n_text = len(trace.tokens), len(trace.text)
    for s in trace.steps:
        if not (0 <= s.token_start <= s.token_end <= n_tok and 0 <= s.char_start <= s.char_end <= n_text):
            raise TraceError(f"step {s.index} spans outside the output")
    a = trace.answer
    if a is not None and not 0 <= a.char_start <= a.char_end <= n_text:
        raise TraceError("the answer spans outside the output")
    for d in trace.analysis.decisions if trace.analysis is not None else []:
        if not 0 <= d.token_index < n_tok:
            raise TraceError(f"decision {d.rank} points outside the output (token {d.token_index})")
