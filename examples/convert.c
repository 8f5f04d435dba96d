/* convert — turn a Hugging Face model directory (config.json + *.safetensors + tokenizer.json) or
   a GGUF file into a GGUF file, optionally re-quantized.

     build/convert path/to/hf-model out.gguf q8_0
     build/convert model-f16.gguf model-q4_k.gguf q4_k

   Types: keep (default), f32, f16, bf16, q8_0, q4_k, q5_k, q6_k, q4_0. Norms and the router stay
   F32; with q4_k the output matrix is Q6_K, as llama.cpp does. The file loads in llama.cpp too. */
#include "moe.h"

#include <stdio.h>
#include <string.h>

static int32_t progress(float f, void *user) {
    const char *what = user;
    int w = (int)(f * 30.0f + 0.5f);
    fprintf(stderr, "\r%s [%.*s%*s] %3d%%", what, w, "==============================", 30 - w, "", (int)(f * 100.0f + 0.5f));
    if (f >= 1.0f) fputc('\n', stderr);
    return 0;
}

int main(int argc, char **argv) {
    static const char *const names[] = {"keep", "f32", "f16", "bf16", "q8_0", "q4_k", "q5_k", "q6_k", "q4_0"};
    if (argc < 3 || argc > 4) {
        fprintf(stderr, "usage: convert <hf-dir | in.gguf> <out.gguf> [keep|f32|f16|bf16|q8_0|q4_k|q5_k|q6_k|q4_0]\n");
        return 2;
    }
    moe_save_params sp = {0};
    sp.ftype = -1;
    const char *type = argc == 4 ? argv[3] : "keep";
    for (int i = 0; i < (int)(sizeof names / sizeof names[0]); i++)
        if (!strcmp(type, names[i])) sp.ftype = i;
    if (sp.ftype < 0) {
        fprintf(stderr, "convert: unknown type '%s'\n", type);
        return 2;
    }
    moe_load_params lp = {0};
    lp.backend = MOE_BACKEND_CPU;
    lp.progress = progress;
    lp.user = (void *)"loading";
    moe_model *model = NULL;
    moe_status st = moe_load(argv[1], &lp, &model);
    if (st) {
        fprintf(stderr, "convert: %s: %s\n", moe_status_str(st), moe_last_error());
        return 1;
    }
    sp.progress = progress;
    sp.user = (void *)"writing";
    st = moe_model_save(model, argv[2], &sp);
    if (st) fprintf(stderr, "convert: %s: %s\n", moe_status_str(st), moe_last_error());
    else {
        moe_model_info info;
        moe_model_get_info(model, &info);
        fprintf(stderr, "convert: wrote %s (%s, %d layers, %d experts, %.1f M params, type %s)\n", argv[2], info.arch,
                info.n_layer, info.n_expert, (double)info.n_params / 1e6, type);
    }
    moe_model_free(model);
    return st ? 1 : 0;
}
