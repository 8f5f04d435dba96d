/* fuzz_json — libFuzzer harness: the input is tokenizer.json, tokenizer_config.json and
   config.json joined by FUZZ_SEP (missing parts are absent files), loaded as a vocabulary-only
   model: the JSON parser, the tokenizer.json reader (BPE, normalizers, pre-tokenizers, added
   tokens) and the readers of the two configs (special tokens, chat template, eos ids). What loads
   tokenizes, detokenizes and renders a chat. Seeds: build/fuzz/make_seeds. */
#include "fuzz_common.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    char dir[128], path[160];
    snprintf(dir, sizeof dir, "%s/json", fuzz_scratch_dir());
    if (fuzz_write_parts(dir, data, size, k_json_parts, 3) < 0) abort();
    snprintf(path, sizeof path, "%s/tokenizer.json", dir);
    moe_load_params lp = {0};
    lp.vocab_only = 1;
    moe_model *m = (moe_model *)&lp;
    moe_status st = moe_load(path, &lp, &m);
    if (st != MOE_OK) {
        if (m || st >= 0 || !moe_last_error()[0]) abort();
        return 0;
    }
    static const char text[] = "Hello <|im_end|> world\n\xE2\x96\x81 caf\xC3\xA9 <bos>";
    moe_token tok[128];
    int32_t n = moe_tokenize(m, text, (int32_t)sizeof text - 1, tok, 128, MOE_TOKENIZE_ADD_SPECIAL | MOE_TOKENIZE_PARSE_SPECIAL);
    if (n > 0) {
        char out[512];
        moe_detokenize(m, tok, n, out, sizeof out, MOE_TOKENIZE_PARSE_SPECIAL);
        for (int32_t i = 0; i < n; i++) moe_token_is_eog(m, tok[i]);
    }
    const char *roles[3] = {"system", "user", "assistant"}, *contents[3] = {"s", "u", "a"};
    char chat[1024];
    moe_chat_apply(m, roles, contents, 3, 1, chat, sizeof chat);
    moe_model_free(m);
    return 0;
}
