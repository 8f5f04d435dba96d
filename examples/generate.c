/* generate — prompt in, streamed text out.

     build/generate -m model.gguf -p "Once upon a time" -n 64
     build/generate -m model.gguf --tokens 1,2,3 -n 16        # raw token ids (no tokenizer needed)

   Flags: -m model  -p prompt  --tokens ids  -n new tokens (64)  -b auto|cpu|vulkan  -d device
          -t threads  -c n_ctx  --temp T  --top-k K  --top-p P  --min-p P  --repeat-penalty R
          --seed S  --gpu-budget MiB  --host-budget MiB  -q (no progress bar)
   A progress bar goes to stderr while loading; the last line reports prompt and generation
   speed in tokens/s. */
#define _POSIX_C_SOURCE 199309L
#include "moe.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static int g_bar_open; /* the progress bar's line is unfinished */

static int32_t progress_bar(float f, void *user) {
    (void)user;
    g_bar_open = f < 1.0f;
    int w = (int)(f * 30.0f + 0.5f);
    fprintf(stderr, "\rloading [%.*s%*s] %3d%%", w, "==============================", 30 - w, "", (int)(f * 100.0f + 0.5f));
    if (f >= 1.0f) fputc('\n', stderr);
    return 0;
}

static void log_line(int32_t level, const char *msg, void *user) {
    (void)user;
    if (level > MOE_LOG_INFO) return;
    if (g_bar_open) fputc('\n', stderr), g_bar_open = 0;
    fprintf(stderr, "moe: %s\n", msg);
}

/* Writes one token's bytes; returns 0 if the model has no tokenizer. */
static int print_token(const moe_model *m, moe_token t) {
    char buf[256];
    int32_t n = moe_token_to_piece(m, t, buf, (int32_t)sizeof buf);
    if (n < 0 && n != MOE_ERR_UNSUPPORTED && -n > (int32_t)sizeof buf) n = 0;
    if (n < 0) return 0;
    fwrite(buf, 1, (size_t)n, stdout);
    fflush(stdout);
    return 1;
}

static void usage(void) {
    fprintf(stderr, "usage: generate -m model.gguf [-p prompt | --tokens 1,2,3] [-n 64] [-b auto|cpu|vulkan] [-d dev] [-t threads]\n"
                    "       [-c n_ctx] [--temp T] [--top-k K] [--top-p P] [--min-p P] [--repeat-penalty R] [--seed S]\n"
                    "       [--gpu-budget MiB] [--host-budget MiB] [-q]\n");
}

int main(int argc, char **argv) {
    const char *model_path = "examples/models/tiny-moe-kjv-q8_0.gguf", *prompt = "And God said", *ids = NULL;
    int n_new = 64, quiet = 0;
    moe_load_params lp = {0};
    moe_ctx_params cp = {0};
    moe_sampler_params sp = {0};
    lp.progress = progress_bar;
    lp.log = log_line;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "-q")) { quiet = 1; continue; }
        if (i + 1 >= argc) { usage(); return 2; }
        const char *v = argv[++i];
        if (!strcmp(a, "-m")) model_path = v;
        else if (!strcmp(a, "-p")) prompt = v;
        else if (!strcmp(a, "--tokens")) ids = v;
        else if (!strcmp(a, "-n")) n_new = atoi(v);
        else if (!strcmp(a, "-b")) lp.backend = !strcmp(v, "cpu") ? MOE_BACKEND_CPU : !strcmp(v, "vulkan") ? MOE_BACKEND_VULKAN : MOE_BACKEND_AUTO;
        else if (!strcmp(a, "-d")) lp.device_index = atoi(v);
        else if (!strcmp(a, "-t")) lp.n_threads = atoi(v);
        else if (!strcmp(a, "-c")) cp.n_ctx = atoi(v);
        else if (!strcmp(a, "--temp")) sp.temperature = (float)atof(v);
        else if (!strcmp(a, "--top-k")) sp.top_k = atoi(v);
        else if (!strcmp(a, "--top-p")) sp.top_p = (float)atof(v);
        else if (!strcmp(a, "--min-p")) sp.min_p = (float)atof(v);
        else if (!strcmp(a, "--repeat-penalty")) sp.repeat_penalty = (float)atof(v);
        else if (!strcmp(a, "--seed")) sp.seed = strtoull(v, NULL, 10);
        else if (!strcmp(a, "--gpu-budget")) lp.gpu_budget_bytes = strtoull(v, NULL, 10) << 20;
        else if (!strcmp(a, "--host-budget")) lp.host_budget_bytes = strtoull(v, NULL, 10) << 20;
        else { usage(); return 2; }
    }
    if (!model_path || n_new < 0) { usage(); return 2; }
    if (quiet) lp.progress = NULL, lp.log = NULL;

    moe_model *model = NULL;
    moe_ctx *ctx = NULL;
    moe_sampler *smp = NULL;
    moe_token *toks = NULL;
    int rc = 1;
    moe_status st = moe_load(model_path, &lp, &model);
    if (st) { fprintf(stderr, "generate: %s: %s\n", moe_status_str(st), moe_last_error()); goto done; }
    if ((st = moe_ctx_new(model, &cp, &ctx)) || (st = moe_sampler_new(&sp, &smp))) {
        fprintf(stderr, "generate: %s: %s\n", moe_status_str(st), moe_last_error());
        goto done;
    }
    moe_model_info info;
    moe_model_get_info(model, &info);

    /* the prompt: token ids given directly, or text through the model's tokenizer */
    int32_t n_prompt = 0;
    if (ids) {
        toks = malloc((strlen(ids) / 2 + 2) * sizeof *toks);
        if (!toks) goto done;
        for (const char *p = ids; *p;) {
            char *end;
            long t = strtol(p, &end, 10);
            if (end == p) break;
            toks[n_prompt++] = (moe_token)t;
            p = *end == ',' ? end + 1 : end;
        }
    } else {
        /* byte-level and SentencePiece tokenizers never make more tokens than bytes (plus BOS/EOS),
           so one call with that capacity either succeeds or reports a real error */
        int32_t cap = (int32_t)strlen(prompt) + 8;
        toks = malloc((size_t)cap * sizeof *toks);
        if (!toks) goto done;
        n_prompt = moe_tokenize(model, prompt, (int32_t)strlen(prompt), toks, cap, MOE_TOKENIZE_ADD_SPECIAL);
        if (n_prompt < 0) {
            fprintf(stderr, "generate: cannot tokenize the prompt (%s); pass --tokens\n", moe_last_error());
            goto done;
        }
        fputs(prompt, stdout);
    }
    if (n_prompt == 0) { fprintf(stderr, "generate: empty prompt\n"); goto done; }

    double t0 = now_s();
    if ((st = moe_step(ctx, toks, n_prompt))) { fprintf(stderr, "generate: %s: %s\n", moe_status_str(st), moe_last_error()); goto done; }
    double t_prompt = now_s() - t0;
    int n_gen = 0, has_text = !ids;
    t0 = now_s();
    for (; n_gen < n_new; n_gen++) {
        moe_token t = moe_sample(smp, moe_logits(ctx, -1), info.n_vocab);
        if (t < 0 || moe_token_is_eog(model, t)) break;
        if (!has_text || !print_token(model, t)) printf("%s%d", n_gen ? " " : "", t), fflush(stdout);
        if ((st = moe_step(ctx, &t, 1))) {
            fprintf(stderr, "\ngenerate: %s: %s\n", moe_status_str(st), moe_last_error());
            break;
        }
    }
    double t_gen = now_s() - t0;
    printf("\n");
    fflush(stdout);
    fprintf(stderr, "prompt: %d tokens, %.1f tok/s | generation: %d tokens, %.1f tok/s | backend %s\n", n_prompt,
            n_prompt / (t_prompt > 0 ? t_prompt : 1e-9), n_gen, n_gen / (t_gen > 0 ? t_gen : 1e-9),
            info.backend == MOE_BACKEND_VULKAN ? "vulkan" : "cpu");
    rc = st ? 1 : 0;
done:
    free(toks);
    moe_sampler_free(smp);
    moe_ctx_free(ctx);
    moe_model_free(model);
    return rc;
}
