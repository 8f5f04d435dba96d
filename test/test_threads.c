/* test_threads — the model's shared CPU thread pool (moe.h, THREADS AND LIFETIMES).

   1. Four host threads step contexts of one CPU model at the same time, each its own way (moe_step
      with prefill chunks, moe_step_submit / moe_step_wait, moe_step_batch of two contexts, and a
      context whose first step is cancelled by its abort callback and then run again); every
      context's logits after every step equal those of the same context stepped alone, BIT FOR BIT.
      On Qwen3-MoE (int8 kernels) and a hybrid Gated DeltaNet model (per-thread recurrence scratch).
   2. Threads: a model starts its pool with its first context (n_threads - 1 workers) and no more
      for the next 15 contexts; a model with no context starts none (Linux: /proc/self/task).
   3. Lifetimes while others compute on the pool: moe_ctx_free of a context with a step in flight
      and moe_model_free, while two threads step; those still equal their references.
   Runs in the plain, ASan and TSan builds (make test-tsan). */
#include "../moe.c"
#include "../moe_vk.c"
#include "../shaders_embedded.c"
#include "test_util.h"
#include "test_async.h"
#include <dirent.h>
#include <sched.h>

#define Q8 "test/fixtures/qwen3moe_q8_0.gguf"
#define HYBRID "test/fixtures/qwen35moe"
#define N_GEN 6
#define N_LANES 4

static moe_model *load_cpu(const char *path, int n_threads) { return tu_load(path, MOE_BACKEND_CPU, n_threads, 0); }

/* what one context does: a prompt of n_prompt tokens (chunks of n_batch), then N_GEN greedy tokens */
typedef struct plan { int seed, n_prompt, n_batch; } plan;
static const plan k_plans[N_LANES + 1] = {{1, 30, 8}, {2, 17, 256}, {3, 24, 5}, {4, 9, 256}, {5, 21, 4}};

static moe_ctx *plan_ctx(moe_model *m, const plan *p, int32_t (*abort_fn)(void *), void *abort_user) {
    moe_ctx_params cp = {0};
    cp.n_ctx = 64;
    cp.n_batch = p->n_batch;
    cp.abort = abort_fn;
    cp.abort_user = abort_user;
    moe_ctx *c = NULL;
    moe_status st = moe_ctx_new(m, &cp, &c);
    if (st) fail_msg("moe_ctx_new: %s", moe_last_error());
    return c;
}

/* a barrier for the lanes (so that their steps overlap from the first one) */
typedef struct lane_gate { pthread_mutex_t mu; pthread_cond_t cv; int n, want; } lane_gate;
static void gate_pass(lane_gate *g) {
    pthread_mutex_lock(&g->mu);
    if (++g->n == g->want) pthread_cond_broadcast(&g->cv);
    while (g->n < g->want) pthread_cond_wait(&g->cv, &g->mu);
    pthread_mutex_unlock(&g->mu);
}

/* A lane: one host thread stepping its contexts (two for moe_step_batch) through their plans.
   got[i] receives context i's logits after each of its 1 + N_GEN steps. */
enum { BY_STEP, BY_SUBMIT, BY_BATCH, BY_ABORT };
typedef struct lane {
    moe_model *m;
    int how, n_c, nv;
    const plan *p[2];
    float *got[2];
    moe_ctx *c[2];
    lane_gate *g;
    abort_at ab;
    moe_status st;
} lane;

static moe_status lane_step(lane *l, moe_token *const *tok, const int32_t *n) {
    if (l->how == BY_BATCH) return moe_step_batch(l->c, (const moe_token *const *)tok, n, l->n_c);
    if (l->how == BY_SUBMIT) {
        moe_status st = moe_step_submit(l->c[0], tok[0], n[0]);
        if (st) return st;
        while ((st = moe_step_wait(l->c[0], 0)) == MOE_ERR_TIMEOUT) sched_yield(); /* a frame loop's polling */
        return st;
    }
    return moe_step(l->c[0], tok[0], n[0]);
}

static void *lane_main(void *arg) {
    lane *l = arg;
    moe_token prompt[2][64], next[2], *tok[2];
    int32_t n[2];
    for (int i = 0; i < l->n_c; i++) {
        async_tokens(prompt[i], l->p[i]->n_prompt, l->nv, l->p[i]->seed);
        tok[i] = prompt[i];
        n[i] = l->p[i]->n_prompt;
    }
    if (l->g) gate_pass(l->g);
    if (l->how == BY_ABORT) { /* the first try is cancelled mid-prefill, and leaves the context as it was */
        l->ab.at = 2;
        l->st = moe_step(l->c[0], tok[0], n[0]);
        l->ab.at = -1;
        if (l->st != MOE_ERR_CANCELLED || moe_ctx_pos(l->c[0]) != 0) {
            l->st = l->st ? l->st : MOE_ERR_INVALID_ARG;
            return NULL;
        }
    }
    for (int s = 0; s <= N_GEN; s++) {
        if ((l->st = lane_step(l, tok, n))) return NULL;
        for (int i = 0; i < l->n_c; i++) {
            const float *lg = moe_logits(l->c[i], -1);
            memcpy(l->got[i] + (size_t)s * (size_t)l->nv, lg, (size_t)l->nv * sizeof(float));
            next[i] = argmax(lg, l->nv);
            tok[i] = &next[i];
            n[i] = 1;
        }
    }
    return NULL;
}

static float *logits_buf(int nv) {
    float *b = malloc((size_t)(N_GEN + 1) * (size_t)nv * sizeof(float));
    assert_non_null(b);
    return b;
}

static void same_logits(const float *got, const float *want, int nv, int ctx_i) {
    for (int s = 0; s <= N_GEN; s++) {
        const float *a = got + (size_t)s * (size_t)nv, *b = want + (size_t)s * (size_t)nv;
        if (memcmp(a, b, (size_t)nv * sizeof(float))) {
            int i = 0;
            while (a[i] == b[i]) i++;
            fail_msg("context %d, step %d, logit %d: concurrent %.9g, alone %.9g", ctx_i, s, i, (double)a[i], (double)b[i]);
        }
    }
}

/* the references: each plan stepped alone with moe_step, on a model with nobody else */
static void references(moe_model *m, float **want, int nv) {
    for (int k = 0; k <= N_LANES; k++) {
        want[k] = logits_buf(nv);
        lane l = {m, BY_STEP, 1, nv, {&k_plans[k], NULL}, {want[k], NULL}, {NULL, NULL}, NULL, {0, -1}, MOE_OK};
        l.c[0] = plan_ctx(m, &k_plans[k], NULL, NULL);
        lane_main(&l);
        assert_int_equal(l.st, MOE_OK);
        moe_ctx_free(l.c[0]);
    }
}

static void concurrent_bitexact(const char *path) {
    moe_model *m = load_cpu(path, 4); /* a pool of 3 workers, shared by every context below */
    const int nv = tu_vocab(m);
    float *want[N_LANES + 1], *got[N_LANES + 1];
    references(m, want, nv);
    lane_gate g = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, 0, N_LANES};
    lane lanes[N_LANES];
    const int how[N_LANES] = {BY_STEP, BY_SUBMIT, BY_BATCH, BY_ABORT};
    for (int k = 0, p = 0; k < N_LANES; k++) {
        lane *l = &lanes[k];
        *l = (lane){m, how[k], how[k] == BY_BATCH ? 2 : 1, nv, {NULL, NULL}, {NULL, NULL}, {NULL, NULL}, &g, {0, -1}, -100};
        for (int i = 0; i < l->n_c; i++, p++) {
            l->p[i] = &k_plans[p];
            l->got[i] = got[p] = logits_buf(nv);
            l->c[i] = how[k] == BY_ABORT ? plan_ctx(m, l->p[i], abort_after, &l->ab) : plan_ctx(m, l->p[i], NULL, NULL);
        }
    }
    pthread_t th[N_LANES];
    for (int k = 0; k < N_LANES; k++) assert_int_equal(pthread_create(&th[k], NULL, lane_main, &lanes[k]), 0);
    for (int k = 0; k < N_LANES; k++) pthread_join(th[k], NULL);
    for (int k = 0, p = 0; k < N_LANES; k++) {
        if (lanes[k].st) fail_msg("lane %d: %s (%s)", k, moe_status_str(lanes[k].st), moe_last_error());
        for (int i = 0; i < lanes[k].n_c; i++, p++) {
            same_logits(got[p], want[p], nv, p);
            moe_ctx_free(lanes[k].c[i]);
        }
    }
    for (int k = 0; k <= N_LANES; k++) free(want[k]), free(got[k]);
    moe_model_free(m);
}

static void test_concurrent_qwen3(void **state) {
    (void)state;
    concurrent_bitexact(Q8);
}

static void test_concurrent_hybrid(void **state) {
    (void)state;
    concurrent_bitexact(HYBRID);
}

/* ---- how many threads: one pool per model ---- */
static int task_count(void) { /* threads of this process; -1 without /proc */
    DIR *d = opendir("/proc/self/task");
    if (!d) return -1;
    int n = 0;
    for (struct dirent *e; (e = readdir(d));) n += e->d_name[0] != '.';
    closedir(d);
    return n;
}

static void test_one_pool_per_model(void **state) {
    (void)state;
    int base = task_count();
    if (base < 0) skip();
    moe_model *m = load_cpu(Q8, 4);
    assert_int_equal(task_count(), base); /* no context yet: no threads */
    moe_ctx *c[16];
    moe_token t = 1;
    for (int i = 0; i < 16; i++) {
        c[i] = plan_ctx(m, &k_plans[0], NULL, NULL);
        assert_int_equal(moe_step(c[i], &t, 1), MOE_OK);
        assert_int_equal(task_count(), base + 3); /* the pool's 3 workers (the stepping thread is the 4th) */
    }
    /* a second model has a pool of its own */
    moe_model *m2 = load_cpu(Q8, 2);
    moe_ctx *c2 = plan_ctx(m2, &k_plans[0], NULL, NULL);
    assert_int_equal(task_count(), base + 4);
    moe_ctx_free(c2);
    moe_model_free(m2);
    assert_int_equal(task_count(), base + 3);
    moe_model_free(m); /* the contexts keep the model, and so its pool */
    assert_int_equal(moe_step(c[15], &t, 1), MOE_OK);
    for (int i = 0; i < 16; i++) moe_ctx_free(c[i]); /* the last one frees the model and joins its pool */
    assert_int_equal(task_count(), base);
}

/* ---- freeing while others compute on the pool ---- */
static void test_free_while_stepping(void **state) {
    (void)state;
    moe_model *m = load_cpu(Q8, 3);
    const int nv = tu_vocab(m);
    float *want[N_LANES + 1];
    references(m, want, nv);
    lane_gate g = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, 0, 3};
    lane lanes[2];
    pthread_t th[2];
    for (int k = 0; k < 2; k++) {
        lanes[k] = (lane){m, k ? BY_SUBMIT : BY_STEP, 1, nv, {&k_plans[k], NULL}, {logits_buf(nv), NULL}, {NULL, NULL}, &g, {0, -1}, -100};
        lanes[k].c[0] = plan_ctx(m, &k_plans[k], NULL, NULL);
        assert_int_equal(pthread_create(&th[k], NULL, lane_main, &lanes[k]), 0);
    }
    moe_ctx *doomed = plan_ctx(m, &k_plans[2], NULL, NULL);
    moe_token t[48];
    async_tokens(t, 48, nv, 9);
    gate_pass(&g);
    assert_int_equal(moe_step_submit(doomed, t, 48), MOE_OK);
    moe_ctx_free(doomed);       /* stops the step in flight at its next poll, joins its worker */
    moe_model_free(m);          /* the stepping contexts hold the model (and the pool) */
    for (int k = 0; k < 2; k++) {
        pthread_join(th[k], NULL);
        assert_int_equal(lanes[k].st, MOE_OK);
        same_logits(lanes[k].got[0], want[k], nv, k);
        free(lanes[k].got[0]);
    }
    moe_ctx_free(lanes[0].c[0]);
    moe_ctx_free(lanes[1].c[0]); /* the last reference */
    for (int k = 0; k <= N_LANES; k++) free(want[k]);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_concurrent_qwen3),
        cmocka_unit_test(test_concurrent_hybrid),
        cmocka_unit_test(test_one_pool_per_model),
        cmocka_unit_test(test_free_while_stepping),
    };
    return tu_run_tests("threads", tests);
}
