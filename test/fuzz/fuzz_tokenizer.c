/* fuzz_tokenizer — libFuzzer harness: the input is one selector byte and a text. The selector
   picks a vocabulary (small byte-level ones with and without NFC, a SentencePiece-style one with
   byte fallback, the bundled model's, and the real Qwen3, Gemma 3 and gpt-oss vocabularies when
   test/fetch_vocabs.sh has fetched them) and the flags (both special-token modes, ADD_SPECIAL).
   Checked: tokenize never fails on any bytes, every id is in the vocabulary, and the round trip
   holds up to normalization: y = detokenize(tokenize(x)) is a fixed point, and y == x for the
   vocabularies that do not normalize. Seeds: build/fuzz/make_seeds. */
#include "fuzz_common.h"

typedef struct vocab { const char *path; int vocab_only, exact; moe_model *m; } vocab;
static vocab g_v[] = {
    {"build/fuzz/models/tok_raw.json", 1, 1, NULL},       /* byte-level, Llama-3 split, no normalizer */
    {"build/fuzz/models/tok_bytes.json", 1, 0, NULL},     /* byte-level, Qwen2 split, NFC */
    {"build/fuzz/models/tok_spm.json", 1, 0, NULL},       /* SentencePiece-style, U+2581, byte fallback */
    {"examples/models/tiny-moe-kjv-q8_0.gguf", 1, 0, NULL}, /* trained BPE, NFC */
    {".cache/vocabs/qwen3/tokenizer.json", 1, 0, NULL},
    {".cache/vocabs/gemma3/tokenizer.json", 1, 0, NULL},
    {".cache/vocabs/gptoss/tokenizer.json", 1, 1, NULL},
};
enum { N_VOCABS = sizeof g_v / sizeof g_v[0] };
static int g_n;
static vocab *g_loaded[N_VOCABS];

static void cleanup(void) {
    for (int i = 0; i < N_VOCABS; i++) moe_model_free(g_v[i].m);
}

int LLVMFuzzerInitialize(int *argc, char ***argv) {
    (void)argc;
    (void)argv;
    for (int i = 0; i < N_VOCABS; i++) {
        moe_load_params lp = {0};
        lp.vocab_only = g_v[i].vocab_only;
        if (access(g_v[i].path, R_OK) != 0) {
            fprintf(stderr, "fuzz_tokenizer: %s absent, not fuzzed\n", g_v[i].path);
            continue;
        }
        if (moe_load(g_v[i].path, &lp, &g_v[i].m) != MOE_OK) {
            fprintf(stderr, "fuzz_tokenizer: %s: %s\n", g_v[i].path, moe_last_error());
            abort();
        }
        g_loaded[g_n++] = &g_v[i];
    }
    if (g_n == 0) abort();
    atexit(cleanup);
    return 0;
}

static moe_token *tokenize(const moe_model *m, const char *s, int32_t n, int flags, int32_t *count) {
    int32_t cap = 2 * n + 16; /* no vocabulary makes more tokens than bytes, plus the added specials */
    moe_token *t = malloc((size_t)cap * sizeof *t);
    int32_t k = moe_tokenize(m, s, n, t, cap, flags);
    if (k < 0) {
        fprintf(stderr, "tokenize failed on %d bytes: %d (%s)\n", n, k, moe_last_error());
        abort();
    }
    *count = k;
    return t;
}

static char *detokenize(const moe_model *m, const moe_token *t, int32_t n, int flags, int32_t *len) {
    int32_t need = moe_detokenize(m, t, n, NULL, 0, flags);
    if (need > 0) abort(); /* a size query returns -(count) or 0 */
    char *s = malloc((size_t)-need + 1);
    int32_t k = moe_detokenize(m, t, n, s, -need, flags);
    if (k != -need) abort();
    *len = k;
    return s;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size < 1 || size > 4096) return 0;
    const vocab *v = g_loaded[data[0] % g_n];
    int flags = (data[0] / g_n) % 4;
    const char *x = (const char *)data + 1;
    int32_t nx = (int32_t)size - 1;
    moe_model_info info;
    moe_model_get_info(v->m, &info);
    int32_t nt, ny, nt2, nz;
    moe_token *t = tokenize(v->m, x, nx, flags, &nt);
    for (int32_t i = 0; i < nt; i++)
        if (t[i] < 0 || t[i] >= info.n_vocab) abort();
    char *y = detokenize(v->m, t, nt, flags, &ny);
    if (!(flags & MOE_TOKENIZE_ADD_SPECIAL)) {
        if (v->exact && (ny != nx || memcmp(x, y, (size_t)nx))) {
            fprintf(stderr, "%s: the round trip changed the text (flags %d)\n", v->path, flags);
            abort();
        }
        moe_token *t2 = tokenize(v->m, y, ny, flags, &nt2);
        char *z = detokenize(v->m, t2, nt2, flags, &nz);
        if (nz != ny || memcmp(y, z, (size_t)ny)) {
            fprintf(stderr, "%s: detokenize(tokenize(y)) != y for y = detokenize(tokenize(x)) (flags %d)\n", v->path, flags);
            abort();
        }
        free(t2);
        free(z);
    }
    /* pieces concatenated = the whole detokenization (special tokens rendered) */
    if (flags & MOE_TOKENIZE_PARSE_SPECIAL) {
        int32_t at = 0;
        for (int32_t i = 0; i < nt; i++) {
            char piece[1024];
            int32_t l = moe_token_to_piece(v->m, t[i], piece, sizeof piece);
            if (l < 0 || at + l > ny || memcmp(y + at, piece, (size_t)l)) abort();
            at += l;
        }
        if (at != ny) abort();
    }
    free(t);
    free(y);
    return 0;
}
