/* test_api — contexts and their failure paths through the public API: threads (one context per
   thread over one shared model), context full, bad tokens, rewind, logits access, save/load,
   stats, load progress/cancel/log callbacks, kv types, allocation failures. Every failing call
   must leave the object exactly as it was; the ASan build checks nothing leaks. */
#include "../moe.c"
#include "../moe_vk.c"
#include "../shaders_embedded.c"
#include "test_util.h"
#include "test_async.h"

#define MODEL "test/fixtures/qwen3moe_q8_0.gguf"
#define OTHER_MODEL "test/fixtures/qwen3moe_f32.gguf"

static moe_model *load(const char *path, int n_threads) { return tu_load(path, MOE_BACKEND_CPU, n_threads, 0); }

static moe_ctx *new_ctx(moe_model *m, int n_ctx, int logits_all) {
    moe_ctx_params cp = {0};
    cp.n_ctx = n_ctx;
    cp.logits_all = logits_all;
    moe_ctx *c = NULL;
    assert_int_equal(moe_ctx_new(m, &cp, &c), MOE_OK);
    return c;
}

static void prompt_tokens(moe_token *t, int n, int n_vocab, int seed) {
    for (int i = 0; i < n; i++) t[i] = (moe_token)((i * 37 + seed * 11 + 5) % n_vocab);
}

/* prompt, then n_gen greedy tokens; the tokens go to out */
static void run_greedy(moe_ctx *c, int n_vocab, int seed, int n_prompt, int n_gen, moe_token *out) {
    moe_token p[64];
    prompt_tokens(p, n_prompt, n_vocab, seed);
    assert_int_equal(moe_step(c, p, n_prompt), MOE_OK);
    for (int i = 0; i < n_gen; i++) {
        out[i] = argmax(moe_logits(c, -1), n_vocab);
        assert_int_equal(moe_step(c, &out[i], 1), MOE_OK);
    }
}

/* ---- one model, four threads, a context each ------------------------------------------------- */
typedef struct thread_job { moe_model *m; int seed; moe_token out[24]; moe_status st; } thread_job;

static void *thread_main(void *arg) {
    thread_job *j = arg;
    moe_ctx_params cp = {0};
    cp.n_ctx = 64;
    moe_ctx *c = NULL;
    j->st = moe_ctx_new(j->m, &cp, &c);
    if (j->st) return NULL;
    moe_token p[20];
    int nv = tu_vocab(j->m);
    prompt_tokens(p, 20, nv, j->seed);
    j->st = moe_step(c, p, 20);
    for (int i = 0; i < 24 && !j->st; i++) {
        j->out[i] = argmax(moe_logits(c, -1), nv);
        j->st = moe_step(c, &j->out[i], 1);
    }
    moe_ctx_free(c);
    return NULL;
}

static void test_threads(void **state) {
    (void)state;
    moe_model *m = load(MODEL, 2);
    int nv = tu_vocab(m);
    moe_token want[4][24];
    for (int t = 0; t < 4; t++) {
        moe_ctx *c = new_ctx(m, 64, 0);
        run_greedy(c, nv, t, 20, 24, want[t]);
        moe_ctx_free(c);
    }
    thread_job jobs[4];
    pthread_t th[4];
    for (int t = 0; t < 4; t++) {
        jobs[t].m = m;
        jobs[t].seed = t;
        jobs[t].st = -100;
        assert_int_equal(pthread_create(&th[t], NULL, thread_main, &jobs[t]), 0);
    }
    for (int t = 0; t < 4; t++) pthread_join(th[t], NULL);
    for (int t = 0; t < 4; t++) {
        assert_int_equal(jobs[t].st, MOE_OK);
        assert_memory_equal(jobs[t].out, want[t], sizeof want[t]);
    }
    moe_model_free(m);
}

/* ---- the model outlives its contexts (moe.h: reference counted) --------------------------------
   moe_model_free releases the caller's reference; contexts keep stepping (here two on other
   threads while the model is freed), and the last moe_ctx_free frees the model: ASan / valgrind
   see no use after free and no leak, TSan no race. */
typedef struct late_job { moe_ctx *c; int nv, seed; moe_token out[24]; moe_status st; } late_job;

static void *late_main(void *arg) {
    late_job *j = arg;
    moe_token p[20];
    prompt_tokens(p, 20, j->nv, j->seed);
    j->st = moe_step(j->c, p, 20);
    for (int i = 0; i < 24 && !j->st; i++) {
        j->out[i] = argmax(moe_logits(j->c, -1), j->nv);
        j->st = moe_step(j->c, &j->out[i], 1);
    }
    moe_ctx_free(j->c); /* one of these may drop the model's last reference */
    return NULL;
}

static void test_model_outlives_contexts(void **state) {
    (void)state;
    moe_model *m = load(MODEL, 2);
    const int nv = tu_vocab(m);
    moe_token want[3][24], got[24];
    for (int t = 0; t < 3; t++) {
        moe_ctx *c = new_ctx(m, 64, 0);
        run_greedy(c, nv, t, 20, 24, want[t]);
        moe_ctx_free(c);
    }
    moe_ctx *a = new_ctx(m, 64, 0), *b = new_ctx(m, 64, 0);
    late_job jobs[2];
    pthread_t th[2];
    for (int t = 0; t < 2; t++) {
        jobs[t] = (late_job){new_ctx(m, 64, 0), nv, t + 1, {0}, -100};
        assert_int_equal(pthread_create(&th[t], NULL, late_main, &jobs[t]), 0);
    }
    moe_model_free(m); /* the caller's reference; four contexts hold theirs */
    run_greedy(a, nv, 0, 20, 24, got);
    assert_memory_equal(got, want[0], sizeof got);
    size_t size = 0;
    assert_int_equal(moe_ctx_save(a, NULL, 0, &size), MOE_OK);
    void *snap = malloc(size);
    assert_int_equal(moe_ctx_save(a, snap, size, &size), MOE_OK);
    moe_ctx_free(a);
    assert_int_equal(moe_ctx_load(b, snap, size), MOE_OK); /* b now continues where a stopped */
    free(snap);
    assert_int_equal(moe_ctx_pos(b), 44);
    moe_stats st;
    assert_int_equal(moe_ctx_get_stats(b, &st), MOE_OK);
    for (int t = 0; t < 2; t++) {
        pthread_join(th[t], NULL);
        assert_int_equal(jobs[t].st, MOE_OK);
        assert_memory_equal(jobs[t].out, want[t + 1], sizeof want[t + 1]);
    }
    assert_int_equal(moe_ctx_rewind(b, 20), MOE_OK);
    assert_int_equal(moe_step(b, &want[0][0], 1), MOE_OK);
    assert_int_equal(argmax(moe_logits(b, -1), nv), want[0][1]);
    moe_ctx_free(b); /* the last reference: the model goes now */
}

/* moe_last_error is per thread */
static void *error_thread(void *arg) {
    moe_model *m = NULL;
    moe_load("build/test/no-such-file-thread.gguf", NULL, &m);
    *(int *)arg = strstr(moe_last_error(), "no-such-file-thread") != NULL;
    return NULL;
}

static void test_thread_local_error(void **state) {
    (void)state;
    moe_model *m = NULL;
    assert_int_equal(moe_load("build/test/no-such-file-main.gguf", NULL, &m), MOE_ERR_IO);
    int ok = 0;
    pthread_t th;
    pthread_create(&th, NULL, error_thread, &ok);
    pthread_join(th, NULL);
    assert_true(ok);
    assert_non_null(strstr(moe_last_error(), "no-such-file-main"));
}

/* ---- failures leave the context as it was ------------------------------------------------------ */
static void test_context_full_and_bad_tokens(void **state) {
    (void)state;
    moe_model *m = load(MODEL, 1);
    int nv = tu_vocab(m);
    moe_ctx *c = new_ctx(m, 32, 0);
    moe_token p[40];
    prompt_tokens(p, 40, nv, 3);
    assert_int_equal(moe_step(c, p, 33), MOE_ERR_CONTEXT_FULL);
    assert_int_equal(moe_ctx_pos(c), 0);
    assert_null(moe_logits(c, -1));
    assert_int_equal(moe_step(c, p, 30), MOE_OK);
    float *before = malloc((size_t)nv * sizeof *before);
    memcpy(before, moe_logits(c, -1), (size_t)nv * sizeof *before);
    assert_int_equal(moe_step(c, p, 3), MOE_ERR_CONTEXT_FULL);
    assert_non_null(strstr(moe_last_error(), "do not fit"));
    moe_token bad[2] = {1, (moe_token)nv};
    assert_int_equal(moe_step(c, bad, 2), MOE_ERR_INVALID_ARG);
    bad[1] = -1;
    assert_int_equal(moe_step(c, bad, 2), MOE_ERR_INVALID_ARG);
    assert_int_equal(moe_step(c, NULL, 1), MOE_ERR_INVALID_ARG);
    assert_int_equal(moe_step(c, p, 0), MOE_ERR_INVALID_ARG);
    assert_int_equal(moe_step(NULL, p, 1), MOE_ERR_INVALID_ARG);
    assert_int_equal(moe_ctx_pos(c), 30);
    assert_memory_equal(moe_logits(c, -1), before, (size_t)nv * sizeof *before);
    /* the context still works and matches a fresh run of the same 32 tokens */
    assert_int_equal(moe_step(c, p + 30, 2), MOE_OK);
    assert_int_equal(moe_ctx_pos(c), 32);
    moe_ctx *d = new_ctx(m, 32, 0);
    assert_int_equal(moe_step(d, p, 32), MOE_OK);
    assert_memory_equal(moe_logits(c, -1), moe_logits(d, -1), (size_t)nv * sizeof(float));
    assert_int_equal(moe_ctx_rewind(c, 33), MOE_ERR_INVALID_ARG);
    assert_int_equal(moe_ctx_rewind(c, -1), MOE_ERR_INVALID_ARG);
    assert_int_equal(moe_ctx_pos(c), 32);
    assert_int_equal(moe_ctx_rewind(c, 0), MOE_OK);
    assert_null(moe_logits(c, -1));
    free(before);
    moe_ctx_free(c);
    moe_ctx_free(d);
    moe_model_free(m);
}

static void test_logits_access(void **state) {
    (void)state;
    moe_model *m = load(MODEL, 1);
    int nv = tu_vocab(m);
    moe_ctx *c = new_ctx(m, 64, 0), *a = new_ctx(m, 64, 1);
    moe_token p[10];
    prompt_tokens(p, 10, nv, 1);
    assert_null(moe_logits(c, -1));
    assert_int_equal(moe_step(c, p, 10), MOE_OK);
    assert_int_equal(moe_step(a, p, 10), MOE_OK);
    assert_null(moe_logits(c, 0));              /* needs logits_all */
    assert_null(moe_logits(a, 10));
    assert_null(moe_logits(a, -2));
    assert_memory_equal(moe_logits(a, 9), moe_logits(c, -1), (size_t)nv * sizeof(float));
    assert_memory_equal(moe_logits(a, -1), moe_logits(a, 9), (size_t)nv * sizeof(float));
    /* a single step keeps one row; earlier rows are gone */
    assert_int_equal(moe_step(a, p, 1), MOE_OK);
    assert_non_null(moe_logits(a, 0));
    assert_null(moe_logits(a, 1));
    assert_null(moe_logits(NULL, -1));
    moe_ctx_free(c);
    moe_ctx_free(a);
    moe_model_free(m);
}

/* ---- save / load -------------------------------------------------------------------------- */
static void test_save_load(void **state) {
    (void)state;
    moe_model *m = load(MODEL, 2), *other = load(OTHER_MODEL, 1);
    int nv = tu_vocab(m);
    moe_ctx *c = new_ctx(m, 96, 0);
    moe_token p[40], ga[16], gb[16];
    prompt_tokens(p, 40, nv, 7);
    assert_int_equal(moe_step(c, p, 40), MOE_OK);
    size_t size = 0;
    assert_int_equal(moe_ctx_save(c, NULL, 0, &size), MOE_OK);
    assert_true(size > 40 * 2);
    uint8_t *buf = malloc(size);
    assert_int_equal(moe_ctx_save(c, buf, size - 1, &size), MOE_ERR_BUFFER_TOO_SMALL);
    assert_int_equal(moe_ctx_save(c, buf, size, NULL), MOE_OK);

    moe_ctx *d = new_ctx(m, 96, 0);
    moe_token q[5] = {1, 2, 3, 4, 5};
    assert_int_equal(moe_step(d, q, 5), MOE_OK); /* some state of its own, to be replaced */
    assert_int_equal(moe_ctx_load(d, buf, size), MOE_OK);
    assert_int_equal(moe_ctx_pos(d), 40);
    assert_memory_equal(moe_logits(c, -1), moe_logits(d, -1), (size_t)nv * sizeof(float));
    for (int i = 0; i < 16; i++) {
        ga[i] = argmax(moe_logits(c, -1), nv);
        gb[i] = argmax(moe_logits(d, -1), nv);
        assert_int_equal(moe_step(c, &ga[i], 1), MOE_OK);
        assert_int_equal(moe_step(d, &gb[i], 1), MOE_OK);
        assert_memory_equal(moe_logits(c, -1), moe_logits(d, -1), (size_t)nv * sizeof(float));
    }
    assert_memory_equal(ga, gb, sizeof ga);

    /* refusals leave the target untouched: it continues exactly like c */
    moe_ctx *wrong_n = new_ctx(m, 64, 0), *wrong_model = new_ctx(other, 96, 0);
    assert_int_equal(moe_ctx_load(wrong_n, buf, size), MOE_ERR_INVALID_ARG);
    assert_non_null(strstr(moe_last_error(), "n_ctx"));
    assert_int_equal(moe_ctx_load(wrong_model, buf, size), MOE_ERR_INVALID_ARG);
    assert_non_null(strstr(moe_last_error(), "different model"));
    assert_int_equal(moe_ctx_pos(wrong_n), 0);
    uint8_t *bad = malloc(size);
    memcpy(bad, buf, size);
    bad[size / 2] ^= 0x10;
    int pos_before = moe_ctx_pos(d);
    assert_int_equal(moe_ctx_load(d, bad, size), MOE_ERR_FORMAT);
    assert_int_equal(moe_ctx_load(d, buf, size - 3), MOE_ERR_FORMAT);
    assert_int_equal(moe_ctx_load(d, buf, 8), MOE_ERR_FORMAT);
    memcpy(bad, buf, size);
    bad[0] ^= 1; /* magic */
    assert_int_equal(moe_ctx_load(d, bad, size), MOE_ERR_FORMAT);
    assert_int_equal(moe_ctx_load(d, NULL, size), MOE_ERR_INVALID_ARG);
    assert_int_equal(moe_ctx_pos(d), pos_before);
    moe_token t = argmax(moe_logits(c, -1), nv);
    assert_int_equal(argmax(moe_logits(d, -1), nv), t);
    assert_int_equal(moe_step(c, &t, 1), MOE_OK);
    assert_int_equal(moe_step(d, &t, 1), MOE_OK);
    assert_memory_equal(moe_logits(c, -1), moe_logits(d, -1), (size_t)nv * sizeof(float));
    free(bad);
    free(buf);
    moe_ctx_free(c);
    moe_ctx_free(d);
    moe_ctx_free(wrong_n);
    moe_ctx_free(wrong_model);
    moe_model_free(m);
    moe_model_free(other);
}

/* ---- a forged state is refused (consistent header and checksum, bad content), context unchanged ---- */
static void reseal(uint8_t *b, size_t size) { /* recompute the checksum, as a forger would */
    state_header h;
    memcpy(&h, b, sizeof h);
    h.checksum = moe_fnv1a(0xcbf29ce484222325ull, b + sizeof h, size - sizeof h);
    memcpy(b, &h, sizeof h);
}

static void expect_refused(moe_ctx *d, const uint8_t *b, size_t size, moe_status want, const char *needle, int pos_before,
                           const float *logits_before, int nv) {
    moe_status st = moe_ctx_load(d, b, size);
    print_message("forged state: %s\n", moe_last_error());
    assert_int_equal(st, want);
    assert_non_null(strstr(moe_last_error(), needle));
    assert_int_equal(moe_ctx_pos(d), pos_before);
    assert_memory_equal(moe_logits(d, -1), logits_before, (size_t)nv * sizeof(float));
}

static void test_state_forged(void **state) {
    (void)state;
    moe_model *m = load(MODEL, 1);
    int nv = tu_vocab(m);
    for (int kv_type = MOE_KV_F16; kv_type <= MOE_KV_F32; kv_type++) {
        moe_ctx_params cp = {0};
        cp.n_ctx = 64;
        cp.kv_type = kv_type;
        moe_ctx *c = NULL, *d = NULL;
        assert_int_equal(moe_ctx_new(m, &cp, &c), MOE_OK);
        assert_int_equal(moe_ctx_new(m, &cp, &d), MOE_OK);
        moe_token p[20];
        prompt_tokens(p, 20, nv, 3);
        assert_int_equal(moe_step(c, p, 12), MOE_OK);
        assert_int_equal(moe_step(d, p + 12, 5), MOE_OK); /* d's own state, which refusals keep */
        float *before = malloc((size_t)nv * sizeof *before);
        memcpy(before, moe_logits(d, -1), (size_t)nv * sizeof *before);
        size_t size = 0;
        assert_int_equal(moe_ctx_save(c, NULL, 0, &size), MOE_OK);
        uint8_t *good = malloc(size), *b = malloc(size + 4096);
        assert_int_equal(moe_ctx_save(c, good, size, &size), MOE_OK);
        const moe_hparams *hp = &m->w.hp;
        size_t hdr = sizeof(state_header), lb = (size_t)nv * 4 + 12 * sizeof(moe_token) /* logits, token history */,
               eb = kv_type == MOE_KV_F16 ? 2 : 4;
        size_t row = (size_t)hp->n_head_kv * (size_t)hp->head_dim * eb, layer = 2 * 12 * row;
        /* a NaN logit */
        memcpy(b, good, size);
        float nan = NAN, inf = INFINITY;
        memcpy(b + hdr + 4 * 17, &nan, 4);
        reseal(b, size);
        expect_refused(d, b, size, MOE_ERR_FORMAT, "logits hold a non-finite value (row 0, token 17)", 5, before, nv);
        /* an infinity in layer 1's K cache, and a NaN in the last V row of the last layer */
        memcpy(b, good, size);
        if (eb == 2) wr16(b + hdr + lb + layer + 3 * row + 2 * 5, 0x7c00);
        else memcpy(b + hdr + lb + layer + 3 * row + 4 * 5, &inf, 4);
        reseal(b, size);
        expect_refused(d, b, size, MOE_ERR_FORMAT, "K cache of layer 1 holds a non-finite value (position 3, element 5)", 5, before, nv);
        memcpy(b, good, size);
        if (eb == 2) wr16(b + size - eb, 0xfe00);
        else memcpy(b + size - eb, &nan, 4);
        reseal(b, size);
        expect_refused(d, b, size, MOE_ERR_FORMAT, "V cache of layer", 5, before, nv);
        /* positions that do not match the rows, or the context */
        state_header h;
        memcpy(b, good, size);
        memcpy(&h, b, sizeof h);
        h.pos = 11; /* one row fewer than the payload holds */
        memcpy(b, &h, sizeof h);
        reseal(b, size);
        expect_refused(d, b, size, MOE_ERR_FORMAT, "position 11 with 1 logit row(s) needs", 5, before, nv);
        h.pos = 65;
        memcpy(b, &h, sizeof h);
        reseal(b, size);
        expect_refused(d, b, size, MOE_ERR_FORMAT, "position 65 is outside", 5, before, nv);
        h.pos = 0;
        memcpy(b, &h, sizeof h);
        reseal(b, size);
        expect_refused(d, b, size, MOE_ERR_FORMAT, "1 logit rows for 0 positions", 5, before, nv);
        h.pos = 12;
        h.n_logits = 2;
        memcpy(b, &h, sizeof h);
        reseal(b, size);
        expect_refused(d, b, size, MOE_ERR_FORMAT, "without logits_all", 5, before, nv);
        /* the untouched state still loads, and the context goes on like c */
        assert_int_equal(moe_ctx_load(d, good, size), MOE_OK);
        assert_int_equal(moe_step(c, p + 12, 1), MOE_OK);
        assert_int_equal(moe_step(d, p + 12, 1), MOE_OK);
        assert_memory_equal(moe_logits(c, -1), moe_logits(d, -1), (size_t)nv * sizeof(float));
        free(good);
        free(b);
        free(before);
        moe_ctx_free(c);
        moe_ctx_free(d);
    }
    moe_model_free(m);

    /* model identity: a model of the same shape and file size whose weights differ is another model */
    size_t fsize = 0;
    uint8_t *bytes = tu_read_file(MODEL, &fsize);
    assert_non_null(bytes);
    gguf_file g;
    assert_int_equal(gguf_parse(&g, bytes, fsize), MOE_OK);
    uint8_t *w0 = (uint8_t *)gguf_find_tensor(&g, "blk.0.attn_q.weight")->data;
    w0[2] ^= 1; /* one quant code of the first block */
    gguf_free(&g);
    assert_true(tu_write_file("build/test/tmp_other_weights.gguf", bytes, fsize));
    free(bytes);
    moe_model *a = load(MODEL, 1), *o = load("build/test/tmp_other_weights.gguf", 1);
    moe_ctx *ca = new_ctx(a, 32, 0), *co = new_ctx(o, 32, 0);
    moe_token t[3] = {1, 2, 3};
    assert_int_equal(moe_step(ca, t, 3), MOE_OK);
    size_t size = 0;
    assert_int_equal(moe_ctx_save(ca, NULL, 0, &size), MOE_OK);
    uint8_t *st = malloc(size);
    assert_int_equal(moe_ctx_save(ca, st, size, &size), MOE_OK);
    assert_int_equal(moe_ctx_load(co, st, size), MOE_ERR_INVALID_ARG);
    assert_non_null(strstr(moe_last_error(), "different model"));
    assert_int_equal(moe_ctx_pos(co), 0);
    free(st);
    moe_ctx_free(ca);
    moe_ctx_free(co);
    moe_model_free(a);
    moe_model_free(o);
}

/* ---- stats, callbacks, parameters ------------------------------------------------------------- */
static void test_stats(void **state) {
    (void)state;
    moe_model *m = load(MODEL, 1);
    int nv = tu_vocab(m);
    moe_ctx *c = new_ctx(m, 64, 0);
    moe_token out[5];
    run_greedy(c, nv, 2, 20, 5, out);
    moe_stats s;
    assert_int_equal(moe_ctx_get_stats(c, &s), MOE_OK);
    assert_int_equal(s.n_prompt_tokens, 20);
    assert_int_equal(s.n_gen_tokens, 5);
    assert_true(s.t_prompt_s > 0 && s.t_gen_s > 0 && s.t_load_s > 0);
    assert_true(s.host_bytes > 0);
    moe_model_info info;
    moe_model_get_info(m, &info);
    /* every token runs n_expert_used experts in each layer, all resident */
    assert_int_equal(s.expert_hits, (uint64_t)25 * (uint64_t)info.n_layer * (uint64_t)info.n_expert_used);
    assert_int_equal(s.expert_misses, 0);
    assert_int_equal(moe_ctx_get_stats(NULL, &s), MOE_ERR_INVALID_ARG);
    moe_ctx_free(c);
    moe_model_free(m);
}

/* profiling: per-kind entries for both phases, and logits identical to an unprofiled run */
static void test_profile(void **state) {
    (void)state;
    moe_model *m = load(MODEL, 2);
    int nv = tu_vocab(m);
    moe_ctx *a = new_ctx(m, 64, 0), *b = new_ctx(m, 64, 0);
    moe_token ta[5], tb[5];
    assert_int_equal(moe_ctx_profile(b, 1), MOE_OK);
    run_greedy(a, nv, 3, 20, 5, ta);
    run_greedy(b, nv, 3, 20, 5, tb);
    assert_memory_equal(ta, tb, sizeof ta);
    assert_memory_equal(moe_logits(a, -1), moe_logits(b, -1), (size_t)nv * sizeof(float));
    moe_profile_entry e[64];
    int n = moe_ctx_profile_get(b, e, 64);
    assert_true(n > 4 && n <= 64);
    int phases[2] = {0, 0}, matrix = 0;
    for (int i = 0; i < n; i++) {
        assert_true(e[i].calls > 0 && e[i].seconds >= 0 && e[i].bytes >= 0 && e[i].flops >= 0);
        if (i) assert_true(e[i].seconds <= e[i - 1].seconds);
        phases[e[i].decode != 0]++;
        matrix += e[i].bytes > 0 && e[i].flops > 0;
        assert_int_equal(e[i].tokens, e[i].decode ? 5u : 20u);
    }
    assert_true(phases[0] > 0 && phases[1] > 0 && matrix > 0);
    assert_int_equal(moe_ctx_profile_get(b, e, 0), n);
    assert_int_equal(moe_ctx_profile(b, 0), MOE_OK);
    assert_int_equal(moe_ctx_profile_get(b, e, 64), 0);
    double rd = 0, cp = 0;
    assert_int_equal(moe_ctx_probe_bandwidth(b, &rd, &cp), MOE_OK);
    assert_true(rd > 0 && cp > 0);
    assert_int_equal(moe_ctx_profile(NULL, 1), MOE_ERR_INVALID_ARG);
    assert_int_equal(moe_struct_size(MOE_STRUCT_PROFILE_ENTRY), sizeof(moe_profile_entry));
    moe_ctx_free(a);
    moe_ctx_free(b);
    moe_model_free(m);
}

static int g_progress_calls, g_log_lines;
static int32_t cancel_at_half(float f, void *user) {
    (void)user;
    g_progress_calls++;
    return f >= 0.5f;
}
static int32_t count_progress(float f, void *user) {
    float *last = user;
    assert_true(f >= *last && f <= 1.0f);
    *last = f;
    g_progress_calls++;
    return 0;
}
static void count_log(int32_t level, const char *msg, void *user) {
    (void)level;
    (void)user;
    assert_non_null(msg);
    g_log_lines++;
}

static void test_load_callbacks(void **state) {
    (void)state;
    moe_load_params lp = {0};
    lp.backend = MOE_BACKEND_CPU;
    lp.progress = cancel_at_half;
    moe_model *m = NULL;
    assert_int_equal(moe_load(MODEL, &lp, &m), MOE_ERR_CANCELLED);
    assert_null(m);
    float last = -1;
    lp.progress = count_progress;
    lp.user = &last;
    lp.log = count_log;
    g_progress_calls = g_log_lines = 0;
    assert_int_equal(moe_load(MODEL, &lp, &m), MOE_OK);
    assert_true(g_progress_calls >= 2);
    assert_true(last == 1.0f);
    assert_true(g_log_lines >= 1);
    moe_model_free(m);
    /* AUTO falls back to the CPU with a log line when Vulkan is unusable or absent */
    lp.backend = MOE_BACKEND_AUTO;
    g_log_lines = 0;
    last = -1;
    assert_int_equal(moe_load(MODEL, &lp, &m), MOE_OK);
    moe_model_info info;
    moe_model_get_info(m, &info);
    assert_true(info.backend == MOE_BACKEND_CPU || info.backend == MOE_BACKEND_VULKAN);
    moe_model_free(m);
}

static void test_ctx_params(void **state) {
    (void)state;
    moe_model *m = load(MODEL, 1);
    int nv = tu_vocab(m);
    moe_ctx *c = NULL;
    moe_ctx_params cp = {0};
    cp.kv_type = MOE_KV_Q8_0;
    assert_int_equal(moe_ctx_new(m, &cp, &c), MOE_ERR_UNSUPPORTED);
    cp.kv_type = 99;
    assert_int_equal(moe_ctx_new(m, &cp, &c), MOE_ERR_INVALID_ARG);
    cp.kv_type = 0;
    cp.n_ctx = -1;
    assert_int_equal(moe_ctx_new(m, &cp, &c), MOE_ERR_INVALID_ARG);
    assert_null(c);
    assert_int_equal(moe_ctx_new(NULL, NULL, &c), MOE_ERR_INVALID_ARG);
    assert_int_equal(moe_ctx_new(m, NULL, NULL), MOE_ERR_INVALID_ARG);
    /* f32 and f16 caches, and a small n_batch that forces chunked prefill, agree on greedy */
    moe_token g16[8], g32[8], gb[8];
    cp.n_ctx = 64;
    cp.kv_type = MOE_KV_F32;
    assert_int_equal(moe_ctx_new(m, &cp, &c), MOE_OK);
    run_greedy(c, nv, 4, 30, 8, g32);
    moe_ctx_free(c);
    cp.kv_type = MOE_KV_F16;
    assert_int_equal(moe_ctx_new(m, &cp, &c), MOE_OK);
    run_greedy(c, nv, 4, 30, 8, g16);
    moe_ctx_free(c);
    cp.n_batch = 7;
    assert_int_equal(moe_ctx_new(m, &cp, &c), MOE_OK);
    run_greedy(c, nv, 4, 30, 8, gb);
    moe_ctx_free(c);
    assert_memory_equal(g16, g32, sizeof g16);
    assert_memory_equal(g16, gb, sizeof g16);
    moe_model_free(m);
}

/* ---- no NaN/Inf leaves a step: a backend that produced one (here injected after the real
   read_logits) makes moe_step fail and leaves the context exactly as it was --------------------- */
static moe_ops g_nan_ops;
static const moe_ops *g_real_ops;
static void read_logits_nan(void *be, float *dst, int n) {
    g_real_ops->read_logits(be, dst, n);
    dst[(size_t)n * 3 / 2 + 5] = NAN;
}

static void test_step_nonfinite(void **state) {
    (void)state;
    moe_model *m = load(MODEL, 1);
    int nv = tu_vocab(m);
    for (int all = 0; all <= 1; all++) {
        moe_ctx *c = new_ctx(m, 64, all), *d = new_ctx(m, 64, all);
        moe_token p[12];
        prompt_tokens(p, 12, nv, 5);
        assert_int_equal(moe_step(c, p, 10), MOE_OK);
        size_t rows = all ? 10 : 1;
        float *before = malloc(rows * (size_t)nv * sizeof *before);
        memcpy(before, moe_logits(c, all ? 0 : -1), rows * (size_t)nv * sizeof *before);
        g_real_ops = c->ops;
        g_nan_ops = *c->ops;
        g_nan_ops.read_logits = read_logits_nan;
        c->ops = &g_nan_ops;
        assert_int_equal(moe_step(c, p + 10, 2), MOE_ERR_FORMAT);
        assert_non_null(strstr(moe_last_error(), "non-finite logit"));
        assert_int_equal(moe_step(c, p + 10, 1), MOE_ERR_FORMAT);
        c->ops = g_real_ops;
        assert_int_equal(moe_ctx_pos(c), 10);
        assert_memory_equal(moe_logits(c, all ? 0 : -1), before, rows * (size_t)nv * sizeof *before);
        /* and it goes on exactly like a context that never failed */
        assert_int_equal(moe_step(c, p + 10, 2), MOE_OK);
        assert_int_equal(moe_step(d, p, 12), MOE_OK);
        assert_memory_equal(moe_logits(c, -1), moe_logits(d, -1), (size_t)nv * sizeof(float));
        free(before);
        moe_ctx_free(c);
        moe_ctx_free(d);
    }
    moe_model_free(m);
}

/* ---- every NULL / failure return says why; settings that are allowed but odd are said ---------- */
#define BUNDLED "examples/models/tiny-moe-kjv-q8_0.gguf"

static char g_warn[1024];
static void keep_warning(int32_t level, const char *msg, void *user) {
    (void)user;
    if (level == MOE_LOG_WARN) snprintf(g_warn, sizeof g_warn, "%s", msg);
}

static void test_error_texts(void **state) {
    (void)state;
    moe_load_params lp = {0};
    lp.backend = MOE_BACKEND_CPU;
    lp.n_threads = 1;
    lp.log = keep_warning;
    moe_model *m = NULL;
    assert_int_equal(moe_load(BUNDLED, &lp, &m), MOE_OK);
    moe_model_info info;
    assert_int_equal(moe_model_get_info(m, &info), MOE_OK);
    moe_ctx *c = new_ctx(m, 32, 0);
    /* moe_logits before any step: NULL, and the message is about that, not left over */
    moe_load("build/test/no-such-file-left-over.gguf", NULL, &(moe_model *){NULL});
    assert_null(moe_logits(c, -1));
    assert_non_null(strstr(moe_last_error(), "moe_logits"));
    assert_non_null(strstr(moe_last_error(), "no step"));
    assert_null(moe_logits(NULL, -1));
    assert_non_null(strstr(moe_last_error(), "ctx is NULL"));
    moe_token t[2] = {1, 2};
    assert_int_equal(moe_step(c, t, 2), MOE_OK);
    assert_null(moe_logits(c, 0));
    assert_non_null(strstr(moe_last_error(), "logits_all"));
    assert_null(moe_logits(c, -2));
    assert_non_null(strstr(moe_last_error(), "row -2"));
    assert_int_equal(moe_ctx_rewind(c, 1), MOE_OK);
    assert_null(moe_logits(c, -1));
    assert_non_null(strstr(moe_last_error(), "rewound"));
    assert_int_equal(moe_ctx_pos(NULL), 0);
    assert_non_null(strstr(moe_last_error(), "moe_ctx_pos"));
    assert_int_equal(moe_token_is_eog(NULL, 0), 0);
    assert_non_null(strstr(moe_last_error(), "moe_token_is_eog"));
    moe_ctx_free(c);

    /* moe_token_to_piece: a valid token with a bad buffer names the buffer, not the token */
    char piece[64];
    int32_t n = -1;
    assert_int_equal(moe_token_to_piece(m, 300, NULL, 0, &n), MOE_ERR_BUFFER_TOO_SMALL); /* size query */
    assert_true(n > 0);
    assert_int_equal(moe_token_to_piece(m, 300, NULL, 8, &n), MOE_ERR_INVALID_ARG);
    assert_null(strstr(moe_last_error(), "outside"));
    assert_non_null(strstr(moe_last_error(), "buffer NULL"));
    assert_int_equal(moe_token_to_piece(m, 300, piece, -1, &n), MOE_ERR_INVALID_ARG);
    assert_non_null(strstr(moe_last_error(), "capacity -1"));
    assert_int_equal(moe_token_to_piece(m, info.n_vocab, piece, 64, &n), MOE_ERR_INVALID_ARG);
    assert_non_null(strstr(moe_last_error(), "outside the vocabulary"));
    assert_int_equal(moe_detokenize(m, t, 2, NULL, 4, 0, &n), MOE_ERR_INVALID_ARG);
    assert_non_null(strstr(moe_last_error(), "buf is NULL"));
    assert_int_equal(moe_token_to_piece(m, 300, piece, 64, NULL), MOE_ERR_INVALID_ARG);
    assert_non_null(strstr(moe_last_error(), "n_out is NULL"));

    /* the ABI the library was built with, for bindings */
    assert_int_equal(moe_abi_version(), MOE_ABI_VERSION);
    assert_int_equal(moe_struct_size(MOE_STRUCT_LOAD_PARAMS), sizeof(moe_load_params));
    assert_int_equal(moe_struct_size(MOE_STRUCT_STATS), sizeof(moe_stats));
    assert_int_equal(moe_struct_size(99), 0);
    assert_non_null(strstr(moe_last_error(), "unknown struct id 99"));

    /* n_ctx beyond the trained context: allowed, with a warning in the log */
    g_warn[0] = 0;
    c = new_ctx(m, info.n_ctx_train, 0);
    moe_ctx_free(c);
    assert_int_equal(g_warn[0], 0);
    c = new_ctx(m, info.n_ctx_train + 1, 0);
    assert_non_null(strstr(g_warn, "beyond the model's trained context"));
    moe_ctx_free(c);
    moe_model_free(m);
}

/* ---- abort and asynchronous steps (moe.h, ASYNCHRONOUS STEPS; test_async.h) -------------------- */
static void test_abort_exact(void **state) {
    (void)state;
    moe_model *m = load(MODEL, 2);
    moe_ctx_params cp = {0};
    cp.n_ctx = 128;
    cp.n_batch = 8; /* a step of 20 tokens in 3 chunks: cancels between chunks and between layers */
    int polls = check_abort_exact(m, &cp, 11, 20);
    printf("[ INFO     ] qwen3moe CPU: %d abort polls in a 20-token step\n", polls);
    moe_model_free(m);
    /* hybrid models: the conv and recurrent states come back from the step's backup; the step
       crosses a checkpoint position (64) */
    static const char *const hybrids[] = {"test/fixtures/qwen3next", "test/fixtures/qwen35moe"};
    for (int i = 0; i < 2; i++) {
        m = load(hybrids[i], 2);
        cp.n_ctx = 256;
        cp.n_batch = 16;
        polls = check_abort_exact(m, &cp, 40, 40);
        printf("[ INFO     ] %s CPU: %d abort polls in a 40-token step\n", hybrids[i], polls);
        moe_model_free(m);
    }
}

static void test_submit_wait(void **state) {
    (void)state;
    moe_model *m = load(MODEL, 2);
    moe_ctx_params cp = {0};
    cp.n_ctx = 128;
    cp.n_batch = 8;
    check_submit_wait(m, &cp, 12);
    moe_model_free(m);
    m = load("test/fixtures/qwen3next", 2);
    check_submit_wait(m, &cp, 12);
    moe_model_free(m);
}

/* ---- allocation failures ------------------------------------------------------------------------ */
/* ---- counts through out-parameters (API.md v1): MOE_OK + count written, or
   MOE_ERR_BUFFER_TOO_SMALL + count needed with nothing written beyond cap; buf = NULL, cap = 0 is
   the size query; errors leave *n_out 0 and the buffer untouched ------------------------------- */
static void test_out_param_counts(void **state) {
    (void)state;
    moe_load_params lp = {0};
    lp.backend = MOE_BACKEND_CPU;
    lp.n_threads = 1;
    moe_model *m = NULL;
    assert_int_equal(moe_load(BUNDLED, &lp, &m), MOE_OK);
    const char *text = "And God said, Let there be light: and there was light.";
    const int32_t len = (int32_t)strlen(text);

    /* moe_tokenize: size query, exact fit, one short (guard beyond cap untouched), empty text */
    int32_t need = -1;
    assert_int_equal(moe_tokenize(m, text, len, NULL, 0, MOE_TOKENIZE_ADD_SPECIAL, &need), MOE_ERR_BUFFER_TOO_SMALL);
    assert_non_null(strstr(moe_last_error(), "needs room for"));
    assert_true(need > 2 && need < 64);
    moe_token toks[64], again[64];
    int32_t n = -1;
    assert_int_equal(moe_tokenize(m, text, len, toks, need, MOE_TOKENIZE_ADD_SPECIAL, &n), MOE_OK);
    assert_int_equal(n, need);
    for (int i = 0; i < 64; i++) again[i] = -777;
    n = -1;
    assert_int_equal(moe_tokenize(m, text, len, again, need - 1, MOE_TOKENIZE_ADD_SPECIAL, &n), MOE_ERR_BUFFER_TOO_SMALL);
    assert_int_equal(n, need);
    for (int i = need - 1; i < 64; i++) assert_int_equal(again[i], -777);
    assert_int_equal(moe_tokenize(m, text, len, again, 64, MOE_TOKENIZE_ADD_SPECIAL, &n), MOE_OK);
    assert_int_equal(n, need);
    assert_memory_equal(again, toks, (size_t)need * sizeof *toks);
    n = -1;
    assert_int_equal(moe_tokenize(m, "", 0, NULL, 0, 0, &n), MOE_OK); /* nothing to return: a query is OK */
    assert_int_equal(n, 0);
    /* errors: n_out 0, nothing written */
    n = -1;
    assert_int_equal(moe_tokenize(m, text, len, NULL, 5, 0, &n), MOE_ERR_INVALID_ARG);
    assert_int_equal(n, 0);
    n = -1;
    assert_int_equal(moe_tokenize(m, text, -1, again, 64, 0, &n), MOE_ERR_INVALID_ARG);
    assert_int_equal(n, 0);
    assert_int_equal(moe_tokenize(m, text, len, again, 64, 0, NULL), MOE_ERR_INVALID_ARG);
    assert_non_null(strstr(moe_last_error(), "n_out is NULL"));
    n = -1;
    assert_int_equal(moe_tokenize(NULL, text, len, again, 64, 0, &n), MOE_ERR_INVALID_ARG);
    assert_int_equal(n, 0);

    /* moe_token_to_piece */
    int32_t plen = -1;
    assert_int_equal(moe_token_to_piece(m, toks[1], NULL, 0, &plen), MOE_ERR_BUFFER_TOO_SMALL);
    assert_true(plen > 0 && plen < 32);
    char piece[64];
    memset(piece, '#', sizeof piece);
    n = -1;
    assert_int_equal(moe_token_to_piece(m, toks[1], piece, plen - 1, &n), MOE_ERR_BUFFER_TOO_SMALL);
    assert_int_equal(n, plen);
    for (size_t i = 0; i < sizeof piece; i++) assert_int_equal(piece[i], '#'); /* a piece is all or nothing */
    assert_int_equal(moe_token_to_piece(m, toks[1], piece, plen, &n), MOE_OK);
    assert_int_equal(n, plen);
    assert_int_equal(piece[plen], '#');
    n = -1;
    assert_int_equal(moe_token_to_piece(m, -3, piece, 64, &n), MOE_ERR_INVALID_ARG);
    assert_int_equal(n, 0);

    /* moe_detokenize: size query, exact, short (prefix within cap only), bad token (untouched) */
    int32_t dlen = -1;
    assert_int_equal(moe_detokenize(m, toks, need, NULL, 0, 0, &dlen), MOE_ERR_BUFFER_TOO_SMALL);
    assert_true(dlen >= len);
    char out[256];
    memset(out, '#', sizeof out);
    assert_int_equal(moe_detokenize(m, toks, need, out, dlen - 3, 0, &n), MOE_ERR_BUFFER_TOO_SMALL);
    assert_int_equal(n, dlen);
    for (size_t i = (size_t)dlen - 3; i < sizeof out; i++) assert_int_equal(out[i], '#');
    assert_int_equal(moe_detokenize(m, toks, need, out, (int32_t)sizeof out, 0, &n), MOE_OK);
    assert_int_equal(n, dlen);
    out[n] = 0;
    assert_non_null(strstr(out, text));
    moe_token bad[3] = {toks[1], 1 << 30, toks[2]};
    memset(out, '#', sizeof out);
    n = -1;
    assert_int_equal(moe_detokenize(m, bad, 3, out, (int32_t)sizeof out, 0, &n), MOE_ERR_INVALID_ARG);
    assert_int_equal(n, 0);
    for (size_t i = 0; i < sizeof out; i++) assert_int_equal(out[i], '#');
    n = -1;
    assert_int_equal(moe_detokenize(m, NULL, 0, NULL, 0, 0, &n), MOE_OK);
    assert_int_equal(n, 0);

    /* moe_chat_apply: the bundled model's template may be missing (MOE_ERR_UNSUPPORTED, n_out 0);
       where it renders, the same rule holds */
    const char *roles[] = {"user"}, *contents[] = {"hi"};
    int32_t clen = -1;
    moe_status st = moe_chat_apply(m, roles, contents, 1, 1, NULL, 0, &clen);
    if (st == MOE_ERR_UNSUPPORTED) {
        assert_int_equal(clen, 0);
    } else {
        assert_int_equal(st, MOE_ERR_BUFFER_TOO_SMALL);
        assert_true(clen > 0 && clen < 200);
        memset(out, '#', sizeof out);
        assert_int_equal(moe_chat_apply(m, roles, contents, 1, 1, out, clen - 1, &n), MOE_ERR_BUFFER_TOO_SMALL);
        assert_int_equal(n, clen);
        for (size_t i = 0; i < sizeof out; i++) assert_int_equal(out[i], '#');
        assert_int_equal(moe_chat_apply(m, roles, contents, 1, 1, out, clen, &n), MOE_OK);
        assert_int_equal(n, clen);
        assert_int_equal(out[clen], '#'); /* no room for the courtesy NUL: none written */
        const char *bad_roles[] = {"user", "narrator"}, *two[] = {"hi", "once upon a time"};
        memset(out, '#', sizeof out);
        n = -1;
        assert_int_equal(moe_chat_apply(m, bad_roles, two, 2, 1, out, (int32_t)sizeof out, &n), MOE_ERR_INVALID_ARG);
        assert_int_equal(n, 0);
        for (size_t i = 0; i < sizeof out; i++) assert_int_equal(out[i], '#');
    }
    assert_int_equal(moe_chat_apply(m, roles, contents, 1, 1, out, (int32_t)sizeof out, NULL), MOE_ERR_INVALID_ARG);
    moe_model_free(m);
}

static void test_allocation_failures(void **state) {
    (void)state;
    moe_model *m = load(MODEL, 2);
    int nv = tu_vocab(m);
    moe_ctx_params cp = {0};
    cp.n_ctx = 64;
    cp.logits_all = 1;
    int failures = 0;
    moe_ctx *c = NULL;
    for (long k = 0;; k++) {
        moe_test_fail_alloc_after(k);
        moe_status st = moe_ctx_new(m, &cp, &c);
        moe_test_fail_alloc_after(-1);
        if (st == MOE_OK) break;
        assert_int_equal(st, MOE_ERR_NO_MEMORY);
        assert_null(c);
        failures++;
    }
    assert_true(failures > 5);
    /* a step whose logits buffer must grow fails cleanly and changes nothing */
    moe_token p[20];
    prompt_tokens(p, 20, nv, 9);
    assert_int_equal(moe_step(c, p, 4), MOE_OK);
    float *before = malloc((size_t)nv * 4 * sizeof(float));
    memcpy(before, moe_logits(c, 0), (size_t)nv * 4 * sizeof(float));
    moe_test_fail_alloc_after(0);
    assert_int_equal(moe_step(c, p + 4, 16), MOE_ERR_NO_MEMORY);
    moe_test_fail_alloc_after(-1);
    assert_int_equal(moe_ctx_pos(c), 4);
    assert_memory_equal(moe_logits(c, 0), before, (size_t)nv * 4 * sizeof(float));
    assert_int_equal(moe_step(c, p + 4, 16), MOE_OK);
    assert_int_equal(moe_ctx_pos(c), 20);
    free(before);
    moe_ctx_free(c);
    moe_model_free(m);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_threads),
        cmocka_unit_test(test_model_outlives_contexts),
        cmocka_unit_test(test_thread_local_error),
        cmocka_unit_test(test_context_full_and_bad_tokens),
        cmocka_unit_test(test_logits_access),
        cmocka_unit_test(test_save_load),
        cmocka_unit_test(test_stats),
        cmocka_unit_test(test_load_callbacks),
        cmocka_unit_test(test_ctx_params),
        cmocka_unit_test(test_allocation_failures),
        cmocka_unit_test(test_error_texts),
        cmocka_unit_test(test_out_param_counts),
        cmocka_unit_test(test_step_nonfinite),
        cmocka_unit_test(test_state_forged),
        cmocka_unit_test(test_profile),
        cmocka_unit_test(test_abort_exact),
        cmocka_unit_test(test_submit_wait),
    };
    return tu_run_tests("api", tests);
}
