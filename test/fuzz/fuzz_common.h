/* fuzz_common.h — what the libFuzzer harnesses of test/fuzz/ and their seed maker share: inputs
   that stand for several files are parts joined by FUZZ_SEP, written into a private directory. */
#ifndef MOE_FUZZ_COMMON_H
#define MOE_FUZZ_COMMON_H
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include "../../moe.h"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define FUZZ_SEP "\n#=moe=#\n"
#define MOE_FUZZ_UNUSED __attribute__((unused))

static const char *const k_hf_parts[] = {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"};
static const char *const k_json_parts[] = {"tokenizer.json", "tokenizer_config.json", "config.json"};

/* Splits data at FUZZ_SEP into at most n parts (the last takes the rest) and writes part i to
   dir/names[i] (dir is created); files of parts that are absent are removed. Returns the number
   of parts, or -1 if a file cannot be written. */
MOE_FUZZ_UNUSED static int fuzz_write_parts(const char *dir, const uint8_t *data, size_t size, const char *const *names, int n) {
    char path[1024];
    mkdir(dir, 0700);
    size_t seplen = strlen(FUZZ_SEP), at = 0;
    int have = 1, count = 0;
    for (int k = 0; k < n; k++) {
        snprintf(path, sizeof path, "%s/%s", dir, names[k]);
        if (!have) {
            unlink(path);
            continue;
        }
        const uint8_t *sep = k + 1 < n ? memmem(data + at, size - at, FUZZ_SEP, seplen) : NULL;
        size_t len = sep ? (size_t)(sep - (data + at)) : size - at;
        FILE *f = fopen(path, "wb");
        if (!f) return -1;
        int ok = len == 0 || fwrite(data + at, 1, len, f) == len;
        if (fclose(f) != 0 || !ok) return -1;
        count++;
        if (sep) at += len + seplen;
        else have = 0;
    }
    return count;
}

/* Removes dir/names[0..n) and dir. */
MOE_FUZZ_UNUSED static void fuzz_remove_parts(const char *dir, const char *const *names, int n) {
    char path[1024];
    for (int k = 0; k < n; k++) {
        snprintf(path, sizeof path, "%s/%s", dir, names[k]);
        unlink(path);
    }
    rmdir(dir);
}

/* A private scratch directory for this process (in /dev/shm when there is one). */
MOE_FUZZ_UNUSED static const char *fuzz_scratch_dir(void) {
    static char dir[64];
    if (!dir[0]) {
        struct stat sb;
        snprintf(dir, sizeof dir, "%s/moe_fuzz_XXXXXX", stat("/dev/shm", &sb) == 0 && S_ISDIR(sb.st_mode) ? "/dev/shm" : "/tmp");
        if (!mkdtemp(dir)) abort();
    }
    return dir;
}

/* The context kinds of the state harness: the selector byte of a state input picks one. */
#define FUZZ_STATE_KINDS 3
MOE_FUZZ_UNUSED static void fuzz_state_params(int kind, moe_ctx_params *cp) {
    memset(cp, 0, sizeof *cp);
    cp->n_ctx = 16;
    cp->kv_type = kind == 1 ? MOE_KV_F32 : MOE_KV_F16;
    cp->logits_all = kind == 2;
}

/* Every logit finite (a step hands out no NaN/Inf). */
MOE_FUZZ_UNUSED static int fuzz_all_finite(const float *x, int n) {
    for (int i = 0; i < n; i++)
        if (!(x[i] - x[i] == 0.0f)) return 0;
    return 1;
}
#endif
