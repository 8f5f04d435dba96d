/* header_check.c — make test-header compiles this as C99, C11, C++11 and C++17 with -pedantic
   -Werror: moe.h must be usable from all of them (it includes only <stddef.h> and <stdint.h>).
   The typed function pointers pin the v1 signatures of the fill-a-buffer calls (API.md). */
#include "moe.h"

int moe_header_check(void);
int moe_header_check(void) {
    moe_status (*tok)(const moe_model *, const char *, int32_t, moe_token *, int32_t, int32_t, int32_t *) = moe_tokenize;
    moe_status (*piece)(const moe_model *, moe_token, char *, int32_t, int32_t *) = moe_token_to_piece;
    moe_status (*detok)(const moe_model *, const moe_token *, int32_t, char *, int32_t, int32_t, int32_t *) = moe_detokenize;
    moe_status (*chat)(const moe_model *, const char *const *, const char *const *, int32_t, int32_t, char *, int32_t,
                       int32_t *) = moe_chat_apply;
    void (*model_free)(moe_model *) = moe_model_free;
    moe_load_params lp;
    moe_ctx_params cp;
    moe_sampler_params sp;
    moe_model_info mi;
    moe_stats st;
    moe_save_params sv;
    (void)tok;
    (void)piece;
    (void)detok;
    (void)chat;
    (void)model_free;
    return (int)(sizeof lp + sizeof cp + sizeof sp + sizeof mi + sizeof st + sizeof sv) + MOE_OK + MOE_ABI_VERSION;
}
