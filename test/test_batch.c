/* test_batch — moe_step_batch on the CPU backend: n contexts of one model in one forward pass.

   1. Contexts at different positions, with different n_tokens per call (prefill chunks longer
      than their n_batch mixed with one-token decode steps, some contexts sitting a call out), with
      and without logits_all, f16 and f32 KV caches: every call's logits equal those of the same
      steps taken one by one with moe_step, BIT FOR BIT (moe.h states a tolerance of 0 on the
      CPU), on Qwen3-MoE (int8 and f32 kernels), Gemma 4 (sliding-window rings, per-layer
      embeddings) and the hybrid Gated DeltaNet fixtures (recurrent states, checkpoints: a rewind
      after batched steps replays to the same bits).
   2. Errors (n_ctxs <= 0, NULL arrays or contexts, a context twice, two models, a full context,
      a bad token, n_tokens 0) and allocation failures leave every context exactly as it was: its
      position and logits, and its caches (the next step still equals the reference).
   3. The one-by-one path (a context that profiles): same results, and a failure in its second
      context takes the first one back.
   4. Vulkan (lavapipe here; skipped without a device unless MOE_REQUIRE_VULKAN=1): the same
      scenarios against separate Vulkan steps. The pass runs the row-wise kernels over all
      contexts' rows at once, so a matrix product of more than VK_MV_MAX rows takes the tiled
      matmul kernel where a context alone takes the matrix-vector one: another summation order,
      the same difference as Vulkan prefill against Vulkan decode, checked with test_vulkan's
      tolerance for that (TOL_SELF: max|d| / logit range <= 1e-5; f16 tensor-core tiles: 3e-3),
      and the greedy token of every row must be the same. Passes of at most VK_MV_MAX rows in
      all, one per context, are bit-identical (asserted). Attention runs per context on its own caches, and so do
      the hybrid models' conv and delta rule on their recurrent states (plain and chunked: passes
      of one row per context bit-identical, snapshots and rewinds through the checkpoints the
      passes wrote too; long prefills across the chunked delta rule's threshold within the
      tolerance). A cancel between passes and allocation failures leave every context as it
      was (Qwen3-MoE, and a hybrid: its states replayed after the cancel). The pass's lead keeps logits for the rows the contexts expose, not for every row of
      the pass (a 4-context prefill of 400 rows: 4 rows; logits_all contexts: all of theirs),
      grows when a call needs more, and ctxs[0]'s moe_ctx_get_stats counts it as scratch. */
#include "../moe.c"
#include "../moe_vk.c"
#include "../shaders_embedded.c"
#include "test_util.h"
#include "test_vk_probe.h"

#define Q8 "test/fixtures/qwen3moe_q8_0.gguf"
#define F32 "test/fixtures/qwen3moe_f32.gguf"
#define MAXC 6
#define TOL_SELF 1e-5 /* test_vulkan's: Vulkan against itself along another path (decode vs prefill kernels) */
#define TOL_CM 3e-3   /* the same with f16 tensor-core tiles (NVIDIA) */
/* f16 KV caches: a K or V element that differs in its last f32 bits may round to the neighbouring
   binary16 value (2^-11 relative), the class of error of an f16 cache: test_vulkan's TOL_F16 */
#define TOL_F16KV 2e-3

/* lavapipe keeps a few hundred bytes per VkInstance inside its driver: kept loaded so that those
   leaks carry its name, and exactly those are suppressed (as test_vulkan.c does) */
const char *__lsan_default_suppressions(void);
const char *__lsan_default_suppressions(void) { return "leak:libvulkan_lvp.so\n"; }
static void pin_driver(void) { (void)dlopen("libvulkan_lvp.so", RTLD_NOW | RTLD_NODELETE); }

static moe_model *load_cpu(const char *path, int exact) { return tu_load(path, MOE_BACKEND_CPU, 2, exact); }

/* the comparison of a scenario: tol < 0 bit for bit; else max|d| / logit range and the greedy
   token of every row; worst: the largest relative difference seen */
static double g_tol = -1, g_worst;
/* scenario's first call: prefills of 1..30 tokens, or of g_prefill..g_prefill + 59 */
static int g_prefill;

static moe_ctx *new_ctx(moe_model *m, int n_ctx, int n_batch, int logits_all, int kv) {
    moe_ctx_params cp = {0};
    cp.n_ctx = n_ctx;
    cp.n_batch = n_batch;
    cp.logits_all = logits_all;
    cp.kv_type = kv;
    moe_ctx *c = NULL;
    assert_int_equal(moe_ctx_new(m, &cp, &c), MOE_OK);
    return c;
}

/* the logits rows of a context's last step (all of them with logits_all) */
static int rows_of(moe_ctx *c, int n_tokens) { return c->logits_all ? n_tokens : 1; }

static void same_state(moe_ctx *a, moe_ctx *b, int n_tokens, int nv) {
    assert_int_equal(moe_ctx_pos(a), moe_ctx_pos(b));
    int rows = rows_of(a, n_tokens);
    for (int r = 0; r < rows; r++) {
        const float *la = moe_logits(a, a->logits_all ? r : -1), *lb = moe_logits(b, b->logits_all ? r : -1);
        assert_non_null(la);
        assert_non_null(lb);
        if (g_tol >= 0) {
            double e = row_rel_err(la, lb, nv);
            g_worst = e > g_worst ? e : g_worst;
            if (e > g_tol) fail_msg("row %d of %d: max|d| / range %.3e > %.1e", r, rows, e, g_tol);
            assert_int_equal(argmax(la, nv), argmax(lb, nv));
            continue;
        }
        if (memcmp(la, lb, (size_t)nv * sizeof(float))) {
            int i = 0;
            while (la[i] == lb[i]) i++;
            fail_msg("row %d of %d, logit %d: batched %.9g, alone %.9g", r, rows, i, (double)la[i], (double)lb[i]);
        }
    }
}

/* the tolerance of a scenario with this cache type: an f16 cache adds its rounding to what the
   path's own tolerance (g_tol) covers. With f16 tensor-core tiles the two add (gemma4/moe on an
   H100: 2.5e-3 with an f32 cache, 3.5e-3 with f16); without tiles TOL_SELF is far below
   TOL_F16KV, which then covers both. */
static double kv_tol(int kv) {
    if (g_tol < 0 || kv != MOE_KV_F16) return g_tol;
    return g_tol >= TOL_CM ? g_tol + TOL_F16KV : g_tol < TOL_F16KV ? TOL_F16KV : g_tol;
}

/* A scenario of n contexts (A batched, B stepped alone) over several calls: call 0 prefills
   1..30 tokens each (several chunks where n_batch is small), the later calls give one greedy token
   to most contexts, a chunk of a few tokens to some, and leave one out. Every call compares. */
static void scenario(moe_model *m, int n, const int *n_batch, const int *all, int kv, int n_calls, int rewind) {
    int nv = tu_vocab(m);
    double keep_tol = g_tol;
    g_tol = kv_tol(kv);
    moe_ctx *A[MAXC], *B[MAXC];
    for (int i = 0; i < n; i++) {
        A[i] = new_ctx(m, g_prefill ? 256 : 128, n_batch[i], all[i], kv);
        B[i] = new_ctx(m, g_prefill ? 256 : 128, n_batch[i], all[i], kv);
    }
    moe_token buf[MAXC][128];
    for (int call = 0; call < n_calls; call++) {
        moe_ctx *bc[MAXC];
        const moe_token *bt[MAXC];
        int32_t bn[MAXC], idx[MAXC], k = 0;
        for (int i = 0; i < n; i++) {
            if (call > 0 && (i + call) % 5 == 0) continue; /* sits this call out */
            int len;
            if (call == 0) len = g_prefill ? g_prefill + (i * 29 + 5) % 60 : 1 + (i * 13 + 5) % 30;
            else if ((i + call) % 4 == 0) len = 1 + (call * 3 + i) % 6;
            else len = 1;
            for (int t = 0; t < len; t++) buf[i][t] = (moe_token)((call * 31 + i * 17 + t * 7 + 3) % nv);
            if (call > 0 && len == 1) buf[i][0] = argmax(moe_logits(B[i], -1), nv);
            bc[k] = A[i], bt[k] = buf[i], bn[k] = len, idx[k++] = i;
        }
        assert_int_equal(moe_step_batch(bc, bt, bn, k), MOE_OK);
        for (int j = 0; j < k; j++) {
            assert_int_equal(moe_step(B[idx[j]], bt[j], bn[j]), MOE_OK);
            same_state(A[idx[j]], B[idx[j]], bn[j], nv);
        }
    }
    if (rewind) { /* checkpoints, chunk starts and rings kept by the batched steps replay alike */
        moe_ctx *bc[MAXC];
        const moe_token *bt[MAXC];
        int32_t bn[MAXC];
        for (int i = 0; i < n; i++) {
            int p = moe_ctx_pos(A[i]) * 2 / 3;
            assert_int_equal(moe_ctx_rewind(A[i], p), MOE_OK);
            assert_int_equal(moe_ctx_rewind(B[i], p), MOE_OK);
            bc[i] = A[i], bt[i] = buf[i], bn[i] = 1 + i % 3;
        }
        assert_int_equal(moe_step_batch(bc, bt, bn, n), MOE_OK);
        for (int i = 0; i < n; i++) {
            assert_int_equal(moe_step(B[i], bt[i], bn[i]), MOE_OK);
            same_state(A[i], B[i], bn[i], nv);
        }
    }
    for (int i = 0; i < n; i++) moe_ctx_free(A[i]), moe_ctx_free(B[i]);
    g_tol = keep_tol;
}

static const int k_nb[MAXC] = {256, 4, 7, 256, 16, 3}, k_all[MAXC] = {0, 1, 0, 0, 1, 0};

static void test_qwen3_int8(void **state) {
    (void)state;
    moe_model *m = load_cpu(Q8, 0);
    scenario(m, MAXC, k_nb, k_all, MOE_KV_F16, 7, 0);
    scenario(m, 3, k_nb + 2, k_all + 2, MOE_KV_F32, 4, 1);
    moe_model_free(m);
}

static void test_qwen3_f32(void **state) {
    (void)state;
    moe_model *m = load_cpu(F32, 1);
    scenario(m, 5, k_nb, k_all, MOE_KV_F32, 6, 1);
    moe_model_free(m);
}

static void test_gemma4(void **state) {
    (void)state;
    static const char *const dirs[] = {"test/fixtures/gemma4/moe", "test/fixtures/gemma4/e2b"};
    for (int f = 0; f < 2; f++) {
        moe_model *m = load_cpu(dirs[f], 0);
        scenario(m, 4, k_nb, k_all, MOE_KV_F16, 6, 1);
        moe_model_free(m);
    }
}

static void test_hybrid(void **state) {
    (void)state;
    static const char *const dirs[] = {"test/fixtures/qwen3next", "test/fixtures/qwen35moe", "test/fixtures/qwen35"};
    /* n_ctx 128 checkpoints every 64 positions: the long prefills below cross one */
    static const int nb[4] = {256, 5, 64, 9};
    for (int f = 0; f < 3; f++) {
        moe_model *m = load_cpu(dirs[f], 1);
        scenario(m, 4, nb, k_all, MOE_KV_F32, 8, 1);
        moe_model_free(m);
    }
}

/* ---- errors and allocation failures leave every context as it was ---- */
typedef struct snap { int32_t pos; float *logits; } snap;

static void snap_take(snap *s, moe_ctx *c, int nv) {
    s->pos = moe_ctx_pos(c);
    s->logits = malloc((size_t)nv * sizeof(float));
    memcpy(s->logits, moe_logits(c, -1), (size_t)nv * sizeof(float));
}
static void snap_check(const snap *s, moe_ctx *c, int nv) {
    assert_int_equal(moe_ctx_pos(c), s->pos);
    assert_memory_equal(moe_logits(c, -1), s->logits, (size_t)nv * sizeof(float));
}

/* allocation failures in a pass led by a fresh context F (the pass scratch is made in the call; F
   has 2 tokens of lead) with the contexts A (snapshots s) after it: every failure is
   MOE_ERR_NO_MEMORY with every context as it was; the steps that finally ran equal the same steps
   taken alone (G beside F, B beside A) */
static void check_alloc_failures(moe_model *m, moe_ctx *A[3], moe_ctx *B[3], snap s[3], const moe_token *lead,
                                 const moe_token *rest[3], int nv) {
    moe_ctx *F = new_ctx(m, 64, 0, 1, MOE_KV_F16), *G = new_ctx(m, 64, 0, 1, MOE_KV_F16);
    assert_int_equal(moe_step(F, lead, 2), MOE_OK);
    assert_int_equal(moe_step(G, lead, 2), MOE_OK);
    moe_ctx *fa[4] = {F, A[0], A[1], A[2]};
    const moe_token *ft[4] = {lead + 2, rest[0], rest[1], rest[2]};
    int32_t fn[4] = {6, 1, 2, 1};
    int failures = 0;
    for (long k = 0;; k++) {
        moe_test_fail_alloc_after(k);
        moe_status st = moe_step_batch(fa, ft, fn, 4);
        moe_test_fail_alloc_after(-1);
        if (st == MOE_OK) break;
        assert_int_equal(st, MOE_ERR_NO_MEMORY);
        assert_int_equal(moe_ctx_pos(F), 2);
        for (int i = 0; i < 3; i++) snap_check(&s[i], A[i], nv);
        failures++;
    }
    assert_true(failures >= 3);
    assert_int_equal(moe_step(G, ft[0], fn[0]), MOE_OK);
    same_state(F, G, fn[0], nv);
    for (int i = 0; i < 3; i++) {
        assert_int_equal(moe_step(B[i], ft[i + 1], fn[i + 1]), MOE_OK);
        same_state(A[i], B[i], fn[i + 1], nv);
    }
    moe_ctx_free(F);
    moe_ctx_free(G);
}


static void test_errors(void **state) {
    (void)state;
    moe_model *m = load_cpu(Q8, 0), *other = load_cpu(F32, 0);
    int nv = tu_vocab(m);
    moe_ctx *A[3] = {new_ctx(m, 64, 0, 0, MOE_KV_F16), new_ctx(m, 64, 0, 0, MOE_KV_F16), new_ctx(m, 32, 0, 0, MOE_KV_F16)};
    moe_ctx *B[3] = {new_ctx(m, 64, 0, 0, MOE_KV_F16), new_ctx(m, 64, 0, 0, MOE_KV_F16), new_ctx(m, 32, 0, 0, MOE_KV_F16)};
    moe_ctx *o = new_ctx(other, 64, 0, 0, MOE_KV_F16);
    moe_token p[3][32];
    int32_t n0[3] = {5, 11, 30};
    const moe_token *pt[3] = {p[0], p[1], p[2]};
    for (int i = 0; i < 3; i++)
        for (int t = 0; t < 32; t++) p[i][t] = (moe_token)((i * 101 + t * 13 + 1) % nv);
    assert_int_equal(moe_step_batch(A, pt, n0, 3), MOE_OK);
    for (int i = 0; i < 3; i++) assert_int_equal(moe_step(B[i], p[i], n0[i]), MOE_OK);
    assert_int_equal(moe_step(o, p[0], 4), MOE_OK);
    snap s[3];
    for (int i = 0; i < 3; i++) snap_take(&s[i], A[i], nv);

    int32_t one[3] = {1, 1, 1}, full[3] = {1, 1, 3}, zero[3] = {1, 1, 0};
    moe_token bad_lo[1] = {-1}, bad_hi[1] = {(moe_token)nv};
    const moe_token *t_lo[3] = {p[0], p[1], bad_lo}, *t_hi[3] = {p[0], p[1], bad_hi}, *t_null[3] = {p[0], p[1], NULL};
    moe_ctx *dup[3] = {A[0], A[1], A[0]}, *mixed[3] = {A[0], A[1], o}, *with_null[3] = {A[0], A[1], NULL};
    struct { moe_ctx *const *c; const moe_token *const *t; const int32_t *n; int32_t k; moe_status want; const char *what; } cases[] = {
        {A, pt, one, 0, MOE_ERR_INVALID_ARG, "n_ctxs"},
        {A, pt, one, -2, MOE_ERR_INVALID_ARG, "n_ctxs"},
        {NULL, pt, one, 3, MOE_ERR_INVALID_ARG, "NULL"},
        {A, NULL, one, 3, MOE_ERR_INVALID_ARG, "NULL"},
        {A, pt, NULL, 3, MOE_ERR_INVALID_ARG, "NULL"},
        {with_null, pt, one, 3, MOE_ERR_INVALID_ARG, "context 2"},
        {dup, pt, one, 3, MOE_ERR_INVALID_ARG, "again"},
        {mixed, pt, one, 3, MOE_ERR_INVALID_ARG, "another model"},
        {A, pt, full, 3, MOE_ERR_CONTEXT_FULL, "do not fit"},
        {A, t_lo, one, 3, MOE_ERR_INVALID_ARG, "outside the vocabulary"},
        {A, t_hi, one, 3, MOE_ERR_INVALID_ARG, "outside the vocabulary"},
        {A, t_null, one, 3, MOE_ERR_INVALID_ARG, "no tokens"},
        {A, pt, zero, 3, MOE_ERR_INVALID_ARG, "no tokens"},
    };
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
        assert_int_equal(moe_step_batch(cases[c].c, cases[c].t, cases[c].n, cases[c].k), cases[c].want);
        if (!strstr(moe_last_error(), cases[c].what)) fail_msg("case %zu: '%s' lacks '%s'", c, moe_last_error(), cases[c].what);
        for (int i = 0; i < 3; i++) snap_check(&s[i], A[i], nv);
    }
    const moe_token *rest[3] = {p[0] + 5, p[1] + 11, p[2] + 30};
    check_alloc_failures(m, A, B, s, p[2], rest, nv);
    for (int i = 0; i < 3; i++) free(s[i].logits), moe_ctx_free(A[i]), moe_ctx_free(B[i]);
    moe_ctx_free(o);
    moe_model_free(m), moe_model_free(other);
}

/* ---- contexts that cannot join a pass are stepped one by one, all or nothing ---- */
static void test_one_by_one(void **state) {
    (void)state;
    moe_model *m = load_cpu(Q8, 0);
    int nv = tu_vocab(m);
    moe_ctx *A[2] = {new_ctx(m, 64, 0, 0, MOE_KV_F16), new_ctx(m, 64, 0, 1, MOE_KV_F16)};
    moe_ctx *B[2] = {new_ctx(m, 64, 0, 0, MOE_KV_F16), new_ctx(m, 64, 0, 1, MOE_KV_F16)};
    assert_int_equal(moe_ctx_profile(A[1], 1), MOE_OK); /* profiling: one by one */
    moe_token p[2][16];
    for (int i = 0; i < 2; i++)
        for (int t = 0; t < 16; t++) p[i][t] = (moe_token)((i * 57 + t * 29 + 2) % nv);
    const moe_token *pt[2] = {p[0], p[1]};
    int32_t n0[2] = {3, 1};
    assert_int_equal(moe_step_batch(A, pt, n0, 2), MOE_OK);
    for (int i = 0; i < 2; i++) {
        assert_int_equal(moe_step(B[i], p[i], n0[i]), MOE_OK);
        same_state(A[i], B[i], n0[i], nv);
    }
    /* the second context's logits must grow (logits_all, 6 rows): failing there takes the first back */
    snap s0;
    snap_take(&s0, A[0], nv);
    const moe_token *pt2[2] = {p[0] + 3, p[1] + 1};
    int32_t n1[2] = {2, 6};
    int undone = 0;
    for (long k = 0;; k++) {
        moe_test_fail_alloc_after(k);
        moe_status st = moe_step_batch(A, pt2, n1, 2);
        moe_test_fail_alloc_after(-1);
        if (st == MOE_OK) break;
        assert_int_equal(st, MOE_ERR_NO_MEMORY);
        snap_check(&s0, A[0], nv);
        assert_int_equal(moe_ctx_pos(A[1]), 1);
        undone++;
    }
    assert_true(undone >= 1);
    for (int i = 0; i < 2; i++) {
        assert_int_equal(moe_step(B[i], pt2[i], n1[i]), MOE_OK);
        same_state(A[i], B[i], n1[i], nv);
    }
    free(s0.logits);
    for (int i = 0; i < 2; i++) moe_ctx_free(A[i]), moe_ctx_free(B[i]);
    moe_model_free(m);
}

/* ---- a cancel between passes, and allocation failures, leave every context as it was ---- */
static int32_t abort_countdown(void *user) { return --*(int *)user < 0; }

static void cancel_and_alloc(const char *path, int backend) {
    moe_model *m = tu_load(path, backend, 2, 0);
    g_tol = !m->vk ? -1 : m->vk->coopmat ? TOL_CM : TOL_SELF;
    int nv = tu_vocab(m), left = 1 << 30;
    moe_ctx *A[3], *B[3];
    for (int i = 0; i < 3; i++) {
        moe_ctx_params cp = {0};
        cp.n_ctx = 64, cp.n_batch = 4, cp.abort = i == 1 ? abort_countdown : NULL, cp.abort_user = i == 1 ? &left : NULL;
        if (moe_ctx_new(m, &cp, &A[i])) fail_msg("moe_ctx_new: %s", moe_last_error());
        B[i] = new_ctx(m, 64, 4, 0, MOE_KV_F16);
    }
    moe_token p[3][32];
    for (int i = 0; i < 3; i++)
        for (int t = 0; t < 32; t++) p[i][t] = (moe_token)((i * 71 + t * 11 + 5) % nv);
    const moe_token *pt[3] = {p[0], p[1], p[2]}, *pt2[3] = {p[0] + 3, p[1] + 2, p[2] + 5};
    int32_t n0[3] = {3, 2, 5}, n1[3] = {9, 17, 1}; /* the second call: 5 passes of n_batch 4 */
    assert_int_equal(moe_step_batch(A, pt, n0, 3), MOE_OK);
    for (int i = 0; i < 3; i++) assert_int_equal(moe_step(B[i], p[i], n0[i]), MOE_OK);
    snap s[3];
    for (int i = 0; i < 3; i++) snap_take(&s[i], A[i], nv);
    int cancels = 0;
    for (left = 0;; left = ++cancels) { /* the abort fires before pass 1, 2, ... */
        moe_status st = moe_step_batch(A, pt2, n1, 3);
        if (st == MOE_OK) break;
        assert_int_equal(st, MOE_ERR_CANCELLED);
        if (!strstr(moe_last_error(), "context 1")) fail_msg("'%s' names another context", moe_last_error());
        for (int i = 0; i < 3; i++) snap_check(&s[i], A[i], nv);
    }
    assert_int_equal(cancels, 5);
    for (int i = 0; i < 3; i++) {
        assert_int_equal(moe_step(B[i], pt2[i], n1[i]), MOE_OK);
        same_state(A[i], B[i], n1[i], nv);
        free(s[i].logits);
        snap_take(&s[i], A[i], nv);
    }
    left = 1 << 30;
    const moe_token *rest[3] = {p[0] + 12, p[1] + 19, p[2] + 6};
    check_alloc_failures(m, A, B, s, p[2], rest, nv);
    for (int i = 0; i < 3; i++) free(s[i].logits), moe_ctx_free(A[i]), moe_ctx_free(B[i]);
    moe_model_free(m);
}

static void test_cancel_cpu(void **state) {
    (void)state;
    cancel_and_alloc(Q8, MOE_BACKEND_CPU);
}

/* ---- Vulkan ---- */

static moe_model *load_vk(const char *path) {
    moe_model *m = tu_load(path, MOE_BACKEND_VULKAN, 2, 0);
    g_tol = m->vk->coopmat ? TOL_CM : TOL_SELF;
    g_worst = 0;
    return m;
}

/* n contexts decoding together, n <= VK_MV_MAX rows in all: the kernels a context runs alone, bit
   for bit */
static void vk_small_decode_bits(moe_model *m, int n) {
    int nv = tu_vocab(m);
    moe_ctx *A[MAXC], *B[MAXC];
    moe_token t[MAXC];
    for (int i = 0; i < n; i++) {
        A[i] = new_ctx(m, 128, 16, 0, MOE_KV_F16), B[i] = new_ctx(m, 128, 16, 0, MOE_KV_F16);
        moe_token pr[12];
        for (int j = 0; j < 12; j++) pr[j] = (moe_token)((i * 37 + j * 5 + 1) % nv);
        assert_int_equal(moe_step(A[i], pr, 3 + i), MOE_OK);
        assert_int_equal(moe_step(B[i], pr, 3 + i), MOE_OK);
    }
    double keep = g_tol;
    g_tol = -1;
    for (int call = 0; call < 4; call++) {
        const moe_token *tp[MAXC];
        int32_t one[MAXC];
        for (int i = 0; i < n; i++) t[i] = argmax(moe_logits(B[i], -1), nv), tp[i] = &t[i], one[i] = 1;
        assert_int_equal(moe_step_batch(A, tp, one, n), MOE_OK);
        for (int i = 0; i < n; i++) {
            assert_int_equal(moe_step(B[i], tp[i], 1), MOE_OK);
            same_state(A[i], B[i], 1, nv);
        }
    }
    g_tol = keep;
    for (int i = 0; i < n; i++) moe_ctx_free(A[i]), moe_ctx_free(B[i]);
}

static void test_vk_qwen3(void **state) {
    (void)state;
    NEED_VULKAN();
    moe_model *m = load_vk(Q8);
    vk_small_decode_bits(m, 4);
    scenario(m, MAXC, k_nb, k_all, MOE_KV_F32, 7, 0);
    printf("[ RESULT   ] vulkan batch qwen3moe_q8_0 f32 KV: max|d|/range %.3e (tol %.0e), greedy tokens identical\n", g_worst, g_tol);
    g_worst = 0;
    scenario(m, 3, k_nb + 2, k_all + 2, MOE_KV_F16, 4, 1);
    printf("[ RESULT   ] vulkan batch qwen3moe_q8_0 f16 KV: max|d|/range %.3e (tol %.0e), greedy tokens identical\n", g_worst, kv_tol(MOE_KV_F16));
    moe_model_free(m);
    m = load_vk(F32);
    scenario(m, 5, k_nb, k_all, MOE_KV_F32, 6, 1);
    printf("[ RESULT   ] vulkan batch qwen3moe_f32: max|d|/range %.3e (tol %.0e), greedy tokens identical\n", g_worst, g_tol);
    moe_model_free(m);
}

/* With f16 tensor-core tiles and an f16 cache the f16 scenario runs with gpu_exact: a context's
   chunks of <= VK_MV_MAX rows run the f32 matrix-vector kernels alone but f16 tiles in a larger
   pass, so its K and V differ by the tiles' 11-bit rounding before the cache rounds them again,
   and the scale-1 attention of these fixtures amplifies that step after step (gemma4/moe on an
   H100: 5.1e-2 of the range by a later decode step, greedy tokens still equal; with gpu_exact
   3.0e-4, as on lavapipe). The pass itself is what this test checks. */
static moe_model *load_vk_exact(const char *path) {
    moe_model *m = tu_load_exact(path, MOE_BACKEND_VULKAN, 2, 0, 1);
    g_tol = TOL_SELF;
    g_worst = 0;
    return m;
}

static void test_vk_gemma4(void **state) {
    (void)state;
    NEED_VULKAN();
    static const char *const dirs[] = {"test/fixtures/gemma4/moe", "test/fixtures/gemma4/e2b"};
    for (int f = 0; f < 2; f++) {
        moe_model *m = load_vk(dirs[f]);
        scenario(m, 4, k_nb, k_all, MOE_KV_F32, 6, 1);
        printf("[ RESULT   ] vulkan batch %s f32 KV: max|d|/range %.3e (tol %.0e), greedy tokens identical\n", dirs[f], g_worst, g_tol);
        g_worst = 0;
        if (m->vk->coopmat) {
            moe_model_free(m);
            m = load_vk_exact(dirs[f]);
            printf("[ INFO     ] f16 KV with gpu_exact (tensor-core tiles off; see load_vk_exact)\n");
        }
        scenario(m, 4, k_nb + 1, k_all + 1, MOE_KV_F16, 4, 0);
        printf("[ RESULT   ] vulkan batch %s f16 KV: max|d|/range %.3e (tol %.0e), greedy tokens identical\n", dirs[f], g_worst, kv_tol(MOE_KV_F16));
        moe_model_free(m);
    }
}

/* a's snapshot (moe_ctx_save: position, tokens, caches, recurrent states) equals b's, byte for byte */
static void same_snapshot(moe_ctx *a, moe_ctx *b) {
    size_t na = 0, nb = 0;
    assert_int_equal(moe_ctx_save(a, NULL, 0, &na), MOE_OK);
    assert_int_equal(moe_ctx_save(b, NULL, 0, &nb), MOE_OK);
    assert_int_equal(na, nb);
    uint8_t *sa = malloc(na), *sb = malloc(nb);
    assert_non_null(sa);
    assert_non_null(sb);
    assert_int_equal(moe_ctx_save(a, sa, na, &na), MOE_OK);
    assert_int_equal(moe_ctx_save(b, sb, nb, &nb), MOE_OK);
    if (memcmp(sa, sb, na)) {
        size_t i = 0;
        while (sa[i] == sb[i]) i++;
        fail_msg("snapshots of %zu bytes differ from byte %zu on", na, i);
    }
    free(sa), free(sb);
}

/* Hybrid passes of one row per context and at most VK_MV_MAX rows are bit-identical to lone
   steps (as vk_small_decode_bits; a segment of several rows takes the matrix-vector kernels at
   another width than alone): 4 contexts of n_batch 1 prefill 62..65 tokens together (passes of one
   token of each), so that batched passes write the checkpoint at 64; they decode, rewind behind
   and past the checkpoint (a replay from what the passes wrote) and step 1 or 2 tokens (a pass in
   which some contexts give no logits), and their snapshots, and a context loaded from one, match
   the lone contexts'. dn_chunk (MOE_VK_DN_CHUNK): "1" puts every segment on the chunked delta rule. */
static void vk_hybrid_bits(moe_model *m, const char *dn_chunk) {
    enum { N = 4 };
    int nv = tu_vocab(m);
    if (dn_chunk) setenv("MOE_VK_DN_CHUNK", dn_chunk, 1);
    moe_ctx *A[N], *B[N], *C = new_ctx(m, 128, 1, 0, MOE_KV_F32); /* C: loads a snapshot of A[1] */
    for (int i = 0; i < N; i++) A[i] = new_ctx(m, 128, 1, 0, MOE_KV_F32), B[i] = new_ctx(m, 128, 1, 0, MOE_KV_F32);
    if (dn_chunk) unsetenv("MOE_VK_DN_CHUNK");
    if (dn_chunk) assert_int_equal(((vk_ctx *)A[0]->be)->dn_chunk_min, atoi(dn_chunk));
    double keep = g_tol;
    g_tol = -1;
    moe_token pr[N][70];
    const moe_token *tp[N];
    int32_t len[N];
    for (int i = 0; i < N; i++) {
        for (int j = 0; j < 70; j++) pr[i][j] = (moe_token)((i * 37 + j * 5 + 1) % nv);
        tp[i] = pr[i], len[i] = 62 + i;
    }
    assert_int_equal(moe_step_batch(A, tp, len, N), MOE_OK);
    for (int i = 0; i < N; i++) {
        assert_int_equal(moe_step(B[i], tp[i], len[i]), MOE_OK);
        same_state(A[i], B[i], len[i], nv);
        assert_int_equal(A[i]->ckpt_ok[0], i >= 2); /* 64 and 65 tokens: past the checkpoint */
    }
    for (int call = 0; call < 4; call++) { /* decode: everyone crosses 64 */
        moe_token t[N];
        for (int i = 0; i < N; i++) t[i] = argmax(moe_logits(B[i], -1), nv), tp[i] = &t[i], len[i] = 1;
        assert_int_equal(moe_step_batch(A, tp, len, N), MOE_OK);
        for (int i = 0; i < N; i++) {
            assert_int_equal(moe_step(B[i], tp[i], 1), MOE_OK);
            same_state(A[i], B[i], 1, nv);
        }
    }
    for (int i = 0; i < N; i++) {
        assert_int_equal(A[i]->ckpt_ok[0], 1);
        same_snapshot(A[i], B[i]);
        int p = i % 2 ? 65 : 40; /* replays from the checkpoint the pass wrote, or from the start */
        assert_int_equal(moe_ctx_rewind(A[i], p), MOE_OK);
        assert_int_equal(moe_ctx_rewind(B[i], p), MOE_OK);
        tp[i] = pr[i] + 7, len[i] = 1 + i % 2;
    }
    assert_int_equal(moe_step_batch(A, tp, len, N), MOE_OK);
    for (int i = 0; i < N; i++) {
        assert_int_equal(moe_step(B[i], tp[i], len[i]), MOE_OK);

        same_state(A[i], B[i], len[i], nv);
        same_snapshot(A[i], B[i]);
    }
    /* a context loaded from a batched one's snapshot steps as the lone one */
    size_t sz = 0;
    assert_int_equal(moe_ctx_save(A[1], NULL, 0, &sz), MOE_OK);
    void *blob = malloc(sz);
    assert_non_null(blob);
    assert_int_equal(moe_ctx_save(A[1], blob, sz, &sz), MOE_OK);
    assert_int_equal(moe_ctx_load(C, blob, sz), MOE_OK);
    free(blob);
    moe_token t = argmax(moe_logits(B[1], -1), nv);
    assert_int_equal(moe_step(C, &t, 1), MOE_OK);
    assert_int_equal(moe_step(B[1], &t, 1), MOE_OK);
    same_state(C, B[1], 1, nv);
    moe_ctx_free(C);
    g_tol = keep;
    for (int i = 0; i < N; i++) moe_ctx_free(A[i]), moe_ctx_free(B[i]);
}

/* hybrids in the batched pass: the conv and delta rule per context on its own states */
static void test_vk_hybrid(void **state) {
    (void)state;
    NEED_VULKAN();
    static const char *const dirs[] = {"test/fixtures/qwen3next", "test/fixtures/qwen35moe", "test/fixtures/qwen35"};
    static const int nb[4] = {256, 5, 64, 9}, nb_long[4] = {128, 64, 100, 7};
    for (int f = 0; f < 3; f++) {
        moe_model *m = load_vk(dirs[f]);
        assert_null(moe_vk_batch_unsupported(m->vk));
        vk_hybrid_bits(m, NULL);
        if (f == 1) vk_hybrid_bits(m, "1"); /* (one fixture: the same kernels on the others) */
        scenario(m, 4, nb, k_all, MOE_KV_F32, 6, 1);
        g_prefill = 64; /* prefills of 64..123 tokens: the chunked delta rule (64 on) beside the plain one */
        scenario(m, 4, nb_long, k_all, MOE_KV_F32, 4, 1);
        g_prefill = 0;
        printf("[ RESULT   ] vulkan batch %s: max|d|/range %.3e (tol %.0e), greedy tokens identical\n", dirs[f], g_worst, g_tol);
        moe_model_free(m);
    }
}

/* the lead that owner keeps for its passes: rows rows, logits (the LM head's output and the
   readback) for outs rows; owner's stats count it as scratch (other: the same buffers, no lead) */
static void lead_logits(moe_ctx *owner, moe_ctx *other, int rows, int outs, int nv) {
    const vk_ctx *lead = owner->batch_vk;
    assert_non_null(lead);
    assert_int_equal(owner->batch_vk_rows, rows);
    assert_int_equal(owner->batch_vk_outs, outs);
    assert_int_equal(lead->logits_cap, outs);
    assert_int_equal(lead->logits.size, (VkDeviceSize)outs * (VkDeviceSize)nv * 4);
    assert_int_equal(lead->act[ACT_LOGITS].size, (VkDeviceSize)outs * (VkDeviceSize)nv * 4);
    moe_stats s0, s1, l = {0};
    moe_vk_ops.stats(lead, &l);
    assert_int_equal(moe_ctx_get_stats(owner, &s0), MOE_OK);
    assert_int_equal(moe_ctx_get_stats(other, &s1), MOE_OK);
    assert_int_equal(s0.gpu_bytes_scratch - s1.gpu_bytes_scratch, l.gpu_bytes_scratch + l.gpu_bytes_kv);
}

static void test_vk_scratch(void **state) {
    (void)state;
    NEED_VULKAN();
    moe_model *m = load_vk(Q8);
    int nv = tu_vocab(m);
    enum { N = 4, P = 100 };
    moe_ctx *A[N], *B[N];
    moe_token buf[N][P];
    const moe_token *bt[N];
    int32_t bn[N] = {P, P, 1, 1};
    for (int i = 0; i < N; i++) {
        A[i] = new_ctx(m, 256, 128, i >= 2, MOE_KV_F32); /* 2 and 3: logits_all */
        B[i] = new_ctx(m, 256, 128, i >= 2, MOE_KV_F32);
        for (int t = 0; t < P; t++) buf[i][t] = (moe_token)((i * 29 + t * 11 + 1) % nv);
        bt[i] = buf[i];
    }
    /* 0 and 1 prefill: 200 rows expose 2 */
    assert_int_equal(moe_step_batch(A, bt, bn, 2), MOE_OK);
    lead_logits(A[0], A[1], 2 * P, 2, nv);
    /* 0 and 1 decode: within that lead */
    bn[0] = bn[1] = 1;
    assert_int_equal(moe_step_batch(A, bt, bn, 2), MOE_OK);
    lead_logits(A[0], A[1], 2 * P, 2, nv);
    /* 0 and 1 decode, 2 and 3 (logits_all) prefill: 202 rows expose all 202: the lead grows */
    bn[2] = bn[3] = P;
    assert_int_equal(moe_step_batch(A, bt, bn, N), MOE_OK);
    lead_logits(A[0], A[1], 2 * P + 2, 2 * P + 2, nv);
    for (int i = 0; i < N; i++) { /* the same steps alone: the same logits */
        if (i < 2) {
            assert_int_equal(moe_step(B[i], bt[i], P), MOE_OK);
            assert_int_equal(moe_step(B[i], bt[i], 1), MOE_OK);
        }
        assert_int_equal(moe_step(B[i], bt[i], bn[i]), MOE_OK);
        same_state(A[i], B[i], bn[i], nv);
    }
    for (int i = 0; i < N; i++) moe_ctx_free(A[i]), moe_ctx_free(B[i]);
    moe_model_free(m);
}

/* ctxs[0]'s max_submit_us and low_priority hold for the pass: split into many submissions (1 us:
   one dispatch each) on ctxs[0]'s queue, with the logits of one submission, bit for bit */
static void test_vk_pass_params(void **state) {
    (void)state;
    NEED_VULKAN();
    moe_model *m = load_vk(Q8);
    int nv = tu_vocab(m);
    moe_ctx_params cp = {0};
    cp.n_ctx = 128;
    cp.n_batch = 32;
    moe_ctx *A[2], *B[2];
    for (int i = 0; i < 2; i++) {
        cp.max_submit_us = i ? 0 : 1, cp.low_priority = i ? 0 : 1;
        assert_int_equal(moe_ctx_new(m, &cp, &A[i]), MOE_OK);
        cp.max_submit_us = 0, cp.low_priority = 0;
        assert_int_equal(moe_ctx_new(m, &cp, &B[i]), MOE_OK);
    }
    moe_token t[2][24];
    for (int i = 0; i < 2; i++)
        for (int k = 0; k < 24; k++) t[i][k] = (moe_token)((i * 13 + k * 7 + 2) % nv);
    const moe_token *bt[2] = {t[0], t[1]};
    int32_t bn[2] = {24, 17};
    for (int call = 0; call < 2; call++) {
        assert_int_equal(moe_step_batch(A, bt, bn, 2), MOE_OK);
        assert_int_equal(moe_step_batch(B, bt, bn, 2), MOE_OK);
        for (int i = 0; i < 2; i++) assert_memory_equal(moe_logits(A[i], -1), moe_logits(B[i], -1), (size_t)nv * sizeof(float));
        bn[0] = bn[1] = 1; /* then a decode pass */
    }
    const vk_ctx *la = A[0]->batch_vk, *lb = B[0]->batch_vk;
    assert_true(la->queue == ((const vk_ctx *)A[0]->be)->queue);
    if (la->tpool) { /* timestamps: the capped lead submitted in parts */
        printf("[ RESULT   ] 2 passes: %llu submissions with max_submit_us 1, %llu without\n", (unsigned long long)la->sub_n,
               (unsigned long long)lb->sub_n);
        assert_true(la->sub_n > lb->sub_n && lb->sub_n == 2);
    }
    for (int i = 0; i < 2; i++) moe_ctx_free(A[i]), moe_ctx_free(B[i]);
    moe_model_free(m);
}

static void test_vk_cancel(void **state) {
    (void)state;
    NEED_VULKAN();
    cancel_and_alloc(Q8, MOE_BACKEND_VULKAN);
    cancel_and_alloc("test/fixtures/qwen35moe", MOE_BACKEND_VULKAN); /* recurrent states: replayed after a cancel */
}

int main(void) {
    pin_driver();
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_qwen3_int8),
        cmocka_unit_test(test_qwen3_f32),
        cmocka_unit_test(test_gemma4),
        cmocka_unit_test(test_hybrid),
        cmocka_unit_test(test_errors),
        cmocka_unit_test(test_one_by_one),
        cmocka_unit_test(test_cancel_cpu),
        cmocka_unit_test_teardown(test_vk_qwen3, teardown_validation),
        cmocka_unit_test_teardown(test_vk_gemma4, teardown_validation),
        cmocka_unit_test_teardown(test_vk_hybrid, teardown_validation),
        cmocka_unit_test_teardown(test_vk_scratch, teardown_validation),
        cmocka_unit_test_teardown(test_vk_pass_params, teardown_validation),
        cmocka_unit_test_teardown(test_vk_cancel, teardown_validation),
    };
    return tu_run_tests("batch", tests);
}
