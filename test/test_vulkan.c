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

static int g_checked, g_available;
static char g_why[600];
static char g_log_seen[2048];

static void test_log(int32_t level, const char *msg, void *user) {
    (void)user;
    if (level <= MOE_LOG_WARN) fprintf(stderr, "moe: %s\n", msg);
    size_t l = strlen(g_log_seen);
    snprintf(g_log_seen + l, sizeof g_log_seen - l, "%s\n", msg);
}

static int require_vulkan(void) { return vk_env_on("MOE_REQUIRE_VULKAN"); }

/* Is a Vulkan device usable here? Probed once, by loading the smallest fixture on Vulkan. */
static int vulkan_available(void) {
    if (g_checked) return g_available;
    g_checked = 1;
    moe_load_params lp = {0};
    lp.backend = MOE_BACKEND_VULKAN;
    lp.log = test_log;
    moe_model *m = NULL;
    moe_status st = moe_load("test/fixtures/qwen3moe_f32.gguf", &lp, &m);
    g_available = st == MOE_OK;
    if (!g_available) snprintf(g_why, sizeof g_why, "%s (%s)", moe_status_str(st), moe_last_error());
    else if (vk_env_on("MOE_VK_VALIDATION") && !m->vk->validation) {
        snprintf(g_why, sizeof g_why, "MOE_VK_VALIDATION=1 but the validation layer is not active (vulkan-validationlayers)");
        g_available = !require_vulkan();
    }
    moe_model_free(m);
    return g_available;
}

#define NEED_VULKAN()                                                                          \
    do {                                                                                       \
        if (!vulkan_available()) {                                                             \
            if (require_vulkan()) fail_msg("MOE_REQUIRE_VULKAN=1 but Vulkan is unusable: %s", g_why); \
            print_message("Vulkan unusable (%s): skipped\n", g_why);                           \
            skip();                                                                            \
        }                                                                                      \
    } while (0)

/* every test ends here: the validation layer must have said nothing */
static int teardown_validation(void **state) {
    (void)state;
    long n = g_vk_validation_messages;
    g_vk_validation_messages = 0;
    if (n) fprintf(stderr, "%ld validation message(s) (see above)\n", n);
    assert_int_equal(n, 0);
    return 0;
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
static void synth_make(synth *s, const int32_t types[5], int vocab, uint64_t seed) {
    memset(s, 0, sizeof *s);
    rng_t r = {seed};
    moe_hparams *hp = &s->w.hp;
    hp->arch = 1;
    hp->n_vocab = vocab;
    hp->n_embd = 256;
    hp->n_layer = 1;
    hp->n_head = 4;
    hp->n_head_kv = 2;
    hp->head_dim = 64;
    hp->n_rot = 64;
    hp->n_ctx_train = 4096;
    hp->n_expert = 8;
    hp->n_expert_used = 3;
    hp->n_ff_exp = 256;
    hp->norm_topk = 1;
    hp->rms_eps = 1e-6f;
    hp->rope_base = 10000.0f;
    int E = hp->n_embd, Q = hp->n_head * hp->head_dim, KV = hp->n_head_kv * hp->head_dim;
    synth_weight(s, &s->w.tok_embd, "token_embd", types[0], 2, E, vocab, 1, 1.0f, &r);
    synth_weight(s, &s->w.output_norm, "output_norm", MOE_TYPE_F32, 1, E, 1, 1, 0, &r);
    synth_weight(s, &s->w.output, "output", types[0], 2, E, vocab, 1, 0.1f, &r);
    moe_layer *L = &s->layer;
    synth_weight(s, &L->attn_norm, "attn_norm", MOE_TYPE_F32, 1, E, 1, 1, 0, &r);
    synth_weight(s, &L->wq, "wq", types[1], 2, E, Q, 1, 0.1f, &r);
    synth_weight(s, &L->wk, "wk", types[1], 2, E, KV, 1, 0.1f, &r);
    synth_weight(s, &L->wv, "wv", types[1], 2, E, KV, 1, 0.1f, &r);
    synth_weight(s, &L->wo, "wo", types[1], 2, Q, E, 1, 0.1f, &r);
    synth_weight(s, &L->q_norm, "q_norm", MOE_TYPE_F32, 1, hp->head_dim, 1, 1, 0, &r);
    synth_weight(s, &L->k_norm, "k_norm", MOE_TYPE_F32, 1, hp->head_dim, 1, 1, 0, &r);
    synth_weight(s, &L->ffn_norm, "ffn_norm", MOE_TYPE_F32, 1, E, 1, 1, 0, &r);
    synth_weight(s, &L->router, "router", MOE_TYPE_F32, 2, E, hp->n_expert, 1, 0.3f, &r);
    synth_weight(s, &L->gate_exps, "gate", types[2], 3, E, hp->n_ff_exp, hp->n_expert, 0.1f, &r);
    synth_weight(s, &L->up_exps, "up", types[3], 3, E, hp->n_ff_exp, hp->n_expert, 0.1f, &r);
    synth_weight(s, &L->down_exps, "down", types[4], 3, hp->n_ff_exp, E, hp->n_expert, 0.1f, &r);
    s->w.layers = L;
}

static void synth_free(synth *s) {
    for (int i = 0; i < s->n_mem; i++) free(s->mem[i]);
    s->n_mem = 0;
}
