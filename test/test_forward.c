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

/* the .ref reader, argmax, all_finite and row_rel_err are in test_util.h (shared with test_vulkan) */

static moe_ctx *new_ctx(moe_model *m, int32_t kv_type, int32_t logits_all, int32_t n_batch) {
    moe_ctx_params cp = {0};
    cp.n_ctx = 256;
    cp.kv_type = kv_type;
    cp.logits_all = logits_all;
    cp.n_batch = n_batch;
    moe_ctx *c = NULL;
    moe_status st = moe_ctx_new(m, &cp, &c);
    if (st != MOE_OK) print_error("moe_ctx_new: %s (%s)\n", moe_status_str(st), moe_last_error());
    assert_int_equal(st, MOE_OK);
    assert_non_null(c);
    return c;
}

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

static void run_fixture(void **state) {
    const char *name = *state;
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
    moe_ctx *ca = new_ctx(m, MOE_KV_F32, 1, 0);
    prefill_rows(ca, r.tokens, N, V, pre);
    assert_int_equal(moe_ctx_pos(ca), N);
    assert_true(all_finite(pre, all));
    double err32 = 0;
    int worst = 0;
    for (int i = 0; i < N; i++) {
        double e = row_rel_err(pre + (size_t)i * (size_t)V, r.logits + (size_t)i * (size_t)V, V);
        if (e > err32) { err32 = e; worst = i; }
    }

    /* (a) with the default f16 KV cache */
    moe_ctx *ch = new_ctx(m, MOE_KV_F16, 1, 0);
    prefill_rows(ch, r.tokens, N, V, tmp);
    assert_true(all_finite(tmp, all));
    double err16 = 0;
    for (int i = 0; i < N; i++) err16 = fmax(err16, row_rel_err(tmp + (size_t)i * (size_t)V, r.logits + (size_t)i * (size_t)V, V));

    /* (c) greedy continuation, f32 KV (and, reported only, f16 KV) */
    int32_t gen32[256], gen16[256];
    int ng = r.n_greedy < 256 ? r.n_greedy : 256, match32 = 0, match16 = 0;
    for (int kv = 0; kv < 2; kv++) {
        moe_ctx *cg = new_ctx(m, kv == 0 ? MOE_KV_F32 : MOE_KV_F16, 0, 0);
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

    /* (d) N single-token steps == one prefill of N, bit for bit; and a chunked prefill */
    moe_ctx *cs = new_ctx(m, MOE_KV_F32, 0, 0);
    for (int i = 0; i < N; i++) {
        assert_int_equal(moe_step(cs, &r.tokens[i], 1), MOE_OK);
        memcpy(tmp + (size_t)i * (size_t)V, moe_logits(cs, -1), (size_t)V * sizeof(float));
    }
    int diff_steps = rows_differing(tmp, pre, N, V);
    moe_ctx_free(cs);
    moe_ctx *cc = new_ctx(m, MOE_KV_F32, 1, 48);
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

    printf("[ RESULT   ] qwen3moe_%-5s f32-KV max|d|/range %.3e (row %d, tol %.0e) | f16-KV %.3e (tol %.0e) | "
           "greedy %d/%d (f16-KV %d/%d), ref min_margin %.4g | prefill==steps: %d rows differ, chunked: %d | "
           "rewind: %d/%d/%d rows differ\n",
           name, err32, worst, TOL_F32, err16, TOL_F16, match32, ng, match16, ng, (double)r.min_margin, diff_steps,
           diff_chunks, diff_rw1, diff_rw2, diff_rw0);
    if (match32 < ng)
        printf("             greedy diverges at %d: ours %d, reference %d\n", match32, gen32[match32], r.greedy[match32]);

    moe_ctx_free(ca);
    moe_ctx_free(ch);
    moe_model_free(m);
    free(pre);
    free(tmp);
    free(r.buf);

    assert_true(err32 <= TOL_F32);
    assert_true(err16 <= TOL_F16);
    assert_int_equal(match32, ng);
    assert_int_equal(diff_steps, 0);
    assert_int_equal(diff_chunks, 0);
    assert_int_equal(diff_rw1, 0);
    assert_int_equal(diff_rw2, 0);
    assert_int_equal(diff_rw0, 0);
}

int main(void) {
    static char names[][8] = {"f32", "f16", "q8_0", "q4_k", "mixed"};
#define FIXTURE(i, label) {.name = label, .test_func = run_fixture, .initial_state = names[i]}
    const struct CMUnitTest tests[] = {
        FIXTURE(0, "qwen3moe_f32"), FIXTURE(1, "qwen3moe_f16"), FIXTURE(2, "qwen3moe_q8_0"),
        FIXTURE(3, "qwen3moe_q4_k"), FIXTURE(4, "qwen3moe_mixed"),
    };
#undef FIXTURE
    return cmocka_run_group_tests_name("forward", tests, NULL, NULL);
}
