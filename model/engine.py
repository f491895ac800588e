"""The llama.cpp engine: load a GGUF, build the prompt, decode, generate token by token.

Built on llama-cpp-python's low-level API (llama_decode, batches, the KV memory API)
rather than `Llama.create_completion`, because sage needs a hook on every token (its
full distribution), KV-cache branching and the scheduler's eval callback.
"""

from __future__ import annotations

import codecs
import collections
import ctypes
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import llama_cpp
import numpy as np

from sage.kernels.reference import token_stats
from sage.sampling import StopMatcher, pick_token
from sage.errors import SageError
from sage.trace import Alternative, ModelInfo, TokenRecord

if TYPE_CHECKING:
    from sage.heads import SageHeads

# tokens kept per distribution: the chosen one's top-5 alternatives are always among them
TOP_K = 6
SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "qwen3", "gemma3")

SYSTEM_PROMPT = (
    "You are a careful reasoner. Solve the problem step by step: write each step on its "
    "own numbered line, then give the final answer on the last line as "
    "'The answer is <answer>.'"
)
PLAIN_PROMPT = "Question: {problem}\nAnswer: Let's think step by step.\n"
PLAIN_STOPS = ("\nQuestion:", "\n\n\n")

# llama.cpp logs through one process-wide callback. Keep the recent error lines so a
# failed load can say why, and print nothing: the terminal belongs to the Rich view.
_recent_errors: collections.deque[str] = collections.deque(maxlen=8)
_GGML_LOG_LEVEL_ERROR = 4  # enum ggml_log_level: NONE, DEBUG, INFO, WARN, ERROR (3 was WARN)


# ctypes swallows an exception raised in a callback (a KeyboardInterrupt when Ctrl-C lands
# while llama.cpp logs). The callback is C (kernels/tracker.c: sage_log) where the
# tracker library is built; this Python one, the fallback, records an interrupt it
# catches, and `_reraise_interrupt` raises it once the llama.cpp call has returned.
_interrupted = False


@llama_cpp.llama_log_callback
def _log_callback(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    global _interrupted
    try:
        if level == _GGML_LOG_LEVEL_ERROR and text:
            line = text.decode("utf-8", "replace").strip()
            if line:
                _recent_errors.append(line)
    except KeyboardInterrupt:
        _interrupted = True


def _reraise_interrupt() -> None:
    global _interrupted
    if _interrupted:
        _interrupted = False
        raise KeyboardInterrupt


def _native_log():
    """kernels/_tracker's C log callback installed, or None where it is not built."""
    try:
        from sage.kernels.tracker import native_library_path

        path = native_library_path()
        if path is None:
            return None
        lib = ctypes.CDLL(str(path))
        lib.sage_log_callback.restype = ctypes.c_void_p
        lib.sage_log_recent.restype = ctypes.c_int32
        lib.sage_log_recent.argtypes = [ctypes.c_char_p, ctypes.c_int32]
        cb = ctypes.cast(ctypes.c_void_p(lib.sage_log_callback()), llama_cpp.llama_log_callback)
        llama_cpp.llama_log_set(cb, ctypes.c_void_p(_GGML_LOG_LEVEL_ERROR))
        lib._sage_log_cb = cb  # keep it alive
        return lib
    except (OSError, AttributeError):  # an older build of the library: the Python callback
        return None


llama_cpp.llama_log_set(_log_callback, ctypes.c_void_p(0))
_log_lib = _native_log()


def _clear_log() -> None:
    _recent_errors.clear()
    if _log_lib is not None:
        _log_lib.sage_log_clear()


def _recent_log() -> list[str]:
    if _log_lib is None:
        return list(_recent_errors)
    buf = ctypes.create_string_buffer(8 * 520)
    n = _log_lib.sage_log_recent(buf, len(buf))
    lines = buf.raw[:n].decode("utf-8", "replace").split("\n")
    return [ln.strip() for ln in lines if ln.strip()]
_backend_ready = False


def _backend() -> None:
    global _backend_ready
    if not _backend_ready:
        llama_cpp.llama_backend_init()
        _backend_ready = True


def default_threads() -> int:
    """$SAGE_THREADS if set, else all cores up to 8. Two llama.cpp processes that each
    spin a thread per core on the same cores slow down many times over: give each its
    share with SAGE_THREADS."""
    env = os.environ.get("SAGE_THREADS", "").strip()
    if env:
        try:
            n = int(env)
        except ValueError:
            raise SageError(f"SAGE_THREADS={env!r} is not a number of threads") from None
        if n < 1:
            raise SageError(f"SAGE_THREADS={env!r}: give at least 1 thread")
        return n
    return max(1, min(os.cpu_count() or 1, 8))


def check_gguf_file(path: Path) -> None:
    """Refuse what is not a GGUF model, or one llama.cpp would abort on, before llama.cpp
    sees it (sage.gguf_check: header, metadata, tensor table, vocabulary; bounded
    reads, no tensor data)."""
    from sage.gguf_check import check_model

    if not path.exists():
        raise SageError(f"model file not found: {path}")
    if not path.is_file():
        raise SageError(f"model path is not a file: {path}")
    check_model(path)


@dataclass
class Sampling:
    temperature: float = 0.0  # 0 = greedy
    seed: int = 0


class Engine:
    """One loaded model and one llama.cpp context."""

    def __init__(
        self,
        path: str | Path,
        n_ctx: int = 2048,
        n_threads: int | None = None,
        n_batch: int = 512,
        n_seq_max: int = 1,
        name: str | None = None,
        flash_attn: bool = False,
        track: bool = False,
        track_layers: list[int] | None = None,
        native_tracker: bool = True,
        heads: "SageHeads | None" = None,
    ) -> None:
        """n_seq_max > 1 gives a unified KV cache whose sequences share cells, so
        branches copied with llama_memory_seq_cp reuse the prefix without recomputing it.
        track: observe attention through the eval callback (kernels/tracker).
        heads: SAGE heads (model/heads.py) for this model: their tracked layers and head
        weights configure the tracker; a sidecar made for another model is refused."""
        _backend()
        path = Path(path)
        check_gguf_file(path)
        self.path = path
        self.n_threads = n_threads or default_threads()
        self.n_batch = n_batch
        _clear_log()
        mparams = llama_cpp.llama_model_default_params()
        model = llama_cpp.llama_model_load_from_file(os.fsencode(path), mparams)
        if model and _interrupted:
            llama_cpp.llama_model_free(model)
        _reraise_interrupt()
        if not model:
            raise SageError(f"llama.cpp cannot load {path}: {self._load_reason()}")
        self.model = model
        self.vocab = llama_cpp.llama_model_get_vocab(model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        self.architecture = self.meta("general.architecture") or "unknown"
        self.n_ctx_train = llama_cpp.llama_model_n_ctx_train(model)
        self.n_layer = llama_cpp.llama_model_n_layer(model)
        self.n_head = llama_cpp.llama_model_n_head(model)
        self.n_head_kv = llama_cpp.llama_model_n_head_kv(model)
        self.n_embd = llama_cpp.llama_model_n_embd(model)
        vlen = self.meta(f"{self.architecture}.attention.value_length")
        self.head_dim_v = int(vlen) if vlen else self.n_embd // self.n_head
        self.tracker = None
        self.heads = heads
        if heads is not None:
            from sage.heads import fingerprint

            if heads.fingerprint != fingerprint(self):
                raise SageError(
                    f"the SAGE heads for {heads.base_name} do not belong to {path.name} "
                    "(fingerprint differs); use the sidecar made for this model or --heads none"
                )
        if track:
            from sage.kernels.tracker import Tracker, default_layers

            full = self.full_attention_layers()
            if heads is not None:
                layers, weights = list(heads.tracked_layers), heads.head_weights
            else:
                layers = track_layers or [full[i] for i in default_layers(len(full))]
                weights = np.full((len(layers), self.n_head), 1.0 / (len(layers) * self.n_head), dtype=np.float32)
            bad = [il for il in layers if il not in full]
            if bad:
                raise SageError(f"cannot track layers {bad}: not full-attention layers of this {self.n_layer}-layer model")
            if weights.shape != (len(layers), self.n_head):
                raise SageError(f"head weights of shape {weights.shape} do not fit {len(layers)} layers x {self.n_head} heads")
            self.tracker = Tracker(
                layers,
                weights,
                self.n_head,
                self.n_head_kv,
                self.head_dim_v,
                n_batch=n_batch,
                native=native_tracker,
            )

        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = n_ctx
        cparams.n_batch = n_batch
        cparams.n_ubatch = n_batch
        cparams.n_seq_max = n_seq_max
        cparams.kv_unified = True
        if self.tracker is not None:
            cparams.cb_eval = llama_cpp.ggml_backend_sched_eval_callback(self.tracker.callback_ptr)
            cparams.cb_eval_user_data = self.tracker.user_data
        cparams.n_threads = self.n_threads
        cparams.n_threads_batch = self.n_threads
        cparams.no_perf = True
        # attention tracking reads kq_soft_max, which only exists without flash attention
        cparams.flash_attn_type = (
            llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        )
        ctx = llama_cpp.llama_init_from_model(model, cparams)
        if _interrupted:
            if ctx:
                llama_cpp.llama_free(ctx)
            llama_cpp.llama_model_free(model)
            self.model = None
            _reraise_interrupt()
        if not ctx:
            llama_cpp.llama_model_free(model)
            self.model = None
            raise SageError(f"llama.cpp cannot create a context of {n_ctx} tokens for {path}")
        self.ctx = ctx
        self.n_ctx = llama_cpp.llama_n_ctx(ctx)
        self.memory = llama_cpp.llama_get_memory(ctx)
        self.n_seq_max = n_seq_max
        self.batch = llama_cpp.llama_batch_init(n_batch, 0, n_seq_max)
        self._pieces: dict[int, bytes] = {}
        self._piece_buf = ctypes.create_string_buffer(256)
        tmpl = llama_cpp.llama_model_chat_template(model, None)
        self.chat_template: bytes | None = tmpl or None
        from sage.text import encodable

        self.info = ModelInfo(
            name=encodable(name or self.meta("general.name") or path.stem),
            path=encodable(str(path)),
            architecture=self.architecture,
            description=self._desc(),
            size_bytes=path.stat().st_size,
            n_params=int(llama_cpp.llama_model_n_params(model)),
            n_ctx_train=int(self.n_ctx_train),
            chat_template=self.chat_template is not None,
        )

    # --- lifecycle -------------------------------------------------------------------

    def close(self) -> None:
        if getattr(self, "batch", None) is not None:
            llama_cpp.llama_batch_free(self.batch)
            self.batch = None
        if getattr(self, "ctx", None):
            llama_cpp.llama_free(self.ctx)
            self.ctx = None
        if getattr(self, "model", None):
            llama_cpp.llama_model_free(self.model)
            self.model = None

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    @staticmethod
    def _load_reason() -> str:
        recent = _recent_log()
        for line in reversed(recent):
            if "unknown model architecture" in line:
                arch = line.split("unknown model architecture:")[-1].strip().strip("'\"")
                return (
                    f"unsupported architecture {arch!r} "
                    f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
                )
        for line in reversed(recent):
            if "failed to load model" not in line:
                return line
        return "the file is corrupt or incomplete"

    # --- metadata and vocabulary ------------------------------------------------------

    def meta(self, key: str) -> str | None:
        buf = ctypes.create_string_buffer(512)
        n = llama_cpp.llama_model_meta_val_str(self.model, key.encode(), buf, len(buf))
        if n < 0:
            return None
        if n >= len(buf):
            buf = ctypes.create_string_buffer(n + 1)
            llama_cpp.llama_model_meta_val_str(self.model, key.encode(), buf, len(buf))
        return buf.value.decode("utf-8", "replace")

    def full_attention_layers(self) -> list[int]:
        """Layers whose KV cells are positions (no sliding window): the ones tracking
        can read. Gemma 3 interleaves 5 sliding-window layers with 1 global layer."""
        if llama_cpp.llama_model_n_swa(self.model) <= 0:
            return list(range(self.n_layer))
        if self.architecture in ("gemma3", "gemma3n"):
            return [il for il in range(self.n_layer) if il % 6 == 5]
        return []

    def _desc(self) -> str:
        buf = ctypes.create_string_buffer(256)
        llama_cpp.llama_model_desc(self.model, buf, len(buf))
        return buf.value.decode("utf-8", "replace")

    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
        raw = text.encode("utf-8")
        cap = len(raw) + 16
        arr = (llama_cpp.llama_token * cap)()
        n = llama_cpp.llama_tokenize(self.vocab, raw, len(raw), arr, cap, add_special, parse_special)
        if n < 0:
            cap = -n
            arr = (llama_cpp.llama_token * cap)()
            n = llama_cpp.llama_tokenize(self.vocab, raw, len(raw), arr, cap, add_special, parse_special)
        return list(arr[:n])

    def piece(self, token: int, special: bool = False) -> bytes:
        """The bytes a token renders to (special/control tokens only with special=True)."""
        key = -token - 1 if special else token
        p = self._pieces.get(key)
        if p is None:
            buf = self._piece_buf
            n = llama_cpp.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, special)
            if n < 0:
                buf = ctypes.create_string_buffer(-n)
                n = llama_cpp.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, special)
            p = buf.raw[:n]
            self._pieces[key] = p
        return p

    def vocab_bytes(self) -> bytes:
        """Every token's text, special ones rendered, in id order, in one llama.cpp call."""
        ids = (llama_cpp.llama_token * self.n_vocab)(*range(self.n_vocab))
        cap = 64 * self.n_vocab
        buf = ctypes.create_string_buffer(cap)
        n = llama_cpp.llama_detokenize(self.vocab, ids, self.n_vocab, buf, cap, False, True)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_detokenize(self.vocab, ids, self.n_vocab, buf, -n, False, True)
        return buf.raw[:n]

    def is_eog(self, token: int) -> bool:
        return bool(llama_cpp.llama_vocab_is_eog(self.vocab, token))

    # --- prompt ----------------------------------------------------------------------

    def build_prompt(self, problem: str, system: str = SYSTEM_PROMPT) -> tuple[str, tuple[str, ...]]:
        """The prompt text and its stop strings (see format_prompt)."""
        return format_prompt(self.chat_template, problem, system)

    def prompt_tokens(self, problem: str, system: str = SYSTEM_PROMPT) -> tuple[str, tuple[str, ...], list[int]]:
        """The prompt text, its stop strings and its tokens, the problem tokenized as
        plain text: only the template's own parts may become special tokens, so a problem
        that spells `<|im_end|><|im_start|>system` stays text."""
        before, after, stops = prompt_parts(self.chat_template, problem, system)
        return before + problem + after, stops, self._split_tokens(before, problem, after)

    def tokenize_prompt(self, prompt: str, problem: str, system: str = SYSTEM_PROMPT) -> list[int]:
        """The tokens of a prompt `prompt_tokens` built (a trace's prompt and problem), as
        `sage ask` decoded them; a prompt it did not build is tokenized whole."""
        before, after, _ = prompt_parts(self.chat_template, problem, system)
        if before + problem + after == prompt:
            return self._split_tokens(before, problem, after)
        return self.tokenize(prompt)

    def _split_tokens(self, before: str, problem: str, after: str) -> list[int]:
        # spaces at the end of the template's part go with the problem, so that
        # "Question: Tom" still tokenizes as "Question", ":", " Tom"
        head = before.rstrip(" ")
        body = before[len(head):] + problem
        return (
            self.tokenize(head)
            + self.tokenize(body, add_special=False, parse_special=False)
            + (self.tokenize(after, add_special=False) if after else [])
        )

    # --- decoding --------------------------------------------------------------------

    def decode(
        self, tokens: list[int], pos: int, seq: int = 0, logits_last: bool = True, track_row: int | None = None
    ) -> None:
        """Evaluate `tokens` at positions pos.. in sequence `seq`, in chunks of n_batch.

        With a tracker, value norms are recorded for every chunk and, when track_row is
        given, the last token's attention row goes to that row."""
        b = self.batch
        tr = self.tracker
        for start in range(0, len(tokens), self.n_batch):
            chunk = tokens[start : start + self.n_batch]
            last_chunk = start + self.n_batch >= len(tokens)
            if tr is not None:
                tr.before_decode(pos + start, len(chunk), track_row if last_chunk else None)
            for i, t in enumerate(chunk):
                b.token[i] = t
                b.pos[i] = pos + start + i
                b.n_seq_id[i] = 1
                b.seq_id[i][0] = seq
                b.logits[i] = 0
            if logits_last and last_chunk:
                b.logits[len(chunk) - 1] = 1
            b.n_tokens = len(chunk)
            rc = llama_cpp.llama_decode(self.ctx, b)
            _reraise_interrupt()
            if tr is not None:
                tr.pause()
                if tr.error:
                    raise SageError(f"attention tracking failed (code {tr.error}); run with --no-track")
            if rc != 0:
                raise SageError(f"llama_decode failed with code {rc} at position {pos + start}")

    def logits(self, i: int = -1) -> np.ndarray:
        """(n_vocab,) float32 view of the logits of output i of the last decode."""
        ptr = llama_cpp.llama_get_logits_ith(self.ctx, i)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))

    def reset(self) -> None:
        llama_cpp.llama_memory_clear(self.memory, True)

    def decode_batch(self, items: list[tuple[int, int, int]]) -> None:
        """One llama_decode of single tokens (token, pos, seq) for several sequences,
        logits for each; output i of `logits(i)` belongs to items[i]."""
        b = self.batch
        if len(items) > self.n_batch:
            raise SageError(f"{len(items)} branches exceed the batch size {self.n_batch}")
        for i, (t, p, s) in enumerate(items):
            b.token[i] = t
            b.pos[i] = p
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = s
            b.logits[i] = 1
        b.n_tokens = len(items)
        if self.tracker is not None:
            self.tracker.pause()
        rc = llama_cpp.llama_decode(self.ctx, b)
        if rc != 0:
            raise SageError(f"llama_decode failed with code {rc} for {len(items)} branches (context full? raise --ctx)")

    def seq_copy(self, src: int, dst: int, p0: int, p1: int) -> None:
        """Let sequence dst share src's KV cells for positions [p0, p1) (no recompute)."""
        llama_cpp.llama_memory_seq_cp(self.memory, src, dst, p0, p1)

    def seq_remove(self, seq: int, p0: int = -1, p1: int = -1) -> None:
        llama_cpp.llama_memory_seq_rm(self.memory, seq, p0, p1)

    def generate(
        self,
        prompt_tokens: list[int],
        max_tokens: int,
        sampling: Sampling | None = None,
        stop: tuple[str, ...] = (),
    ) -> "Generation":
        return Generation(self, prompt_tokens, max_tokens, sampling or Sampling(), stop)


# stands for the problem while the template is applied (no template contains it)
_PLACEHOLDER = "\u2063sage-problem-7f3a\u2063"


def prompt_parts(
    chat_template: bytes | None, problem: str, system: str = SYSTEM_PROMPT
) -> tuple[str, str, tuple[str, ...]]:
    """(the prompt before the problem, after it, the stop strings): format_prompt's
    prompt is before + problem + after."""
    text, stops = format_prompt(chat_template, _PLACEHOLDER, system)
    if text.count(_PLACEHOLDER) == 1:
        before, after = text.split(_PLACEHOLDER)
        return before, after, stops
    # a template that does something else with the content: find the problem in its output
    text, stops = format_prompt(chat_template, problem, system)
    i = text.rfind(problem)
    return (text[:i], text[i + len(problem):], stops) if i >= 0 else (text, "", stops)


def format_prompt(
    chat_template: bytes | None, problem: str, system: str = SYSTEM_PROMPT
) -> tuple[str, tuple[str, ...]]:
    """The prompt text and its stop strings: the GGUF's chat template when it has one
    llama.cpp knows, else a plain step-by-step prompt for base models."""
    if chat_template is not None:
        roles = [(b"system", system.encode()), (b"user", problem.encode())]
        msgs = (llama_cpp.llama_chat_message * len(roles))()
        for m, (role, content) in zip(msgs, roles):
            m.role, m.content = role, content
        n = llama_cpp.llama_chat_apply_template(chat_template, msgs, len(roles), True, None, 0)
        if n > 0:
            buf = ctypes.create_string_buffer(n + 1)
            llama_cpp.llama_chat_apply_template(chat_template, msgs, len(roles), True, buf, len(buf))
            return buf.raw[:n].decode("utf-8", "replace"), ()
    return PLAIN_PROMPT.format(problem=problem), PLAIN_STOPS


class Generation:
    """Iterate to generate; each item is a TokenRecord. `finish_reason` is set when the
    iteration ends: "stop" (end-of-generation token or stop string), "length"
    (max_tokens), "context" (the context is full)."""

    def __init__(
        self, engine: Engine, prompt_tokens: list[int], max_tokens: int, sampling: Sampling, stop: tuple[str, ...]
    ) -> None:
        if not prompt_tokens:
            raise SageError("the prompt is empty")
        if len(prompt_tokens) >= engine.n_ctx:
            raise SageError(
                f"the prompt is {len(prompt_tokens)} tokens but the context holds {engine.n_ctx}; "
                "shorten the problem or raise --ctx"
            )
        self.engine = engine
        self.prompt_tokens = prompt_tokens
        self.max_tokens = max_tokens
        self.sampling = sampling
        self.stop = stop
        self.finish_reason: str | None = None
        self.text = ""

    def __iter__(self) -> Iterator[TokenRecord]:
        eng = self.engine
        eng.reset()
        if eng.tracker is not None:
            eng.tracker.allocate(eng.n_ctx, min(self.max_tokens, eng.n_ctx) + 1)  # the context ends it anyway
        # row k of the tracker: the query that produced generated token k
        eng.decode(self.prompt_tokens, 0, track_row=0)
        pos = len(self.prompt_tokens)
        k = 0
        rng = np.random.default_rng(self.sampling.seed)
        temp = self.sampling.temperature
        utf8 = codecs.getincrementaldecoder("utf-8")("replace")
        stops = StopMatcher(self.stop)
        for _ in range(self.max_tokens):
            logits = eng.logits(-1)
            st = token_stats(logits, TOP_K)
            tok = pick_token(logits, st.ids_top[0], temp, rng)
            if eng.is_eog(tok):
                self.finish_reason = "stop"
                return
            piece = utf8.decode(eng.piece(tok))
            self.text += piece
            yield TokenRecord(
                id=tok,
                text=piece,
                logprob=float(logits[tok]) - st.log_z,
                entropy=st.entropy,
                varentropy=st.varentropy,
                top=[
                    Alternative(int(i), eng.piece(int(i)).decode("utf-8", "replace"), float(np.exp(lp)))
                    for i, lp in zip(st.ids_top, st.logprobs_top)
                ],
            )
            if stops and stops.hit(self.text):
                self.finish_reason = "stop"
                return
            if pos + 1 >= eng.n_ctx:
                self.finish_reason = "context"
                return
            k += 1
            eng.decode([tok], pos, track_row=k)
            pos += 1
        self.finish_reason = "length"
