/* test_tokenizer.c — the tokenizers against Hugging Face `tokenizers` on real vocabularies.
   Needs .cache/vocabs/{qwen3,gemma3,gptoss,gemma4t} (test/fetch_vocabs.sh; gemma4t is the Gemma 3
   vocabulary with Gemma 4's special tokens, made by test/make_gemma4_vocab.py) and the fixtures in
   test/fixtures/tokenizer/ (corpus, reference ids and splits made by gen/tokenizer_refs.py on the
   GPU machine, chat renderings made by gen/tokenizer_chat_refs.py, Gemma 4 ids and renderings made
   by gen/tokenizer_gemma4_refs.py). */
#include "../moe.c"
#include "../moe_vk.c"
#include "../shaders_embedded.c"
#include "test_util.h"

#define FIX "test/fixtures/tokenizer/"
static const char *const SEPS[6] = {"\n", "\n\n", "\r\n", "\n\n\n\n", " \n", "\n\t"};
enum { NV = 4, V_GEMMA4 = 3 };
static const char *const VOCABS[NV] = {"qwen3", "gemma3", "gptoss", "gemma4t"};

/* ---- corpus cases, built exactly as gen/tokenizer_refs.py builds them ---------------------- */
typedef struct tcase { char *s; int32_t n; int valid; } tcase;
static tcase *g_cases;
static int g_n_cases, g_n_lines;
static moe_model *g_models[NV];

static int utf8_ok(const char *s, size_t n) {
    for (size_t i = 0; i < n;) {
        int l = utf8_valid_len((const uint8_t *)s + i, n - i);
        if (!l) return 0;
        i += (size_t)l;
    }
    return 1;
}

static void add_case(const char *s, size_t n, int valid) {
    tcase *c = &g_cases[g_n_cases++];
    c->s = malloc(n + 1);
    memcpy(c->s, s, n);
    c->s[n] = 0;
    c->n = (int32_t)n;
    c->valid = valid;
}

static int load_cases(void) {
    size_t size = 0;
    char *corpus = (char *)tu_read_file(FIX "corpus.txt", &size);
    if (!corpus) return 0;
    int lines = 0;
    for (size_t i = 0; i < size; i++) lines += corpus[i] == '\n';
    g_cases = calloc((size_t)lines * 2 + 8, sizeof *g_cases);
    for (size_t i = 0, start = 0; i < size; i++)
        if (corpus[i] == '\n') {
            add_case(corpus + start, i - start, utf8_ok(corpus + start, i - start));
            start = i + 1;
        }
    g_n_lines = g_n_cases;
    for (int start = 0; start < g_n_lines; start += 7) {
        int end = start + 7 < g_n_lines ? start + 7 : g_n_lines, ok = 1;
        for (int i = start; i < end; i++) ok &= g_cases[i].valid;
        if (!ok) continue;
        size_t len = 0;
        for (int i = start; i < end; i++) len += (size_t)g_cases[i].n + 4;
        char *b = malloc(len + 1);
        size_t o = 0;
        for (int i = start; i < end; i++) {
            if (i > start) { memcpy(b + o, SEPS[i % 6], strlen(SEPS[i % 6])); o += strlen(SEPS[i % 6]); }
            memcpy(b + o, g_cases[i].s, (size_t)g_cases[i].n);
            o += (size_t)g_cases[i].n;
        }
        add_case(b, o, 1);
        free(b);
    }
    char *all = malloc(size + 1);
    size_t o = 0;
    for (int i = 0; i < g_n_lines; i++)
        if (g_cases[i].valid) {
            memcpy(all + o, g_cases[i].s, (size_t)g_cases[i].n);
            o += (size_t)g_cases[i].n;
            all[o++] = '\n';
        }
    add_case(all, o, 1);
    free(all);
    free(corpus);
    return 1;
}

/* ---- reference files ------------------------------------------------------------------------ */
typedef struct ref_reader { const uint8_t *p, *end; } ref_reader;
static uint32_t rd_varint(ref_reader *r) {
    uint32_t x = 0;
    int shift = 0;
    while (r->p < r->end) {
        uint8_t b = *r->p++;
        x |= (uint32_t)(b & 0x7F) << shift;
        if (!(b & 0x80)) return x;
        shift += 7;
    }
    fail_msg("reference file truncated");
    return 0;
}

typedef struct ref_case { int flags; int32_t n, m; int32_t *ids, *ids_plain; } ref_case;
typedef struct refs { int32_t prefix[4], n_prefix, suffix[4], n_suffix; ref_case *cases; int n; } refs;

static void load_refs(const char *name, refs *out) {
    char path[256];
    snprintf(path, sizeof path, FIX "refs_%s.bin", name);
    size_t size = 0;
    uint8_t *data = tu_read_file(path, &size);
    assert_non_null(data);
    assert_memory_equal(data, "MOEREF1\0", 8);
    ref_reader r = {data + 8, data + size};
    memset(out, 0, sizeof *out);
    out->n_prefix = (int32_t)rd_varint(&r);
    for (int i = 0; i < out->n_prefix; i++) out->prefix[i] = (int32_t)rd_varint(&r);
    out->n_suffix = (int32_t)rd_varint(&r);
    for (int i = 0; i < out->n_suffix; i++) out->suffix[i] = (int32_t)rd_varint(&r);
    out->n = (int)rd_varint(&r);
    assert_int_equal(out->n, g_n_cases);
    out->cases = calloc((size_t)out->n, sizeof *out->cases);
    for (int c = 0; c < out->n; c++) {
        ref_case *rc = &out->cases[c];
        rc->flags = (int)rd_varint(&r);
        if (rc->flags & 1) continue;
        rc->n = (int32_t)rd_varint(&r);
        rc->ids = malloc(((size_t)rc->n + 1) * sizeof(int32_t));
        for (int i = 0; i < rc->n; i++) rc->ids[i] = (int32_t)rd_varint(&r);
        rc->ids_plain = rc->ids;
        rc->m = rc->n;
        if (rc->flags & 2) {
            rc->m = (int32_t)rd_varint(&r);
            rc->ids_plain = malloc(((size_t)rc->m + 1) * sizeof(int32_t));
            for (int i = 0; i < rc->m; i++) rc->ids_plain[i] = (int32_t)rd_varint(&r);
        }
    }
    assert_true(r.p == r.end);
    free(data);
}

static void free_refs(refs *r) {
    for (int c = 0; c < r->n; c++) {
        if (r->cases[c].ids_plain != r->cases[c].ids) free(r->cases[c].ids_plain);
        free(r->cases[c].ids);
    }
    free(r->cases);
}

/* ---- helpers ---------------------------------------------------------------------------------- */
static moe_model *load_vocab(const char *path) {
    moe_load_params p = {0};
    p.vocab_only = 1;
    moe_model *m = NULL;
    moe_status st = moe_load(path, &p, &m);
    if (st) fprintf(stderr, "load %s: %s\n", path, moe_last_error());
    return st ? NULL : m;
}

static int32_t *tokenize(const moe_model *m, const char *s, int32_t n, int flags, int32_t *count) {
    int32_t need = -1, got = -1;
    moe_status st = moe_tokenize(m, s, n, NULL, 0, flags, &need);
    if (st != MOE_ERR_BUFFER_TOO_SMALL && !(st == MOE_OK && need == 0)) {
        fprintf(stderr, "tokenize with cap 0: %s, %d\n", moe_status_str(st), need);
        return NULL;
    }
    int32_t *ids = malloc(((size_t)need + 1) * sizeof *ids);
    st = moe_tokenize(m, s, n, ids, need, flags, &got);
    if (st || got != need) { fprintf(stderr, "tokenize: %d then %d (%s)\n", need, got, moe_last_error()); free(ids); return NULL; }
    *count = got;
    return ids;
}

static char *detokenize(const moe_model *m, const int32_t *ids, int32_t n, int flags, int32_t *len) {
    int32_t need = -1, got = -1;
    moe_status st = moe_detokenize(m, ids, n, NULL, 0, flags, &need);
    if (st != MOE_ERR_BUFFER_TOO_SMALL && !(st == MOE_OK && need == 0)) return NULL;
    char *b = malloc((size_t)need + 1);
    st = moe_detokenize(m, ids, n, b, need, flags, &got);
    if (st || got != need) { free(b); return NULL; }
    *len = got;
    return b;
}

static int ids_equal(const int32_t *a, int32_t na, const int32_t *b, int32_t nb) {
    return na == nb && (na == 0 || memcmp(a, b, (size_t)na * sizeof *a) == 0);
}

static void show_diff(const char *what, int c, const int32_t *got, int32_t ng, const int32_t *want, int32_t nw) {
    int i = 0;
    while (i < ng && i < nw && got[i] == want[i]) i++;
    fprintf(stderr, "%s: case %d (%.60s%s): %d tokens, HF %d; first difference at %d: ours", what, c, g_cases[c].s,
            g_cases[c].n > 60 ? "..." : "", ng, nw, i);
    for (int k = i; k < ng && k < i + 6; k++) fprintf(stderr, " %d", got[k]);
    fprintf(stderr, ", HF");
    for (int k = i; k < nw && k < i + 6; k++) fprintf(stderr, " %d", want[k]);
    fprintf(stderr, "\n");
}

/* Text as the vocabulary sees it: Qwen3 applies NFC, Gemma reads U+2581 as a space. */
static char *expected_text(int v, const tcase *c, int32_t *len) {
    char *out = malloc((size_t)c->n * 3 + 8);
    if (v == 0) {
        uint32_t *cps = malloc(((size_t)c->n * 4 + 8) * sizeof *cps);
        *len = (int32_t)nfc((const uint8_t *)c->s, (size_t)c->n, (uint8_t *)out, cps);
        free(cps);
    } else if (v == 1 || v == V_GEMMA4) {
        int32_t o = 0;
        for (int32_t i = 0; i < c->n;) {
            if (i + 3 <= c->n && !memcmp(c->s + i, "\xE2\x96\x81", 3)) { out[o++] = ' '; i += 3; } else out[o++] = c->s[i++];
        }
        *len = o;
    } else {
        memcpy(out, c->s, (size_t)c->n);
        *len = c->n;
    }
    return out;
}

/* All cases of one vocabulary against the references; returns the number of mismatches. */
static int check_against_refs(const moe_model *m, const refs *r, const char *what, int verbose, int *n_checked) {
    int bad = 0, shown = 0, checked = 0;
    for (int c = 0; c < g_n_cases; c++) {
        if (!g_cases[c].valid) continue;
        const ref_case *rc = &r->cases[c];
        for (int mode = 0; mode < 2; mode++) {
            int32_t n = 0;
            int32_t *ids = tokenize(m, g_cases[c].s, g_cases[c].n, mode ? 0 : MOE_TOKENIZE_PARSE_SPECIAL, &n);
            assert_non_null(ids);
            const int32_t *want = mode ? rc->ids_plain : rc->ids;
            int32_t nw = mode ? rc->m : rc->n;
            if (!ids_equal(ids, n, want, nw)) {
                bad++;
                if (verbose && shown++ < 8) show_diff(what, c, ids, n, want, nw);
            }
            free(ids);
        }
        checked++;
    }
    if (n_checked) *n_checked = checked;
    return bad;
}

static void test_hf_ids(void **state) {
    int v = (int)(intptr_t)*state;
    moe_model *m = g_models[v];
    assert_non_null(m);
    refs r;
    load_refs(VOCABS[v], &r);
    int checked = 0;
    int bad = check_against_refs(m, &r, VOCABS[v], 1, &checked);
    int64_t total = 0;
    for (int c = 0; c < g_n_cases; c++) total += r.cases[c].n;
    printf("   %s: %d of %d valid cases (%lld reference tokens) identical to Hugging Face in both modes (%d lines, %d blocks, 1 whole corpus)\n",
           VOCABS[v], checked - bad, checked, (long long)total, g_n_lines, g_n_cases - g_n_lines - 1);
    assert_int_equal(bad, 0);
    /* MOE_TOKENIZE_ADD_SPECIAL adds what the post-processor adds */
    int32_t n = 0, *ids = tokenize(m, "hello", 5, MOE_TOKENIZE_ADD_SPECIAL | MOE_TOKENIZE_PARSE_SPECIAL, &n), n0 = 0;
    int32_t *plain = tokenize(m, "hello", 5, MOE_TOKENIZE_PARSE_SPECIAL, &n0);
    assert_int_equal(n, n0 + r.n_prefix + r.n_suffix);
    for (int i = 0; i < r.n_prefix; i++) assert_int_equal(ids[i], r.prefix[i]);
    for (int i = 0; i < r.n_suffix; i++) assert_int_equal(ids[n0 + r.n_prefix + i], r.suffix[i]);
    free(ids);
    free(plain);
    /* the heap path of BPE gives what the quadratic path gives */
    g_bpe_small_max = 2;
    int bad_heap = 0;
    for (int c = 0; c < g_n_lines; c += 3) {
        if (!g_cases[c].valid) continue;
        int32_t k = 0, *x = tokenize(m, g_cases[c].s, g_cases[c].n, MOE_TOKENIZE_PARSE_SPECIAL, &k);
        bad_heap += !ids_equal(x, k, r.cases[c].ids, r.cases[c].n);
        free(x);
    }
    g_bpe_small_max = 48;
    assert_int_equal(bad_heap, 0);
    free_refs(&r);
}

static void test_round_trip(void **state) {
    int v = (int)(intptr_t)*state;
    moe_model *m = g_models[v];
    assert_non_null(m);
    int bad = 0;
    for (int c = 0; c < g_n_cases; c++) {
        int32_t want_n;
        char *want = expected_text(v, &g_cases[c], &want_n);
        for (int mode = 0; mode < 2; mode++) {
            int flags = mode ? 0 : MOE_TOKENIZE_PARSE_SPECIAL;
            int32_t n = 0, len = 0;
            int32_t *ids = tokenize(m, g_cases[c].s, g_cases[c].n, flags, &n);
            assert_non_null(ids);
            char *back = detokenize(m, ids, n, flags, &len);
            assert_non_null(back);
            if (len != want_n || memcmp(back, want, (size_t)len)) {
                if (bad++ < 5) fprintf(stderr, "%s: round trip of case %d (%.50s) gave %d bytes, want %d\n", VOCABS[v], c, g_cases[c].s, len, want_n);
            }
            /* piece by piece (what a streaming caller does) gives the same bytes */
            if (mode == 0 && c < g_n_lines) {
                size_t o = 0;
                char piece[512];
                for (int32_t i = 0; i < n; i++) {
                    int32_t k = -1;
                    assert_int_equal(moe_token_to_piece(m, ids[i], piece, sizeof piece, &k), MOE_OK);
                    if (o + (size_t)k <= (size_t)len && memcmp(back + o, piece, (size_t)k) == 0) o += (size_t)k;
                    else o = (size_t)-1 / 2;
                }
                if (o != (size_t)len) bad++;
            }
            free(ids);
            free(back);
        }
        free(want);
    }
    printf("   %s: %d cases round-trip exactly (invalid UTF-8 included)\n", VOCABS[v], g_n_cases - bad);
    assert_int_equal(bad, 0);
}

/* ---- the split regexes, against Hugging Face's Split pre-tokenizer ---------------------------- */
static void test_splits(void **state) {
    (void)state;
    size_t size = 0;
    uint8_t *data = tu_read_file(FIX "splits.bin", &size);
    assert_non_null(data);
    assert_memory_equal(data, "MOESPL1\0", 8);
    ref_reader r = {data + 8, data + size};
    int n_re = (int)rd_varint(&r);
    assert_true(uc_ready());
    uint32_t *cp = malloc(((size_t)g_cases[g_n_cases - 1].n + 8) * sizeof *cp);
    uint8_t *cls = malloc((size_t)g_cases[g_n_cases - 1].n + 8);
    uint32_t *off = malloc(((size_t)g_cases[g_n_cases - 1].n + 8) * sizeof *off);
    int total_bad = 0;
    for (int k = 0; k < n_re; k++) {
        uint32_t nl = rd_varint(&r);
        char name[32] = {0};
        memcpy(name, r.p, nl < 31 ? nl : 31);
        r.p += nl;
        int pre = !strcmp(name, "gpt2") ? PRE_GPT2 : !strcmp(name, "llama3") ? PRE_LLAMA3 : !strcmp(name, "qwen2") ? PRE_QWEN2 : PRE_O200K;
        int nc = (int)rd_varint(&r), bad = 0, shown = 0;
        assert_int_equal(nc, g_n_cases);
        for (int c = 0; c < nc; c++) {
            int np = (int)rd_varint(&r);
            const uint8_t *s = (const uint8_t *)g_cases[c].s;
            size_t n = (size_t)g_cases[c].n, m = 0;
            for (size_t i = 0; i < n;) {
                int l;
                cp[m] = utf8_next(s + i, n - i, &l);
                cls[m] = (uint8_t)uc_class(cp[m]);
                off[m++] = (uint32_t)i;
                i += (size_t)l;
            }
            off[m] = (uint32_t)n;
            split_text t = {cp, cls, m};
            size_t i = 0, pos = 0;
            int ok = 1;
            for (int p = 0; p < np; p++) {
                uint32_t want = rd_varint(&r);
                if (!ok || !g_cases[c].valid) continue;
                size_t e = i < m ? split_next(pre, &t, i) : m;
                if (off[e] - pos != want) {
                    ok = 0;
                    if (shown++ < 4) fprintf(stderr, "%s split: case %d (%.50s): piece %d at byte %zu is %u bytes, HF %u\n", name, c,
                                             g_cases[c].s, p, pos, off[e] - (uint32_t)pos, want);
                }
                pos = off[e];
                i = e;
            }
            if (g_cases[c].valid && ok && i != m) ok = 0;
            bad += !ok && g_cases[c].valid;
        }
        printf("   split regex %-6s: %d of %d cases split exactly as Hugging Face does\n", name, nc - bad, nc);
        total_bad += bad;
    }
    free(cp);
    free(cls);
    free(off);
    free(data);
    assert_int_equal(total_bad, 0);
}

/* ---- the GGUF path: the same vocabularies written as llama.cpp's converter writes them ----------- */
typedef struct gw { uint8_t *p; size_t n, cap; } gw;
static void gw_put(gw *w, const void *d, size_t n) {
    if (w->n + n > w->cap) { w->cap = (w->n + n) * 2; w->p = realloc(w->p, w->cap); }
    memcpy(w->p + w->n, d, n);
    w->n += n;
}
static void gw_u32(gw *w, uint32_t x) { gw_put(w, &x, 4); }
static void gw_u64(gw *w, uint64_t x) { gw_put(w, &x, 8); }
static void gw_str(gw *w, const void *s, size_t n) { gw_u64(w, n); gw_put(w, s, n); }
static void gw_key(gw *w, const char *k, uint32_t type) { gw_str(w, k, strlen(k)); gw_u32(w, type); }

typedef struct mrank { uint32_t rank; int32_t a, b; } mrank;
static int cmp_mrank(const void *x, const void *y) {
    const mrank *p = x, *q = y;
    return (p->rank > q->rank) - (p->rank < q->rank);
}

/* kind: 0 = as converted (gpt2: merges; llama: scores, no merges), 1 = llama with merges too */
static char *write_gguf(const moe_vocab *v, const char *name, int kind) {
    static char path[256];
    snprintf(path, sizeof path, "build/test/tok_%s_%d.gguf", name, kind);
    gw w = {0};
    int spm = v->kind == VK_SPM;
    mrank *ms = malloc(((size_t)v->n_merges + 1) * sizeof *ms);
    uint32_t nm = 0;
    for (uint32_t i = 0; i <= v->merge_mask; i++)
        if (v->merges[i].key != UINT64_MAX)
            ms[nm++] = (mrank){v->merges[i].rank, (int32_t)(v->merges[i].key >> 32), (int32_t)(uint32_t)v->merges[i].key};
    qsort(ms, nm, sizeof *ms, cmp_mrank);
    int with_merges = !spm || kind == 1;
    int n_kv = 7 + (with_merges ? 1 : 0) + (spm ? 3 : 1) + (v->template_text ? 1 : 0);
    gw_put(&w, "GGUF", 4);
    gw_u32(&w, 3);
    gw_u64(&w, 0);
    gw_u64(&w, (uint64_t)n_kv);
    gw_key(&w, "general.architecture", GGUF_STRING);
    const char *arch = !strcmp(name, "qwen3") ? "qwen3moe" : !strcmp(name, "gemma3") ? "gemma3" : "gpt-oss";
    gw_str(&w, arch, strlen(arch));
    gw_key(&w, "tokenizer.ggml.model", GGUF_STRING);
    gw_str(&w, spm ? "llama" : "gpt2", spm ? 5 : 4);
    gw_key(&w, "tokenizer.ggml.tokens", GGUF_ARRAY);
    gw_u32(&w, GGUF_STRING);
    gw_u64(&w, (uint64_t)v->n_tokens);
    for (int32_t i = 0; i < v->n_tokens; i++) gw_str(&w, tok_text(v, i), v->tok[i].text_len);
    gw_key(&w, "tokenizer.ggml.token_type", GGUF_ARRAY);
    gw_u32(&w, GGUF_I32);
    gw_u64(&w, (uint64_t)v->n_tokens);
    for (int32_t i = 0; i < v->n_tokens; i++) gw_u32(&w, v->tok[i].type);
    gw_key(&w, "tokenizer.ggml.bos_token_id", GGUF_U32);
    gw_u32(&w, (uint32_t)(v->bos >= 0 ? v->bos : v->eos));
    gw_key(&w, "tokenizer.ggml.eos_token_id", GGUF_U32);
    gw_u32(&w, (uint32_t)v->eos);
    gw_key(&w, "tokenizer.ggml.add_bos_token", GGUF_BOOL);
    uint8_t ab = v->n_prefix > 0;
    gw_put(&w, &ab, 1);
    if (with_merges) {
        gw_key(&w, "tokenizer.ggml.merges", GGUF_ARRAY);
        gw_u32(&w, GGUF_STRING);
        gw_u64(&w, nm);
        for (uint32_t i = 0; i < nm; i++) {
            uint32_t la = v->tok[ms[i].a].text_len, lb = v->tok[ms[i].b].text_len;
            char *s = malloc(la + lb + 1);
            memcpy(s, tok_text(v, ms[i].a), la);
            s[la] = ' ';
            memcpy(s + la + 1, tok_text(v, ms[i].b), lb);
            gw_str(&w, s, la + lb + 1);
            free(s);
        }
    }
    if (spm) {
        /* scores as a SentencePiece model would hold them: the earlier a token is made by a merge,
           the higher its score; tokens no merge makes come last */
        float *score = malloc((size_t)v->n_tokens * sizeof *score);
        for (int32_t i = 0; i < v->n_tokens; i++) score[i] = -1e9f;
        for (uint32_t i = nm; i-- > 0;) {
            const merge_slot *s = merge_get(v, ms[i].a, ms[i].b);
            score[s->id] = -(float)ms[i].rank;
        }
        gw_key(&w, "tokenizer.ggml.scores", GGUF_ARRAY);
        gw_u32(&w, GGUF_F32);
        gw_u64(&w, (uint64_t)v->n_tokens);
        gw_put(&w, score, (size_t)v->n_tokens * 4);
        free(score);
        gw_key(&w, "tokenizer.ggml.add_space_prefix", GGUF_BOOL);
        uint8_t f = 0;
        gw_put(&w, &f, 1);
        gw_key(&w, "tokenizer.ggml.unknown_token_id", GGUF_U32);
        gw_u32(&w, (uint32_t)v->unk);
    } else {
        gw_key(&w, "tokenizer.ggml.pre", GGUF_STRING);
        const char *pre = v->pre == PRE_QWEN2 ? "qwen2" : v->pre == PRE_O200K ? "gpt-4o" : v->pre == PRE_LLAMA3 ? "llama-bpe" : "gpt2";
        gw_str(&w, pre, strlen(pre));
    }
    if (v->template_text) {
        gw_key(&w, "tokenizer.chat_template", GGUF_STRING);
        gw_str(&w, v->template_text, strlen(v->template_text));
    }
    free(ms);
    int ok = tu_write_file(path, w.p, w.n);
    free(w.p);
    return ok ? path : NULL;
}

/* Gemma 4 as llama.cpp's converter writes it (Gemma4Model.set_vocab over gguf-py's LlamaHfVocab):
   tokenizer model "gemma4"; every token below the vocabulary size typed NORMAL unless it is special
   (CONTROL), a byte (BYTE) or one of the control tokens it wants printed (USER_DEFINED); scores all
   -1000; the merges; no space prefix; bos added. */
static char *write_gguf_gemma4(const moe_vocab *v) {
    static char path[] = "build/test/tok_gemma4_conv.gguf";
    static const char *const visible[] = {"<|channel>", "<channel|>", "<|tool_call>", "<tool_call|>", "<|tool_response>",
                                          "<tool_response|>", "<|\"|>", NULL};
    gw w = {0};
    mrank *ms = malloc(((size_t)v->n_merges + 1) * sizeof *ms);
    uint32_t nm = 0;
    for (uint32_t i = 0; i <= v->merge_mask; i++)
        if (v->merges[i].key != UINT64_MAX)
            ms[nm++] = (mrank){v->merges[i].rank, (int32_t)(v->merges[i].key >> 32), (int32_t)(uint32_t)v->merges[i].key};
    qsort(ms, nm, sizeof *ms, cmp_mrank);
    gw_put(&w, "GGUF", 4);
    gw_u32(&w, 3);
    gw_u64(&w, 0);
    gw_u64(&w, 12);
    gw_key(&w, "general.architecture", GGUF_STRING);
    gw_str(&w, "gemma4", 6);
    gw_key(&w, "tokenizer.ggml.model", GGUF_STRING);
    gw_str(&w, "gemma4", 6);
    gw_key(&w, "tokenizer.ggml.tokens", GGUF_ARRAY);
    gw_u32(&w, GGUF_STRING);
    gw_u64(&w, (uint64_t)v->n_tokens);
    for (int32_t i = 0; i < v->n_tokens; i++) gw_str(&w, tok_text(v, i), v->tok[i].text_len);
    gw_key(&w, "tokenizer.ggml.scores", GGUF_ARRAY);
    gw_u32(&w, GGUF_F32);
    gw_u64(&w, (uint64_t)v->n_tokens);
    for (int32_t i = 0; i < v->n_tokens; i++) { float f = -1000.0f; gw_put(&w, &f, 4); }
    gw_key(&w, "tokenizer.ggml.token_type", GGUF_ARRAY);
    gw_u32(&w, GGUF_I32);
    gw_u64(&w, (uint64_t)v->n_tokens);
    for (int32_t i = 0; i < v->n_tokens; i++) {
        uint32_t t = v->tok[i].type == TT_CONTROL ? TT_CONTROL : v->tok[i].type == TT_BYTE ? TT_BYTE : TT_NORMAL;
        for (int k = 0; visible[k]; k++)
            if (tok_text_is(v, i, visible[k])) t = TT_USER;
        gw_u32(&w, t);
    }
    gw_key(&w, "tokenizer.ggml.merges", GGUF_ARRAY);
    gw_u32(&w, GGUF_STRING);
    gw_u64(&w, nm);
    for (uint32_t i = 0; i < nm; i++) {
        uint32_t la = v->tok[ms[i].a].text_len, lb = v->tok[ms[i].b].text_len;
        char *s2 = malloc(la + lb + 1);
        memcpy(s2, tok_text(v, ms[i].a), la);
        s2[la] = ' ';
        memcpy(s2 + la + 1, tok_text(v, ms[i].b), lb);
        gw_str(&w, s2, la + lb + 1);
        free(s2);
    }
    static const char *const id_keys[] = {"tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.unknown_token_id",
                                           "tokenizer.ggml.padding_token_id"};
    const int32_t ids[] = {v->bos, v->eos, v->unk, v->pad};
    for (int k = 0; k < 4; k++) {
        gw_key(&w, id_keys[k], GGUF_U32);
        gw_u32(&w, (uint32_t)ids[k]);
    }
    uint8_t f = 0, t = 1;
    gw_key(&w, "tokenizer.ggml.add_space_prefix", GGUF_BOOL);
    gw_put(&w, &f, 1);
    gw_key(&w, "tokenizer.ggml.add_bos_token", GGUF_BOOL);
    gw_put(&w, &t, 1);
    free(ms);
    int ok = tu_write_file(path, w.p, w.n);
    free(w.p);
    return ok ? path : NULL;
}

static void test_gguf_path(void **state) {
    int v = (int)(intptr_t)*state;
    assert_non_null(g_models[v]);
    const moe_vocab *voc = g_models[v]->vocab;
    refs r;
    load_refs(VOCABS[v], &r);
    for (int kind = 0; kind < 3; kind++) {
        if (kind == 1 && (voc->kind != VK_SPM || v == V_GEMMA4)) continue;
        char *path = NULL, lib_path[64];
        if (kind == 0 && v == V_GEMMA4) {
            path = write_gguf_gemma4(voc);
        } else if (kind < 2) {
            path = write_gguf(voc, VOCABS[v], kind);
        } else { /* the library's own writer (moe_model_save uses it) */
            gguf_writer gw;
            memset(&gw, 0, sizeof gw);
            gw_kv_str(&gw, "general.architecture", voc->arch[0] ? voc->arch : "unknown");
            assert_int_equal(vocab_write_gguf(voc, &gw), MOE_OK);
            snprintf(lib_path, sizeof lib_path, "build/test/tok_%s_lib.gguf", VOCABS[v]);
            assert_int_equal(gw_write_file(&gw, lib_path), MOE_OK);
            gw_free(&gw);
            path = lib_path;
        }
        assert_non_null(path);
        moe_model *g = load_vocab(path);
        assert_non_null(g);
        int exact = kind >= 1 || voc->kind != VK_SPM || v == V_GEMMA4;
        int checked = 0, bad = check_against_refs(g, &r, "gguf", exact, &checked);
        printf("   %s from GGUF (%s): %d of %d case-modes identical to Hugging Face\n", VOCABS[v],
               kind == 2 ? "written by vocab_write_gguf" : v == V_GEMMA4 ? "as llama.cpp's converter writes Gemma 4" :
               voc->kind != VK_SPM ? "tokens, types, merges" : kind ? "tokens, types, scores and merges" : "tokens, types, scores",
               2 * checked - bad, 2 * checked);
        if (v == V_GEMMA4) {
            assert_int_equal(g->vocab->gguf_gemma4, 1);
            for (int32_t t = 0; t < voc->n_tokens; t++) /* types back to what tokenizer.json says */
                if (g->vocab->tok[t].type != voc->tok[t].type && voc->tok[t].type != TT_UNUSED)
                    fail_msg("gemma4 GGUF: token %d (%.*s) has type %d, tokenizer.json %d", t, (int)voc->tok[t].text_len,
                             (const char *)tok_text(voc, t), g->vocab->tok[t].type, voc->tok[t].type);
        }
        if (exact) assert_int_equal(bad, 0);
        else assert_true(bad <= checked / 50); /* merges derived from scores: at least 99% */
        /* same end-of-generation marks and chat format */
        for (int32_t t = 0; t < voc->n_tokens; t++)
            if (moe_token_is_eog(g, t) != moe_token_is_eog(g_models[v], t) && t != voc->bos)
                fail_msg("token %d: eog differs between GGUF and tokenizer.json", t);
        assert_int_equal(g->vocab->chat, voc->chat);
        assert_int_equal(g->vocab->n_prefix, voc->n_prefix);
        moe_model_info info;
        assert_int_equal(moe_model_get_info(g, &info), MOE_OK);
        assert_int_equal(info.n_vocab, voc->n_tokens);
        moe_model_free(g);
        remove(path);
    }
    free_refs(&r);
}

/* ---- a small vocabulary cut from Qwen3 (the first 1000 tokens and the merges among them), for
   fuzzing the GGUF loader and for allocation-failure sweeps -------------------------------------- */
static size_t small_gguf(uint8_t **out) {
    const moe_vocab *v = g_models[0]->vocab;
    const int32_t N = 1000;
    gw w = {0};
    mrank *ms = malloc(((size_t)v->n_merges + 1) * sizeof *ms);
    uint32_t nm = 0;
    for (uint32_t i = 0; i <= v->merge_mask; i++)
        if (v->merges[i].key != UINT64_MAX && v->merges[i].id < N && (int32_t)(v->merges[i].key >> 32) < N &&
            (int32_t)(uint32_t)v->merges[i].key < N)
            ms[nm++] = (mrank){v->merges[i].rank, (int32_t)(v->merges[i].key >> 32), (int32_t)(uint32_t)v->merges[i].key};
    qsort(ms, nm, sizeof *ms, cmp_mrank);
    gw_put(&w, "GGUF", 4); gw_u32(&w, 3); gw_u64(&w, 0); gw_u64(&w, 6);
    gw_key(&w, "tokenizer.ggml.model", GGUF_STRING); gw_str(&w, "gpt2", 4);
    gw_key(&w, "tokenizer.ggml.pre", GGUF_STRING); gw_str(&w, "qwen2", 5);
    gw_key(&w, "tokenizer.ggml.tokens", GGUF_ARRAY); gw_u32(&w, GGUF_STRING); gw_u64(&w, (uint64_t)N + 1);
    for (int32_t i = 0; i < N; i++) gw_str(&w, tok_text(v, i), v->tok[i].text_len);
    gw_str(&w, "<|im_end|>", 10);
    gw_key(&w, "tokenizer.ggml.token_type", GGUF_ARRAY); gw_u32(&w, GGUF_I32); gw_u64(&w, (uint64_t)N + 1);
    for (int32_t i = 0; i < N; i++) gw_u32(&w, TT_NORMAL);
    gw_u32(&w, TT_CONTROL);
    gw_key(&w, "tokenizer.ggml.eos_token_id", GGUF_U32); gw_u32(&w, (uint32_t)N);
    gw_key(&w, "tokenizer.ggml.merges", GGUF_ARRAY); gw_u32(&w, GGUF_STRING); gw_u64(&w, nm);
    for (uint32_t i = 0; i < nm; i++) {
        uint32_t la = v->tok[ms[i].a].text_len, lb = v->tok[ms[i].b].text_len;
        char s2[256];
        memcpy(s2, tok_text(v, ms[i].a), la);
        s2[la] = ' ';
        memcpy(s2 + la + 1, tok_text(v, ms[i].b), lb);
        gw_str(&w, s2, la + lb + 1);
    }
    free(ms);
    *out = w.p;
    return w.n;
}

static void test_gguf_fuzz_and_alloc_failures(void **state) {
    (void)state;
    uint8_t *base;
    size_t n = small_gguf(&base);
    const char *path = "build/test/tok_small.gguf";
    assert_true(tu_write_file(path, base, n));
    moe_model *m = load_vocab(path);
    assert_non_null(m);
    const char *text = "Hello, world! 你好世界，我们今天去公园散步。 <|im_end|> e\xCC\x81 \xFF";
    int32_t k0 = 0, *ref = tokenize(m, text, (int32_t)strlen(text), MOE_TOKENIZE_PARSE_SPECIAL, &k0);
    assert_non_null(ref);
    int found = 0;
    for (int32_t i = 0; i < k0; i++) found += ref[i] == 1000; /* <|im_end|> */
    assert_int_equal(found, 1);
    moe_model_free(m);
    /* every allocation of a load and of a tokenization fails in turn: an error, never a crash or a leak */
    int loads_ok = 0;
    for (long k = 0; k < 400 && !loads_ok; k++) {
        moe_model *x = NULL;
        moe_load_params p = {0};
        p.vocab_only = 1;
        moe_test_fail_alloc_after(k);
        moe_status st = moe_load(path, &p, &x);
        moe_test_fail_alloc_after(-1);
        if (st == MOE_OK) { loads_ok = 1; moe_model_free(x); }
        else assert_true(st == MOE_ERR_NO_MEMORY);
    }
    assert_true(loads_ok);
    m = load_vocab(path);
    g_bpe_small_max = 2; /* long words take the heap path, whose allocation may fail too */
    for (long k = 0; k < 40; k++) {
        int32_t ids[256];
        moe_test_fail_alloc_after(k);
        int32_t r = -1;
        moe_status st = moe_tokenize(m, text, (int32_t)strlen(text), ids, 256, MOE_TOKENIZE_PARSE_SPECIAL, &r);
        moe_test_fail_alloc_after(-1);
        if (st == MOE_ERR_NO_MEMORY) { assert_int_equal(r, 0); continue; }
        assert_int_equal(st, MOE_OK);
        assert_int_equal(r, k0);
        assert_memory_equal(ids, ref, (size_t)k0 * sizeof *ids);
    }
    g_bpe_small_max = 48;
    moe_model_free(m);
    free(ref);
    /* random damage to the file: the loader refuses it or loads something that tokenizes safely */
    uint64_t rng = 4242;
    int loaded = 0;
    uint8_t *buf = malloc(n);
    for (int it = 0; it < 1500; it++) {
        memcpy(buf, base, n);
        int hits = 1 + it % 4;
        for (int h = 0; h < hits; h++) {
            rng = rng * 6364136223846793005ull + 1442695040888963407ull;
            size_t pos = (size_t)(rng >> 33) % n;
            if (it % 3 == 0) pos = 24 + (size_t)(rng >> 40) % 400; /* the keys and the first tokens */
            buf[pos] = (uint8_t)(rng >> 16);
        }
        size_t len = it % 10 == 9 ? (size_t)(rng >> 20) % n : n; /* truncated now and then */
        assert_true(tu_write_file(path, buf, len));
        moe_model *x = NULL;
        moe_load_params p = {0};
        p.vocab_only = 1;
        if (moe_load(path, &p, &x) == MOE_OK) {
            loaded++;
            int32_t ids[512], r = 0, t = 0;
            moe_status st = moe_tokenize(x, text, (int32_t)strlen(text), ids, 512, MOE_TOKENIZE_PARSE_SPECIAL, &r);
            char back[1024];
            if (st == MOE_OK && r > 0) st = moe_detokenize(x, ids, r, back, sizeof back, MOE_TOKENIZE_PARSE_SPECIAL, &t);
            (void)st;
            moe_model_free(x);
        } else {
            assert_true(strlen(moe_last_error()) > 0);
        }
    }
    printf("   damaged GGUF vocabularies: %d of 1500 still loaded, none crashed\n", loaded);
    free(buf);
    free(base);
    remove(path);
}

/* ---- special tokens, end of generation, buffers ------------------------------------------------- */
static int32_t id_of(const moe_model *m, const char *text) { return vocab_find_text(m->vocab, text); }

static void test_special_and_eog(void **state) {
    (void)state;
    static const char *const eog[NV][3] = {{"<|im_end|>", "<|endoftext|>", NULL}, {"<end_of_turn>", "<eos>", NULL},
                                           {"<|return|>", "<|call|>", NULL}, {"<turn|>", "<eos>", NULL}};
    static const char *const not_eog[NV][2] = {{"<|im_start|>", "<think>"}, {"<start_of_turn>", "<bos>"}, {"<|start|>", "<|end|>"},
                                               {"<|turn>", "<|channel>"}};
    for (int v = 0; v < NV; v++) {
        moe_model *m = g_models[v];
        assert_non_null(m);
        for (int k = 0; eog[v][k]; k++) assert_true(moe_token_is_eog(m, id_of(m, eog[v][k])));
        for (int k = 0; k < 2; k++) assert_false(moe_token_is_eog(m, id_of(m, not_eog[v][k])));
        int32_t n = 0, *ids = tokenize(m, "Hello", 5, 0, &n);
        assert_false(moe_token_is_eog(m, ids[0]));
        assert_false(moe_token_is_eog(m, -1));
        assert_false(moe_token_is_eog(m, 1 << 30));
        /* the special token's text: one token with PARSE_SPECIAL, several without */
        int32_t k1 = 0, k2 = 0, *a = tokenize(m, eog[v][0], (int32_t)strlen(eog[v][0]), MOE_TOKENIZE_PARSE_SPECIAL, &k1);
        int32_t *b = tokenize(m, eog[v][0], (int32_t)strlen(eog[v][0]), 0, &k2);
        assert_int_equal(k1, 1);
        assert_int_equal(a[0], id_of(m, eog[v][0]));
        assert_true(k2 > 1);
        /* detokenize drops special tokens unless asked */
        char buf[64];
        int32_t cnt = -1;
        assert_int_equal(moe_detokenize(m, a, 1, buf, sizeof buf, 0, &cnt), MOE_OK);
        assert_int_equal(cnt, 0);
        assert_int_equal(moe_detokenize(m, a, 1, buf, sizeof buf, MOE_TOKENIZE_PARSE_SPECIAL, &cnt), MOE_OK);
        assert_int_equal(cnt, (int32_t)strlen(eog[v][0]));
        /* buffers too small: MOE_ERR_BUFFER_TOO_SMALL with the count needed, nothing beyond cap touched */
        int32_t big[4] = {-7, -7, -7, -7};
        assert_int_equal(moe_tokenize(m, "Hello world, this is a test.", 28, big, 2, 0, &cnt), MOE_ERR_BUFFER_TOO_SMALL);
        assert_true(cnt > 2);
        assert_int_equal(big[2], -7);
        char pc[2] = {'x', 'x'};
        int32_t t_hello = ids[0], plen = -1;
        assert_int_equal(moe_token_to_piece(m, t_hello, pc, 0, &plen), MOE_ERR_BUFFER_TOO_SMALL);
        assert_true(plen > 0);
        assert_int_equal(pc[0], 'x');
        assert_int_equal(moe_token_to_piece(m, t_hello, buf, sizeof buf, &cnt), MOE_OK);
        assert_int_equal(cnt, plen);
        assert_int_equal(moe_detokenize(m, b, k2, buf, 1, 0, &cnt), MOE_ERR_BUFFER_TOO_SMALL);
        assert_true(cnt > 1);
        /* bad arguments */
        assert_int_equal(moe_tokenize(m, NULL, 3, NULL, 0, 0, &cnt), MOE_ERR_INVALID_ARG);
        assert_int_equal(moe_tokenize(m, "x", -1, NULL, 0, 0, &cnt), MOE_ERR_INVALID_ARG);
        assert_int_equal(moe_tokenize(m, "x", 1, NULL, 0, 99, &cnt), MOE_ERR_INVALID_ARG);
        assert_int_equal(moe_token_to_piece(m, -1, buf, sizeof buf, &cnt), MOE_ERR_INVALID_ARG);
        int32_t badtok = 1 << 30;
        assert_int_equal(moe_detokenize(m, &badtok, 1, buf, sizeof buf, 0, &cnt), MOE_ERR_INVALID_ARG);
        assert_int_equal(cnt, 0);
        cnt = -1;
        assert_int_equal(moe_tokenize(m, "", 0, NULL, 0, 0, &cnt), MOE_OK);
        assert_int_equal(cnt, 0);
        free(ids); free(a); free(b);
    }
    /* no tokenizer: clear errors */
    moe_model bare;
    memset(&bare, 0, sizeof bare);
    bare.eos = -1;
    int32_t cnt = -1;
    assert_int_equal(moe_tokenize(&bare, "x", 1, NULL, 0, 0, &cnt), MOE_ERR_UNSUPPORTED);
    assert_non_null(strstr(moe_last_error(), "no tokenizer"));
    assert_int_equal(cnt, 0);
    char b2[8];
    assert_int_equal(moe_detokenize(&bare, NULL, 0, b2, 8, 0, &cnt), MOE_ERR_UNSUPPORTED);
    assert_int_equal(moe_chat_apply(&bare, NULL, NULL, 0, 1, b2, 8, &cnt), MOE_ERR_UNSUPPORTED);
    assert_int_equal(moe_tokenize(NULL, "x", 1, NULL, 0, 0, &cnt), MOE_ERR_INVALID_ARG);
    /* a vocabulary-only model has no weights */
    moe_ctx *ctx = NULL;
    assert_int_equal(moe_ctx_new(g_models[0], NULL, &ctx), MOE_ERR_UNSUPPORTED);
    /* a GGUF file without tokenizer metadata still loads as a model elsewhere; vocab_only says why not */
    gw w = {0};
    gw_put(&w, "GGUF", 4); gw_u32(&w, 3); gw_u64(&w, 0); gw_u64(&w, 1);
    gw_key(&w, "general.architecture", GGUF_STRING); gw_str(&w, "qwen3moe", 8);
    assert_true(tu_write_file("build/test/tok_empty.gguf", w.p, w.n));
    free(w.p);
    moe_load_params p = {0};
    p.vocab_only = 1;
    moe_model *m = NULL;
    assert_int_equal(moe_load("build/test/tok_empty.gguf", &p, &m), MOE_ERR_FORMAT);
    assert_non_null(strstr(moe_last_error(), "no tokenizer"));
    remove("build/test/tok_empty.gguf");
    if (access("test/fixtures/qwen3moe_f32.gguf", R_OK) == 0) { /* the lead's fixtures carry no tokenizer */
        moe_load_params lp = {0};
        lp.backend = MOE_BACKEND_CPU;
        assert_int_equal(moe_load("test/fixtures/qwen3moe_f32.gguf", &lp, &m), MOE_OK);
        int32_t cnt = -1;
        assert_int_equal(moe_tokenize(m, "x", 1, NULL, 0, 0, &cnt), MOE_ERR_UNSUPPORTED);
        moe_model_free(m);
    }
}

/* ---- chat templates ------------------------------------------------------------------------------- */
static void test_chat(void **state) {
    (void)state;
    size_t size = 0;
    char *data = (char *)tu_read_file(FIX "chat_refs.json", &size);
    assert_non_null(data);
    json_doc d;
    assert_int_equal(json_parse(&d, data, size, "chat_refs.json"), MOE_OK);
    moe_test_set_chat_date("2025-01-01");
    int n = 0;
    for (uint32_t i = 1; i < d.nodes[0].end; i = d.nodes[i].end, n++) {
        char *vname = json_strdup(&d, json_get(&d, i, "vocab"));
        int v = !strcmp(vname, "qwen3") ? 0 : !strcmp(vname, "gemma3") ? 1 : 2;
        free(vname);
        uint32_t msgs = json_get(&d, i, "messages");
        int32_t nm = (int32_t)d.nodes[msgs].len;
        char *roles[16], *contents[16];
        int k = 0;
        for (uint32_t q = msgs + 1; q < d.nodes[msgs].end; q = d.nodes[q].end, k++) {
            roles[k] = json_strdup(&d, json_get(&d, q, "role"));
            contents[k] = json_strdup(&d, json_get(&d, q, "content"));
        }
        int gen = json_is(&d, json_get(&d, i, "add_generation_prompt"), JSON_TRUE);
        uint32_t e = json_get(&d, i, "expected");
        int32_t need = -1, got = -1;
        moe_status st = moe_chat_apply(g_models[v], (const char *const *)roles, (const char *const *)contents, nm, gen, NULL, 0, &need);
        if (json_is(&d, e, JSON_NULL)) {
            assert_int_equal(st, MOE_ERR_INVALID_ARG);
            assert_int_equal(need, 0);
        } else {
            char *want = json_strdup(&d, e);
            if (st != MOE_ERR_BUFFER_TOO_SMALL || need != (int32_t)strlen(want))
                fprintf(stderr, "chat %d (%s): %s, need %d want %zu\n", n, VOCABS[v], moe_status_str(st), need, strlen(want));
            assert_int_equal(st, MOE_ERR_BUFFER_TOO_SMALL);
            assert_int_equal(need, (int32_t)strlen(want));
            char *buf = malloc((size_t)need + 1);
            assert_int_equal(moe_chat_apply(g_models[v], (const char *const *)roles, (const char *const *)contents, nm, gen, buf, need + 1, &got), MOE_OK);
            assert_int_equal(got, need);
            if (memcmp(buf, want, strlen(want))) fprintf(stderr, "chat %d (%s):\n got: %s\nwant: %s\n", n, VOCABS[v], buf, want);
            assert_memory_equal(buf, want, strlen(want));
            assert_int_equal(buf[need], 0);
            free(buf);
            free(want);
        }
        for (int q = 0; q < k; q++) { free(roles[q]); free(contents[q]); }
    }
    printf("   %d chat renderings identical to the Jinja templates\n", n);
    json_free(&d);
    free(data);
    moe_test_set_chat_date(NULL);
    /* unknown template: unsupported, not a guess */
    moe_vocab *v = g_models[0]->vocab;
    int saved = v->chat;
    v->chat = CHAT_UNKNOWN;
    const char *r[1] = {"user"}, *c[1] = {"hi"};
    char buf[64];
    int32_t cnt = -1;
    assert_int_equal(moe_chat_apply(g_models[0], r, c, 1, 1, buf, sizeof buf, &cnt), MOE_ERR_UNSUPPORTED);
    v->chat = saved;
    const char *bad_role[1] = {"wizard"};
    assert_int_equal(moe_chat_apply(g_models[0], bad_role, c, 1, 1, buf, sizeof buf, &cnt), MOE_ERR_INVALID_ARG);
}

/* ---- Gemma 4: special tokens, Gemma-4-specific text, the chat template ----------------------------
   gemma4_refs.json (gen/tokenizer_gemma4_refs.py): Hugging Face ids on the stand-in vocabulary, and
   chats rendered by four revisions of Google's Gemma 4 template (jinja2 set up as transformers
   does; transformers' apply_chat_template gave the same on the GPU machine). The test does not
   have the template texts (they are not ours to commit), only which of the markers that
   vocab_detect_chat reads each one holds; it builds a stand-in text from those. */
static int32_t *json_ids(const json_doc *d, uint32_t arr, int32_t *n) {
    *n = json_is(d, arr, JSON_ARRAY) ? (int32_t)d->nodes[arr].len : 0;
    int32_t *ids = malloc(((size_t)*n + 1) * sizeof *ids), k = 0;
    for (uint32_t q = arr + 1; *n && q < d->nodes[arr].end; q = d->nodes[q].end) {
        int64_t x = -1;
        assert_true(json_int(d, q, 0, 1 << 30, &x));
        ids[k++] = (int32_t)x;
    }
    return ids;
}

static int check_ids(const moe_model *m, const char *s, size_t n, int flags, const int32_t *want, int32_t nw, const char *what) {
    int32_t k = 0, *got = tokenize(m, s, (int32_t)n, flags, &k);
    assert_non_null(got);
    int ok = ids_equal(got, k, want, nw);
    if (!ok) {
        int i = 0;
        while (i < k && i < nw && got[i] == want[i]) i++;
        fprintf(stderr, "%s: '%.40s': %d tokens, HF %d; first difference at %d (ours %d, HF %d)\n", what, s, k, nw, i,
                i < k ? got[i] : -1, i < nw ? want[i] : -1);
    }
    free(got);
    return ok;
}

static int32_t chat_render(const moe_model *m, const char *const *roles, const char *const *contents, int32_t n, int gen, char **out) {
    *out = NULL;
    int32_t need = -1, got = -1;
    moe_status st = moe_chat_apply(m, roles, contents, n, gen, NULL, 0, &need);
    if (st != MOE_ERR_BUFFER_TOO_SMALL) return st; /* an error status: every Gemma 4 rendering is non-empty */
    *out = malloc((size_t)need + 1);
    assert_int_equal(moe_chat_apply(m, roles, contents, n, gen, *out, need + 1, &got), MOE_OK);
    assert_int_equal(got, need);
    assert_int_equal((*out)[got], 0);
    return got;
}

static void test_gemma4(void **state) {
    (void)state;
    moe_model *m = g_models[V_GEMMA4];
    moe_vocab *v = m->vocab;
    size_t size = 0;
    char *data = (char *)tu_read_file(FIX "gemma4_refs.json", &size);
    assert_non_null(data);
    json_doc d;
    assert_int_equal(json_parse(&d, data, size, "gemma4_refs.json"), MOE_OK);
    /* the vocabulary: size, special-token ids, what add_special_tokens adds, end of generation */
    int64_t nv = 0;
    assert_true(json_int(&d, json_get(&d, 0, "n_vocab"), 0, 1 << 30, &nv));
    assert_int_equal(v->n_tokens, (int32_t)nv);
    uint32_t sp = json_get(&d, 0, "special_ids");
    int n_special = 0;
    for (uint32_t i = sp + 1; i < d.nodes[sp].end; i = d.nodes[i + 1].end, n_special++) {
        char *text = json_strdup(&d, i);
        int64_t id = -1;
        assert_true(json_int(&d, i + 1, 0, 1 << 30, &id));
        if (vocab_find_text(v, text) != (int32_t)id) fail_msg("%s: id %d, Hugging Face %d", text, vocab_find_text(v, text), (int)id);
        free(text);
    }
    assert_true(n_special >= 20);
    int32_t np = 0, *pre = json_ids(&d, json_get(&d, 0, "add_special_prefix"), &np);
    assert_int_equal(v->n_prefix, np);
    for (int32_t i = 0; i < np; i++) assert_int_equal(v->prefix[i], pre[i]);
    free(pre);
    moe_model_info info;
    assert_int_equal(moe_model_get_info(m, &info), MOE_OK);
    assert_string_equal(info.arch, "gemma4");
    assert_int_equal(info.bos, 2);
    assert_true(moe_token_is_eog(m, 1) && moe_token_is_eog(m, 106));
    assert_false(moe_token_is_eog(m, 105) || moe_token_is_eog(m, 100) || moe_token_is_eog(m, 101) || moe_token_is_eog(m, 98));
    /* two prompts with the ids Hugging Face gives on the real tokenizer (transformers'
       tests/models/diffusion_gemma/test_modeling_diffusion_gemma.py, a model with Gemma 4's
       tokenizer and template): the default one, and the one with thinking turned on */
    static const int32_t want_plain[] = {2, 105, 2364, 107, 6974, 496, 1440, 20494, 1003, 23613, 236761, 106, 107, 105, 4368, 107,
                                         100, 45518, 107, 101};
    static const int32_t want_think[] = {2, 105, 9731, 107, 98, 107, 106, 107, 105, 2364, 107, 6974, 496, 1440, 20494, 1003, 23613,
                                         236761, 106, 107, 105, 4368, 107};
    const char *ru[1] = {"user"}, *cu[1] = {"Write a long essay about Portugal."};
    char prompt[256];
    int32_t pn = -1;
    assert_int_equal(moe_chat_apply(m, ru, cu, 1, 1, prompt, sizeof prompt, &pn), MOE_OK);
    assert_string_equal(prompt, "<bos><|turn>user\nWrite a long essay about Portugal.<turn|>\n<|turn>model\n<|channel>thought\n<channel|>");
    assert_true(check_ids(m, prompt, (size_t)pn, MOE_TOKENIZE_PARSE_SPECIAL, want_plain, 20, "transformers' gemma 4 prompt"));
    const char *think = "<bos><|turn>system\n<|think|>\n<turn|>\n<|turn>user\nWrite a long essay about Portugal.<turn|>\n<|turn>model\n";
    assert_true(check_ids(m, think, strlen(think), MOE_TOKENIZE_PARSE_SPECIAL, want_think, 23, "transformers' gemma 4 thinking prompt"));
    /* Gemma-4-specific text: ids in both modes, from tokenizer.json and from a GGUF as llama.cpp's converter writes it */
    char *gpath = write_gguf_gemma4(v);
    assert_non_null(gpath);
    moe_model *g = load_vocab(gpath);
    assert_non_null(g);
    assert_int_equal(g->vocab->chat, CHAT_GEMMA4);
    uint32_t texts = json_get(&d, 0, "texts");
    int n_text = 0, bad = 0;
    for (uint32_t i = texts + 1; i < d.nodes[texts].end; i = d.nodes[i].end, n_text++) {
        uint32_t t = json_get(&d, i, "text");
        char *s = json_strdup(&d, t);
        size_t sl = strlen(s); /* no NULs in the texts */
        int32_t n1 = 0, n2 = 0, *a = json_ids(&d, json_get(&d, i, "ids"), &n1), *b = json_ids(&d, json_get(&d, i, "ids_plain"), &n2);
        for (int k = 0; k < 2; k++) {
            const moe_model *x = k ? g : m;
            bad += !check_ids(x, s, sl, MOE_TOKENIZE_PARSE_SPECIAL, a, n1, k ? "gemma4 gguf" : "gemma4");
            bad += !check_ids(x, s, sl, 0, b, n2, k ? "gemma4 gguf, plain" : "gemma4, plain");
        }
        /* detokenizing with special tokens gives the text back (U+2581 reads as a space) */
        int32_t len = 0, wl = 0;
        tcase tc = {s, (int32_t)sl, 1};
        char *back = detokenize(m, a, n1, MOE_TOKENIZE_PARSE_SPECIAL, &len), *want = expected_text(V_GEMMA4, &tc, &wl);
        assert_non_null(back);
        if (len != wl || memcmp(back, want, (size_t)wl)) { bad++; fprintf(stderr, "gemma4: '%s' does not detokenize back\n", s); }
        free(back);
        free(want);
        free(a); free(b); free(s);
    }
    printf("   gemma4: %d special-token ids and %d Gemma-4-specific texts identical to Hugging Face (tokenizer.json and "
           "converter-style GGUF, both modes)\n", n_special, n_text);
    assert_int_equal(bad, 0);
    /* the chats, per template revision */
    char *saved_tt = v->template_text;
    int saved_chat = v->chat, saved_flags = v->chat_flags;
    assert_int_equal(saved_chat, CHAT_GEMMA4); /* from config.json's model_type, no template in the files */
    assert_int_equal(saved_flags, CHATF_G4_EMPTY_THOUGHT | CHATF_G4_CONTINUE);
    uint32_t tpls = json_get(&d, 0, "templates");
    char names[8][40], stand_in[8][160];
    int n_tpl = 0;
    for (uint32_t i = tpls + 1; i < d.nodes[tpls].end && n_tpl < 8; i = d.nodes[i].end, n_tpl++) {
        char *name = json_strdup(&d, json_get(&d, i, "name"));
        snprintf(names[n_tpl], sizeof names[n_tpl], "%s", name);
        free(name);
        uint32_t mk = json_get(&d, i, "markers");
        stand_in[n_tpl][0] = 0;
        for (uint32_t q = mk + 1; q < d.nodes[mk].end; q = d.nodes[q].end) {
            char *s = json_strdup(&d, q);
            strcat(stand_in[n_tpl], "{{ ");
            strcat(stand_in[n_tpl], s);
            strcat(stand_in[n_tpl], " }}");
            free(s);
        }
    }
    assert_true(n_tpl >= 4);
    uint32_t chats = json_get(&d, 0, "chats");
    int n_chat = 0, n_ids = 0, n_refused = 0;
    int per_tpl[8] = {0};
    for (uint32_t i = chats + 1; i < d.nodes[chats].end; i = d.nodes[i].end, n_chat++) {
        char *tname = json_strdup(&d, json_get(&d, i, "template"));
        int t = 0;
        while (t < n_tpl && strcmp(names[t], tname)) t++;
        assert_true(t < n_tpl);
        free(tname);
        v->template_text = stand_in[t];
        vocab_detect_chat(v);
        assert_int_equal(v->chat, CHAT_GEMMA4);
        uint32_t msgs = json_get(&d, i, "messages");
        int32_t nm = (int32_t)d.nodes[msgs].len;
        char *roles[16], *contents[16];
        int k = 0;
        for (uint32_t q = msgs + 1; q < d.nodes[msgs].end; q = d.nodes[q].end, k++) {
            roles[k] = json_strdup(&d, json_get(&d, q, "role"));
            contents[k] = json_strdup(&d, json_get(&d, q, "content"));
        }
        int gen = json_is(&d, json_get(&d, i, "add_generation_prompt"), JSON_TRUE);
        uint32_t e = json_get(&d, i, "expected");
        char *got = NULL;
        int32_t n = chat_render(m, (const char *const *)roles, (const char *const *)contents, nm, gen, &got);
        if (json_is(&d, e, JSON_NULL)) {
            assert_int_equal(n, MOE_ERR_INVALID_ARG);
            assert_non_null(strstr(moe_last_error(), "at least one message"));
            n_refused++;
        } else {
            char *want = json_strdup(&d, e);
            if (!got || strcmp(got, want)) fail_msg("gemma4 chat %d (%s, %d messages, gen %d):\n got: %s\nwant: %s", n_chat, names[t], nm, gen,
                                                    got ? got : moe_last_error(), want);
            int32_t ni = 0, *ids = json_ids(&d, json_get(&d, i, "ids"), &ni);
            assert_true(check_ids(m, got, strlen(got), MOE_TOKENIZE_PARSE_SPECIAL, ids, ni, "gemma4 chat"));
            n_ids++;
            free(ids);
            free(want);
            per_tpl[t]++;
        }
        free(got);
        for (int q = 0; q < k; q++) { free(roles[q]); free(contents[q]); }
    }
    printf("   gemma4: %d chat renderings identical to the Jinja templates (", n_ids);
    for (int t = 0; t < n_tpl; t++) printf("%s%s %d", t ? ", " : "", names[t], per_tpl[t]);
    printf(") and tokenized as Hugging Face does; %d chats refused as the templates refuse them\n", n_refused);
    v->template_text = saved_tt;
    vocab_detect_chat(v);
    assert_int_equal(v->chat, saved_chat);
    /* detection: by template text, by architecture, by the vocabulary's markers */
    const char *r1[1] = {"user"}, *c1[1] = {"hi"};
    char buf[256];
    v->template_text = (char *)"{{ bos_token }}<start_of_turn>user";
    vocab_detect_chat(v);
    assert_int_equal(v->chat, CHAT_GEMMA); /* a Gemma 3 template stays Gemma 3 */
    v->template_text = NULL;
    char arch[32];
    memcpy(arch, v->arch, sizeof arch);
    static const char *const archs[] = {"gemma4", "gemma4_text", "gemma3", "gemma3_text", "gemma", "", NULL};
    static const int want_chat[] = {CHAT_GEMMA4, CHAT_GEMMA4, CHAT_GEMMA, CHAT_GEMMA, CHAT_GEMMA, CHAT_GEMMA4};
    for (int a = 0; archs[a]; a++) {
        snprintf(v->arch, sizeof v->arch, "%s", archs[a]);
        vocab_detect_chat(v);
        if (v->chat != want_chat[a]) fail_msg("arch '%s': chat %d, want %d", archs[a], v->chat, want_chat[a]);
    }
    snprintf(v->arch, sizeof v->arch, "gemma3");
    vocab_detect_chat(v); /* a Gemma 3 file renders Gemma 3's format, whatever tokens it has */
    int32_t n = -1;
    assert_int_equal(moe_chat_apply(m, r1, c1, 1, 1, buf, sizeof buf, &n), MOE_OK);
    assert_true(n > 0);
    assert_string_equal(buf, "<bos><start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n");
    memcpy(v->arch, arch, sizeof arch);
    vocab_detect_chat(v);
    assert_int_equal(v->chat, CHAT_GEMMA4);
    assert_int_equal(g_models[1]->vocab->chat, CHAT_GEMMA);
    /* what the API promises around it */
    assert_int_equal(moe_chat_apply(m, r1, c1, 1, 1, buf, sizeof buf, &n), MOE_OK);
    assert_string_equal(buf, "<bos><|turn>user\nhi<turn|>\n<|turn>model\n<|channel>thought\n<channel|>");
    char small[8];
    memset(small, 'x', sizeof small);
    int32_t need = -1;
    assert_int_equal(moe_chat_apply(m, r1, c1, 1, 1, small, 4, &need), MOE_ERR_BUFFER_TOO_SMALL);
    assert_int_equal(need, n);
    assert_int_equal(small[0], 'x'); /* the rendering does not fit: nothing written */
    assert_int_equal(small[4], 'x');
    assert_non_null(strstr(moe_last_error(), "needs room"));
    static const char *const bad_roles[] = {"tool", "wizard", "User", ""};
    for (int b = 0; b < 4; b++) {
        const char *rr[2] = {"user", bad_roles[b]}, *cc[2] = {"a", "b"};
        assert_int_equal(moe_chat_apply(m, rr, cc, 2, 1, buf, sizeof buf, &need), MOE_ERR_INVALID_ARG);
        assert_non_null(strstr(moe_last_error(), "is not one of"));
    }
    assert_int_equal(moe_chat_apply(m, r1, c1, 0, 1, buf, sizeof buf, &need), MOE_ERR_INVALID_ARG);
    assert_non_null(strstr(moe_last_error(), "at least one message"));
    const char *ra[2] = {"user", "assistant"}, *ca[2] = {"q", "<|channel>thought\nx<channel|>a"};
    int nomem = 0;
    for (long k = 0; k < 4; k++) { /* the thinking strip allocates: a failure is an error, never a crash or a leak */
        moe_test_fail_alloc_after(k);
        moe_status r = moe_chat_apply(m, ra, ca, 2, 0, buf, sizeof buf, &need);
        moe_test_fail_alloc_after(-1);
        if (r == MOE_ERR_NO_MEMORY) nomem++;
        else assert_string_equal(buf, "<bos><|turn>user\nq<turn|>\n<|turn>model\na<turn|>\n");
    }
    assert_true(nomem >= 1);
    moe_model_free(g);
    remove(gpath);
    json_free(&d);
    free(data);
    /* a small "gemma4" GGUF (the first 3000 tokens and the merges among them): every allocation of
       its load fails in turn, an error each time, never a crash or a leak */
    const int32_t N = 3000;
    gw w = {0};
    mrank *ms = malloc(((size_t)v->n_merges + 1) * sizeof *ms);
    uint32_t nm = 0;
    for (uint32_t i = 0; i <= v->merge_mask; i++)
        if (v->merges[i].key != UINT64_MAX && v->merges[i].id < N && (int32_t)(v->merges[i].key >> 32) < N &&
            (int32_t)(uint32_t)v->merges[i].key < N)
            ms[nm++] = (mrank){v->merges[i].rank, (int32_t)(v->merges[i].key >> 32), (int32_t)(uint32_t)v->merges[i].key};
    qsort(ms, nm, sizeof *ms, cmp_mrank);
    gw_put(&w, "GGUF", 4); gw_u32(&w, 3); gw_u64(&w, 0); gw_u64(&w, 5);
    gw_key(&w, "tokenizer.ggml.model", GGUF_STRING); gw_str(&w, "gemma4", 6);
    gw_key(&w, "tokenizer.ggml.tokens", GGUF_ARRAY); gw_u32(&w, GGUF_STRING); gw_u64(&w, (uint64_t)N);
    for (int32_t i = 0; i < N; i++) gw_str(&w, tok_text(v, i), v->tok[i].text_len);
    gw_key(&w, "tokenizer.ggml.token_type", GGUF_ARRAY); gw_u32(&w, GGUF_I32); gw_u64(&w, (uint64_t)N);
    for (int32_t i = 0; i < N; i++) gw_u32(&w, v->tok[i].type == TT_CONTROL ? (tok_text_is(v, i, "<|channel>") ? TT_USER : TT_CONTROL) :
                                             v->tok[i].type == TT_BYTE ? TT_BYTE : TT_NORMAL);
    gw_key(&w, "tokenizer.ggml.bos_token_id", GGUF_U32); gw_u32(&w, 2);
    gw_key(&w, "tokenizer.ggml.merges", GGUF_ARRAY); gw_u32(&w, GGUF_STRING); gw_u64(&w, nm);
    for (uint32_t i = 0; i < nm; i++) {
        uint32_t la = v->tok[ms[i].a].text_len, lb = v->tok[ms[i].b].text_len;
        char s2[512];
        memcpy(s2, tok_text(v, ms[i].a), la);
        s2[la] = ' ';
        memcpy(s2 + la + 1, tok_text(v, ms[i].b), lb);
        gw_str(&w, s2, la + lb + 1);
    }
    free(ms);
    const char *spath = "build/test/tok_gemma4_small.gguf";
    assert_true(tu_write_file(spath, w.p, w.n));
    free(w.p);
    int loads_ok = 0, failures = 0;
    for (long k = 0; k < 400 && !loads_ok; k++) {
        moe_model *x = NULL;
        moe_load_params p = {0};
        p.vocab_only = 1;
        moe_test_fail_alloc_after(k);
        moe_status st = moe_load(spath, &p, &x);
        moe_test_fail_alloc_after(-1);
        if (st == MOE_OK) {
            loads_ok = 1;
            assert_int_equal(x->vocab->gguf_gemma4, 1);
            assert_int_equal(x->vocab->tok[100].type, TT_CONTROL); /* <|channel> */
            assert_int_equal(x->vocab->tok[107].type, TT_USER);    /* "\n" */
            const char *r2[2] = {"user", "assistant"}, *c2[2] = {"hi", "<|channel>x<channel|>ok"};
            char b2[128];
            int32_t cn = -1;
            assert_int_equal(moe_chat_apply(x, r2, c2, 2, 1, b2, sizeof b2, &cn), MOE_OK);
            assert_true(cn > 0);
            assert_string_equal(b2, "<bos><|turn>user\nhi<turn|>\n<|turn>model\nok<turn|>\n<|turn>model\n<|channel>thought\n<channel|>");
            moe_model_free(x);
        } else {
            assert_int_equal(st, MOE_ERR_NO_MEMORY);
            failures++;
        }
    }
    assert_true(loads_ok && failures > 3);
    /* without merges a "gemma4" vocabulary is refused (its scores are placeholders) */
    gw w2 = {0};
    gw_put(&w2, "GGUF", 4); gw_u32(&w2, 3); gw_u64(&w2, 0); gw_u64(&w2, 2);
    gw_key(&w2, "tokenizer.ggml.model", GGUF_STRING); gw_str(&w2, "gemma4", 6);
    gw_key(&w2, "tokenizer.ggml.tokens", GGUF_ARRAY); gw_u32(&w2, GGUF_STRING); gw_u64(&w2, 2);
    gw_str(&w2, "a", 1); gw_str(&w2, "b", 1);
    assert_true(tu_write_file(spath, w2.p, w2.n));
    free(w2.p);
    moe_model *x = NULL;
    moe_load_params lp = {0};
    lp.vocab_only = 1;
    assert_int_equal(moe_load(spath, &lp, &x), MOE_ERR_FORMAT);
    assert_non_null(strstr(moe_last_error(), "needs tokenizer.ggml.merges"));
    remove(spath);
}

/* ---- JSON parser ---------------------------------------------------------------------------------- */
static void test_json(void **state) {
    (void)state;
    static const char *const good[] = {"{}", "[]", "0", "-0.5e+10", "\"\\u00e9\\ud83d\\ude00\\n\"", "[1,[2,[3,{\"a\":null}]]]",
                                       " {\"k\" : [true,false,null] } ", "\xEF\xBB\xBF{\"bom\":1}", "\"é👍\""};
    static const char *const bad[] = {"", "{", "[1,]", "{\"a\":1,}", "01", "1.", ".5", "+1", "NaN", "'x'", "{a:1}", "[1 2]",
                                      "\"\\x\"", "\"\\ud800\"", "\"\\udc00\"", "\"tab\there\"", "\"\xC0\xAF\"", "\"\xED\xA0\x80\"",
                                      "[1]x", "{\"a\" 1}", "tru", "nul", "\"unterminated", "[\"a\"", "// c\n1", "1e", "-"};
    json_doc d;
    for (size_t i = 0; i < sizeof good / sizeof *good; i++) {
        if (json_parse(&d, good[i], strlen(good[i]), "t")) fail_msg("rejected %s: %s", good[i], moe_last_error());
        json_free(&d);
    }
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        if (json_parse(&d, bad[i], strlen(bad[i]), "t") == MOE_OK) fail_msg("accepted %s", bad[i]);
        assert_non_null(strstr(moe_last_error(), "line 1 column"));
    }
    const char *deep_ok = "[[[[[[[[[[1]]]]]]]]]]";
    assert_int_equal(json_parse(&d, deep_ok, strlen(deep_ok), "t"), MOE_OK);
    json_free(&d);
    char *deep = malloc(1001);
    memset(deep, '[', 1000);
    deep[1000] = 0;
    assert_int_equal(json_parse(&d, deep, 1000, "t"), MOE_ERR_FORMAT);
    free(deep);
    const char *s = "{\"a\\u0062\": \"x\\ty\", \"n\": [1, -2, 3.5]}";
    assert_int_equal(json_parse(&d, s, strlen(s), "t"), MOE_OK);
    uint32_t ab = json_get(&d, 0, "ab");
    assert_true(json_str_eq(&d, ab, "x\ty"));
    uint32_t arr = json_get(&d, 0, "n");
    int64_t x;
    assert_true(json_int(&d, arr + 2, -10, 10, &x));
    assert_int_equal(x, -2);
    double dv;
    assert_true(json_double(&d, arr + 3, &dv));
    assert_true(dv == 3.5);
    assert_false(json_int(&d, arr + 3, -10, 10, &x));
    json_free(&d);
    /* fuzz: random bytes and mutations of a valid document must never crash */
    uint64_t rng = 12345;
    char buf[256];
    const char *base = "{\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 0, \"b\": 1, \"ab\": 2}, \"merges\": [\"a b\"]}, \"x\": [1.5e3, \"\\u00e9\"]}";
    size_t bl = strlen(base);
    for (int it = 0; it < 20000; it++) {
        size_t n;
        if (it % 2) {
            n = (size_t)(rng % 64);
            for (size_t i = 0; i < n; i++) { rng = rng * 6364136223846793005ull + 1442695040888963407ull; static const char alpha[] = "{}[]\",:0123456789-.eE tfnrul\\\x80\xC3"; buf[i] = alpha[(rng >> 33) % (sizeof alpha - 1)]; }
        } else {
            memcpy(buf, base, bl);
            n = bl;
            for (int k = 0; k < 3; k++) { rng = rng * 6364136223846793005ull + 1442695040888963407ull; buf[(rng >> 33) % n] = (char)(rng >> 20); }
        }
        rng = rng * 6364136223846793005ull + 1442695040888963407ull;
        if (json_parse(&d, buf, n, "fuzz") == MOE_OK) {
            moe_vocab *v = NULL;
            if (vocab_from_json(&d, &v) == MOE_OK) {
                if (!v->unsupported[0]) vocab_finish(v);
                vocab_free(v);
            }
            json_free(&d);
        }
    }
}

/* ---- robustness: random bytes through every vocabulary ------------------------------------------- */
static void test_fuzz_tokenize(void **state) {
    (void)state;
    uint64_t rng = 99;
    char buf[300];
    for (int v = 0; v < NV; v++) {
        for (int it = 0; it < 3000; it++) {
            rng = rng * 6364136223846793005ull + 1442695040888963407ull;
            int32_t n = (int32_t)((rng >> 33) % sizeof buf);
            for (int32_t i = 0; i < n; i++) {
                rng = rng * 6364136223846793005ull + 1442695040888963407ull;
                uint32_t r = (uint32_t)(rng >> 33);
                buf[i] = r % 4 == 0 ? "<|>_ \n\t'sS\xE2\x96\x81"[r / 4 % 14] : (char)(r % 4 == 1 ? 0x80 + r / 4 % 64 : r / 4);
            }
            for (int flags = 0; flags < 4; flags++) {
                int32_t k = 0, len = 0;
                int32_t *ids = tokenize(g_models[v], buf, n, flags, &k);
                assert_non_null(ids);
                if (!(flags & MOE_TOKENIZE_ADD_SPECIAL)) {
                    tcase c = {buf, n, 0};
                    int32_t wn;
                    char *want = expected_text(v, &c, &wn);
                    char *back = detokenize(g_models[v], ids, k, flags, &len);
                    assert_non_null(back);
                    if (len != wn || memcmp(back, want, (size_t)len)) fail_msg("%s: random text %d does not round-trip", VOCABS[v], it);
                    free(back);
                    free(want);
                }
                free(ids);
            }
        }
    }
}

/* ---- NFC against Python's unicodedata, where the Unicode data files are installed ----------------- */
static void test_nfc_basics(void **state) {
    (void)state;
    assert_true(uc_ready());
    static const char *const cases[][2] = {
        {"e\xCC\x81", "\xC3\xA9"},                                  /* e + acute -> é */
        {"\xE2\x84\xAB", "\xC3\x85"},                               /* Angstrom sign -> Å */
        {"a\xCC\x87\xCC\xA3", "\xE1\xBA\xA1\xCC\x87"},              /* reorder, then ạ + dot above */
        {"\xE1\x84\x80\xE1\x85\xA1\xE1\x86\xA8", "\xEA\xB0\x81"},  /* conjoining jamo -> 각 */
        {"\xEF\xA4\x80", "\xE8\xB1\x88"},                           /* CJK compatibility ideograph */
        {"\xE0\xA4\x95\xE0\xA4\xBC", "\xE0\xA4\x95\xE0\xA4\xBC"},  /* क + nukta stays (exclusion) */
        {"\xCD\x84", "\xCC\x88\xCC\x81"},                           /* U+0344 -> two marks */
        {"\xCC\x81" "abc", "\xCC\x81" "abc"},                       /* leading mark */
        {"x\xFF\xC3", "x\xFF\xC3"},                                 /* invalid bytes pass through */
    };
    uint8_t out[64];
    uint32_t cps[64];
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        size_t n = nfc((const uint8_t *)cases[i][0], strlen(cases[i][0]), out, cps);
        if (n != strlen(cases[i][1]) || memcmp(out, cases[i][1], n)) fail_msg("nfc case %zu", i);
    }
    /* normalizing only the stretches that need it gives what normalizing everything gives */
    static const uint32_t pool[] = {'a', 'e', ' ', 'A', 0x301, 0x300, 0x323, 0x307, 0x308, 0x344, 0xE9, 0xC5, 0x212B, 0x1100,
                                    0x1161, 0x11A8, 0xAC00, 0xF900, 0x915, 0x93C, 0x4E00, 0x3099, 0x304B, 0x1D15E, 0x110000 + 0xFF};
    uint64_t rng = 7;
    uint8_t in[256], full[1024], spans[1024];
    uint32_t cps2[1024];
    for (int it = 0; it < 20000; it++) {
        size_t n = 0;
        rng = rng * 6364136223846793005ull + 1442695040888963407ull;
        int len = (int)((rng >> 33) % 24);
        for (int k = 0; k < len; k++) {
            rng = rng * 6364136223846793005ull + 1442695040888963407ull;
            n += (size_t)utf8_put(pool[(rng >> 33) % (sizeof pool / sizeof *pool)], in + n);
        }
        size_t a = nfc(in, n, full, cps2);
        int changed;
        size_t b = nfc_spans(in, n, spans, cps2, &changed);
        if (!changed) { memcpy(spans, in, n); b = n; }
        if (a != b || memcmp(full, spans, a)) fail_msg("nfc_spans differs from nfc on random text %d", it);
    }
}

static int setup(void **state) {
    (void)state;
    if (!load_cases()) { fprintf(stderr, "missing " FIX "corpus.txt\n"); return -1; }
    if (access(".cache/vocabs/gemma3/tokenizer.json", R_OK) || access(".cache/vocabs/qwen3/tokenizer.json", R_OK) ||
        access(".cache/vocabs/gptoss/tokenizer.json", R_OK) || access(".cache/vocabs/gemma4t/tokenizer.json", R_OK)) {
        fprintf(stderr, "fetching the vocabularies: sh test/fetch_vocabs.sh\n");
        if (system("sh test/fetch_vocabs.sh") != 0) fprintf(stderr, "test/fetch_vocabs.sh failed\n");
    }
    for (int v = 0; v < NV; v++) {
        char path[128];
        snprintf(path, sizeof path, ".cache/vocabs/%s", VOCABS[v]);
        g_models[v] = load_vocab(path);
        if (!g_models[v]) {
            fprintf(stderr, "missing vocabulary %s: run test/fetch_vocabs.sh (make test does)\n", path);
            return -1;
        }
    }
    return 0;
}

static int teardown(void **state) {
    (void)state;
    for (int v = 0; v < NV; v++) moe_model_free(g_models[v]);
    for (int c = 0; c < g_n_cases; c++) free(g_cases[c].s);
    free(g_cases);
    return 0;
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_nfc_basics),
        cmocka_unit_test(test_json),
        cmocka_unit_test(test_splits),
        cmocka_unit_test_prestate(test_hf_ids, (void *)0),
        cmocka_unit_test_prestate(test_hf_ids, (void *)1),
        cmocka_unit_test_prestate(test_hf_ids, (void *)2),
        cmocka_unit_test_prestate(test_hf_ids, (void *)3),
        cmocka_unit_test_prestate(test_round_trip, (void *)0),
        cmocka_unit_test_prestate(test_round_trip, (void *)1),
        cmocka_unit_test_prestate(test_round_trip, (void *)2),
        cmocka_unit_test_prestate(test_round_trip, (void *)3),
        cmocka_unit_test_prestate(test_gguf_path, (void *)0),
        cmocka_unit_test_prestate(test_gguf_path, (void *)1),
        cmocka_unit_test_prestate(test_gguf_path, (void *)2),
        cmocka_unit_test_prestate(test_gguf_path, (void *)3),
        cmocka_unit_test(test_special_and_eog),
        cmocka_unit_test(test_gguf_fuzz_and_alloc_failures),
        cmocka_unit_test(test_chat),
        cmocka_unit_test(test_gemma4),
        cmocka_unit_test(test_fuzz_tokenize),
    };
    return tu_run_tests_with("tokenizer", tests, setup, teardown);
}
