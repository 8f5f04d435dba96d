/* custom_sampling — your own sampler in the decode loop: the point of moe's step-by-step API.

     build/custom_sampling -m model.gguf -p "Once upon a time" -n 64
     build/custom_sampling -m model.gguf --tokens 1,2,3 -n 32      # raw token ids, no tokenizer needed

   The loop is just   moe_step(prompt) → moe_logits → choose → moe_step(&token, 1) → moe_logits → ...
   and "choose" here is written out in full, using nothing from moe's sampler:

   * Mirostat 2.0 (Basu et al., 2021): keep the "surprise" -log2 p of each picked token near a
     target tau. Tokens whose surprise exceeds mu are cut; after each pick mu moves by
     eta · (tau - surprise). Low tau = focused text, high tau = adventurous text.
   * a "no repeated bigram" constraint: a token that would repeat a pair (previous token, token)
     already in the output is banned outright — a hard rule no temperature knob can express.

   Flags: -m model  -p prompt | --tokens ids  -n new tokens (64)  --tau 5.0  --eta 0.1
          --seed 1  -b auto|cpu|vulkan  -t threads
   Pieces are streamed as they come (token ids when the model has no tokenizer); the last line
   reports the mean surprise (≈ tau once mu has settled) and how often the bigram ban fired. */
#define _POSIX_C_SOURCE 200809L
#include "moe.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- the hand-written sampler ------------------------------------------------------------------ */
typedef struct my_sampler {
    float tau, eta, mu;     /* Mirostat 2.0 state: target surprise, learning rate, current cut */
    uint64_t rng;           /* xorshift64* */
    float *p;               /* [n_vocab] scratch */
    const moe_token *out;   /* the tokens generated so far (for the bigram rule) */
    int n_out;
    int n_banned;           /* statistics */
    double surprise_sum;
} my_sampler;

static float my_uniform(my_sampler *s) { /* [0, 1) */
    s->rng ^= s->rng >> 12, s->rng ^= s->rng << 25, s->rng ^= s->rng >> 27;
    return (float)((s->rng * 0x2545F4914F6CDD1Dull) >> 40) / 16777216.0f;
}

static moe_token my_choose(my_sampler *s, const float *logits, int n_vocab) {
    /* softmax */
    float mx = -INFINITY;
    for (int i = 0; i < n_vocab; i++) mx = logits[i] > mx ? logits[i] : mx;
    double sum = 0.0;
    for (int i = 0; i < n_vocab; i++) sum += (s->p[i] = expf(logits[i] - mx));
    for (int i = 0; i < n_vocab; i++) s->p[i] = (float)(s->p[i] / sum);

    /* ban every token t for which (previous token, t) is already in the output */
    for (int i = 0; s->n_out > 0 && i + 1 < s->n_out; i++)
        if (s->out[i] == s->out[s->n_out - 1] && s->p[s->out[i + 1]] > 0.0f) {
            s->p[s->out[i + 1]] = 0.0f;
            s->n_banned++;
        }

    /* Mirostat: cut tokens with surprise -log2 p > mu, i.e. p < 2^-mu (keep at least the best) */
    const float p_cut = exp2f(-s->mu);
    int best = 0;
    double kept = 0.0;
    for (int i = 0; i < n_vocab; i++) {
        if (s->p[i] > s->p[best]) best = i;
        if (s->p[i] >= p_cut && s->p[i] > 0.0f) kept += s->p[i];
    }

    /* draw among the kept tokens */
    moe_token pick = best;
    if (kept > 0.0) {
        double r = my_uniform(s) * kept, acc = 0.0;
        for (int i = 0; i < n_vocab; i++) {
            if (s->p[i] < p_cut || s->p[i] == 0.0f) continue;
            acc += s->p[i];
            if (acc > r) { pick = i; break; }
        }
    }
    /* Mirostat's feedback on the surprise of the pick, measured on the full distribution */
    float surprise = -log2f(s->p[pick] > 0.0f ? s->p[pick] : 1e-30f);
    s->mu -= s->eta * (surprise - s->tau);
    s->surprise_sum += surprise;
    return pick;
}

/* ---- plumbing ---------------------------------------------------------------------------------- */
static int print_piece(const moe_model *m, moe_token t) {   /* 0 if the model has no tokenizer */
    char buf[256];
    int32_t n = 0;
    if (moe_token_to_piece(m, t, buf, (int32_t)sizeof buf, &n)) return 0;
    fwrite(buf, 1, (size_t)n, stdout);
    fflush(stdout);
    return 1;
}

static void usage(void) {
    fprintf(stderr, "usage: custom_sampling -m model.gguf [-p prompt | --tokens 1,2,3] [-n 64] [--tau 5.0] [--eta 0.1]\n"
                    "                       [--seed 1] [-b auto|cpu|vulkan] [-t threads]\n");
}

int main(int argc, char **argv) {
    const char *model_path = NULL, *prompt = "Once upon a time", *ids = NULL;
    int n_new = 64;
    my_sampler ms = {.tau = 5.0f, .eta = 0.1f, .rng = 1};
    moe_load_params lp = {0};
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (i + 1 >= argc) { usage(); return 2; }
        const char *v = argv[++i];
        if (!strcmp(a, "-m")) model_path = v;
        else if (!strcmp(a, "-p")) prompt = v;
        else if (!strcmp(a, "--tokens")) ids = v;
        else if (!strcmp(a, "-n")) n_new = atoi(v);
        else if (!strcmp(a, "--tau")) ms.tau = (float)atof(v);
        else if (!strcmp(a, "--eta")) ms.eta = (float)atof(v);
        else if (!strcmp(a, "--seed")) ms.rng = strtoull(v, NULL, 10) * 0x9E3779B97F4A7C15ull + 1;
        else if (!strcmp(a, "-b")) lp.backend = !strcmp(v, "cpu") ? MOE_BACKEND_CPU : !strcmp(v, "vulkan") ? MOE_BACKEND_VULKAN : MOE_BACKEND_AUTO;
        else if (!strcmp(a, "-t")) lp.n_threads = atoi(v);
        else { usage(); return 2; }
    }
    if (!model_path || n_new < 0) { usage(); return 2; }
    ms.mu = 2.0f * ms.tau;   /* Mirostat's customary start */

    moe_model *model = NULL;
    moe_ctx *ctx = NULL;
    moe_token *toks = NULL;
    int rc = 1;
    moe_status st = moe_load(model_path, &lp, &model);
    if (st) { fprintf(stderr, "custom_sampling: %s: %s\n", moe_status_str(st), moe_last_error()); goto done; }
    if ((st = moe_ctx_new(model, NULL, &ctx))) {
        fprintf(stderr, "custom_sampling: %s: %s\n", moe_status_str(st), moe_last_error());
        goto done;
    }
    moe_model_info info;
    moe_model_get_info(model, &info);

    /* the prompt, as token ids or through the tokenizer; room for the generated tokens after it */
    int32_t n_prompt = 0;
    if (ids) {
        toks = malloc((strlen(ids) / 2 + 2 + (size_t)n_new) * sizeof *toks);
        if (!toks) goto done;
        for (const char *p = ids; *p;) {
            char *end;
            long t = strtol(p, &end, 10);
            if (end == p) break;
            toks[n_prompt++] = (moe_token)t;
            p = *end == ',' ? end + 1 : end;
        }
    } else {
        int32_t len = (int32_t)strlen(prompt), cap = len + 16;
        toks = malloc(((size_t)cap + (size_t)n_new) * sizeof *toks);
        if (!toks) goto done;
        if (moe_tokenize(model, prompt, len, toks, cap, MOE_TOKENIZE_ADD_SPECIAL, &n_prompt)) {
            fprintf(stderr, "custom_sampling: cannot tokenize the prompt (%s); pass token ids with --tokens\n", moe_last_error());
            goto done;
        }
        fputs(prompt, stdout);
    }
    if (n_prompt == 0) { fprintf(stderr, "custom_sampling: empty prompt\n"); goto done; }
    ms.p = malloc((size_t)info.n_vocab * sizeof *ms.p);
    if (!ms.p) goto done;
    ms.out = toks + n_prompt;

    /* prefill, then: logits → choose → step */
    if ((st = moe_step(ctx, toks, n_prompt))) {
        fprintf(stderr, "custom_sampling: %s: %s\n", moe_status_str(st), moe_last_error());
        goto done;
    }
    int text = !ids;
    for (int i = 0; i < n_new; i++) {
        const float *logits = moe_logits(ctx, -1);
        moe_token t = my_choose(&ms, logits, info.n_vocab);
        toks[n_prompt + ms.n_out++] = t;
        if (moe_token_is_eog(model, t)) break;
        if (!text || !print_piece(model, t)) printf("%s%d", i ? " " : "", t), fflush(stdout);
        if ((st = moe_step(ctx, &t, 1))) {
            fprintf(stderr, "\ncustom_sampling: %s: %s\n", moe_status_str(st), moe_last_error());
            break;
        }
    }
    printf("\n");
    fprintf(stderr, "%d tokens | mean surprise %.2f bits (tau %.2f, final mu %.2f) | bigram ban fired %d times\n",
            ms.n_out, ms.n_out ? ms.surprise_sum / ms.n_out : 0.0, (double)ms.tau, (double)ms.mu, ms.n_banned);
    rc = st ? 1 : 0;
done:
    free(ms.p);
    free(toks);
    moe_ctx_free(ctx);
    moe_model_free(model);
    return rc;
}
