/* test_forward — the Qwen3-MoE forward pass (public API only) against Hugging Face transformers.

   Fixtures (gen/make_fixtures.py, run on the GPU machine): test/fixtures/qwen3moe_<name>.gguf
   holds a tiny random-weight model; qwen3moe_<name>.ref holds transformers' float32 logits for
   every position of a 128-token sequence, computed with the EXACTLY dequantized weights of the
   GGUF, and a 32-token greedy continuation of the first 16 tokens. Format: see the script.

   Per fixture:
   (a) prefill of the whole sequence with logits_all = 1 and an f32 KV cache: every logit row
       within TOL_F32 of the reference (relative to that row's logit range); the same with the
       default f16 KV cache within TOL_F16;
   (b) no NaN / Inf anywhere;
   (c) greedy continuation (argmax, f32 KV) equals the reference token for token;
   (d) prefill of N tokens equals N single-token steps, and a prefill split into n_batch chunks,
       bit for bit (the CPU backend dequantizes each weight row in the same blocks and sums in
       the same fixed 8-lane order whether one token or many are in flight);
   (e) rewind to p, then re-feeding the same tokens (as one chunk or one by one), gives
       bit-identical logits.
   The checks (a)-(e) run in the bit-reproducible mode (moe_load_params.cpu_exact = 1: f32
   activations in every matrix product). The default mode quantizes activations to int8 per
   block (like llama.cpp) and runs every fixture again, with:
   (a') logits against the same reference within the looser TOL_INT8 (most rows) and
        TOL_INT8_ANY (every row), see below;
   (b)  no NaN / Inf;
   (c') greedy: the free-running continuation is REPORTED, not required (int8's logit error is
        ~10x the fixtures' smallest greedy margin, so a near-tie may flip); required instead:
        fed the reference's own greedy sequence, at each of the 32 steps our top token is the
        reference's, or the reference's token is within 2·TOL_INT8 of our top logit (a near-tie
        under the int8 error budget);
   (d), (e) bit for bit, as in exact mode (one kernel computes each row·token product).
   The measured errors are printed so they can be reported. */
#include "../moe.c"
#include "../moe_vk.c"
#include "../shaders_embedded.c"
#include "test_util.h"

#include <math.h>

/* TOLERANCES, as max |ours - ref| / (max - min of the reference row), over all rows.
   TOL_F32 (f32 KV cache): both sides use the same float32 weights (the reference model was
   loaded with the exactly dequantized values), so only float32 rounding differs: summation
   order (transformers' blocked GEMMs vs our 8-lane dots), libm (expf, cosf/sinf, powf of the
   rope frequencies) and the softmax/norm formulations. A dot product of K <= 512 terms
   carries a relative rounding error of about sqrt(K)·2^-24 ≈ 1e-6 of its magnitude (at
   worst K·2^-24 ≈ 3e-5), the RMS norms rescale rather than amplify it, and logits are
   O(range), so the expected difference is ~1e-6 of the range: 1e-4 leaves 10-100× headroom,
   while any real mistake (a norm weight misplaced, rope pairs interleaved instead of
   rotate-half, a wrong GQA head map, a flipped expert choice, unnormalised top-k weights)
   moves logits by 1e-2..1 of the range.
   TOL_F16 (f16 KV cache, the default): every cached K and V element is rounded to binary16,
   a relative error up to 2^-11 ≈ 4.9e-4 per element. Attention scores q·k (|q·k|·scale up to
   ~10 here after the q/k RMS norms with weights ~1 ± 0.3) move by up to ~5e-3 absolute, the
   attention output by ~5e-4 relative; after two layers the logits move by ~1e-4..1e-3 of their
   range (measured: 1.5e-4..2.1e-4 on the small fixtures). TOL_F16 = 2e-3 bounds that with
   ~10× headroom and still catches real bugs. */
#define TOL_F32 1e-4
#define TOL_F16 2e-3

/* INT8 MODE (cpu_exact = 0). Every matrix product on a Q8_0 / Q4_0 / MXFP4 / K-quant weight sees
   its input rounded to int8 with one f32 scale per 32 (Q8_0 family) or 256 (K-quants) elements:
   an element error of at most d/2 = amax/254, RMS amax/(127·√12). For gaussian-like activations
   amax is ~2.1σ over 32 and ~2.9σ over 256 elements, so each product's input carries ~0.5-0.7%
   relative noise, and so does its output. A token passes through ~9 such products per layer
   path (q, k, v, o; router when quantized; gate, up, down; then the LM head); the noise adds
   roughly in quadrature and the norms neither damp nor amplify it: ~1-2% relative noise on the
   final hidden state, which moves a row's largest logit deviation to ~0.5-1.5% of the row's
   range (measured over the fixtures' 128 rows: median 6e-3..9e-3, 90th percentile 9e-3..1.3e-2).
   TOL_INT8 = 3e-2 must hold for at least 90% of the rows: 2-3x headroom over the measured 90th
   percentile, while a wrong scale, lane or sub-block in any int8 kernel moves every row by
   O(range).
   A token whose router logits lie within that noise of a top-k boundary may pick a different
   expert than the reference (the fixtures only guarantee router gaps of 1e-4): then one of its
   k expert outputs is replaced and that row moves by up to ~15% (measured max 0.14, on 1-3% of
   the rows). TOL_INT8_ANY = 0.3 bounds every row: still far below a broken forward pass
   (errors ~ the whole range) but it admits such flips. */
#define TOL_INT8 3e-2
#define TOL_INT8_ANY 0.3
#define INT8_MIN_FRACTION 0.9

/* the .ref reader, argmax, all_finite and row_rel_err are in test_util.h (shared with test_vulkan) */


/* Feeds tokens[0..n) in one step; copies the n logit rows to out (logits_all contexts). */
static void prefill_rows(moe_ctx *c, const int32_t *tokens, int n, int n_vocab, float *out) {
    moe_status st = moe_step(c, tokens, n);
    if (st != MOE_OK) print_error("moe_step: %s (%s)\n", moe_status_str(st), moe_last_error());
    assert_int_equal(st, MOE_OK);
    for (int i = 0; i < n; i++) {
        const float *l = moe_logits(c, i);
        assert_non_null(l);
        memcpy(out + (size_t)i * (size_t)n_vocab, l, (size_t)n_vocab * sizeof(float));
    }
}

/* number of rows whose bits differ between a and b */
static int rows_differing(const float *a, const float *b, int n_rows, int n_vocab) {
    int bad = 0;
    for (int i = 0; i < n_rows; i++)
        bad += memcmp(a + (size_t)i * (size_t)n_vocab, b + (size_t)i * (size_t)n_vocab, (size_t)n_vocab * sizeof(float)) != 0;
    return bad;
}

typedef struct fixture { const char *name; int exact; } fixture;

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static void run_fixture(void **state) {
    const fixture *fx = *state;
    const char *name = fx->name;
    const int exact = fx->exact;
    char gguf[256], refp[256];
    snprintf(gguf, sizeof gguf, "test/fixtures/qwen3moe_%s.gguf", name);
    snprintf(refp, sizeof refp, "test/fixtures/qwen3moe_%s.ref", name);

    ref_data r;
    int rc = ref_load(refp, &r);
    if (rc) print_error("%s: cannot read or parse (%d); run the tests from the repository root\n", refp, rc);
    assert_int_equal(rc, 0);

    moe_load_params lp = {0};
    lp.backend = MOE_BACKEND_CPU;
    lp.n_threads = 2;
    lp.cpu_exact = exact;
    moe_model *m = NULL;
    moe_status st = moe_load(gguf, &lp, &m);
    if (st != MOE_OK) print_error("moe_load(%s): %s (%s)\n", gguf, moe_status_str(st), moe_last_error());
    assert_int_equal(st, MOE_OK);
    moe_model_info info;
    assert_int_equal(moe_model_get_info(m, &info), MOE_OK);
    assert_int_equal(info.n_vocab, r.n_vocab);

    const int V = r.n_vocab, N = r.n_tokens;
    const size_t all = (size_t)N * (size_t)V;
    float *pre = malloc(all * sizeof(float)), *tmp = malloc(all * sizeof(float));
    assert_non_null(pre);
    assert_non_null(tmp);

    /* (a) + (b): prefill with an f32 KV cache against the reference */
    moe_ctx *ca = tu_new_ctx(m, MOE_KV_F32, 1, 0);
    prefill_rows(ca, r.tokens, N, V, pre);
    assert_int_equal(moe_ctx_pos(ca), N);
    assert_true(all_finite(pre, all));
    double err32 = 0;
    int worst = 0;
    double *row_err = malloc((size_t)N * sizeof *row_err);
    assert_non_null(row_err);
    for (int i = 0; i < N; i++) {
        double e = row_err[i] = row_rel_err(pre + (size_t)i * (size_t)V, r.logits + (size_t)i * (size_t)V, V);
        if (e > err32) { err32 = e; worst = i; }
    }
    qsort(row_err, (size_t)N, sizeof *row_err, cmp_double);
    double err_med = row_err[N / 2], err_p90 = row_err[(int)(INT8_MIN_FRACTION * (N - 1))];
    int rows_within = 0;
    for (int i = 0; i < N; i++) rows_within += row_err[i] <= TOL_INT8;
    free(row_err);

    /* (a) with the default f16 KV cache */
    moe_ctx *ch = tu_new_ctx(m, MOE_KV_F16, 1, 0);
    prefill_rows(ch, r.tokens, N, V, tmp);
    assert_true(all_finite(tmp, all));
    double err16 = 0;
    for (int i = 0; i < N; i++) err16 = fmax(err16, row_rel_err(tmp + (size_t)i * (size_t)V, r.logits + (size_t)i * (size_t)V, V));

    /* (c) greedy continuation, f32 KV (and, reported only, f16 KV) */
    int32_t gen32[256], gen16[256];
    int ng = r.n_greedy < 256 ? r.n_greedy : 256, match32 = 0, match16 = 0;
    for (int kv = 0; kv < 2; kv++) {
        moe_ctx *cg = tu_new_ctx(m, kv == 0 ? MOE_KV_F32 : MOE_KV_F16, 0, 0);
        int32_t *gen = kv == 0 ? gen32 : gen16;
        assert_int_equal(moe_step(cg, r.tokens, r.n_prompt), MOE_OK);
        for (int i = 0; i < ng; i++) {
            const float *l = moe_logits(cg, -1);
            assert_non_null(l);
            assert_true(all_finite(l, (size_t)V));
            gen[i] = argmax(l, V);
            assert_int_equal(moe_step(cg, &gen[i], 1), MOE_OK);
        }
        int *match = kv == 0 ? &match32 : &match16;
        while (*match < ng && gen[*match] == r.greedy[*match]) (*match)++;
        moe_ctx_free(cg);
    }

    /* (c') int8 mode: teacher-forced on the reference greedy sequence, our top token is the
       reference's unless the two are within 2·TOL_INT8 of the row range (a near-tie) */
    int tf_agree = 0, tf_bad = 0;
    if (!exact) {
        int32_t seq[512];
        int ns = r.n_prompt + ng;
        assert_true(ns <= 512);
        memcpy(seq, r.tokens, (size_t)r.n_prompt * sizeof *seq);
        memcpy(seq + r.n_prompt, r.greedy, (size_t)ng * sizeof *seq);
        moe_ctx *ct = tu_new_ctx(m, MOE_KV_F32, 1, 0);
        assert_int_equal(moe_step(ct, seq, ns), MOE_OK);
        for (int i = 0; i < ng; i++) {
            const float *l = moe_logits(ct, r.n_prompt - 1 + i);
            assert_non_null(l);
            assert_true(all_finite(l, (size_t)V));
            int top = argmax(l, V);
            float lo = l[0], hi = l[0];
            for (int j = 0; j < V; j++) { lo = fminf(lo, l[j]); hi = fmaxf(hi, l[j]); }
            if (top == r.greedy[i]) tf_agree++;
            else if ((double)l[top] - (double)l[r.greedy[i]] > 2 * TOL_INT8 * ((double)hi - (double)lo)) tf_bad++;
        }
        moe_ctx_free(ct);
    }

    /* (d) N single-token steps == one prefill of N, bit for bit; and a chunked prefill */
    moe_ctx *cs = tu_new_ctx(m, MOE_KV_F32, 0, 0);
    for (int i = 0; i < N; i++) {
        assert_int_equal(moe_step(cs, &r.tokens[i], 1), MOE_OK);
        memcpy(tmp + (size_t)i * (size_t)V, moe_logits(cs, -1), (size_t)V * sizeof(float));
    }
    int diff_steps = rows_differing(tmp, pre, N, V);
    moe_ctx_free(cs);
    moe_ctx *cc = tu_new_ctx(m, MOE_KV_F32, 1, 48);
    prefill_rows(cc, r.tokens, N, V, tmp);
    int diff_chunks = rows_differing(tmp, pre, N, V);
    moe_ctx_free(cc);

    /* (e) rewind then re-feed: as one chunk, one by one, and from 0 */
    const int p1 = N / 2 + 6, p2 = N - N / 5;
    assert_int_equal(moe_ctx_rewind(ca, p1), MOE_OK);
    assert_int_equal(moe_ctx_pos(ca), p1);
    prefill_rows(ca, r.tokens + p1, N - p1, V, tmp);
    int diff_rw1 = rows_differing(tmp, pre + (size_t)p1 * (size_t)V, N - p1, V);
    assert_int_equal(moe_ctx_rewind(ca, p2), MOE_OK);
    int diff_rw2 = 0;
    for (int i = p2; i < N; i++) {
        assert_int_equal(moe_step(ca, &r.tokens[i], 1), MOE_OK);
        diff_rw2 += memcmp(moe_logits(ca, 0), pre + (size_t)i * (size_t)V, (size_t)V * sizeof(float)) != 0;
    }
    assert_int_equal(moe_ctx_rewind(ca, 0), MOE_OK);
    prefill_rows(ca, r.tokens, N, V, tmp);
    int diff_rw0 = rows_differing(tmp, pre, N, V);

    if (exact)
        printf("[ RESULT   ] qwen3moe_%-5s exact: f32-KV max|d|/range %.3e (row %d, tol %.0e) | f16-KV %.3e (tol %.0e) | "
               "greedy %d/%d (f16-KV %d/%d), ref min_margin %.4g | prefill==steps: %d rows differ, chunked: %d | "
               "rewind: %d/%d/%d rows differ\n",
               name, err32, worst, TOL_F32, err16, TOL_F16, match32, ng, match16, ng, (double)r.min_margin, diff_steps,
               diff_chunks, diff_rw1, diff_rw2, diff_rw0);
    else
        printf("[ RESULT   ] qwen3moe_%-5s int8: f32-KV |d|/range median %.2e, p90 %.2e, max %.3e (row %d); %d/%d rows within "
               "%.0e (need %.0f%%), all within %.1f | f16-KV max %.3e | greedy free-running %d/%d (f16-KV %d/%d), "
               "teacher-forced top-1 %d/%d, %d not near-ties | prefill==steps: %d rows differ, chunked: %d | rewind: "
               "%d/%d/%d rows differ\n",
               name, err_med, err_p90, err32, worst, rows_within, N, TOL_INT8, 100 * INT8_MIN_FRACTION, TOL_INT8_ANY, err16,
               match32, ng, match16, ng, tf_agree, ng, tf_bad, diff_steps, diff_chunks, diff_rw1, diff_rw2, diff_rw0);
    if (match32 < ng)
        printf("             greedy diverges at %d: ours %d, reference %d\n", match32, gen32[match32], r.greedy[match32]);

    moe_ctx_free(ca);
    moe_ctx_free(ch);
    moe_model_free(m);
    free(pre);
    free(tmp);
    free(r.buf);

    if (exact) {
        assert_true(err32 <= TOL_F32);
        assert_true(err16 <= TOL_F16);
        assert_int_equal(match32, ng);
    } else {
        assert_true(rows_within >= INT8_MIN_FRACTION * N);
        assert_true(err32 <= TOL_INT8_ANY);
        assert_true(err16 <= TOL_INT8_ANY);
        assert_int_equal(tf_bad, 0);
    }
    assert_int_equal(diff_steps, 0);
    assert_int_equal(diff_chunks, 0);
    assert_int_equal(diff_rw1, 0);
    assert_int_equal(diff_rw2, 0);
    assert_int_equal(diff_rw0, 0);
}

int main(void) {
    static fixture fx[] = {{"f32", 1}, {"f16", 1}, {"q8_0", 1}, {"q4_k", 1}, {"mixed", 1},
                           {"f32", 0}, {"f16", 0}, {"q8_0", 0}, {"q4_k", 0}, {"mixed", 0}};
#define FIXTURE(i, label) {.name = label, .test_func = run_fixture, .initial_state = &fx[i]}
    const struct CMUnitTest tests[] = {
        FIXTURE(0, "qwen3moe_f32"), FIXTURE(1, "qwen3moe_f16"), FIXTURE(2, "qwen3moe_q8_0"),
        FIXTURE(3, "qwen3moe_q4_k"), FIXTURE(4, "qwen3moe_mixed"),
        FIXTURE(5, "qwen3moe_f32_int8"), FIXTURE(6, "qwen3moe_f16_int8"), FIXTURE(7, "qwen3moe_q8_0_int8"),
        FIXTURE(8, "qwen3moe_q4_k_int8"), FIXTURE(9, "qwen3moe_mixed_int8"),
    };
#undef FIXTURE
    return tu_run_tests("forward", tests);
}
