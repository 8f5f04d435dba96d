/* fuzz_hf — libFuzzer harness: the input is a Hugging Face model directory packed as parts
   (config.json, model.safetensors, tokenizer.json, tokenizer_config.json joined by FUZZ_SEP),
   written into a private directory and loaded with moe_load: the safetensors header parser, the
   config.json reader, tensor renaming and expert assembly, and the tokenizer.json reader. What
   loads takes one step whose logits must be finite. Seeds: build/fuzz/make_seeds. */
#include "fuzz_common.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    char dir[128];
    snprintf(dir, sizeof dir, "%s/hf", fuzz_scratch_dir());
    if (fuzz_write_parts(dir, data, size, k_hf_parts, 4) < 0) abort();
    moe_load_params lp = {0};
    lp.backend = MOE_BACKEND_CPU;
    lp.n_threads = 1;
    moe_model *m = (moe_model *)&lp;
    moe_status st = moe_load(dir, &lp, &m);
    if (st != MOE_OK) {
        if (m || st >= 0 || !moe_last_error()[0]) abort();
        return 0;
    }
    moe_model_info info;
    if (moe_model_get_info(m, &info) != MOE_OK) abort();
    moe_ctx_params cp = {0};
    cp.n_ctx = 4;
    moe_ctx *c = NULL;
    if (moe_ctx_new(m, &cp, &c) == MOE_OK) {
        moe_token t[2] = {0, info.n_vocab - 1};
        if (moe_step(c, t, 2) == MOE_OK) {
            const float *l = moe_logits(c, -1);
            if (!l || !fuzz_all_finite(l, info.n_vocab)) abort();
        }
        moe_ctx_free(c);
    }
    moe_model_free(m);
    return 0;
}
