/* fuzz_gguf — libFuzzer harness: the input is a GGUF file. It goes through moe_load (parser,
   hyperparameters, tensor binding, value checks, vocabulary), then, when it loads, a tokenizer
   round trip in both special-token modes and one step whose logits must be finite. Every failure
   must be a clean status with a message; ASan/UBSan and LeakSanitizer watch the rest.
   Seeds: build/fuzz/make_seeds (tiny models written by moe's GGUF writer). */
#include "fuzz_common.h"

#include <sys/mman.h>

static int g_fd = -1;
static char g_path[64];

/* tokenize -> detokenize -> tokenize -> detokenize and every piece; the vocabulary is fuzzed, so
   the texts are not compared here (fuzz_tokenizer checks round trips on real vocabularies) */
static void round_trip(const moe_model *m, int flags) {
    static const char text[] = "God said <|im_end|><bos> caf\xC3\xA9 12\n\n \xE2\x96\x81x";
    moe_token tok[256];
    int32_t n = moe_tokenize(m, text, (int32_t)sizeof text - 1, tok, 256, flags);
    if (n < 0) {
        if (!moe_last_error()[0]) abort();
        return;
    }
    char a[2048];
    int32_t na = moe_detokenize(m, tok, n, a, sizeof a, flags);
    if (na < 0) return;
    int32_t n2 = moe_tokenize(m, a, na, tok, 256, flags & MOE_TOKENIZE_PARSE_SPECIAL);
    if (n2 < 0) return;
    moe_detokenize(m, tok, n2, a, sizeof a, flags);
    for (int32_t i = 0; i < n2; i++) {
        char piece[512];
        moe_token_to_piece(m, tok[i], piece, sizeof piece);
        moe_token_is_eog(m, tok[i]);
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (g_fd < 0) {
        g_fd = memfd_create("moe_fuzz_gguf", 0);
        if (g_fd < 0) abort();
        snprintf(g_path, sizeof g_path, "/proc/self/fd/%d", g_fd);
    }
    if (ftruncate(g_fd, 0) != 0 || (size && pwrite(g_fd, data, size, 0) != (ssize_t)size)) abort();
    moe_load_params lp = {0};
    lp.backend = MOE_BACKEND_CPU;
    lp.n_threads = 1;
    moe_model *m = (moe_model *)&lp; /* must come back NULL on failure */
    moe_status st = moe_load(g_path, &lp, &m);
    if (st != MOE_OK) {
        if (m || st >= 0 || !moe_last_error()[0]) abort();
        return 0;
    }
    moe_model_info info;
    if (moe_model_get_info(m, &info) != MOE_OK) abort();
    round_trip(m, (int)(size & 3)); /* the flags vary with the input: no call is made twice */
    moe_ctx_params cp = {0};
    cp.n_ctx = 8;
    moe_ctx *c = NULL;
    if (moe_ctx_new(m, &cp, &c) == MOE_OK) {
        moe_token t[2] = {(moe_token)(size % (size_t)info.n_vocab), info.n_vocab - 1};
        if (moe_step(c, t, 2) == MOE_OK) {
            const float *l = moe_logits(c, -1);
            if (!l || !fuzz_all_finite(l, info.n_vocab)) abort();
        } else if (moe_ctx_pos(c) != 0 || !moe_last_error()[0]) abort();
        moe_ctx_free(c);
    } else if (!moe_last_error()[0]) abort();
    moe_model_free(m);
    return 0;
}
