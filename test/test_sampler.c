/* test_sampler — moe_sampler_*: the pipeline, its statistics and its determinism.

   Every test is seeded, so every run draws the same numbers; the statistical thresholds say
   how unlikely a failure would be for a correct sampler with a fresh seed.

   (a) arguments: NULL / invalid parameters and calls, NULL-safe free / accept / reset;
   (b) greedy: argmax, ties to the lowest id, NaN as -inf, +inf, no finite logit → -1;
   (c) temperature → 0 equals greedy;
   (d) top-k never returns a token outside the k best (ties at the boundary: lower id);
   (e) top-p never returns a token outside the smallest set reaching mass p, and does return
       every token inside it;
   (f) min-p never returns a token with p < min_p · p_max;
   (g) empirical frequencies match the softmax (chi-square, plain and after top-k);
   (h) penalties change logits exactly as documented (internals), and flip a clear winner
       exactly at the predicted threshold (public API); only the window counts;
   (i) same seed → same tokens, different seeds → different tokens, reset → as new;
   (j) golden sequences for fixed logits and seeds, and a hash of 60000 weights: the
       cross-platform determinism anchor. They come from test/sampler_ref.py, an independent
       Python implementation of the pipeline as moe.h documents it (integers and IEEE doubles
       only; `python3 test/sampler_ref.py` prints them); the RNG matches the published
       xoshiro256** + splitmix64 vectors. (test_python.sh also compares the two draw by draw on
       random settings.);
   (k) the portable exponential against libm;
   (l) allocation failures: -1 with MOE_ERR_NO_MEMORY's message, the sampler still usable;
       scratch growth with n_vocab. */
#include "../moe.c"
#include "../moe_vk.c"
#include "../shaders_embedded.c"
#include "test_util.h"

#include <math.h>

/* a small deterministic generator for test logits, independent of the sampler's RNG */
static uint32_t lcg_state = 12345;
static float lcg_unit(void) { /* [0, 1) */
    lcg_state = lcg_state * 1664525u + 1013904223u;
    return (float)(lcg_state >> 8) * (1.0f / 16777216.0f);
}

static moe_sampler *new_sampler(const moe_sampler_params *p) {
    moe_sampler *s = NULL;
    assert_int_equal(moe_sampler_new(p, &s), MOE_OK);
    assert_non_null(s);
    return s;
}

static int argmax_lowest(const float *l, int n) {
    int b = 0;
    for (int i = 1; i < n; i++)
        if (l[i] > l[b]) b = i;
    return b;
}

/* softmax((l - max) / temp) in double with libm: the reference the tests compare against */
static void softmax_ref(const float *l, int n, double temp, double *p) {
    double mx = -INFINITY, sum = 0.0;
    for (int i = 0; i < n; i++) mx = l[i] > mx ? l[i] : mx;
    for (int i = 0; i < n; i++) sum += (p[i] = exp(((double)l[i] - mx) / temp));
    for (int i = 0; i < n; i++) p[i] /= sum;
}

/* ---- (a) arguments ------------------------------------------------------------------------- */
static void test_invalid_args(void **state) {
    (void)state;
    moe_sampler *s = (moe_sampler *)0x1;
    assert_int_equal(moe_sampler_new(NULL, NULL), MOE_ERR_INVALID_ARG);
    struct { moe_sampler_params p; const char *what; } bad[] = {
        {{.temperature = NAN}, "temperature"},
        {{.top_k = -1}, "top_k"},
        {{.top_p = -0.1f}, "top_p"},
        {{.top_p = 1.5f}, "top_p"},
        {{.top_p = NAN}, "top_p"},
        {{.min_p = -0.5f}, "min_p"},
        {{.min_p = 2.0f}, "min_p"},
        {{.repeat_penalty = -1.0f}, "repeat_penalty"},
        {{.repeat_penalty = INFINITY}, "repeat_penalty"},
        {{.repeat_last_n = -1}, "repeat_last_n"},
        {{.presence_penalty = NAN}, "presence"},
        {{.frequency_penalty = INFINITY}, "frequency"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        s = (moe_sampler *)0x1;
        assert_int_equal(moe_sampler_new(&bad[i].p, &s), MOE_ERR_INVALID_ARG);
        assert_null(s);
        assert_non_null(strstr(moe_last_error(), bad[i].what));
    }

    s = new_sampler(NULL); /* NULL params = all zero = greedy */
    float l[4] = {0.0f, 3.0f, 1.0f, 2.0f};
    tl_error[0] = 0;
    assert_int_equal(moe_sample(s, NULL, 4), -1);
    assert_non_null(strstr(moe_last_error(), "logits is NULL"));
    assert_int_equal(moe_sample(s, l, 0), -1);
    assert_non_null(strstr(moe_last_error(), "n_vocab"));
    assert_int_equal(moe_sample(s, l, -5), -1);
    assert_int_equal(moe_sample(NULL, l, 4), -1);
    assert_non_null(strstr(moe_last_error(), "sampler is NULL"));
    assert_int_equal(moe_sample(s, l, 4), 1); /* still usable */
    assert_int_equal(s->hist_len, 1);         /* only the successful call was recorded */

    moe_sampler_accept(NULL, 3);
    moe_sampler_reset(NULL);
    moe_sampler_free(NULL);
    moe_sampler_accept(s, -1); /* ignored */
    assert_int_equal(s->hist_len, 1);
    moe_sampler_free(s);

    /* extreme but valid settings */
    moe_sampler_params ok = {.temperature = 1.0f, .top_k = 1000000, .top_p = 1.0f, .min_p = 1.0f,
                             .repeat_penalty = 1.0f, .repeat_last_n = 1};
    s = new_sampler(&ok);
    for (int i = 0; i < 8; i++) assert_int_equal(moe_sample(s, l, 4), 1); /* min_p = 1: only the max */
    moe_sampler_free(s);
}

/* ---- (b) greedy ---------------------------------------------------------------------------- */
static void test_greedy(void **state) {
    (void)state;
    moe_sampler_params zero = {0}, neg = {.temperature = -1.0f, .top_k = 3, .top_p = 0.5f, .seed = 9};
    moe_sampler *s = new_sampler(&zero), *t = new_sampler(&neg);
    float l[64];
    for (int round = 0; round < 200; round++) {
        for (int i = 0; i < 64; i++) l[i] = lcg_unit() * 20.0f - 10.0f;
        int want = argmax_lowest(l, 64);
        assert_int_equal(moe_sample(s, l, 64), want);
        assert_int_equal(moe_sample(t, l, 64), want);
    }
    /* ties → lowest id */
    float tie[6] = {1.0f, 5.0f, 2.0f, 5.0f, 5.0f, -3.0f};
    assert_int_equal(moe_sample(s, tie, 6), 1);
    /* NaN counts as -inf; +inf wins; -inf never */
    float nan_first[4] = {NAN, 1.0f, NAN, 0.5f};
    assert_int_equal(moe_sample(s, nan_first, 4), 1);
    float inf[4] = {1.0f, INFINITY, 3.0f, INFINITY};
    assert_int_equal(moe_sample(s, inf, 4), 1);
    float neginf[3] = {-INFINITY, -INFINITY, -1e30f};
    assert_int_equal(moe_sample(s, neginf, 3), 2);
    float none[3] = {NAN, -INFINITY, NAN};
    assert_int_equal(moe_sample(s, none, 3), -1);
    assert_non_null(strstr(moe_last_error(), "no finite logit"));
    assert_int_equal(moe_sample(t, none, 3), -1);
    /* greedy draws no random number */
    uint64_t before[4];
    memcpy(before, t->rng, sizeof before);
    assert_int_equal(moe_sample(t, l, 64), argmax_lowest(l, 64));
    assert_memory_equal(before, t->rng, sizeof before);
    moe_sampler_free(s);
    moe_sampler_free(t);
}

/* Non-greedy paths with NaN / inf logits: never crash, never pick NaN or -inf. */
static void test_nonfinite_sampling(void **state) {
    (void)state;
    moe_sampler_params p = {.temperature = 1.0f, .top_p = 0.9f, .min_p = 0.01f, .top_k = 5, .seed = 3};
    moe_sampler *s = new_sampler(&p);
    float l[8] = {NAN, 0.0f, -INFINITY, 0.5f, NAN, 0.25f, -INFINITY, 0.1f};
    for (int i = 0; i < 2000; i++) {
        moe_token t = moe_sample(s, l, 8);
        assert_true(t == 1 || t == 3 || t == 5 || t == 7);
    }
    float inf[5] = {0.0f, INFINITY, NAN, INFINITY, 1e30f}; /* +inf tokens share all the mass */
    int seen[5] = {0};
    for (int i = 0; i < 2000; i++) {
        moe_token t = moe_sample(s, inf, 5);
        assert_true(t == 1 || t == 3);
        seen[t]++;
    }
    assert_true(seen[1] > 800 && seen[3] > 800);
    float none[2] = {NAN, -INFINITY};
    assert_int_equal(moe_sample(s, none, 2), -1);
    /* huge temperatures and huge logit ranges */
    moe_sampler_params hot = {.temperature = 1e30f, .seed = 1};
    moe_sampler *h = new_sampler(&hot);
    float wide[4] = {-3e38f, 3e38f, 0.0f, -1.0f};
    for (int i = 0; i < 100; i++) {
        moe_token t = moe_sample(h, wide, 4);
        assert_true(t >= 0 && t < 4);
    }
    moe_sampler_free(h);
    moe_sampler_free(s);
}

/* ---- (c) temperature → 0 --------------------------------------------------------------------- */
static void test_low_temperature_is_greedy(void **state) {
    (void)state;
    const float temps[] = {1e-3f, 1e-6f, 1e-20f, 1.4e-45f /* the smallest positive float */};
    float l[256];
    for (size_t ti = 0; ti < sizeof temps / sizeof temps[0]; ti++) {
        moe_sampler_params p = {.temperature = temps[ti], .seed = 77 + ti};
        moe_sampler *s = new_sampler(&p);
        for (int round = 0; round < 300; round++) {
            /* distinct logits with a margin of at least 0.05 between the best two */
            for (int i = 0; i < 256; i++) l[i] = lcg_unit() * 8.0f;
            int b = argmax_lowest(l, 256);
            l[b] += 0.05f;
            assert_int_equal(moe_sample(s, l, 256), b);
        }
        moe_sampler_free(s);
    }
}

/* ---- (d) top-k ----------------------------------------------------------------------------- */
/* rank of token t by (logit desc, id asc) */
static int rank_of(const float *l, int n, int t) {
    int r = 0;
    for (int i = 0; i < n; i++)
        if (l[i] > l[t] || (l[i] == l[t] && i < t)) r++;
    return r;
}

static void test_top_k(void **state) {
    (void)state;
    enum { N = 200 };
    const int ks[] = {1, 2, 5, 40, 199};
    float l[N];
    for (size_t ki = 0; ki < sizeof ks / sizeof ks[0]; ki++) {
        int k = ks[ki];
        moe_sampler_params p = {.temperature = 1.5f, .top_k = k, .seed = 1000 + ki};
        moe_sampler *s = new_sampler(&p);
        for (int round = 0; round < 20; round++) {
            /* a flat distribution, so that tokens beyond the k best would be drawn often */
            for (int i = 0; i < N; i++) l[i] = lcg_unit() * 2.0f;
            int seen_ranks = 0;
            char seen[N] = {0};
            for (int d = 0; d < 500; d++) {
                moe_token t = moe_sample(s, l, N);
                assert_true(t >= 0 && t < N);
                assert_true(rank_of(l, N, t) < k);
                if (!seen[t]) seen[t] = 1, seen_ranks++;
            }
            if (k <= 5) assert_int_equal(seen_ranks, k); /* and all k are reachable */
        }
        moe_sampler_free(s);
    }
    /* ties straddling the boundary: the lower ids win */
    float tie[8] = {0.0f, 1.0f, 1.0f, 0.5f, 1.0f, 1.0f, 2.0f, 1.0f};
    moe_sampler_params p = {.temperature = 1.0f, .top_k = 3, .seed = 5};
    moe_sampler *s = new_sampler(&p);
    int cnt[8] = {0};
    for (int d = 0; d < 3000; d++) cnt[moe_sample(s, tie, 8)]++;
    assert_true(cnt[6] > 0 && cnt[1] > 0 && cnt[2] > 0);
    assert_int_equal(cnt[0] + cnt[3] + cnt[4] + cnt[5] + cnt[7], 0);
    moe_sampler_free(s);
}

/* ---- (e) top-p ----------------------------------------------------------------------------- */
static void test_top_p(void **state) {
    (void)state;
    enum { N = 100 };
    const float ps[] = {0.05f, 0.3f, 0.5f, 0.75f, 0.9f, 0.99f};
    float l[N];
    double pr[N];
    int order[N];
    for (size_t pi = 0; pi < sizeof ps / sizeof ps[0]; pi++) {
        const double temp = 0.7;
        moe_sampler_params p = {.temperature = (float)temp, .top_p = ps[pi], .seed = 2000 + pi};
        moe_sampler *s = new_sampler(&p);
        for (int round = 0; round < 10; round++) {
            for (int i = 0; i < N; i++) l[i] = lcg_unit() * 6.0f;
            softmax_ref(l, N, temp, pr);
            /* the smallest set, best first, whose mass reaches p */
            for (int i = 0; i < N; i++) order[rank_of(l, N, i)] = i;
            double cum = 0.0;
            int m = 0;
            while (m < N && cum < (double)ps[pi]) cum += pr[order[m++]];
            /* skip draws where the cut-off is within rounding of a boundary */
            if (fabs(cum - (double)ps[pi]) < 1e-6 || fabs(cum - pr[order[m - 1]] - (double)ps[pi]) < 1e-6) continue;
            char in[N] = {0}, seen[N] = {0};
            for (int i = 0; i < m; i++) in[order[i]] = 1;
            int n_seen = 0;
            for (int d = 0; d < 4000; d++) {
                moe_token t = moe_sample(s, l, N);
                assert_true(t >= 0 && t < N);
                assert_true(in[t]);
                if (!seen[t]) seen[t] = 1, n_seen++;
            }
            /* every member with probability >= 1/200 after renormalisation shows up */
            for (int i = 0; i < m; i++)
                if (pr[order[i]] / cum > 1.0 / 200.0) assert_true(seen[order[i]]);
        }
        moe_sampler_free(s);
    }
}

/* The selection stages against brute force: the k-th best through the heap, and the top-p cut
   through the bins and the quickselect (and its sort fallback), on random candidate sets with
   many ties, one-bin clusters, zero weights and tiny sizes. */
static void test_selection_vs_sort(void **state) {
    (void)state;
    enum { MAXN = 3000 };
    smp_cand *c = malloc(MAXN * sizeof *c), *t = malloc(MAXN * sizeof *t), *srt = malloc(MAXN * sizeof *srt);
    assert_true(c && t && srt);
    for (int round = 0; round < 400; round++) {
        int n = 1 + (int)(lcg_unit() * (round < 100 ? 12 : MAXN - 1));
        int style = round % 4;
        float temp = 0.25f + lcg_unit() * 2.0f;
        float lmax = -INFINITY;
        for (int i = 0; i < n; i++) {
            float v = style == 0 ? lcg_unit() * 10.0f                           /* spread */
                    : style == 1 ? (float)(int)(lcg_unit() * 4.0f)              /* heavy ties */
                    : style == 2 ? 5.0f + lcg_unit() * 0.01f                    /* one bin */
                                 : (lcg_unit() < 0.5f ? -100.0f : lcg_unit());  /* zero weights */
            c[i].logit = v, c[i].id = i * 3 + 1;
            lmax = v > lmax ? v : lmax;
        }
        const double kt = 4294967296.0 * 1.4426950408889634 / (double)temp;
        uint64_t total = 0;
        for (int i = 0; i < n; i++) total += (c[i].q = smp_weight(c[i].logit, lmax, kt));
        memcpy(srt, c, (size_t)n * sizeof *srt);
        qsort(srt, (size_t)n, sizeof *srt, smp_cmp);
        /* top-k */
        if (n > 1) {
            int k = 1 + (int)(lcg_unit() * (float)(n - 1));
            smp_cand kth = smp_kth_best(c, n, k, t);
            assert_int_equal(kth.id, srt[k - 1].id);
        }
        /* top-p at several p, with each search budget */
        for (int pi = 0; pi < 4; pi++) {
            double need = (double)(0.05f + 0.3f * (float)pi + lcg_unit() * 0.05f) * (double)total;
            uint64_t cum = 0;
            int want = n - 1;
            for (int i = 0; i < n; i++) {
                cum += srt[i].q;
                if ((double)cum >= need) { want = i; break; }
            }
            const int budgets[] = {0, 1, 3, 64};
            for (int b = 0; b < 4; b++) {
                smp_cand cut = smp_top_p_cut(c, n, lmax, temp, need, t, budgets[b]);
                if (cut.id != srt[want].id)
                    fail_msg("round %d (n %d, style %d), budget %d: cut %d, want %d", round, n, style, budgets[b], cut.id,
                             srt[want].id);
            }
        }
    }
    free(c);
    free(t);
    free(srt);
}

/* ---- (f) min-p ----------------------------------------------------------------------------- */
static void test_min_p(void **state) {
    (void)state;
    enum { N = 64 };
    const float mps[] = {0.01f, 0.05f, 0.2f, 0.5f, 0.9f};
    float l[N];
    double pr[N];
    for (size_t mi = 0; mi < sizeof mps / sizeof mps[0]; mi++) {
        const double temp = 1.3;
        moe_sampler_params p = {.temperature = (float)temp, .min_p = mps[mi], .seed = 3000 + mi};
        moe_sampler *s = new_sampler(&p);
        for (int round = 0; round < 10; round++) {
            for (int i = 0; i < N; i++) l[i] = lcg_unit() * 8.0f;
            softmax_ref(l, N, temp, pr);
            double pmax = 0.0;
            for (int i = 0; i < N; i++) pmax = pr[i] > pmax ? pr[i] : pmax;
            int cnt[N] = {0};
            for (int d = 0; d < 4000; d++) {
                moe_token t = moe_sample(s, l, N);
                assert_true(t >= 0 && t < N);
                assert_true(pr[t] >= (double)mps[mi] * pmax * (1.0 - 1e-6));
                cnt[t]++;
            }
            /* tokens clearly above the cut-off do appear */
            for (int i = 0; i < N; i++)
                if (pr[i] >= (double)mps[mi] * pmax * 1.01 && pr[i] > 0.01) assert_true(cnt[i] > 0);
        }
        moe_sampler_free(s);
    }
}

/* ---- (g) the distribution itself ------------------------------------------------------------
   Pearson's chi-square of the counts against the reference softmax, N draws. The thresholds
   are the chi-square quantiles at p = 1e-6 (dof 15: 56.49, dof 7: 40.52): with a fresh seed a
   correct sampler would fail once in a million runs; a wrong temperature, an off-by-one in the
   cumulative walk or a biased uniform shows up as chi2 in the hundreds or more. */
static double chi_square(const int *cnt, const double *pr, int n, int total) {
    double chi = 0.0;
    for (int i = 0; i < n; i++) {
        double e = pr[i] * total;
        chi += (cnt[i] - e) * (cnt[i] - e) / e;
    }
    return chi;
}

static void test_chi_square(void **state) {
    (void)state;
    enum { N = 16, DRAWS = 200000 };
    float l[N];
    double pr[N];
    for (int i = 0; i < N; i++) l[i] = (float)((i * 7) % N) * 0.25f - 1.5f; /* distinct, range 3.75 */

    /* temperature 1, no filters: dof 15 */
    moe_sampler_params p = {.temperature = 1.0f, .seed = 4242};
    moe_sampler *s = new_sampler(&p);
    int cnt[N] = {0};
    for (int d = 0; d < DRAWS; d++) cnt[moe_sample(s, l, N)]++;
    softmax_ref(l, N, 1.0, pr);
    double chi = chi_square(cnt, pr, N, DRAWS);
    printf("   chi-square, T = 1, 16 tokens, %d draws: %.2f (threshold 56.49)\n", DRAWS, chi);
    assert_true(chi < 56.49);
    moe_sampler_free(s);

    /* temperature 0.6 with top-k 8: the 8 best renormalised, dof 7 */
    moe_sampler_params q = {.temperature = 0.6f, .top_k = 8, .seed = 99};
    s = new_sampler(&q);
    memset(cnt, 0, sizeof cnt);
    for (int d = 0; d < DRAWS; d++) cnt[moe_sample(s, l, N)]++;
    float lk[8];
    int ck[8], m = 0;
    for (int i = 0; i < N; i++)
        if (rank_of(l, N, i) < 8) lk[m] = l[i], ck[m] = cnt[i], m++;
        else assert_int_equal(cnt[i], 0);
    assert_int_equal(m, 8);
    softmax_ref(lk, 8, (double)0.6f, pr);
    chi = chi_square(ck, pr, 8, DRAWS);
    printf("   chi-square, T = 0.6, top-k 8, %d draws: %.2f (threshold 40.52)\n", DRAWS, chi);
    assert_true(chi < 40.52);
    moe_sampler_free(s);

    /* a miscalibrated reference must fail the same statistic (the test has power) */
    softmax_ref(l, N, 1.1, pr);
    s = new_sampler(&p);
    memset(cnt, 0, sizeof cnt);
    for (int d = 0; d < DRAWS; d++) cnt[moe_sample(s, l, N)]++;
    assert_true(chi_square(cnt, pr, N, DRAWS) > 100.0);
    moe_sampler_free(s);
}

/* ---- (h) penalties ------------------------------------------------------------------------- */
static void test_penalties_exact(void **state) {
    (void)state;
    enum { N = 10 };
    moe_sampler_params p = {.temperature = 1.0f, .repeat_penalty = 1.25f, .repeat_last_n = 7,
                            .presence_penalty = 0.5f, .frequency_penalty = 0.125f};
    moe_sampler *s = new_sampler(&p);
    assert_int_equal(smp_reserve(s, N), 1);
    /* history: 9 and 8 fall out of the window of 7; then 1 ×3, 2 ×1, 3 ×1, 7 ×1; 42 is beyond N */
    const moe_token hist[] = {9, 8, 1, 2, 1, 3, 7, 42, 1};
    for (size_t i = 0; i < sizeof hist / sizeof hist[0]; i++) moe_sampler_accept(s, hist[i]);
    const float base[N] = {1.0f, 2.0f, -2.0f, 0.0f, 4.0f, 5.0f, 6.0f, -0.75f, 3.0f, 7.0f};
    smp_cand c[N];
    for (int i = 0; i < N; i++) c[i].logit = base[i], c[i].id = i;
    smp_penalize(s, c, N);
    float want[N];
    memcpy(want, base, sizeof want);
    want[1] = 2.0f / 1.25f - (3 * 0.125f + 0.5f);   /* positive: divided; 3 occurrences */
    want[2] = -2.0f * 1.25f - (1 * 0.125f + 0.5f);  /* negative: multiplied */
    want[3] = 0.0f - (1 * 0.125f + 0.5f);           /* zero stays zero before the subtraction */
    want[7] = -0.75f * 1.25f - (0.125f + 0.5f);
    for (int i = 0; i < N; i++) {
        assert_int_equal(c[i].id, i);
        if (c[i].logit != want[i]) fail_msg("token %d: %.9g, want %.9g", i, (double)c[i].logit, (double)want[i]);
    }
    for (int i = 0; i < s->cap; i++) assert_int_equal(s->counts[i], 0); /* scratch left clean */
    moe_sampler_free(s);

    /* each term alone */
    moe_sampler_params only_freq = {.frequency_penalty = 0.3f}, only_pres = {.presence_penalty = -0.4f},
                       only_rep = {.repeat_penalty = 0.5f};
    moe_sampler_params *ps[3] = {&only_freq, &only_pres, &only_rep};
    for (int k = 0; k < 3; k++) {
        s = new_sampler(ps[k]);
        assert_int_equal(smp_reserve(s, N), 1);
        moe_sampler_accept(s, 4);
        moe_sampler_accept(s, 4);
        moe_sampler_accept(s, 7);
        for (int i = 0; i < N; i++) c[i].logit = base[i], c[i].id = i;
        smp_penalize(s, c, N);
        float w4 = k == 0 ? (float)(4.0 - 2 * (double)0.3f) : k == 1 ? (float)(4.0 + (double)0.4f) : 4.0f / 0.5f;
        float w7 = k == 0 ? (float)(-0.75 - (double)0.3f) : k == 1 ? (float)(-0.75 + (double)0.4f) : -0.75f * 0.5f;
        assert_true(c[4].logit == w4);
        assert_true(c[7].logit == w7);
        for (int i = 0; i < N; i++)
            if (i != 4 && i != 7) assert_true(c[i].logit == base[i]);
        moe_sampler_free(s);
    }
}

/* Through the public API: a clear winner is dethroned exactly when the penalty predicts it. */
static void test_penalties_flip(void **state) {
    (void)state;
    float l[4] = {3.0f, 2.0f, -1.0f, 1.0f};
    /* repeat penalty: 3 / r vs 2 → flips for r > 1.5 */
    moe_sampler_params p = {.repeat_penalty = 1.49f};
    moe_sampler *s = new_sampler(&p);
    for (int i = 0; i < 5; i++) assert_int_equal(moe_sample(s, l, 4), 0); /* records 0 each time */
    moe_sampler_free(s);
    p.repeat_penalty = 1.51f;
    s = new_sampler(&p);
    assert_int_equal(moe_sample(s, l, 4), 0);  /* empty history */
    assert_int_equal(moe_sample(s, l, 4), 1);  /* 0 is penalised now */
    assert_int_equal(moe_sample(s, l, 4), 0);  /* 1 is penalised too: 3/1.51 = 1.987 > 2/1.51 */
    moe_sampler_free(s);

    /* frequency: 3 - c·0.3 vs 2 → token 0 wins until it has been seen 4 times (3 - 1.2 < 2) */
    moe_sampler_params f = {.frequency_penalty = 0.3f, .repeat_last_n = 100};
    s = new_sampler(&f);
    for (int i = 0; i < 4; i++) assert_int_equal(moe_sample(s, l, 4), 0);
    assert_int_equal(moe_sample(s, l, 4), 1);
    moe_sampler_free(s);

    /* presence: once per distinct token, however often it was seen */
    moe_sampler_params pr = {.presence_penalty = 0.9f};
    s = new_sampler(&pr);
    for (int i = 0; i < 10; i++) moe_sampler_accept(s, 0);
    assert_int_equal(moe_sample(s, l, 4), 0); /* 3 - 0.9 = 2.1 > 2 */
    moe_sampler_free(s);
    pr.presence_penalty = 1.1f;
    s = new_sampler(&pr);
    moe_sampler_accept(s, 0);
    assert_int_equal(moe_sample(s, l, 4), 1); /* 1.9 < 2 */
    moe_sampler_free(s);

    /* the window: only the last repeat_last_n recorded tokens count */
    moe_sampler_params w = {.presence_penalty = 5.0f, .repeat_last_n = 3};
    s = new_sampler(&w);
    moe_sampler_accept(s, 0);
    assert_int_equal(moe_sample(s, l, 4), 1); /* 0 penalised; records 1 */
    moe_sampler_accept(s, 2);
    moe_sampler_accept(s, 2);                 /* window now {1, 2, 2}: 0 has left it */
    assert_int_equal(moe_sample(s, l, 4), 0);
    moe_sampler_reset(s);                     /* history cleared */
    moe_sampler_accept(s, 0);
    assert_int_equal(moe_sample(s, l, 4), 1);
    moe_sampler_free(s);

    /* default window is 64 */
    moe_sampler_params d = {.presence_penalty = 5.0f};
    s = new_sampler(&d);
    moe_sampler_accept(s, 0);
    for (int i = 0; i < 63; i++) moe_sampler_accept(s, 3);
    assert_int_equal(moe_sample(s, l, 4), 1); /* 0 is the 64th most recent: still penalised */
    moe_sampler_free(s);
    s = new_sampler(&d);
    moe_sampler_accept(s, 0);
    for (int i = 0; i < 64; i++) moe_sampler_accept(s, 3);
    assert_int_equal(moe_sample(s, l, 4), 0); /* the 65th: forgotten */
    moe_sampler_free(s);
}

/* ---- (i) seeds ----------------------------------------------------------------------------- */
static void draw_seq(uint64_t seed, const float *l, int n, moe_token *out, int count) {
    moe_sampler_params p = {.temperature = 1.0f, .top_p = 0.95f, .seed = seed};
    moe_sampler *s = new_sampler(&p);
    for (int i = 0; i < count; i++) out[i] = moe_sample(s, l, n);
    moe_sampler_free(s);
}

static void test_seeds(void **state) {
    (void)state;
    enum { N = 50, LEN = 64 };
    float l[N];
    for (int i = 0; i < N; i++) l[i] = lcg_unit() * 3.0f;
    moe_token a[LEN], b[LEN], c[LEN];
    for (uint64_t seed = 0; seed < 20; seed++) {
        draw_seq(seed, l, N, a, LEN);
        draw_seq(seed, l, N, b, LEN);
        assert_memory_equal(a, b, sizeof a);
        draw_seq(seed + 1, l, N, c, LEN);
        assert_memory_not_equal(a, c, sizeof a);
    }
    draw_seq(UINT64_MAX, l, N, a, LEN);
    draw_seq(UINT64_MAX - 1, l, N, c, LEN);
    assert_memory_not_equal(a, c, sizeof a);

    /* reset: the same sequence again, penalties included */
    moe_sampler_params p = {.temperature = 0.9f, .top_k = 20, .repeat_penalty = 1.3f, .seed = 7};
    moe_sampler *s = new_sampler(&p);
    for (int i = 0; i < LEN; i++) a[i] = moe_sample(s, l, N);
    moe_sampler_reset(s);
    for (int i = 0; i < LEN; i++) b[i] = moe_sample(s, l, N);
    assert_memory_equal(a, b, sizeof a);
    moe_sampler_free(s);
}

/* ---- (j) golden sequences ------------------------------------------------------------------ */
static void test_rng_vectors(void **state) {
    (void)state;
    /* xoshiro256** seeded through splitmix64: the published outputs for seeds 0 and 42 */
    moe_sampler *s = new_sampler(NULL);
    const uint64_t want0[4] = {0x99ec5f36cb75f2b4ull, 0xbf6e1f784956452aull, 0x1a5f849d4933e6e0ull, 0x6aa594f1262d2d2cull};
    for (int i = 0; i < 4; i++) assert_true(smp_next(s->rng) == want0[i]);
    moe_sampler_free(s);
    moe_sampler_params p = {.seed = 42};
    s = new_sampler(&p);
    const uint64_t want42[4] = {0x15780b2e0c2ec716ull, 0x6104d9866d113a7eull, 0xae17533239e499a1ull, 0xecb8ad4703b360a1ull};
    for (int i = 0; i < 4; i++) assert_true(smp_next(s->rng) == want42[i]);
    moe_sampler_reset(s); /* re-seeds */
    assert_true(smp_next(s->rng) == want42[0]);
    moe_sampler_free(s);
}

static void test_golden(void **state) {
    (void)state;
    float l[32];
    for (int i = 0; i < 32; i++) l[i] = (float)((i * 37) % 32) / 8.0f - 2.0f;

    /* every stage and every penalty at once */
    const moe_token want_a[48] = {5,  12, 23, 31, 31, 25, 24, 25, 24, 19, 19, 10, 25, 11, 24, 30,
                                  19, 29, 23, 23, 5,  6,  17, 19, 12, 18, 17, 25, 23, 10, 12, 19,
                                  30, 31, 25, 24, 25, 5,  17, 31, 18, 19, 25, 25, 30, 6,  19, 19};
    moe_sampler_params pa = {.temperature = 0.8f, .top_k = 24, .top_p = 0.9f, .min_p = 0.05f, .repeat_penalty = 1.1f,
                             .repeat_last_n = 8, .presence_penalty = 0.1f, .frequency_penalty = 0.05f, .seed = 42};
    moe_sampler *s = new_sampler(&pa);
    for (int i = 0; i < 48; i++) {
        moe_token t = moe_sample(s, l, 32);
        if (t != want_a[i]) fail_msg("golden A: token %d is %d, want %d", i, t, want_a[i]);
    }
    moe_sampler_free(s);

    /* plain temperature sampling */
    const moe_token want_b[32] = {4,  25, 23, 29, 5,  30, 17, 6, 19, 19, 18, 7,  6, 19, 12, 25,
                                  19, 31, 31, 25, 25, 10, 12, 4, 19, 5,  12, 30, 5, 2,  15, 11};
    moe_sampler_params pb = {.temperature = 1.0f, .seed = 1234};
    s = new_sampler(&pb);
    for (int i = 0; i < 32; i++) {
        moe_token t = moe_sample(s, l, 32);
        if (t != want_b[i]) fail_msg("golden B: token %d is %d, want %d", i, t, want_b[i]);
    }
    moe_sampler_free(s);

    /* 1000 candidates with pairwise ties: the top-p selection, top-k heap and tie-breaking */
    float *v = malloc(1000 * sizeof *v);
    assert_non_null(v);
    for (int i = 0; i < 1000; i++) v[i] = (float)((i * 7919) % 500) / 50.0f - 5.0f;
    const moe_token want_c[40] = {704, 284, 840, 982, 994, 871, 63,  105, 408, 155, 544, 735, 933, 883,
                                  451, 563, 260, 463, 161, 137, 174, 661, 673, 284, 760, 130, 44,  599,
                                  180, 488, 93,  142, 828, 988, 920, 426, 353, 698, 921, 982};
    moe_sampler_params pc = {.temperature = 1.3f, .top_p = 0.8f, .min_p = 0.02f, .repeat_penalty = 1.2f,
                             .repeat_last_n = 16, .seed = 7};
    s = new_sampler(&pc);
    for (int i = 0; i < 40; i++) {
        moe_token t = moe_sample(s, v, 1000);
        if (t != want_c[i]) fail_msg("golden C: token %d is %d, want %d", i, t, want_c[i]);
    }
    moe_sampler_free(s);
    const moe_token want_d[40] = {821, 612, 605, 951, 402, 241, 463, 618, 926, 846, 889, 525, 204, 747,
                                  908, 963, 371, 605, 210, 457, 284, 136, 963, 704, 673, 815, 284, 426,
                                  661, 661, 44,  457, 494, 766, 821, 926, 210, 599, 62,  889};
    moe_sampler_params pd = {.temperature = 0.5f, .top_k = 300, .top_p = 0.97f, .seed = 8};
    s = new_sampler(&pd);
    for (int i = 0; i < 40; i++) {
        moe_token t = moe_sample(s, v, 1000);
        if (t != want_d[i]) fail_msg("golden D: token %d is %d, want %d", i, t, want_d[i]);
    }
    moe_sampler_free(s);
    free(v);

    /* 60000 weights hashed (FNV-1a over the integers): the Python model gives the same hash */
    uint64_t h = 1469598103934665603u;
    const float temps[3] = {1.0f, 0.7f, 1.3f};
    for (int ti = 0; ti < 3; ti++) {
        const double kt3 = 4294967296.0 * 1.4426950408889634 / (double)temps[ti];
        for (int i = 0; i < 20000; i++) {
            float x = 3.25f - (float)i / 577.0f;
            h = (h ^ smp_weight(x, 3.25f, kt3)) * 1099511628211u;
        }
    }
    if (h != 0xc1ba4028ae38eb3cu) fail_msg("weight hash %016llx", (unsigned long long)h);

    /* the weights' exact integers */
    const double kt = 4294967296.0 * 1.4426950408889634; /* T = 1 */
    assert_true(smp_weight(-1.0f, 0.0f, kt) == 6471803570176u);
    assert_true(smp_weight(-0.5f, 0.0f, kt) == 10670200203264u);
    assert_true(smp_weight(-30.0f, 0.0f, kt) == 1u);
    assert_true(smp_weight(-1e-9f, 0.0f, kt) == 17592186019840u);
    assert_true(smp_exp2_q44(-4294967296) == SMP_ONE / 2);
    assert_true(smp_exp2_q44(-1) == 17592186032128u);
}

/* ---- (k) the exponential --------------------------------------------------------------------- */
static void test_exp(void **state) {
    (void)state;
    const double kt = 4294967296.0 * 1.4426950408889634;
    double worst = 0.0;
    uint64_t prev = 0;
    for (double x = -40.0; x <= 0.0; x += 0.0000731) {
        uint64_t a = smp_weight((float)x, 0.0f, kt);
        double b = ldexp(exp((double)(float)x), 44), err = fabs((double)a - b) / b;
        if (b > 4294967296.0) worst = err > worst ? err : worst; /* relative error where floor is negligible */
        assert_true(fabs((double)a - b) <= 1.0 + 1e-8 * b);    /* and floor's one unit everywhere */
        assert_true(a >= prev);                                /* monotonic */
        prev = a;
    }
    /* monotonic across every 1/16 table boundary and every power of two, at the finest step */
    for (int64_t k = -46; k <= 0; k++)
        for (int64_t i = 0; i < 16; i++) {
            int64_t yq = k * 4294967296 + i * 268435456;
            for (int64_t d = -3; d <= 3; d++) {
                if (yq + d > 0) continue;
                assert_true(smp_exp2_q44(yq + d - 1) <= smp_exp2_q44(yq + d));
            }
        }
    printf("   portable exp: max relative error %.3g (weights above 2^32)\n", worst);
    assert_true(worst < 1e-8);
    assert_true(smp_weight(0.0f, 0.0f, kt) == SMP_ONE);
    assert_true(smp_weight(INFINITY, INFINITY, kt) == SMP_ONE);
    assert_true(smp_weight(1.0f, INFINITY, kt) == 0);
    assert_true(smp_weight(-1e-30f, 0.0f, kt) == SMP_ONE);
    assert_true(smp_weight(-32.0f, 0.0f, kt) == 0);
    assert_true(smp_weight(-1000.0f, 0.0f, kt) == 0);
    assert_true(smp_weight(-3e38f, 3e38f, kt) == 0);
    assert_true(smp_weight(-1.0f, 0.0f, INFINITY) == 0); /* T -> 0 */
    assert_true(smp_exp2_q44(INT64_MIN) == 0);
    assert_true(smp_exp2_q44(0) == SMP_ONE);
}

/* ---- (l) memory ---------------------------------------------------------------------------- */
static void test_alloc_failures(void **state) {
    (void)state;
    moe_sampler_params p = {.temperature = 1.0f, .top_p = 0.9f, .seed = 1};
    moe_sampler *s = NULL;
    moe_test_fail_alloc_after(0);
    assert_int_equal(moe_sampler_new(&p, &s), MOE_ERR_NO_MEMORY);
    assert_null(s);
    moe_test_fail_alloc_after(1); /* the sampler, then its history */
    assert_int_equal(moe_sampler_new(&p, &s), MOE_ERR_NO_MEMORY);
    assert_null(s);
    moe_test_fail_alloc_after(-1);
    s = new_sampler(&p);

    float l[1000];
    for (int i = 0; i < 1000; i++) l[i] = lcg_unit() * 4.0f;
    for (int k = 0; k < 3; k++) { /* each of the three scratch buffers fails in turn */
        moe_test_fail_alloc_after(k);
        assert_int_equal(moe_sample(s, l, 1000), -1);
        assert_non_null(strstr(moe_last_error(), "out of memory"));
        moe_test_fail_alloc_after(-1);
        assert_int_equal(s->cap, 0);
    }
    assert_int_equal(s->hist_len, 0);
    moe_token t = moe_sample(s, l, 1000); /* usable again */
    assert_true(t >= 0 && t < 1000);
    assert_int_equal(s->cap, 1000);

    /* no allocation for n_vocab up to the capacity; growth keeps working; a failed growth
       keeps the old buffers */
    moe_test_fail_alloc_after(0);
    t = moe_sample(s, l, 500);
    assert_true(t >= 0 && t < 500);
    t = moe_sample(s, l, 1000);
    assert_true(t >= 0 && t < 1000);
    float *big = malloc(200000 * sizeof *big);
    assert_non_null(big);
    for (int i = 0; i < 200000; i++) big[i] = lcg_unit() * 10.0f;
    assert_int_equal(moe_sample(s, big, 200000), -1);
    moe_test_fail_alloc_after(-1);
    assert_int_equal(s->cap, 1000);
    t = moe_sample(s, l, 1000);
    assert_true(t >= 0 && t < 1000);
    t = moe_sample(s, big, 200000);
    assert_true(t >= 0 && t < 200000);
    assert_int_equal(s->cap, 200000);
    free(big);

    /* the greedy fast path never allocates */
    moe_sampler *g = new_sampler(NULL);
    moe_test_fail_alloc_after(0);
    assert_int_equal(moe_sample(g, l, 1000), argmax_lowest(l, 1000));
    moe_test_fail_alloc_after(-1);
    moe_sampler_free(g);
    moe_sampler_free(s);
}

/* A realistic vocabulary: every stage on 151936 logits, bounded time, same answer twice. */
static void test_large_vocab(void **state) {
    (void)state;
    enum { N = 151936 };
    float *l = malloc(N * sizeof *l);
    assert_non_null(l);
    for (int i = 0; i < N; i++) l[i] = lcg_unit() * 12.0f - 6.0f; /* flat: the worst case for top-p */
    moe_sampler_params p = {.temperature = 0.7f, .top_p = 0.95f, .min_p = 0.01f, .repeat_penalty = 1.1f, .seed = 11};
    moe_sampler *a = new_sampler(&p), *b = new_sampler(&p);
    double t0 = now_s();
    for (int i = 0; i < 20; i++) {
        moe_token x = moe_sample(a, l, N), y = moe_sample(b, l, N);
        assert_true(x >= 0 && x < N);
        assert_int_equal(x, y);
    }
    printf("   151936-token vocabulary, all stages: %.2f ms per sample\n", (now_s() - t0) / 40 * 1e3);
    moe_sampler_free(a);
    moe_sampler_free(b);
    free(l);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_invalid_args),
        cmocka_unit_test(test_greedy),
        cmocka_unit_test(test_nonfinite_sampling),
        cmocka_unit_test(test_low_temperature_is_greedy),
        cmocka_unit_test(test_top_k),
        cmocka_unit_test(test_top_p),
        cmocka_unit_test(test_selection_vs_sort),
        cmocka_unit_test(test_min_p),
        cmocka_unit_test(test_chi_square),
        cmocka_unit_test(test_penalties_exact),
        cmocka_unit_test(test_penalties_flip),
        cmocka_unit_test(test_seeds),
        cmocka_unit_test(test_rng_vectors),
        cmocka_unit_test(test_golden),
        cmocka_unit_test(test_exp),
        cmocka_unit_test(test_alloc_failures),
        cmocka_unit_test(test_large_vocab),
    };
    return tu_run_tests("sampler", tests);
}
