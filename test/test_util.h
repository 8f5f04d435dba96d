/* test_util.h — small helpers shared by the cmocka tests. */
#ifndef MOE_TEST_UTIL_H
#define MOE_TEST_UTIL_H
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>

#include "moe.h"
#include <fnmatch.h>
#include <math.h>

/* Reads a whole file into a malloc'd buffer (NULL if missing). */
static inline uint8_t *tu_read_file(const char *path, size_t *size) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    uint8_t *buf = malloc(n > 0 ? (size_t)n : 1);
    if (buf && n > 0 && fread(buf, 1, (size_t)n, f) != (size_t)n) { free(buf); buf = NULL; }
    fclose(f);
    if (size) *size = (size_t)(n > 0 ? n : 0);
    return buf;
}

static inline int tu_write_file(const char *path, const void *data, size_t size) {
    FILE *f = fopen(path, "wb");
    if (!f) return 0;
    int ok = fwrite(data, 1, size, f) == size;
    return fclose(f) == 0 && ok;
}

/* ---- reference fixtures (gen/make_fixtures.py): test/fixtures/qwen3moe_<name>.ref ---- */
#define REF_MAGIC 0x4645524du /* "MREF" */

typedef struct ref_data {
    int32_t n_vocab, n_tokens, n_prompt, n_greedy;
    const int32_t *tokens, *greedy;
    const float *logits;
    float min_margin;
    uint8_t *buf;
} ref_data;

/* Parses a .ref file (bounds-checked). Returns 0 on success. */
static inline int ref_load(const char *path, ref_data *r) {
    size_t size = 0;
    memset(r, 0, sizeof *r);
    r->buf = tu_read_file(path, &size);
    if (!r->buf) return -1;
    const uint8_t *p = r->buf, *end = r->buf + size;
    uint32_t hdr[2];
    int32_t dims[2];
    if (size < 16) return -2;
    memcpy(hdr, p, 8);
    memcpy(dims, p + 8, 8);
    p += 16;
    if (hdr[0] != REF_MAGIC || hdr[1] != 1) return -3;
    r->n_vocab = dims[0];
    r->n_tokens = dims[1];
    if (r->n_vocab <= 0 || r->n_tokens <= 0 || r->n_vocab > (1 << 20) || r->n_tokens > (1 << 16)) return -4;
    size_t need = 4 * (size_t)r->n_tokens + 4 * (size_t)r->n_tokens * (size_t)r->n_vocab + 8;
    if ((size_t)(end - p) < need) return -5;
    r->tokens = (const int32_t *)p;
    p += 4 * (size_t)r->n_tokens;
    r->logits = (const float *)p;
    p += 4 * (size_t)r->n_tokens * (size_t)r->n_vocab;
    memcpy(&r->n_prompt, p, 4);
    memcpy(&r->n_greedy, p + 4, 4);
    p += 8;
    if (r->n_prompt <= 0 || r->n_prompt > r->n_tokens || r->n_greedy <= 0 || r->n_greedy > (1 << 16)) return -6;
    if ((size_t)(end - p) != 4 * (size_t)r->n_greedy + 4) return -7;
    r->greedy = (const int32_t *)p;
    p += 4 * (size_t)r->n_greedy;
    memcpy(&r->min_margin, p, 4);
    return 0;
}

static inline int argmax(const float *x, int n) {
    int best = 0;
    for (int i = 1; i < n; i++)
        if (x[i] > x[best]) best = i;
    return best;
}

static inline int all_finite(const float *x, size_t n) {
    for (size_t i = 0; i < n; i++)
        if (!isfinite(x[i])) return 0;
    return 1;
}

/* max over rows of max|a - ref| / (max(ref) - min(ref)); rows of n_vocab floats */
static inline double row_rel_err(const float *a, const float *ref, int n_vocab) {
    float lo = ref[0], hi = ref[0];
    double d = 0;
    for (int j = 0; j < n_vocab; j++) {
        lo = fminf(lo, ref[j]);
        hi = fmaxf(hi, ref[j]);
        d = fmax(d, fabs((double)a[j] - (double)ref[j]));
    }
    return d / fmax((double)hi - (double)lo, 1e-30);
}

/* A model loaded with these settings (the test fails, naming the error, if it does not load);
   gpu_exact: Vulkan prefill matrix products in f32, no f16 tensor-core tiles. */
static inline moe_model *tu_load_exact(const char *path, int32_t backend, int32_t n_threads, int32_t cpu_exact, int32_t gpu_exact) {
    moe_load_params lp = {0};
    lp.backend = backend;
    lp.n_threads = n_threads;
    lp.cpu_exact = cpu_exact;
    lp.gpu_exact = gpu_exact;
    moe_model *m = NULL;
    moe_status st = moe_load(path, &lp, &m);
    if (st) fail_msg("load %s: %s", path, moe_last_error());
    return m;
}

static inline moe_model *tu_load(const char *path, int32_t backend, int32_t n_threads, int32_t cpu_exact) {
    return tu_load_exact(path, backend, n_threads, cpu_exact, 0);
}

static inline int tu_vocab(const moe_model *m) {
    moe_model_info info;
    assert_int_equal(moe_model_get_info(m, &info), MOE_OK);
    return info.n_vocab;
}

/* A context of n_ctx positions over model m (asserts success). */
static inline moe_ctx *tu_new_ctx_n(moe_model *m, int32_t kv_type, int32_t logits_all, int32_t n_batch, int32_t n_ctx) {
    moe_ctx_params cp = {0};
    cp.n_ctx = n_ctx;
    cp.kv_type = kv_type;
    cp.logits_all = logits_all;
    cp.n_batch = n_batch;
    moe_ctx *c = NULL;
    moe_status st = moe_ctx_new(m, &cp, &c);
    if (st != MOE_OK) print_error("moe_ctx_new: %s (%s)\n", moe_status_str(st), moe_last_error());
    assert_int_equal(st, MOE_OK);
    assert_non_null(c);
    return c;
}

/* A context of 256 positions over model m (asserts success). */
static inline moe_ctx *tu_new_ctx(moe_model *m, int32_t kv_type, int32_t logits_all, int32_t n_batch) {
    return tu_new_ctx_n(m, kv_type, logits_all, n_batch, 256);
}

/* Decode at depth, model a against model b (e.g. Vulkan against the CPU): both prefill the same
   n_fill pseudo-random tokens, then decode n_dec more one at a time; returns the worst
   row_rel_err of a's logits against b's (the prefill's last row and every decode step's). Past 512 keys the Vulkan backend decodes with
   split-KV attention (moe_vk.c VK_SPLIT_MIN), which the 48-token fixtures never reach. */
static inline double tu_depth_decode_err(moe_model *a, moe_model *b, int32_t kv_type, int n_fill, int n_dec, int n_vocab) {
    int32_t *tok = malloc((size_t)(n_fill + n_dec) * sizeof *tok);
    float *ref = malloc((size_t)n_vocab * sizeof *ref);
    assert_non_null(tok);
    assert_non_null(ref);
    for (int i = 0; i < n_fill + n_dec; i++) tok[i] = (int32_t)(((uint32_t)i * 2654435761u + 7u) % (uint32_t)n_vocab);
    moe_ctx *ca = tu_new_ctx_n(a, kv_type, 0, 0, n_fill + n_dec), *cb = tu_new_ctx_n(b, kv_type, 0, 0, n_fill + n_dec);
    double worst = 0;
    for (int i = n_fill; i <= n_fill + n_dec; i++) { /* the prefill's last row, then each decode step's */
        int at = i == n_fill ? 0 : i - 1, n = i == n_fill ? n_fill : 1;
        assert_int_equal(moe_step(ca, &tok[at], n), MOE_OK);
        assert_int_equal(moe_step(cb, &tok[at], n), MOE_OK);
        const float *la = moe_logits(ca, -1), *lb = moe_logits(cb, -1);
        assert_non_null(la);
        assert_non_null(lb);
        memcpy(ref, lb, (size_t)n_vocab * sizeof *ref);
        assert_true(all_finite(la, (size_t)n_vocab));
        worst = fmax(worst, row_rel_err(la, ref, n_vocab));
    }
    moe_ctx_free(ca);
    moe_ctx_free(cb);
    free(tok);
    free(ref);
    return worst;
}

/* ---- expert streaming (test_stream, test_vk_stream): one workload and one check for every budget ---- */
#define TU_NTOK 40 /* prefill tokens of the streaming workload (more distinct experts than the smallest caches hold) */
#define TU_NGEN 8  /* greedy decode steps after the prefill */

static inline void tu_tokens(int32_t *t, int n, int n_vocab) {
    uint32_t x = 12345;
    for (int i = 0; i < n; i++) {
        x = x * 1103515245u + 12345u;
        t[i] = (int32_t)((x >> 8) % (uint32_t)n_vocab);
    }
}

static inline void tu_step_ok(moe_ctx *c, const int32_t *t, int n) {
    moe_status st = moe_step(c, t, n);
    if (st) print_error("moe_step: %s (%s)\n", moe_status_str(st), moe_last_error());
    assert_int_equal(st, MOE_OK);
}

/* prefill TU_NTOK tokens with all logits (chunks of n_batch; 0 = default, one step), then TU_NGEN
   greedy steps; (TU_NTOK + TU_NGEN) rows of logits into out, the context's counters into stats */
static inline void tu_stream_workload(moe_model *m, int n_batch, float *out, moe_stats *stats) {
    moe_model_info info;
    assert_int_equal(moe_model_get_info(m, &info), MOE_OK);
    int V = info.n_vocab;
    int32_t t[TU_NTOK];
    tu_tokens(t, TU_NTOK, V);
    moe_ctx *c = tu_new_ctx(m, MOE_KV_F32, 1, n_batch);
    tu_step_ok(c, t, TU_NTOK);
    for (int i = 0; i < TU_NTOK; i++) memcpy(out + (size_t)i * (size_t)V, moe_logits(c, i), (size_t)V * sizeof(float));
    for (int i = 0; i < TU_NGEN; i++) {
        int32_t tok = argmax(moe_logits(c, -1), V);
        tu_step_ok(c, &tok, 1);
        memcpy(out + (size_t)(TU_NTOK + i) * (size_t)V, moe_logits(c, -1), (size_t)V * sizeof(float));
    }
    if (stats) assert_int_equal(moe_ctx_get_stats(c, stats), MOE_OK);
    moe_ctx_free(c);
}

/* the minimum working set named by the error of a load below it */
static inline uint64_t tu_min_from_error(void) {
    const char *e = strstr(moe_last_error(), "minimum working set of ");
    assert_non_null(e);
    return strtoull(e + strlen("minimum working set of "), NULL, 10);
}

/* The workload on a streamed model against the resident run's logits ref: bit for bit (the count
   of differing logits is named), every routed pair (pairs) a hit or a miss, and with cold set at
   least one miss and streamed bytes. The counters go to s; what names the run in a failure. */
static inline void tu_stream_check(moe_model *m, int n_batch, const float *ref, uint64_t pairs, int cold, moe_stats *s, const char *what) {
    moe_model_info info;
    assert_int_equal(moe_model_get_info(m, &info), MOE_OK);
    size_t all = (size_t)(TU_NTOK + TU_NGEN) * (size_t)info.n_vocab, bad = 0;
    float *got = calloc(all, sizeof(float));
    assert_non_null(got);
    tu_stream_workload(m, n_batch, got, s);
    for (size_t i = 0; i < all; i++) bad += memcmp(&got[i], &ref[i], sizeof(float)) != 0;
    free(got);
    if (bad) print_error("%s, n_batch %d: %zu of %zu logits differ from the resident run\n", what, n_batch, bad, all);
    assert_int_equal(bad, 0);
    assert_int_equal(s->expert_hits + s->expert_misses, pairs);
    if (cold) {
        assert_true(s->expert_misses > 0);
        assert_true(s->expert_bytes_streamed > 0);
    }
}

/* the teardown of every Vulkan test: the validation layer (MOE_VK_VALIDATION=1) must have said
   nothing (needs moe_vk.c, included before this header) */
static inline int teardown_validation(void **state) {
    (void)state;
    long n = g_vk_validation_messages;
    g_vk_validation_messages = 0;
    if (n) fprintf(stderr, "%ld validation message(s) (see above)\n", n);
    assert_int_equal(n, 0);
    return 0;
}

/* Runs a group of tests, or the part of it that two variables select, each a comma-separated list
   of shell patterns over the test names: MOE_TESTS (run only these) and MOE_TESTS_SKIP (not these).
   make test's AddressSanitizer pass skips the slowest Vulkan cases this way (they run in the plain
   pass, and all of them under ASan in make test-asan-full). Use: return tu_run_tests("name", tests); */
static inline int tu_name_in(const char *name, const char *list) {
    char pat[256];
    while (list && *list) {
        size_t n = strcspn(list, ",");
        if (n > 0 && n < sizeof pat) {
            memcpy(pat, list, n);
            pat[n] = 0;
            if (fnmatch(pat, name, 0) == 0) return 1;
        }
        list += n + (list[n] == ',');
    }
    return 0;
}

static inline int tu_run_selected(const char *group, const struct CMUnitTest *tests, size_t n, CMFixtureFunction setup,
                                  CMFixtureFunction teardown) {
    const char *only = getenv("MOE_TESTS"), *skip = getenv("MOE_TESTS_SKIP");
    struct CMUnitTest *sel = malloc((n ? n : 1) * sizeof *sel);
    if (!sel) return 1;
    size_t k = 0;
    for (size_t i = 0; i < n; i++)
        if ((!only || !*only || tu_name_in(tests[i].name, only)) && !tu_name_in(tests[i].name, skip)) sel[k++] = tests[i];
    if (k < n) print_message("%s: %zu of %zu tests selected (MOE_TESTS=%s MOE_TESTS_SKIP=%s)\n", group, k, n,
                             only ? only : "", skip ? skip : "");
    int rc = _cmocka_run_group_tests(group, sel, k, setup, teardown);
    free(sel);
    return rc;
}
#define tu_run_tests_with(group, tests, setup, teardown) \
    tu_run_selected(group, tests, sizeof(tests) / sizeof((tests)[0]), setup, teardown)
#define tu_run_tests(group, tests) tu_run_tests_with(group, tests, NULL, NULL)

#endif
