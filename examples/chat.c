/* chat — an interactive chat in the terminal, with the model's own chat template.

     build/chat -m model.gguf
     build/chat -m model.gguf -s "You are a terse assistant." --temp 0.7 --top-p 0.9

   Each turn renders the whole conversation with moe_chat_apply() and tokenizes it, but only the
   tokens the context does not hold yet are fed: the context keeps every earlier turn (and the
   model's own answers, token for token), so a reply costs the new message, not the history.
   Where the template renders an earlier turn differently than it was generated (Qwen3 drops
   the <think> block of past answers, for instance) the context is rewound to the first
   differing token and continues from there.

   Commands: /reset starts a new conversation, /quit (or end of input) leaves.
   Flags: -m model  -s system prompt  -n max tokens per reply (1024)  -c n_ctx (4096)
          --temp 0.7  --top-k 20  --top-p 0.9  --min-p 0.05  --repeat-penalty 1.0  --seed 1
          -b auto|cpu|vulkan  -t threads
   The model needs a tokenizer and a chat template it knows (ChatML / Qwen3, Gemma, Harmony). */
#define _POSIX_C_SOURCE 200809L
#include "moe.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct chat {
    moe_model *model;
    moe_ctx *ctx;
    moe_sampler *smp;
    int n_vocab, n_ctx, max_reply;
    int n_fed, n_gen;          /* last turn: prompt tokens fed, tokens generated */
    /* the conversation */
    char **roles, **texts;
    int n_msg, cap_msg;
    /* the tokens in the context, in order */
    moe_token *held;
    int n_held, cap_held;
    /* scratch: the rendered conversation and its tokens */
    char *text;
    moe_token *toks;
    int32_t text_cap, toks_cap;
} chat;

static char *dup_str(const char *s, size_t n) {
    char *d = malloc(n + 1);
    if (d) memcpy(d, s, n), d[n] = 0;
    return d;
}

static int add_message(chat *c, const char *role, const char *text, size_t len) {
    if (c->n_msg == c->cap_msg) {
        int cap = c->cap_msg ? 2 * c->cap_msg : 16;
        char **r = realloc(c->roles, (size_t)cap * sizeof *r);
        if (!r) return 0;
        c->roles = r;
        char **t = realloc(c->texts, (size_t)cap * sizeof *t);
        if (!t) return 0;
        c->texts = t;
        c->cap_msg = cap;
    }
    c->roles[c->n_msg] = dup_str(role, strlen(role));
    c->texts[c->n_msg] = dup_str(text, len);
    if (!c->roles[c->n_msg] || !c->texts[c->n_msg]) {
        free(c->roles[c->n_msg]);
        free(c->texts[c->n_msg]);
        return 0;
    }
    c->n_msg++;
    return 1;
}

static void drop_messages(chat *c, int keep) {
    while (c->n_msg > keep) {
        c->n_msg--;
        free(c->roles[c->n_msg]);
        free(c->texts[c->n_msg]);
    }
}

/* The conversation as the template renders it (with the assistant prompt), tokenized into
   c->toks; the token count goes to *n_toks. moe's fill-a-buffer calls return MOE_OK with the count
   written, or MOE_ERR_BUFFER_TOO_SMALL with the count needed: grow the buffer and call again. */
static moe_status render_tokens(chat *c, int32_t *n_toks) {
    int32_t len = 0, n = 0;
    moe_status st;
    while ((st = moe_chat_apply(c->model, (const char *const *)c->roles, (const char *const *)c->texts, c->n_msg, 1,
                                c->text, c->text_cap, &len)) == MOE_ERR_BUFFER_TOO_SMALL) {
        char *t = realloc(c->text, (size_t)len + 1);
        if (!t) return MOE_ERR_NO_MEMORY;
        c->text = t, c->text_cap = len + 1;
    }
    if (st) return st;
    /* PARSE_SPECIAL: the template's markers are special tokens, not text */
    while ((st = moe_tokenize(c->model, c->text, len, c->toks, c->toks_cap, MOE_TOKENIZE_PARSE_SPECIAL, &n)) ==
           MOE_ERR_BUFFER_TOO_SMALL) {
        moe_token *t = realloc(c->toks, (size_t)n * sizeof *t);
        if (!t) return MOE_ERR_NO_MEMORY;
        c->toks = t, c->toks_cap = n;
    }
    *n_toks = n;
    return st;
}

static int hold(chat *c, moe_token t) {
    if (c->n_held == c->cap_held) {
        int cap = c->cap_held ? 2 * c->cap_held : 1024;
        moe_token *h = realloc(c->held, (size_t)cap * sizeof *h);
        if (!h) return 0;
        c->held = h, c->cap_held = cap;
    }
    c->held[c->n_held++] = t;
    return 1;
}

/* Brings the context up to date with the rendered conversation, then streams one reply and
   records it as the assistant's message. Returns 0 on success, else a moe_status. */
static moe_status reply(chat *c) {
    int32_t n = 0;
    moe_status st = render_tokens(c, &n);
    if (st) return st;
    if (n == 0) return MOE_ERR_INVALID_ARG;
    const moe_token *toks = c->toks;
    /* keep the common prefix, feed the rest */
    int common = 0;
    while (common < c->n_held && common < n && c->held[common] == toks[common]) common++;
    if (common == n) common--;   /* always feed at least one token, for fresh logits */
    if (common < c->n_held) {
        if ((st = moe_ctx_rewind(c->ctx, common))) return st;
        c->n_held = common;
    }
    if (n >= c->n_ctx) return MOE_ERR_CONTEXT_FULL;
    if ((st = moe_step(c->ctx, toks + common, n - common))) return st;
    for (int i = common; i < n; i++)
        if (!hold(c, toks[i])) return MOE_ERR_NO_MEMORY;
    c->n_fed = n - common;

    /* generate, streaming pieces; the reply text is collected for the conversation */
    size_t len = 0, cap = 256;
    char *text = malloc(cap);
    if (!text) return MOE_ERR_NO_MEMORY;
    st = MOE_OK;
    c->n_gen = 0;
    for (int i = 0; i < c->max_reply; i++) {
        moe_token t = moe_sample(c->smp, moe_logits(c->ctx, -1), c->n_vocab);
        if (t < 0) { st = MOE_ERR_INVALID_ARG; break; }
        if (moe_token_is_eog(c->model, t)) break;
        char piece[256];
        int32_t k = 0;
        if (moe_token_to_piece(c->model, t, piece, (int32_t)sizeof piece, &k) == MOE_OK && k > 0) {
            fwrite(piece, 1, (size_t)k, stdout);
            fflush(stdout);
            if (len + (size_t)k + 1 > cap) {
                char *nt = realloc(text, cap = 2 * (len + (size_t)k + 1));
                if (!nt) { st = MOE_ERR_NO_MEMORY; break; }
                text = nt;
            }
            memcpy(text + len, piece, (size_t)k);
            len += (size_t)k;
        }
        if ((st = moe_step(c->ctx, &t, 1))) break;
        if (!hold(c, t)) { st = MOE_ERR_NO_MEMORY; break; }
        c->n_gen++;
    }
    printf("\n");
    if (!add_message(c, "assistant", text, len) && !st) st = MOE_ERR_NO_MEMORY;
    free(text);
    return st;
}

/* 1 if the model can tokenize and has a chat template moe knows; otherwise says why */
static int check_model(const moe_model *m) {
    moe_token t[64];
    int32_t n = 0;
    moe_status r = moe_tokenize(m, "hi", 2, t, 64, 0, &n);
    if (r) {
        fprintf(stderr, "chat: this model has no usable tokenizer (%s: %s).\n"
                        "      chat needs a GGUF with tokenizer metadata (tokenizer.ggml.*), as llama.cpp's converter writes.\n",
                moe_status_str(r), moe_last_error());
        return 0;
    }
    const char *roles[] = {"user"}, *texts[] = {"hi"};
    char buf[4096];
    r = moe_chat_apply(m, roles, texts, 1, 1, buf, (int32_t)sizeof buf, &n);
    if (r && r != MOE_ERR_BUFFER_TOO_SMALL) {
        fprintf(stderr, "chat: this model has no chat template moe can render (%s: %s).\n"
                        "      Use build/generate for plain completion instead.\n",
                moe_status_str(r), moe_last_error());
        return 0;
    }
    return 1;
}

static void usage(void) {
    fprintf(stderr, "usage: chat -m model.gguf [-s system] [-n 1024] [-c 4096] [--temp 0.7] [--top-k 20] [--top-p 0.9]\n"
                    "            [--min-p 0.05] [--repeat-penalty 1.0] [--seed 1] [-b auto|cpu|vulkan] [-t threads]\n");
}

int main(int argc, char **argv) {
    const char *model_path = NULL, *system = NULL;
    chat c = {.max_reply = 1024};
    moe_load_params lp = {0};
    moe_ctx_params cp = {.n_ctx = 4096};
    moe_sampler_params sp = {.temperature = 0.7f, .top_k = 20, .top_p = 0.9f, .min_p = 0.05f, .seed = 1};
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (i + 1 >= argc) { usage(); return 2; }
        const char *v = argv[++i];
        if (!strcmp(a, "-m")) model_path = v;
        else if (!strcmp(a, "-s")) system = v;
        else if (!strcmp(a, "-n")) c.max_reply = atoi(v);
        else if (!strcmp(a, "-c")) cp.n_ctx = atoi(v);
        else if (!strcmp(a, "--temp")) sp.temperature = (float)atof(v);
        else if (!strcmp(a, "--top-k")) sp.top_k = atoi(v);
        else if (!strcmp(a, "--top-p")) sp.top_p = (float)atof(v);
        else if (!strcmp(a, "--min-p")) sp.min_p = (float)atof(v);
        else if (!strcmp(a, "--repeat-penalty")) sp.repeat_penalty = (float)atof(v);
        else if (!strcmp(a, "--seed")) sp.seed = strtoull(v, NULL, 10);
        else if (!strcmp(a, "-b")) lp.backend = !strcmp(v, "cpu") ? MOE_BACKEND_CPU : !strcmp(v, "vulkan") ? MOE_BACKEND_VULKAN : MOE_BACKEND_AUTO;
        else if (!strcmp(a, "-t")) lp.n_threads = atoi(v);
        else { usage(); return 2; }
    }
    if (!model_path) { usage(); return 2; }

    int rc = 1;
    char *line = NULL;
    size_t line_cap = 0;
    moe_status st = moe_load(model_path, &lp, &c.model);
    if (st) { fprintf(stderr, "chat: %s: %s\n", moe_status_str(st), moe_last_error()); goto done; }
    if (!check_model(c.model)) goto done;
    if ((st = moe_ctx_new(c.model, &cp, &c.ctx)) || (st = moe_sampler_new(&sp, &c.smp))) {
        fprintf(stderr, "chat: %s: %s\n", moe_status_str(st), moe_last_error());
        goto done;
    }
    moe_model_info info;
    moe_model_get_info(c.model, &info);
    c.n_vocab = info.n_vocab;
    c.n_ctx = cp.n_ctx;
    if (system && !add_message(&c, "system", system, strlen(system))) goto done;
    fprintf(stderr, "%s, %d layers, %d experts, on %s. /reset starts over, /quit leaves.\n", info.arch, info.n_layer,
            info.n_expert, info.backend == MOE_BACKEND_VULKAN ? "Vulkan" : "the CPU");

    for (;;) {
        printf("> ");
        fflush(stdout);
        ssize_t got = getline(&line, &line_cap, stdin);
        if (got < 0) { printf("\n"); break; }
        while (got > 0 && (line[got - 1] == '\n' || line[got - 1] == '\r')) line[--got] = 0;
        if (got == 0) continue;
        if (!strcmp(line, "/quit")) break;
        if (!strcmp(line, "/reset")) {
            drop_messages(&c, system ? 1 : 0);
            moe_ctx_rewind(c.ctx, 0);
            moe_sampler_reset(c.smp);
            c.n_held = 0;
            fprintf(stderr, "(new conversation)\n");
            continue;
        }
        int before = c.n_msg;
        if (!add_message(&c, "user", line, (size_t)got)) goto done;
        st = reply(&c);
        if (st == MOE_ERR_CONTEXT_FULL) {
            fprintf(stderr, "(the context of %d tokens is full: /reset to start over)\n", c.n_ctx);
            drop_messages(&c, before);
        } else if (st) {
            fprintf(stderr, "chat: %s: %s\n", moe_status_str(st), moe_last_error());
            goto done;
        }
        else
            fprintf(stderr, "(prefilled %d new tokens, generated %d; %d in context)\n", c.n_fed, c.n_gen,
                    moe_ctx_pos(c.ctx));
    }
    rc = 0;
done:
    free(line);
    drop_messages(&c, 0);
    free(c.roles);
    free(c.texts);
    free(c.held);
    free(c.text);
    free(c.toks);
    moe_sampler_free(c.smp);
    moe_ctx_free(c.ctx);
    moe_model_free(c.model);
    return rc;
}
