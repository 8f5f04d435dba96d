/* test_vulkan — the Vulkan backend (moe_vk.c) against the CPU backend and against transformers.

   1. Per-op tests on random data, for every weight type (F32, F16, BF16, Q8_0, Q4_0, Q4_K, Q5_K,
      Q6_K, MXFP4): a synthetic one-layer model is built in memory, the same inputs go through the
      CPU ops (moe.c section 7, the semantic reference) and the Vulkan ops, and the outputs are
      compared: embedding lookup, matrix-vector (1..8 tokens) and matrix-matrix (> 8 tokens)
      products incl. an odd row count and a src_row0 offset, the MoE FFN (GPU router, experts
      through the indirection table, both paths, gate/up of different types), RMSNorm with and
      without weight, q/k-norm + NeoX RoPE, attention over an f16 and an f32 KV cache (prefill
      then decode at pos0 > 0), residual add.
   2. Every fixture test/fixtures/qwen3moe_*.gguf on Vulkan against its .ref (transformers float32
      logits on the exactly dequantized weights), with the same tolerances as test_forward on the
      CPU (TOL_F32 / TOL_F16 below), greedy continuation equal to the reference, greedy
      continuations of the CPU and Vulkan backends equal to each other, decode steps and chunked
      prefill against one prefill, rewind, and context save/load.
   3. Weights split over several storage windows (forced small), backend fallback and errors.

   Validation: run with MOE_VK_VALIDATION=1 (the Makefile's test target does) and every test ends
   by asserting that the Khronos validation layer reported no warning or error (a debug-utils
   messenger counts them). Without a usable Vulkan device every test skips, unless
   MOE_REQUIRE_VULKAN=1 (CI), where they fail instead; with MOE_REQUIRE_VULKAN=1 and
   MOE_VK_VALIDATION=1 the layer must actually be active. */
#include "../moe.c"
#include "../moe_vk.c"
#include "../shaders_embedded.c"
#include "test_util.h"
#include "test_vk_probe.h"
#include "test_async.h"

/* Tolerances, as max |ours - ref| / (max - min of the reference row), over all rows: the same
   as test_forward's for the CPU backend (see there for the derivation). The GPU sums in another
   order than the CPU's 8-lane dots (workgroup tree reductions, 16-element runs per thread, f32
   shared-memory tiles), which is the same kind of float32 rounding difference as the CPU has
   against transformers' GEMMs; measured ~1e-6 of the range against the CPU. */
#define TOL_F32 1e-4
#define TOL_F16 2e-3
/* per-op: max |vk - cpu| / max |cpu| over the output (K <= 256 terms per dot) */
#define TOL_OP 1e-5
#define TOL_OP_F16KV 2e-4
/* On devices with NV cooperative matrices (NVIDIA), prefill matmuls (more than 8 tokens, non-f32
   weights) run on f16 tensor cores: both operands are rounded to f16 (relative error 2^-11 ≈
   4.9e-4 each), accumulation stays f32. Measured on an H200: 1.6e-4..3.5e-4 per matmul (of
   max |out|), 4.5e-4..7.3e-4 of the logit range after a whole prefill. The router (f32 weights)
   never takes that path: its top-k choice must not flip. Tolerances there: */
#define TOL_OP_CM 2e-3
#define TOL_CM 3e-3 /* fixtures, f32 or f16 KV, and prefill vs decode (decode runs in f32) */

/* Mesa's lavapipe leaks a few hundred bytes per VkInstance (inside libvulkan_lvp.so, which the
   loader unloads again, leaving LeakSanitizer an unnamed module). The test keeps the driver loaded
   (RTLD_NODELETE) so that those leaks carry its name, and suppresses exactly those; leaks anywhere
   else still fail the AddressSanitizer run. */
const char *__lsan_default_suppressions(void);
const char *__lsan_default_suppressions(void) { return "leak:libvulkan_lvp.so\n"; }
static void pin_driver(void) { (void)dlopen("libvulkan_lvp.so", RTLD_NOW | RTLD_NODELETE); }

static char g_log_seen[2048];

static void test_log(int32_t level, const char *msg, void *user) {
    (void)user;
    if (level <= MOE_LOG_WARN) fprintf(stderr, "moe: %s\n", msg);
    size_t l = strlen(g_log_seen);
    snprintf(g_log_seen + l, sizeof g_log_seen - l, "%s\n", msg);
}


/* ---- a synthetic one-layer Qwen3-MoE model in memory ---- */
typedef struct rng_t { uint64_t s; } rng_t;
static uint64_t rng_u64(rng_t *r) {
    uint64_t z = (r->s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}
static float rng_f(rng_t *r) { return (float)((double)(rng_u64(r) >> 11) / 9007199254740992.0) * 2.0f - 1.0f; } /* U(-1, 1) */

typedef struct synth {
    moe_weights w;
    moe_layer layer;
    moe_cache_plan cache;
    void *mem[32];
    int n_mem;
    const uint8_t *tables[3][64];
} synth;

static void *synth_alloc(synth *s, size_t n) {
    assert_true(s->n_mem < 32);
    void *p = calloc(1, n ? n : 1);
    assert_non_null(p);
    s->mem[s->n_mem++] = p;
    return p;
}

/* a weight of the given type holding quantized U(-scale, scale) values (1-D: 1 + 0.2 U, f32) */
static void synth_weight(synth *s, moe_weight *w, const char *name, int32_t type, int n_dims, int64_t ne0, int64_t ne1, int64_t ne2,
                         float scale, rng_t *r) {
    memset(w, 0, sizeof *w);
    int64_t n = ne0 * ne1 * ne2;
    float *v = malloc((size_t)n * sizeof *v);
    assert_non_null(v);
    for (int64_t i = 0; i < n; i++) v[i] = n_dims == 1 ? 1.0f + 0.2f * rng_f(r) : scale * rng_f(r);
    const moe_type_traits *tt = type_traits(type);
    assert_non_null(tt);
    w->name = name;
    w->type = type;
    w->n_dims = n_dims;
    w->ne[0] = ne0;
    w->ne[1] = ne1;
    w->ne[2] = ne2;
    w->ne[3] = 1;
    w->row_bytes = type_row_bytes(type, ne0);
    assert_true(w->row_bytes > 0);
    w->nbytes = w->row_bytes * (uint64_t)(ne1 * ne2);
    uint8_t *blob = synth_alloc(s, (size_t)w->nbytes);
    tt->quant(v, blob, n);
    free(v);
    w->data = blob;
    if (n_dims == 3) {
        w->expert_bytes = w->row_bytes * (uint64_t)ne1;
        int k = !strcmp(name, "gate") ? 0 : !strcmp(name, "up") ? 1 : 2;
        for (int64_t e = 0; e < ne2; e++) s->tables[k][e] = blob + (uint64_t)e * w->expert_bytes;
        w->expert_data = s->tables[k];
    }
}

/* types: [0] token embedding and output, [1] attention, [2] gate, [3] up, [4] down */
static void synth_make_heads(synth *s, const int32_t types[5], int vocab, uint64_t seed, int head_dim, int n_head, int n_head_kv) {
    memset(s, 0, sizeof *s);
    rng_t r = {seed};
    moe_hparams *hp = &s->w.hp;
    hp->n_vocab = vocab;
    hp->n_embd = 256;
    hp->n_layer = 1;
    hp->n_head = n_head;
    hp->n_head_kv = n_head_kv;
    hp->head_dim = head_dim;
    hp->n_ctx_train = 4096;
    hp->n_expert = 8;
    hp->n_expert_used = 3;
    hp->n_ff_exp = 256;
    hp->n_cache = 1;
    hp->rms_eps = 1e-6f;
    moe_layer *L = &s->layer;
    moe_layer_plan *lp = &L->p;
    lp->attn_kind = MOE_ATTN_FULL;
    moe_attn at = {hp->n_head, hp->n_head_kv, hp->head_dim, 0, 1.0f / sqrtf((float)hp->head_dim), 0, 1};
    lp->attn = at;
    moe_rope rp = {64, 32, 64, 10000.0f};
    lp->rope = rp;
    lp->ffn_kind = MOE_FFN_MOE;
    lp->act = MOE_ACT_SILU;
    lp->n_expert = hp->n_expert;
    lp->n_expert_used = hp->n_expert_used;
    lp->n_ff_exp = hp->n_ff_exp;
    lp->norm_topk = 1;
    s->cache.layer = 0;
    s->cache.kv_width = hp->n_head_kv * hp->head_dim;
    s->w.caches = &s->cache;
    int E = hp->n_embd, Q = hp->n_head * hp->head_dim, KV = hp->n_head_kv * hp->head_dim;
    synth_weight(s, &s->w.g[MOE_TOK_EMBD], "token_embd", types[0], 2, E, vocab, 1, 1.0f, &r);
    synth_weight(s, &s->w.g[MOE_OUTPUT_NORM], "output_norm", MOE_TYPE_F32, 1, E, 1, 1, 0, &r);
    synth_weight(s, &s->w.g[MOE_OUTPUT], "output", types[0], 2, E, vocab, 1, 0.1f, &r);
    moe_weight *t = L->t;
    synth_weight(s, &t[MOE_ATTN_NORM], "attn_norm", MOE_TYPE_F32, 1, E, 1, 1, 0, &r);
    synth_weight(s, &t[MOE_WQ], "wq", types[1], 2, E, Q, 1, 0.1f, &r);
    synth_weight(s, &t[MOE_WK], "wk", types[1], 2, E, KV, 1, 0.1f, &r);
    synth_weight(s, &t[MOE_WV], "wv", types[1], 2, E, KV, 1, 0.1f, &r);
    synth_weight(s, &t[MOE_WO], "wo", types[1], 2, Q, E, 1, 0.1f, &r);
    synth_weight(s, &t[MOE_Q_NORM], "q_norm", MOE_TYPE_F32, 1, hp->head_dim, 1, 1, 0, &r);
    synth_weight(s, &t[MOE_K_NORM], "k_norm", MOE_TYPE_F32, 1, hp->head_dim, 1, 1, 0, &r);
    synth_weight(s, &t[MOE_FFN_NORM], "ffn_norm", MOE_TYPE_F32, 1, E, 1, 1, 0, &r);
    synth_weight(s, &t[MOE_ROUTER], "router", MOE_TYPE_F32, 2, E, hp->n_expert, 1, 0.3f, &r);
    synth_weight(s, &t[MOE_GATE_EXPS], "gate", types[2], 3, E, hp->n_ff_exp, hp->n_expert, 0.1f, &r);
    synth_weight(s, &t[MOE_UP_EXPS], "up", types[3], 3, E, hp->n_ff_exp, hp->n_expert, 0.1f, &r);
    synth_weight(s, &t[MOE_DOWN_EXPS], "down", types[4], 3, hp->n_ff_exp, E, hp->n_expert, 0.1f, &r);
    s->w.layers = L;
}

static void synth_make_hd(synth *s, const int32_t types[5], int vocab, uint64_t seed, int head_dim) {
    synth_make_heads(s, types, vocab, seed, head_dim, 4, 2);
}
static void synth_make(synth *s, const int32_t types[5], int vocab, uint64_t seed) { synth_make_hd(s, types, vocab, seed, 64); }

static void synth_free(synth *s) {
    for (int i = 0; i < s->n_mem; i++) free(s->mem[i]);
    s->n_mem = 0;
}

/* ---- the same ops on a CPU context and a Vulkan context of one synthetic model ---- */
typedef struct pair {
    synth *s;
    moe_vk_backend *vk;
    void *cpu, *gpu;
    thread_pool *pool;         /* the CPU context's threads (a model's pool, in the library) */
    int n_batch;
} pair;

static void pair_new_ctx(pair *p, synth *s, int32_t kv_type, int n_batch, int n_ctx) {
    memset(p, 0, sizeof *p);
    p->s = s;
    p->n_batch = n_batch;
    moe_ctx_shape sh = {n_ctx, n_batch, kv_type, 1, 2, 1, NULL, NULL, 0, 0, 0, 0, 0}; /* the CPU reference in exact (f32) mode */
    assert_int_equal(pool_new(sh.n_threads, &p->pool), MOE_OK);
    assert_int_equal(cpu_ctx_new(&s->w, &sh, p->pool, &p->cpu), MOE_OK);
    moe_status st = moe_vk_init(&s->w, 0, 0, test_log, NULL, &p->vk);
    if (st) print_error("moe_vk_init: %s (%s)\n", moe_status_str(st), moe_last_error());
    assert_int_equal(st, MOE_OK);
    st = moe_vk_ctx_new(p->vk, &sh, &p->gpu);
    if (st) print_error("moe_vk_ctx_new: %s (%s)\n", moe_status_str(st), moe_last_error());
    assert_int_equal(st, MOE_OK);
}

static void pair_new(pair *p, synth *s, int32_t kv_type, int n_batch) { pair_new_ctx(p, s, kv_type, n_batch, 256); }

static void pair_free(pair *p) {
    moe_vk_ctx_free(p->gpu);
    moe_vk_free(p->vk);
    cpu_ctx_free(p->cpu);
    pool_free(p->pool);
}

static size_t role_bytes(pair *p, int role, int rows) { return (size_t)rows * (size_t)act_width(&p->s->w, role) * sizeof(float); }

static void gpu_xfer(pair *p, int role, float *host, int rows, int download) {
    vk_ctx *c = p->gpu;
    vk_xfer x;
    assert_int_equal(vk_xfer_begin(c->vk, &x, (VkDeviceSize)1 << 20, download), MOE_OK);
    vk_xfer_copy(&x, (uint8_t *)host, role_bytes(p, role, rows), c->act[role].buf, 0);
    assert_int_equal(vk_xfer_end(&x), MOE_OK);
}

/* random rows of U(-scale, scale) into role on both backends */
static void pair_rand(pair *p, int role, int rows, float scale, rng_t *r) {
    size_t n = role_bytes(p, role, rows) / sizeof(float);
    float *x = malloc(n * sizeof *x);
    assert_non_null(x);
    for (size_t i = 0; i < n; i++) x[i] = scale * rng_f(r);
    memcpy(((cpu_ctx *)p->cpu)->act[role], x, n * sizeof *x);
    gpu_xfer(p, role, x, rows, 0);
    free(x);
}

/* max |gpu - cpu| / max |cpu| over rows of role; both must be finite */
static double pair_err(pair *p, int role, int rows) {
    size_t n = role_bytes(p, role, rows) / sizeof(float);
    float *g = malloc(n * sizeof *g);
    assert_non_null(g);
    gpu_xfer(p, role, g, rows, 1);
    const float *c = ((cpu_ctx *)p->cpu)->act[role];
    assert_true(all_finite(g, n));
    assert_true(all_finite(c, n));
    double d = 0, m = 0;
    for (size_t i = 0; i < n; i++) {
        d = fmax(d, fabs((double)g[i] - (double)c[i]));
        m = fmax(m, fabs((double)c[i]));
    }
    free(g);
    return d / fmax(m, 1e-30);
}

static void gpu_begin(pair *p) { moe_vk_ops.begin_step(p->gpu); }
static void gpu_end(pair *p) {
    moe_status st = moe_vk_ops.end_step(p->gpu);
    if (st) print_error("end_step: %s (%s)\n", moe_status_str(st), moe_last_error());
    assert_int_equal(st, MOE_OK);
}

#define CHECK_ERR(what, err, tol)                                                              \
    do {                                                                                       \
        double e_ = (err);                                                                     \
        if (!(e_ <= (tol))) print_error("%s: relative error %.3e > %.1e\n", what, e_, (double)(tol)); \
        assert_true(e_ <= (tol));                                                              \
        if (e_ > worst) worst = e_;                                                            \
    } while (0)

static const int32_t k_all_types[9] = {MOE_TYPE_F32, MOE_TYPE_F16, MOE_TYPE_BF16, MOE_TYPE_Q8_0, MOE_TYPE_Q4_0,
                                       MOE_TYPE_Q4_K, MOE_TYPE_Q5_K, MOE_TYPE_Q6_K, MOE_TYPE_MXFP4};

/* embedding, matvec / matmul (odd row count, row offsets), MoE FFN and the whole forward pass */
static void run_type_ops(const int32_t types[5], const char *label, int vocab) {
    synth s;
    synth_make(&s, types, vocab, 0x1234u + (uint64_t)types[0] * 77u + (uint64_t)types[4]);
    pair p;
    pair_new(&p, &s, MOE_KV_F32, 64);
    if (g_vk_window_cap_override) { /* the split test: the embedding and output in parts, experts over windows */
        printf("[ INFO     ] %u weight windows; token embedding in %u parts\n", p.vk->n_win, p.vk->wts[0].n_parts);
        assert_true(p.vk->wts[0].n_parts >= 2);
        assert_true(p.vk->n_win >= 6);
    }
    rng_t r = {99};
    const moe_hparams *hp = &s.w.hp;
    const int cm = p.vk->coopmat;
    double worst = 0;
    char what[96];
    /* embedding */
    moe_token tok[7];
    for (int i = 0; i < 7; i++) tok[i] = (moe_token)(rng_u64(&r) % (uint64_t)hp->n_vocab);
    k_cpu_ops.embed(p.cpu, ACT_X, &s.w.g[MOE_TOK_EMBD], tok, 7);
    gpu_begin(&p);
    moe_vk_ops.embed(p.gpu, ACT_X, &s.w.g[MOE_TOK_EMBD], tok, 7);
    gpu_end(&p);
    snprintf(what, sizeof what, "%s embed", label);
    CHECK_ERR(what, pair_err(&p, ACT_X, 7), 1e-7);
    /* matmuls: matvec up to 8 columns, matmul beyond; the output has 333 rows */
    pair_rand(&p, ACT_XN, 40, 1.0f, &r);
    static const int ns[] = {1, 2, 8, 9, 37};
    for (size_t i = 0; i < sizeof ns / sizeof ns[0]; i++)
        for (int row0 = 0; row0 < 2; row0++) {
            int n = ns[i];
            k_cpu_ops.matmul(p.cpu, ACT_Q, &s.layer.t[MOE_WQ], ACT_XN, row0, n);
            k_cpu_ops.matmul(p.cpu, ACT_LOGITS, &s.w.g[MOE_OUTPUT], ACT_XN, row0, n);
            gpu_begin(&p);
            moe_vk_ops.matmul(p.gpu, ACT_Q, &s.layer.t[MOE_WQ], ACT_XN, row0, n);
            moe_vk_ops.matmul(p.gpu, ACT_LOGITS, &s.w.g[MOE_OUTPUT], ACT_XN, row0, n);
            gpu_end(&p);
            snprintf(what, sizeof what, "%s matmul n=%d row0=%d", label, n, row0);
            double tol = cm && n > VK_MV_MAX && types[1] != MOE_TYPE_F32 ? TOL_OP_CM : TOL_OP;
            CHECK_ERR(what, pair_err(&p, ACT_Q, n), tol);
            tol = cm && n > VK_MV_MAX && types[0] != MOE_TYPE_F32 ? TOL_OP_CM : TOL_OP;
            CHECK_ERR(what, pair_err(&p, ACT_LOGITS, n), tol);
        }
    /* MoE FFN: router logits spread out so that no top-k choice is a near tie */
    pair_rand(&p, ACT_ROUTER, 40, 3.0f, &r);
    static const int nm[] = {1, 2, 8, 40};
    for (size_t i = 0; i < sizeof nm / sizeof nm[0]; i++) {
        const moe_layer *L = &s.layer;
        moe_route rt = {L->p.n_expert, L->p.n_expert_used, L->p.norm_topk, NULL};
        const moe_ops *ops[2] = {&k_cpu_ops, &moe_vk_ops};
        for (int b = 0; b < 2; b++) { /* route over the logits already in ACT_ROUTER */
            void *be = b ? p.gpu : p.cpu;
            if (b) gpu_begin(&p);
            ops[b]->route(be, NULL, &rt, ACT_XN, nm[i]);
            ops[b]->experts_glu(be, moe_lw(L, MOE_GATE_EXPS), moe_lw(L, MOE_UP_EXPS), L->p.act, ACT_XN, nm[i]);
            ops[b]->experts_down(be, ACT_OUT, moe_lw(L, MOE_DOWN_EXPS), nm[i]);
            if (b) gpu_end(&p);
        }
        snprintf(what, sizeof what, "%s moe_ffn n=%d", label, nm[i]);
        CHECK_ERR(what, pair_err(&p, ACT_OUT, nm[i]), cm && nm[i] > VK_MV_MAX ? TOL_OP_CM : TOL_OP);
    }
    /* the whole forward pass: a prefill of 12 tokens, then two decode steps */
    moe_token seq[14];
    for (int i = 0; i < 14; i++) seq[i] = (moe_token)(rng_u64(&r) % (uint64_t)hp->n_vocab);
    int chunks[3][2] = {{0, 12}, {12, 1}, {13, 1}};
    for (int ch = 0; ch < 3; ch++) {
        int pos0 = chunks[ch][0], n = chunks[ch][1];
        forward_qwen3moe(p.cpu, &k_cpu_ops, &s.w, seq + pos0, n, pos0, n);
        gpu_begin(&p);
        forward_qwen3moe(p.gpu, &moe_vk_ops, &s.w, seq + pos0, n, pos0, n);
        gpu_end(&p);
        snprintf(what, sizeof what, "%s forward pos0=%d n=%d", label, pos0, n);
        CHECK_ERR(what, pair_err(&p, ACT_LOGITS, n), cm ? TOL_CM : 1e-4);
    }
    printf("[ RESULT   ] %-26s worst relative error vs CPU %.2e\n", label, worst);
    pair_free(&p);
    synth_free(&s);
}

static void test_ops_type(void **state) {
    NEED_VULKAN();
    int32_t t = *(const int32_t *)*state;
    int32_t types[5] = {t, t, t, t, t};
    char label[32];
    snprintf(label, sizeof label, "%s", type_traits(t)->name);
    run_type_ops(types, label, 333);
}

/* gate, up and down of three different types (gate and up then run as two passes) */
static void test_ops_mixed_experts(void **state) {
    (void)state;
    NEED_VULKAN();
    int32_t types[5] = {MOE_TYPE_Q8_0, MOE_TYPE_Q4_K, MOE_TYPE_Q4_K, MOE_TYPE_Q6_K, MOE_TYPE_Q5_K};
    run_type_ops(types, "mixed q4_K/q6_K/q5_K", 333);
}

/* RMSNorm (with / without weight, per head in place), q/k-norm + RoPE (fused) and RoPE alone,
   attention over an f32 and an f16 cache (prefill, then chunks at pos0 > 0), residual adds */
static void test_ops_common(void **state) {
    (void)state;
    NEED_VULKAN();
    int32_t types[5] = {MOE_TYPE_F32, MOE_TYPE_F32, MOE_TYPE_F32, MOE_TYPE_F32, MOE_TYPE_F32};
    synth s;
    synth_make(&s, types, 64, 7);
    const moe_hparams *hp = &s.w.hp;
    const moe_layer *L = &s.layer;
    double worst = 0;
    rng_t r = {5};
    for (int kv = 0; kv < 2; kv++) {
        pair p;
        pair_new(&p, &s, kv ? MOE_KV_F16 : MOE_KV_F32, 32);
        double tol_attn = kv ? TOL_OP_F16KV : TOL_OP;
        /* rmsnorm with and without a weight */
        pair_rand(&p, ACT_X, 5, 2.0f, &r);
        k_cpu_ops.rmsnorm(p.cpu, ACT_XN, ACT_X, &L->t[MOE_ATTN_NORM], 5, hp->n_embd, hp->rms_eps);
        k_cpu_ops.rmsnorm(p.cpu, ACT_OUT, ACT_X, NULL, 5, hp->n_embd, hp->rms_eps);
        gpu_begin(&p);
        moe_vk_ops.rmsnorm(p.gpu, ACT_XN, ACT_X, &L->t[MOE_ATTN_NORM], 5, hp->n_embd, hp->rms_eps);
        moe_vk_ops.rmsnorm(p.gpu, ACT_OUT, ACT_X, NULL, 5, hp->n_embd, hp->rms_eps);
        gpu_end(&p);
        CHECK_ERR("rmsnorm", pair_err(&p, ACT_XN, 5), TOL_OP);
        CHECK_ERR("rmsnorm (no weight)", pair_err(&p, ACT_OUT, 5), TOL_OP);
        /* q/k norm then rope, as the forward pass records them (fused on the GPU), at pos0 = 7 */
        pair_rand(&p, ACT_Q, 5, 2.0f, &r);
        pair_rand(&p, ACT_K, 5, 2.0f, &r);
        const moe_ops *ops[2] = {&k_cpu_ops, &moe_vk_ops};
        for (int b = 0; b < 2; b++) {
            void *be = b ? p.gpu : p.cpu;
            if (b) gpu_begin(&p);
            ops[b]->rmsnorm(be, ACT_Q, ACT_Q, &L->t[MOE_Q_NORM], 5 * hp->n_head, hp->head_dim, hp->rms_eps);
            ops[b]->rmsnorm(be, ACT_K, ACT_K, &L->t[MOE_K_NORM], 5 * hp->n_head_kv, hp->head_dim, hp->rms_eps);
            ops[b]->rope(be, ACT_Q, 5, hp->n_head, hp->head_dim, &L->p.rope, 7);
            ops[b]->rope(be, ACT_K, 5, hp->n_head_kv, hp->head_dim, &L->p.rope, 7);
            if (b) gpu_end(&p);
        }
        CHECK_ERR("q-norm + rope", pair_err(&p, ACT_Q, 5), TOL_OP);
        CHECK_ERR("k-norm + rope", pair_err(&p, ACT_K, 5), TOL_OP);
        /* rope alone, at positions up to 200 */
        pair_rand(&p, ACT_Q, 5, 2.0f, &r);
        k_cpu_ops.rope(p.cpu, ACT_Q, 5, hp->n_head, hp->head_dim, &L->p.rope, 195);
        gpu_begin(&p);
        moe_vk_ops.rope(p.gpu, ACT_Q, 5, hp->n_head, hp->head_dim, &L->p.rope, 195);
        gpu_end(&p);
        CHECK_ERR("rope", pair_err(&p, ACT_Q, 5), TOL_OP);
        /* attention: 6 tokens at 0, then 3 at 6, then 1 at 9 */
        static const int chunk[3][2] = {{0, 6}, {6, 3}, {9, 1}};
        for (int ch = 0; ch < 3; ch++) {
            int pos0 = chunk[ch][0], n = chunk[ch][1];
            pair_rand(&p, ACT_Q, n, 1.0f, &r);
            pair_rand(&p, ACT_K, n, 1.0f, &r);
            pair_rand(&p, ACT_V, n, 1.0f, &r);
            moe_attn a = L->p.attn;
            a.scale = 1.0f / sqrtf((float)hp->head_dim) * 4.0f; /* sharper than usual: softmax not flat */
            k_cpu_ops.attention(p.cpu, &a, n, pos0);
            gpu_begin(&p);
            moe_vk_ops.attention(p.gpu, &a, n, pos0);
            gpu_end(&p);
            char what[64];
            snprintf(what, sizeof what, "attention (%s KV) pos0=%d n=%d", kv ? "f16" : "f32", pos0, n);
            CHECK_ERR(what, pair_err(&p, ACT_ATTN, n), tol_attn);
        }
        /* add, alone and folded into the matmul before it (mv and mm paths) */
        pair_rand(&p, ACT_X, 20, 1.0f, &r);
        pair_rand(&p, ACT_OUT, 20, 1.0f, &r);
        k_cpu_ops.add(p.cpu, ACT_X, ACT_OUT, 20, hp->n_embd);
        gpu_begin(&p);
        moe_vk_ops.add(p.gpu, ACT_X, ACT_OUT, 20, hp->n_embd);
        gpu_end(&p);
        CHECK_ERR("add", pair_err(&p, ACT_X, 20), TOL_OP);
        pair_rand(&p, ACT_ATTN, 20, 1.0f, &r);
        static const int na[2] = {3, 20};
        for (int i = 0; i < 2; i++) {
            for (int b = 0; b < 2; b++) {
                void *be = b ? p.gpu : p.cpu;
                if (b) gpu_begin(&p);
                ops[b]->matmul(be, ACT_OUT, &L->t[MOE_WO], ACT_ATTN, 0, na[i]);
                ops[b]->add(be, ACT_X, ACT_OUT, na[i], hp->n_embd);
                if (b) gpu_end(&p);
            }
            CHECK_ERR("matmul + residual add", pair_err(&p, ACT_X, na[i]), p.vk->coopmat && na[i] > VK_MV_MAX ? TOL_OP_CM : TOL_OP);
        }
        pair_free(&p);
    }
    printf("[ RESULT   ] %-26s worst relative error vs CPU %.2e\n", "norm/rope/attention/add", worst);
    synth_free(&s);
}

/* ---- fixtures: Vulkan against transformers, and against the CPU backend ---- */
/* ---- long-context attention kernels against the CPU, f32 and f16 KV, with and without sliding
   windows. Split-KV decode (moe_vk.c VK_SPLIT_MIN): a decode token over more than 128 keys on
   this small grid runs attn.comp -DSPLIT on chunks of the keys, the last workgroup of each KV
   group merging the partials: at 513 keys (17 chunks of 32, the last of one key), 1,026 and
   1,798 (windows 700, 513, 300 and 1,000 all split; each dispatch reuses the arrival
   counters that the one before it reset). Tiled
   prefill (VK_TILE_MIN): steps of more than 128 tokens run attn_tile.comp, also with partial
   query blocks (250, 156, 129 tokens) and windows; 128 and fewer stay on attn.comp. Head sizes
   64 and 128 (Qwen3-30B's), 4 query heads on 2 KV heads (attn.comp serves both heads of a group
   in one workgroup), then 16 on 2 (8 per workgroup, as Qwen3-30B's 32 on 4) ---- */
static void test_attn_long(void **state) {
    (void)state;
    NEED_VULKAN();
    int32_t types[5] = {MOE_TYPE_F32, MOE_TYPE_F32, MOE_TYPE_F32, MOE_TYPE_F32, MOE_TYPE_F32};
    rng_t r = {9};
    /* (pos0, n, window) */
    static const int steps[][3] = {{0, 256, 0},     {256, 256, 0},   {512, 1, 0},      {513, 250, 0},   {763, 256, 0},
                                   {1019, 6, 0},    {1025, 1, 0},    {1026, 1, 700},  {1027, 1, 513},   {1028, 1, 300},  {1029, 100, 300},
                                   {1129, 256, 0},  {1385, 256, 700}, {1641, 156, 300},  {1797, 1, 0},    {1798, 1, 1000},
                                   {1799, 129, 0},  {1928, 128, 0}};
    for (int run = 0; run < 6; run++) { /* head size 64 and 128 (Qwen3-30B's), f32 and f16 KV; then groups of 8 */
        int kv = run & 1, hd = run < 2 || run == 4 ? 64 : 128, nh = run < 4 ? 4 : 16;
        synth s;
        synth_make_heads(&s, types, 64, 11, hd, nh, 2);
        const moe_hparams *hp = &s.w.hp;
        pair p;
        pair_new_ctx(&p, &s, kv ? MOE_KV_F16 : MOE_KV_F32, 256, 2304);
        double tol = kv ? TOL_OP_F16KV : TOL_OP, worst = 0;
        for (size_t i = 0; i < sizeof steps / sizeof steps[0]; i++) {
            int pos0 = steps[i][0], n = steps[i][1];
            pair_rand(&p, ACT_Q, n, 1.0f, &r);
            pair_rand(&p, ACT_K, n, 1.0f, &r);
            pair_rand(&p, ACT_V, n, 1.0f, &r);
            moe_attn a = s.layer.p.attn;
            a.window = steps[i][2];
            a.scale = 1.0f / sqrtf((float)hp->head_dim) * 4.0f; /* sharper than usual: softmax not flat */
            k_cpu_ops.attention(p.cpu, &a, n, pos0);
            gpu_begin(&p);
            moe_vk_ops.attention(p.gpu, &a, n, pos0);
            gpu_end(&p);
            char what[96];
            snprintf(what, sizeof what, "attention (%d heads, head %d, %s KV) pos0=%d n=%d window=%d", nh, hd, kv ? "f16" : "f32", pos0, n, a.window);
            double e = pair_err(&p, ACT_ATTN, n);
            worst = fmax(worst, e);
            CHECK_ERR(what, e, tol);
        }
        printf("[ RESULT   ] split-KV decode and tiled prefill attention, %d heads on 2, head %d, %s KV: max|d|/max %.3e (tol %.0e)\n", nh, hd,
               kv ? "f16" : "f32", worst, tol);
        pair_free(&p);
        synth_free(&s);
    }
}

static moe_model *load_model(const char *path, int32_t backend) {
    moe_load_params lp = {0};
    lp.backend = backend;
    lp.n_threads = 2;
    lp.cpu_exact = 1; /* the CPU side is the f32 reference */
    lp.log = test_log;
    moe_model *m = NULL;
    moe_status st = moe_load(path, &lp, &m);
    if (st != MOE_OK) print_error("moe_load(%s): %s (%s)\n", path, moe_status_str(st), moe_last_error());
    assert_int_equal(st, MOE_OK);
    moe_model_info info;
    assert_int_equal(moe_model_get_info(m, &info), MOE_OK);
    assert_int_equal(info.backend, backend);
    return m;
}


static void step_ok(moe_ctx *c, const int32_t *tokens, int n) {
    moe_status st = moe_step(c, tokens, n);
    if (st != MOE_OK) print_error("moe_step: %s (%s)\n", moe_status_str(st), moe_last_error());
    assert_int_equal(st, MOE_OK);
}

static void prefill_rows(moe_ctx *c, const int32_t *tokens, int n, int n_vocab, float *out) {
    step_ok(c, tokens, n);
    for (int i = 0; i < n; i++) {
        const float *l = moe_logits(c, i);
        assert_non_null(l);
        memcpy(out + (size_t)i * (size_t)n_vocab, l, (size_t)n_vocab * sizeof(float));
    }
}

static double max_row_err(const float *a, const float *ref, int rows, int n_vocab) {
    double e = 0;
    for (int i = 0; i < rows; i++) e = fmax(e, row_rel_err(a + (size_t)i * (size_t)n_vocab, ref + (size_t)i * (size_t)n_vocab, n_vocab));
    return e;
}

/* greedy continuation of the reference prompt */
static void greedy(moe_model *m, int32_t kv, const ref_data *r, int32_t *gen, int ng) {
    moe_ctx *c = tu_new_ctx(m, kv, 0, 0);
    step_ok(c, r->tokens, r->n_prompt);
    for (int i = 0; i < ng; i++) {
        const float *l = moe_logits(c, -1);
        assert_non_null(l);
        assert_true(all_finite(l, (size_t)r->n_vocab));
        gen[i] = argmax(l, r->n_vocab);
        step_ok(c, &gen[i], 1);
    }
    moe_ctx_free(c);
}

#define TOL_SELF 1e-5 /* Vulkan against itself along another path (decode vs prefill kernels, chunking) */

static void run_fixture(void **state) {
    NEED_VULKAN();
    const char *name = *state;
    char gguf[256], refp[256];
    snprintf(gguf, sizeof gguf, "test/fixtures/qwen3moe_%s.gguf", name);
    snprintf(refp, sizeof refp, "test/fixtures/qwen3moe_%s.ref", name);
    ref_data r;
    int rc = ref_load(refp, &r);
    if (rc) print_error("%s: cannot read or parse (%d); run the tests from the repository root\n", refp, rc);
    assert_int_equal(rc, 0);
    moe_model *mv = load_model(gguf, MOE_BACKEND_VULKAN), *mc = load_model(gguf, MOE_BACKEND_CPU);
    if (vk_env_on("MOE_VK_VALIDATION") && require_vulkan()) assert_true(mv->vk->validation);
    const int cm = mv->vk->coopmat;
    const double tol32 = cm ? TOL_CM : TOL_F32, tol16 = cm ? TOL_CM : TOL_F16, tol_self = cm ? TOL_CM : TOL_SELF;
    const int V = r.n_vocab, N = r.n_tokens;
    const size_t all = (size_t)N * (size_t)V;
    float *pre = malloc(all * sizeof(float)), *tmp = malloc(all * sizeof(float));
    assert_non_null(pre);
    assert_non_null(tmp);

    /* (a) prefill of the whole sequence, f32 and f16 KV, against the reference */
    moe_ctx *ca = tu_new_ctx(mv, MOE_KV_F32, 1, 0);
    prefill_rows(ca, r.tokens, N, V, pre);
    assert_true(all_finite(pre, all));
    double err32 = max_row_err(pre, r.logits, N, V);
    moe_ctx *ch = tu_new_ctx(mv, MOE_KV_F16, 1, 0);
    prefill_rows(ch, r.tokens, N, V, tmp);
    assert_true(all_finite(tmp, all));
    double err16 = max_row_err(tmp, r.logits, N, V);
    moe_ctx_free(ch);

    /* (b) greedy: Vulkan (f32 KV) against the reference; Vulkan against the CPU (default f16 KV) */
    int32_t g_ref[256], g_vk[256], g_cpu[256];
    int ng = r.n_greedy < 256 ? r.n_greedy : 256, match_ref = 0, match_cpu = 0;
    greedy(mv, MOE_KV_F32, &r, g_ref, ng);
    while (match_ref < ng && g_ref[match_ref] == r.greedy[match_ref]) match_ref++;
    greedy(mv, MOE_KV_F16, &r, g_vk, ng);
    greedy(mc, MOE_KV_F16, &r, g_cpu, ng);
    while (match_cpu < ng && g_vk[match_cpu] == g_cpu[match_cpu]) match_cpu++;

    /* (c) token-by-token decode (the last 32 positions, after a prefill of the rest) and a chunked
       prefill (n_batch 48) against the single prefill */
    const int n_dec = N < 32 ? N : 32;
    moe_ctx *cs = tu_new_ctx(mv, MOE_KV_F32, 0, 0);
    if (N > n_dec) step_ok(cs, r.tokens, N - n_dec);
    for (int i = N - n_dec; i < N; i++) {
        step_ok(cs, &r.tokens[i], 1);
        memcpy(tmp + (size_t)i * (size_t)V, moe_logits(cs, -1), (size_t)V * sizeof(float));
    }
    double err_steps = max_row_err(tmp + (size_t)(N - n_dec) * (size_t)V, pre + (size_t)(N - n_dec) * (size_t)V, n_dec, V);
    moe_ctx_free(cs);
    moe_ctx *cc = tu_new_ctx(mv, MOE_KV_F32, 1, 48);
    prefill_rows(cc, r.tokens, N, V, tmp);
    double err_chunks = max_row_err(tmp, pre, N, V);
    moe_ctx_free(cc);

    /* (d) rewind and re-feed; save / load of the context state */
    const int p1 = N / 2 + 6;
    assert_int_equal(moe_ctx_rewind(ca, p1), MOE_OK);
    prefill_rows(ca, r.tokens + p1, N - p1, V, tmp);
    double err_rewind = max_row_err(tmp, pre + (size_t)p1 * (size_t)V, N - p1, V);
    assert_int_equal(moe_ctx_rewind(ca, p1), MOE_OK);
    size_t sz = 0;
    assert_int_equal(moe_ctx_save(ca, NULL, 0, &sz), MOE_OK);
    void *snap = malloc(sz);
    assert_non_null(snap);
    assert_int_equal(moe_ctx_save(ca, snap, sz, &sz), MOE_OK);
    step_ok(ca, r.tokens + p1, 5); /* overwrite cache rows past p1, then come back */
    moe_ctx *cl = tu_new_ctx(mv, MOE_KV_F32, 1, 0);
    assert_int_equal(moe_ctx_load(cl, snap, sz), MOE_OK);
    assert_int_equal(moe_ctx_load(ca, snap, sz), MOE_OK);
    assert_int_equal(moe_ctx_pos(cl), p1);
    prefill_rows(cl, r.tokens + p1, N - p1, V, tmp);
    double err_load = max_row_err(tmp, pre + (size_t)p1 * (size_t)V, N - p1, V);
    prefill_rows(ca, r.tokens + p1, N - p1, V, tmp);
    err_load = fmax(err_load, max_row_err(tmp, pre + (size_t)p1 * (size_t)V, N - p1, V));
    free(snap);
    moe_ctx_free(cl);

    printf("[ RESULT   ] vulkan qwen3moe_%-5s f32-KV max|d|/range %.3e (tol %.0e) | f16-KV %.3e (tol %.0e) | greedy vs ref %d/%d, "
           "vs CPU %d/%d | steps %.1e, chunked %.1e, rewind %.1e, save/load %.1e (tol %.0e)%s\n",
           name, err32, tol32, err16, tol16, match_ref, ng, match_cpu, ng, err_steps, err_chunks, err_rewind, err_load, tol_self,
           cm ? " [f16 tensor-core prefill]" : "");
    if (match_ref < ng) printf("             greedy diverges from the reference at %d\n", match_ref);
    if (match_cpu < ng) printf("             CPU and Vulkan greedy diverge at %d: %d vs %d\n", match_cpu, g_cpu[match_cpu], g_vk[match_cpu]);
    moe_ctx_free(ca);
    moe_model_free(mv);
    moe_model_free(mc);
    free(pre);
    free(tmp);
    free(r.buf);
    assert_true(err32 <= tol32);
    assert_true(err16 <= tol16);
    assert_int_equal(match_ref, ng);
    assert_int_equal(match_cpu, ng);
    assert_true(err_steps <= tol_self);
    assert_true(err_chunks <= tol_self);
    assert_true(err_rewind <= tol_self);
    assert_true(err_load <= tol_self);
}

/* ---- moe_step_batch on Vulkan: one pass over all contexts' rows, so the logits equal separate
   moe_step calls on the same device within TOL_SELF (f32 KV: the batch's tiled matrix products
   against a context's matrix-vector ones, as prefill against decode; test_batch.c has the full
   scenarios), greedy tokens the same; contexts at different positions, prefill chunks mixed with
   decode; a bad batch leaves every context as it was ---- */
static moe_token argmax_of(const float *l, int n) {
    moe_token b = 0;
    for (int i = 1; i < n; i++)
        if (l[i] > l[b]) b = i;
    return b;
}

static void test_step_batch(void **state) {
    (void)state;
    NEED_VULKAN();
    moe_model *m = load_model("test/fixtures/qwen3moe_q8_0.gguf", MOE_BACKEND_VULKAN);
    moe_model_info info;
    moe_model_get_info(m, &info);
    int nv = info.n_vocab;
    enum { N = 3 };
    moe_ctx *A[N], *B[N];
    for (int i = 0; i < 2 * N; i++) {
        moe_ctx_params cp = {0};
        cp.n_ctx = 64;
        cp.n_batch = 8;
        cp.logits_all = i % N == 1;
        cp.kv_type = MOE_KV_F32;
        assert_int_equal(moe_ctx_new(m, &cp, i < N ? &A[i] : &B[i - N]), MOE_OK);
    }
    moe_token toks[N][64];
    for (int i = 0; i < N; i++)
        for (int t = 0; t < 64; t++) toks[i][t] = (moe_token)((i * 71 + t * 19 + 4) % nv);
    int32_t lens[3][N] = {{5, 12, 1}, {1, 1, 9}, {3, 1, 1}};
    int32_t at[N] = {0, 0, 0};
    double worst = 0; /* (CHECK_ERR keeps it) */
    for (int call = 0; call < 3; call++) {
        const moe_token *tp[N];
        for (int i = 0; i < N; i++) tp[i] = toks[i] + at[i];
        assert_int_equal(moe_step_batch(A, tp, lens[call], N), MOE_OK);
        for (int i = 0; i < N; i++) {
            assert_int_equal(moe_step(B[i], tp[i], lens[call][i]), MOE_OK);
            assert_int_equal(moe_ctx_pos(A[i]), moe_ctx_pos(B[i]));
            int rows = i == 1 ? lens[call][i] : 1;
            for (int r = 0; r < rows; r++) {
                const float *la = moe_logits(A[i], i == 1 ? r : -1), *lb = moe_logits(B[i], i == 1 ? r : -1);
                CHECK_ERR("moe_step_batch vs moe_step", row_rel_err(la, lb, nv), m->vk->coopmat ? TOL_CM : TOL_SELF);
                assert_int_equal(argmax_of(la, nv), argmax_of(lb, nv));
            }
            at[i] += lens[call][i];
        }
    }
    /* errors: nothing moves */
    moe_ctx *dup[N] = {A[0], A[1], A[0]};
    const moe_token *tp[N] = {toks[0], toks[1], toks[2]};
    int32_t one[N] = {1, 1, 1}, full[N] = {1, 1, 64};
    float *before = malloc((size_t)N * (size_t)nv * sizeof(float));
    for (int i = 0; i < N; i++) memcpy(before + (size_t)i * nv, moe_logits(A[i], -1), (size_t)nv * sizeof(float));
    assert_int_equal(moe_step_batch(dup, tp, one, N), MOE_ERR_INVALID_ARG);
    assert_int_equal(moe_step_batch(A, tp, full, N), MOE_ERR_CONTEXT_FULL);
    for (int i = 0; i < N; i++) {
        assert_int_equal(moe_ctx_pos(A[i]), at[i]);
        assert_memory_equal(moe_logits(A[i], -1), before + (size_t)i * nv, (size_t)nv * sizeof(float));
    }
    free(before);
    printf("[ RESULT   ] moe_step_batch vs moe_step, f32 KV: max|d|/range %.3e\n", worst);
    for (int i = 0; i < N; i++) moe_ctx_free(A[i]), moe_ctx_free(B[i]);
    moe_model_free(m);
}

/* ---- decode at depth through the API: 700 tokens of context, then 4 decode steps (701..704
   keys: split-KV attention, 3 chunks) on Vulkan against the CPU, f32 and f16 KV, within the
   fixture tolerances ---- */
static void test_depth_decode(void **state) {
    (void)state;
    NEED_VULKAN();
    moe_model *mv = load_model("test/fixtures/qwen3moe_q8_0.gguf", MOE_BACKEND_VULKAN),
              *mc = load_model("test/fixtures/qwen3moe_q8_0.gguf", MOE_BACKEND_CPU);
    moe_model_info info;
    assert_int_equal(moe_model_get_info(mv, &info), MOE_OK);
    const int cm = mv->vk->coopmat;
    double e32 = tu_depth_decode_err(mv, mc, MOE_KV_F32, 700, 4, info.n_vocab);
    double e16 = tu_depth_decode_err(mv, mc, MOE_KV_F16, 700, 4, info.n_vocab);
    const double tol32 = cm ? TOL_CM : TOL_F32, tol16 = cm ? TOL_CM : TOL_F16;
    printf("[ RESULT   ] decode at depth 700, Vulkan vs CPU: f32-KV max|d|/range %.3e (tol %.0e) | f16-KV %.3e (tol %.0e)\n", e32, tol32,
           e16, tol16);
    moe_model_free(mv);
    moe_model_free(mc);
    assert_true(e32 <= tol32);
    assert_true(e16 <= tol16);
}

/* ---- the model outlives its contexts (reference counted): freeing the model while contexts are
   alive used to free the device, buffers and pipelines under them (use after free, caught by the
   ASan run of this test); now the last moe_ctx_free frees the model ---- */
static void test_model_outlives_contexts(void **state) {
    (void)state;
    NEED_VULKAN();
    moe_model *m = load_model("test/fixtures/qwen3moe_q8_0.gguf", MOE_BACKEND_VULKAN);
    moe_model_info info;
    assert_int_equal(moe_model_get_info(m, &info), MOE_OK);
    const int nv = info.n_vocab;
    static const int32_t prompt[8] = {1, 2, 3, 4, 5, 6, 7, 8};
    moe_ctx_params cp = {0};
    cp.n_ctx = 64;
    moe_ctx *ref = NULL, *a = NULL, *b = NULL;
    assert_int_equal(moe_ctx_new(m, &cp, &ref), MOE_OK);
    assert_int_equal(moe_ctx_new(m, &cp, &a), MOE_OK);
    assert_int_equal(moe_ctx_new(m, &cp, &b), MOE_OK);
    step_ok(ref, prompt, 8);
    float *want = malloc((size_t)nv * sizeof *want);
    memcpy(want, moe_logits(ref, -1), (size_t)nv * sizeof *want);
    moe_ctx_free(ref);
    moe_model_free(m); /* the caller's reference: a and b hold theirs */
    step_ok(a, prompt, 8);
    assert_memory_equal(moe_logits(a, -1), want, (size_t)nv * sizeof *want); /* same device, same path */
    moe_ctx_free(a);
    step_ok(b, prompt, 4);
    step_ok(b, prompt + 4, 4);
    const float *l = moe_logits(b, -1);
    int32_t best = 0, best_want = 0;
    for (int i = 1; i < nv; i++) {
        if (l[i] > l[best]) best = i;
        if (want[i] > want[best_want]) best_want = i;
    }
    assert_int_equal(best, best_want);
    step_ok(b, &best, 1);
    moe_ctx_free(b); /* the last reference: device objects go now */
    free(want);
}

/* ---- weights split over storage windows (forced small): a dense tensor in row parts, experts of
   a layer spread over several windows bound together ---- */
static void test_split_windows(void **state) {
    (void)state;
    NEED_VULKAN();
    int32_t types[5] = {MOE_TYPE_Q8_0, MOE_TYPE_Q8_0, MOE_TYPE_Q8_0, MOE_TYPE_Q8_0, MOE_TYPE_Q8_0};
    g_vk_window_cap_override = 512 << 10;
    run_type_ops(types, "q8_0 in 512 KiB windows", 4096);
    g_vk_window_cap_override = 0;
}

/* ---- errors and fallback ---- */
/* A model with Qwen3's 151,936-token vocabulary (tiny otherwise): with logits_all and the default
   n_batch the logits of a chunk (256 rows, 148 MiB) are more than one storage binding holds on
   lavapipe (128 MiB); the backend computes them in chunks. Every row equals the CPU's. */
static void test_large_vocab_logits(void **state) {
    (void)state;
    NEED_VULKAN();
    const int V = 151936, E = 64, HD = 32, FF = 64, X = 4;
    const char *path = "build/test/large_vocab.gguf";
    gguf_writer w = {0};
    gw_kv_str(&w, "general.architecture", "qwen3moe");
    const char *keys[] = {"qwen3moe.embedding_length", "qwen3moe.block_count", "qwen3moe.attention.head_count",
                          "qwen3moe.attention.head_count_kv", "qwen3moe.attention.key_length", "qwen3moe.expert_count",
                          "qwen3moe.expert_used_count", "qwen3moe.expert_feed_forward_length"};
    const uint32_t vals[] = {(uint32_t)E, 1, 2, 1, (uint32_t)HD, (uint32_t)X, 2, (uint32_t)FF};
    for (int i = 0; i < 8; i++) gw_kv_u32(&w, keys[i], vals[i]);
    rng_t r = {31};
    void *mem[16];
    int n_mem = 0;
    struct { const char *name; int32_t type; int nd; int64_t ne0, ne1, ne2; } ts[] = {
        {"token_embd.weight", MOE_TYPE_Q8_0, 2, E, V, 1}, {"output_norm.weight", MOE_TYPE_F32, 1, E, 1, 1},
        {"output.weight", MOE_TYPE_Q8_0, 2, E, V, 1}, {"blk.0.attn_norm.weight", MOE_TYPE_F32, 1, E, 1, 1},
        {"blk.0.attn_q.weight", MOE_TYPE_F16, 2, E, 2 * HD, 1}, {"blk.0.attn_k.weight", MOE_TYPE_F16, 2, E, HD, 1},
        {"blk.0.attn_v.weight", MOE_TYPE_F16, 2, E, HD, 1}, {"blk.0.attn_output.weight", MOE_TYPE_F16, 2, 2 * HD, E, 1},
        {"blk.0.attn_q_norm.weight", MOE_TYPE_F32, 1, HD, 1, 1}, {"blk.0.attn_k_norm.weight", MOE_TYPE_F32, 1, HD, 1, 1},
        {"blk.0.ffn_norm.weight", MOE_TYPE_F32, 1, E, 1, 1}, {"blk.0.ffn_gate_inp.weight", MOE_TYPE_F32, 2, E, X, 1},
        {"blk.0.ffn_gate_exps.weight", MOE_TYPE_F16, 3, E, FF, X}, {"blk.0.ffn_up_exps.weight", MOE_TYPE_F16, 3, E, FF, X},
        {"blk.0.ffn_down_exps.weight", MOE_TYPE_F16, 3, FF, E, X}};
    for (size_t i = 0; i < sizeof ts / sizeof ts[0]; i++) {
        int64_t n = ts[i].ne0 * ts[i].ne1 * ts[i].ne2;
        float *v = malloc((size_t)n * sizeof *v);
        uint8_t *q = malloc((size_t)(type_row_bytes(ts[i].type, ts[i].ne0) * (uint64_t)(ts[i].ne1 * ts[i].ne2)));
        assert_true(v && q);
        for (int64_t j = 0; j < n; j++) v[j] = ts[i].nd == 1 ? 1.0f + 0.2f * rng_f(&r) : 0.3f * rng_f(&r);
        type_traits(ts[i].type)->quant(v, q, n);
        free(v);
        mem[n_mem++] = q;
        int64_t ne[3] = {ts[i].ne0, ts[i].ne1, ts[i].ne2};
        assert_int_equal(gw_tensor(&w, ts[i].name, ts[i].type, ts[i].nd, ne, q), MOE_OK);
    }
    assert_int_equal(gw_write_file(&w, path), MOE_OK);
    gw_free(&w);
    for (int i = 0; i < n_mem; i++) free(mem[i]);
    moe_model *m[2];
    for (int b = 0; b < 2; b++) {
        moe_load_params lp = {0};
        lp.backend = b ? MOE_BACKEND_VULKAN : MOE_BACKEND_CPU;
        lp.gpu_exact = 1; /* the chunking is under test, not tensor-core rounding (7e-4 on the H100) */
        lp.cpu_exact = 1;
        lp.n_threads = 2;
        moe_status st = moe_load(path, &lp, &m[b]);
        if (st) print_error("moe_load: %s\n", moe_last_error());
        assert_int_equal(st, MOE_OK);
    }
    moe_ctx_params cp = {0};
    cp.n_ctx = 512;
    cp.kv_type = MOE_KV_F32;
    cp.logits_all = 1; /* n_batch: the default */
    moe_ctx *c[2];
    for (int b = 0; b < 2; b++) {
        moe_status st = moe_ctx_new(m[b], &cp, &c[b]);
        if (st) print_error("moe_ctx_new: %s\n", moe_last_error());
        assert_int_equal(st, MOE_OK);
    }
    moe_token tok[300];
    for (int i = 0; i < 300; i++) tok[i] = (moe_token)(rng_u64(&r) % (uint64_t)V);
    for (int b = 0; b < 2; b++) assert_int_equal(moe_step(c[b], tok, 300), MOE_OK);
    double worst = 0;
    for (int i = 0; i < 300; i++) {
        const float *g = moe_logits(c[1], i);
        assert_non_null(g);
        assert_true(all_finite(g, (size_t)V));
        worst = fmax(worst, row_rel_err(g, moe_logits(c[0], i), V));
    }
    printf("[ RESULT   ] vocab %d, 300 rows of logits in one step: worst relative error vs CPU %.2e\n", V, worst);
    assert_true(worst < 1e-4);
    for (int b = 0; b < 2; b++) {
        moe_ctx_free(c[b]);
        moe_model_free(m[b]);
    }
    remove(path);
}

static void test_fallback(void **state) {
    (void)state;
    NEED_VULKAN();
    const char *path = "test/fixtures/qwen3moe_f32.gguf";
    moe_load_params lp = {0};
    lp.log = test_log;
    lp.n_threads = 1;
    moe_model *m = NULL;
    /* a device index past the usable devices */
    lp.backend = MOE_BACKEND_VULKAN;
    lp.device_index = 7;
    assert_int_equal(moe_load(path, &lp, &m), MOE_ERR_DEVICE);
    assert_null(m);
    assert_non_null(strstr(moe_last_error(), "device_index"));
    lp.device_index = 0;
    /* no driver: the loader is pointed at an ICD that does not exist */
    char *old_icd = getenv("VK_ICD_FILENAMES") ? strdup(getenv("VK_ICD_FILENAMES")) : NULL;
    char *old_drv = getenv("VK_DRIVER_FILES") ? strdup(getenv("VK_DRIVER_FILES")) : NULL;
    setenv("VK_ICD_FILENAMES", "/nonexistent/moe_icd.json", 1);
    setenv("VK_DRIVER_FILES", "/nonexistent/moe_icd.json", 1);
    long msgs = g_vk_validation_messages; /* the loader may warn about the missing ICD: expected here */
    VkInstance shared = g_vk_instance;     /* the process's shared instance would hide the missing driver */
    g_vk_instance = 0;
    moe_status st = moe_load(path, &lp, &m);
    printf("[ INFO     ] forced no driver, MOE_BACKEND_VULKAN: %s (%s)\n", moe_status_str(st), moe_last_error());
    assert_int_equal(st, MOE_ERR_DEVICE);
    assert_null(m);
    assert_non_null(strstr(moe_last_error(), "Vulkan"));
    lp.backend = MOE_BACKEND_AUTO;
    g_log_seen[0] = 0;
    assert_int_equal(moe_load(path, &lp, &m), MOE_OK);
    moe_model_info info;
    assert_int_equal(moe_model_get_info(m, &info), MOE_OK);
    assert_int_equal(info.backend, MOE_BACKEND_CPU);
    assert_non_null(strstr(g_log_seen, "Vulkan not used"));
    moe_model_free(m);
    g_vk_instance = shared;
    g_vk_validation_messages = msgs;
    if (old_icd) setenv("VK_ICD_FILENAMES", old_icd, 1);
    else unsetenv("VK_ICD_FILENAMES");
    if (old_drv) setenv("VK_DRIVER_FILES", old_drv, 1);
    else unsetenv("VK_DRIVER_FILES");
    free(old_icd);
    free(old_drv);
    /* with a driver again: AUTO takes Vulkan on a GPU, but leaves a CPU-type device (lavapipe,
       SwiftShader) to the CPU backend, with the reason in the log; VULKAN still reaches it */
    lp.backend = MOE_BACKEND_VULKAN;
    assert_int_equal(moe_load(path, &lp, &m), MOE_OK);
    int cpu_type = m->vk->props.deviceType == VK_PHYSICAL_DEVICE_TYPE_CPU;
    assert_int_equal(moe_model_get_info(m, &info), MOE_OK);
    assert_int_equal(info.backend, MOE_BACKEND_VULKAN);
    moe_model_free(m);
    lp.backend = MOE_BACKEND_AUTO;
    g_log_seen[0] = 0;
    assert_int_equal(moe_load(path, &lp, &m), MOE_OK);
    assert_int_equal(moe_model_get_info(m, &info), MOE_OK);
    printf("[ INFO     ] best device is %s; MOE_BACKEND_AUTO chose %s\n", cpu_type ? "CPU-type" : "a GPU",
           info.backend == MOE_BACKEND_VULKAN ? "Vulkan" : "the CPU");
    assert_int_equal(info.backend, cpu_type ? MOE_BACKEND_CPU : MOE_BACKEND_VULKAN);
    if (cpu_type) {
        assert_non_null(strstr(g_log_seen, "CPU-type Vulkan device"));
        assert_non_null(strstr(g_log_seen, "backend: CPU"));
    } else assert_non_null(strstr(g_log_seen, "backend: Vulkan"));
    moe_model_free(m);
    /* a CPU-type device counted as a GPU (test hook): AUTO then takes it */
    g_vk_cpu_device_as_gpu = 1;
    assert_int_equal(moe_load(path, &lp, &m), MOE_OK);
    g_vk_cpu_device_as_gpu = 0;
    assert_int_equal(moe_model_get_info(m, &info), MOE_OK);
    assert_int_equal(info.backend, MOE_BACKEND_VULKAN);
    moe_model_free(m);
}

/* ---- abort, max_submit_us, submit / wait on Vulkan (test_async.h) ---- */
/* a prefill split into many submissions (max_submit_us = 1: one dispatch each) gives the logits of
   one submission per chunk, bit for bit; the submission times say so */
static void check_split_identical(moe_model *m, int n) {
    moe_model_info info;
    assert_int_equal(moe_model_get_info(m, &info), MOE_OK);
    moe_token t[64];
    async_tokens(t, n + 1, info.n_vocab, 5);
    moe_ctx_params cp = {0};
    cp.n_ctx = 256;
    cp.n_batch = 32;
    moe_ctx *a = NULL, *b = NULL;
    assert_int_equal(moe_ctx_new(m, &cp, &a), MOE_OK);
    cp.max_submit_us = 1;
    assert_int_equal(moe_ctx_new(m, &cp, &b), MOE_OK);
    step_ok(a, t, n);
    step_ok(b, t, n);
    uint64_t na = 0, nb = 0;
    double mxa = 0, mxb = 0, tota = 0, totb = 0;
    assert_int_equal(moe_ctx_submit_times(a, &na, &mxa, &tota, 1), MOE_OK);
    assert_int_equal(moe_ctx_submit_times(b, &nb, &mxb, &totb, 1), MOE_OK);
    printf("[ RESULT   ] %d-token prefill: %llu submission(s), longest %.0f us, total %.0f us; max_submit_us 1: %llu, longest %.0f us, total %.0f us\n",
           n, (unsigned long long)na, mxa, tota, (unsigned long long)nb, mxb, totb);
    assert_true(na >= 1 && nb > na && mxa > 0 && mxb > 0);
    assert_memory_equal(moe_logits(a, -1), moe_logits(b, -1), (size_t)info.n_vocab * sizeof(float));
    step_ok(a, t + n, 1);
    step_ok(b, t + n, 1);
    assert_memory_equal(moe_logits(a, -1), moe_logits(b, -1), (size_t)info.n_vocab * sizeof(float));
    assert_int_equal(moe_ctx_submit_times(a, &na, NULL, NULL, 0), MOE_OK);
    assert_int_equal(na, 1);
    moe_ctx_free(a);
    moe_ctx_free(b);
}

static void test_async_abort(void **state) {
    (void)state;
    NEED_VULKAN();
    moe_model *m = load_model("test/fixtures/qwen3moe_q8_0.gguf", MOE_BACKEND_VULKAN);
    check_split_identical(m, 40);
    moe_ctx_params cp = {0};
    cp.n_ctx = 128;
    cp.n_batch = 8;
    int polls = check_abort_exact(m, &cp, 11, 20);   /* polls between chunks only */
    cp.max_submit_us = 1;
    int polls_split = check_abort_exact(m, &cp, 11, 20); /* and between submissions */
    printf("[ INFO     ] qwen3moe Vulkan: %d abort polls in a 20-token step, %d with max_submit_us 1\n", polls, polls_split);
    assert_true(polls_split > polls);
    cp.max_submit_us = 0;
    check_submit_wait(m, &cp, 12);
    cp.low_priority = 1; /* the second queue where the family has one, else the same queue */
    check_submit_wait(m, &cp, 12);
    moe_model_free(m);
    static const char *const hybrids[] = {"test/fixtures/qwen3next", "test/fixtures/qwen35moe"};
    for (int i = 0; i < 2; i++) {
        m = load_model(hybrids[i], MOE_BACKEND_VULKAN);
        moe_ctx_params hp = {0};
        hp.n_ctx = 256;
        hp.n_batch = 16;
        hp.max_submit_us = 1;
        polls = check_abort_exact(m, &hp, 40, 40);
        printf("[ INFO     ] %s Vulkan (max_submit_us 1): %d abort polls in a 40-token step\n", hybrids[i], polls);
        if (i == 0) check_split_identical(m, 40);
        moe_model_free(m);
    }
}

int main(void) {
    pin_driver();
    static char names[][8] = {"f32", "f16", "q8_0", "q4_k", "mixed"};
#define T(f) cmocka_unit_test_teardown(f, teardown_validation)
#define TS(label, f, st) {.name = label, .test_func = f, .teardown_func = teardown_validation, .initial_state = (void *)(st)}
    const struct CMUnitTest tests[] = {
        T(test_async_abort),
        T(test_ops_common),
        TS("ops_f32", test_ops_type, &k_all_types[0]), TS("ops_f16", test_ops_type, &k_all_types[1]),
        TS("ops_bf16", test_ops_type, &k_all_types[2]), TS("ops_q8_0", test_ops_type, &k_all_types[3]),
        TS("ops_q4_0", test_ops_type, &k_all_types[4]), TS("ops_q4_k", test_ops_type, &k_all_types[5]),
        TS("ops_q5_k", test_ops_type, &k_all_types[6]), TS("ops_q6_k", test_ops_type, &k_all_types[7]),
        TS("ops_mxfp4", test_ops_type, &k_all_types[8]),
        T(test_ops_mixed_experts),
        T(test_split_windows),
        T(test_attn_long),
        T(test_depth_decode),
        T(test_model_outlives_contexts),
        T(test_step_batch),
        TS("fixture_f32", run_fixture, names[0]), TS("fixture_f16", run_fixture, names[1]),
        TS("fixture_q8_0", run_fixture, names[2]), TS("fixture_q4_k", run_fixture, names[3]),
        TS("fixture_mixed", run_fixture, names[4]),
        T(test_large_vocab_logits),
        T(test_fallback),
    };
#undef T
#undef TS
    return tu_run_tests("vulkan", tests); /* MOE_TESTS=test_async_abort: one case */
}
