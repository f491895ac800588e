/*
 * sage attention tracker: llama.cpp's scheduler eval callback, in C.
 *
 * The callback is invoked for every node of every graph llama.cpp computes (hundreds
 * per token); a Python callback alone costs ~15 % of tokens/s on a small model. This
 * one answers "do you want this tensor?" with a string compare and, for the few
 * tensors it asked for, copies out the rows it needs:
 *
 *   Vcur-<layer>         (RESHAPE node)  value vectors of the ubatch's tokens: their
 *                                         per-KV-head L2 norms are kept per position;
 *   kq_soft_max-<layer>                   attention probabilities [n_kv, n_tokens, n_head]:
 *                                         the last token's row of every tracked head,
 *                                         over the valid KV cells only (the view is
 *                                         padded; padded cells are masked to 0).
 *
 * It accumulates, for the current row (the query that produced one generated token):
 *   attn[row][c]  = sum_{tracked (l,h)} w_lh * a_lh[c]
 *   vattn[row][c] = sum_{tracked (l,h)} w_lh * a_lh[c] * |v_{l, kvhead(h)}[c]|
 *
 * It does not link against libggml: the three ggml functions it needs are passed in
 * as pointers from Python (whatever libggml llama-cpp-python loaded), and only the
 * long-stable head of struct ggml_tensor (type, buffer, ne, nb) is read directly.
 * Reference twin: kernels/tracker.py (PythonTracker), tested for identical numbers.
 */

#include <math.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

struct ggml_tensor_head {
    int32_t type;
    void *buffer;
    int64_t ne[4];
    size_t nb[4];
};

typedef void (*tensor_get_fn)(const void *t, void *data, size_t offset, size_t size);
typedef const char *(*str_fn)(const void *t);

#define SAGE_MAX_LAYERS 512

typedef struct {
    /* ggml functions, from Python */
    tensor_get_fn tensor_get;
    str_fn get_name;
    str_fn op_desc;
    /* model shape */
    int32_t n_head, n_head_kv, head_dim;
    int32_t n_slots;
    int32_t layer_slot[SAGE_MAX_LAYERS]; /* -1: not tracked */
    const float *head_w;                 /* [n_slots][n_head] */
    /* buffers, owned by Python (numpy) */
    float *vnorm;                        /* [n_slots][n_head_kv][n_cells] */
    float *attn, *vattn;                 /* [n_rows][n_cells] */
    float *scratch;                      /* >= n_scratch floats */
    int64_t n_scratch;
    int32_t n_cells, n_rows;
    /* per decode, set by Python */
    int32_t capture_v, capture_attn;
    int32_t row, pos0, n_valid;
    /* diagnostics */
    int32_t n_attn_seen, n_v_seen, error;
} sage_tracker;

/* "kq_soft_max-12" -> 12 if name has the prefix, else -1 */
static int layer_of(const char *name, const char *prefix, size_t n) {
    if (strncmp(name, prefix, n) != 0) return -1;
    const char *p = name + n;
    if (*p < '0' || *p > '9') return -1;
    int il = 0;
    while (*p >= '0' && *p <= '9') il = il * 10 + (*p++ - '0');
    return *p == '\0' ? il : -1;
}

static int tracked_slot(const sage_tracker *tr, int il) {
    return (il >= 0 && il < SAGE_MAX_LAYERS) ? tr->layer_slot[il] : -1;
}

static void take_vcur(sage_tracker *tr, const struct ggml_tensor_head *t, int slot) {
    const int64_t per_tok = (int64_t)tr->n_head_kv * tr->head_dim;
    const int64_t nel = t->ne[0] * t->ne[1] * t->ne[2] * t->ne[3];
    if (per_tok <= 0 || nel % per_tok != 0 || t->nb[0] != sizeof(float)) { tr->error = 1; return; }
    const int64_t n_tok = nel / per_tok;
    if (nel > tr->n_scratch) { tr->error = 2; return; }
    tr->tensor_get(t, tr->scratch, 0, (size_t)nel * sizeof(float));
    for (int64_t i = 0; i < n_tok; i++) {
        const int64_t pos = tr->pos0 + i;
        if (pos < 0 || pos >= tr->n_cells) continue;
        for (int g = 0; g < tr->n_head_kv; g++) {
            const float *v = tr->scratch + i * per_tok + (int64_t)g * tr->head_dim;
            double s = 0.0;
            for (int d = 0; d < tr->head_dim; d++) s += (double)v[d] * v[d];
            tr->vnorm[((int64_t)slot * tr->n_head_kv + g) * tr->n_cells + pos] = (float)sqrt(s);
        }
    }
    tr->n_v_seen++;
}

static void take_attn(sage_tracker *tr, const struct ggml_tensor_head *t, int slot) {
    const int64_t n_kv = t->ne[0], n_tok = t->ne[1], n_head = t->ne[2];
    const int32_t n = tr->n_valid;
    if (n_head != tr->n_head || n > n_kv || n > tr->n_cells || tr->row < 0 || tr->row >= tr->n_rows ||
        t->nb[0] != sizeof(float) || n > tr->n_scratch) {
        tr->error = 3;
        return;
    }
    float *a_row = tr->attn + (int64_t)tr->row * tr->n_cells;
    float *v_row = tr->vattn + (int64_t)tr->row * tr->n_cells;
    const int group = tr->n_head / tr->n_head_kv;
    for (int h = 0; h < tr->n_head; h++) {
        const float w = tr->head_w[(int64_t)slot * tr->n_head + h];
        if (w == 0.0f) continue;
        const size_t off = (size_t)(n_tok - 1) * t->nb[1] + (size_t)h * t->nb[2];
        tr->tensor_get(t, tr->scratch, off, (size_t)n * sizeof(float));
        const float *vn = tr->vnorm + ((int64_t)slot * tr->n_head_kv + h / group) * tr->n_cells;
        for (int c = 0; c < n; c++) {
            const float a = w * tr->scratch[c];
            a_row[c] += a;
            v_row[c] += a * vn[c];
        }
    }
    tr->n_attn_seen++;
}

bool sage_tracker_eval(void *tensor, bool ask, void *user_data) {
    sage_tracker *tr = (sage_tracker *)user_data;
    if (!tr->capture_v && !tr->capture_attn) return ask ? false : true;
    const char *name = tr->get_name(tensor);
    int il = layer_of(name, "kq_soft_max-", 12);
    if (il >= 0) {
        int slot = tracked_slot(tr, il);
        if (slot < 0 || !tr->capture_attn) return ask ? false : true;
        if (ask) return true;
        take_attn(tr, (const struct ggml_tensor_head *)tensor, slot);
        return true;
    }
    il = layer_of(name, "Vcur-", 5);
    if (il >= 0) {
        int slot = tracked_slot(tr, il);
        /* several nodes carry this name; the RESHAPE is the final value (after bias) */
        if (slot < 0 || strcmp(tr->op_desc(tensor), "RESHAPE") != 0) return ask ? false : true;
        if (ask) return true;
        take_vcur(tr, (const struct ggml_tensor_head *)tensor, slot);
        return true;
    }
    return ask ? false : true;
}

/* the address of the callback, for llama_context_params.cb_eval */
void *sage_tracker_callback(void) { return (void *)&sage_tracker_eval; }

int32_t sage_tracker_sizeof(void) { return (int32_t)sizeof(sage_tracker); }

/* llama.cpp's log callback, in C. A Python callback can be interrupted by Ctrl-C at its
   first bytecode, and ctypes swallows the KeyboardInterrupt; this one cannot be. It keeps
   the last SAGE_LOG_LINES lines logged at the level given as user_data, for the message
   of a failed load (sage_log_recent), and prints nothing. */
#define SAGE_LOG_LINES 8
#define SAGE_LOG_LEN 512
static char sage_log_lines[SAGE_LOG_LINES][SAGE_LOG_LEN];
static int64_t sage_log_count = 0;

static void sage_log(int level, const char *text, void *user_data) {
    if (level != (int)(intptr_t)user_data || text == NULL || text[0] == '\0') return;
    char *dst = sage_log_lines[sage_log_count % SAGE_LOG_LINES];
    strncpy(dst, text, SAGE_LOG_LEN - 1);
    dst[SAGE_LOG_LEN - 1] = '\0';
    sage_log_count++;
}

void *sage_log_callback(void) { return (void *)&sage_log; }

void sage_log_clear(void) { sage_log_count = 0; }

/* the kept lines, oldest first, each ending in '\n'; the number of bytes written */
int32_t sage_log_recent(char *out, int32_t cap) {
    int32_t n = 0;
    int64_t first = sage_log_count > SAGE_LOG_LINES ? sage_log_count - SAGE_LOG_LINES : 0;
    for (int64_t i = first; i < sage_log_count; i++) {
        const char *line = sage_log_lines[i % SAGE_LOG_LINES];
        size_t len = strlen(line);
        if (n + (int32_t)len + 1 >= cap) break;
        memcpy(out + n, line, len);
        n += (int32_t)len;
        if (len == 0 || line[len - 1] != '\n') out[n++] = '\n';
    }
    return n;
}
