/* test_gemma4 — Gemma 4 (ARCHITECTURES.md §2) against Hugging Face transformers, on the CPU
   backend (exact mode) and on Vulkan (lavapipe in CI), through the public API.

   Fixtures (gen/make_fixtures_gemma4.py): test/fixtures/gemma4/NAME/ is
   a Hugging Face directory (config.json of the multimodal checkpoint with the text tower in
   text_config, bf16 model.safetensors under the real tensor names, plus a few vision tensors
   the loader must skip); NAME.ref holds reference logits for all 64 positions and a
   32-token greedy continuation of the first 40; NAME.json what the generator measured, among it
   the error an ideal engine with an f16 KV cache has against the reference.
   THE COMMITTED .ref FILES come from the script's independent float64 NumPy implementation of
   ARCHITECTURES.md §2.3-2.5 (--numpy-only): the GPU machine, where the script also runs
   transformers' Gemma4ForConditionalGeneration on the same weights and asserts the two agree,
   gave no time in the session that made them. Regenerating there replaces them with
   transformers' float32 logits.
     moe       26B-A4B-like: sliding + full layers (window 8, so the 64 tokens are 8 windows),
               K = V on full layers, proportional rope, 8 experts top-2 beside the dense MLP,
               router and per-expert scales, layer scalars, an active logit softcap
     e2b       E2B-like dense: per-layer embeddings, KV sharing, double-wide MLP on shared layers
     dense31b  31B-like dense: K = V, no PLE

   Per fixture and backend:
   (a) logits_all prefill, f32 KV: every row within TOL_F32 (1e-4 of the row's range: float32
       rounding only, see test_forward.c for the budget) of the reference; f16 KV within
       max(TOL_F16, 1.25 × the fixture's own f16 figure): rounding K and V to binary16 moves
       these logits by that much in the generator's float32 simulation too (scale-1 attention
       over RMS-normed q and k is sharp), so an exact engine cannot do better. Vulkan runs with
       gpu_exact = 1 for these bounds; then once more in its default mode where that runs
       prefill matrix products on f16 tensor cores (NVIDIA): the activations are rounded to 11
       bits as well, and the f16 tolerance (at least test_vulkan.c's TOL_CM) holds for both;
   (b) no NaN / Inf (f16 KV, positions to 8 windows);
   (c) greedy continuation equal to the reference's, token for token;
   (d) CPU, bit for bit: single steps == prefill == prefill in chunks of 3 and 5 (the window
       wraps around the ring many times);
   (e) CPU, bit for bit: rewind to 6 earlier positions (within the ring's slack and far beyond
       it, which recomputes from the token history), then re-feeding the same tokens;
   (f) CPU, bit for bit: save at a position past the window, load into a fresh context, continue;
   (g) GGUF: moe_model_save of the loaded model, reloaded, gives the same logits bit for bit;
       the file has llama.cpp's gemma4 keys and tensor names;
   (h) a gemma4 GGUF missing a tensor, or with one of a wrong shape, fails with MOE_ERR_FORMAT
       naming it. */
#include "../moe.c"
#include "../moe_vk.c"
#include "../shaders_embedded.c"
#include "test_util.h"

#define TOL_F32 1e-4
#define TOL_F16 2e-3
#define TOL_CM 3e-3 /* f16 tensor-core prefill: as test_vulkan.c */
#define FIX "test/fixtures/gemma4/"

static const char *const k_fixtures[] = {"moe", "e2b", "dense31b"};

static int require_vulkan(void) { return vk_env_on("MOE_REQUIRE_VULKAN"); }

/* the fixture's f16-KV figure from NAME.json ("f16_kv": x) */
static double fixture_f16(const char *name) {
    char path[256];
    snprintf(path, sizeof path, FIX "%s.json", name);
    size_t n = 0;
    char *j = (char *)tu_read_file(path, &n);
    assert_non_null(j);
    char *z = realloc(j, n + 1);
    assert_non_null(z);
    z[n] = 0;
    const char *p = strstr(z, "\"f16_kv\":");
    assert_non_null(p);
    double v = strtod(p + 9, NULL);
    free(z);
    return v;
}

static moe_model *load_mode(const char *path, int32_t backend, int32_t gpu_exact) {
    moe_load_params lp = {0};
    lp.backend = backend;
    lp.n_threads = 2;
    lp.cpu_exact = 1;
    lp.gpu_exact = gpu_exact;
    moe_model *m = NULL;
    moe_status st = moe_load(path, &lp, &m);
    if (st && backend == MOE_BACKEND_VULKAN && !require_vulkan()) {
        print_message("[ SKIP     ] Vulkan unusable here (%s)\n", moe_last_error());
        return NULL;
    }
    if (st) print_error("moe_load %s: %s (%s)\n", path, moe_status_str(st), moe_last_error());
    assert_int_equal(st, MOE_OK);
    return m;
}

static moe_model *load(const char *path, int32_t backend) { return load_mode(path, backend, 1); }

static moe_ctx *ctx_nb(moe_model *m, int32_t kv, int32_t logits_all, int32_t n_batch) {
    return tu_new_ctx(m, kv, logits_all, n_batch);
}

/* (a) (b) (c) on one backend; gpu_exact 0 checks the default Vulkan path (tensor cores where the
   device has them) and returns 0 without checking anything when it would repeat the exact one */
static int check_reference(const char *name, int32_t backend, int32_t gpu_exact) {
    char dir[256], refp[256];
    snprintf(dir, sizeof dir, FIX "%s", name);
    snprintf(refp, sizeof refp, FIX "%s.ref", name);
    ref_data r;
    assert_int_equal(ref_load(refp, &r), 0);
    moe_model *m = load_mode(dir, backend, gpu_exact);
    int tensor_cores = m && m->vk && m->vk->coopmat;
    if (!m || (!gpu_exact && !tensor_cores)) {
        moe_model_free(m);
        free(r.buf);
        return 0;
    }
    double tol16 = fmax(TOL_F16, 1.25 * fixture_f16(name));
    /* f16 tensor cores (NVIDIA, default mode) round the activations of prefill matrix products to
       11 bits, an error of the size of an f16 KV cache's: both get the f16 tolerance there (decode
       runs in f32); gpu_exact = 1 keeps f32 and the f32 tolerance */
    for (int kv = 0; kv < 2; kv++) {
        moe_ctx *c = ctx_nb(m, kv ? MOE_KV_F16 : MOE_KV_F32, 1, 0);
        assert_int_equal(moe_step(c, r.tokens, r.n_tokens), MOE_OK);
        double worst = 0;
        for (int i = 0; i < r.n_tokens; i++) {
            const float *l = moe_logits(c, i);
            assert_non_null(l);
            assert_true(all_finite(l, (size_t)r.n_vocab));
            worst = fmax(worst, row_rel_err(l, r.logits + (size_t)i * (size_t)r.n_vocab, r.n_vocab));
        }
        /* tensor cores round the inputs of every prefill matrix product (q, k, v, o, the FFN and
           the experts) to 11 bits where an f16 KV cache rounds only K and V: about 2-3 times the
           fixture's own f16 figure (measured on the H100: moe 4.1e-3 against its f16 KV 1.75e-3) */
        double tol = tensor_cores ? fmax(3.0 * tol16, TOL_CM) : kv ? tol16 : TOL_F32;
        print_message("[ RESULT   ] %-9s %-6s %s KV: max |Δlogit|/range %.2e (tolerance %.1e)\n", name,
                      backend != MOE_BACKEND_VULKAN ? "cpu" : tensor_cores ? "vk-tc" : "vulkan", kv ? "f16" : "f32", worst, tol);
        assert_true(worst <= tol);
        if (!kv) { /* (c) greedy from the prompt */
            assert_int_equal(moe_ctx_rewind(c, 0), MOE_OK);
            assert_int_equal(moe_step(c, r.tokens, r.n_prompt), MOE_OK);
            for (int g = 0; g < r.n_greedy; g++) {
                moe_token t = (moe_token)argmax(moe_logits(c, -1), r.n_vocab);
                if (t != r.greedy[g]) fail_msg("%s: greedy token %d is %d, reference %d", name, g, t, r.greedy[g]);
                assert_int_equal(moe_step(c, &t, 1), MOE_OK);
            }
        }
        moe_ctx_free(c);
    }
    moe_model_free(m);
    free(r.buf);
    return 1;
}

static void test_reference_cpu(void **state) {
    (void)state;
    for (size_t i = 0; i < sizeof k_fixtures / sizeof k_fixtures[0]; i++) check_reference(k_fixtures[i], MOE_BACKEND_CPU, 1);
}

/* decode at depth on Vulkan against the CPU (gpu_exact): 700 tokens of context, then 4 decode
   steps; the full layers decode with split-KV attention (over 512 keys), the sliding ones (window
   8) with the one-workgroup kernel over their ring; e2b's KV-shared layers read another layer's
   cache. f32 KV within TOL_F32. f16 KV: each backend rounds its own K and V to binary16, and the
   two differ by up to the sum of their errors against an f32 engine, 2 × the reference test's
   f16 tolerance (the moe fixture: 2.58e-3 here, the same with the one-workgroup kernels that
   VK_SPLIT_MIN / VK_TILE_MIN = 100000 select, against 1.3e-6 with f32 KV). */
static void test_depth_vulkan(void **state) {
    (void)state;
    static const char *const names[] = {"moe", "e2b"};
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
        char dir[256];
        snprintf(dir, sizeof dir, FIX "%s", names[i]);
        moe_model *mv = load(dir, MOE_BACKEND_VULKAN);
        if (!mv) return;
        moe_model *mc = load(dir, MOE_BACKEND_CPU);
        moe_model_info info;
        assert_int_equal(moe_model_get_info(mv, &info), MOE_OK);
        double e32 = tu_depth_decode_err(mv, mc, MOE_KV_F32, 700, 4, info.n_vocab);
        double e16 = tu_depth_decode_err(mv, mc, MOE_KV_F16, 700, 4, info.n_vocab), tol16 = 2.0 * fmax(TOL_F16, 1.25 * fixture_f16(names[i]));
        print_message("[ RESULT   ] %-9s decode at depth 700, Vulkan vs CPU: f32 KV %.2e (tolerance %.1e), f16 KV %.2e (tolerance %.1e)\n",
                      names[i], e32, TOL_F32, e16, tol16);
        moe_model_free(mv);
        moe_model_free(mc);
        assert_true(e32 <= TOL_F32);
        assert_true(e16 <= tol16);
    }
}

static void test_reference_vulkan(void **state) {
    (void)state;
    for (size_t i = 0; i < sizeof k_fixtures / sizeof k_fixtures[0]; i++) {
        check_reference(k_fixtures[i], MOE_BACKEND_VULKAN, 1);
        if (!check_reference(k_fixtures[i], MOE_BACKEND_VULKAN, 0) && i == 0)
            print_message("[ INFO     ] no tensor cores on this device: the default path is the exact one\n");
    }
}

/* all n rows of logits of c (logits_all) into a new buffer */
static float *copy_rows(moe_ctx *c, int n, int n_vocab) {
    float *out = malloc((size_t)n * (size_t)n_vocab * sizeof *out);
    assert_non_null(out);
    for (int i = 0; i < n; i++) memcpy(out + (size_t)i * (size_t)n_vocab, moe_logits(c, i), (size_t)n_vocab * sizeof *out);
    return out;
}

/* (d) (e) (f): bit for bit on the CPU backend */
static void test_bitwise_cpu(void **state) {
    (void)state;
    for (size_t f = 0; f < sizeof k_fixtures / sizeof k_fixtures[0]; f++) {
        const char *name = k_fixtures[f];
        char dir[256], refp[256];
        snprintf(dir, sizeof dir, FIX "%s", name);
        snprintf(refp, sizeof refp, FIX "%s.ref", name);
        ref_data r;
        assert_int_equal(ref_load(refp, &r), 0);
        moe_model *m = load(dir, MOE_BACKEND_CPU);
        int n = r.n_tokens, V = r.n_vocab;
        size_t row = (size_t)V * sizeof(float);
        /* the prefill in one chunk is the reference of this test */
        moe_ctx *c = ctx_nb(m, MOE_KV_F16, 1, 64);
        assert_int_equal(moe_step(c, r.tokens, n), MOE_OK);
        float *full = copy_rows(c, n, V);
        moe_ctx_free(c);
        /* (d) chunks of 3 and 5 (rings of 10 and 12 rows for the window of 8), and single steps */
        static const int nbs[2] = {3, 5};
        for (int k = 0; k < 2; k++) {
            c = ctx_nb(m, MOE_KV_F16, 1, nbs[k]);
            assert_int_equal(moe_step(c, r.tokens, n), MOE_OK);
            for (int i = 0; i < n; i++)
                if (memcmp(moe_logits(c, i), full + (size_t)i * (size_t)V, row))
                    fail_msg("%s: prefill in chunks of %d differs from one chunk at row %d", name, nbs[k], i);
            moe_ctx_free(c);
        }
        c = ctx_nb(m, MOE_KV_F16, 0, 4);
        for (int i = 0; i < n; i++) {
            assert_int_equal(moe_step(c, r.tokens + i, 1), MOE_OK);
            if (memcmp(moe_logits(c, -1), full + (size_t)i * (size_t)V, row)) fail_msg("%s: step %d differs from the prefill", name, i);
        }
        /* (e) rewinds: within the ring's slack (4 - 1 rows beyond the window) and far beyond it */
        static const int back[6] = {63, 62, 60, 41, 17, 0};
        for (int k = 0; k < 6; k++) {
            assert_int_equal(moe_ctx_rewind(c, back[k]), MOE_OK);
            assert_int_equal(moe_ctx_pos(c), back[k]);
            for (int i = back[k]; i < n; i++) {
                assert_int_equal(moe_step(c, r.tokens + i, 1), MOE_OK);
                if (memcmp(moe_logits(c, -1), full + (size_t)i * (size_t)V, row))
                    fail_msg("%s: after a rewind to %d, step %d differs", name, back[k], i);
            }
        }
        /* (f) save at 37 (past 4 windows), load into a fresh context, continue */
        assert_int_equal(moe_ctx_rewind(c, 37), MOE_OK);
        assert_int_equal(moe_step(c, r.tokens + 37, 1), MOE_OK);
        size_t need = 0;
        assert_int_equal(moe_ctx_save(c, NULL, 0, &need), MOE_OK);
        uint8_t *blob = malloc(need);
        assert_non_null(blob);
        assert_int_equal(moe_ctx_save(c, blob, need, &need), MOE_OK);
        moe_ctx *d = ctx_nb(m, MOE_KV_F16, 0, 4);
        assert_int_equal(moe_ctx_load(d, blob, need), MOE_OK);
        assert_int_equal(moe_ctx_pos(d), 38);
        assert_int_equal(memcmp(moe_logits(d, -1), full + 37 * (size_t)V, row), 0);
        for (int i = 38; i < n; i++) {
            assert_int_equal(moe_step(d, r.tokens + i, 1), MOE_OK);
            if (memcmp(moe_logits(d, -1), full + (size_t)i * (size_t)V, row)) fail_msg("%s: after load, step %d differs", name, i);
        }
        /* a rewind of the loaded context beyond what its rings hold recomputes from the saved tokens */
        assert_int_equal(moe_ctx_rewind(d, 9), MOE_OK);
        assert_int_equal(moe_step(d, r.tokens + 9, 1), MOE_OK);
        assert_int_equal(memcmp(moe_logits(d, -1), full + 9 * (size_t)V, row), 0);
        /* a context with another n_batch has rings of another size: refused, unchanged */
        moe_ctx *e = ctx_nb(m, MOE_KV_F16, 0, 6);
        assert_int_equal(moe_ctx_load(e, blob, need), MOE_ERR_INVALID_ARG);
        assert_int_equal(moe_ctx_pos(e), 0);
        moe_ctx_free(e);
        moe_ctx_free(d);
        free(blob);
        moe_ctx_free(c);
        print_message("[ RESULT   ] %-9s chunked prefill, steps, 6 rewinds, save/load: bit-identical\n", name);
        free(full);
        moe_model_free(m);
        free(r.buf);
    }
}

/* (g) GGUF export and reload */
static void test_gguf_roundtrip(void **state) {
    (void)state;
    for (size_t f = 0; f < sizeof k_fixtures / sizeof k_fixtures[0]; f++) {
        const char *name = k_fixtures[f];
        char dir[256], refp[256], out[256];
        snprintf(dir, sizeof dir, FIX "%s", name);
        snprintf(refp, sizeof refp, FIX "%s.ref", name);
        snprintf(out, sizeof out, "build/test/gemma4_%s.gguf", name);
        ref_data r;
        assert_int_equal(ref_load(refp, &r), 0);
        moe_model *m = load(dir, MOE_BACKEND_CPU);
        assert_int_equal(moe_model_save(m, out, NULL), MOE_OK);
        moe_model *g = load(out, MOE_BACKEND_CPU);
        moe_model_info a, b;
        assert_int_equal(moe_model_get_info(m, &a), MOE_OK);
        assert_int_equal(moe_model_get_info(g, &b), MOE_OK);
        assert_string_equal(b.arch, "gemma4");
        assert_int_equal(a.n_layer, b.n_layer);
        moe_ctx *c1 = ctx_nb(m, MOE_KV_F32, 1, 0), *c2 = ctx_nb(g, MOE_KV_F32, 1, 0);
        assert_int_equal(moe_step(c1, r.tokens, r.n_tokens), MOE_OK);
        assert_int_equal(moe_step(c2, r.tokens, r.n_tokens), MOE_OK);
        for (int i = 0; i < r.n_tokens; i++)
            if (memcmp(moe_logits(c1, i), moe_logits(c2, i), (size_t)r.n_vocab * sizeof(float)))
                fail_msg("%s: the exported GGUF gives other logits at row %d", name, i);
        moe_ctx_free(c1);
        moe_ctx_free(c2);
        moe_model_free(g);
        moe_model_free(m);
        free(r.buf);
    }
}

/* finds the tensor-info record of name in a GGUF header: the offset of its name's length */
static size_t find_name(const uint8_t *b, size_t n, const char *name) {
    size_t len = strlen(name);
    for (size_t i = 8; i + len <= n; i++) {
        uint64_t l;
        memcpy(&l, b + i - 8, 8);
        if (l == len && !memcmp(b + i, name, len)) return i - 8;
    }
    return 0;
}

/* (h) a missing tensor and a tensor of the wrong shape */
static void test_bad_gguf(void **state) {
    (void)state;
    const char *src = "build/test/gemma4_moe.gguf", *bad = "build/test/gemma4_bad.gguf";
    size_t n = 0;
    uint8_t *b = tu_read_file(src, &n);
    if (!b) { /* test_gguf_roundtrip writes it; make it when run alone */
        moe_model *m = load(FIX "moe", MOE_BACKEND_CPU);
        assert_int_equal(moe_model_save(m, src, NULL), MOE_OK);
        moe_model_free(m);
        b = tu_read_file(src, &n);
    }
    assert_non_null(b);
    /* missing: rename blk.1.attn_q.weight to blk.1.attn_Q.weight */
    size_t at = find_name(b, n, "blk.1.attn_q.weight");
    assert_true(at > 0);
    b[at + 8 + strlen("blk.1.attn_")] = 'Q';
    assert_true(tu_write_file(bad, b, n));
    moe_model *m = NULL;
    moe_load_params lp = {0};
    lp.backend = MOE_BACKEND_CPU;
    assert_int_equal(moe_load(bad, &lp, &m), MOE_ERR_FORMAT);
    assert_null(m);
    assert_non_null(strstr(moe_last_error(), "blk.1.attn_q.weight"));
    print_message("[ INFO     ] missing tensor: %s\n", moe_last_error());
    b[at + 8 + strlen("blk.1.attn_")] = 'q';
    /* wrong shape: swap ne[0] and ne[1] of blk.2.ffn_down.weight (same size, other shape) */
    at = find_name(b, n, "blk.2.ffn_down.weight");
    assert_true(at > 0);
    uint8_t *dims = b + at + 8 + strlen("blk.2.ffn_down.weight") + 4; /* after n_dims */
    uint64_t d0, d1;
    memcpy(&d0, dims, 8);
    memcpy(&d1, dims + 8, 8);
    assert_true(d0 != d1);
    memcpy(dims, &d1, 8);
    memcpy(dims + 8, &d0, 8);
    assert_true(tu_write_file(bad, b, n));
    moe_status st = moe_load(bad, &lp, &m);
    print_message("[ INFO     ] wrong shape: %s\n", moe_last_error());
    assert_int_equal(st, MOE_ERR_FORMAT);
    assert_non_null(strstr(moe_last_error(), "blk.2.ffn_down.weight"));
    free(b);
    remove(bad);
}

/* the multimodal checkpoint's vision tensors are skipped with a log line, not an error */
static char g_log[4096];
static void grab_log(int32_t level, const char *msg, void *user) {
    (void)level, (void)user;
    size_t n = strlen(g_log);
    snprintf(g_log + n, sizeof g_log - n, "%s\n", msg);
}

static void test_towers_skipped(void **state) {
    (void)state;
    g_log[0] = 0;
    moe_load_params lp = {0};
    lp.backend = MOE_BACKEND_CPU;
    lp.log = grab_log;
    moe_model *m = NULL;
    assert_int_equal(moe_load(FIX "moe", &lp, &m), MOE_OK);
    assert_non_null(strstr(g_log, "skipped 3 vision/audio tower tensors"));
    moe_model_free(m);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_reference_cpu),
        cmocka_unit_test(test_reference_vulkan),
        cmocka_unit_test(test_depth_vulkan),
        cmocka_unit_test(test_bitwise_cpu),
        cmocka_unit_test(test_gguf_roundtrip),
        cmocka_unit_test(test_bad_gguf),
        cmocka_unit_test(test_towers_skipped),
    };
    return tu_run_tests("gemma4", tests);
}
