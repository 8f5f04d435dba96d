/* tokenize_bench — tokenizer encoding speed in MB/s (one thread), public API only.

       build/tokenize_bench [-c corpus.txt] [-t seconds] VOCAB...

   VOCAB: a .gguf file, a tokenizer.json, or a directory holding one (test/fetch_vocabs.sh puts
   Qwen3, Gemma 3 and gpt-oss vocabularies under .cache/vocabs/). Two measurements per vocabulary,
   the same two gen/tokenizer_refs.py takes of Hugging Face `tokenizers`: every corpus line on its
   own ("lines"), and the whole corpus in one call ("whole"). Special tokens are parsed. */
#define _POSIX_C_SOURCE 200809L
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include "moe.h"

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static char *read_all(const char *path, long *size) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    fseek(f, 0, SEEK_END);
    *size = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *b = malloc((size_t)*size + 1);
    if (b && fread(b, 1, (size_t)*size, f) != (size_t)*size) { free(b); b = NULL; }
    fclose(f);
    return b;
}

int main(int argc, char **argv) {
    const char *corpus_path = "test/fixtures/tokenizer/corpus.txt";
    double seconds = 2.0;
    int first = 1;
    while (first < argc && argv[first][0] == '-') {
        if (!strcmp(argv[first], "-c") && first + 1 < argc) corpus_path = argv[first + 1];
        else if (!strcmp(argv[first], "-t") && first + 1 < argc) seconds = atof(argv[first + 1]);
        else { fprintf(stderr, "usage: %s [-c corpus.txt] [-t seconds] VOCAB...\n", argv[0]); return 2; }
        first += 2;
    }
    static const char *defaults[] = {".cache/vocabs/qwen3", ".cache/vocabs/gemma3", ".cache/vocabs/gptoss"};
    const char **vocabs = first < argc ? (const char **)argv + first : defaults;
    int n_vocabs = first < argc ? argc - first : 3;
    long size = 0;
    char *corpus = read_all(corpus_path, &size);
    if (!corpus) { fprintf(stderr, "cannot read %s\n", corpus_path); return 1; }
    /* lines (split on \n) */
    int n_lines = 0;
    for (long i = 0; i < size; i++) n_lines += corpus[i] == '\n';
    long *starts = malloc(sizeof(long) * (size_t)(n_lines + 1));
    int32_t *lens = malloc(sizeof(int32_t) * (size_t)(n_lines + 1));
    int k = 0;
    for (long i = 0, s = 0; i < size; i++)
        if (corpus[i] == '\n') { starts[k] = s; lens[k++] = (int32_t)(i - s); s = i + 1; }
    int32_t cap = (int32_t)size + 16;
    moe_token *ids = malloc(sizeof(moe_token) * (size_t)cap);
    printf("corpus: %s, %ld bytes, %d lines; one thread\n", corpus_path, size, n_lines);
    printf("%-28s %9s %10s %12s %12s %14s\n", "vocabulary", "load s", "tokens", "lines MB/s", "whole MB/s", "bytes/token");
    for (int v = 0; v < n_vocabs; v++) {
        moe_load_params lp = {0};
        lp.vocab_only = 1;
        moe_model *m = NULL;
        double t0 = now();
        if (moe_load(vocabs[v], &lp, &m) != MOE_OK) { printf("%-28s %s\n", vocabs[v], moe_last_error()); continue; }
        double t_load = now() - t0;
        /* lines: best pass of as many as fit in the time */
        double best_lines = 1e30, best_whole = 1e30, start = now();
        long n_tok = 0;
        int passes = 0;
        do {
            t0 = now();
            long nt = 0;
            for (int i = 0; i < n_lines; i++) {
                int32_t r = 0;
                if (moe_tokenize(m, corpus + starts[i], lens[i], ids, cap, MOE_TOKENIZE_PARSE_SPECIAL, &r)) { printf("tokenize failed: %s\n", moe_last_error()); return 1; }
                nt += r;
            }
            double dt = now() - t0;
            if (dt < best_lines) best_lines = dt;
            n_tok = nt;
            t0 = now();
            int32_t r = 0;
            if (moe_tokenize(m, corpus, (int32_t)size, ids, cap, MOE_TOKENIZE_PARSE_SPECIAL, &r)) { printf("tokenize failed: %s\n", moe_last_error()); return 1; }
            dt = now() - t0;
            if (dt < best_whole) best_whole = dt;
            passes++;
        } while (now() - start < seconds || passes < 3);
        printf("%-28s %9.2f %10ld %12.1f %12.1f %14.2f\n", vocabs[v], t_load, n_tok, (double)(size - n_lines) / best_lines / 1e6,
               (double)size / best_whole / 1e6, (double)size / (double)n_tok);
        moe_model_free(m);
    }
    free(ids);
    free(starts);
    free(lens);
    free(corpus);
    return 0;
}
