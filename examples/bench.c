/* bench — llama-bench-style prompt processing (pp) and token generation (tg) speed.

     build/bench -m model.gguf                       # pp512 and tg128, 3 repetitions, best backend
     build/bench -m model.gguf -b vulkan -p 512 -n 128 -r 5 --json
     MOE_VK_PROFILE=1 build/bench -m model.gguf -b vulkan   # + GPU time per kernel kind (stderr)

   Flags: -m model  -b auto|cpu|vulkan  -d device  -p prompt tokens (512; 0 = skip)
          -n generated tokens (128; 0 = skip)  -r repetitions (3)  -t threads (CPU; 0 = all)
          -c n_ctx (default p + n)  --json (one JSON object per test on stdout)
   As llama-bench: ppN feeds N random tokens to an empty context in one step (n_batch = N);
   tgN generates N tokens one step at a time from an empty context. Each test runs once
   untimed (warm-up), then -r times; t/s is the median (and mean ± sd) over the repetitions.
   Memory: weights / KV / scratch on the device as the context reports them, and the process's
   peak resident host memory. Public API only. */
#define _POSIX_C_SOURCE 199309L
#include "moe.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static void log_line(int32_t level, const char *msg, void *user) {
    (void)user;
    if (level <= MOE_LOG_INFO) fprintf(stderr, "moe: %s\n", msg);
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

/* peak resident set size of this process in bytes (Linux), 0 if unknown */
static unsigned long long peak_rss(void) {
    FILE *f = fopen("/proc/self/status", "r");
    if (!f) return 0;
    char line[256];
    unsigned long long kb = 0;
    while (fgets(line, sizeof line, f))
        if (!strncmp(line, "VmHWM:", 6)) kb = strtoull(line + 6, NULL, 10);
    fclose(f);
    return kb * 1024ull;
}

static void usage(void) {
    fprintf(stderr, "usage: bench -m model.gguf [-b auto|cpu|vulkan] [-d device] [-p 512] [-n 128] [-r 3] [-t threads] [-c n_ctx] [--json]\n");
}

/* one timed run of a test: the seconds it took, or < 0 on error */
static double run_once(moe_ctx *ctx, const moe_token *toks, int n_prompt, int n_gen) {
    if (moe_ctx_rewind(ctx, 0) != MOE_OK) return -1;
    double t0 = now_s();
    if (n_prompt > 0 && moe_step(ctx, toks, n_prompt) != MOE_OK) return -1;
    for (int i = 0; i < n_gen; i++)
        if (moe_step(ctx, &toks[i], 1) != MOE_OK) return -1;
    return now_s() - t0;
}

int main(int argc, char **argv) {
    const char *model_path = NULL, *backend_name = "auto";
    int n_prompt = 512, n_gen = 128, reps = 3, json = 0, n_ctx = 0;
    moe_load_params lp = {0};
    lp.log = log_line;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "--json")) { json = 1; continue; }
        if (i + 1 >= argc) { usage(); return 2; }
        const char *v = argv[++i];
        if (!strcmp(a, "-m")) model_path = v;
        else if (!strcmp(a, "-b")) {
            backend_name = v;
            lp.backend = !strcmp(v, "cpu") ? MOE_BACKEND_CPU : !strcmp(v, "vulkan") ? MOE_BACKEND_VULKAN : MOE_BACKEND_AUTO;
        } else if (!strcmp(a, "-d")) lp.device_index = atoi(v);
        else if (!strcmp(a, "-p")) n_prompt = atoi(v);
        else if (!strcmp(a, "-n")) n_gen = atoi(v);
        else if (!strcmp(a, "-r")) reps = atoi(v);
        else if (!strcmp(a, "-t")) lp.n_threads = atoi(v);
        else if (!strcmp(a, "-c")) n_ctx = atoi(v);
        else { usage(); return 2; }
    }
    if (!model_path || n_prompt < 0 || n_gen < 0 || reps < 1 || reps > 1000) { usage(); return 2; }
    (void)backend_name;

    moe_model *model = NULL;
    moe_ctx *ctx = NULL;
    moe_token *toks = NULL;
    double *times = NULL;
    int rc = 1;
    double t0 = now_s();
    moe_status st = moe_load(model_path, &lp, &model);
    if (st) { fprintf(stderr, "bench: %s: %s\n", moe_status_str(st), moe_last_error()); goto done; }
    double t_load = now_s() - t0;
    moe_model_info info;
    moe_model_get_info(model, &info);
    moe_ctx_params cp = {0};
    cp.n_ctx = n_ctx > 0 ? n_ctx : n_prompt + n_gen + 16;
    cp.n_batch = n_prompt > 0 ? n_prompt : 1;
    if ((st = moe_ctx_new(model, &cp, &ctx))) { fprintf(stderr, "bench: %s: %s\n", moe_status_str(st), moe_last_error()); goto done; }
    int n_tok = n_prompt > n_gen ? n_prompt : n_gen;
    toks = malloc(((size_t)n_tok + 1) * sizeof *toks);
    times = malloc((size_t)reps * sizeof *times);
    if (!toks || !times) goto done;
    unsigned long long s = 42;
    for (int i = 0; i < n_tok; i++) {
        s = s * 6364136223846793005ull + 1442695040888963407ull;
        toks[i] = (moe_token)((s >> 33) % (unsigned long long)info.n_vocab);
    }
    const char *be = info.backend == MOE_BACKEND_VULKAN ? "vulkan" : "cpu";
    double gib = (double)info.file_bytes / (1024.0 * 1024.0 * 1024.0);
    if (!json) {
        printf("| model                          |       size |     params | backend | threads |  test |              t/s |\n");
        printf("| ------------------------------ | ---------: | ---------: | ------- | ------: | ----: | ---------------: |\n");
    }
    for (int test = 0; test < 2; test++) {
        int np = test == 0 ? n_prompt : 0, ng = test == 1 ? n_gen : 0, n = np + ng;
        if (n == 0) continue;
        if (run_once(ctx, toks, np, ng) < 0) { /* warm-up: kernels are built and caches filled here */
            fprintf(stderr, "bench: %s\n", moe_last_error());
            goto done;
        }
        for (int r = 0; r < reps; r++)
            if ((times[r] = run_once(ctx, toks, np, ng)) < 0) {
                fprintf(stderr, "bench: %s\n", moe_last_error());
                goto done;
            }
        double mean = 0, sd = 0, tps[1000];
        for (int r = 0; r < reps; r++) mean += (tps[r] = n / times[r]) / reps;
        for (int r = 0; r < reps; r++) sd += (tps[r] - mean) * (tps[r] - mean) / (reps > 1 ? reps - 1 : 1);
        sd = sqrt(sd);
        qsort(tps, (size_t)reps, sizeof tps[0], cmp_double);
        double med = reps % 2 ? tps[reps / 2] : 0.5 * (tps[reps / 2 - 1] + tps[reps / 2]);
        char name[32];
        snprintf(name, sizeof name, "%s%d", test == 0 ? "pp" : "tg", n);
        if (json)
            printf("{\"model\": \"%s\", \"arch\": \"%s\", \"size_bytes\": %llu, \"n_params\": %llu, \"backend\": \"%s\", \"test\": \"%s\", "
                   "\"n_tokens\": %d, \"reps\": %d, \"tps_median\": %.3f, \"tps_mean\": %.3f, \"tps_sd\": %.3f}\n",
                   model_path, info.arch, (unsigned long long)info.file_bytes, (unsigned long long)info.n_params, be, name, n, reps, med,
                   mean, sd);
        else
            printf("| %-30.30s | %6.2f GiB | %8.2f B | %-7s | %7d | %5s | %8.2f (%.2f ± %.2f) |\n", info.arch, gib, (double)info.n_params / 1e9, be,
                   lp.n_threads, name, med, mean, sd);
        fflush(stdout);
    }
    moe_stats stats;
    moe_ctx_get_stats(ctx, &stats);
    fprintf(stderr, "bench: load %.2f s | device memory: weights %.2f GiB, KV %.1f MiB, scratch %.1f MiB | peak host RSS %.2f GiB | t/s = median (mean ± sd) over %d reps\n",
            t_load, (double)stats.gpu_bytes_weights / 1073741824.0, (double)stats.gpu_bytes_kv / 1048576.0,
            (double)stats.gpu_bytes_scratch / 1048576.0, (double)peak_rss() / 1073741824.0, reps);
    rc = 0;
done:
    free(toks);
    free(times);
    moe_ctx_free(ctx); /* with MOE_VK_PROFILE=1 the Vulkan context logs its kernel times here */
    moe_model_free(model);
    return rc;
}
