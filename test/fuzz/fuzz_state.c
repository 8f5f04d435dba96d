/* fuzz_state — libFuzzer harness: the input is one selector byte (the kind of context: f16 or
   f32 cache, logits_all) and a state blob for moe_ctx_load on build/fuzz/models/tiny.gguf. The
   harness reseals the blob's FNV-1a checksum first (as a forger would), so mutations reach the
   content checks. A refused state must leave the context as it was; an accepted one must step
   with finite logits (or fail the step cleanly, the context unchanged). Seeds: moe_ctx_save blobs
   written by build/fuzz/make_seeds. */
#include "fuzz_common.h"

/* the layout of moe.c's state_header: u32 magic, version; i32 x 8; u64 fingerprint, payload_bytes,
   checksum; payload after it */
enum { HDR_BYTES = 64, HDR_CHECKSUM = 56 };

static moe_model *g_model;
static moe_ctx *g_ctx[FUZZ_STATE_KINDS];
static int g_nv;

static void cleanup(void) {
    for (int k = 0; k < FUZZ_STATE_KINDS; k++) moe_ctx_free(g_ctx[k]);
    moe_model_free(g_model);
}

int LLVMFuzzerInitialize(int *argc, char ***argv) {
    (void)argc;
    (void)argv;
    moe_load_params lp = {0};
    lp.backend = MOE_BACKEND_CPU;
    lp.n_threads = 1;
    if (moe_load("build/fuzz/models/tiny.gguf", &lp, &g_model) != MOE_OK) {
        fprintf(stderr, "fuzz_state: %s (run build/fuzz/make_seeds build/fuzz first)\n", moe_last_error());
        abort();
    }
    moe_model_info info;
    moe_model_get_info(g_model, &info);
    g_nv = info.n_vocab;
    for (int k = 0; k < FUZZ_STATE_KINDS; k++) {
        moe_ctx_params cp;
        fuzz_state_params(k, &cp);
        if (moe_ctx_new(g_model, &cp, &g_ctx[k]) != MOE_OK) abort();
    }
    atexit(cleanup);
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size < 1) return 0;
    moe_ctx *c = g_ctx[data[0] % FUZZ_STATE_KINDS];
    size_t n = size - 1;
    uint8_t *b = malloc(n ? n : 1);
    memcpy(b, data + 1, n);
    if (n >= HDR_BYTES) { /* reseal */
        uint64_t h = 0xcbf29ce484222325ull;
        for (size_t i = HDR_BYTES; i < n; i++) h = (h ^ b[i]) * 0x100000001b3ull;
        memcpy(b + HDR_CHECKSUM, &h, 8);
    }
    /* a known state to compare against after a refusal: one token at position 0 */
    moe_ctx_rewind(c, 0);
    moe_token t0 = 5;
    if (moe_step(c, &t0, 1) != MOE_OK) abort();
    float before[4];
    memcpy(before, moe_logits(c, -1), sizeof before);
    moe_status st = moe_ctx_load(c, b, n);
    if (st != MOE_OK) {
        if (st >= 0 || !moe_last_error()[0] || moe_ctx_pos(c) != 1 || memcmp(moe_logits(c, -1), before, sizeof before)) abort();
    } else {
        int32_t pos = moe_ctx_pos(c);
        if (pos < 16) {
            moe_token t = 7;
            st = moe_step(c, &t, 1);
            if (st == MOE_OK) {
                const float *l = moe_logits(c, -1);
                if (!l || !fuzz_all_finite(l, g_nv)) abort();
            } else if (moe_ctx_pos(c) != pos || !moe_last_error()[0]) abort();
        }
    }
    free(b);
    return 0;
}
