/* test_cpu_kernels.c — the CPU backend's int8-activation kernels (moe.c, the kernel block after
   section 3's dot products): Q8_0, Q4_0, MXFP4 against q8a activations, Q4_K, Q5_K, Q6_K against
   q8k activations, and the f32 dot_n used by the exact mode's prefill.

   1. activation quantization: the AVX2 quantizer writes exactly the portable one's bytes (same
      q, same bsums, same scale bits), on gaussian rows, rows with outliers, zero rows, rows of
      tiny values and rows holding inf/NaN; and every element is within d/2 of d·q;
   2. every int8 dot: AVX2 == portable bit for bit (the same integer lanes, then the same f32
      fmas and the same final sum), for nt = 1..4 tokens per weight-row pass and several rows
      per call (AVX2 tiles of 2 rows), and each (row, token) result equals its result alone
      (what makes prefill == decode);
   3. accuracy: the int8 dot is within float rounding (TOL_ROUND below) of the f64 dot of the
      dequantized weights with the dequantized activations, and within the activation-rounding
      bound Σ_b (d_b/2)·Σ_{i∈b}|w_i| (+ TOL_ROUND) of the f64 dot with the ORIGINAL activations;
   4. saturation: blocks whose codes all sit at their extremes (and sub-block scales at theirs)
      against activations all at ±127 chosen so that every maddubs pair is as large as it gets
      (32512 for Q8_0 with w = −128, x = −127): AVX2 == portable == the exact integer value;
   5. the f32 dot_n equals dot for every token, bit for bit.
   On a CPU without AVX2 the comparisons of 1, 2, 4 are skipped (the portable code is then what
   runs) and 3 checks the portable code. */
#include "../moe.c"
#include "../moe_vk.c"
#include "../shaders_embedded.c"

#include "test_util.h"

/* deterministic samples: xorshift64* + Box–Muller */
static uint64_t g_rng = 0x2545f4914f6cdd1dull;
static uint64_t rng_u64(void) {
    g_rng ^= g_rng >> 12; g_rng ^= g_rng << 25; g_rng ^= g_rng >> 27;
    return g_rng * 0x2545f4914f6cdd1dull;
}
static double rng_u01(void) { return (double)(rng_u64() >> 11) * (1.0 / 9007199254740992.0); }
static float rng_normal(void) {
    double u = rng_u01(), v = rng_u01();
    if (u < 1e-300) u = 1e-300;
    return (float)(sqrt(-2.0 * log(u)) * cos(6.283185307179586 * v));
}

static int g_have_avx2;
static cpu_kernels g_ref, g_fast;

static int setup(void **state) {
    (void)state;
    g_ref = cpu_kernels_portable();
    g_fast = cpu_kernels_pick();
#ifdef MOE_AVX2
    g_have_avx2 = cpu_has_avx2();
#endif
    if (!g_have_avx2) printf("[ NOTE     ] no AVX2 on this CPU: AVX2-vs-portable comparisons skipped\n");
    return 0;
}

typedef struct ktype { int32_t id; const char *name; int fmt; } ktype;
static const ktype k_ktypes[] = {
    {MOE_TYPE_Q8_0, "q8_0", Q8_A}, {MOE_TYPE_Q4_0, "q4_0", Q8_A}, {MOE_TYPE_MXFP4, "mxfp4", Q8_A},
    {MOE_TYPE_Q4_K, "q4_K", Q8_K}, {MOE_TYPE_Q5_K, "q5_K", Q8_K}, {MOE_TYPE_Q6_K, "q6_K", Q8_K},
};
#define N_KTYPES ((int)(sizeof k_ktypes / sizeof k_ktypes[0]))

static int same_bits(const float *a, const float *b, int n) { return memcmp(a, b, (size_t)n * sizeof(float)) == 0; }

/* element i of a quantized activation row, dequantized, and its block's scale */
static double xq_at(int fmt, const uint8_t *xq, int64_t i, double *d) {
    if (fmt == Q8_K) {
        const q8k_block *b = (const q8k_block *)(const void *)xq + i / QK_K;
        *d = b->d;
        return (double)b->d * b->q[i % QK_K];
    }
    const q8a_block *b = (const q8a_block *)(const void *)xq + i / 32;
    *d = b->d;
    return (double)b->d * b->q[i % 32];
}

/* ---- 1. activation quantization --------------------------------------------------------------- */

static void fill_row(float *x, int64_t n, int kind) {
    for (int64_t i = 0; i < n; i++) {
        switch (kind) {
        case 0: x[i] = rng_normal(); break;                                   /* gaussian */
        case 1: x[i] = 0.05f * rng_normal() + (i % 97 == 5 ? 40.0f : 0.0f); break;  /* outliers */
        case 2: x[i] = 0.0f; break;                                           /* zero */
        case 3: x[i] = 1e-32f * rng_normal(); break;                          /* below the zero threshold */
        case 4: x[i] = 1e-20f * rng_normal(); break;                          /* tiny but kept */
        case 5: x[i] = i % 64 < 32 ? 1.0f : -1.0f; break;                     /* ±amax everywhere */
        default: x[i] = (i == 300 ? INFINITY : i == 700 ? NAN : rng_normal()); break; /* inf, NaN */
        }
    }
}

static void test_quantize_activations(void **state) {
    (void)state;
    enum { N = 1024 };
    float x[N];
    uint8_t a[N / 256 * sizeof(q8k_block)], b[N / 256 * sizeof(q8k_block)];
    for (int kind = 0; kind <= 6; kind++) {
        fill_row(x, N, kind);
        for (int fmt = Q8_A; fmt <= Q8_K; fmt++) {
            size_t bytes = q8_row_bytes(fmt, N);
            memset(a, 0xaa, sizeof a);
            memset(b, 0x55, sizeof b);
            (fmt == Q8_K ? g_ref.quant_q8k : g_ref.quant_q8a)(x, a, N);
            (fmt == Q8_K ? g_fast.quant_q8k : g_fast.quant_q8a)(x, b, N);
            if (g_have_avx2 && memcmp(a, b, bytes) != 0) {
                print_error("kind %d fmt %d: AVX2 quantization differs from the portable one\n", kind, fmt);
                fail();
            }
            for (int64_t i = 0; i < N; i++) {
                double d, v = xq_at(fmt, a, i, &d);
                int64_t blk = fmt == Q8_K ? 256 : 32;
                int bad_block = kind == 6 && (i / blk == 300 / blk || i / blk == 700 / blk);
                if (bad_block) { assert_true(isnan(d)); continue; }
                assert_true(isfinite(d) && d >= 0);
                if (kind == 3) assert_true(d == 0 && v == 0);
                if (kind == 5) assert_true(fabs(v - x[i]) <= 1e-7);
                /* |x − d·q| ≤ d/2, up to the float rounding of x·(127/amax) */
                assert_true(fabs(v - x[i]) <= d * 0.50001 + (kind == 3 ? 1e-30 : 0));
            }
            if (fmt == Q8_K) { /* the partial sums */
                const q8k_block *y = (const q8k_block *)(const void *)a;
                for (int bi = 0; bi < N / 256; bi++)
                    for (int s = 0; s < 16; s++) {
                        int sum = 0;
                        for (int l = 0; l < 16; l++) sum += y[bi].q[16 * s + l];
                        assert_int_equal(y[bi].bsum16[s], sum);
                    }
            }
        }
    }
}

/* ---- 2 + 3. the dots ---------------------------------------------------------------------------- */

/* TOL_ROUND: the int8 dot's integer lanes are exact, and so (below 2^24) is their conversion to
   float; what rounds is d_w·d_x (2^-24 relative), each fma into a lane (2^-24 of the lane's
   running sum per block) and the final 7 additions. With nb blocks per row that is at most about
   (nb + 10)·2^-24 of S = Σ_i (|a_i| + |b_i|)·|xq_i|, where a_i − b_i is the weight (b the K-quant
   min term, 0 for other types; both parts are accumulated separately). We allow twice that. */
static double tol_round(int64_t nb, double S) { return 2.0 * ((double)nb + 10.0) * ldexp(1.0, -24) * S; }

/* a row of weights: quantized from gaussian data (kind 0), or random bytes with sane scales, so
   every code and every sub-block scale occurs (kind 1) */
static void make_weights(const ktype *kt, uint8_t *w, int64_t K, int kind) {
    const moe_type_traits *tt = type_traits(kt->id);
    int64_t nb = K / tt->block_elems;
    if (kind == 0) {
        float *f = malloc((size_t)K * sizeof *f);
        assert_non_null(f);
        for (int64_t i = 0; i < K; i++) f[i] = 0.02f * rng_normal();
        tt->quant(f, w, K);
        free(f);
        return;
    }
    for (int64_t i = 0; i < nb * tt->block_bytes; i++) w[i] = (uint8_t)rng_u64();
    for (int64_t b = 0; b < nb; b++) {
        uint8_t *p = w + b * tt->block_bytes;
        float d = (float)(0.001 * (0.5 + rng_u01()));
        switch (kt->id) {
        case MOE_TYPE_Q8_0: case MOE_TYPE_Q4_0: wr16(p, f32_to_fp16(d)); break;
        case MOE_TYPE_Q4_K: case MOE_TYPE_Q5_K: wr16(p, f32_to_fp16(d)); wr16(p + 2, f32_to_fp16(0.7f * d)); break;
        case MOE_TYPE_Q6_K: wr16(p + 208, f32_to_fp16(0.01f * d)); break;
        case MOE_TYPE_MXFP4: p[0] = (uint8_t)(118 + rng_u64() % 6); break;
        default: break;
        }
    }
}

/* S for tol_round: splits each weight into (d·sc)·q and the K-quant min term by dequantizing a
   copy whose codes are all zero (that copy holds −dmin·m) */
static void weight_parts(const ktype *kt, const uint8_t *w, int64_t K, float *deq, float *minpart) {
    const moe_type_traits *tt = type_traits(kt->id);
    tt->dequant(w, deq, K);
    memset(minpart, 0, (size_t)K * sizeof *minpart);
    if (kt->id == MOE_TYPE_Q4_K || kt->id == MOE_TYPE_Q5_K) {
        int64_t nb = K / QK_K, bb = tt->block_bytes;
        uint8_t *z = malloc((size_t)(nb * bb));
        assert_non_null(z);
        memcpy(z, w, (size_t)(nb * bb));
        for (int64_t b = 0; b < nb; b++) memset(z + b * bb + 16, 0, (size_t)(bb - 16));
        tt->dequant(z, minpart, K);
        free(z);
    }
}

static void check_type_dots(const ktype *kt, int64_t K, int wkind, double *worst_round, double *worst_act) {
    const moe_type_traits *tt = type_traits(kt->id);
    int64_t nb = K / tt->block_elems;
    uint8_t *w = malloc((size_t)(nb * tt->block_bytes));
    float *x = malloc(4 * (size_t)K * sizeof *x), *deq = malloc((size_t)K * sizeof *deq), *mp = malloc((size_t)K * sizeof *mp);
    size_t rb = q8_row_bytes(kt->fmt, K);
    uint8_t *xq = malloc(4 * rb);
    assert_true(w && x && deq && mp && xq);
    make_weights(kt, w, K, wkind);
    weight_parts(kt, w, K, deq, mp);
    for (int t = 0; t < 4; t++) {
        fill_row(x + t * K, K, t == 3 ? 1 : 0);
        (kt->fmt == Q8_K ? g_ref.quant_q8k : g_ref.quant_q8a)(x + t * K, xq + t * rb, K);
    }
    const void *xs[4] = {xq, xq + rb, xq + 2 * rb, xq + 3 * rb};
    q8_dot_fn ref = q8_kernel(&g_ref, kt->id), fast = q8_kernel(&g_fast, kt->id);
    float alone_ref[4], alone_fast[4];
    for (int t = 0; t < 4; t++) {
        ref(w, 0, 1, &xs[t], 1, nb, &alone_ref[t]);
        fast(w, 0, 1, &xs[t], 1, nb, &alone_fast[t]);
    }
    if (g_have_avx2 && !same_bits(alone_ref, alone_fast, 4)) {
        print_error("%s K=%lld: AVX2 %.9g %.9g %.9g %.9g vs portable %.9g %.9g %.9g %.9g\n", kt->name, (long long)K,
                    (double)alone_fast[0], (double)alone_fast[1], (double)alone_fast[2], (double)alone_fast[3],
                    (double)alone_ref[0], (double)alone_ref[1], (double)alone_ref[2], (double)alone_ref[3]);
        fail();
    }
    for (int nt = 2; nt <= 4; nt++) { /* blocked passes give every token its lone result */
        float o[4];
        ref(w, 0, 1, xs, nt, nb, o);
        assert_true(same_bits(o, alone_ref, nt));
        fast(w, 0, 1, xs, nt, nb, o);
        assert_true(same_bits(o, alone_fast, nt));
    }
    /* several rows per call (the AVX2 code runs them in 2-row tiles for 1 or 2 tokens): row r is
       a copy of w with its scales' fp16 bits nudged, so rows differ; each (row, token) must get
       its lone result */
    enum { NR = 5 };
    size_t rowb = (size_t)(nb * tt->block_bytes);
    uint8_t *rows = malloc(NR * rowb);
    assert_non_null(rows);
    for (int r = 0; r < NR; r++) {
        memcpy(rows + r * rowb, w, rowb);
        int at = kt->id == MOE_TYPE_Q6_K ? 208 : kt->id == MOE_TYPE_MXFP4 ? -1 : 0;
        for (int64_t b = 0; b < nb; b++) {
            uint8_t *p = rows + r * rowb + b * tt->block_bytes;
            if (at >= 0) wr16(p + at, (uint16_t)(rd16(p + at) + r));
            else p[0] = (uint8_t)(p[0] + (r & 1));
        }
    }
    for (int nt = 1; nt <= 4; nt++) {
        float o_ref[NR * 4], o_fast[NR * 4], one;
        ref(rows, rowb, NR, xs, nt, nb, o_ref);
        fast(rows, rowb, NR, xs, nt, nb, o_fast);
        for (int r = 0; r < NR; r++)
            for (int tk = 0; tk < nt; tk++) {
                ref(rows + r * rowb, 0, 1, &xs[tk], 1, nb, &one);
                assert_true(same_bits(&o_ref[r * nt + tk], &one, 1));
                fast(rows + r * rowb, 0, 1, &xs[tk], 1, nb, &one);
                assert_true(same_bits(&o_fast[r * nt + tk], &one, 1));
                if (g_have_avx2) assert_true(same_bits(&o_fast[r * nt + tk], &o_ref[r * nt + tk], 1));
            }
    }
    free(rows);
    for (int t = 0; t < 4; t++) {
        double dq = 0, dx = 0, S = 0, act_bound = 0;
        for (int64_t i = 0; i < K; i++) {
            double d, v = xq_at(kt->fmt, xq + t * rb, i, &d);
            dq += (double)deq[i] * v;
            dx += (double)deq[i] * x[t * K + i];
            S += (fabs((double)deq[i] - mp[i]) + fabs((double)mp[i])) * fabs(v);
            act_bound += fabs((double)deq[i]) * d * 0.50001;
        }
        double tr = tol_round(nb, S), e1 = fabs(alone_ref[t] - dq), e2 = fabs(alone_ref[t] - dx);
        if (e1 > tr || e2 > act_bound + tr) {
            print_error("%s K=%lld token %d: int8 dot %.9g, f64 with quantized x %.9g (|d| %.3g, tol %.3g), with original x "
                        "%.9g (|d| %.3g, bound %.3g)\n",
                        kt->name, (long long)K, t, (double)alone_ref[t], dq, e1, tr, dx, e2, act_bound + tr);
            fail();
        }
        if (S > 0) *worst_round = fmax(*worst_round, e1 / tr);
        double mag = 0;
        for (int64_t i = 0; i < K; i++) mag += fabs((double)deq[i] * x[t * K + i]);
        if (mag > 0) *worst_act = fmax(*worst_act, e2 / mag);
    }
    free(w);
    free(x);
    free(deq);
    free(mp);
    free(xq);
}

static void test_int8_dots(void **state) {
    (void)state;
    static const int64_t Ks[] = {256, 768, 2048, 4096};
    for (int i = 0; i < N_KTYPES; i++) {
        double worst_round = 0, worst_act = 0;
        for (int k = 0; k < 4; k++)
            for (int wkind = 0; wkind < 2; wkind++)
                for (int rep = 0; rep < 4; rep++) check_type_dots(&k_ktypes[i], Ks[k], wkind, &worst_round, &worst_act);
        printf("[ RESULT   ] %-5s int8 dot: error vs f64(quantized x) at most %.2f of TOL_ROUND; "
               "vs f64(original x) at most %.2e of Σ|w·x|\n",
               k_ktypes[i].name, worst_round, worst_act);
    }
}

/* ---- 4. saturation --------------------------------------------------------------------------------- */

/* weight blocks with every code at one extreme (hi = 1: the top code, 0: the bottom one) and
   every sub-block scale at its extreme */
static void extreme_block(int32_t type, uint8_t *p, int hi, int neg_scale) {
    switch (type) {
    case MOE_TYPE_Q8_0: wr16(p, f32_to_fp16(0.5f)); memset(p + 2, hi ? 0x7f : 0x80, 32); break;
    case MOE_TYPE_Q4_0: wr16(p, f32_to_fp16(0.5f)); memset(p + 2, hi ? 0xff : 0x00, 16); break;
    case MOE_TYPE_MXFP4: p[0] = 127; memset(p + 1, hi ? 0x77 : 0xff, 16); break;   /* 6 / −6 (12 / −12 doubled) */
    case MOE_TYPE_Q4_K: case MOE_TYPE_Q5_K: {
        int q5 = type == MOE_TYPE_Q5_K;
        wr16(p, f32_to_fp16(0.25f));
        wr16(p + 2, f32_to_fp16(0.125f));
        memset(p + 4, 0, 12);
        for (int s = 0; s < 8; s++) put_scale_min_k(p + 4, s, 63, 63);
        if (q5) memset(p + 16, hi ? 0xff : 0x00, 32);
        memset(p + (q5 ? 48 : 16), hi ? 0xff : 0x00, 128);
        break;
    }
    case MOE_TYPE_Q6_K:
        memset(p, hi ? 0xff : 0x00, 192);                     /* q = 63 or 0 (→ 31 or −32) */
        memset(p + 192, neg_scale ? 0x80 : 0x7f, 16);         /* scales −128 or 127 */
        wr16(p + 208, f32_to_fp16(0.5f));
        break;
    default: break;
    }
}

static void test_saturation(void **state) {
    (void)state;
    enum { K = 1024 };
    float x[K];
    for (int i = 0; i < N_KTYPES; i++) {
        const ktype *kt = &k_ktypes[i];
        const moe_type_traits *tt = type_traits(kt->id);
        int64_t nb = K / tt->block_elems;
        uint8_t *w = malloc((size_t)(nb * tt->block_bytes)), xq[K / 256 * sizeof(q8k_block)];
        float deq[K];
        assert_non_null(w);
        for (int hi = 0; hi < 2; hi++)
            for (int neg = 0; neg < 2; neg++)
                for (int xs = -1; xs <= 1; xs += 2) {
                    for (int64_t b = 0; b < nb; b++) extreme_block(kt->id, w + b * tt->block_bytes, hi, neg);
                    for (int j = 0; j < K; j++) x[j] = (float)xs * 3.0f;  /* every q = ±127, d = 3/127 */
                    (kt->fmt == Q8_K ? g_ref.quant_q8k : g_ref.quant_q8a)(x, xq, K);
                    tt->dequant(w, deq, K);
                    double exact = 0;
                    for (int j = 0; j < K; j++) {
                        double d, v = xq_at(kt->fmt, xq, j, &d);
                        exact += (double)deq[j] * v;
                    }
                    const void *xp[1] = {xq};
                    float r, f;
                    q8_kernel(&g_ref, kt->id)(w, 0, 1, xp, 1, nb, &r);
                    q8_kernel(&g_fast, kt->id)(w, 0, 1, xp, 1, nb, &f);
                    /* every term has the same sign here, so S = Σ|terms| ≈ |exact| (K-quants: the
                       min term has the other sign; 2·(|a|+|b|) bounds it) */
                    double S = 0;
                    for (int j = 0; j < K; j++) S += 4.0 * fabs((double)deq[j]) * 127.0 * (3.0 / 127.0);
                    if ((g_have_avx2 && memcmp(&r, &f, 4) != 0) || fabs(r - exact) > tol_round(nb, S)) {
                        print_error("%s extreme codes (hi %d, neg scale %d, x %+d·127): portable %.9g, AVX2 %.9g, exact %.9g\n",
                                    kt->name, hi, neg, xs, (double)r, (double)f, exact);
                        fail();
                    }
                }
        free(w);
    }
}

/* ---- 5. f32 dot_n --------------------------------------------------------------------------------- */

static void test_dot_n(void **state) {
    (void)state;
    static const int64_t ns[] = {8, 13, 256, 777, 2048};
    for (int k = 0; k < 5; k++) {
        int64_t n = ns[k];
        float *w = malloc((size_t)n * sizeof *w), *x = malloc(4 * (size_t)n * sizeof *x);
        assert_true(w && x);
        for (int64_t i = 0; i < n; i++) w[i] = rng_normal();
        for (int64_t i = 0; i < 4 * n; i++) x[i] = rng_normal();
        const float *xs[4] = {x, x + n, x + 2 * n, x + 3 * n};
        for (int nt = 1; nt <= 4; nt++) {
            float o[4], r[4];
            g_fast.dot_n(w, xs, nt, n, o);
            g_ref.dot_n(w, xs, nt, n, r);
            for (int t = 0; t < nt; t++) {
                float a = g_fast.dot(w, xs[t], n), b = g_ref.dot(w, xs[t], n);
                assert_true(memcmp(&o[t], &a, 4) == 0);
                assert_true(memcmp(&r[t], &b, 4) == 0);
            }
        }
        free(w);
        free(x);
    }
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_quantize_activations),
        cmocka_unit_test(test_int8_dots),
        cmocka_unit_test(test_saturation),
        cmocka_unit_test(test_dot_n),
    };
    return tu_run_tests_with("cpu_kernels", tests, setup, NULL);
}
