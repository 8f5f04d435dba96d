/* npc — a game's frame loop with 16 characters talking, one model, one forward pass per step.

     build/npc                                             # the bundled model, 16 characters, 600 frames
     build/npc -m model.gguf -b vulkan --budget-ms 6 --frames 1200 -q

   Each character has its own context and its own prompt. Every frame (fixed 16 ms, as a game at
   60 Hz) spends at most --budget-ms on language: the characters that have work (the rest of their
   prompt, in chunks, or their next token) are stepped TOGETHER with moe_step_batch, one forward
   pass for all of them, as many times as the budget allows; the rest of the frame is the game's
   ("render": here a sleep to the frame's end). A character whose line is done (a newline, an
   end-of-generation token or --line tokens) says it and starts a new one from its prompt.
   At the end: frame-time percentiles (p50 / p95 / p99 / max of whole frames, and of the language
   work in them), frames over 16 ms, and tokens/s (prompt and generated).

   Flags: -m model (examples/models/tiny-moe-kjv-q8_0.gguf)  -b auto|cpu|vulkan  -t threads
          -n characters (16)  --frames N (600)  --budget-ms B (8)  --line tokens per line (24)
          --chunk prompt tokens per step (16)  --temp T (0.8)  -q (no dialogue, only the summary)
   Public API only. */
#define _POSIX_C_SOURCE 199309L
#include "moe.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define FRAME_S 0.016
#define MAX_CHARS 64
#define MAX_PROMPT 192

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static void sleep_until(double t) {
    double d = t - now_s();
    if (d <= 0) return;
    struct timespec ts = {(time_t)d, (long)((d - (double)(time_t)d) * 1e9)};
    nanosleep(&ts, NULL);
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static double pct(const double *sorted, int n, double p) { return n ? sorted[(int)(p * (n - 1) + 0.5)] : 0; }

static const char *const k_names[] = {"Smith", "Miller", "Baker", "Guard", "Priest", "Widow", "Merchant", "Shepherd",
                                      "Scribe", "Innkeeper", "Fisher", "Hunter", "Weaver", "Elder", "Child", "Stranger"};
static const char *const k_lines[] = {
    "And the smith lifted his hammer and said,", "Then the miller answered the people, saying,",
    "And the baker spake unto the king, saying,", "The guard stood at the gate and cried,",
    "And the priest went up into the temple and said,", "Then the widow wept and said unto him,",
    "And the merchant counted his silver and said,", "The shepherd looked upon his flock and said,",
    "And the scribe wrote in the book, saying,", "Then the keeper of the inn said unto them,",
    "And the fisher cast his net into the sea and said,", "The hunter went out into the field and said,",
    "And the weaver sat at her loom and said,", "Then the elders of the city said,",
    "And the little child said unto his father,", "And a stranger came from the east, saying,"};

typedef struct npc {
    const char *name;
    moe_ctx *ctx;
    moe_sampler *sampler;
    moe_token prompt[MAX_PROMPT];
    int32_t n_prompt, fed;     /* prompt tokens, of them in the context */
    moe_token next;            /* the sampled token to feed (once the prompt is in) */
    char line[512];
    int len, line_tokens, lines;
    int refeed;                /* next is the prompt's last token again (a new line starts) */
} npc;

int main(int argc, char **argv) {
    const char *path = "examples/models/tiny-moe-kjv-q8_0.gguf";
    int n_chars = 16, frames = 600, max_line = 24, chunk = 16, quiet = 0;
    double budget_ms = 8.0;
    float temp = 0.8f;
    moe_load_params lp = {0};
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "-q")) { quiet = 1; continue; }
        if (i + 1 >= argc) goto usage;
        const char *v = argv[++i];
        if (!strcmp(a, "-m")) path = v;
        else if (!strcmp(a, "-b")) lp.backend = !strcmp(v, "cpu") ? MOE_BACKEND_CPU : !strcmp(v, "vulkan") ? MOE_BACKEND_VULKAN : MOE_BACKEND_AUTO;
        else if (!strcmp(a, "-t")) lp.n_threads = atoi(v);
        else if (!strcmp(a, "-n")) n_chars = atoi(v);
        else if (!strcmp(a, "--frames")) frames = atoi(v);
        else if (!strcmp(a, "--budget-ms")) budget_ms = atof(v);
        else if (!strcmp(a, "--line")) max_line = atoi(v);
        else if (!strcmp(a, "--chunk")) chunk = atoi(v);
        else if (!strcmp(a, "--temp")) temp = (float)atof(v);
        else goto usage;
    }
    if (n_chars < 1 || n_chars > MAX_CHARS || frames < 1 || max_line < 1 || chunk < 1 || budget_ms <= 0) goto usage;

    moe_model *model = NULL;
    moe_status st = moe_load(path, &lp, &model);
    if (st) { fprintf(stderr, "npc: %s: %s\n", moe_status_str(st), moe_last_error()); return 1; }
    moe_model_info info;
    moe_model_get_info(model, &info);
    static npc chars[MAX_CHARS];
    int rc = 1;
    for (int i = 0; i < n_chars; i++) {
        npc *c = &chars[i];
        int k = i % 16;
        c->name = k_names[k];
        moe_ctx_params cp = {0};
        cp.n_ctx = MAX_PROMPT + max_line + 8;
        cp.n_batch = chunk;
        moe_sampler_params sp = {0};
        sp.temperature = temp;
        sp.top_k = 40;
        sp.seed = 1000u + (uint64_t)i;
        if ((st = moe_ctx_new(model, &cp, &c->ctx)) || (st = moe_sampler_new(&sp, &c->sampler)) ||
            (st = moe_tokenize(model, k_lines[k], (int32_t)strlen(k_lines[k]), c->prompt, MAX_PROMPT, MOE_TOKENIZE_ADD_SPECIAL, &c->n_prompt))) {
            fprintf(stderr, "npc: %s: %s\n", moe_status_str(st), moe_last_error());
            goto done;
        }
    }
    fprintf(stderr, "npc: %s (%s), %d characters, %d frames of %.0f ms, language budget %.1f ms per frame\n", info.arch,
            info.backend == MOE_BACKEND_VULKAN ? "vulkan" : "cpu", n_chars, frames, FRAME_S * 1e3, budget_ms);

    double *frame_t = malloc((size_t)frames * sizeof *frame_t), *work_t = malloc((size_t)frames * sizeof *work_t);
    if (!frame_t || !work_t) { free(frame_t), free(work_t); goto done; }
    moe_ctx *bc[MAX_CHARS];
    const moe_token *bt[MAX_CHARS];
    int32_t bn[MAX_CHARS], who[MAX_CHARS];
    long long prompt_tokens = 0, gen_tokens = 0;
    int over = 0;
    double step_est = 0, t_start = now_s(), frame0 = t_start, work_total = 0;
    for (int f = 0; f < frames; f++) {
        double w0 = now_s();
        /* Language work within the budget: another batched step only while the last one's time
           still fits. With moe_step_submit / moe_step_wait (the async API) the batch would be
           submitted here and collected with moe_step_wait(ctx, 0) at the top of the next frame,
           so that the game's own work runs while the model does; moe_step_batch has no submit
           form yet, so it runs synchronously inside the budget. */
        for (int steps = 0; steps == 0 || now_s() - w0 + step_est <= budget_ms * 1e-3; steps++) { /* one at least: progress */
            int k = 0;
            for (int i = 0; i < n_chars; i++) {
                npc *c = &chars[i];
                if (c->fed < c->n_prompt) { /* the prompt, a chunk per step: no frame gets a whole prefill */
                    int32_t n = c->n_prompt - c->fed < chunk ? c->n_prompt - c->fed : chunk;
                    bt[k] = c->prompt + c->fed, bn[k] = n;
                } else bt[k] = &c->next, bn[k] = 1;
                bc[k] = c->ctx, who[k++] = i;
            }
            double s0 = now_s();
            if ((st = moe_step_batch(bc, bt, bn, k))) {
                fprintf(stderr, "npc: %s: %s\n", moe_status_str(st), moe_last_error());
                free(frame_t), free(work_t);
                goto done;
            }
            double dt = now_s() - s0;
            step_est = step_est ? 0.8 * step_est + 0.2 * dt : dt;
            for (int j = 0; j < k; j++) {
                npc *c = &chars[who[j]];
                if (c->fed < c->n_prompt) {
                    c->fed += bn[j], prompt_tokens += bn[j];
                    if (c->fed < c->n_prompt) continue;
                } else if (c->refeed) c->refeed = 0, prompt_tokens++;
                else gen_tokens++, c->line_tokens++;
                moe_token t = moe_sample(c->sampler, moe_logits(c->ctx, -1), info.n_vocab);
                char piece[64];
                int32_t np = 0;
                int eol = moe_token_is_eog(model, t) || c->line_tokens >= max_line;
                if (!eol && moe_token_to_piece(model, t, piece, sizeof piece, &np) == MOE_OK) {
                    for (int b = 0; b < np && !eol; b++) {
                        if (piece[b] == '\n') eol = 1;
                        else if (c->len < (int)sizeof c->line - 1) c->line[c->len++] = piece[b];
                    }
                }
                if (eol) { /* the line is said; the next one starts from the prompt again */
                    c->line[c->len] = 0;
                    if (!quiet) printf("[frame %4d] %-9s:%s\n", f, c->name, c->line);
                    c->len = c->line_tokens = 0;
                    c->lines++;
                    c->fed = c->n_prompt;
                    if (moe_ctx_rewind(c->ctx, c->n_prompt - 1) != MOE_OK) { /* the prompt's last token gives the logits again */
                        fprintf(stderr, "npc: %s\n", moe_last_error());
                        free(frame_t), free(work_t);
                        goto done;
                    }
                    c->next = c->prompt[c->n_prompt - 1], c->refeed = 1;
                    moe_sampler_reset(c->sampler);
                } else {
                    moe_sampler_accept(c->sampler, t);
                    c->next = t;
                }
            }
        }
        double w1 = now_s();
        work_t[f] = w1 - w0;
        work_total += work_t[f];
        /* the game's frame: here nothing but waiting for the next 16 ms boundary */
        double end = frame0 + FRAME_S;
        if (w1 > end) over++;
        sleep_until(end);
        double t = now_s();
        frame_t[f] = t - frame0;
        frame0 = t;
    }
    double wall = now_s() - t_start;
    fflush(stdout);
    qsort(frame_t, (size_t)frames, sizeof *frame_t, cmp_double);
    qsort(work_t, (size_t)frames, sizeof *work_t, cmp_double);
    int lines = 0;
    for (int i = 0; i < n_chars; i++) lines += chars[i].lines;
    printf("npc: %d frames in %.2f s: frame time p50 %.2f ms, p95 %.2f ms, p99 %.2f ms, max %.2f ms; %d frame(s) over 16 ms\n", frames,
           wall, pct(frame_t, frames, 0.50) * 1e3, pct(frame_t, frames, 0.95) * 1e3, pct(frame_t, frames, 0.99) * 1e3,
           frame_t[frames - 1] * 1e3, over);
    printf("npc: language work per frame p50 %.2f ms, p95 %.2f ms, p99 %.2f ms (budget %.1f ms)\n", pct(work_t, frames, 0.50) * 1e3,
           pct(work_t, frames, 0.95) * 1e3, pct(work_t, frames, 0.99) * 1e3, budget_ms);
    printf("npc: %d characters, %d lines; generated %lld tokens (%.1f tokens/s of wall time, %.1f tokens/s of language work), prompt %lld tokens\n",
           n_chars, lines, gen_tokens, (double)gen_tokens / wall, work_total > 0 ? (double)gen_tokens / work_total : 0.0, prompt_tokens);
    free(frame_t), free(work_t);
    rc = 0;
done:
    for (int i = 0; i < n_chars; i++) {
        moe_sampler_free(chars[i].sampler);
        moe_ctx_free(chars[i].ctx);
    }
    moe_model_free(model);
    return rc;
usage:
    fprintf(stderr, "usage: npc [-m model.gguf] [-b auto|cpu|vulkan] [-t threads] [-n characters] [--frames N] [--budget-ms B]\n"
                    "           [--line tokens] [--chunk tokens] [--temp T] [-q]\n");
    return 2;
}
