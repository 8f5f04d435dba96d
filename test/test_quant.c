/* test_quant.c — the quant block codecs of moe.c section 3 (F32, F16, BF16, Q8_0, Q4_0, Q4_K,
   Q5_K, Q6_K, MXFP4), checked against an independent NumPy implementation (gen/quants.py, whose
   vectors gen/make_codec_vectors.py writes to test/fixtures/codecs/<type>.bin) and against
   properties that follow from the formats themselves.

   1. dequant of NumPy's blocks is bit-exact with NumPy's dequant (ggml's operation order);
   2. C quant → C dequant stays within a per-type error bound and within 1.25× NumPy's own
      quantization error on the same input;
   3. row_dot over NumPy's blocks equals the float64 dot within 1e-5·Σ|w·x|;
   4. f16 / bf16 conversions at their edges (subnormals, ties, inf/NaN, overflow);
   5. all-zero blocks and blocks with one outlier.

   Run from the repository root (the fixtures are read from test/fixtures/codecs). */
#include "../moe.c"
#include "../moe_vk.c"
#include "../shaders_embedded.c"

#include "test_util.h"

/* ---- helpers --------------------------------------------------------------------------------- */

static uint32_t f2u(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
static float u2f(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

/* deterministic N(0,1) samples: xorshift64* + Box–Muller */
static uint64_t g_rng = 0x9e3779b97f4a7c15ull;
static double rng_u01(void) {
    g_rng ^= g_rng >> 12; g_rng ^= g_rng << 25; g_rng ^= g_rng >> 27;
    return ((g_rng * 0x2545f4914f6cdd1dull) >> 11) * (1.0 / 9007199254740992.0);
}
static float rng_normal(void) {
    double u = rng_u01(), v = rng_u01();
    if (u < 1e-300) u = 1e-300;
    return (float)(sqrt(-2.0 * log(u)) * cos(6.283185307179586 * v));
}

static double rms(const float *a, int64_t n) {
    double s = 0;
    for (int64_t i = 0; i < n; i++) s += (double)a[i] * a[i];
    return sqrt(s / (double)n);
}
static double rms_diff(const float *a, const float *b, int64_t n) {
    double s = 0;
    for (int64_t i = 0; i < n; i++) { double d = (double)a[i] - b[i]; s += d * d; }
    return sqrt(s / (double)n);
}

/* The nine types, with the file names make_codec_vectors.py uses and the round-trip bound:
   RMSE / RMS(input) on N(0,1) data, from the format's step size. A uniform quantizer with step Δ
   leaves a rounding error of RMS Δ/√12; a 32-element gaussian group spans about ±2.2σ, so
   Δ ≈ 4.4σ/(levels − 1). Estimate, then what C and gen/quants.py measure, then the bound:
     f16   relative rounding 2^−11 (uniform in the significand)   ≈ 2.1e-4  C 2.1e-4        3.5e-4
     bf16  relative rounding 2^−8                                  ≈ 1.7e-3  C 1.7e-3        2.8e-3
     q8_0  255 levels over ±amax             4.4/254/√12           ≈ 0.50%   C 0.54% np 0.54%  0.6%
     q6_K  64 levels, 16-element groups, int8 group scales         ≈ 1.8%    C 1.74% np 1.74%  2.2%
     q5_K  32 levels + a min per 32, 6-bit scales  4.1/31/√12      ≈ 3.8%    C 3.59% np 3.59%  4.0%
     q4_K  16 levels + a min per 32                4.1/15/√12      ≈ 7.9%    C 7.17% np 7.17%  8.0%
     q4_0  16 levels, symmetric, per 32            4.4/15/√12      ≈ 8.5%    C 8.10% np 8.65%  9.0%
     mxfp4 E2M1 magnitudes {0,.5,1,1.5,2,3,4,6}·2^k: the bulk (|x| < σ) sees 0.5-unit steps, the
           tail 1–2-unit steps, with a unit ≈ amax/5 ≈ 0.45σ                ≈ 10%    C 11.2% np 11.2% 12%
   (The searches in the K-quants and Q4_0 trim the group extremes, which is why they land under
   the plain estimate. The brief's "Q4_K ≲ 4%" is what Q5_K reaches: 4 bits over a 32-element
   gaussian group cannot go below ≈ 7%, for NumPy's quantizer as for ours.) */
typedef struct qtype {
    int32_t id;
    const char *file;
    double bound;
} qtype;

static const qtype k_types[] = {
    {MOE_TYPE_F32, "f32", 0.0},       {MOE_TYPE_F16, "f16", 3.5e-4},
    {MOE_TYPE_BF16, "bf16", 2.8e-3},  {MOE_TYPE_Q8_0, "q8_0", 0.006},
    {MOE_TYPE_Q4_0, "q4_0", 0.090},   {MOE_TYPE_Q4_K, "q4_k", 0.080},
    {MOE_TYPE_Q5_K, "q5_k", 0.040},   {MOE_TYPE_Q6_K, "q6_k", 0.022},
    {MOE_TYPE_MXFP4, "mxfp4", 0.120},
};
#define N_TYPES ((int)(sizeof k_types / sizeof k_types[0]))

/* ---- fixtures -------------------------------------------------------------------------------- */

typedef struct fixture {
    uint8_t *file;
    int32_t type;
    int64_t n;
    const float *input, *dequant, *x;
    const uint8_t *blocks;
    size_t block_bytes;
    double dot;
} fixture;

/* Aligned copies are made of the float arrays (the file's offsets are not 4-aligned for every
   type), so the struct owns four allocations. */
static float *copy_f32(const uint8_t *p, int64_t n) {
    float *f = malloc((size_t)n * 4);
    memcpy(f, p, (size_t)n * 4);
    return f;
}

static int fixture_load(const qtype *t, fixture *fx) {
    char path[256];
    snprintf(path, sizeof path, "test/fixtures/codecs/%s.bin", t->file);
    size_t size = 0;
    uint8_t *buf = tu_read_file(path, &size);
    if (!buf) { print_error("missing fixture %s (run gen/make_codec_vectors.py)\n", path); return 0; }
    uint32_t hdr[3];
    if (size < 12) goto bad;
    memcpy(hdr, buf, 12);
    if (hdr[0] != 0x5643514du || (int32_t)hdr[1] != t->id) goto bad;
    const moe_type_traits *tt = type_traits(t->id);
    int64_t n = hdr[2];
    uint64_t rb = type_row_bytes(t->id, n);
    if (!tt || !rb || size != 12 + (size_t)n * 12 + rb + 8) goto bad;
    const uint8_t *p = buf + 12;
    fx->file = buf;
    fx->type = t->id;
    fx->n = n;
    fx->input = copy_f32(p, n);
    p += n * 4;
    fx->blocks = p;
    fx->block_bytes = (size_t)rb;
    p += rb;
    fx->dequant = copy_f32(p, n);
    p += n * 4;
    fx->x = copy_f32(p, n);
    p += n * 4;
    memcpy(&fx->dot, p, 8);
    return 1;
bad:
    print_error("malformed fixture %s\n", path);
    free(buf);
    return 0;
}

static void fixture_free(fixture *fx) {
    free((void *)fx->input);
    free((void *)fx->dequant);
    free((void *)fx->x);
    free(fx->file);
}

/* ---- 0. the table ---------------------------------------------------------------------------- */

static void test_traits_table(void **state) {
    (void)state;
    static const struct { int32_t id; const char *name; int32_t elems, bytes; } want[] = {
        {0, "f32", 1, 4},        {1, "f16", 1, 2},       {2, "q4_0", 32, 18},
        {8, "q8_0", 32, 34},     {12, "q4_K", 256, 144}, {13, "q5_K", 256, 176},
        {14, "q6_K", 256, 210},  {30, "bf16", 1, 2},     {39, "mxfp4", 32, 17},
    };
    for (size_t i = 0; i < sizeof want / sizeof want[0]; i++) {
        const moe_type_traits *tt = type_traits(want[i].id);
        assert_non_null(tt);
        assert_string_equal(tt->name, want[i].name);
        assert_int_equal(tt->block_elems, want[i].elems);
        assert_int_equal(tt->block_bytes, want[i].bytes);
        assert_non_null(tt->dequant);
        assert_non_null(tt->quant);
        assert_int_equal(type_row_bytes(want[i].id, 4096), 4096 / want[i].elems * want[i].bytes);
    }
    assert_null(type_traits(3));  /* Q4_1: not supported */
    assert_null(type_traits(10)); /* Q2_K */
    assert_int_equal(type_row_bytes(MOE_TYPE_Q4_K, 128), 0);
}

/* ---- 1. bit-exact dequant of NumPy's blocks --------------------------------------------------- */

static void test_fixture_dequant_bitexact(void **state) {
    (void)state;
    for (int t = 0; t < N_TYPES; t++) {
        fixture fx;
        assert_true(fixture_load(&k_types[t], &fx));
        const moe_type_traits *tt = type_traits(fx.type);
        float *y = malloc((size_t)fx.n * 4);
        tt->dequant(fx.blocks, y, fx.n);
        int64_t bad = 0, first = -1;
        for (int64_t i = 0; i < fx.n; i++)
            if (f2u(y[i]) != f2u(fx.dequant[i])) { if (first < 0) first = i; bad++; }
        if (bad)
            print_error("%s: %lld of %lld values differ; first at %lld: C %.9g (0x%08x) numpy %.9g "
                        "(0x%08x)\n", tt->name, (long long)bad, (long long)fx.n, (long long)first,
                        y[first], f2u(y[first]), fx.dequant[first], f2u(fx.dequant[first]));
        assert_int_equal(bad, 0);
        free(y);
        fixture_free(&fx);
    }
}

/* ---- 2. C quant → C dequant error, against NumPy's and per-type bounds ------------------------- */

/* On the fixture input (12 super-blocks of deliberately different character: outliers, zeros,
   tiny and huge values, constants, ramps), the C round trip must be within 1.25× NumPy's own
   round-trip error overall, and within 1.25× (+ a 1e-6 relative floor for blocks NumPy gets
   exact) on every 256-element super-block. No value may come back non-finite. */
static void test_fixture_roundtrip_vs_numpy(void **state) {
    (void)state;
    for (int t = 0; t < N_TYPES; t++) {
        fixture fx;
        assert_true(fixture_load(&k_types[t], &fx));
        const moe_type_traits *tt = type_traits(fx.type);
        uint8_t *q = malloc(fx.block_bytes);
        float *y = malloc((size_t)fx.n * 4);
        tt->quant(fx.input, q, fx.n);
        tt->dequant(q, y, fx.n);
        for (int64_t i = 0; i < fx.n; i++) assert_true(isfinite(y[i]));
        double in_rms = rms(fx.input, fx.n);
        double c_err = rms_diff(y, fx.input, fx.n), np_err = rms_diff(fx.dequant, fx.input, fx.n);
        print_message("  %-6s rel RMSE  C %.4e  numpy %.4e  (ratio %.3f)\n", tt->name,
                      c_err / in_rms, np_err / in_rms, np_err > 0 ? c_err / np_err : 1.0);
        assert_true(c_err <= 1.25 * np_err + 1e-12 * in_rms);
        for (int64_t b = 0; b < fx.n / 256; b++) {
            const float *xi = fx.input + 256 * b;
            double cb = rms_diff(y + 256 * b, xi, 256), nb = rms_diff(fx.dequant + 256 * b, xi, 256);
            double floor_ = 1e-6 * rms(xi, 256);
            if (!(cb <= 1.25 * nb + floor_))
                print_error("%s super-block %lld: C err %.4e vs numpy %.4e (block rms %.4e)\n",
                            tt->name, (long long)b, cb, nb, rms(xi, 256));
            assert_true(cb <= 1.25 * nb + floor_);
        }
        free(q);
        free(y);
        fixture_free(&fx);
    }
}

/* On N(0,1) data (the shape of trained weight matrices, minus their tails) the relative RMSE must
   stay under the bound in k_types, which follows from each format's bit width (see above). */
static void test_gaussian_roundtrip_bounds(void **state) {
    (void)state;
    const int64_t n = 256 * 256;
    float *in = malloc((size_t)n * 4), *y = malloc((size_t)n * 4);
    uint8_t *q = malloc((size_t)n * 4);
    g_rng = 0x1234567887654321ull;
    for (int64_t i = 0; i < n; i++) in[i] = rng_normal();
    for (int t = 0; t < N_TYPES; t++) {
        const moe_type_traits *tt = type_traits(k_types[t].id);
        tt->quant(in, q, n);
        tt->dequant(q, y, n);
        double rel = rms_diff(y, in, n) / rms(in, n);
        print_message("  %-6s N(0,1) rel RMSE %.4e  (bound %.4e)\n", tt->name, rel, k_types[t].bound);
        assert_true(rel <= k_types[t].bound);
    }
    free(in);
    free(y);
    free(q);
}

/* ---- 3. row_dot over NumPy's blocks ----------------------------------------------------------- */

static void test_fixture_row_dot(void **state) {
    (void)state;
    for (int t = 0; t < N_TYPES; t++) {
        fixture fx;
        assert_true(fixture_load(&k_types[t], &fx));
        const moe_type_traits *tt = type_traits(fx.type);
        double abs_sum = 0;
        for (int64_t i = 0; i < fx.n; i++) abs_sum += fabs((double)fx.dequant[i] * fx.x[i]);
        float got = row_dot(tt, fx.blocks, fx.x, fx.n);
        double tol = 1e-5 * abs_sum;
        if (!(fabs((double)got - fx.dot) <= tol))
            print_error("%s: row_dot %.9g vs f64 %.9g (tol %.3g)\n", tt->name, got, fx.dot, tol);
        assert_true(fabs((double)got - fx.dot) <= tol);
        /* and the same through dot_f32 on a dequantized row (the prefill path): bit-identical */
        float *w = malloc((size_t)fx.n * 4);
        tt->dequant(fx.blocks, w, fx.n);
        assert_int_equal(f2u(dot_f32(w, fx.x, fx.n)), f2u(got));
        free(w);
        fixture_free(&fx);
    }
}

/* ---- 4. f16 / bf16 conversions ---------------------------------------------------------------- */

/* Reference f32 → f16 in double arithmetic: the nearest representable half, ties to even,
   overflow (≥ 65520) to inf. Returns the value (inf included); NaN is handled by the caller. */
static double ref_half_value(float f) {
    double a = fabs((double)f);
    if (a >= 65520.0) return copysign(INFINITY, f);
    int e = -14, ex;
    if (a > 0) { frexp(a, &ex); e = ex - 1; } /* a in [2^e, 2^(e+1)) */
    if (e < -14) e = -14;                       /* subnormal spacing 2^-24 below 2^-14 */
    double ulp = ldexp(1.0, e - 10), k = a / ulp, r = floor(k), frac = k - r;
    if (frac > 0.5 || (frac == 0.5 && fmod(r, 2.0) != 0)) r += 1;
    return copysign(r * ulp, f);
}

static void test_fp16_edges(void **state) {
    (void)state;
    static const struct { uint32_t f; uint16_t h; } cases[] = {
        {0x00000000u, 0x0000}, {0x80000000u, 0x8000}, /* ±0 */
        {0x3f800000u, 0x3c00}, {0xc0000000u, 0xc000}, /* 1, −2 */
        {0x477fe000u, 0x7bff},                        /* 65504, the largest half */
        {0x477fefffu, 0x7bff},                        /* just under the 65520 midpoint */
        {0x477ff000u, 0x7c00},                        /* 65520: tie, 0x7bff is odd → inf */
        {0x501502f9u, 0x7c00}, {0xd01502f9u, 0xfc00}, /* ±1e10 overflow */
        {0x7f800000u, 0x7c00}, {0xff800000u, 0xfc00}, /* ±inf */
        {0x33800000u, 0x0001},                        /* 2^-24, the smallest subnormal */
        {0x33000000u, 0x0000},                        /* 2^-25: tie with 0 → even (0) */
        {0x33000001u, 0x0001},                        /* just above → rounds up */
        {0xb3000000u, 0x8000},                        /* −2^-25 → −0 */
        {0x33c00000u, 0x0002},                        /* 3·2^-25: tie 1|2 → 2 */
        {0x34200000u, 0x0002},                        /* 5·2^-25: tie 2|3 → 2 */
        {0x387fc000u, 0x03ff},                        /* the largest subnormal */
        {0x387fe000u, 0x0400},                        /* tie 0x3ff|0x400 → 0x400 (min normal) */
        {0x38800000u, 0x0400},                        /* 2^-14 */
        {0x3f801000u, 0x3c00},                        /* 1 + 2^-11: tie → 1 */
        {0x3f803000u, 0x3c02},                        /* 1 + 3·2^-11: tie → 0x3c02 */
        {0x3f801001u, 0x3c01},                        /* just above the tie */
        {0x45001000u, 0x6800},                        /* 2049: tie 2048|2050 → 2048 */
        {0x45003000u, 0x6802},                        /* 2051: tie 2050|2052 → 2052 */
        {0x00000001u, 0x0000}, {0x80000001u, 0x8000}, /* f32 subnormals → ±0 */
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        uint16_t h = f32_to_fp16(u2f(cases[i].f));
        if (h != cases[i].h) print_error("f32 0x%08x → 0x%04x, want 0x%04x\n", cases[i].f, h, cases[i].h);
        assert_int_equal(h, cases[i].h);
    }
    /* NaN stays NaN (quiet), keeps its sign */
    uint16_t hn = f32_to_fp16(u2f(0x7fc00000u)), hs = f32_to_fp16(u2f(0xff800001u));
    assert_true((hn & 0x7c00) == 0x7c00 && (hn & 0x3ff) && !(hn & 0x8000));
    assert_true((hs & 0x7c00) == 0x7c00 && (hs & 0x3ff) && (hs & 0x8000));

    /* decode every half, against ldexp; re-encoding every non-NaN half gives it back */
    for (uint32_t h = 0; h < 65536; h++) {
        uint32_t e = h >> 10 & 31, m = h & 1023;
        float f = fp16_to_f32((uint16_t)h);
        if (e == 31) {
            assert_true(m ? isnan(f) : isinf(f));
            assert_int_equal(signbit(f) != 0, (h & 0x8000) != 0);
            if (m) continue;
        } else {
            double v = e ? ldexp(1024.0 + m, (int)e - 25) : ldexp((double)m, -24);
            if (h & 0x8000) v = -v;
            assert_int_equal(f2u(f), f2u((float)v));
        }
        assert_int_equal(f32_to_fp16(f), h);
    }

    /* random floats over the whole half range and a bit past it, against the double reference */
    g_rng = 42;
    for (int i = 0; i < 1000000; i++) {
        uint32_t u = (uint32_t)(rng_u01() * 4294967296.0);
        /* exponents 2^-27 .. 2^17: subnormal, normal and overflow halves */
        u = (u & 0x807fffffu) | (uint32_t)(100 + (u >> 23) % 44) << 23;
        float f = u2f(u);
        double want = ref_half_value(f);
        float got = fp16_to_f32(f32_to_fp16(f));
        if ((double)got != want) print_error("f32 %.9g (0x%08x) → %.9g, want %.9g\n", f, u, got, want);
        assert_true((double)got == want);
    }
}

static void test_bf16_edges(void **state) {
    (void)state;
    static const struct { uint32_t f; uint16_t h; } cases[] = {
        {0x00000000u, 0x0000}, {0x80000000u, 0x8000}, {0x3f800000u, 0x3f80},
        {0x3f808000u, 0x3f80}, /* 1 + 2^-8: tie → even (1) */
        {0x3f818000u, 0x3f82}, /* 1 + 3·2^-8: tie → 0x3f82 */
        {0x3f808001u, 0x3f81}, /* just above the tie */
        {0x7f7f7fffu, 0x7f7f}, /* below the last midpoint */
        {0x7f7f8000u, 0x7f80}, /* tie at the top, 0x7f7f odd → inf */
        {0x7f7fffffu, 0x7f80}, /* FLT_MAX overflows to inf */
        {0xff7fffffu, 0xff80},
        {0x7f800000u, 0x7f80}, {0xff800000u, 0xff80},
        {0x00000001u, 0x0000}, /* f32 subnormals keep their top bits */
        {0x00008000u, 0x0000}, /* tie → even */
        {0x00018000u, 0x0002}, /* tie → even */
        {0x00010000u, 0x0001},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        uint16_t h = f32_to_bf16(u2f(cases[i].f));
        if (h != cases[i].h) print_error("f32 0x%08x → bf16 0x%04x, want 0x%04x\n", cases[i].f, h, cases[i].h);
        assert_int_equal(h, cases[i].h);
    }
    /* NaNs stay NaN, including the signalling one whose payload sits only in the low bits */
    const uint32_t nans[] = {0x7fc00000u, 0x7f800001u, 0xff800001u, 0x7fffffffu};
    for (size_t i = 0; i < 4; i++) {
        uint16_t h = f32_to_bf16(u2f(nans[i]));
        assert_true(isnan(bf16_to_f32(h)));
        assert_int_equal(h >> 15, nans[i] >> 31);
    }
    for (uint32_t h = 0; h < 65536; h++) {
        float f = bf16_to_f32((uint16_t)h);
        assert_int_equal(f2u(f), h << 16);
        if (!isnan(f)) assert_int_equal(f32_to_bf16(f), h);
    }
}

/* ---- 5. zero blocks and outliers -------------------------------------------------------------- */

static void test_zero_blocks(void **state) {
    (void)state;
    const int64_t n = 512;
    float in[512], y[512];
    uint8_t q[2048];
    memset(in, 0, sizeof in);
    in[300] = -0.0f;
    for (int t = 0; t < N_TYPES; t++) {
        const moe_type_traits *tt = type_traits(k_types[t].id);
        memset(q, 0xa5, sizeof q);
        tt->quant(in, q, n);
        tt->dequant(q, y, n);
        for (int64_t i = 0; i < n; i++) {
            if (y[i] != 0.0f) print_error("%s: zero input → %g at %lld\n", tt->name, y[i], (long long)i);
            assert_true(y[i] == 0.0f);
        }
    }
    /* a zero block beside a large one stays zero; so does a zero sub-block inside a K-quant block */
    float in2[512];
    g_rng = 7;
    for (int i = 0; i < 512; i++) in2[i] = i < 256 ? 0.0f : 100.0f * rng_normal();
    for (int i = 256 + 64; i < 256 + 96; i++) in2[i] = 0.0f;
    for (int t = 0; t < N_TYPES; t++) {
        const moe_type_traits *tt = type_traits(k_types[t].id);
        tt->quant(in2, q, n);
        tt->dequant(q, y, n);
        for (int i = 0; i < 256; i++) assert_true(y[i] == 0.0f);
        for (int i = 256; i < 512; i++) assert_true(isfinite(y[i]));
        /* every format has its own scale (and min) per 32 or fewer elements: those are 0 too */
        for (int i = 256 + 64; i < 256 + 96; i++) assert_true(y[i] == 0.0f || k_types[t].id <= 1 ||
                                                             k_types[t].id == MOE_TYPE_BF16);
    }
}

/* One large value among small ones: it must come back close (its group's scale is set by it),
   everything stays finite, and the block's error stays within half a step of the outlier's
   scale. rel[] is the allowed relative error on the outlier: fp16/bf16 rounding, the scale's
   fp16 rounding for the integer formats (the outlier sits on a code), and E2M1's coarsest
   relative step for MXFP4. */
static void test_outlier_blocks(void **state) {
    (void)state;
    const int64_t n = 256;
    float in[256], y[256];
    uint8_t q[1024];
    /* per type: relative error allowed on the outlier, and on the block (RMSE / outlier) */
    static const double rel_out[] = {0, 1e-3, 4e-3, 2e-3, 2e-3, 0.035, 0.02, 0.01, 0.15};
    static const double rel_blk[] = {0, 1e-4, 1e-3, 4e-3, 0.04, 0.04, 0.02, 0.01, 0.08};
    const float outliers[] = {50.0f, -50.0f, 6.0e4f, -3.0e-3f};
    g_rng = 99;
    for (size_t o = 0; o < sizeof outliers / sizeof outliers[0]; o++)
        for (int pos = 0; pos < 256; pos += 37) {
            float big = outliers[o];
            for (int i = 0; i < 256; i++) in[i] = fabsf(big) * 1e-3f * rng_normal();
            in[pos] = big;
            for (int t = 0; t < N_TYPES; t++) {
                const moe_type_traits *tt = type_traits(k_types[t].id);
                tt->quant(in, q, n);
                tt->dequant(q, y, n);
                for (int i = 0; i < 256; i++) assert_true(isfinite(y[i]));
                double eo = fabs((double)y[pos] - big) / fabs(big);
                double eb = rms_diff(y, in, n) / fabs(big);
                if (eo > rel_out[t] || eb > rel_blk[t])
                    print_error("%s outlier %g at %d: outlier rel err %.3e (max %.3e), block %.3e "
                                "(max %.3e)\n", tt->name, big, pos, eo, rel_out[t], eb, rel_blk[t]);
                assert_true(eo <= rel_out[t]);
                assert_true(eb <= rel_blk[t]);
            }
        }
}

/* Large inputs must not overflow the fp16 scales into inf: the scale saturates at 65504 instead
   (Q8_0's d = amax/127 passes 65504 near 8.3e6, Q4_0's d = amax/8 near 5.2e5); what comes back is
   clipped but finite. */
static void test_huge_values_stay_finite(void **state) {
    (void)state;
    float in[256], y[256];
    uint8_t q[1024];
    g_rng = 5;
    for (int i = 0; i < 256; i++) in[i] = 1e7f * rng_normal();
    for (int t = 1; t < N_TYPES; t++) {
        const moe_type_traits *tt = type_traits(k_types[t].id);
        if (k_types[t].id == MOE_TYPE_F16) continue; /* f16 itself overflows by definition */
        tt->quant(in, q, 256);
        tt->dequant(q, y, 256);
        for (int i = 0; i < 256; i++) assert_true(isfinite(y[i]));
    }
}

/* ---- format details the fixtures might not reach ---------------------------------------------- */

/* MXFP4's scale byte: e = 0 and 1 are subnormal floats, e = 254 and 255 the top normals; every
   code times every scale is exact (kvalues have at most 2 significant bits). */
static void test_mxfp4_scale_byte(void **state) {
    (void)state;
    uint8_t blk[17];
    float y[32];
    for (int e = 0; e < 256; e++) {
        blk[0] = (uint8_t)e;
        for (int j = 0; j < 16; j++) blk[1 + j] = (uint8_t)(j | (15 - j) << 4);
        dequant_mxfp4(blk, y, 32);
        for (int j = 0; j < 32; j++) {
            int code = j < 16 ? j : 15 - (j - 16);
            double want = (double)k_mxfp4_values[code] * ldexp(1.0, e - 128);
            assert_true((double)y[j] == (float)want || (isinf(y[j]) && fabs(want) > 3.4e38));
        }
    }
    /* quant picks e ≤ 254 even for the largest floats, and the result is finite */
    float in[32];
    uint8_t q[17];
    for (int j = 0; j < 32; j++) in[j] = (j & 1 ? -1.0f : 1.0f) * 3.0e38f * (float)(j + 1) / 32.0f;
    quant_mxfp4(in, q, 32);
    dequant_mxfp4(q, y, 32);
    assert_true(q[0] <= 254);
    for (int j = 0; j < 32; j++) assert_true(isfinite(y[j]));
}

/* Hand-built K-quant blocks: one sub-block at a time gets scale 1 and min 0 with q = position,
   so a wrong nibble / bit / scale-unpacking order shows up as a wrong element index. */
static void test_kquant_layout_by_hand(void **state) {
    (void)state;
    float y[256];
    for (int s = 0; s < 8; s++) {
        uint8_t b4[144] = {0}, b5[176] = {0};
        wr16(b4, f32_to_fp16(1.0f));
        wr16(b5, f32_to_fp16(1.0f));
        put_scale_min_k(b4 + 4, s, 1, 0);
        put_scale_min_k(b5 + 4, s, 1, 0);
        for (int k = 0; k < 8; k++) {
            uint8_t d, m;
            get_scale_min_k(b4 + 4, k, &d, &m);
            assert_int_equal(d, k == s);
            assert_int_equal(m, 0);
        }
        int g = s / 2, hi = s & 1;
        for (int l = 0; l < 32; l++) {
            b4[16 + 32 * g + l] = (uint8_t)((l & 15) << (4 * hi));
            b5[48 + 32 * g + l] = (uint8_t)((l & 15) << (4 * hi));
            if (l & 16) b5[16 + l] |= (uint8_t)(1 << s);
        }
        dequant_q4_k(b4, y, 256);
        for (int i = 0; i < 256; i++) assert_true(y[i] == (i / 32 == s ? (float)(i % 16) : 0.0f));
        dequant_q5_k(b5, y, 256);
        for (int i = 0; i < 256; i++) assert_true(y[i] == (i / 32 == s ? (float)(i % 32) : 0.0f));
    }
    /* all 6-bit values survive the 12-byte packing */
    uint8_t sc[12] = {0};
    for (int s = 0; s < 8; s++) put_scale_min_k(sc, s, (uint8_t)(63 - 5 * s), (uint8_t)(7 * s + 1));
    for (int s = 0; s < 8; s++) {
        uint8_t d, m;
        get_scale_min_k(sc, s, &d, &m);
        assert_int_equal(d, 63 - 5 * s);
        assert_int_equal(m, 7 * s + 1);
    }
    /* Q6_K: element i gets q − 32 = (i % 64) − 32 with scale 1 on sub-block i/16, d = 1 */
    uint8_t b6[210] = {0};
    uint8_t L[256];
    for (int i = 0; i < 256; i++) L[i] = (uint8_t)(i % 64);
    for (int h = 0; h < 2; h++)
        for (int l = 0; l < 32; l++) {
            const uint8_t *Lh = L + 128 * h;
            b6[64 * h + l] = (uint8_t)((Lh[l] & 15) | (Lh[l + 64] & 15) << 4);
            b6[64 * h + l + 32] = (uint8_t)((Lh[l + 32] & 15) | (Lh[l + 96] & 15) << 4);
            b6[128 + 32 * h + l] = (uint8_t)(Lh[l] >> 4 | (Lh[l + 32] >> 4) << 2 |
                                             (Lh[l + 64] >> 4) << 4 | (Lh[l + 96] >> 4) << 6);
        }
    for (int k = 0; k < 16; k++) b6[192 + k] = (uint8_t)(int8_t)(k - 8);
    wr16(b6 + 208, f32_to_fp16(0.5f));
    dequant_q6_k(b6, y, 256);
    for (int i = 0; i < 256; i++) assert_true(y[i] == 0.5f * (float)(i / 16 - 8) * (float)(i % 64 - 32));
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_traits_table),
        cmocka_unit_test(test_fixture_dequant_bitexact),
        cmocka_unit_test(test_fixture_roundtrip_vs_numpy),
        cmocka_unit_test(test_gaussian_roundtrip_bounds),
        cmocka_unit_test(test_fixture_row_dot),
        cmocka_unit_test(test_fp16_edges),
        cmocka_unit_test(test_bf16_edges),
        cmocka_unit_test(test_zero_blocks),
        cmocka_unit_test(test_outlier_blocks),
        cmocka_unit_test(test_huge_values_stay_finite),
        cmocka_unit_test(test_mxfp4_scale_byte),
        cmocka_unit_test(test_kquant_layout_by_hand),
    };
    return tu_run_tests("quant", tests);
}
