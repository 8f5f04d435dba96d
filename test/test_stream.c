/* test_stream.c — expert streaming (issue 11) on the tiny fixtures with tiny budgets.

   Host tier (CPU backend): for every budget from the minimum working set up to the whole model,
   with LRU, LFU and SLRU eviction, with and without prefetch, in exact and int8 mode:
     - logits of a teacher-forced prefill (logits_all, chunked and in one step: a step that needs
       more distinct experts than the cache holds runs in expert groups) and of a greedy decode
       equal the resident run's bit for bit;
     - hits + misses = tokens · layers · k, misses > 0 below the model size, bytes counted;
   Budgets: below the minimum working set moe_load fails with MOE_ERR_NO_MEMORY naming it.
   I/O error: a read that fails half-way makes the step fail with MOE_ERR_IO, the context (position,
   logits, KV state) is unchanged, and the next step works and is still bit-identical.
   Several contexts of one streamed model on several threads: each bit-identical. */
#include "../moe.c"
#include "../moe_vk.c"
#include "../shaders_embedded.c"
#include "test_util.h"

#define NTOK TU_NTOK

static const char *fixture_path(const char *name, char *buf, size_t cap) {
    snprintf(buf, cap, "test/fixtures/qwen3moe_%s.gguf", name);
    return buf;
}

static moe_model *load(const char *path, int exact, uint64_t host_budget, moe_status *st_out) {
    moe_load_params lp = {0};
    lp.backend = MOE_BACKEND_CPU;
    lp.n_threads = 2;
    lp.cpu_exact = exact;
    lp.host_budget_bytes = host_budget;
    moe_model *m = NULL;
    moe_status st = moe_load(path, &lp, &m);
    if (st_out) *st_out = st;
    else {
        if (st != MOE_OK) print_error("moe_load(%s, budget %llu): %s (%s)\n", path, (unsigned long long)host_budget, moe_status_str(st), moe_last_error());
        assert_int_equal(st, MOE_OK);
    }
    return m;
}

/* the minimum working set, read from the error of a load below it */
static uint64_t min_budget(const char *path, int exact) {
    moe_status st;
    moe_model *m = load(path, exact, 1, &st);
    assert_null(m);
    assert_int_equal(st, MOE_ERR_NO_MEMORY);
    return tu_min_from_error();
}

static void test_sizes_and_minimum(void **state) {
    (void)state;
    char p[256];
    fixture_path("q4_k", p, sizeof p);
    moe_model *m = load(p, 0, 0, NULL);
    moe_model_info info;
    assert_int_equal(moe_model_get_info(m, &info), MOE_OK);
    assert_true(info.expert_bytes > 0);
    assert_true(info.weight_bytes > info.expert_bytes);
    assert_true(info.weight_bytes <= info.file_bytes);
    moe_model_free(m);
    uint64_t min = min_budget(p, 0);
    assert_true(min > info.weight_bytes - info.expert_bytes);
    assert_true(min < info.weight_bytes);
    moe_status st;
    assert_null(load(p, 0, min - 1, &st));
    assert_int_equal(st, MOE_ERR_NO_MEMORY);
    m = load(p, 0, min, NULL);
    moe_model_free(m);
}

typedef struct variant { const char *fixture; int exact; const char *evict; int prefetch; } variant;

static void run_budgets(void **state) {
    const variant *v = *state;
    char p[256];
    fixture_path(v->fixture, p, sizeof p);
    setenv("MOE_EVICT", v->evict, 1);
    setenv("MOE_PREFETCH", v->prefetch ? "1" : "0", 1);
    moe_model *m = load(p, v->exact, 0, NULL);
    moe_model_info info;
    assert_int_equal(moe_model_get_info(m, &info), MOE_OK);
    size_t rows = NTOK + TU_NGEN, all = rows * (size_t)info.n_vocab;
    float *ref = malloc(all * sizeof(float));
    assert_non_null(ref);
    tu_stream_workload(m, 0, ref, NULL);
    moe_model_free(m);
    uint64_t min = min_budget(p, v->exact), rest = info.weight_bytes - info.expert_bytes;
    uint64_t budgets[] = {min, min + (min - rest) / 2, rest + info.expert_bytes / 4, rest + info.expert_bytes / 2,
                          rest + info.expert_bytes - 1};
    uint64_t pairs = (uint64_t)rows * (uint64_t)info.n_layer * (uint64_t)info.n_expert_used;
    for (size_t b = 0; b < sizeof budgets / sizeof budgets[0]; b++) {
        if (budgets[b] < min) continue;
        m = load(p, v->exact, budgets[b], NULL);
        for (int nb = 0; nb < 2; nb++) {
            moe_stats s;
            char what[160];
            snprintf(what, sizeof what, "%s exact=%d %s prefetch=%d budget %llu (min %llu)", v->fixture, v->exact, v->evict, v->prefetch,
                     (unsigned long long)budgets[b], (unsigned long long)min);
            tu_stream_check(m, nb ? 7 : 0, ref, pairs, 1, &s, what);
            print_message("    %s: hits %llu misses %llu (%.0f%% hit) %llu bytes read\n", what, (unsigned long long)s.expert_hits,
                          (unsigned long long)s.expert_misses, 100.0 * (double)s.expert_hits / (double)pairs,
                          (unsigned long long)s.expert_bytes_streamed);
        }
        moe_model_free(m);
    }
    unsetenv("MOE_EVICT");
    unsetenv("MOE_PREFETCH");
    free(ref);
}

/* An injected read error mid-step: the step fails cleanly, the context is unchanged, the next
   step works and is bit-identical to the resident run. */
static void test_io_error(void **state) {
    (void)state;
    char p[256];
    fixture_path("q4_k", p, sizeof p);
    moe_model *m = load(p, 1, 0, NULL);
    moe_model_info info;
    assert_int_equal(moe_model_get_info(m, &info), MOE_OK);
    int V = info.n_vocab;
    int32_t t[NTOK];
    tu_tokens(t, NTOK, V);
    float *ref = malloc((size_t)V * 2 * sizeof(float));
    assert_non_null(ref);
    moe_ctx *c = tu_new_ctx(m, MOE_KV_F32, 0, 0);
    assert_int_equal(moe_step(c, t, 20), MOE_OK);
    assert_int_equal(moe_step(c, t + 20, 1), MOE_OK);
    memcpy(ref, moe_logits(c, -1), (size_t)V * sizeof(float));
    assert_int_equal(moe_step(c, t + 21, 1), MOE_OK);
    memcpy(ref + V, moe_logits(c, -1), (size_t)V * sizeof(float));
    moe_ctx_free(c);
    moe_model_free(m);

    for (int pf = 0; pf < 2; pf++) {
        setenv("MOE_PREFETCH", pf ? "1" : "0", 1);
        m = load(p, 1, min_budget(p, 1), NULL);
        c = tu_new_ctx(m, MOE_KV_F32, 0, 0);
        assert_int_equal(moe_step(c, t, 20), MOE_OK);
        size_t n0 = 0, n1 = 0;
        assert_int_equal(moe_ctx_save(c, NULL, 0, &n0), MOE_OK);
        uint8_t *s0 = malloc(n0), *s1 = malloc(n0);
        assert_non_null(s0);
        assert_non_null(s1);
        assert_int_equal(moe_ctx_save(c, s0, n0, &n0), MOE_OK);
        moe_stats before;
        assert_int_equal(moe_ctx_get_stats(c, &before), MOE_OK);
        /* with a cache of the minimum size every layer misses: the 3rd read of the step fails */
        moe_test_fail_io_after(2);
        moe_status st = moe_step(c, t + 20, 1);
        moe_test_fail_io_after(-1);
        assert_int_equal(st, MOE_ERR_IO);
        assert_non_null(strstr(moe_last_error(), "expert streaming"));
        assert_int_equal(moe_ctx_pos(c), 20);
        assert_int_equal(moe_ctx_save(c, NULL, 0, &n1), MOE_OK);
        assert_int_equal(n1, n0);
        assert_int_equal(moe_ctx_save(c, s1, n1, &n1), MOE_OK);
        assert_memory_equal(s0, s1, n0);
        /* the next steps work, bit-identical */
        assert_int_equal(moe_step(c, t + 20, 1), MOE_OK);
        assert_memory_equal(moe_logits(c, -1), ref, (size_t)V * sizeof(float));
        assert_int_equal(moe_step(c, t + 21, 1), MOE_OK);
        assert_memory_equal(moe_logits(c, -1), ref + V, (size_t)V * sizeof(float));
        free(s0);
        free(s1);
        moe_ctx_free(c);
        moe_model_free(m);
    }
    unsetenv("MOE_PREFETCH");
    free(ref);
}

/* A NaN in a streamed expert: a resident load refuses the file, a streamed load does not read the
   experts at load (that would read the whole file), so the step that first reads the expert fails
   with MOE_ERR_FORMAT naming it and leaves the context unchanged; steps that never route to it work. */
static void test_nonfinite_streamed_expert(void **state) {
    (void)state;
    char src[256], dst[] = "build/test/stream_nan.gguf";
    fixture_path("q8_0", src, sizeof src);
    size_t size = 0;
    uint8_t *b = tu_read_file(src, &size);
    assert_non_null(b);
    gguf_file g;
    assert_int_equal(gguf_parse(&g, b, size), MOE_OK);
    const gguf_tensor *t = gguf_find_tensor(&g, "blk.1.ffn_up_exps.weight");
    assert_non_null(t);
    /* poison the scale of block 3 in every expert's slab but expert 0's: any routed token hits one */
    int E = (int)t->ne[2];
    uint64_t slab = t->nbytes / (uint64_t)E;
    uint8_t *base = (uint8_t *)t->data;
    for (int e = 1; e < E; e++) wr16(base + (uint64_t)e * slab + 34 * 3, 0x7e00);
    gguf_free(&g);
    FILE *f = fopen(dst, "wb");
    assert_non_null(f);
    assert_int_equal(fwrite(b, 1, size, f), size);
    fclose(f);
    free(b);
    moe_status st;
    assert_null(load(dst, 1, 0, &st));
    assert_int_equal(st, MOE_ERR_FORMAT);
    moe_model *m = load(dst, 1, min_budget(dst, 1), NULL);
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

/* The eviction policy alone (moe_xs_victim / moe_xs_touch, as the host cache drives them): a
   cache of 16 slots over 64 units; 8 hot units are used by 20 "decode" steps, then a "prefill"
   scan touches all 64 units once (a step larger than the cache: a miss may not take a protected
   slot once its group has begun), then the decode steps come back. LRU has flushed the hot units;
   SLRU kept them all (protected) and LFU keeps them too (new units are the least used). */
static int sim_use(moe_xs_pol *p, int32_t *key, uint8_t *state, int32_t *map, int u, int pairs, int spare) {
    int32_t s = map[u];
    if (s >= 0) {
        moe_xs_touch(p, s, (uint32_t)pairs, 0);
        return 1;
    }
    s = moe_xs_victim(p, NULL, state, UINT64_MAX, spare);
    if (s < 0) s = moe_xs_victim(p, NULL, state, UINT64_MAX, 0); /* the next group: anything goes */
    assert_true(s >= 0);
    if (key[s] >= 0) map[key[s]] = -1;
    key[s] = u;
    map[u] = s;
    state[s] = XS_READY;
    moe_xs_touch(p, s, (uint32_t)pairs, 1);
    return 0;
}

static void test_policy_scan(void **state) {
    (void)state;
    enum { NS = 16, NU = 64, HOT = 8 };
    int kept[3];
    for (int kind = 0; kind < 3; kind++) {
        int32_t key[NS], map[NU];
        uint8_t st[NS] = {0};
        for (int i = 0; i < NS; i++) key[i] = -1;
        for (int i = 0; i < NU; i++) map[i] = -1;
        moe_xs_pol p;
        assert_int_equal(moe_xs_pol_init(&p, kind, NS, NU, key), 1);
        assert_int_equal(p.max_prot, NS * 4 / 5);
        for (int step = 0; step < 20; step++)
            for (int u = 0; u < HOT; u++) sim_use(&p, key, st, map, u * 7 % NU, 1, 0);
        for (int u = 0; u < NU; u++) sim_use(&p, key, st, map, u, 3, u % NS != 0); /* groups of NS */
        kept[kind] = 0;
        for (int u = 0; u < HOT; u++) kept[kind] += map[u * 7 % NU] >= 0;
        int hits = 0;
        for (int u = 0; u < HOT; u++) hits += sim_use(&p, key, st, map, u * 7 % NU, 1, 0);
        assert_true(hits <= kept[kind]);
        if (kind == MOE_XS_SLRU) {
            assert_int_equal(hits, HOT);
            assert_true(p.n_prot <= p.max_prot);
            int np = 0;
            for (int i = 0; i < NS; i++) np += p.prot[i];
            assert_int_equal(np, p.n_prot);
        }
        moe_xs_pol_free(&p);
    }
    print_message("    hot units still cached after a scan of %d units through %d slots: LRU %d, LFU %d, SLRU %d of %d\n", NU, NS,
                  kept[MOE_XS_LRU], kept[MOE_XS_LFU], kept[MOE_XS_SLRU], HOT);
    assert_true(kept[MOE_XS_LRU] < HOT);
    assert_int_equal(kept[MOE_XS_SLRU], HOT);
    /* MOE_EVICT names one of the three, or the load fails saying so */
    char path[256];
    fixture_path("q4_k", path, sizeof path);
    setenv("MOE_EVICT", "mru", 1);
    moe_status err;
    assert_null(load(path, 1, min_budget(path, 1), &err));
    assert_int_equal(err, MOE_ERR_INVALID_ARG);
    assert_non_null(strstr(moe_last_error(), "MOE_EVICT=mru"));
    unsetenv("MOE_EVICT");
}

/* Prefetch throttling (MOE_PREFETCH_ODDS): at any odds the logits equal the resident run's; odds 1
   (no class ever reaches it) reads exactly what no prefetch at all reads; other values fail the
   load naming the variable. */
static void test_prefetch_odds(void **state) {
    (void)state;
    char p[256];
    fixture_path("q4_k", p, sizeof p);
    moe_model *m = load(p, 1, 0, NULL);
    moe_model_info info;
    assert_int_equal(moe_model_get_info(m, &info), MOE_OK);
    size_t rows = TU_NTOK + TU_NGEN;
    float *ref = malloc(rows * (size_t)info.n_vocab * sizeof(float));
    assert_non_null(ref);
    tu_stream_workload(m, 0, ref, NULL);
    moe_model_free(m);
    uint64_t pairs = (uint64_t)rows * (uint64_t)info.n_layer * (uint64_t)info.n_expert_used, budget = info.weight_bytes - info.expert_bytes / 2;
    const char *pf[] = {"0", "1", "1", "1"}, *odds[] = {NULL, "1", "0", NULL};
    moe_stats s[4];
    setenv("MOE_EVICT", "lru", 1); /* (SLRU's protected slots leave a prefetch no room on this tiny fixture) */
    for (int i = 0; i < 4; i++) {
        setenv("MOE_PREFETCH", pf[i], 1);
        if (odds[i]) setenv("MOE_PREFETCH_ODDS", odds[i], 1);
        else unsetenv("MOE_PREFETCH_ODDS");
        char what[96];
        snprintf(what, sizeof what, "q4_k prefetch=%s odds=%s", pf[i], odds[i] ? odds[i] : "default");
        m = load(p, 1, budget, NULL);
        tu_stream_check(m, 0, ref, pairs, 1, &s[i], what);
        moe_model_free(m);
        print_message("    %s: hits %llu misses %llu, %llu bytes read\n", what, (unsigned long long)s[i].expert_hits,
                      (unsigned long long)s[i].expert_misses, (unsigned long long)s[i].expert_bytes_streamed);
    }
    assert_int_equal(s[1].expert_bytes_streamed, s[0].expert_bytes_streamed);
    assert_int_equal(s[1].expert_misses, s[0].expert_misses);
    /* deterministic on this fixture: reading every prediction ahead turns some misses into hits, and
       the default's throttle (after the first judgments) reads fewer bytes than that */
    assert_true(s[2].expert_hits >= s[0].expert_hits);
    assert_true(s[3].expert_bytes_streamed < s[2].expert_bytes_streamed);
    const char *bad[] = {"2", "-0.5", "half", "0.5x"};
    for (int i = 0; i < 4; i++) {
        setenv("MOE_PREFETCH_ODDS", bad[i], 1);
        moe_status err;
        assert_null(load(p, 1, budget, &err));
        assert_int_equal(err, MOE_ERR_INVALID_ARG);
        assert_non_null(strstr(moe_last_error(), "MOE_PREFETCH_ODDS="));
    }
    unsetenv("MOE_PREFETCH_ODDS");
    unsetenv("MOE_PREFETCH");
    unsetenv("MOE_EVICT");
    free(ref);
}

typedef struct thr_arg { moe_model *m; float *out; } thr_arg;
static void *thr_main(void *p) {
    thr_arg *a = p;
    tu_stream_workload(a->m, 5, a->out, NULL);
    return NULL;
}

/* several contexts of one streamed model, each on its own thread, share the cache */
static void test_threads(void **state) {
    (void)state;
    char p[256];
    fixture_path("mixed", p, sizeof p);
    moe_model *m = load(p, 1, 0, NULL);
    moe_model_info info;
    assert_int_equal(moe_model_get_info(m, &info), MOE_OK);
    size_t all = (size_t)(NTOK + TU_NGEN) * (size_t)info.n_vocab;
    float *ref = malloc(all * sizeof(float));
    assert_non_null(ref);
    tu_stream_workload(m, 5, ref, NULL);
    moe_model_free(m);
    uint64_t min = min_budget(p, 1);
    m = load(p, 1, min + (info.expert_bytes / 8), NULL);
    enum { NT = 3 };
    pthread_t th[NT];
    thr_arg a[NT];
    for (int i = 0; i < NT; i++) {
        a[i].m = m;
        a[i].out = malloc(all * sizeof(float));
        assert_non_null(a[i].out);
        assert_int_equal(pthread_create(&th[i], NULL, thr_main, &a[i]), 0);
    }
    for (int i = 0; i < NT; i++) {
        pthread_join(th[i], NULL);
        assert_memory_equal(a[i].out, ref, all * sizeof(float));
        free(a[i].out);
    }
    moe_model_free(m);
    free(ref);
}

/* Vulkan (lavapipe in CI): with a host budget the experts live on the device after the upload and
   the logits equal the resident run's; a GPU budget below the weights streams experts through the
   GPU slot cache (bit-identical; test_vk_stream covers it in depth), with NO_MEMORY below the
   minimum working set (AUTO then takes the CPU); both budgets below the weights: not built yet. */
static void test_vulkan_budgets(void **state) {
    (void)state;
    char p[256];
    fixture_path("q4_k", p, sizeof p);
    moe_load_params lp = {0};
    lp.backend = MOE_BACKEND_VULKAN;
    moe_model *m = NULL;
    moe_status st = moe_load(p, &lp, &m);
    if (st != MOE_OK && !getenv("MOE_REQUIRE_VULKAN")) {
        print_message("    no Vulkan device (%s): skipped\n", moe_last_error());
        skip();
    }
    assert_int_equal(st, MOE_OK);
    moe_model_info info;
    assert_int_equal(moe_model_get_info(m, &info), MOE_OK);
    size_t all = (size_t)(NTOK + TU_NGEN) * (size_t)info.n_vocab;
    float *ref = malloc(all * sizeof(float)), *got = malloc(all * sizeof(float));
    assert_non_null(ref);
    assert_non_null(got);
    tu_stream_workload(m, 0, ref, NULL);
    moe_model_free(m);
    uint64_t min = min_budget(p, 0);
    lp.host_budget_bytes = min;
    assert_int_equal(moe_load(p, &lp, &m), MOE_OK);
    tu_stream_workload(m, 0, got, NULL);
    assert_memory_equal(got, ref, all * sizeof(float));
    moe_model_free(m);
    /* both budgets: the GPU slot cache over the host tier, whose minimum adds the stage (test_vk_stream has the rest) */
    lp.gpu_budget_bytes = info.weight_bytes - 1;
    assert_int_equal(moe_load(p, &lp, &m), MOE_ERR_NO_MEMORY);
    assert_non_null(strstr(moe_last_error(), "staged for the GPU"));
    const char *e = strstr(moe_last_error(), "minimum working set of ");
    assert_non_null(e);
    lp.host_budget_bytes = strtoull(e + strlen("minimum working set of "), NULL, 10);
    assert_true(lp.host_budget_bytes > min);
    assert_int_equal(moe_load(p, &lp, &m), MOE_OK);
    assert_true(moe_vk_streams_experts(m->vk));
    assert_non_null(m->xc);
    tu_stream_workload(m, 0, got, NULL);
    assert_memory_equal(got, ref, all * sizeof(float));
    moe_model_free(m);
    lp.host_budget_bytes = 0;
    assert_int_equal(moe_load(p, &lp, &m), MOE_OK);
    assert_true(moe_vk_streams_experts(m->vk));
    tu_stream_workload(m, 0, got, NULL);
    assert_memory_equal(got, ref, all * sizeof(float));
    moe_model_free(m);
    lp.gpu_budget_bytes = info.weight_bytes - info.expert_bytes;
    assert_int_equal(moe_load(p, &lp, &m), MOE_ERR_NO_MEMORY);
    assert_non_null(strstr(moe_last_error(), "minimum working set"));
    lp.backend = MOE_BACKEND_AUTO;
    assert_int_equal(moe_load(p, &lp, &m), MOE_OK);
    assert_int_equal(moe_model_get_info(m, &info), MOE_OK);
    assert_int_equal(info.backend, MOE_BACKEND_CPU);
    moe_model_free(m);
    free(ref);
    free(got);
}

int main(void) {
    static variant vs[] = {
        {"q4_k", 1, "lru", 0}, {"q4_k", 0, "lru", 1}, {"q4_k", 1, "lfu", 1}, {"mixed", 0, "lru", 1},
        {"f32", 1, "lfu", 0},  {"q8_0", 0, "lru", 1}, {"f16", 1, "lru", 1},   {"q4_k", 1, "slru", 1},
        {"q4_k", 0, "slru", 0}, {"mixed", 1, "slru", 1}, {"q8_0", 1, "slru", 0},
    };
#define V(i) {.name = "budgets", .test_func = run_budgets, .initial_state = &vs[i]}
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_sizes_and_minimum), cmocka_unit_test(test_policy_scan), V(0), V(1), V(2), V(3), V(4), V(5), V(6),
        V(7), V(8), V(9), V(10),
        cmocka_unit_test(test_prefetch_odds), cmocka_unit_test(test_io_error), cmocka_unit_test(test_nonfinite_streamed_expert), cmocka_unit_test(test_threads), cmocka_unit_test(test_vulkan_budgets),
    };
    return tu_run_tests("stream", tests);
}
