/* test_vk_stream.c — the GPU expert slot cache (issue 11, tier 1) on the Vulkan backend, on the
   tiny fixtures (lavapipe in CI) at several GPU budgets.

   For each fixture, the resident Vulkan run is the reference; at every budget from the minimum
   working set (a handful of slots: every step needs more distinct experts than the slots hold,
   misses are read from host-visible memory) up to one byte below the resident weights:
     - logits of a prefill of NTOK tokens in one step (logits_all), of the same prefill in chunks of
       7 (n_batch), and of 8 greedy decode steps equal the resident run's bit for bit (memcmp);
     - the device memory of the weights (moe_stats.gpu_bytes_weights) stays under the budget;
     - hits + misses = routed (token, layer, expert) pairs, misses > 0, bytes counted; a second
       context on the warm cache hits more;
     - two contexts of one streamed model stepped in turn stay bit-identical;
   Below the minimum working set moe_load fails with MOE_ERR_NO_MEMORY naming it.
   The slot cache over the host tier (both budgets below the weights, tiers_*): the same
   bit-identity at (GPU, host) budget pairs from both minimums up, the host minimum (which adds
   the one-layer stage) named by MOE_ERR_NO_MEMORY, the counters; an I/O error injected mid-read
   fails the step with MOE_ERR_IO and leaves the context as it was (the next steps are
   bit-identical); a NaN in a streamed expert fails the step that reads it with MOE_ERR_FORMAT.
   Fixtures: test/fixtures/qwen3moe_*.gguf; Gemma 4 (26B-A4B-like: sliding + full layers, experts
   beside the dense MLP, per-expert scales) from test/fixtures/gemma4/moe, or the GGUF test_gemma4
   writes from it (build/test/gemma4_moe.gguf), where present (skipped otherwise). Two threads
   stepping one streamed model at once; LRU, LFU and SLRU (the default). MOE_TESTS=name runs one test.
   Every test ends by asserting that the validation layer (MOE_VK_VALIDATION=1) said nothing.
   Without a usable Vulkan device the tests skip, unless MOE_REQUIRE_VULKAN=1. */
#include "../moe.c"
#include "../moe_vk.c"
#include "../shaders_embedded.c"
#include "test_util.h"
#include "test_vk_probe.h"

#define NTOK TU_NTOK
#define NGEN TU_NGEN

/* lavapipe's own per-instance leaks, as in test_vulkan.c (the driver stays loaded so they carry its name) */
const char *__lsan_default_suppressions(void);
const char *__lsan_default_suppressions(void) { return "leak:libvulkan_lvp.so\n"; }
static void pin_driver(void) { (void)dlopen("libvulkan_lvp.so", RTLD_NOW | RTLD_NODELETE); }


static moe_model *load_vk(const char *path, uint64_t gpu_budget, uint64_t host_budget, moe_status *st_out) {
    moe_load_params lp = {0};
    lp.backend = MOE_BACKEND_VULKAN;
    lp.gpu_budget_bytes = gpu_budget;
    lp.host_budget_bytes = host_budget;
    moe_model *m = NULL;
    moe_status st = moe_load(path, &lp, &m);
    if (st_out) *st_out = st;
    else {
        if (st != MOE_OK) print_error("moe_load(%s, gpu budget %llu): %s (%s)\n", path, (unsigned long long)gpu_budget, moe_status_str(st), moe_last_error());
        assert_int_equal(st, MOE_OK);
    }
    return m;
}

/* two contexts of one model, stepped in turn (prefill A, prefill B, then decode A, B, ...) */
static void workload_pair(moe_model *m, float *out_a, float *out_b) {
    moe_model_info info;
    assert_int_equal(moe_model_get_info(m, &info), MOE_OK);
    int V = info.n_vocab;
    int32_t t[NTOK];
    tu_tokens(t, NTOK, V);
    moe_ctx *c[2] = {tu_new_ctx(m, MOE_KV_F32, 1, 0), tu_new_ctx(m, MOE_KV_F32, 1, 0)};
    float *out[2] = {out_a, out_b};
    for (int k = 0; k < 2; k++) {
        tu_step_ok(c[k], t + 3 * k, NTOK - 3 * k);
        memcpy(out[k], moe_logits(c[k], -1), (size_t)V * sizeof(float));
    }
    for (int i = 0; i < NGEN; i++)
        for (int k = 0; k < 2; k++) {
            int32_t tok = argmax(moe_logits(c[k], -1), V);
            tu_step_ok(c[k], &tok, 1);
            memcpy(out[k] + (size_t)(1 + i) * (size_t)V, moe_logits(c[k], -1), (size_t)V * sizeof(float));
        }
    moe_ctx_free(c[0]);
    moe_ctx_free(c[1]);
}

static void run_fixture(void **state) {
    NEED_VULKAN();
    const char *name = *state;
    char p[256];
    if (strchr(name, '/')) { /* a Hugging Face fixture directory, where the generator has made one */
        snprintf(p, sizeof p, "%s", name);
        if (access(p, R_OK) != 0) {
            print_message("%s absent (gen/make_fixtures_gemma4.py on the GPU machine; test_gemma4 writes the GGUF): skipped\n", p);
            skip();
        }
    } else snprintf(p, sizeof p, "test/fixtures/qwen3moe_%s.gguf", name);
    /* the resident reference */
    moe_model *m = load_vk(p, 0, 0, NULL);
    moe_model_info info;
    assert_int_equal(moe_model_get_info(m, &info), MOE_OK);
    assert_false(moe_vk_streams_experts(m->vk));
    size_t rows = NTOK + NGEN, all = rows * (size_t)info.n_vocab;
    float *ref = malloc(all * sizeof(float)), *ref7 = malloc(all * sizeof(float));
    float *pa = malloc((NGEN + 1) * (size_t)info.n_vocab * sizeof(float)), *pb = malloc((NGEN + 1) * (size_t)info.n_vocab * sizeof(float));
    float *qa = malloc((NGEN + 1) * (size_t)info.n_vocab * sizeof(float)), *qb = malloc((NGEN + 1) * (size_t)info.n_vocab * sizeof(float));
    assert_true(ref && ref7 && pa && pb && qa && qb);
    moe_stats rs;
    tu_stream_workload(m, 0, ref, &rs);
    tu_stream_workload(m, 7, ref7, NULL);
    workload_pair(m, pa, pb);
    uint64_t resident = rs.gpu_bytes_weights; /* device bytes of the weights, resident */
    assert_int_equal(rs.expert_misses, 0);
    moe_model_free(m);
    /* below the minimum working set */
    moe_status st;
    assert_null(load_vk(p, 1, 0, &st));
    assert_int_equal(st, MOE_ERR_NO_MEMORY);
    uint64_t min = tu_min_from_error();
    size_t nl = strlen(name);
    int gguf = !strchr(name, '/') || (nl > 5 && !strcmp(name + nl - 5, ".gguf"));
    if (gguf) assert_true(min > info.weight_bytes - info.expert_bytes);
    assert_true(min < resident);
    assert_null(load_vk(p, min - 1, 0, &st));
    assert_int_equal(st, MOE_ERR_NO_MEMORY);
    uint64_t budgets[] = {min, min + (resident - min) / 4, min + (resident - min) / 2, resident - 1};
    uint64_t pairs = 0;
    m = load_vk(p, 0, 0, NULL);
    for (int l = 0; l < m->w.hp.n_layer; l++)
        if (m->w.layers[l].p.ffn_kind != MOE_FFN_DENSE) pairs += (uint64_t)rows * (uint64_t)m->w.layers[l].p.n_expert_used;
    moe_model_free(m);
    for (size_t b = 0; b < sizeof budgets / sizeof budgets[0]; b++) {
        m = load_vk(p, budgets[b], 0, NULL);
        assert_true(moe_vk_streams_experts(m->vk));
        const vk_xg *x = m->vk->xg;
        moe_stats s, s2;
        char what[160];
        snprintf(what, sizeof what, "%s gpu budget %llu (min %llu)", name, (unsigned long long)budgets[b], (unsigned long long)min);
        tu_stream_check(m, 0, ref, pairs, 1, &s, what);
        assert_true(s.gpu_bytes_weights <= budgets[b]);
        if (gguf) assert_true(s.host_bytes >= info.expert_bytes);
        tu_stream_check(m, 7, ref7, pairs, 0, &s2, what); /* chunked prefill, on the cache the first context warmed */
        assert_true(s2.gpu_bytes_weights <= budgets[b]);
        workload_pair(m, qa, qb);
        assert_memory_equal(qa, pa, (NGEN + 1) * (size_t)info.n_vocab * sizeof(float));
        assert_memory_equal(qb, pb, (NGEN + 1) * (size_t)info.n_vocab * sizeof(float));
        int max_slots = 0;
        for (int l = 0; l < x->L; l++) max_slots = x->ns[l] > max_slots ? x->ns[l] : max_slots;
        printf("[ RESULT   ] %-6s budget %8llu (min %llu, resident %llu): %d slots (at most %d of %d experts in a layer), "
               "weights on the device %llu; hits/misses %llu/%llu, then %llu/%llu (chunked, warm); %llu bytes streamed\n", name,
               (unsigned long long)budgets[b], (unsigned long long)min, (unsigned long long)resident, x->n_slots, max_slots, info.n_expert,
               (unsigned long long)s.gpu_bytes_weights, (unsigned long long)s.expert_hits, (unsigned long long)s.expert_misses,
               (unsigned long long)s2.expert_hits, (unsigned long long)s2.expert_misses, (unsigned long long)s.expert_bytes_streamed);
        if (b == 0) assert_true(max_slots < info.n_expert_used * 2); /* a prefill step needs more distinct experts than the slots hold */
        if (b == 3) assert_true(s2.expert_hits > s.expert_hits);
        moe_model_free(m);
    }
    /* AUTO with a budget below the minimum: the CPU takes over (log line), as before */
    moe_load_params lp = {0};
    lp.gpu_budget_bytes = min - 1;
    assert_int_equal(moe_load(p, &lp, &m), MOE_OK);
    assert_int_equal(moe_model_get_info(m, &info), MOE_OK);
    assert_int_equal(info.backend, MOE_BACKEND_CPU);
    moe_model_free(m);
    free(ref);
    free(ref7);
    free(pa);
    free(pb);
    free(qa);
    free(qb);
}

/* the host budget's minimum under a GPU budget (from the error naming it) */
static uint64_t host_min_for(const char *p, uint64_t gpu) {
    moe_status st;
    assert_null(load_vk(p, gpu, 1, &st));
    assert_int_equal(st, MOE_ERR_NO_MEMORY);
    assert_non_null(strstr(moe_last_error(), "host_budget_bytes"));
    assert_non_null(strstr(moe_last_error(), "staged for the GPU"));
    return tu_min_from_error();
}

static uint64_t gpu_min_for(const char *p) {
    moe_status st;
    assert_null(load_vk(p, 1, 0, &st));
    assert_int_equal(st, MOE_ERR_NO_MEMORY);
    return tu_min_from_error();
}

/* the GPU slot cache over the host tier: bit-identical at (GPU, host) budget pairs */
static void run_tiers(void **state) {
    NEED_VULKAN();
    char p[256];
    snprintf(p, sizeof p, "test/fixtures/qwen3moe_%s.gguf", (const char *)*state);
    moe_model *m = load_vk(p, 0, 0, NULL);
    moe_model_info info;
    assert_int_equal(moe_model_get_info(m, &info), MOE_OK);
    size_t rows = NTOK + NGEN, all = rows * (size_t)info.n_vocab;
    float *ref = malloc(all * sizeof(float)), *ref7 = malloc(all * sizeof(float));
    assert_true(ref && ref7);
    moe_stats rs;
    tu_stream_workload(m, 0, ref, &rs);
    tu_stream_workload(m, 7, ref7, NULL);
    uint64_t resident = rs.gpu_bytes_weights, pairs = 0;
    for (int l = 0; l < m->w.hp.n_layer; l++)
        if (m->w.layers[l].p.ffn_kind != MOE_FFN_DENSE) pairs += (uint64_t)rows * (uint64_t)m->w.layers[l].p.n_expert_used;
    moe_model_free(m);
    uint64_t gmin = gpu_min_for(p), hmin = host_min_for(p, gmin);
    assert_true(hmin > info.weight_bytes - info.expert_bytes);
    assert_true(hmin < info.weight_bytes);
    moe_status st;
    assert_null(load_vk(p, gmin, hmin - 1, &st));
    assert_int_equal(st, MOE_ERR_NO_MEMORY);
    uint64_t gb[] = {gmin, gmin + (resident - gmin) / 2}, hb[] = {hmin, hmin + (info.weight_bytes - hmin) / 2};
    for (int gi = 0; gi < 2; gi++)
        for (int hi = 0; hi < 2; hi++) {
            m = load_vk(p, gb[gi], hb[hi], NULL);
            assert_true(moe_vk_streams_experts(m->vk));
            assert_non_null(m->xc);
            assert_ptr_equal(m->vk->xc, m->xc);
            moe_stats s, s2;
            char what[160];
            snprintf(what, sizeof what, "tiers %s gpu budget %llu host budget %llu", (const char *)*state, (unsigned long long)gb[gi],
                     (unsigned long long)hb[hi]);
            tu_stream_check(m, 0, ref, pairs, 1, &s, what);
            assert_true(s.gpu_bytes_weights <= gb[gi]);
            tu_stream_check(m, 7, ref7, pairs, 0, &s2, what); /* chunked prefill, warm caches */
            printf("[ RESULT   ] tiers %-5s gpu budget %8llu (min %llu) host budget %8llu (min %llu): %d GPU slots, %d host slots; "
                   "hits/misses %llu/%llu, %llu bytes (device + file); warm chunked %llu/%llu\n", (const char *)*state,
                   (unsigned long long)gb[gi], (unsigned long long)gmin, (unsigned long long)hb[hi], (unsigned long long)hmin,
                   m->vk->xg->n_slots, m->xc->n_slots, (unsigned long long)s.expert_hits, (unsigned long long)s.expert_misses,
                   (unsigned long long)s.expert_bytes_streamed, (unsigned long long)s2.expert_hits, (unsigned long long)s2.expert_misses);
            moe_model_free(m);
        }
    free(ref);
    free(ref7);
}

/* an I/O error mid-read at the route op: the step fails with MOE_ERR_IO, the context is as it was,
   the next steps are bit-identical to the resident run */
static void test_tiers_io_error(void **state) {
    (void)state;
    NEED_VULKAN();
    const char *p = "test/fixtures/qwen3moe_q4_k.gguf";
    moe_model *m = load_vk(p, 0, 0, NULL);
    moe_model_info info;
    assert_int_equal(moe_model_get_info(m, &info), MOE_OK);
    int V = info.n_vocab;
    int32_t t[24];
    tu_tokens(t, 24, V);
    float *ref = malloc(2 * (size_t)V * sizeof(float));
    assert_non_null(ref);
    moe_ctx *c = tu_new_ctx(m, MOE_KV_F32, 0, 0);
    tu_step_ok(c, t, 20);
    tu_step_ok(c, t + 20, 1);
    memcpy(ref, moe_logits(c, -1), (size_t)V * sizeof(float));
    tu_step_ok(c, t + 21, 1);
    memcpy(ref + V, moe_logits(c, -1), (size_t)V * sizeof(float));
    moe_ctx_free(c);
    moe_model_free(m);
    setenv("MOE_PREFETCH", "0", 1); /* the injected failure hits a demand read */
    uint64_t gmin = gpu_min_for(p);
    m = load_vk(p, gmin, host_min_for(p, gmin), NULL);
    unsetenv("MOE_PREFETCH");
    c = tu_new_ctx(m, MOE_KV_F32, 0, 0);
    tu_step_ok(c, t, 20);
    size_t n0 = 0, n1 = 0;
    assert_int_equal(moe_ctx_save(c, NULL, 0, &n0), MOE_OK);
    uint8_t *s0 = malloc(n0), *s1 = malloc(n0);
    assert_true(s0 && s1);
    assert_int_equal(moe_ctx_save(c, s0, n0, &n0), MOE_OK);
    moe_test_fail_io_after(2); /* the host cache of the minimum size misses in every layer: the 3rd read fails */
    moe_status st = moe_step(c, t + 20, 1);
    moe_test_fail_io_after(-1);
    assert_int_equal(st, MOE_ERR_IO);
    print_message("[ INFO     ] %s\n", moe_last_error());
    assert_non_null(strstr(moe_last_error(), "expert streaming"));
    assert_int_equal(moe_ctx_pos(c), 20);
    assert_int_equal(moe_ctx_save(c, NULL, 0, &n1), MOE_OK);
    assert_int_equal(n1, n0);
    assert_int_equal(moe_ctx_save(c, s1, n1, &n1), MOE_OK);
    assert_memory_equal(s0, s1, n0);
    tu_step_ok(c, t + 20, 1);
    assert_memory_equal(moe_logits(c, -1), ref, (size_t)V * sizeof(float));
    tu_step_ok(c, t + 21, 1);
    assert_memory_equal(moe_logits(c, -1), ref + V, (size_t)V * sizeof(float));
    free(s0);
    free(s1);
    free(ref);
    moe_ctx_free(c);
    moe_model_free(m);
}

/* A NaN in a streamed expert: the resident Vulkan load refuses the file; over the host tier the
   experts are checked as they are read, so the step that first needs one fails with
   MOE_ERR_FORMAT naming the layer, and the context stays at its position. */
static void test_tiers_nonfinite(void **state) {
    (void)state;
    NEED_VULKAN();
    char dst[] = "build/test/vk_stream_nan.gguf";
    size_t size = 0;
    uint8_t *b = tu_read_file("test/fixtures/qwen3moe_q8_0.gguf", &size);
    assert_non_null(b);
    gguf_file g;
    assert_int_equal(gguf_parse(&g, b, size), MOE_OK);
    const gguf_tensor *t = gguf_find_tensor(&g, "blk.1.ffn_up_exps.weight");
    assert_non_null(t);
    int E = (int)t->ne[2];
    uint64_t slab = t->nbytes / (uint64_t)E;
    for (int e = 1; e < E; e++) wr16((uint8_t *)t->data + (uint64_t)e * slab + 34 * 3, 0x7e00); /* a block scale of every expert but 0 */
    gguf_free(&g);
    FILE *f = fopen(dst, "wb");
    assert_non_null(f);
    assert_int_equal(fwrite(b, 1, size, f), size);
    fclose(f);
    free(b);
    moe_status st;
    assert_null(load_vk(dst, 0, 0, &st));
    assert_int_equal(st, MOE_ERR_FORMAT);
    uint64_t gmin = gpu_min_for(dst);
    moe_model *m = load_vk(dst, gmin, host_min_for(dst, gmin), NULL);
    moe_model_info info;
    assert_int_equal(moe_model_get_info(m, &info), MOE_OK);
    int32_t tk[NTOK];
    tu_tokens(tk, NTOK, info.n_vocab);
    moe_ctx *c = tu_new_ctx(m, MOE_KV_F32, 0, 0);
    st = moe_step(c, tk, 4);
    assert_int_equal(st, MOE_ERR_FORMAT);
    print_message("[ INFO     ] %s\n", moe_last_error());
    assert_non_null(strstr(moe_last_error(), "layer 1"));
    assert_non_null(strstr(moe_last_error(), "non-finite"));
    assert_int_equal(moe_ctx_pos(c), 0);
    moe_ctx_free(c);
    moe_model_free(m);
    remove(dst);
}

/* two threads, each with its own context, step one streamed model at the same time: the slot
   fills of one are queued while the other's steps run; each stays bit-identical */
typedef struct thr_arg { moe_model *m; int n_batch; float *out; } thr_arg;
static void *thr_main(void *p) {
    thr_arg *a = p;
    tu_stream_workload(a->m, a->n_batch, a->out, NULL);
    return NULL;
}

static void test_threads(void **state) {
    int tiers = *state != NULL; /* over the host tier: the contexts take turns per step */
    NEED_VULKAN();
    const char *p = "test/fixtures/qwen3moe_q4_k.gguf";
    moe_model *m = load_vk(p, 0, 0, NULL);
    moe_model_info info;
    assert_int_equal(moe_model_get_info(m, &info), MOE_OK);
    size_t all = (NTOK + NGEN) * (size_t)info.n_vocab;
    float *ref = malloc(all * sizeof(float)), *ref7 = malloc(all * sizeof(float));
    float *got[2] = {malloc(all * sizeof(float)), malloc(all * sizeof(float))};
    assert_true(ref && ref7 && got[0] && got[1]);
    moe_stats rs;
    tu_stream_workload(m, 0, ref, &rs);
    tu_stream_workload(m, 7, ref7, NULL);
    moe_model_free(m);
    uint64_t rest = info.weight_bytes - info.expert_bytes;
    uint64_t gpu = rest + (rs.gpu_bytes_weights - rest) / 3;
    m = load_vk(p, gpu, tiers ? host_min_for(p, gpu) : 0, NULL);
    if (tiers) assert_non_null(m->xc);
    for (int rep = 0; rep < 2; rep++) {
        pthread_t th[2];
        thr_arg a[2] = {{m, 0, got[0]}, {m, 7, got[1]}};
        for (int i = 0; i < 2; i++) assert_int_equal(pthread_create(&th[i], NULL, thr_main, &a[i]), 0);
        for (int i = 0; i < 2; i++) pthread_join(th[i], NULL);
        assert_memory_equal(got[0], ref, all * sizeof(float));
        assert_memory_equal(got[1], ref7, all * sizeof(float));
    }
    moe_model_free(m);
    free(ref);
    free(ref7);
    free(got[0]);
    free(got[1]);
}

/* Every eviction policy gives the same logits (only hit rates may differ), on the GPU slot cache
   alone and over the host tier: a prefill larger than the caches, then decode, cold and warm */
static void test_policies(void **state) {
    (void)state;
    NEED_VULKAN();
    const char *p = "test/fixtures/qwen3moe_q4_k.gguf";
    static const char *names[] = {"lru", "lfu", "slru"};
    moe_model *m = load_vk(p, 0, 0, NULL);
    moe_model_info info;
    assert_int_equal(moe_model_get_info(m, &info), MOE_OK);
    size_t all = (NTOK + NGEN) * (size_t)info.n_vocab;
    float *ref = malloc(all * sizeof(float));
    assert_non_null(ref);
    moe_stats rs, s;
    tu_stream_workload(m, 0, ref, &rs);
    uint64_t pairs = (uint64_t)(NTOK + NGEN) * (uint64_t)info.n_layer * (uint64_t)info.n_expert_used; /* every layer MoE */
    moe_model_free(m);
    uint64_t budget = (info.weight_bytes - info.expert_bytes) + (rs.gpu_bytes_weights - (info.weight_bytes - info.expert_bytes)) / 3;
    uint64_t host = host_min_for(p, budget);
    for (int tiers = 0; tiers < 2; tiers++)
        for (int pol = 0; pol < 3; pol++) {
            setenv("MOE_EVICT", names[pol], 1);
            m = load_vk(p, budget, tiers ? host : 0, NULL);
            assert_int_equal(m->vk->xg->policy, pol);
            if (tiers) assert_int_equal(m->xc->policy, pol);
            char what[96];
            snprintf(what, sizeof what, "MOE_EVICT=%s%s", names[pol], tiers ? " over a host tier" : "");
            tu_stream_check(m, 0, ref, pairs, 1, &s, what);
            tu_stream_check(m, 0, ref, pairs, 0, &s, what); /* warm */
            printf("[ RESULT   ] q4_k gpu budget %llu%s, warm: %-4s hits %llu misses %llu (%.1f%%), %llu bytes streamed\n",
                   (unsigned long long)budget, tiers ? " over a host tier at its minimum" : "", names[pol], (unsigned long long)s.expert_hits,
                   (unsigned long long)s.expert_misses, 100.0 * (double)s.expert_hits / (double)(s.expert_hits + s.expert_misses),
                   (unsigned long long)s.expert_bytes_streamed);
            moe_model_free(m);
        }
    setenv("MOE_EVICT", "often", 1);
    moe_status st;
    assert_null(load_vk(p, budget, 0, &st));
    assert_int_equal(st, MOE_ERR_INVALID_ARG);
    assert_non_null(strstr(moe_last_error(), "MOE_EVICT=often"));
    unsetenv("MOE_EVICT");
    free(ref);
}

int main(void) {
    pin_driver();
    static char names[][32] = {"q4_k", "f32", "mixed", "q8_0", "f16", "test/fixtures/gemma4/moe", "build/test/gemma4_moe.gguf"};
#define TS(label, f, st) {.name = label, .test_func = f, .teardown_func = teardown_validation, .initial_state = (void *)(st)}
    const struct CMUnitTest tests[] = {
        TS("gpu_cache_q4_k", run_fixture, names[0]), TS("gpu_cache_f32", run_fixture, names[1]),
        TS("gpu_cache_mixed", run_fixture, names[2]), TS("gpu_cache_q8_0", run_fixture, names[3]),
        TS("gpu_cache_f16", run_fixture, names[4]), TS("gpu_cache_gemma4_moe", run_fixture, names[5]),
        TS("gpu_cache_gemma4_moe_gguf", run_fixture, names[6]),
        TS("gpu_cache_policies", test_policies, NULL), TS("gpu_cache_threads", test_threads, NULL),
        TS("tiers_q4_k", run_tiers, names[0]), TS("tiers_f32", run_tiers, names[1]), TS("tiers_mixed", run_tiers, names[2]),
        TS("tiers_q8_0", run_tiers, names[3]), TS("tiers_io_error", test_tiers_io_error, NULL),
        TS("tiers_nonfinite", test_tiers_nonfinite, NULL), TS("tiers_threads", test_threads, (void *)1),
    };
#undef TS
    return tu_run_tests("vk_stream", tests); /* MOE_TESTS=gpu_cache_q8_0: one case */
}
