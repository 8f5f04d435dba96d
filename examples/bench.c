/* bench — llama-bench-style prompt processing (pp) and token generation (tg) speed.

     build/bench -m model.gguf                       # pp512 and tg128, 3 repetitions, best backend
     build/bench -m model.gguf -b vulkan -p 512 -n 128 -r 5 --json
     build/bench -m model.gguf -b vulkan -d 4096 -n 128 -p 0   # tg128 with 4,096 tokens already in context
     build/bench -m model.gguf -b cpu -t 2 --profile          # + time per kernel kind, GB/s beside a measured peak
     MOE_VK_PROFILE=1 build/bench -m model.gguf -b vulkan   # + GPU time per kernel kind (stderr, at exit)
     build/bench -m model.gguf -b cpu -t 2 --batch 1,4,16,64 -n 16   # many contexts decoding together

   Flags: -m model  -b auto|cpu|vulkan  -dev device (Vulkan device index)  -p prompt tokens (512; 0 = skip)
          -n generated tokens (128; 0 = skip)  -r repetitions (3)  -t threads (CPU; 0 = all)
          -d depth: tokens already in the context before each test (0), as llama-bench's -d: the
             context is filled once (untimed), each repetition rewinds to it; the test is named
             "pp512 @ d4096" as llama-bench names it
          -c n_ctx (default d + p + n)  --json (one JSON object per test on stdout)
          --profile  after each test's timed repetitions, one more run with per-kernel-kind timing
                     (moe_ctx_profile; the timed runs are not profiled): per kind its time, share,
                     calls, and achieved GB/s (bytes the kind must read and write, estimated from the
                     shapes) and TFLOP/s, beside the peak that a bandwidth probe measured once
                     (moe_ctx_probe_bandwidth: a plain copy kernel on Vulkan, a multi-threaded read of
                     a 256 MiB buffer on the CPU). Profile lines start with "profile" (not "|")
          --gpu-budget B / --host-budget B   memory budgets for the weights (moe_load_params):
                     B in MiB ("4096"), or a percentage of the expert bytes ("25%": the non-expert
                     weights plus 25% of the experts)
          --sweep    runs everything at 100/50/25/10% of the expert bytes (the host budget on the
                     CPU backend, the GPU budget otherwise)
          --evict P,P  runs everything once per expert eviction policy (lru, lfu, slru; sets
                     MOE_EVICT; default slru): hit rates side by side
          --batch N,N,..  for each N: N contexts (each prefilled with its own 16 random tokens,
                     untimed) decode -n tokens each, once all together per step (moe_step_batch: one
                     forward pass for all) and once one after another (moe_step per context, from
                     the same positions), and once concurrently (each context's step submitted to
                     its worker thread with moe_step_submit, then all waited for: on the CPU they
                     share the model's one compute pool); prints the decode tokens/s of
                     each (all contexts' tokens over the wall time; median over -r repetitions),
                     batched / one-by-one, the process's thread count (Linux; -1 elsewhere), and
                     (Vulkan) the device memory of the pass's scratch that the first context keeps
                     (moe_ctx_get_stats' gpu_bytes_scratch of ctxs[0] minus that of another one)
   With a budget, each test line is followed by the expert cache's hits / misses (pairs of
   token and expert), hit rate and bytes streamed per token, and the resident host memory.
   As llama-bench: ppN feeds N random tokens to an empty context in one step (n_batch = N);
   tgN generates N tokens one step at a time from an empty context. Each test runs once
   untimed (warm-up), then -r times; t/s is the median (and mean ± sd) over the repetitions.
   Memory: weights / KV / scratch on the device as the context reports them, and the process's
   peak resident host memory. Public API only. */
#define _POSIX_C_SOURCE 200112L /* clock_gettime, setenv */
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
    fprintf(stderr, "usage: bench -m model.gguf [-b auto|cpu|vulkan] [-dev device] [-p 512] [-n 128] [-d depth] [-r 3] [-t threads] [-c n_ctx]\n"
                    "             [--json] [--profile] [--gpu-budget MiB|N%%] [--host-budget MiB|N%%] [--sweep] [--evict lru,lfu,slru]\n"
                    "             [--batch 1,4,16,64]\n"
                    "             [--pipeline-cache FILE]   Vulkan pipeline cache: read at load, written at exit (run twice:\n"
                    "                                       'first run' below is load + the first warm-up, where kernels build)\n"
                    "             [--max-submit-us N] [--low-priority]\n"
                    "  --max-submit-us N  cap the GPU time of one queue submission (moe_ctx_params.max_submit_us)\n"
                    "  --low-priority     submit to the low-priority queue where the device has one\n"
                    "  (Vulkan: every test also prints its submissions: how many per run, the longest, the GPU total)\n");
}

/* moe_ctx_params of every context (the options above) */
static uint32_t g_max_submit_us;
static int32_t g_low_priority;

/* resident host memory of this process in bytes (Linux), 0 if unknown */
static unsigned long long cur_rss(void) {
    FILE *f = fopen("/proc/self/status", "r");
    if (!f) return 0;
    char line[256];
    unsigned long long kb = 0;
    while (fgets(line, sizeof line, f))
        if (!strncmp(line, "VmRSS:", 6)) kb = strtoull(line + 6, NULL, 10);
    fclose(f);
    return kb * 1024ull;
}

/* "4096" (MiB) or "25%" of the expert bytes on top of the rest; 0 = none */
static unsigned long long parse_budget(const char *v, const moe_model_info *info) {
    if (!v) return 0;
    char *end = NULL;
    double x = strtod(v, &end);
    if (end && *end == '%') return (unsigned long long)((double)(info->weight_bytes - info->expert_bytes) + x / 100.0 * (double)info->expert_bytes);
    return (unsigned long long)(x * 1048576.0);
}

/* the context holds `depth` tokens (filled once, then rewound to) */
static int set_depth(moe_ctx *ctx, const moe_token *fill, int depth) {
    if (moe_ctx_pos(ctx) >= depth) return moe_ctx_rewind(ctx, depth) == MOE_OK ? 0 : -1;
    if (moe_ctx_rewind(ctx, 0) != MOE_OK) return -1;
    return depth > 0 && moe_step(ctx, fill, depth) != MOE_OK ? -1 : 0;
}

/* one timed run of a test after `depth` tokens: the seconds it took, or < 0 on error */
static double run_once(moe_ctx *ctx, const moe_token *toks, int n_prompt, int n_gen, const moe_token *fill, int depth) {
    if (depth >= 0 && set_depth(ctx, fill, depth) < 0) return -1; /* depth < 0: as it is */
    double t0 = now_s();
    if (n_prompt > 0 && moe_step(ctx, toks, n_prompt) != MOE_OK) return -1;
    for (int i = 0; i < n_gen; i++)
        if (moe_step(ctx, &toks[i], 1) != MOE_OK) return -1;
    return now_s() - t0;
}

/* per kernel kind of one phase: time, share, calls, GB/s and TFLOP/s beside the probe's peak */
static void print_profile(const moe_profile_entry *e, int n, int decode, const char *test, double peak_gbs, int json) {
    double tot = 0;
    uint64_t toks = 0;
    for (int i = 0; i < n; i++)
        if (e[i].decode == decode) tot += e[i].seconds, toks = e[i].tokens;
    if (tot <= 0) return;
    if (!json) {
        printf("profile %s (%s steps): %.3f ms in kernels, %.3f ms/token; peak %.1f GB/s (bandwidth probe)\n", test, decode ? "decode" : "prompt",
               tot * 1e3, toks ? tot * 1e3 / (double)toks : 0.0, peak_gbs);
        printf("profile %-44s %6s %10s %10s %7s %9s %6s %8s\n", "kind", "share", "ms", "ms/token", "calls", "GB/s", "%peak", "TFLOP/s");
    }
    for (int i = 0; i < n; i++) {
        if (e[i].decode != decode) continue;
        double s = e[i].seconds, gbs = s > 0 ? e[i].bytes / s / 1e9 : 0, tf = s > 0 ? e[i].flops / s / 1e12 : 0;
        if (json) {
            printf("{\"profile\": \"%s\", \"phase\": \"%s\", \"kind\": \"%s\", \"seconds\": %.6f, \"share\": %.4f, \"calls\": %d, \"tokens\": %llu, "
                   "\"bytes\": %.0f, \"flops\": %.0f, \"gbs\": %.3f, \"tflops\": %.4f, \"peak_gbs\": %.3f}\n",
                   test, decode ? "decode" : "prompt", e[i].kind, s, s / tot, e[i].calls, (unsigned long long)e[i].tokens, e[i].bytes, e[i].flops,
                   gbs, tf, peak_gbs);
            continue;
        }
        char g[16] = "-", pk[16] = "-", t[16] = "-";
        if (e[i].bytes > 0) {
            snprintf(g, sizeof g, "%.1f", gbs);
            if (peak_gbs > 0) snprintf(pk, sizeof pk, "%.0f%%", 100.0 * gbs / peak_gbs);
        }
        if (e[i].flops > 0) snprintf(t, sizeof t, "%.4f", tf);
        printf("profile %-44.44s %5.1f%% %10.3f %10.4f %7d %9s %6s %8s\n", e[i].kind, 100.0 * s / tot, s * 1e3,
               e[i].tokens ? s * 1e3 / (double)e[i].tokens : 0.0, e[i].calls, g, pk, t);
    }
}

static int bench_run(const char *model_path, moe_load_params lp, int n_prompt, int n_gen, int depth, int reps, int json, int n_ctx,
                     int header, const char *budget_label, int profile) {
    moe_model *model = NULL;
    moe_ctx *ctx = NULL;
    moe_token *toks = NULL;
    double *times = NULL;
    int rc = 1;
    double t0 = now_s();
    moe_status st = moe_load(model_path, &lp, &model);
    if (st) { fprintf(stderr, "bench: %s: %s\n", moe_status_str(st), moe_last_error()); goto done; }
    double t_load = now_s() - t0, t_first = -1;
    moe_model_info info;
    moe_model_get_info(model, &info);
    moe_ctx_params cp = {0};
    cp.n_ctx = n_ctx > 0 ? n_ctx : depth + n_prompt + n_gen + 16;
    cp.n_batch = n_prompt > 0 ? n_prompt : depth > 0 ? (depth < 512 ? depth : 512) : 1;
    cp.max_submit_us = g_max_submit_us;
    cp.low_priority = g_low_priority;
    if ((st = moe_ctx_new(model, &cp, &ctx))) { fprintf(stderr, "bench: %s: %s\n", moe_status_str(st), moe_last_error()); goto done; }
    int n_tok = n_prompt > n_gen ? n_prompt : n_gen;
    if (depth > n_tok) n_tok = depth;
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
    double peak_gbs = 0, copy_gbs = 0;
    if (profile) { /* once, before the tests */
        if (moe_ctx_probe_bandwidth(ctx, &peak_gbs, &copy_gbs) != MOE_OK) fprintf(stderr, "bench: bandwidth probe: %s\n", moe_last_error());
        else fprintf(stderr, "bench: bandwidth probe (%s): read %.1f GB/s, copy %.1f GB/s (read + written bytes)\n", be, peak_gbs, copy_gbs);
    }
    if (!json && header) {
        printf("| model                          |       size |     params | backend | threads |  test |              t/s |\n");
        printf("| ------------------------------ | ---------: | ---------: | ------- | ------: | ----: | ---------------: |\n");
    }
    for (int test = 0; test < 2; test++) {
        int np = test == 0 ? n_prompt : 0, ng = test == 1 ? n_gen : 0, n = np + ng;
        if (n == 0) continue;
        double tw = run_once(ctx, toks, np, ng, toks, depth);
        if (tw < 0) { /* warm-up: kernels are built and caches filled here */
            fprintf(stderr, "bench: %s\n", moe_last_error());
            goto done;
        }
        if (t_first < 0) t_first = tw;
        moe_stats s0, s1;
        moe_ctx_get_stats(ctx, &s0);
        int have_sub = moe_ctx_submit_times(ctx, NULL, NULL, NULL, 1) == MOE_OK; /* Vulkan with timestamps */
        for (int r = 0; r < reps; r++)
            if ((times[r] = run_once(ctx, toks, np, ng, toks, depth)) < 0) {
                fprintf(stderr, "bench: %s\n", moe_last_error());
                goto done;
            }
        moe_ctx_get_stats(ctx, &s1);
        uint64_t n_sub = 0;
        double sub_max_us = 0, sub_total_us = 0, t_sum = 0;
        if (have_sub) moe_ctx_submit_times(ctx, &n_sub, &sub_max_us, &sub_total_us, 1);
        for (int r = 0; r < reps; r++) t_sum += times[r];
        double mean = 0, sd = 0, tps[1000];
        for (int r = 0; r < reps; r++) mean += (tps[r] = n / times[r]) / reps;
        for (int r = 0; r < reps; r++) sd += (tps[r] - mean) * (tps[r] - mean) / (reps > 1 ? reps - 1 : 1);
        sd = sqrt(sd);
        qsort(tps, (size_t)reps, sizeof tps[0], cmp_double);
        double med = reps % 2 ? tps[reps / 2] : 0.5 * (tps[reps / 2 - 1] + tps[reps / 2]);
        char name[32];
        if (depth > 0) snprintf(name, sizeof name, "%s%d @ d%d", test == 0 ? "pp" : "tg", n, depth);
        else snprintf(name, sizeof name, "%s%d", test == 0 ? "pp" : "tg", n);
        unsigned long long hits = s1.expert_hits - s0.expert_hits, miss = s1.expert_misses - s0.expert_misses;
        unsigned long long bytes = s1.expert_bytes_streamed - s0.expert_bytes_streamed;
        double hit_rate = hits + miss ? (double)hits / (double)(hits + miss) : 1.0, per_tok = (double)bytes / ((double)n * reps);
        if (json)
            printf("{\"model\": \"%s\", \"arch\": \"%s\", \"size_bytes\": %llu, \"n_params\": %llu, \"backend\": \"%s\", \"test\": \"%s\", "
                   "\"n_tokens\": %d, \"n_depth\": %d, \"reps\": %d, \"tps_median\": %.3f, \"tps_mean\": %.3f, \"tps_sd\": %.3f, \"budget\": \"%s\", "
                   "\"gpu_budget_bytes\": %llu, \"host_budget_bytes\": %llu, \"expert_hits\": %llu, \"expert_misses\": %llu, "
                   "\"hit_rate\": %.4f, \"streamed_bytes_per_token\": %.0f, \"rss_bytes\": %llu, \"max_submit_us\": %u, "
                   "\"submissions_per_run\": %.1f, \"submit_max_ms\": %.3f, \"gpu_ms_per_run\": %.3f, \"wall_ms_per_run\": %.3f}\n",
                   model_path, info.arch, (unsigned long long)info.file_bytes, (unsigned long long)info.n_params, be, name, n, depth, reps, med,
                   mean, sd, budget_label, (unsigned long long)lp.gpu_budget_bytes, (unsigned long long)lp.host_budget_bytes, hits, miss,
                   hit_rate, per_tok, cur_rss(), g_max_submit_us, (double)n_sub / reps, sub_max_us / 1e3, sub_total_us / 1e3 / reps,
                   t_sum * 1e3 / reps);
        else {
            printf("| %-30.30s | %6.2f GiB | %8.2f B | %-7s | %7d | %5s | %8.2f (%.2f ± %.2f) |\n", info.arch, gib, (double)info.n_params / 1e9, be,
                   lp.n_threads, name, med, mean, sd);
            if (lp.gpu_budget_bytes || lp.host_budget_bytes)
                printf("|   budget %-21.21s | experts: hits %llu, misses %llu, hit rate %.1f%%, streamed %.2f MiB/token, host RSS %.2f GiB |\n",
                       budget_label, hits, miss, 100.0 * hit_rate, per_tok / 1048576.0, (double)cur_rss() / 1073741824.0);
            if (have_sub)
                printf("|   submissions %-16s | %.1f per run, longest %.3f ms (GPU), GPU %.3f ms per run, wall %.3f ms per run (max_submit_us %u%s) |\n",
                       name, (double)n_sub / reps, sub_max_us / 1e3, sub_total_us / 1e3 / reps, t_sum * 1e3 / reps, g_max_submit_us,
                       g_low_priority ? ", low priority" : "");
        }
        if (profile) { /* one more run, profiled */
            moe_profile_entry pe[256];
            if (set_depth(ctx, toks, depth) < 0 || moe_ctx_profile(ctx, 1) != MOE_OK) {
                fprintf(stderr, "bench: profile: %s\n", moe_last_error());
                goto done;
            }
            double t = run_once(ctx, toks, np, ng, toks, -1);
            int npe = moe_ctx_profile_get(ctx, pe, 256);
            moe_ctx_profile(ctx, 0);
            if (t < 0) {
                fprintf(stderr, "bench: %s\n", moe_last_error());
                goto done;
            }
            print_profile(pe, npe < 256 ? npe : 256, test, name, peak_gbs, json);
        }
        fflush(stdout);
    }
    moe_stats stats;
    moe_ctx_get_stats(ctx, &stats);
    fprintf(stderr, "bench: load %.3f s, first run %.3f s (load + first warm-up, pipelines built) | device memory: weights %.2f GiB, KV %.1f MiB, scratch %.1f MiB | peak host RSS %.2f GiB | t/s = median (mean ± sd) over %d reps\n",
            t_load, t_load + t_first, (double)stats.gpu_bytes_weights / 1073741824.0, (double)stats.gpu_bytes_kv / 1048576.0,
            (double)stats.gpu_bytes_scratch / 1048576.0, (double)peak_rss() / 1073741824.0, reps);
    rc = 0;
done:
    free(toks);
    free(times);
    moe_ctx_free(ctx); /* with MOE_VK_PROFILE=1 the Vulkan context logs its kernel times here */
    moe_model_free(model);
    return rc;
}

/* ---- --batch: N contexts decoding together (moe_step_batch) versus one after another ---- */
#define BATCH_PROMPT 16

/* every context back at its prompt, then n_gen decode steps: batched (mode 0), one by one (1), or
   concurrently (2: each context's step submitted to its own worker thread, all waited for; on
   the CPU the contexts share the model's one compute pool); seconds */
static double batch_once(moe_ctx **ctx, int n, const moe_token *toks, int n_gen, int mode) {
    const moe_token *tp[1024];
    int32_t one[1024];
    for (int i = 0; i < n; i++)
        if (moe_ctx_rewind(ctx[i], BATCH_PROMPT) != MOE_OK) return -1;
    double t0 = now_s();
    for (int g = 0; g < n_gen; g++) {
        for (int i = 0; i < n; i++) tp[i] = &toks[(g * 7 + i) % 1024], one[i] = 1;
        if (mode == 0) {
            if (moe_step_batch(ctx, tp, one, n) != MOE_OK) return -1;
        } else if (mode == 1) {
            for (int i = 0; i < n; i++)
                if (moe_step(ctx[i], tp[i], 1) != MOE_OK) return -1;
        } else {
            int bad = 0;
            for (int i = 0; i < n; i++)
                if (moe_step_submit(ctx[i], tp[i], 1) != MOE_OK) { n = i, bad = 1; } /* wait for the ones submitted */
            for (int i = 0; i < n; i++) bad |= moe_step_wait(ctx[i], UINT64_MAX) != MOE_OK;
            if (bad) return -1;
        }
    }
    return now_s() - t0;
}

static double median(double *v, int n) {
    qsort(v, (size_t)n, sizeof *v, cmp_double);
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

/* threads of this process (Linux: /proc/self/status), else -1 */
static int process_threads(void) {
    FILE *f = fopen("/proc/self/status", "r");
    char line[256];
    int n = -1;
    while (f && fgets(line, sizeof line, f))
        if (!strncmp(line, "Threads:", 8)) n = atoi(line + 8);
    if (f) fclose(f);
    return n;
}

static int bench_batch(const char *model_path, moe_load_params lp, const char *list, int n_gen, int reps, int json) {
    moe_model *model = NULL;
    moe_status st = moe_load(model_path, &lp, &model);
    if (st) { fprintf(stderr, "bench: %s: %s\n", moe_status_str(st), moe_last_error()); return 1; }
    moe_model_info info;
    moe_model_get_info(model, &info);
    const char *be = info.backend == MOE_BACKEND_VULKAN ? "vulkan" : "cpu";
    static moe_token toks[1024];
    unsigned long long s = 42;
    for (int i = 0; i < 1024; i++) {
        s = s * 6364136223846793005ull + 1442695040888963407ull;
        toks[i] = (moe_token)((s >> 33) % (unsigned long long)info.n_vocab);
    }
    if (!json) {
        printf("| model | backend | threads | contexts | tg%d each | batched t/s | one by one t/s | ratio | concurrent t/s | process threads | pass MiB |\n", n_gen);
        printf("| ----- | ------- | ------: | -------: | --------: | ----------: | -------------: | ----: | -------------: | --------------: | -------: |\n");
    }
    int rc = 0;
    for (const char *p = list; *p && !rc;) {
        int n = atoi(p);
        while (*p && *p != ',') p++;
        if (*p == ',') p++;
        if (n < 1 || n > 1024) { fprintf(stderr, "bench: --batch: contexts must be 1..1024\n"); rc = 2; break; }
        moe_ctx **ctx = calloc((size_t)n, sizeof *ctx);
        const moe_token *tp[1024];
        int32_t np[1024];
        moe_ctx_params cp = {0};
        cp.n_ctx = BATCH_PROMPT + n_gen + 16;
        cp.n_batch = BATCH_PROMPT;
        for (int i = 0; ctx && i < n && !rc; i++) {
            if ((st = moe_ctx_new(model, &cp, &ctx[i]))) { fprintf(stderr, "bench: %s\n", moe_last_error()); rc = 1; }
            tp[i] = &toks[(i * 37) % (1024 - BATCH_PROMPT)], np[i] = BATCH_PROMPT;
        }
        if (!ctx || rc || moe_step_batch(ctx, tp, np, n) != MOE_OK) { /* the prompts, untimed */
            fprintf(stderr, "bench: %s\n", moe_last_error());
            rc = 1;
        }
        /* the modes take turns, so that a load that changes over the run hits all alike */
        double tps[3] = {0, 0, 0}, t[3][1000];
        for (int mode = 0; mode < 3 && !rc; mode++)
            if (batch_once(ctx, n, toks, n_gen < 4 ? n_gen : 4, mode) < 0) rc = 1; /* warm-up */
        for (int r = 0; r < reps && !rc; r++)
            for (int mode = 0; mode < 3 && !rc; mode++)
                if ((t[mode][r] = batch_once(ctx, n, toks, n_gen, mode)) < 0) rc = 1;
                else t[mode][r] = (double)n * n_gen / t[mode][r];
        if (rc) fprintf(stderr, "bench: %s\n", moe_last_error());
        else
            for (int mode = 0; mode < 3; mode++) tps[mode] = median(t[mode], reps);
        /* all contexts have stepped and have their workers: the compute threads of every context
           (one pool per model on the CPU) plus one worker per context plus this thread */
        int n_thr = process_threads();
        moe_stats s0 = {0}, s1 = {0}; /* ctx[0] keeps the pass's lead; ctx[n - 1] has the same buffers but no lead */
        if (!rc && (moe_ctx_get_stats(ctx[0], &s0) || moe_ctx_get_stats(ctx[n - 1], &s1))) rc = 1, fprintf(stderr, "bench: %s\n", moe_last_error());
        double pass_mib = (double)(s0.gpu_bytes_scratch - s1.gpu_bytes_scratch) / 1048576.0;
        if (!rc) {
            if (json)
                printf("{\"model\": \"%s\", \"arch\": \"%s\", \"backend\": \"%s\", \"threads\": %d, \"test\": \"batch\", \"contexts\": %d, "
                       "\"n_gen\": %d, \"reps\": %d, \"tps_batched\": %.3f, \"tps_one_by_one\": %.3f, \"tps_concurrent\": %.3f, "
                       "\"process_threads\": %d, \"pass_mib\": %.2f}\n",
                       model_path, info.arch, be, lp.n_threads, n, n_gen, reps, tps[0], tps[1], tps[2], n_thr, pass_mib);
            else
                printf("| %s | %s | %d | %d | %d | %.2f | %.2f | %.2fx | %.2f | %d | %.2f |\n", info.arch, be, lp.n_threads, n, n_gen, tps[0], tps[1],
                       tps[0] / tps[1], tps[2], n_thr, pass_mib);
            fflush(stdout);
        }
        for (int i = 0; ctx && i < n; i++) moe_ctx_free(ctx[i]);
        free(ctx);
    }
    moe_model_free(model);
    return rc;
}

int main(int argc, char **argv) {
    const char *model_path = NULL, *backend_name = "auto", *gpu_budget = NULL, *host_budget = NULL, *batch = NULL, *evict = NULL;
    int n_prompt = 512, n_gen = 128, reps = 3, json = 0, n_ctx = 0, sweep = 0, depth = 0, profile = 0;
    moe_load_params lp = {0};
    lp.log = log_line;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "--json")) { json = 1; continue; }
        if (!strcmp(a, "--sweep")) { sweep = 1; continue; }
        if (!strcmp(a, "--profile")) { profile = 1; continue; }
        if (!strcmp(a, "--low-priority")) { g_low_priority = 1; continue; }
        if (i + 1 >= argc) { usage(); return 2; }
        const char *v = argv[++i];
        if (!strcmp(a, "-m")) model_path = v;
        else if (!strcmp(a, "-b")) {
            backend_name = v;
            lp.backend = !strcmp(v, "cpu") ? MOE_BACKEND_CPU : !strcmp(v, "vulkan") ? MOE_BACKEND_VULKAN : MOE_BACKEND_AUTO;
        } else if (!strcmp(a, "-dev")) lp.device_index = atoi(v);
        else if (!strcmp(a, "-d")) depth = atoi(v);
        else if (!strcmp(a, "-p")) n_prompt = atoi(v);
        else if (!strcmp(a, "-n")) n_gen = atoi(v);
        else if (!strcmp(a, "-r")) reps = atoi(v);
        else if (!strcmp(a, "-t")) lp.n_threads = atoi(v);
        else if (!strcmp(a, "-c")) n_ctx = atoi(v);
        else if (!strcmp(a, "--gpu-budget")) gpu_budget = v;
        else if (!strcmp(a, "--host-budget")) host_budget = v;
        else if (!strcmp(a, "--pipeline-cache")) lp.vk_pipeline_cache_path = v;
        else if (!strcmp(a, "--max-submit-us")) g_max_submit_us = (uint32_t)strtoul(v, NULL, 10);
        else if (!strcmp(a, "--batch")) batch = v;
        else if (!strcmp(a, "--evict")) evict = v;
        else { usage(); return 2; }
    }
    if (!model_path || n_prompt < 0 || n_gen < 0 || depth < 0 || reps < 1 || reps > 1000) { usage(); return 2; }
    (void)backend_name;
    if (batch) return bench_batch(model_path, lp, batch, n_gen, reps, json);
    moe_model_info info = {0};
    if (gpu_budget || host_budget || sweep) { /* the sizes: a vocab_only load reads a GGUF's tensor table only */
        for (int full = 0; full < 2 && !info.weight_bytes; full++) {
            moe_load_params q = {0};
            q.backend = MOE_BACKEND_CPU;
            q.vocab_only = !full; /* a model directory: a whole load, mapped on demand */
            q.host_budget_bytes = ~0ull;
            moe_model *m = NULL;
            moe_status st = moe_load(model_path, &q, &m);
            if (st && !full) continue; /* no tokenizer in the file */
            if (st) { fprintf(stderr, "bench: %s: %s\n", moe_status_str(st), moe_last_error()); return 1; }
            moe_model_get_info(m, &info);
            moe_model_free(m);
        }
        fprintf(stderr, "bench: weights %.2f GiB, of them experts %.2f GiB\n", (double)info.weight_bytes / 1073741824.0,
                (double)info.expert_bytes / 1073741824.0);
    }
    lp.gpu_budget_bytes = parse_budget(gpu_budget, &info);
    lp.host_budget_bytes = parse_budget(host_budget, &info);
    /* --evict a,b: everything once per eviction policy (MOE_EVICT, read at load) */
    char buf[128], *pols[8] = {NULL};
    int n_pol = 0, rc = 0, first = 1;
    snprintf(buf, sizeof buf, "%s", evict ? evict : "");
    for (char *t = strtok(buf, ","); t && n_pol < 8; t = strtok(NULL, ",")) {
        if (strcmp(t, "lru") && strcmp(t, "lfu") && strcmp(t, "slru")) {
            fprintf(stderr, "bench: --evict %s: expected lru, lfu or slru\n", t);
            return 2;
        }
        pols[n_pol++] = t;
    }
    for (int k = 0; k < (n_pol ? n_pol : 1); k++) {
        const char *pol = pols[k];
        if (pol) setenv("MOE_EVICT", pol, 1);
        const char *pl = pol ? pol : "", *sep = pol ? " " : "";
        if (!sweep) {
            char label[64];
            snprintf(label, sizeof label, "%s%s%s%s%s", pl, gpu_budget ? " gpu " : "", gpu_budget ? gpu_budget : "", host_budget ? " host " : "",
                     host_budget ? host_budget : "");
            if (label[0] == ' ') memmove(label, label + 1, strlen(label));
            rc |= bench_run(model_path, lp, n_prompt, n_gen, depth, reps, json, n_ctx, first, label, profile);
            first = 0;
            continue;
        }
        static const char *const pcts[] = {"100%", "50%", "25%", "10%"};
        for (int i = 0; i < 4; i++) {
            moe_load_params l = lp;
            char label[64];
            if (lp.backend == MOE_BACKEND_CPU) l.host_budget_bytes = parse_budget(pcts[i], &info);
            else l.gpu_budget_bytes = parse_budget(pcts[i], &info);
            snprintf(label, sizeof label, "%s%s%s %s", pl, sep, lp.backend == MOE_BACKEND_CPU ? "host" : "gpu", pcts[i]);
            rc |= bench_run(model_path, l, n_prompt, n_gen, depth, reps, json, n_ctx, first, label, profile);
            first = 0;
        }
    }
    return rc;
}
