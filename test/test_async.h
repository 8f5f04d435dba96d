/* test_async.h — checks of abort and of asynchronous steps (moe.h, ASYNCHRONOUS STEPS) shared by
   test_api (CPU backend) and test_vulkan (Vulkan). Included after moe.h and cmocka. */
#ifndef TEST_ASYNC_H
#define TEST_ASYNC_H
#include <stdatomic.h>
#include <string.h>

/* an abort callback that says "stop" at its (at + 1)-th poll (never when at < 0), counting polls */
typedef struct abort_at { int polls, at; } abort_at;
static inline int32_t abort_after(void *user) {
    abort_at *a = user;
    return ++a->polls > a->at && a->at >= 0;
}

static inline void async_tokens(moe_token *t, int n, int n_vocab, int seed) {
    for (int i = 0; i < n; i++) t[i] = (moe_token)((i * 53 + seed * 17 + 3) % n_vocab);
}

static inline void *async_save(moe_ctx *c, size_t *size) {
    assert_int_equal(moe_ctx_save(c, NULL, 0, size), MOE_OK);
    void *buf = malloc(*size);
    assert_non_null(buf);
    assert_int_equal(moe_ctx_save(c, buf, *size, size), MOE_OK);
    return buf;
}

/* the same params with an abort callback: prefill n1 tokens, then a step of n2 tokens cancelled at
   poll k for several k; each cancel must leave the context byte for byte as it was (its saved state:
   logits, token history, KV rows, recurrent states; position and stats), and the step run again
   must give logits bit-identical to a context that was never cancelled, also for a decode token
   after it and after a rewind into the step. Returns the polls an uncancelled step made. */
static inline int check_abort_exact(moe_model *m, const moe_ctx_params *base, int n1, int n2) {
    moe_model_info info;
    assert_int_equal(moe_model_get_info(m, &info), MOE_OK);
    const int nv = info.n_vocab;
    moe_token *t = malloc((size_t)(n1 + n2 + 1) * sizeof *t);
    float *want = malloc((size_t)nv * sizeof *want), *want2 = malloc((size_t)nv * sizeof *want2);
    assert_true(t && want && want2);
    async_tokens(t, n1 + n2 + 1, nv, 7);

    /* the reference: never cancelled (its abort never fires, and it counts the polls) */
    abort_at ra = {0, -1};
    moe_ctx_params p = *base;
    p.abort = abort_after;
    p.abort_user = &ra;
    moe_ctx *ref = NULL;
    assert_int_equal(moe_ctx_new(m, &p, &ref), MOE_OK);
    assert_int_equal(moe_step(ref, t, n1), MOE_OK);
    ra.polls = 0;
    assert_int_equal(moe_step(ref, t + n1, n2), MOE_OK);
    int polls = ra.polls;
    assert_true(polls >= 2);
    memcpy(want, moe_logits(ref, -1), (size_t)nv * sizeof *want);
    assert_int_equal(moe_step(ref, t + n1 + n2, 1), MOE_OK);
    memcpy(want2, moe_logits(ref, -1), (size_t)nv * sizeof *want2);
    /* a rewind into the step and one token again (prefill and decode kernels may round differently:
       compared with the same in the reference) */
    float *want3 = malloc((size_t)nv * sizeof *want3);
    assert_non_null(want3);
    assert_int_equal(moe_ctx_rewind(ref, n1 + n2 - 1), MOE_OK);
    assert_int_equal(moe_step(ref, t + n1 + n2 - 1, 1), MOE_OK);
    memcpy(want3, moe_logits(ref, -1), (size_t)nv * sizeof *want3);

    const int ks[] = {0, 1, polls / 2, polls - 1};
    for (size_t ki = 0; ki < sizeof ks / sizeof ks[0]; ki++) {
        abort_at a = {0, -1};
        p.abort_user = &a;
        moe_ctx *c = NULL;
        assert_int_equal(moe_ctx_new(m, &p, &c), MOE_OK);
        assert_int_equal(moe_step(c, t, n1), MOE_OK);
        size_t n_before = 0, n_after = 0;
        void *before = async_save(c, &n_before);
        moe_stats s0, s1;
        assert_int_equal(moe_ctx_get_stats(c, &s0), MOE_OK);
        a.polls = 0;
        a.at = ks[ki];
        moe_status st = moe_step(c, t + n1, n2);
        assert_int_equal(st, MOE_ERR_CANCELLED);
        assert_non_null(strstr(moe_last_error(), "cancelled"));
        assert_int_equal(a.polls, ks[ki] + 1); /* stopped at the first "stop" */
        assert_int_equal(moe_ctx_pos(c), n1);
        assert_int_equal(moe_ctx_get_stats(c, &s1), MOE_OK);
        s0.host_bytes = s1.host_bytes = 0; /* memory: the logits buffer grows before a step (and stays) */
        assert_memory_equal(&s0, &s1, sizeof s0);
        void *after = async_save(c, &n_after);
        assert_int_equal(n_before, n_after);
        assert_memory_equal(before, after, n_before);
        free(before);
        free(after);
        a.at = -1;
        assert_int_equal(moe_step(c, t + n1, n2), MOE_OK);
        assert_memory_equal(moe_logits(c, -1), want, (size_t)nv * sizeof *want);
        assert_int_equal(moe_step(c, t + n1 + n2, 1), MOE_OK);
        assert_memory_equal(moe_logits(c, -1), want2, (size_t)nv * sizeof *want2);
        /* checkpoints taken by the cancelled step were dropped, those of the rerun are right */
        assert_int_equal(moe_ctx_rewind(c, n1 + n2 - 1), MOE_OK);
        assert_int_equal(moe_step(c, t + n1 + n2 - 1, 1), MOE_OK);
        assert_memory_equal(moe_logits(c, -1), want3, (size_t)nv * sizeof *want3);
        moe_ctx_free(c);
    }
    moe_ctx_free(ref);
    free(t);
    free(want);
    free(want2);
    free(want3);
    return polls;
}

/* an abort callback that holds the step until released (it never stops it): makes "still running"
   deterministic */
typedef struct gate { atomic_int open, entered; } gate;
static inline int32_t gate_hold(void *user) {
    gate *g = user;
    atomic_store(&g->entered, 1);
    while (!atomic_load(&g->open)) {
        struct timespec ts = {0, 100000};
        nanosleep(&ts, NULL);
    }
    return 0;
}

/* submit / wait: validation errors from submit with the context unchanged; MOE_ERR_TIMEOUT while
   the step runs (polls and timed waits); MOE_ERR_BUSY from every other call meanwhile; the same
   logits as moe_step; moe_ctx_free with a step in flight */
static inline void check_submit_wait(moe_model *m, const moe_ctx_params *base, int n_prompt) {
    moe_model_info info;
    assert_int_equal(moe_model_get_info(m, &info), MOE_OK);
    const int nv = info.n_vocab;
    moe_token t[64];
    assert_true(n_prompt < 64);
    async_tokens(t, n_prompt + 1, nv, 3);
    moe_ctx *ref = NULL, *c = NULL;
    assert_int_equal(moe_ctx_new(m, base, &ref), MOE_OK);
    assert_int_equal(moe_step(ref, t, n_prompt), MOE_OK);
    float *pre = malloc((size_t)nv * sizeof *pre);
    assert_non_null(pre);
    memcpy(pre, moe_logits(ref, -1), (size_t)nv * sizeof *pre);

    gate g;
    atomic_init(&g.open, 0);
    atomic_init(&g.entered, 0);
    moe_ctx_params p = *base;
    p.abort = gate_hold;
    p.abort_user = &g;
    assert_int_equal(moe_ctx_new(m, &p, &c), MOE_OK);
    /* no step in flight */
    assert_int_equal(moe_step_wait(c, 0), MOE_ERR_INVALID_ARG);
    assert_non_null(strstr(moe_last_error(), "no step in flight"));
    assert_int_equal(moe_step_wait(NULL, 0), MOE_ERR_INVALID_ARG);
    /* validation errors come back from submit; nothing starts */
    moe_token bad = (moe_token)nv;
    assert_int_equal(moe_step_submit(c, &bad, 1), MOE_ERR_INVALID_ARG);
    assert_int_equal(moe_step_submit(c, NULL, 1), MOE_ERR_INVALID_ARG);
    assert_int_equal(moe_step_submit(NULL, t, 1), MOE_ERR_INVALID_ARG);
    moe_token *big = calloc(5000, sizeof *big);
    assert_int_equal(moe_step_submit(c, big, 5000), MOE_ERR_CONTEXT_FULL);
    free(big);
    assert_int_equal(moe_ctx_pos(c), 0);
    assert_int_equal(moe_step_wait(c, 0), MOE_ERR_INVALID_ARG);

    assert_int_equal(moe_step_submit(c, t, n_prompt), MOE_OK);
    while (!atomic_load(&g.entered)) {
        struct timespec ts = {0, 100000};
        nanosleep(&ts, NULL);
    }
    assert_int_equal(moe_step_wait(c, 0), MOE_ERR_TIMEOUT);
    assert_int_equal(moe_step_wait(c, 2000000), MOE_ERR_TIMEOUT); /* 2 ms */
    assert_non_null(strstr(moe_last_error(), "still running"));
    /* busy: everything else is refused and changes nothing */
    assert_int_equal(moe_step(c, t, 1), MOE_ERR_BUSY);
    assert_non_null(strstr(moe_last_error(), "in flight"));
    assert_int_equal(moe_step_submit(c, t, 1), MOE_ERR_BUSY);
    assert_null(moe_logits(c, -1));
    assert_int_equal(moe_ctx_pos(c), MOE_ERR_BUSY);
    assert_int_equal(moe_ctx_rewind(c, 0), MOE_ERR_BUSY);
    moe_stats s;
    assert_int_equal(moe_ctx_get_stats(c, &s), MOE_ERR_BUSY);
    size_t sz = 0;
    assert_int_equal(moe_ctx_save(c, NULL, 0, &sz), MOE_ERR_BUSY);
    assert_int_equal(moe_ctx_load(c, &s, sizeof s), MOE_ERR_BUSY);
    atomic_store(&g.open, 1);
    moe_status st;
    while ((st = moe_step_wait(c, 0)) == MOE_ERR_TIMEOUT) {
        struct timespec ts = {0, 200000};
        nanosleep(&ts, NULL);
    }
    assert_int_equal(st, MOE_OK);
    assert_int_equal(moe_step_wait(c, 0), MOE_ERR_INVALID_ARG); /* collected */
    assert_int_equal(moe_ctx_pos(c), n_prompt);
    assert_memory_equal(moe_logits(c, -1), moe_logits(ref, -1), (size_t)nv * sizeof(float));
    assert_int_equal(moe_ctx_get_stats(c, &s), MOE_OK);
    assert_int_equal(s.n_prompt_tokens, (uint64_t)n_prompt);

    /* decode through submit + wait(forever), several times: the worker is reused */
    for (int i = 0; i < 3; i++) {
        moe_token next = (moe_token)((i * 7 + 1) % nv);
        assert_int_equal(moe_step(ref, &next, 1), MOE_OK);
        assert_int_equal(moe_step_submit(c, &next, 1), MOE_OK);
        assert_int_equal(moe_step_wait(c, UINT64_MAX), MOE_OK);
        assert_memory_equal(moe_logits(c, -1), moe_logits(ref, -1), (size_t)nv * sizeof(float));
    }
    /* a step's own failure comes back from wait: a cancel, context as before */
    abort_at a = {0, 0};
    moe_ctx_params pa = *base;
    pa.abort = abort_after;
    pa.abort_user = &a;
    moe_ctx *c2 = NULL;
    assert_int_equal(moe_ctx_new(m, &pa, &c2), MOE_OK);
    assert_int_equal(moe_step_submit(c2, t, n_prompt), MOE_OK);
    assert_int_equal(moe_step_wait(c2, UINT64_MAX), MOE_ERR_CANCELLED);
    assert_non_null(strstr(moe_last_error(), "cancelled"));
    assert_int_equal(moe_ctx_pos(c2), 0);
    a.at = -1;
    assert_int_equal(moe_step_submit(c2, t, n_prompt), MOE_OK);
    assert_int_equal(moe_step_wait(c2, UINT64_MAX), MOE_OK);
    assert_memory_equal(moe_logits(c2, -1), pre, (size_t)nv * sizeof *pre);
    moe_ctx_free(c2);

    /* moe_ctx_free with a step in flight: it stops the step, waits and frees (ASan: no leak) */
    atomic_store(&g.open, 0);
    assert_int_equal(moe_step_submit(c, t, 1), MOE_OK);
    atomic_store(&g.open, 1);
    moe_ctx_free(c);
    moe_ctx *c3 = NULL;
    assert_int_equal(moe_ctx_new(m, base, &c3), MOE_OK);
    assert_int_equal(moe_step_submit(c3, t, n_prompt), MOE_OK);
    moe_ctx_free(c3); /* no wait at all */
    moe_ctx_free(ref);
    free(pre);
}
#endif
