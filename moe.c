/* moe.c — everything of moe that is not Vulkan: platform, file formats, quant codecs, tokenizer,
   architectures (the forward pass), the CPU backend, sampling and the public API.

   Sections, in data-flow order:
     1. platform        allocation, thread-local errors, logging, file mapping, threads, clock
     2. gguf            the GGUF reader (every read bounds-checked)
     3. quant codecs    block layouts, dequantize, quantize, dot products
     4. tokenizer       vocabularies, BPE, special tokens, chat templates
     5. model           hyperparameters, binding tensor names to weights
     6. forward passes  one function per block type, written against the op interface
     7. CPU backend     the op interface executed on the host
     8. contexts        KV cache, step, rewind, save/load
     9. sampling
    10. public API glue
*/
#define _GNU_SOURCE
#define MOE_INTERNAL
#include "moe.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <math.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#if defined(__GNUC__)
#define MOE_MAYBE_UNUSED __attribute__((unused))
#else
#define MOE_MAYBE_UNUSED
#endif

/* ============================================================================================ */
/* 1. platform                                                                                   */
/* ============================================================================================ */

/* Allocation goes through these two so that tests can inject failures (moe_test_fail_alloc_after). */
static _Atomic long g_alloc_countdown = -1; /* test hook only: -1 = never fail */

static void *moe_malloc(size_t n) {
    long c = atomic_load(&g_alloc_countdown);
    if (c >= 0) {
        if (atomic_fetch_sub(&g_alloc_countdown, 1) <= 0) return NULL;
    }
    return malloc(n ? n : 1);
}
static void *moe_calloc(size_t count, size_t size) {
    if (size && count > SIZE_MAX / size) return NULL;
    void *p = moe_malloc(count * size);
    if (p) memset(p, 0, count * size);
    return p;
}
static void moe_free(void *p) { free(p); }

/* Test hook (not in moe.h): the n-th allocation from now fails; -1 switches failures off. */
MOE_API void moe_test_fail_alloc_after(long n);
void moe_test_fail_alloc_after(long n) { atomic_store(&g_alloc_countdown, n); }

static _Thread_local char tl_error[512];

static moe_status set_error(moe_status status, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(tl_error, sizeof tl_error, fmt, ap);
    va_end(ap);
    return status;
}

void moe_internal_set_error(moe_status status, const char *fmt, ...) {
    va_list ap;
    (void)status;
    va_start(ap, fmt);
    vsnprintf(tl_error, sizeof tl_error, fmt, ap);
    va_end(ap);
}

const char *moe_last_error(void) { return tl_error; }

const char *moe_version(void) { return "0.1.0"; }

const char *moe_status_str(moe_status s) {
    switch (s) {
    case MOE_OK: return "ok";
    case MOE_ERR_INVALID_ARG: return "invalid argument";
    case MOE_ERR_IO: return "i/o error";
    case MOE_ERR_FORMAT: return "bad file format";
    case MOE_ERR_UNSUPPORTED: return "unsupported";
    case MOE_ERR_NO_MEMORY: return "out of memory";
    case MOE_ERR_DEVICE: return "device error";
    case MOE_ERR_CONTEXT_FULL: return "context full";
    case MOE_ERR_BUFFER_TOO_SMALL: return "buffer too small";
    case MOE_ERR_CANCELLED: return "cancelled";
    default: return "unknown status";
    }
}

typedef struct moe_logger {
    void (*fn)(int32_t level, const char *msg, void *user);
    void *user;
} moe_logger;

static void log_msg(const moe_logger *lg, int32_t level, const char *fmt, ...) {
    if (!lg || !lg->fn) return;
    char buf[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    lg->fn(level, buf, lg->user);
}

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* ---- read-only file mapping ---------------------------------------------------------------- */
typedef struct moe_file {
    const uint8_t *data;
    size_t size;
    int fd;
} moe_file;

/* populate: fault every page in now (one sequential read) instead of page by page during the
   first steps; used when the weights are meant to stay resident. */
static moe_status file_map(moe_file *f, const char *path, int populate) {
    memset(f, 0, sizeof *f);
    f->fd = -1;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return set_error(MOE_ERR_IO, "cannot open '%s': %s", path, strerror(errno));
    struct stat st;
    if (fstat(fd, &st) != 0) {
        close(fd);
        return set_error(MOE_ERR_IO, "cannot stat '%s': %s", path, strerror(errno));
    }
    if (!S_ISREG(st.st_mode)) {
        close(fd);
        return set_error(MOE_ERR_IO, "'%s' is not a regular file", path);
    }
    if (st.st_size == 0) {
        close(fd);
        return set_error(MOE_ERR_FORMAT, "'%s' is empty", path);
    }
    int flags = MAP_PRIVATE;
#ifdef MAP_POPULATE
    if (populate) flags |= MAP_POPULATE;
#else
    (void)populate;
#endif
    void *p = mmap(NULL, (size_t)st.st_size, PROT_READ, flags, fd, 0);
    if (p == MAP_FAILED) {
        close(fd);
        return set_error(MOE_ERR_IO, "cannot map '%s': %s", path, strerror(errno));
    }
    f->data = p;
    f->size = (size_t)st.st_size;
    f->fd = fd;
    return MOE_OK;
}

static void file_unmap(moe_file *f) {
    if (f->data) munmap((void *)f->data, f->size);
    if (f->fd >= 0) close(f->fd);
    f->data = NULL;
    f->fd = -1;
}

/* ---- thread pool ----------------------------------------------------------------------------
   A fixed set of workers that run one parallel-for at a time. The calling thread takes part, so
   a pool of n threads has n-1 workers. Tasks are handed out by an atomic counter. */
typedef void (*task_fn)(void *arg, int64_t task, int thread);

typedef struct thread_pool {
    int n_threads;
    pthread_t *workers;
    pthread_mutex_t mu;
    pthread_cond_t wake, done;
    uint64_t generation;   /* bumped for every parallel-for */
    int n_busy;            /* workers still inside the current parallel-for */
    int quit;
    task_fn fn;
    void *arg;
    int64_t n_tasks;
    _Atomic int64_t next;
} thread_pool;

typedef struct worker_arg { thread_pool *pool; int index; } worker_arg;

static void pool_drain(thread_pool *p, int thread) {
    for (;;) {
        int64_t t = atomic_fetch_add(&p->next, 1);
        if (t >= p->n_tasks) break;
        p->fn(p->arg, t, thread);
    }
}

static void *pool_worker(void *varg) {
    worker_arg *wa = varg;
    thread_pool *p = wa->pool;
    int index = wa->index;
    moe_free(wa);
    uint64_t seen = 0;
    pthread_mutex_lock(&p->mu);
    for (;;) {
        while (!p->quit && p->generation == seen) pthread_cond_wait(&p->wake, &p->mu);
        if (p->quit) break;
        seen = p->generation;
        pthread_mutex_unlock(&p->mu);
        pool_drain(p, index);
        pthread_mutex_lock(&p->mu);
        if (--p->n_busy == 0) pthread_cond_signal(&p->done);
    }
    pthread_mutex_unlock(&p->mu);
    return NULL;
}

static void pool_free(thread_pool *p) {
    if (!p) return;
    if (p->workers) {
        pthread_mutex_lock(&p->mu);
        p->quit = 1;
        pthread_cond_broadcast(&p->wake);
        pthread_mutex_unlock(&p->mu);
        for (int i = 1; i < p->n_threads; i++)
            if (p->workers[i]) pthread_join(p->workers[i], NULL);
        moe_free(p->workers);
    }
    pthread_mutex_destroy(&p->mu);
    pthread_cond_destroy(&p->wake);
    pthread_cond_destroy(&p->done);
    moe_free(p);
}

static moe_status pool_new(int n_threads, thread_pool **out) {
    thread_pool *p = moe_calloc(1, sizeof *p);
    if (!p) return set_error(MOE_ERR_NO_MEMORY, "out of memory creating the thread pool");
    pthread_mutex_init(&p->mu, NULL);
    pthread_cond_init(&p->wake, NULL);
    pthread_cond_init(&p->done, NULL);
    p->n_threads = n_threads < 1 ? 1 : n_threads;
    p->workers = moe_calloc((size_t)p->n_threads, sizeof *p->workers);
    if (!p->workers) {
        pool_free(p);
        return set_error(MOE_ERR_NO_MEMORY, "out of memory creating the thread pool");
    }
    for (int i = 1; i < p->n_threads; i++) {
        worker_arg *wa = moe_malloc(sizeof *wa);
        if (!wa) {
            p->n_threads = i;
            pool_free(p);
            return set_error(MOE_ERR_NO_MEMORY, "out of memory creating the thread pool");
        }
        wa->pool = p;
        wa->index = i;
        if (pthread_create(&p->workers[i], NULL, pool_worker, wa) != 0) {
            moe_free(wa);
            p->n_threads = i;
            pool_free(p);
            return set_error(MOE_ERR_NO_MEMORY, "cannot start worker thread %d", i);
        }
    }
    *out = p;
    return MOE_OK;
}

/* Runs fn(arg, t, thread) for t in [0, n_tasks) on all threads and returns when all are done. */
static void pool_run(thread_pool *p, task_fn fn, void *arg, int64_t n_tasks) {
    if (n_tasks <= 0) return;
    if (p->n_threads == 1 || n_tasks == 1) {
        for (int64_t t = 0; t < n_tasks; t++) fn(arg, t, 0);
        return;
    }
    pthread_mutex_lock(&p->mu);
    p->fn = fn;
    p->arg = arg;
    p->n_tasks = n_tasks;
    atomic_store(&p->next, 0);
    p->n_busy = p->n_threads - 1;
    p->generation++;
    pthread_cond_broadcast(&p->wake);
    pthread_mutex_unlock(&p->mu);
    pool_drain(p, 0);
    pthread_mutex_lock(&p->mu);
    while (p->n_busy > 0) pthread_cond_wait(&p->done, &p->mu);
    pthread_mutex_unlock(&p->mu);
}

static int cpu_count(void) {
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    return n < 1 ? 1 : (n > 256 ? 256 : (int)n);
}

/* ============================================================================================ */
/* 2. gguf — reader                                                                              */
/* ============================================================================================ */
/* Layout: "GGUF", u32 version (2 or 3), u64 n_tensors, u64 n_kv, then n_kv × (string key,
   u32 type, value), then n_tensors × (string name, u32 n_dims, u64 ne[n_dims], u32 type,
   u64 offset), then padding to general.alignment, then the tensor data blob. Strings are a u64
   length and bytes. Arrays are u32 element type, u64 count, elements. Little-endian. */

enum {
    GGUF_U8 = 0, GGUF_I8 = 1, GGUF_U16 = 2, GGUF_I16 = 3, GGUF_U32 = 4, GGUF_I32 = 5,
    GGUF_F32 = 6, GGUF_BOOL = 7, GGUF_STRING = 8, GGUF_ARRAY = 9, GGUF_U64 = 10, GGUF_I64 = 11,
    GGUF_F64 = 12, GGUF_TYPE_COUNT
};

typedef struct gguf_str { const char *p; uint64_t n; } gguf_str;

typedef struct gguf_kv {
    gguf_str key;
    int32_t type;            /* GGUF_* */
    int32_t arr_type;        /* element type when type == GGUF_ARRAY */
    uint64_t arr_n;          /* element count when type == GGUF_ARRAY */
    const uint8_t *val;      /* the value bytes (for arrays: the first element) */
} gguf_kv;

typedef struct gguf_tensor {
    gguf_str name;
    int32_t type;            /* MOE_TYPE_* (ggml numbering) */
    int32_t n_dims;
    int64_t ne[MOE_MAX_DIMS];/* innermost first; unused dims are 1 */
    uint64_t offset;         /* relative to the data blob */
    uint64_t nbytes;
    const uint8_t *data;
} gguf_tensor;

typedef struct gguf_file {
    const uint8_t *base;
    size_t size;
    uint32_t version;
    uint32_t alignment;
    int64_t n_kv, n_tensors;
    gguf_kv *kv;
    gguf_tensor *tensors;
    size_t data_offset;
} gguf_file;

typedef struct gguf_reader {
    const uint8_t *p, *end, *base;
} gguf_reader;

static size_t rd_pos(const gguf_reader *r) { return (size_t)(r->p - r->base); }

static moe_status rd_bytes(gguf_reader *r, void *dst, size_t n, const char *what) {
    if ((size_t)(r->end - r->p) < n)
        return set_error(MOE_ERR_FORMAT, "gguf: truncated file: %s at offset %zu needs %zu bytes, %zu left",
                         what, rd_pos(r), n, (size_t)(r->end - r->p));
    if (dst) memcpy(dst, r->p, n);
    r->p += n;
    return MOE_OK;
}
static moe_status rd_u32(gguf_reader *r, uint32_t *v, const char *what) { return rd_bytes(r, v, 4, what); }
static moe_status rd_u64(gguf_reader *r, uint64_t *v, const char *what) { return rd_bytes(r, v, 8, what); }

static moe_status rd_str(gguf_reader *r, gguf_str *s, const char *what) {
    uint64_t n = 0;
    moe_status st = rd_u64(r, &n, what);
    if (st) return st;
    if (n > (uint64_t)(r->end - r->p))
        return set_error(MOE_ERR_FORMAT, "gguf: %s at offset %zu: string length %llu runs past the end of the file",
                         what, rd_pos(r) - 8, (unsigned long long)n);
    s->p = (const char *)r->p;
    s->n = n;
    r->p += n;
    return MOE_OK;
}

static size_t gguf_scalar_size(int32_t t) {
    switch (t) {
    case GGUF_U8: case GGUF_I8: case GGUF_BOOL: return 1;
    case GGUF_U16: case GGUF_I16: return 2;
    case GGUF_U32: case GGUF_I32: case GGUF_F32: return 4;
    case GGUF_U64: case GGUF_I64: case GGUF_F64: return 8;
    default: return 0;
    }
}

/* Skips one value of type t (validating it); depth bounds nested arrays. */
static moe_status rd_skip_value(gguf_reader *r, int32_t t, int depth, const gguf_str *key) {
    if (t == GGUF_STRING) {
        gguf_str s;
        return rd_str(r, &s, "string value");
    }
    if (t == GGUF_ARRAY) {
        if (depth > 8)
            return set_error(MOE_ERR_FORMAT, "gguf: key '%.*s': arrays nested deeper than 8", (int)key->n, key->p);
        uint32_t et = 0;
        uint64_t n = 0;
        moe_status st;
        if ((st = rd_u32(r, &et, "array type")) || (st = rd_u64(r, &n, "array length"))) return st;
        if (et >= GGUF_TYPE_COUNT)
            return set_error(MOE_ERR_FORMAT, "gguf: key '%.*s': unknown array element type %u", (int)key->n, key->p, et);
        size_t es = gguf_scalar_size((int32_t)et);
        if (es) {
            if (n > (uint64_t)(r->end - r->p) / es)
                return set_error(MOE_ERR_FORMAT, "gguf: key '%.*s': array of %llu elements runs past the end of the file",
                                 (int)key->n, key->p, (unsigned long long)n);
            r->p += n * es;
            return MOE_OK;
        }
        /* strings and nested arrays take at least 8 bytes each: bound n before looping */
        if (n > (uint64_t)(r->end - r->p) / 8)
            return set_error(MOE_ERR_FORMAT, "gguf: key '%.*s': array of %llu elements runs past the end of the file",
                             (int)key->n, key->p, (unsigned long long)n);
        for (uint64_t i = 0; i < n; i++)
            if ((st = rd_skip_value(r, (int32_t)et, depth + 1, key))) return st;
        return MOE_OK;
    }
    size_t sz = gguf_scalar_size(t);
    if (!sz) return set_error(MOE_ERR_FORMAT, "gguf: key '%.*s': unknown value type %d", (int)key->n, key->p, t);
    return rd_bytes(r, NULL, sz, "scalar value");
}

static int gguf_str_eq(gguf_str s, const char *z) {
    size_t n = strlen(z);
    return s.n == n && memcmp(s.p, z, n) == 0;
}

static void gguf_free(gguf_file *g) {
    if (!g) return;
    moe_free(g->kv);
    moe_free(g->tensors);
    memset(g, 0, sizeof *g);
}

static const gguf_kv *gguf_find(const gguf_file *g, const char *key) {
    for (int64_t i = 0; i < g->n_kv; i++)
        if (gguf_str_eq(g->kv[i].key, key)) return &g->kv[i];
    return NULL;
}

static const gguf_tensor *gguf_find_tensor(const gguf_file *g, const char *name) {
    for (int64_t i = 0; i < g->n_tensors; i++)
        if (gguf_str_eq(g->tensors[i].name, name)) return &g->tensors[i];
    return NULL;
}

/* Reads an integer-typed scalar (any width, signed or not) as int64. */
static int kv_as_i64(const gguf_kv *kv, int64_t *out) {
    const uint8_t *v = kv->val;
    switch (kv->type) {
    case GGUF_U8: *out = v[0]; return 1;
    case GGUF_I8: *out = (int8_t)v[0]; return 1;
    case GGUF_BOOL: *out = v[0] != 0; return 1;
    case GGUF_U16: { uint16_t x; memcpy(&x, v, 2); *out = x; return 1; }
    case GGUF_I16: { int16_t x; memcpy(&x, v, 2); *out = x; return 1; }
    case GGUF_U32: { uint32_t x; memcpy(&x, v, 4); *out = x; return 1; }
    case GGUF_I32: { int32_t x; memcpy(&x, v, 4); *out = x; return 1; }
    case GGUF_U64: { uint64_t x; memcpy(&x, v, 8); if (x > INT64_MAX) return 0; *out = (int64_t)x; return 1; }
    case GGUF_I64: { int64_t x; memcpy(&x, v, 8); *out = x; return 1; }
    default: return 0;
    }
}

static int kv_as_f64(const gguf_kv *kv, double *out) {
    if (kv->type == GGUF_F32) { float x; memcpy(&x, kv->val, 4); *out = x; return 1; }
    if (kv->type == GGUF_F64) { double x; memcpy(&x, kv->val, 8); *out = x; return 1; }
    int64_t i;
    if (kv_as_i64(kv, &i)) { *out = (double)i; return 1; }
    return 0;
}

/* Typed getters. 'required' missing keys give MOE_ERR_FORMAT naming the key; optional ones
   leave *out untouched and return MOE_OK. */
static moe_status gguf_get_int(const gguf_file *g, const char *key, int required, int64_t lo, int64_t hi, int64_t *out) {
    const gguf_kv *kv = gguf_find(g, key);
    if (!kv) return required ? set_error(MOE_ERR_FORMAT, "gguf: required key '%s' is missing", key) : MOE_OK;
    int64_t v;
    if (!kv_as_i64(kv, &v)) return set_error(MOE_ERR_FORMAT, "gguf: key '%s' is not an integer", key);
    if (v < lo || v > hi)
        return set_error(MOE_ERR_FORMAT, "gguf: key '%s' = %lld is outside [%lld, %lld]", key, (long long)v,
                         (long long)lo, (long long)hi);
    *out = v;
    return MOE_OK;
}

static moe_status gguf_get_f32(const gguf_file *g, const char *key, int required, float *out) {
    const gguf_kv *kv = gguf_find(g, key);
    if (!kv) return required ? set_error(MOE_ERR_FORMAT, "gguf: required key '%s' is missing", key) : MOE_OK;
    double v;
    if (!kv_as_f64(kv, &v) || !isfinite(v)) return set_error(MOE_ERR_FORMAT, "gguf: key '%s' is not a finite number", key);
    *out = (float)v;
    return MOE_OK;
}

static moe_status gguf_get_str(const gguf_file *g, const char *key, int required, gguf_str *out) {
    const gguf_kv *kv = gguf_find(g, key);
    if (!kv) return required ? set_error(MOE_ERR_FORMAT, "gguf: required key '%s' is missing", key) : MOE_OK;
    if (kv->type != GGUF_STRING) return set_error(MOE_ERR_FORMAT, "gguf: key '%s' is not a string", key);
    uint64_t n;
    memcpy(&n, kv->val, 8);
    out->p = (const char *)kv->val + 8;
    out->n = n;
    return MOE_OK;
}

/* The strings of a string array, in order (already validated when the file was parsed). */
MOE_MAYBE_UNUSED static void gguf_array_strings(const gguf_kv *kv, gguf_str *out) {
    const uint8_t *p = kv->val;
    for (uint64_t i = 0; i < kv->arr_n; i++) {
        uint64_t n;
        memcpy(&n, p, 8);
        out[i].p = (const char *)p + 8;
        out[i].n = n;
        p += 8 + n;
    }
}

static const struct moe_type_traits *type_traits(int32_t type);
static uint64_t type_row_bytes(int32_t type, int64_t n_elems);

static moe_status gguf_parse(gguf_file *g, const uint8_t *data, size_t size) {
    memset(g, 0, sizeof *g);
    gguf_reader r = {data, data + size, data};
    moe_status st;
    uint32_t magic = 0, version = 0;
    if ((st = rd_u32(&r, &magic, "magic"))) return st;
    if (memcmp(&magic, "GGUF", 4) != 0) return set_error(MOE_ERR_FORMAT, "gguf: not a GGUF file (bad magic)");
    if ((st = rd_u32(&r, &version, "version"))) return st;
    if (version == 1) return set_error(MOE_ERR_UNSUPPORTED, "gguf: version 1 files are not supported (only 2 and 3)");
    if (version != 2 && version != 3) {
        if (version == 0x02000000u || version == 0x03000000u)
            return set_error(MOE_ERR_UNSUPPORTED, "gguf: big-endian GGUF files are not supported");
        return set_error(MOE_ERR_FORMAT, "gguf: unknown version %u", version);
    }
    uint64_t n_tensors = 0, n_kv = 0;
    if ((st = rd_u64(&r, &n_tensors, "tensor count")) || (st = rd_u64(&r, &n_kv, "key count"))) return st;
    /* every KV takes >= 13 bytes and every tensor info >= 24: bound the counts by the file size
       before allocating anything for them */
    size_t left = (size_t)(r.end - r.p);
    if (n_kv > left / 13) return set_error(MOE_ERR_FORMAT, "gguf: key count %llu cannot fit in the file", (unsigned long long)n_kv);
    if (n_tensors > left / 24) return set_error(MOE_ERR_FORMAT, "gguf: tensor count %llu cannot fit in the file", (unsigned long long)n_tensors);
    g->base = data;
    g->size = size;
    g->version = version;
    g->alignment = 32;
    g->kv = moe_calloc(n_kv ? n_kv : 1, sizeof *g->kv);
    g->tensors = moe_calloc(n_tensors ? n_tensors : 1, sizeof *g->tensors);
    if (!g->kv || !g->tensors) {
        gguf_free(g);
        return set_error(MOE_ERR_NO_MEMORY, "gguf: out of memory for the metadata tables");
    }
    for (uint64_t i = 0; i < n_kv; i++) {
        gguf_kv *kv = &g->kv[i];
        uint32_t t = 0;
        if ((st = rd_str(&r, &kv->key, "key")) || (st = rd_u32(&r, &t, "value type"))) goto fail;
        g->n_kv = (int64_t)i + 1;
        if (t >= GGUF_TYPE_COUNT) {
            st = set_error(MOE_ERR_FORMAT, "gguf: key '%.*s' has unknown value type %u", (int)kv->key.n, kv->key.p, t);
            goto fail;
        }
        kv->type = (int32_t)t;
        if (t == GGUF_ARRAY) {
            const uint8_t *start = r.p;
            if ((st = rd_skip_value(&r, GGUF_ARRAY, 0, &kv->key))) goto fail;
            uint32_t et;
            memcpy(&et, start, 4);
            memcpy(&kv->arr_n, start + 4, 8);
            kv->arr_type = (int32_t)et;
            kv->val = start + 12;
        } else {
            kv->val = r.p;
            if ((st = rd_skip_value(&r, kv->type, 0, &kv->key))) goto fail;
        }
        for (uint64_t j = 0; j < i; j++)
            if (g->kv[j].key.n == kv->key.n && memcmp(g->kv[j].key.p, kv->key.p, kv->key.n) == 0) {
                st = set_error(MOE_ERR_FORMAT, "gguf: duplicate key '%.*s'", (int)kv->key.n, kv->key.p);
                goto fail;
            }
    }
    {
        int64_t al = 32;
        if ((st = gguf_get_int(g, "general.alignment", 0, 1, 1 << 20, &al))) goto fail;
        if (al & (al - 1)) {
            st = set_error(MOE_ERR_FORMAT, "gguf: general.alignment %lld is not a power of two", (long long)al);
            goto fail;
        }
        g->alignment = (uint32_t)al;
    }
    for (uint64_t i = 0; i < n_tensors; i++) {
        gguf_tensor *t = &g->tensors[i];
        uint32_t nd = 0, type = 0;
        if ((st = rd_str(&r, &t->name, "tensor name")) || (st = rd_u32(&r, &nd, "tensor dimension count"))) goto fail;
        g->n_tensors = (int64_t)i + 1;
        if (nd < 1 || nd > MOE_MAX_DIMS) {
            st = set_error(MOE_ERR_FORMAT, "gguf: tensor '%.*s' has %u dimensions (1..%d supported)",
                           (int)t->name.n, t->name.p, nd, MOE_MAX_DIMS);
            goto fail;
        }
        t->n_dims = (int32_t)nd;
        uint64_t n_elems = 1;
        for (int d = 0; d < MOE_MAX_DIMS; d++) t->ne[d] = 1;
        for (uint32_t d = 0; d < nd; d++) {
            uint64_t ne = 0;
            if ((st = rd_u64(&r, &ne, "tensor dimension"))) goto fail;
            if (ne == 0 || ne > (uint64_t)INT64_MAX || n_elems > (uint64_t)INT64_MAX / ne) {
                st = set_error(MOE_ERR_FORMAT, "gguf: tensor '%.*s': dimension %u (%llu) is zero or overflows the element count",
                               (int)t->name.n, t->name.p, d, (unsigned long long)ne);
                goto fail;
            }
            t->ne[d] = (int64_t)ne;
            n_elems *= ne;
        }
        if ((st = rd_u32(&r, &type, "tensor type")) || (st = rd_u64(&r, &t->offset, "tensor offset"))) goto fail;
        t->type = (int32_t)type;
        if (!type_traits(t->type)) {
            st = set_error(MOE_ERR_FORMAT, "gguf: tensor '%.*s' has unknown or unsupported type %u", (int)t->name.n, t->name.p, type);
            goto fail;
        }
        uint64_t rb = type_row_bytes(t->type, t->ne[0]);
        if (!rb) {
            st = set_error(MOE_ERR_FORMAT, "gguf: tensor '%.*s': row length %lld is not a multiple of the block size of its type",
                           (int)t->name.n, t->name.p, (long long)t->ne[0]);
            goto fail;
        }
        uint64_t rows = n_elems / (uint64_t)t->ne[0];
        if (rows > UINT64_MAX / rb) {
            st = set_error(MOE_ERR_FORMAT, "gguf: tensor '%.*s': byte size overflows", (int)t->name.n, t->name.p);
            goto fail;
        }
        t->nbytes = rb * rows;
        if (t->offset % g->alignment) {
            st = set_error(MOE_ERR_FORMAT, "gguf: tensor '%.*s': offset %llu is not aligned to %u", (int)t->name.n, t->name.p,
                           (unsigned long long)t->offset, g->alignment);
            goto fail;
        }
        for (uint64_t j = 0; j < i; j++)
            if (g->tensors[j].name.n == t->name.n && memcmp(g->tensors[j].name.p, t->name.p, t->name.n) == 0) {
                st = set_error(MOE_ERR_FORMAT, "gguf: duplicate tensor '%.*s'", (int)t->name.n, t->name.p);
                goto fail;
            }
    }
    /* the data blob starts at the next multiple of the alignment */
    size_t pos = rd_pos(&r);
    size_t data_off = (pos + g->alignment - 1) / g->alignment * g->alignment;
    if (n_tensors > 0 && data_off > size) {
        st = set_error(MOE_ERR_FORMAT, "gguf: truncated file: tensor data should start at %zu but the file has %zu bytes", data_off, size);
        goto fail;
    }
    g->data_offset = data_off;
    for (int64_t i = 0; i < g->n_tensors; i++) {
        gguf_tensor *t = &g->tensors[i];
        uint64_t avail = size - data_off;
        if (t->offset > avail || t->nbytes > avail - t->offset) {
            st = set_error(MOE_ERR_FORMAT, "gguf: tensor '%.*s': data range %llu..%llu is outside the file's data (%llu bytes)",
                           (int)t->name.n, t->name.p, (unsigned long long)t->offset,
                           (unsigned long long)(t->offset + t->nbytes), (unsigned long long)avail);
            goto fail;
        }
        t->data = data + data_off + t->offset;
    }
    return MOE_OK;
fail:
    gguf_free(g);
    return st;
}

/* ---- gguf writer ---------------------------------------------------------------------------
   Used by the converter, the model synthesizer and the tests. Metadata and the tensor table are
   built in memory; tensor data is referenced (not copied) and streamed out by gguf_write_file. */
typedef struct gguf_buf { uint8_t *p; size_t n, cap; int oom; } gguf_buf;

static void gb_put(gguf_buf *b, const void *src, size_t n) {
    if (b->oom || n == 0) return;
    if (b->n + n > b->cap) {
        size_t cap = b->cap ? b->cap * 2 : 4096;
        while (cap < b->n + n) cap *= 2;
        uint8_t *p = moe_malloc(cap);
        if (!p) { b->oom = 1; return; }
        if (b->n) memcpy(p, b->p, b->n);
        moe_free(b->p);
        b->p = p;
        b->cap = cap;
    }
    memcpy(b->p + b->n, src, n);
    b->n += n;
}
static void gb_u32(gguf_buf *b, uint32_t v) { gb_put(b, &v, 4); }
static void gb_u64(gguf_buf *b, uint64_t v) { gb_put(b, &v, 8); }
static void gb_str(gguf_buf *b, const char *s) { gb_u64(b, strlen(s)); gb_put(b, s, strlen(s)); }

typedef struct gguf_writer {
    gguf_buf kv, info;
    uint64_t n_kv, n_tensors, data_size;
    uint32_t alignment;
    const void **data;         /* [n_tensors] */
    uint64_t *sizes;
    uint64_t cap;
} gguf_writer;

MOE_MAYBE_UNUSED static void gw_kv_u32(gguf_writer *w, const char *key, uint32_t v) { gb_str(&w->kv, key); gb_u32(&w->kv, GGUF_U32); gb_u32(&w->kv, v); w->n_kv++; }
MOE_MAYBE_UNUSED static void gw_kv_i32(gguf_writer *w, const char *key, int32_t v) { gb_str(&w->kv, key); gb_u32(&w->kv, GGUF_I32); gb_put(&w->kv, &v, 4); w->n_kv++; }
MOE_MAYBE_UNUSED static void gw_kv_f32(gguf_writer *w, const char *key, float v) { gb_str(&w->kv, key); gb_u32(&w->kv, GGUF_F32); gb_put(&w->kv, &v, 4); w->n_kv++; }
MOE_MAYBE_UNUSED static void gw_kv_bool(gguf_writer *w, const char *key, int v) { uint8_t b = v != 0; gb_str(&w->kv, key); gb_u32(&w->kv, GGUF_BOOL); gb_put(&w->kv, &b, 1); w->n_kv++; }
MOE_MAYBE_UNUSED static void gw_kv_str(gguf_writer *w, const char *key, const char *v) { gb_str(&w->kv, key); gb_u32(&w->kv, GGUF_STRING); gb_str(&w->kv, v); w->n_kv++; }
/* an array of n scalars of GGUF type t (elements of gguf_scalar_size(t) bytes) */
MOE_MAYBE_UNUSED static void gw_kv_array(gguf_writer *w, const char *key, int32_t t, const void *v, uint64_t n) {
    gb_str(&w->kv, key); gb_u32(&w->kv, GGUF_ARRAY); gb_u32(&w->kv, (uint32_t)t); gb_u64(&w->kv, n);
    gb_put(&w->kv, v, (size_t)n * gguf_scalar_size(t));
    w->n_kv++;
}
MOE_MAYBE_UNUSED static void gw_kv_strings(gguf_writer *w, const char *key, const char *const *v, uint64_t n) {
    gb_str(&w->kv, key); gb_u32(&w->kv, GGUF_ARRAY); gb_u32(&w->kv, GGUF_STRING); gb_u64(&w->kv, n);
    for (uint64_t i = 0; i < n; i++) gb_str(&w->kv, v[i]);
    w->n_kv++;
}

/* Adds a tensor; data must stay valid until gguf_write_file. ne is innermost first. */
MOE_MAYBE_UNUSED static moe_status gw_tensor(gguf_writer *w, const char *name, int32_t type, int n_dims, const int64_t *ne, const void *data) {
    int64_t rows = 1;
    for (int d = 1; d < n_dims; d++) rows *= ne[d];
    uint64_t size = type_row_bytes(type, ne[0]) * (uint64_t)rows;
    if (!size) return set_error(MOE_ERR_INVALID_ARG, "gguf writer: tensor '%s' has a row length that does not fit its type", name);
    if (w->n_tensors == w->cap) {
        uint64_t cap = w->cap ? w->cap * 2 : 64;
        const void **d = moe_malloc(cap * sizeof *d);
        uint64_t *s = moe_malloc(cap * sizeof *s);
        if (!d || !s) { moe_free(d); moe_free(s); return set_error(MOE_ERR_NO_MEMORY, "gguf writer: out of memory"); }
        if (w->n_tensors) { memcpy(d, w->data, w->n_tensors * sizeof *d); memcpy(s, w->sizes, w->n_tensors * sizeof *s); }
        moe_free(w->data); moe_free(w->sizes);
        w->data = d; w->sizes = s; w->cap = cap;
    }
    uint32_t al = w->alignment ? w->alignment : 32;
    gb_str(&w->info, name);
    gb_u32(&w->info, (uint32_t)n_dims);
    for (int d = 0; d < n_dims; d++) gb_u64(&w->info, (uint64_t)ne[d]);
    gb_u32(&w->info, (uint32_t)type);
    gb_u64(&w->info, w->data_size);
    w->data[w->n_tensors] = data;
    w->sizes[w->n_tensors] = size;
    w->n_tensors++;
    w->data_size += (size + al - 1) / al * al;
    return MOE_OK;
}

MOE_MAYBE_UNUSED static void gw_free(gguf_writer *w) {
    moe_free(w->kv.p); moe_free(w->info.p); moe_free(w->data); moe_free(w->sizes);
    memset(w, 0, sizeof *w);
}

MOE_MAYBE_UNUSED static moe_status gw_write_file(gguf_writer *w, const char *path) {
    if (w->kv.oom || w->info.oom) return set_error(MOE_ERR_NO_MEMORY, "gguf writer: out of memory");
    uint32_t al = w->alignment ? w->alignment : 32;
    FILE *f = fopen(path, "wb");
    if (!f) return set_error(MOE_ERR_IO, "gguf writer: cannot create '%s': %s", path, strerror(errno));
    static const uint8_t zeros[64] = {0};
    uint32_t version = 3;
    uint64_t pos = 0;
    int ok = fwrite("GGUF", 1, 4, f) == 4 && fwrite(&version, 4, 1, f) == 1 && fwrite(&w->n_tensors, 8, 1, f) == 1 &&
             fwrite(&w->n_kv, 8, 1, f) == 1 && (!w->kv.n || fwrite(w->kv.p, 1, w->kv.n, f) == w->kv.n) &&
             (!w->info.n || fwrite(w->info.p, 1, w->info.n, f) == w->info.n);
    pos = 24 + w->kv.n + w->info.n;
    for (uint64_t pad = (al - pos % al) % al; ok && pad; pad -= pad > 64 ? 64 : pad)
        ok = fwrite(zeros, 1, pad > 64 ? 64 : pad, f) == (pad > 64 ? 64 : pad);
    for (uint64_t i = 0; ok && i < w->n_tensors; i++) {
        ok = fwrite(w->data[i], 1, w->sizes[i], f) == w->sizes[i];
        for (uint64_t pad = (al - w->sizes[i] % al) % al; ok && pad; pad -= pad > 64 ? 64 : pad)
            ok = fwrite(zeros, 1, pad > 64 ? 64 : pad, f) == (pad > 64 ? 64 : pad);
    }
    if (fclose(f) != 0) ok = 0;
    return ok ? MOE_OK : set_error(MOE_ERR_IO, "gguf writer: cannot write '%s': %s", path, strerror(errno));
}

/* ============================================================================================ */
/* 3. quant codecs                                                                               */
/* ============================================================================================ */
typedef struct moe_type_traits {
    const char *name;
    int32_t block_elems, block_bytes;
    /* n is a multiple of block_elems in both */
    void (*dequant)(const void *blocks, float *out, int64_t n);
    void (*quant)(const float *in, void *blocks, int64_t n);
} moe_type_traits;

/* ---- scalar conversions ---- */
static float fp16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16;
    uint32_t exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
    if (exp == 0) {
        if (man == 0) bits = sign;
        else { /* subnormal: renormalise */
            int e = -1;
            do { man <<= 1; e++; } while (!(man & 0x400));
            bits = sign | ((uint32_t)(127 - 15 - e) << 23) | ((man & 0x3ff) << 13);
        }
    } else if (exp == 31) bits = sign | 0x7f800000u | (man << 13);
    else bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

/* round-to-nearest-even, like numpy's astype(float16) */
static uint16_t f32_to_fp16(float f) {
    uint32_t x;
    memcpy(&x, &f, 4);
    uint32_t sign = (x >> 16) & 0x8000;
    uint32_t ax = x & 0x7fffffffu;
    if (ax >= 0x7f800000u) return (uint16_t)(sign | 0x7c00 | (ax > 0x7f800000u ? 0x200 : 0));
    if (ax >= 0x477ff000u) return (uint16_t)(sign | 0x7c00); /* rounds to inf */
    if (ax < 0x38800000u) { /* subnormal or zero in half */
        if (ax < 0x33000000u) return (uint16_t)sign;
        uint32_t e = ax >> 23, man = (ax & 0x7fffff) | 0x800000;
        uint32_t shift = 126 - e; /* value / 2^-24, the half subnormal unit */
        uint32_t half = man >> shift;
        uint32_t rem = man & ((1u << shift) - 1), mid = 1u << (shift - 1);
        if (rem > mid || (rem == mid && (half & 1))) half++;
        return (uint16_t)(sign | half);
    }
    uint32_t half = ((ax >> 13) - (112u << 10));
    uint32_t rem = ax & 0x1fff;
    if (rem > 0x1000 || (rem == 0x1000 && (half & 1))) half++;
    return (uint16_t)(sign | half);
}

static float bf16_to_f32(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static uint16_t f32_to_bf16(float f) {
    uint32_t x;
    memcpy(&x, &f, 4);
    if ((x & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((x >> 16) | 0x40); /* quiet NaN */
    x += 0x7fff + ((x >> 16) & 1);
    return (uint16_t)(x >> 16);
}

static uint16_t rd16(const uint8_t *p) { uint16_t v; memcpy(&v, p, 2); return v; }
static void wr16(uint8_t *p, uint16_t v) { memcpy(p, &v, 2); }

/* ---- helpers shared by the block codecs ----
   Every dequantizer computes what ggml's reference dequantize_row_* computes, operation by
   operation in float32. In these formats every product is exact: an fp16 scale has 11 significant
   bits, a sub-block scale at most 7 (6-bit K-quant scales, int8 Q6_K scales), a code at most 7
   (Q8_0) or 5, so no product needs more than f32's 24 bits, nor leaves the normal range (MXFP4:
   a code of 2 significant bits times a power of two, exact down to 2^-149; codes ≥ 4 at e ≥ 253
   overflow to inf, in ggml too, and our quantizer never writes those). The one
   rounding in any of them is the final "− dmin·m" of Q4_K/Q5_K; an FMA contraction of it rounds
   the same exact product once, so values are bit-identical whatever -ffp-contract says, and any
   operation order (d·sc·q or d·(sc·q)) gives the same floats.
   The quantizers are our own: each tries several candidate scales and keeps the one whose
   reconstruction error, measured with the scales exactly as they are stored, is lowest. */

/* nearest integer, ties to even; inputs are clamped to ±2^22 first (NaN becomes the bound), so the
   trick of adding 1.5·2^23 and reading the low mantissa bits is always valid */
static int round_i(float v) {
    v = fminf(fmaxf(v, -4194303.0f), 4194303.0f);
    float t = v + 12582912.0f;
    int32_t i;
    memcpy(&i, &t, 4);
    return (i & 0x007fffff) - 0x00400000;
}

static int clamp_i(int v, int lo, int hi) { return v < lo ? lo : v > hi ? hi : v; }

/* fp16 with saturation: a scale too large for half is clipped to ±65504 instead of becoming inf */
static uint16_t f32_to_fp16_sat(float f) {
    return f32_to_fp16(fminf(fmaxf(f, -65504.0f), 65504.0f));
}

/* fp16 of a super-block scale, rounded away from zero (then saturated): a scale that rounded
   down would push the largest sub-block scale past the top code, and one that underflowed to 0
   would erase a block of tiny but nonzero values */
static uint16_t f32_to_fp16_up(float f) {
    uint16_t h = f32_to_fp16_sat(f);
    if (fabsf(fp16_to_f32(h)) < fabsf(f) && (h & 0x7fff) < 0x7bff) h++;
    return h;
}

/* ---- F32 ---- */
static void dequant_f32(const void *b, float *out, int64_t n) { memcpy(out, b, (size_t)n * 4); }
static void quant_f32(const float *in, void *b, int64_t n) { memcpy(b, in, (size_t)n * 4); }

/* ---- F16 ---- */
static void dequant_f16(const void *b, float *out, int64_t n) {
    const uint8_t *p = b;
    for (int64_t i = 0; i < n; i++) out[i] = fp16_to_f32(rd16(p + 2 * i));
}
static void quant_f16(const float *in, void *b, int64_t n) {
    uint8_t *p = b;
    for (int64_t i = 0; i < n; i++) wr16(p + 2 * i, f32_to_fp16(in[i]));
}

/* ---- BF16 ---- */
static void dequant_bf16(const void *b, float *out, int64_t n) {
    const uint8_t *p = b;
    for (int64_t i = 0; i < n; i++) out[i] = bf16_to_f32(rd16(p + 2 * i));
}
static void quant_bf16(const float *in, void *b, int64_t n) {
    uint8_t *p = b;
    for (int64_t i = 0; i < n; i++) wr16(p + 2 * i, f32_to_bf16(in[i]));
}

/* ---- Q8_0 --------------------------------------------------------------------------------------

     Q8_0 block: 32 elements in 34 bytes
     +-------+-----------------------+
     | d f16 | qs[32] (int8)         |
     +-------+-----------------------+
       0..1    2..33
     x[j] = d·qs[j]

   Quantize: d = amax/127 (fp16, saturating), q = nearest of x/d with the stored d, in ±127. */
#define QK8_0 32
static void dequant_q8_0(const void *b, float *out, int64_t n) {
    const uint8_t *p = b;
    for (int64_t i = 0; i < n / QK8_0; i++, p += 34) {
        float d = fp16_to_f32(rd16(p));
        const int8_t *q = (const int8_t *)(p + 2);
        for (int j = 0; j < QK8_0; j++) out[i * QK8_0 + j] = d * (float)q[j];
    }
}
static void quant_q8_0(const float *in, void *b, int64_t n) {
    uint8_t *p = b;
    for (int64_t i = 0; i < n / QK8_0; i++, p += 34) {
        const float *x = in + i * QK8_0;
        float amax = 0;
        for (int j = 0; j < QK8_0; j++) amax = fmaxf(amax, fabsf(x[j]));
        uint16_t h = f32_to_fp16_sat(amax / 127.0f);
        float d = fp16_to_f32(h), id = d ? 1.0f / d : 0.0f;
        wr16(p, h);
        for (int j = 0; j < QK8_0; j++) p[2 + j] = (uint8_t)(int8_t)clamp_i(round_i(x[j] * id), -127, 127);
    }
}

/* Symmetric fit: the scale s minimising Σ w·(x − s·l)² over integers l in [−nmax, nmax−1].
   Tries the 19 scales that map the largest-magnitude element to −(nmax + 0.1k), k = −9..9 (the
   negative end has the extra level, so the extreme goes there), refits s by weighted least squares
   for each rounding pattern, and keeps the best (the one maximising (Σwxl)²/Σwl²). */
static float fit_scale_sym(int n, int nmax, const float *x, const float *w) {
    float amax = 0, max = 0;
    for (int i = 0; i < n; i++)
        if (fabsf(x[i]) > amax) { amax = fabsf(x[i]); max = x[i]; }
    if (amax < 1e-15f) return 0.0f;
    float best_s = 0, best_gain = 0;
    for (int k = -9; k <= 9; k++) {
        float iscale = -((float)nmax + 0.1f * (float)k) / max;
        float sxl = 0, sll = 0;
        for (int i = 0; i < n; i++) {
            int l = clamp_i(round_i(iscale * x[i]), -nmax, nmax - 1);
            sxl += w[i] * x[i] * (float)l;
            sll += w[i] * (float)(l * l);
        }
        if (sll > 0 && sxl * sxl / sll > best_gain) { best_gain = sxl * sxl / sll; best_s = sxl / sll; }
    }
    return best_s;
}

/* Asymmetric fit for K-quants: x ≈ s·l − m with l in 0..nmax, s ≥ 0 and m ≥ 0 (the offset is a
   subtracted min, so a group with no negative values gets m = 0). Starts from the plain min/max
   mapping, then tries the scales (nmax + rmin + rdelta·k)/(max − min), k = 0..nstep: each one's
   rounding pattern gets a weighted least-squares (s, m), and the pair with the lowest weighted
   squared error wins. Writes l into L; returns s and stores m. n ≤ 32. */
static float fit_scale_min(int n, int nmax, const float *x, const float *w, uint8_t *L, float *m_out,
                           float rmin, float rdelta, int nstep) {
    float lo = x[0], hi = x[0], sw = 0, swx = 0;
    for (int i = 0; i < n; i++) {
        lo = fminf(lo, x[i]);
        hi = fmaxf(hi, x[i]);
        sw += w[i];
        swx += w[i] * x[i];
    }
    if (lo > 0) lo = 0;
    if (!(hi > lo)) { /* all equal and ≤ 0: the min alone represents the group */
        memset(L, 0, (size_t)n);
        *m_out = -lo;
        return 0.0f;
    }
    float s = (hi - lo) / (float)nmax, mn = lo, best = 0;
    for (int i = 0; i < n; i++) {
        L[i] = (uint8_t)clamp_i(round_i((x[i] - lo) / s), 0, nmax);
        float e = s * (float)L[i] + mn - x[i];
        best += w[i] * e * e;
    }
    uint8_t aux[32];
    for (int k = 0; k <= nstep; k++) {
        float iscale = ((float)nmax + rmin + rdelta * (float)k) / (hi - lo);
        float sl = 0, sll = 0, sxl = 0;
        for (int i = 0; i < n; i++) {
            int l = clamp_i(round_i(iscale * (x[i] - lo)), 0, nmax);
            aux[i] = (uint8_t)l;
            sl += w[i] * (float)l;
            sll += w[i] * (float)(l * l);
            sxl += w[i] * (float)l * x[i];
        }
        float det = sw * sll - sl * sl;
        if (!(det > 0)) continue;
        float ts = (sw * sxl - swx * sl) / det, tm = (sll * swx - sl * sxl) / det;
        if (tm > 0) { tm = 0; ts = sxl / sll; }
        if (!(ts > 0)) continue;
        float err = 0;
        for (int i = 0; i < n; i++) {
            float e = ts * (float)aux[i] + tm - x[i];
            err += w[i] * e * e;
        }
        if (err < best) { best = err; s = ts; mn = tm; memcpy(L, aux, (size_t)n); }
    }
    *m_out = -mn;
    return s;
}

/* ---- Q4_0 --------------------------------------------------------------------------------------

     Q4_0 block: 32 elements in 18 bytes
     +-------+-------+-------+-----+--------+
     | d f16 | qs[0] | qs[1] | ... | qs[15] |
     +-------+-------+-------+-----+--------+
       0..1    2       3             17
     qs[j] = q[j] | q[j+16] << 4          (element j in the low nibble, j+16 in the high)
     x[j]  = d·(q[j] − 8),  q in 0..15

   Quantize: candidate scales are max/−8 (the largest-magnitude element on the −8 level; its fp16
   rounded to nearest and away from zero) and the least-squares refits of the 19 trial scales
   fit_scale_sym also uses; each is scored in fp16, by the exact squared error of nearest-level
   rounding. */
#define QK4_0 32

static void dequant_q4_0(const void *b, float *out, int64_t n) {
    const uint8_t *p = b;
    for (int64_t i = 0; i < n / QK4_0; i++, p += 18) {
        float d = fp16_to_f32(rd16(p));
        float *y = out + i * QK4_0;
        for (int j = 0; j < QK4_0 / 2; j++) {
            y[j] = (float)((p[2 + j] & 0xf) - 8) * d;
            y[j + QK4_0 / 2] = (float)((p[2 + j] >> 4) - 8) * d;
        }
    }
}

/* squared error of quantizing x with the stored scale bits h; fills q when asked */
static float q4_0_try(const float *x, uint16_t h, uint8_t *q) {
    float d = fp16_to_f32(h), id = d != 0 ? 1.0f / d : 0.0f, err = 0;
    for (int j = 0; j < QK4_0; j++) {
        int l = clamp_i(round_i(x[j] * id), -8, 7);
        float e = (float)l * d - x[j];
        err += e * e;
        if (q) q[j] = (uint8_t)(l + 8);
    }
    return err;
}

static void quant_q4_0(const float *in, void *b, int64_t n) {
    uint8_t *p = b;
    for (int64_t i = 0; i < n / QK4_0; i++, p += 18) {
        const float *x = in + i * QK4_0;
        float amax = 0, max = 0;
        for (int j = 0; j < QK4_0; j++)
            if (fabsf(x[j]) > amax) { amax = fabsf(x[j]); max = x[j]; }
        uint16_t best_h = f32_to_fp16_sat(max / -8.0f), up_h = f32_to_fp16_up(max / -8.0f);
        float best = q4_0_try(x, best_h, NULL), up = q4_0_try(x, up_h, NULL);
        if (up < best) { best = up; best_h = up_h; }
        /* the refits: same trial scales as fit_scale_sym, but each one scored after fp16 rounding */
        for (int k = -9; amax > 0 && k <= 9; k++) {
            float iscale = -(8.0f + 0.1f * (float)k) / max, sxl = 0, sll = 0;
            for (int j = 0; j < QK4_0; j++) {
                int l = clamp_i(round_i(iscale * x[j]), -8, 7);
                sxl += x[j] * (float)l;
                sll += (float)(l * l);
            }
            if (!(sll > 0)) continue;
            uint16_t h = f32_to_fp16_sat(sxl / sll);
            float err = q4_0_try(x, h, NULL);
            if (err < best) { best = err; best_h = h; }
        }
        uint8_t q[QK4_0];
        q4_0_try(x, best_h, q);
        wr16(p, best_h);
        for (int j = 0; j < QK4_0 / 2; j++) p[2 + j] = (uint8_t)(q[j] | q[j + QK4_0 / 2] << 4);
    }
}

/* ---- Q4_K / Q5_K: 256-element super-blocks of 8 sub-blocks of 32 -------------------------------

     Q4_K block: 256 elements in 144 bytes
     +-------+----------+-------------+---------------------------+
     | d f16 | dmin f16 | scales[12]  | qs[128]                   |
     +-------+----------+-------------+---------------------------+
       0..1    2..3       4..15         16..143

     Q5_K block: 256 elements in 176 bytes
     +-------+----------+-------------+---------+-----------------+
     | d f16 | dmin f16 | scales[12]  | qh[32]  | qs[128]         |
     +-------+----------+-------------+---------+-----------------+
       0..1    2..3       4..15         16..47    48..175

   scales[12] packs a 6-bit scale sc[s] and a 6-bit min m[s] for each sub-block s = 0..7:
     byte  0..3 : bits 0-5 sc[0..3],  bits 6-7 = sc[4..7] >> 4
     byte  4..7 : bits 0-5  m[0..3],  bits 6-7 =  m[4..7] >> 4
     byte  8..11: bits 0-3 sc[4..7] & 15,  bits 4-7 = m[4..7] & 15

   qs is four 32-byte groups; group g holds sub-blocks 2g (low nibbles) and 2g+1 (high nibbles):
     element 64g + l      = qs[32g + l] & 15     (+16 if bit 2g   of qh[l], Q5_K only)
     element 64g + 32 + l = qs[32g + l] >> 4     (+16 if bit 2g+1 of qh[l], Q5_K only)

     x = (d·sc[s])·q − (dmin·m[s]),  q in 0..15 (Q4_K) or 0..31 (Q5_K)

   Quantize: fit_scale_min per sub-block (weights av + |x|, av the sub-block RMS, so the large
   values that dominate a matmul count more), then the eight scales and eight mins are each put on
   a 6-bit grid against fp16 super-scales d = max sc/63 and dmin = max m/63 (fp16 rounded away
   from zero), and finally every q is re-picked against the scales exactly as stored. */
#define QK_K 256

static void get_scale_min_k(const uint8_t *sc, int s, uint8_t *d, uint8_t *m) {
    if (s < 4) {
        *d = sc[s] & 63;
        *m = sc[s + 4] & 63;
    } else {
        *d = (uint8_t)((sc[s + 4] & 0xf) | (sc[s - 4] >> 6) << 4);
        *m = (uint8_t)((sc[s + 4] >> 4) | (sc[s] >> 6) << 4);
    }
}

static void put_scale_min_k(uint8_t *sc, int s, uint8_t d, uint8_t m) {
    if (s < 4) {
        sc[s] = (uint8_t)((sc[s] & 0xc0) | d);
        sc[s + 4] = (uint8_t)((sc[s + 4] & 0xc0) | m);
    } else {
        sc[s + 4] = (uint8_t)((d & 0xf) | (m & 0xf) << 4);
        sc[s - 4] = (uint8_t)((sc[s - 4] & 0x3f) | (d >> 4) << 6);
        sc[s] = (uint8_t)((sc[s] & 0x3f) | (m >> 4) << 6);
    }
}

/* The dequantizer of both: hbits is NULL for Q4_K. */
static void dequant_k45(const uint8_t *blk, const uint8_t *hbits, const uint8_t *qs, float *y) {
    float d = fp16_to_f32(rd16(blk)), dmin = fp16_to_f32(rd16(blk + 2));
    const uint8_t *sc = blk + 4;
    for (int g = 0; g < 4; g++, qs += 32, y += 64) {
        uint8_t s0, m0, s1, m1;
        get_scale_min_k(sc, 2 * g, &s0, &m0);
        get_scale_min_k(sc, 2 * g + 1, &s1, &m1);
        float d0 = d * (float)s0, mm0 = dmin * (float)m0;
        float d1 = d * (float)s1, mm1 = dmin * (float)m1;
        for (int l = 0; l < 32; l++) {
            int q = (qs[l] & 0xf) + (hbits && (hbits[l] >> (2 * g) & 1) ? 16 : 0);
            y[l] = d0 * (float)q - mm0;
        }
        for (int l = 0; l < 32; l++) {
            int q = (qs[l] >> 4) + (hbits && (hbits[l] >> (2 * g + 1) & 1) ? 16 : 0);
            y[32 + l] = d1 * (float)q - mm1;
        }
    }
}

/* Fits one super-block: writes d, dmin and scales[12] into blk[0..15] and q (0..nmax) into L. */
static void quant_k45_fit(const float *x, int nmax, uint8_t *blk, uint8_t L[QK_K]) {
    float sc[8], mn[8], w[32], max_sc = 0, max_mn = 0;
    for (int s = 0; s < 8; s++) {
        const float *xs = x + 32 * s;
        float sum2 = 0;
        for (int l = 0; l < 32; l++) sum2 += xs[l] * xs[l];
        float av = sqrtf(sum2 / 32.0f);
        for (int l = 0; l < 32; l++) w[l] = av + fabsf(xs[l]);
        sc[s] = fit_scale_min(32, nmax, xs, w, L + 32 * s, &mn[s], -1.0f, 0.1f, 20);
        max_sc = fmaxf(max_sc, sc[s]);
        max_mn = fmaxf(max_mn, mn[s]);
    }
    uint16_t hd = f32_to_fp16_up(max_sc / 63.0f), hm = f32_to_fp16_up(max_mn / 63.0f);
    float d = fp16_to_f32(hd), dmin = fp16_to_f32(hm);
    float id = d > 0 ? 1.0f / d : 0.0f, idmin = dmin > 0 ? 1.0f / dmin : 0.0f;
    wr16(blk, hd);
    wr16(blk + 2, hm);
    uint8_t *scales = blk + 4;
    memset(scales, 0, 12);
    for (int s = 0; s < 8; s++)
        put_scale_min_k(scales, s, (uint8_t)clamp_i(round_i(sc[s] * id), 0, 63),
                        (uint8_t)clamp_i(round_i(mn[s] * idmin), 0, 63));
    for (int s = 0; s < 8; s++) {
        uint8_t is, im;
        get_scale_min_k(scales, s, &is, &im);
        float ds = d * (float)is, ms = dmin * (float)im;
        for (int l = 0; l < 32; l++)
            L[32 * s + l] = ds > 0 ? (uint8_t)clamp_i(round_i((x[32 * s + l] + ms) / ds), 0, nmax) : 0;
    }
}

static void dequant_q4_k(const void *b, float *out, int64_t n) {
    const uint8_t *p = b;
    for (int64_t i = 0; i < n / QK_K; i++, p += 144) dequant_k45(p, NULL, p + 16, out + i * QK_K);
}

static void quant_q4_k(const float *in, void *b, int64_t n) {
    uint8_t *p = b, L[QK_K];
    for (int64_t i = 0; i < n / QK_K; i++, p += 144) {
        quant_k45_fit(in + i * QK_K, 15, p, L);
        for (int g = 0; g < 4; g++)
            for (int l = 0; l < 32; l++)
                p[16 + 32 * g + l] = (uint8_t)(L[64 * g + l] | L[64 * g + 32 + l] << 4);
    }
}

static void dequant_q5_k(const void *b, float *out, int64_t n) {
    const uint8_t *p = b;
    for (int64_t i = 0; i < n / QK_K; i++, p += 176) dequant_k45(p, p + 16, p + 48, out + i * QK_K);
}

static void quant_q5_k(const float *in, void *b, int64_t n) {
    uint8_t *p = b, L[QK_K];
    for (int64_t i = 0; i < n / QK_K; i++, p += 176) {
        quant_k45_fit(in + i * QK_K, 31, p, L);
        uint8_t *qh = p + 16, *qs = p + 48;
        memset(qh, 0, 32);
        for (int g = 0; g < 4; g++)
            for (int l = 0; l < 32; l++) {
                int lo = L[64 * g + l], hi = L[64 * g + 32 + l];
                qs[32 * g + l] = (uint8_t)((lo & 0xf) | (hi & 0xf) << 4);
                qh[l] |= (uint8_t)((lo >> 4) << (2 * g) | (hi >> 4) << (2 * g + 1));
            }
    }
}

/* ---- Q6_K -------------------------------------------------------------------------------------

     Q6_K block: 256 elements in 210 bytes
     +-----------+----------+---------------------+-------+
     | ql[128]   | qh[64]   | scales[16] (int8)   | d f16 |
     +-----------+----------+---------------------+-------+
       0..127      128..191   192..207              208..209

   Two halves of 128 elements; half h uses ql[64h..], qh[32h..]. For l = 0..31 in half h:
     element 128h +      l : ql[64h + l]      & 15,  bits 0-1 of qh[32h + l]
     element 128h + 32 + l : ql[64h + 32 + l] & 15,  bits 2-3
     element 128h + 64 + l : ql[64h + l]      >> 4,  bits 4-5
     element 128h + 96 + l : ql[64h + 32 + l] >> 4,  bits 6-7
   q = low4 | high2 << 4, in 0..63; scales[k] covers elements 16k..16k+15;
     x = (d·scales[k])·(q − 32)

   Quantize: a symmetric fit per 16-element sub-block (weights av + |x|); the sub-block scales go
   on an int8 grid whose step d maps the largest-magnitude one to −128; q re-picked at the end. */
static void dequant_q6_k(const void *b, float *out, int64_t n) {
    const uint8_t *p = b;
    for (int64_t i = 0; i < n / QK_K; i++, p += 210) {
        const uint8_t *ql = p, *qh = p + 128;
        const int8_t *sc = (const int8_t *)(p + 192);
        float d = fp16_to_f32(rd16(p + 208));
        float *y = out + i * QK_K;
        for (int h = 0; h < 2; h++, ql += 64, qh += 32, sc += 8, y += 128)
            for (int l = 0; l < 32; l++) {
                int is = l / 16;
                int q0 = ((ql[l] & 0xf) | (qh[l] & 3) << 4) - 32;
                int q1 = ((ql[l + 32] & 0xf) | (qh[l] >> 2 & 3) << 4) - 32;
                int q2 = ((ql[l] >> 4) | (qh[l] >> 4 & 3) << 4) - 32;
                int q3 = ((ql[l + 32] >> 4) | (qh[l] >> 6 & 3) << 4) - 32;
                y[l] = d * (float)sc[is] * (float)q0;
                y[l + 32] = d * (float)sc[is + 2] * (float)q1;
                y[l + 64] = d * (float)sc[is + 4] * (float)q2;
                y[l + 96] = d * (float)sc[is + 6] * (float)q3;
            }
    }
}

static void quant_q6_k(const float *in, void *b, int64_t n) {
    uint8_t *p = b;
    for (int64_t i = 0; i < n / QK_K; i++, p += 210) {
        const float *x = in + i * QK_K;
        float s[16], w[16], smax = 0;
        for (int k = 0; k < 16; k++) {
            const float *xs = x + 16 * k;
            float sum2 = 0;
            for (int l = 0; l < 16; l++) sum2 += xs[l] * xs[l];
            float av = sqrtf(sum2 / 16.0f);
            for (int l = 0; l < 16; l++) w[l] = av + fabsf(xs[l]);
            s[k] = fit_scale_sym(16, 32, xs, w);
            if (fabsf(s[k]) > fabsf(smax)) smax = s[k];
        }
        memset(p, 0, 210);
        uint16_t hd = f32_to_fp16_up(smax / -128.0f);
        float d = fp16_to_f32(hd);
        if (d == 0) continue; /* all zero (or too small for half): the zero block */
        wr16(p + 208, hd);
        int8_t *sc = (int8_t *)(p + 192);
        uint8_t L[QK_K];
        for (int k = 0; k < 16; k++) {
            sc[k] = (int8_t)clamp_i(round_i(s[k] / d), -128, 127);
            float ds = d * (float)sc[k];
            for (int l = 0; l < 16; l++)
                L[16 * k + l] = (uint8_t)(ds != 0 ? clamp_i(round_i(x[16 * k + l] / ds), -32, 31) + 32 : 32);
        }
        uint8_t *ql = p, *qh = p + 128;
        for (int h = 0; h < 2; h++, ql += 64, qh += 32) {
            const uint8_t *Lh = L + 128 * h;
            for (int l = 0; l < 32; l++) {
                ql[l] = (uint8_t)((Lh[l] & 0xf) | (Lh[l + 64] & 0xf) << 4);
                ql[l + 32] = (uint8_t)((Lh[l + 32] & 0xf) | (Lh[l + 96] & 0xf) << 4);
                qh[l] = (uint8_t)(Lh[l] >> 4 | (Lh[l + 32] >> 4) << 2 | (Lh[l + 64] >> 4) << 4 |
                                  (Lh[l + 96] >> 4) << 6);
            }
        }
    }
}

/* ---- MXFP4 (OCP microscaling FP4, as gpt-oss ships it) -----------------------------------------

     MXFP4 block: 32 elements in 17 bytes
     +--------+-------+-------+-----+--------+
     | e E8M0 | qs[0] | qs[1] | ... | qs[15] |
     +--------+-------+-------+-----+--------+
       0        1       2             16
     qs[j] = q[j] | q[j+16] << 4          (same split as Q4_0; NOT the interleaved order of the
                                           original safetensors, which a loader must repack)
     q is an E2M1 code: bit 3 sign, then magnitude {0, .5, 1, 1.5, 2, 3, 4, 6}. ggml stores the
     doubled table kvalue = {0,1,2,3,4,6,8,12, 0,−1,−2,−3,−4,−6,−8,−12} and halves the scale:
     x[j] = kvalue[q[j]] · 2^(e − 128)
   e = 0 and 1 give the subnormal floats 2^−128 and 2^−127; e = 255 (NaN in the OCP spec) is read
   as 2^127 like ggml does, never produced by quant.

   Quantize: e = floor(log2(amax)) − 2 + 127 puts amax in the top two codes; e − 1 and e + 1 are
   also scored, each with nearest-code rounding (ties toward the smaller magnitude). */
#define QK_MXFP4 32
static const int8_t k_mxfp4_values[16] = {0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12};

static float e8m0_to_f32_half(uint8_t e) {
    uint32_t bits = e < 2 ? 0x00200000u << e : (uint32_t)(e - 1) << 23;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static void dequant_mxfp4(const void *b, float *out, int64_t n) {
    const uint8_t *p = b;
    for (int64_t i = 0; i < n / QK_MXFP4; i++, p += 17) {
        float d = e8m0_to_f32_half(p[0]);
        float *y = out + i * QK_MXFP4;
        for (int j = 0; j < QK_MXFP4 / 2; j++) {
            y[j] = (float)k_mxfp4_values[p[1 + j] & 0xf] * d;
            y[j + QK_MXFP4 / 2] = (float)k_mxfp4_values[p[1 + j] >> 4] * d;
        }
    }
}

/* nearest code for x at half-scale d: |x| against the midpoints of {0,1,2,3,4,6,8,12}·d (exact
   products: d is a power of two) */
static uint8_t mxfp4_code(float x, float d) {
    static const float mid[7] = {0.5f, 1.5f, 2.5f, 3.5f, 5.0f, 7.0f, 10.0f};
    float ax = fabsf(x);
    uint8_t c = 0;
    while (c < 7 && ax > mid[c] * d) c++;
    return (uint8_t)(c && x < 0 ? c | 8 : c);
}

static void quant_mxfp4(const float *in, void *b, int64_t n) {
    uint8_t *p = b;
    for (int64_t i = 0; i < n / QK_MXFP4; i++, p += 17) {
        const float *x = in + i * QK_MXFP4;
        float amax = 0;
        for (int j = 0; j < QK_MXFP4; j++) amax = fmaxf(amax, fabsf(x[j]));
        int e0 = 0;
        if (amax > 0 && isfinite(amax)) {
            int ex;
            frexpf(amax, &ex); /* amax = f·2^ex, f in [0.5, 1): floor(log2 amax) = ex − 1 */
            e0 = clamp_i(ex - 1 - 2 + 127, 0, 254);
        }
        int best_e = e0;
        double best = INFINITY;
        for (int e = e0 - 1; amax > 0 && e <= e0 + 1; e++) {
            if (e < 0 || e > 254) continue;
            float d = e8m0_to_f32_half((uint8_t)e);
            double err = 0; /* double: near FLT_MAX the squares would overflow */
            for (int j = 0; j < QK_MXFP4; j++) {
                double r = (double)((float)k_mxfp4_values[mxfp4_code(x[j], d)] * d) - x[j];
                err += r * r;
            }
            if (err < best) { best = err; best_e = e; }
        }
        float d = e8m0_to_f32_half((uint8_t)best_e);
        p[0] = (uint8_t)best_e;
        for (int j = 0; j < QK_MXFP4 / 2; j++)
            p[1 + j] = (uint8_t)(mxfp4_code(x[j], d) | mxfp4_code(x[j + QK_MXFP4 / 2], d) << 4);
    }
}

static const moe_type_traits k_type_traits[] = {
    {"f32", 1, 4, dequant_f32, quant_f32},
    {"f16", 1, 2, dequant_f16, quant_f16},
    {"bf16", 1, 2, dequant_bf16, quant_bf16},
    {"q8_0", QK8_0, 34, dequant_q8_0, quant_q8_0},
    {"q4_0", QK4_0, 18, dequant_q4_0, quant_q4_0},
    {"q4_K", QK_K, 144, dequant_q4_k, quant_q4_k},
    {"q5_K", QK_K, 176, dequant_q5_k, quant_q5_k},
    {"q6_K", QK_K, 210, dequant_q6_k, quant_q6_k},
    {"mxfp4", QK_MXFP4, 17, dequant_mxfp4, quant_mxfp4},
};

static const moe_type_traits *type_traits(int32_t type) {
    switch (type) {
    case MOE_TYPE_F32: return &k_type_traits[0];
    case MOE_TYPE_F16: return &k_type_traits[1];
    case MOE_TYPE_BF16: return &k_type_traits[2];
    case MOE_TYPE_Q8_0: return &k_type_traits[3];
    case MOE_TYPE_Q4_0: return &k_type_traits[4];
    case MOE_TYPE_Q4_K: return &k_type_traits[5];
    case MOE_TYPE_Q5_K: return &k_type_traits[6];
    case MOE_TYPE_Q6_K: return &k_type_traits[7];
    case MOE_TYPE_MXFP4: return &k_type_traits[8];
    default: return NULL;
    }
}

/* bytes of one row of n_elems elements; 0 when n_elems is not a whole number of blocks */
static uint64_t type_row_bytes(int32_t type, int64_t n_elems) {
    const moe_type_traits *tt = type_traits(type);
    if (!tt || n_elems <= 0 || n_elems % tt->block_elems) return 0;
    return (uint64_t)(n_elems / tt->block_elems) * (uint64_t)tt->block_bytes;
}

/* ---- dot products ---------------------------------------------------------------------------
   One accumulation order serves every type and both CPU paths: eight f32 lanes, lane j summing
   elements 8i+j, reduced in a fixed order at the end. Decode dequantizes block by block into a
   small stack buffer (row_dot); prefill dequantizes a whole row once and reuses it for every
   token (dot_f32). Both give bit-identical results, so prefill equals token-by-token decode. */
#define DOT_LANES 8
#define DOT_CHUNK 256

typedef struct dot_acc { float lane[DOT_LANES]; float tail; } dot_acc;

static void dot_acc_add(dot_acc *a, const float *w, const float *x, int64_t n) {
    int64_t n8 = n / DOT_LANES * DOT_LANES;
    for (int64_t i = 0; i < n8; i += DOT_LANES)
        for (int j = 0; j < DOT_LANES; j++) a->lane[j] += w[i + j] * x[i + j];
    for (int64_t i = n8; i < n; i++) a->tail += w[i] * x[i];
}

static float dot_acc_sum(const dot_acc *a) {
    float s01 = a->lane[0] + a->lane[1], s23 = a->lane[2] + a->lane[3];
    float s45 = a->lane[4] + a->lane[5], s67 = a->lane[6] + a->lane[7];
    return ((s01 + s23) + (s45 + s67)) + a->tail;
}

static float dot_f32(const float *w, const float *x, int64_t n) {
    dot_acc a = {{0}, 0};
    dot_acc_add(&a, w, x, n);
    return dot_acc_sum(&a);
}

/* Σ dequant(row)[i]·x[i] for a row of n elements of the given type */
static float row_dot(const moe_type_traits *tt, const uint8_t *row, const float *x, int64_t n) {
    float buf[DOT_CHUNK];
    dot_acc a = {{0}, 0};
    int64_t chunk = DOT_CHUNK / tt->block_elems * tt->block_elems;
    for (int64_t i = 0; i < n; i += chunk) {
        int64_t m = n - i < chunk ? n - i : chunk;
        tt->dequant(row + (uint64_t)(i / tt->block_elems) * (uint64_t)tt->block_bytes, buf, m);
        dot_acc_add(&a, buf, x + i, m);
    }
    return dot_acc_sum(&a);
}

/* ---- x86-64 AVX2 kernels, chosen at run time -------------------------------------------------
   The same eight-lane order as above, one __m256 holding the lanes, with fused multiply-add.
   A process uses one kernel set for everything, so prefill still equals decode bit for bit.
   Fused per-type dots compute each weight exactly as its dequant function does. */
typedef struct cpu_kernels {
    float (*dot)(const float *w, const float *x, int64_t n);
    float (*row_dot)(const moe_type_traits *tt, const uint8_t *row, const float *x, int64_t n);
} cpu_kernels;

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define MOE_AVX2 __attribute__((target("avx2,fma,f16c")))

/* AVX2 code must not call ordinary (SSE-compiled) functions while ymm values are live: the
   state transition costs more than the work (measured 25x on our CI's EPYC). Every AVX2
   function is therefore flattened, and per-type dequant functions are called directly so that
   they are inlined and compiled for AVX2 too. */
#define MOE_AVX2_FLAT MOE_AVX2 __attribute__((flatten))

MOE_AVX2_FLAT static float avx2_finish(__m256 acc, float tail) {
    dot_acc a;
    _mm256_storeu_ps(a.lane, acc);
    a.tail = tail;
    return dot_acc_sum(&a);
}

MOE_AVX2_FLAT static float avx2_dot(const float *w, const float *x, int64_t n) {
    __m256 acc = _mm256_setzero_ps();
    int64_t n8 = n / 8 * 8;
    for (int64_t i = 0; i < n8; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(w + i), _mm256_loadu_ps(x + i), acc);
    float tail = 0;
    for (int64_t i = n8; i < n; i++) tail += w[i] * x[i];
    return avx2_finish(acc, tail);
}

/* dequantize a chunk (compiled for AVX2 through inlining), then the same accumulation */
#define AVX2_CHUNKED_DOT(dq)                                                                        \
    MOE_AVX2_FLAT static float avx2_dot_##dq(const moe_type_traits *tt, const uint8_t *row, const float *x, int64_t n) { \
        float buf[DOT_CHUNK];                                                                       \
        __m256 acc = _mm256_setzero_ps();                                                           \
        int64_t chunk = DOT_CHUNK / tt->block_elems * tt->block_elems;                              \
        float tail = 0;                                                                             \
        for (int64_t i = 0; i < n; i += chunk) {                                                    \
            int64_t m = n - i < chunk ? n - i : chunk, m8 = m / 8 * 8;                              \
            dq(row + (uint64_t)(i / tt->block_elems) * (uint64_t)tt->block_bytes, buf, m);          \
            for (int64_t j = 0; j < m8; j += 8)                                                     \
                acc = _mm256_fmadd_ps(_mm256_loadu_ps(buf + j), _mm256_loadu_ps(x + i + j), acc);   \
            for (int64_t j = m8; j < m; j++) tail += buf[j] * x[i + j];                             \
        }                                                                                           \
        return avx2_finish(acc, tail);                                                              \
    }
AVX2_CHUNKED_DOT(dequant_bf16)
AVX2_CHUNKED_DOT(dequant_q4_0)
AVX2_CHUNKED_DOT(dequant_q4_k)
AVX2_CHUNKED_DOT(dequant_q5_k)
AVX2_CHUNKED_DOT(dequant_q6_k)
AVX2_CHUNKED_DOT(dequant_mxfp4)

MOE_AVX2_FLAT static float avx2_dot_q8_0(const uint8_t *row, const float *x, int64_t n) {
    __m256 acc = _mm256_setzero_ps();
    for (int64_t b = 0; b < n / QK8_0; b++, row += 34, x += QK8_0) {
        __m256 d = _mm256_set1_ps(_cvtsh_ss(rd16(row)));
        for (int j = 0; j < QK8_0; j += 8) {
            __m256i q = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(row + 2 + j)));
            acc = _mm256_fmadd_ps(_mm256_mul_ps(d, _mm256_cvtepi32_ps(q)), _mm256_loadu_ps(x + j), acc);
        }
    }
    return avx2_finish(acc, 0);
}

MOE_AVX2_FLAT static float avx2_dot_f16(const uint8_t *row, const float *x, int64_t n) {
    __m256 acc = _mm256_setzero_ps();
    int64_t n8 = n / 8 * 8;
    for (int64_t i = 0; i < n8; i += 8)
        acc = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(row + 2 * i))), _mm256_loadu_ps(x + i), acc);
    float tail = 0;
    for (int64_t i = n8; i < n; i++) tail += _cvtsh_ss(rd16(row + 2 * i)) * x[i];
    return avx2_finish(acc, tail);
}

static float avx2_row_dot(const moe_type_traits *tt, const uint8_t *row, const float *x, int64_t n) {
    if (tt->dequant == dequant_f32) return avx2_dot((const float *)(const void *)row, x, n);
    if (tt->dequant == dequant_q8_0) return avx2_dot_q8_0(row, x, n);
    if (tt->dequant == dequant_f16) return avx2_dot_f16(row, x, n);
    if (tt->dequant == dequant_bf16) return avx2_dot_dequant_bf16(tt, row, x, n);
    if (tt->dequant == dequant_q4_0) return avx2_dot_dequant_q4_0(tt, row, x, n);
    if (tt->dequant == dequant_q4_k) return avx2_dot_dequant_q4_k(tt, row, x, n);
    if (tt->dequant == dequant_q5_k) return avx2_dot_dequant_q5_k(tt, row, x, n);
    if (tt->dequant == dequant_q6_k) return avx2_dot_dequant_q6_k(tt, row, x, n);
    if (tt->dequant == dequant_mxfp4) return avx2_dot_dequant_mxfp4(tt, row, x, n);
    return row_dot(tt, row, x, n);
}

static int cpu_has_avx2(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}
#endif

static cpu_kernels cpu_kernels_pick(void) {
    cpu_kernels k = {dot_f32, row_dot};
#ifdef MOE_AVX2
    if (cpu_has_avx2()) {
        k.dot = avx2_dot;
        k.row_dot = avx2_row_dot;
    }
#endif
    return k;
}

/* ============================================================================================ */
/* 4. tokenizer                                                                                  */
/* ============================================================================================ */
/* TOKENIZER: the vocabulary loaders and the tokenizer API live here. */
typedef struct moe_vocab moe_vocab;
struct moe_vocab { int32_t n_tokens; };

static moe_status vocab_load_gguf(const gguf_file *g, moe_vocab **out) {
    (void)g;
    *out = NULL;
    return MOE_OK;
}
static void vocab_free(moe_vocab *v) { moe_free(v); }

/* ============================================================================================ */
/* 5. model                                                                                      */
/* ============================================================================================ */
enum { ARCH_QWEN3MOE = 1 };

struct moe_model {
    moe_weights w;             /* hyperparameters and weights: what a backend needs */
    char arch_name[32];
    moe_file file;
    gguf_file gguf;
    float *owned;              /* f32 copies of 1-D weights (norms) */
    const uint8_t **expert_tables;
    moe_vocab *vocab;
    moe_token bos, eos;
    int32_t backend, n_threads;
    moe_logger log;
    moe_vk_backend *vk;
    uint64_t n_params;
    double t_load_s;
};

/* Binds a named tensor and checks its shape (dims beyond n_dims must be absent). */
static moe_status bind_weight(moe_model *m, moe_weight *w, const char *name, int required, int n_dims,
                              int64_t ne0, int64_t ne1, int64_t ne2) {
    const gguf_tensor *t = gguf_find_tensor(&m->gguf, name);
    memset(w, 0, sizeof *w);
    if (!t) return required ? set_error(MOE_ERR_FORMAT, "model: required tensor '%s' is missing", name) : MOE_OK;
    int64_t want[3] = {ne0, ne1, ne2};
    int bad = t->n_dims != n_dims && !(t->n_dims < n_dims && t->ne[n_dims - 1] == 1);
    for (int d = 0; d < 3 && !bad; d++) bad = t->ne[d] != (d < n_dims ? want[d] : 1);
    if (bad || t->ne[3] != 1)
        return set_error(MOE_ERR_FORMAT, "model: tensor '%s' has shape [%lld, %lld, %lld, %lld], expected [%lld, %lld, %lld]",
                         name, (long long)t->ne[0], (long long)t->ne[1], (long long)t->ne[2], (long long)t->ne[3],
                         (long long)ne0, (long long)(n_dims > 1 ? ne1 : 1), (long long)(n_dims > 2 ? ne2 : 1));
    w->name = t->name.p;
    w->type = t->type;
    w->n_dims = n_dims;
    memcpy(w->ne, t->ne, sizeof w->ne);
    w->nbytes = t->nbytes;
    w->row_bytes = type_row_bytes(t->type, t->ne[0]);
    w->data = t->data;
    if (n_dims == 3) w->expert_bytes = w->row_bytes * (uint64_t)t->ne[1];
    return MOE_OK;
}

static moe_status load_hparams(moe_model *m) {
    const gguf_file *g = &m->gguf;
    moe_hparams *hp = &m->w.hp;
    gguf_str arch = {0};
    moe_status st = gguf_get_str(g, "general.architecture", 1, &arch);
    if (st) return st;
    memcpy(m->arch_name, arch.p, arch.n < 31 ? arch.n : 31);
    if (!gguf_str_eq(arch, "qwen3moe"))
        return set_error(MOE_ERR_UNSUPPORTED, "model: architecture '%s' is not supported yet (supported: qwen3moe)", m->arch_name);
    hp->arch = ARCH_QWEN3MOE;
    char key[96];
    int64_t v;
#define HP_INT(field, suffix, req, lo, hi, dflt)                                          \
    do {                                                                                  \
        snprintf(key, sizeof key, "%s.%s", m->arch_name, suffix);                         \
        v = (dflt);                                                                       \
        if ((st = gguf_get_int(g, key, req, lo, hi, &v))) return st;                      \
        hp->field = (int32_t)v;                                                           \
    } while (0)
    HP_INT(n_embd, "embedding_length", 1, 1, 1 << 20, 0);
    HP_INT(n_layer, "block_count", 1, 1, 4096, 0);
    HP_INT(n_head, "attention.head_count", 1, 1, 4096, 0);
    HP_INT(n_head_kv, "attention.head_count_kv", 0, 1, 4096, hp->n_head);
    HP_INT(head_dim, "attention.key_length", 0, 2, 4096, hp->n_embd / hp->n_head);
    HP_INT(n_ctx_train, "context_length", 0, 1, INT32_MAX, 4096);
    HP_INT(n_expert, "expert_count", 1, 1, 4096, 0);
    HP_INT(n_expert_used, "expert_used_count", 1, 1, 4096, 0);
    HP_INT(n_ff_exp, "expert_feed_forward_length", 1, 1, 1 << 20, 0);
    HP_INT(n_rot, "rope.dimension_count", 0, 2, 4096, hp->head_dim);
    HP_INT(norm_topk, "expert_weights_norm", 0, 0, 1, 1);
#undef HP_INT
    snprintf(key, sizeof key, "%s.attention.value_length", m->arch_name);
    v = hp->head_dim;
    if ((st = gguf_get_int(g, key, 0, 1, 4096, &v))) return st;
    if (v != hp->head_dim) return set_error(MOE_ERR_UNSUPPORTED, "model: value_length %lld != key_length %d", (long long)v, hp->head_dim);
    hp->rms_eps = 1e-6f;
    hp->rope_base = 10000.0f;
    snprintf(key, sizeof key, "%s.attention.layer_norm_rms_epsilon", m->arch_name);
    if ((st = gguf_get_f32(g, key, 0, &hp->rms_eps))) return st;
    snprintf(key, sizeof key, "%s.rope.freq_base", m->arch_name);
    if ((st = gguf_get_f32(g, key, 0, &hp->rope_base))) return st;
    if (hp->n_head % hp->n_head_kv)
        return set_error(MOE_ERR_FORMAT, "model: %d query heads is not a multiple of %d kv heads", hp->n_head, hp->n_head_kv);
    if (hp->n_expert_used > hp->n_expert)
        return set_error(MOE_ERR_FORMAT, "model: expert_used_count %d > expert_count %d", hp->n_expert_used, hp->n_expert);
    if (hp->n_rot > hp->head_dim || hp->n_rot % 2)
        return set_error(MOE_ERR_FORMAT, "model: rope dimension %d does not fit head size %d", hp->n_rot, hp->head_dim);
    if (!(hp->rms_eps > 0) || !(hp->rope_base > 0))
        return set_error(MOE_ERR_FORMAT, "model: rms epsilon and rope base must be positive");
    return MOE_OK;
}

/* 1-D weights (norms) are small: keep them as f32 whatever the file stored, so kernels need
   only one norm-weight type. */
static moe_weight *norm_weight(moe_model *m, int i) { /* i in [0, 1 + 4 n_layer) */
    if (i == 0) return &m->w.output_norm;
    moe_layer *L = &m->w.layers[(i - 1) / 4];
    switch ((i - 1) % 4) {
    case 0: return &L->attn_norm;
    case 1: return &L->ffn_norm;
    case 2: return &L->q_norm;
    default: return &L->k_norm;
    }
}

static moe_status weights_to_f32(moe_model *m) {
    int n = 1 + 4 * m->w.hp.n_layer;
    size_t total = 0;
    for (int i = 0; i < n; i++) total += (size_t)norm_weight(m, i)->ne[0];
    m->owned = moe_malloc(total * sizeof(float));
    if (!m->owned) return set_error(MOE_ERR_NO_MEMORY, "model: out of memory for norm weights");
    float *p = m->owned;
    for (int i = 0; i < n; i++) {
        moe_weight *w = norm_weight(m, i);
        type_traits(w->type)->dequant(w->data, p, w->ne[0]);
        for (int64_t j = 0; j < w->ne[0]; j++)
            if (!isfinite(p[j])) return set_error(MOE_ERR_FORMAT, "model: tensor '%s' holds a non-finite value", w->name);
        w->data = (const uint8_t *)p;
        w->type = MOE_TYPE_F32;
        w->row_bytes = w->nbytes = (uint64_t)w->ne[0] * 4;
        p += w->ne[0];
    }
    return MOE_OK;
}

static moe_status bind_qwen3moe(moe_model *m) {
    moe_hparams *hp = &m->w.hp;
    moe_status st;
    int64_t E = hp->n_embd, Q = (int64_t)hp->n_head * hp->head_dim, KV = (int64_t)hp->n_head_kv * hp->head_dim;
    const gguf_tensor *emb = gguf_find_tensor(&m->gguf, "token_embd.weight");
    if (!emb) return set_error(MOE_ERR_FORMAT, "model: required tensor 'token_embd.weight' is missing");
    hp->n_vocab = (int32_t)(emb->ne[1] > INT32_MAX ? 0 : emb->ne[1]);
    if ((st = bind_weight(m, &m->w.tok_embd, "token_embd.weight", 1, 2, E, emb->ne[1], 1))) return st;
    if ((st = bind_weight(m, &m->w.output_norm, "output_norm.weight", 1, 1, E, 1, 1))) return st;
    if ((st = bind_weight(m, &m->w.output, "output.weight", 0, 2, E, hp->n_vocab, 1))) return st;
    if (!m->w.output.data) m->w.output = m->w.tok_embd; /* tied embeddings */
    m->w.layers = moe_calloc((size_t)hp->n_layer, sizeof *m->w.layers);
    m->expert_tables = moe_calloc((size_t)hp->n_layer * 3 * (size_t)hp->n_expert, sizeof *m->expert_tables);
    if (!m->w.layers || !m->expert_tables) return set_error(MOE_ERR_NO_MEMORY, "model: out of memory for the layer table");
    char name[96];
    for (int l = 0; l < hp->n_layer; l++) {
        moe_layer *L = &m->w.layers[l];
#define BIND(field, suffix, nd, a, b, c)                                                   \
        snprintf(name, sizeof name, "blk.%d.%s.weight", l, suffix);                        \
        if ((st = bind_weight(m, &L->field, name, 1, nd, a, b, c))) return st;
        BIND(attn_norm, "attn_norm", 1, E, 1, 1);
        BIND(wq, "attn_q", 2, E, Q, 1);
        BIND(wk, "attn_k", 2, E, KV, 1);
        BIND(wv, "attn_v", 2, E, KV, 1);
        BIND(wo, "attn_output", 2, Q, E, 1);
        BIND(q_norm, "attn_q_norm", 1, hp->head_dim, 1, 1);
        BIND(k_norm, "attn_k_norm", 1, hp->head_dim, 1, 1);
        BIND(ffn_norm, "ffn_norm", 1, E, 1, 1);
        BIND(router, "ffn_gate_inp", 2, E, hp->n_expert, 1);
        BIND(gate_exps, "ffn_gate_exps", 3, E, hp->n_ff_exp, hp->n_expert);
        BIND(up_exps, "ffn_up_exps", 3, E, hp->n_ff_exp, hp->n_expert);
        BIND(down_exps, "ffn_down_exps", 3, hp->n_ff_exp, E, hp->n_expert);
#undef BIND
        moe_weight *exps[3] = {&L->gate_exps, &L->up_exps, &L->down_exps};
        for (int k = 0; k < 3; k++) {
            const uint8_t **table = m->expert_tables + ((size_t)l * 3 + (size_t)k) * (size_t)hp->n_expert;
            for (int e = 0; e < hp->n_expert; e++) table[e] = exps[k]->data + (uint64_t)e * exps[k]->expert_bytes;
            exps[k]->expert_data = table;
        }
    }
    return weights_to_f32(m);
}

/* ============================================================================================ */
/* 6. forward passes                                                                             */
/* ============================================================================================ */
/* Qwen3-MoE attention block (ARCHITECTURES.md §1.2): x += Wo · attn(rope(qnorm(Wq a)), ...). */
static void attention_block(void *be, const moe_ops *o, const moe_weights *w, int l, int n, int pos0) {
    const moe_hparams *hp = &w->hp;
    const moe_layer *L = &w->layers[l];
    o->rmsnorm(be, ACT_XN, ACT_X, &L->attn_norm, n, hp->n_embd, hp->rms_eps);
    o->matmul(be, ACT_Q, &L->wq, ACT_XN, 0, n);              /* [n][n_head·hd] */
    o->matmul(be, ACT_K, &L->wk, ACT_XN, 0, n);              /* [n][n_kv·hd]   */
    o->matmul(be, ACT_V, &L->wv, ACT_XN, 0, n);
    o->rmsnorm(be, ACT_Q, ACT_Q, &L->q_norm, n * hp->n_head, hp->head_dim, hp->rms_eps);
    o->rmsnorm(be, ACT_K, ACT_K, &L->k_norm, n * hp->n_head_kv, hp->head_dim, hp->rms_eps);
    o->rope(be, ACT_Q, n, hp->n_head, hp->head_dim, hp->n_rot, hp->rope_base, pos0);
    o->rope(be, ACT_K, n, hp->n_head_kv, hp->head_dim, hp->n_rot, hp->rope_base, pos0);
    o->attention(be, l, n, pos0, 1.0f / sqrtf((float)hp->head_dim));
    o->matmul(be, ACT_OUT, &L->wo, ACT_ATTN, 0, n);
    o->add(be, ACT_X, ACT_OUT, n, hp->n_embd);
}

/* Mixture-of-experts FFN block: x += Σ_topk w_e · SwiGLU_e(norm(x)). */
static void moe_ffn_block(void *be, const moe_ops *o, const moe_weights *w, int l, int n) {
    const moe_hparams *hp = &w->hp;
    const moe_layer *L = &w->layers[l];
    o->rmsnorm(be, ACT_XN, ACT_X, &L->ffn_norm, n, hp->n_embd, hp->rms_eps);
    o->matmul(be, ACT_ROUTER, &L->router, ACT_XN, 0, n);     /* [n][n_expert] */
    o->moe_ffn(be, ACT_OUT, ACT_XN, L, n);
    o->add(be, ACT_X, ACT_OUT, n, hp->n_embd);
}

/* One chunk of n tokens at positions pos0..; logits for the last n_out rows go to ACT_LOGITS. */
static void forward_qwen3moe(void *be, const moe_ops *o, const moe_weights *w, const moe_token *tokens,
                             int n, int pos0, int n_out) {
    const moe_hparams *hp = &w->hp;
    o->embed(be, ACT_X, &w->tok_embd, tokens, n);           /* [n][n_embd] */
    for (int l = 0; l < hp->n_layer; l++) {
        attention_block(be, o, w, l, n, pos0);
        moe_ffn_block(be, o, w, l, n);
    }
    o->rmsnorm(be, ACT_XN, ACT_X, &w->output_norm, n, hp->n_embd, hp->rms_eps);
    o->matmul(be, ACT_LOGITS, &w->output, ACT_XN, n - n_out, n_out);
}

/* ============================================================================================ */
/* 7. CPU backend                                                                                */
/* ============================================================================================ */
#define CPU_ROWS_PER_TASK 16

typedef struct cpu_ctx {
    cpu_kernels k;
    const moe_weights *w;
    moe_ctx_shape shape;
    thread_pool *pool;
    int n_threads;
    float *act[ACT_COUNT];
    void *k_cache, *v_cache;   /* [n_layer][n_ctx][n_kv·hd], f32 or f16 */
    int kv_f16;
    float *row_buf;            /* per thread: one dequantized weight row */
    float *att_buf;            /* per thread: n_ctx scores + head_dim scratch */
    size_t row_buf_len, att_buf_len;
    /* MoE routing scratch for n_batch tokens */
    int32_t *topk_id;          /* [n][k] */
    float *topk_w;             /* [n][k] */
    int32_t *pair_of;          /* [n·k]  (token, slot) → pair index, pairs grouped by expert */
    int32_t *pair_tok;         /* [n·k]  token of each pair */
    int32_t *exp_start;        /* [n_expert + 1] */
    int32_t *tasks;            /* (expert, first row) work items */
    float *pair_h, *pair_u;    /* [n·k][n_ff] */
    float *pair_out;           /* [n·k][n_embd] */
} cpu_ctx;

struct moe_ctx {
    moe_model *model;
    const moe_ops *ops;
    int32_t n_ctx, n_batch, kv_type, logits_all;
    int32_t pos;
    float *logits;             /* [logits_cap rows][n_vocab] on the host */
    int32_t n_logits, logits_cap;
    moe_stats stats;
    void *be;                  /* the backend's per-context state (cpu_ctx or Vulkan's) */
    cpu_ctx *cpu;              /* == be on the CPU backend, else NULL */
};

static float *act_row(cpu_ctx *cc, int buf, int row, int width) { return cc->act[buf] + (size_t)row * (size_t)width; }

static int act_width(const moe_weights *w, int buf) {
    const moe_hparams *hp = &w->hp;
    switch (buf) {
    case ACT_Q: case ACT_ATTN: return hp->n_head * hp->head_dim;
    case ACT_K: case ACT_V: return hp->n_head_kv * hp->head_dim;
    case ACT_ROUTER: return hp->n_expert;
    case ACT_LOGITS: return hp->n_vocab;
    default: return hp->n_embd;
    }
}

static void cpu_embed(void *be, int dst, const moe_weight *w, const moe_token *tokens, int n) {
    cpu_ctx *cc = be;
    const moe_type_traits *tt = type_traits(w->type);
    for (int i = 0; i < n; i++)
        tt->dequant(w->data + (uint64_t)tokens[i] * w->row_bytes, act_row(cc, dst, i, (int)w->ne[0]), w->ne[0]);
}

static void cpu_rmsnorm(void *be, int dst, int src, const moe_weight *w, int n_rows, int width, float eps) {
    cpu_ctx *cc = be;
    const float *g = w ? (const float *)w->data : NULL;
    for (int r = 0; r < n_rows; r++) {
        const float *x = act_row(cc, src, r, width);
        float *y = act_row(cc, dst, r, width);
        float scale = 1.0f / sqrtf(cc->k.dot(x, x, width) / (float)width + eps);
        for (int i = 0; i < width; i++) y[i] = x[i] * scale * (g ? g[i] : 1.0f);
    }
}

/* dst[i·dst_stride + r] = W_r · src_i for rows r of a task; src_i is src row i or, with a
   gather list, row idx[i]. */
typedef struct mm_job {
    const moe_type_traits *tt;
    int64_t K, M;              /* inputs, outputs */
    const float *src;
    const int32_t *idx;        /* optional gather list */
    int n;
    float *dst;
    int64_t dst_stride;
    cpu_ctx *cc;
    /* dense weight, or experts: tasks[] of (expert, row0), per-expert pair ranges */
    const uint8_t *w;
    uint64_t row_bytes;
    const uint8_t *const *expert_data;
    const int32_t *exp_start;
    float *dst2;               /* second weight (up) for the fused gate/up pass */
    const uint8_t *const *expert_data2;
} mm_job;

static void mm_rows(const mm_job *j, const uint8_t *w, int64_t r0, int64_t r1, const float *src, const int32_t *idx,
                    int n, float *dst, int thread) {
    float *row = j->cc->row_buf + (size_t)thread * j->cc->row_buf_len;
    for (int64_t r = r0; r < r1; r++) {
        const uint8_t *wr = w + (uint64_t)r * j->row_bytes;
        if (n == 1) {
            dst[r] = j->cc->k.row_dot(j->tt, wr, src + (idx ? (int64_t)idx[0] * j->K : 0), j->K);
            continue;
        }
        j->tt->dequant(wr, row, j->K);
        for (int i = 0; i < n; i++)
            dst[(int64_t)i * j->dst_stride + r] = j->cc->k.dot(row, src + (int64_t)(idx ? idx[i] : i) * j->K, j->K);
    }
}

static void mm_dense_task(void *arg, int64_t t, int thread) {
    const mm_job *j = arg;
    int64_t r0 = t * CPU_ROWS_PER_TASK, r1 = r0 + CPU_ROWS_PER_TASK < j->M ? r0 + CPU_ROWS_PER_TASK : j->M;
    mm_rows(j, j->w, r0, r1, j->src, j->idx, j->n, j->dst, thread);
}

static void cpu_matmul(void *be, int dst, const moe_weight *w, int src, int src_row0, int n) {
    cpu_ctx *cc = be;
    if (n <= 0) return;
    mm_job j = {0};
    j.tt = type_traits(w->type);
    j.K = w->ne[0];
    j.M = w->ne[1];
    j.src = act_row(cc, src, src_row0, (int)j.K);
    j.n = n;
    j.dst = cc->act[dst];
    j.dst_stride = j.M;
    j.cc = cc;
    j.w = w->data;
    j.row_bytes = w->row_bytes;
    pool_run(cc->pool, mm_dense_task, &j, (j.M + CPU_ROWS_PER_TASK - 1) / CPU_ROWS_PER_TASK);
}

static void cpu_rope(void *be, int buf, int n, int n_head, int head_dim, int n_rot, float base, int pos0) {
    cpu_ctx *cc = be;
    int half = n_rot / 2;
    for (int i = 0; i < n; i++) {
        float pos = (float)(pos0 + i);
        for (int p = 0; p < half; p++) {
            /* as HF: inv_freq in f32, angle = f32(pos · inv_freq), cos/sin of that */
            float inv_freq = (float)(1.0 / pow((double)base, (double)(2 * p) / (double)n_rot));
            float ang = pos * inv_freq, cs = cosf(ang), sn = sinf(ang);
            for (int h = 0; h < n_head; h++) {
                float *x = act_row(cc, buf, i, n_head * head_dim) + (size_t)h * (size_t)head_dim;
                float a = x[p], b = x[p + half];
                x[p] = a * cs - b * sn;
                x[p + half] = b * cs + a * sn;
            }
        }
    }
}

static void kv_put(const cpu_ctx *cc, void *cache, size_t at, const float *src, int n) {
    if (cc->kv_f16) {
        uint8_t *d = (uint8_t *)cache + at * 2;
        for (int i = 0; i < n; i++) wr16(d + 2 * i, f32_to_fp16(src[i]));
    } else memcpy((float *)cache + at, src, (size_t)n * 4);
}

static void kv_get(const cpu_ctx *cc, const void *cache, size_t at, float *dst, int n) {
    if (cc->kv_f16) dequant_f16((const uint8_t *)cache + at * 2, dst, n);
    else memcpy(dst, (const float *)cache + at, (size_t)n * 4);
}

typedef struct attn_job { cpu_ctx *cc; int layer, n, pos0; float scale; } attn_job;

static void attn_task(void *arg, int64_t t, int thread) {
    const attn_job *j = arg;
    cpu_ctx *cc = j->cc;
    const moe_hparams *hp = &cc->w->hp;
    int hd = hp->head_dim, kvw = hp->n_head_kv * hd;
    int i = (int)(t / hp->n_head), h = (int)(t % hp->n_head);
    int kvh = h / (hp->n_head / hp->n_head_kv);
    int n_keys = j->pos0 + i + 1;
    size_t layer_off = (size_t)j->layer * (size_t)cc->shape.n_ctx * (size_t)kvw;
    float *scores = cc->att_buf + (size_t)thread * cc->att_buf_len;
    float *tmp = scores + cc->shape.n_ctx;
    const float *q = act_row(cc, ACT_Q, i, hp->n_head * hd) + (size_t)h * (size_t)hd;
    float *out = act_row(cc, ACT_ATTN, i, hp->n_head * hd) + (size_t)h * (size_t)hd;
    float mx = -INFINITY;
    for (int p = 0; p < n_keys; p++) {
        kv_get(cc, cc->k_cache, layer_off + (size_t)p * (size_t)kvw + (size_t)kvh * (size_t)hd, tmp, hd);
        scores[p] = cc->k.dot(q, tmp, hd) * j->scale;
        mx = fmaxf(mx, scores[p]);
    }
    float sum = 0;
    for (int p = 0; p < n_keys; p++) sum += (scores[p] = expf(scores[p] - mx));
    float inv = 1.0f / sum;
    memset(out, 0, (size_t)hd * sizeof *out);
    for (int p = 0; p < n_keys; p++) {
        kv_get(cc, cc->v_cache, layer_off + (size_t)p * (size_t)kvw + (size_t)kvh * (size_t)hd, tmp, hd);
        float wgt = scores[p] * inv;
        for (int d = 0; d < hd; d++) out[d] += wgt * tmp[d];
    }
}

static void cpu_attention(void *be, int layer, int n, int pos0, float scale) {
    cpu_ctx *cc = be;
    const moe_hparams *hp = &cc->w->hp;
    int kvw = hp->n_head_kv * hp->head_dim;
    size_t layer_off = (size_t)layer * (size_t)cc->shape.n_ctx * (size_t)kvw;
    for (int i = 0; i < n; i++) {
        size_t at = layer_off + (size_t)(pos0 + i) * (size_t)kvw;
        kv_put(cc, cc->k_cache, at, act_row(cc, ACT_K, i, kvw), kvw);
        kv_put(cc, cc->v_cache, at, act_row(cc, ACT_V, i, kvw), kvw);
    }
    attn_job j = {cc, layer, n, pos0, scale};
    pool_run(cc->pool, attn_task, &j, (int64_t)n * hp->n_head);
}

static void cpu_add(void *be, int dst, int src, int n, int width) {
    cpu_ctx *cc = be;
    float *d = cc->act[dst];
    const float *s = cc->act[src];
    for (size_t i = 0; i < (size_t)n * (size_t)width; i++) d[i] += s[i];
}

/* Softmax over all experts in f32, top-k by probability (lowest index wins ties, like
   torch.topk on distinct values), optional renormalisation over the k. */
static void router_topk(const float *logits, int n_expert, int k, int norm, int32_t *ids, float *w) {
    float mx = -INFINITY, sum = 0;
    for (int e = 0; e < n_expert; e++) mx = fmaxf(mx, logits[e]);
    for (int e = 0; e < n_expert; e++) sum += expf(logits[e] - mx);
    for (int s = 0; s < k; s++) {
        int best = -1;
        for (int e = 0; e < n_expert; e++) {
            int taken = 0;
            for (int u = 0; u < s; u++) taken |= ids[u] == e;
            if (!taken && (best < 0 || logits[e] > logits[best])) best = e;
        }
        ids[s] = best;
        w[s] = expf(logits[best] - mx) / sum;
    }
    if (norm) {
        float tot = 0;
        for (int s = 0; s < k; s++) tot += w[s];
        for (int s = 0; s < k; s++) w[s] /= tot;
    }
}

/* gate and up rows for every pair routed to one expert */
static void moe_gate_up_task(void *arg, int64_t t, int thread) {
    const mm_job *j = arg;
    int e = j->cc->tasks[2 * t], r0 = j->cc->tasks[2 * t + 1];
    int r1 = r0 + CPU_ROWS_PER_TASK < j->M ? r0 + CPU_ROWS_PER_TASK : (int)j->M;
    int p0 = j->exp_start[e], np = j->exp_start[e + 1] - p0;
    mm_rows(j, j->expert_data[e], r0, r1, j->src, j->idx + p0, np, j->dst + (size_t)p0 * (size_t)j->M, thread);
    mm_rows(j, j->expert_data2[e], r0, r1, j->src, j->idx + p0, np, j->dst2 + (size_t)p0 * (size_t)j->M, thread);
}

static void moe_down_task(void *arg, int64_t t, int thread) {
    const mm_job *j = arg;
    int e = j->cc->tasks[2 * t], r0 = j->cc->tasks[2 * t + 1];
    int r1 = r0 + CPU_ROWS_PER_TASK < j->M ? r0 + CPU_ROWS_PER_TASK : (int)j->M;
    int p0 = j->exp_start[e], np = j->exp_start[e + 1] - p0;
    mm_rows(j, j->expert_data[e], r0, r1, j->src + (size_t)p0 * (size_t)j->K, NULL, np, j->dst + (size_t)p0 * (size_t)j->M, thread);
}

static int64_t expert_tasks(cpu_ctx *cc, const int32_t *exp_start, int n_expert, int64_t rows) {
    int64_t nt = 0;
    for (int e = 0; e < n_expert; e++) {
        if (exp_start[e + 1] == exp_start[e]) continue;
        for (int64_t r = 0; r < rows; r += CPU_ROWS_PER_TASK) {
            cc->tasks[2 * nt] = e;
            cc->tasks[2 * nt + 1] = (int32_t)r;
            nt++;
        }
    }
    return nt;
}

static void cpu_moe_ffn(void *be, int dst, int src, const moe_layer *L, int n) {
    cpu_ctx *cc = be;
    const moe_hparams *hp = &cc->w->hp;
    int k = hp->n_expert_used, E = hp->n_expert, ff = hp->n_ff_exp, D = hp->n_embd;
    /* route every token, then group the (token, slot) pairs by expert */
    for (int i = 0; i < n; i++)
        router_topk(act_row(cc, ACT_ROUTER, i, E), E, k, hp->norm_topk, cc->topk_id + i * k, cc->topk_w + i * k);
    int32_t *start = cc->exp_start;
    memset(start, 0, (size_t)(E + 1) * sizeof *start);
    for (int p = 0; p < n * k; p++) start[cc->topk_id[p] + 1]++;
    for (int e = 0; e < E; e++) start[e + 1] += start[e];
    for (int e = E; e > 0; e--) start[e] = start[e - 1];
    start[0] = 0;
    for (int p = 0; p < n * k; p++) { /* stable: pairs of an expert stay in token order */
        int e = cc->topk_id[p];
        int q = start[e + 1]++;
        cc->pair_of[p] = q;
        cc->pair_tok[q] = p / k;
    }
    /* start[e+1] now ends expert e, and start[0] = 0 begins expert 0 */
    mm_job j = {0};
    j.cc = cc;
    j.exp_start = start;
    j.idx = cc->pair_tok;
    j.src = act_row(cc, src, 0, D);
    j.tt = type_traits(L->gate_exps.type);
    j.K = D;
    j.M = ff;
    j.row_bytes = L->gate_exps.row_bytes;
    j.expert_data = L->gate_exps.expert_data;
    j.expert_data2 = L->up_exps.expert_data;
    j.dst = cc->pair_h;
    j.dst2 = cc->pair_u;
    j.dst_stride = ff;
    if (L->up_exps.type != L->gate_exps.type) { /* rare: run the two as separate passes */
        j.dst2 = NULL;
    }
    if (j.dst2) pool_run(cc->pool, moe_gate_up_task, &j, expert_tasks(cc, start, E, ff));
    else {
        mm_job ju = j;
        ju.expert_data2 = NULL;
        /* gate */
        j.expert_data2 = j.expert_data;
        j.dst2 = cc->pair_h;
        pool_run(cc->pool, moe_gate_up_task, &j, expert_tasks(cc, start, E, ff));
        /* up */
        ju.tt = type_traits(L->up_exps.type);
        ju.row_bytes = L->up_exps.row_bytes;
        ju.expert_data = L->up_exps.expert_data;
        ju.expert_data2 = L->up_exps.expert_data;
        ju.dst = ju.dst2 = cc->pair_u;
        pool_run(cc->pool, moe_gate_up_task, &ju, expert_tasks(cc, start, E, ff));
    }
    for (size_t i = 0; i < (size_t)n * (size_t)k * (size_t)ff; i++) {
        float g = cc->pair_h[i];
        cc->pair_h[i] = g / (1.0f + expf(-g)) * cc->pair_u[i];   /* silu(gate) ⊙ up */
    }
    mm_job jd = {0};
    jd.cc = cc;
    jd.exp_start = start;
    jd.src = cc->pair_h;
    jd.tt = type_traits(L->down_exps.type);
    jd.K = ff;
    jd.M = D;
    jd.row_bytes = L->down_exps.row_bytes;
    jd.expert_data = L->down_exps.expert_data;
    jd.dst = cc->pair_out;
    jd.dst_stride = D;
    pool_run(cc->pool, moe_down_task, &jd, expert_tasks(cc, start, E, D));
    for (int i = 0; i < n; i++) {
        float *y = act_row(cc, dst, i, D);
        memset(y, 0, (size_t)D * sizeof *y);
        for (int s = 0; s < k; s++) {
            const float *o = cc->pair_out + (size_t)cc->pair_of[i * k + s] * (size_t)D;
            float w = cc->topk_w[i * k + s];
            for (int d = 0; d < D; d++) y[d] += w * o[d];
        }
    }
}

static void cpu_read_logits(void *be, float *dst, int n) {
    cpu_ctx *cc = be;
    memcpy(dst, cc->act[ACT_LOGITS], (size_t)n * (size_t)cc->w->hp.n_vocab * sizeof(float));
}

static void cpu_begin_step(void *be) { (void)be; }
static moe_status cpu_end_step(void *be) { (void)be; return MOE_OK; }

static void cpu_kv_copy(cpu_ctx *cc, uint8_t *host, int n_rows, int to_host) {
    const moe_hparams *hp = &cc->w->hp;
    size_t rb = (size_t)hp->n_head_kv * (size_t)hp->head_dim * (cc->kv_f16 ? 2 : 4);
    size_t layer_bytes = (size_t)cc->shape.n_ctx * rb, used = (size_t)n_rows * rb;
    for (int l = 0; l < hp->n_layer; l++)
        for (int kv = 0; kv < 2; kv++, host += used) {
            uint8_t *cache = (uint8_t *)(kv ? cc->v_cache : cc->k_cache) + (size_t)l * layer_bytes;
            if (to_host) memcpy(host, cache, used);
            else memcpy(cache, host, used);
        }
}
static moe_status cpu_kv_save(void *be, void *dst, int n_rows) {
    cpu_kv_copy(be, dst, n_rows, 1);
    return MOE_OK;
}
static moe_status cpu_kv_load(void *be, const void *src, int n_rows) {
    cpu_kv_copy(be, (uint8_t *)(uintptr_t)src, n_rows, 0);
    return MOE_OK;
}

static const moe_ops k_cpu_ops = {cpu_embed, cpu_rmsnorm, cpu_matmul, cpu_rope, cpu_attention, cpu_add, cpu_moe_ffn,
                                  cpu_begin_step, cpu_end_step, cpu_read_logits, cpu_kv_save, cpu_kv_load};

static void cpu_ctx_free(void *be) {
    cpu_ctx *cc = be;
    if (!cc) return;
    pool_free(cc->pool);
    for (int i = 0; i < ACT_COUNT; i++) moe_free(cc->act[i]);
    moe_free(cc->k_cache);
    moe_free(cc->v_cache);
    moe_free(cc->row_buf);
    moe_free(cc->att_buf);
    moe_free(cc->topk_id);
    moe_free(cc->topk_w);
    moe_free(cc->pair_of);
    moe_free(cc->pair_tok);
    moe_free(cc->exp_start);
    moe_free(cc->tasks);
    moe_free(cc->pair_h);
    moe_free(cc->pair_u);
    moe_free(cc->pair_out);
    moe_free(cc);
}

static size_t mul_or_zero(size_t a, size_t b) { return (b && a > SIZE_MAX / b) ? 0 : a * b; }

static moe_status cpu_ctx_new(const moe_weights *w, const moe_ctx_shape *shape, void **out) {
    const moe_hparams *hp = &w->hp;
    cpu_ctx *cc = moe_calloc(1, sizeof *cc);
    if (!cc) return set_error(MOE_ERR_NO_MEMORY, "context: out of memory");
    cc->k = cpu_kernels_pick();
    cc->w = w;
    cc->shape = *shape;
    const moe_ctx_shape *c = shape;
    size_t nb = (size_t)c->n_batch, k = (size_t)hp->n_expert_used;
    int ok = 1;
    for (int i = 0; i < ACT_COUNT; i++) {
        size_t rows = (i == ACT_LOGITS && !c->logits_all) ? 1 : nb;
        ok = ok && (cc->act[i] = moe_malloc(mul_or_zero(rows, (size_t)act_width(w, i)) * sizeof(float)));
    }
    size_t kvw = (size_t)hp->n_head_kv * (size_t)hp->head_dim;
    size_t kv_elems = mul_or_zero(mul_or_zero((size_t)hp->n_layer, (size_t)c->n_ctx), kvw);
    cc->kv_f16 = c->kv_type == MOE_KV_F16;
    size_t kv_bytes = mul_or_zero(kv_elems, cc->kv_f16 ? 2 : 4);
    ok = ok && kv_bytes && (cc->k_cache = moe_calloc(1, kv_bytes)) && (cc->v_cache = moe_calloc(1, kv_bytes));
    cc->n_threads = shape->n_threads;
    size_t maxk = (size_t)hp->n_embd;
    if ((size_t)(hp->n_head * hp->head_dim) > maxk) maxk = (size_t)(hp->n_head * hp->head_dim);
    if ((size_t)hp->n_ff_exp > maxk) maxk = (size_t)hp->n_ff_exp;
    cc->row_buf_len = maxk;
    cc->att_buf_len = (size_t)c->n_ctx + (size_t)hp->head_dim;
    size_t max_rows = (size_t)(hp->n_ff_exp > hp->n_embd ? hp->n_ff_exp : hp->n_embd);
    size_t n_tasks = (size_t)hp->n_expert * ((max_rows + CPU_ROWS_PER_TASK - 1) / CPU_ROWS_PER_TASK);
    ok = ok && (cc->row_buf = moe_malloc(mul_or_zero((size_t)cc->n_threads, maxk) * sizeof(float)));
    ok = ok && (cc->att_buf = moe_malloc(mul_or_zero((size_t)cc->n_threads, cc->att_buf_len) * sizeof(float)));
    ok = ok && (cc->topk_id = moe_malloc(nb * k * sizeof(int32_t))) && (cc->topk_w = moe_malloc(nb * k * sizeof(float)));
    ok = ok && (cc->pair_of = moe_malloc(nb * k * sizeof(int32_t))) && (cc->pair_tok = moe_malloc(nb * k * sizeof(int32_t)));
    ok = ok && (cc->exp_start = moe_malloc(((size_t)hp->n_expert + 1) * sizeof(int32_t)));
    ok = ok && (cc->tasks = moe_malloc(n_tasks * 2 * sizeof(int32_t)));
    ok = ok && (cc->pair_h = moe_malloc(mul_or_zero(nb * k, (size_t)hp->n_ff_exp) * sizeof(float)));
    ok = ok && (cc->pair_u = moe_malloc(mul_or_zero(nb * k, (size_t)hp->n_ff_exp) * sizeof(float)));
    ok = ok && (cc->pair_out = moe_malloc(mul_or_zero(nb * k, (size_t)hp->n_embd) * sizeof(float)));
    if (!ok) {
        cpu_ctx_free(cc);
        return set_error(MOE_ERR_NO_MEMORY, "context: out of memory for the KV cache and scratch buffers (n_ctx %d, n_batch %d)",
                         c->n_ctx, c->n_batch);
    }
    moe_status st = pool_new(cc->n_threads, &cc->pool);
    if (st) {
        cpu_ctx_free(cc);
        return st;
    }
    *out = cc;
    return MOE_OK;
}

/* ============================================================================================ */
/* 8. contexts                                                                                   */
/* ============================================================================================ */
#define MOE_DEFAULT_N_BATCH 256

moe_status moe_ctx_new(moe_model *model, const moe_ctx_params *params, moe_ctx **out) {
    if (!out) return set_error(MOE_ERR_INVALID_ARG, "moe_ctx_new: out is NULL");
    *out = NULL;
    if (!model) return set_error(MOE_ERR_INVALID_ARG, "moe_ctx_new: model is NULL");
    moe_ctx_params p = {0};
    if (params) p = *params;
    const moe_hparams *hp = &model->w.hp;
    if (p.n_ctx < 0 || p.n_batch < 0 || p.logits_all < 0 || p.logits_all > 1)
        return set_error(MOE_ERR_INVALID_ARG, "moe_ctx_new: negative n_ctx / n_batch or logits_all not 0/1");
    if (p.kv_type != MOE_KV_F16 && p.kv_type != MOE_KV_F32)
        return set_error(p.kv_type == MOE_KV_Q8_0 ? MOE_ERR_UNSUPPORTED : MOE_ERR_INVALID_ARG,
                         "moe_ctx_new: kv_type %d is not supported (use MOE_KV_F16 or MOE_KV_F32)", p.kv_type);
    if (p.n_ctx == 0) p.n_ctx = hp->n_ctx_train < 4096 ? hp->n_ctx_train : 4096;
    if (p.n_batch == 0) p.n_batch = MOE_DEFAULT_N_BATCH;
    if (p.n_batch > p.n_ctx) p.n_batch = p.n_ctx;
    moe_ctx *c = moe_calloc(1, sizeof *c);
    if (!c) return set_error(MOE_ERR_NO_MEMORY, "moe_ctx_new: out of memory");
    c->model = model;
    c->n_ctx = p.n_ctx;
    c->n_batch = p.n_batch;
    c->kv_type = p.kv_type;
    c->logits_all = p.logits_all;
    c->ops = &k_cpu_ops;
    c->logits_cap = c->logits_all ? 0 : 1;
    c->logits = moe_calloc((size_t)hp->n_vocab, sizeof(float));
    if (!c->logits) {
        moe_free(c);
        return set_error(MOE_ERR_NO_MEMORY, "moe_ctx_new: out of memory");
    }
    c->logits_cap = 1;
    moe_ctx_shape shape = {c->n_ctx, c->n_batch, c->kv_type, c->logits_all, model->n_threads};
    moe_status st;
    if (model->vk) {
        c->ops = &moe_vk_ops;
        st = moe_vk_ctx_new(model->vk, &shape, &c->be);
        if (!st) moe_vk_ctx_memory(c->be, &c->stats.gpu_bytes_weights, &c->stats.gpu_bytes_kv, &c->stats.gpu_bytes_scratch);
    } else {
        st = cpu_ctx_new(&model->w, &shape, &c->be);
        c->cpu = c->be;
    }
    if (st) {
        moe_free(c->logits);
        moe_free(c);
        return st;
    }
    c->stats.t_load_s = model->t_load_s;
    *out = c;
    return MOE_OK;
}

void moe_ctx_free(moe_ctx *ctx) {
    if (!ctx) return;
    if (ctx->cpu) cpu_ctx_free(ctx->cpu);
    else if (ctx->be) moe_vk_ctx_free(ctx->be);
    moe_free(ctx->logits);
    moe_free(ctx);
}

moe_status moe_step(moe_ctx *ctx, const moe_token *tokens, int32_t n_tokens) {
    if (!ctx) return set_error(MOE_ERR_INVALID_ARG, "moe_step: ctx is NULL");
    if (!tokens || n_tokens <= 0) return set_error(MOE_ERR_INVALID_ARG, "moe_step: no tokens (tokens NULL or n_tokens %d)", n_tokens);
    const moe_model *m = ctx->model;
    for (int32_t i = 0; i < n_tokens; i++)
        if (tokens[i] < 0 || tokens[i] >= m->w.hp.n_vocab)
            return set_error(MOE_ERR_INVALID_ARG, "moe_step: token %d at index %d is outside the vocabulary [0, %d)",
                             tokens[i], i, m->w.hp.n_vocab);
    if (n_tokens > ctx->n_ctx - ctx->pos)
        return set_error(MOE_ERR_CONTEXT_FULL, "moe_step: %d tokens do not fit: context holds %d of %d", n_tokens,
                         ctx->pos, ctx->n_ctx);
    int32_t rows = ctx->logits_all ? n_tokens : 1;
    if (rows > ctx->logits_cap) { /* grow before anything changes, so a failure leaves ctx as it was */
        float *nl = moe_malloc(mul_or_zero((size_t)rows, (size_t)m->w.hp.n_vocab) * sizeof(float));
        if (!nl) return set_error(MOE_ERR_NO_MEMORY, "moe_step: out of memory for %d rows of logits", rows);
        moe_free(ctx->logits);
        ctx->logits = nl;
        ctx->logits_cap = rows;
    }
    double t0 = now_s();
    int32_t done = 0;
    while (done < n_tokens) {
        int32_t n = n_tokens - done < ctx->n_batch ? n_tokens - done : ctx->n_batch;
        int32_t n_out = ctx->logits_all ? n : (done + n == n_tokens ? 1 : 0);
        ctx->ops->begin_step(ctx->be);
        forward_qwen3moe(ctx->be, ctx->ops, &m->w, tokens + done, n, ctx->pos + done, n_out);
        moe_status st = ctx->ops->end_step(ctx->be);
        if (st) return st; /* pos unchanged: the KV rows written past it are never read */
        if (n_out) ctx->ops->read_logits(ctx->be, ctx->logits + (size_t)(ctx->logits_all ? done : 0) * (size_t)m->w.hp.n_vocab, n_out);
        done += n;
    }
    ctx->pos += n_tokens;
    ctx->n_logits = rows;
    double dt = now_s() - t0;
    if (n_tokens == 1) {
        ctx->stats.n_gen_tokens++;
        ctx->stats.t_gen_s += dt;
    } else {
        ctx->stats.n_prompt_tokens += (uint64_t)n_tokens;
        ctx->stats.t_prompt_s += dt;
    }
    return MOE_OK;
}

const float *moe_logits(const moe_ctx *ctx, int32_t i) {
    if (!ctx || ctx->n_logits == 0) return NULL;
    if (i == -1) return ctx->logits + (size_t)(ctx->n_logits - 1) * (size_t)ctx->model->w.hp.n_vocab;
    if (i < 0 || !ctx->logits_all || i >= ctx->n_logits) return NULL;
    return ctx->logits + (size_t)i * (size_t)ctx->model->w.hp.n_vocab;
}

int32_t moe_ctx_pos(const moe_ctx *ctx) { return ctx ? ctx->pos : 0; }

moe_status moe_ctx_rewind(moe_ctx *ctx, int32_t pos) {
    if (!ctx) return set_error(MOE_ERR_INVALID_ARG, "moe_ctx_rewind: ctx is NULL");
    if (pos < 0 || pos > ctx->pos)
        return set_error(MOE_ERR_INVALID_ARG, "moe_ctx_rewind: position %d is outside [0, %d]", pos, ctx->pos);
    if (pos < ctx->pos) ctx->n_logits = 0; /* the logits belonged to a token that is gone */
    ctx->pos = pos;
    return MOE_OK;
}

moe_status moe_ctx_get_stats(const moe_ctx *ctx, moe_stats *out) {
    if (!ctx || !out) return set_error(MOE_ERR_INVALID_ARG, "moe_ctx_get_stats: NULL argument");
    *out = ctx->stats;
    return MOE_OK;
}

/* ---- save / load: a versioned header, the logits of the last step, then the KV rows in use ---- */
#define MOE_STATE_MAGIC 0x5453454du /* "MEST" */
typedef struct state_header {
    uint32_t magic, version;
    int32_t n_layer, n_head_kv, head_dim, n_vocab, n_ctx, kv_type, pos, n_logits;
    uint64_t model_fingerprint, payload_bytes, checksum;
} state_header;

static uint64_t fnv1a(uint64_t h, const void *data, size_t n) {
    const uint8_t *p = data;
    for (size_t i = 0; i < n; i++) h = (h ^ p[i]) * 0x100000001b3ull;
    return h;
}

static uint64_t model_fingerprint(const moe_model *m) {
    uint64_t h = fnv1a(0xcbf29ce484222325ull, &m->w.hp, sizeof m->w.hp);
    return fnv1a(h, &m->file.size, sizeof m->file.size);
}

static size_t state_kv_row_bytes(const moe_ctx *c) {
    const moe_hparams *hp = &c->model->w.hp;
    return (size_t)hp->n_head_kv * (size_t)hp->head_dim * (c->kv_type == MOE_KV_F16 ? 2 : 4);
}

static size_t state_size(const moe_ctx *c) {
    return sizeof(state_header) + (size_t)c->n_logits * (size_t)c->model->w.hp.n_vocab * sizeof(float) +
           2 * (size_t)c->model->w.hp.n_layer * (size_t)c->pos * state_kv_row_bytes(c);
}

moe_status moe_ctx_save(const moe_ctx *ctx, void *buf, size_t cap, size_t *size_out) {
    if (!ctx) return set_error(MOE_ERR_INVALID_ARG, "moe_ctx_save: ctx is NULL");
    size_t need = state_size(ctx);
    if (size_out) *size_out = need;
    if (!buf) return MOE_OK;
    if (cap < need) return set_error(MOE_ERR_BUFFER_TOO_SMALL, "moe_ctx_save: needs %zu bytes, buffer has %zu", need, cap);
    const moe_hparams *hp = &ctx->model->w.hp;
    uint8_t *p = (uint8_t *)buf + sizeof(state_header);
    size_t lb = (size_t)ctx->n_logits * (size_t)hp->n_vocab * sizeof(float);
    memcpy(p, ctx->logits, lb);
    p += lb;
    moe_status st = ctx->ops->kv_save(ctx->be, p, ctx->pos);
    if (st) return st;
    state_header h = {MOE_STATE_MAGIC, 1, hp->n_layer, hp->n_head_kv, hp->head_dim, hp->n_vocab, ctx->n_ctx,
                      ctx->kv_type, ctx->pos, ctx->n_logits, model_fingerprint(ctx->model), need - sizeof h, 0};
    h.checksum = fnv1a(0xcbf29ce484222325ull, (const uint8_t *)buf + sizeof h, need - sizeof h);
    memcpy(buf, &h, sizeof h);
    return MOE_OK;
}

moe_status moe_ctx_load(moe_ctx *ctx, const void *buf, size_t size) {
    if (!ctx || !buf) return set_error(MOE_ERR_INVALID_ARG, "moe_ctx_load: NULL argument");
    const moe_hparams *hp = &ctx->model->w.hp;
    state_header h;
    if (size < sizeof h) return set_error(MOE_ERR_FORMAT, "moe_ctx_load: %zu bytes is too small for a context state", size);
    memcpy(&h, buf, sizeof h);
    if (h.magic != MOE_STATE_MAGIC || h.version != 1) return set_error(MOE_ERR_FORMAT, "moe_ctx_load: not a moe context state (bad magic or version)");
    if (h.model_fingerprint != model_fingerprint(ctx->model) || h.n_layer != hp->n_layer || h.n_head_kv != hp->n_head_kv ||
        h.head_dim != hp->head_dim || h.n_vocab != hp->n_vocab)
        return set_error(MOE_ERR_INVALID_ARG, "moe_ctx_load: the state was saved from a different model");
    if (h.n_ctx != ctx->n_ctx || h.kv_type != ctx->kv_type)
        return set_error(MOE_ERR_INVALID_ARG, "moe_ctx_load: the state was saved from a context with n_ctx %d / kv_type %d, this one has %d / %d",
                         h.n_ctx, h.kv_type, ctx->n_ctx, ctx->kv_type);
    if (h.pos < 0 || h.pos > ctx->n_ctx || h.n_logits < 0 || h.n_logits > h.pos || (h.n_logits > 1 && !ctx->logits_all))
        return set_error(MOE_ERR_FORMAT, "moe_ctx_load: corrupted state header");
    moe_ctx probe = *ctx;
    probe.pos = h.pos;
    probe.n_logits = h.n_logits;
    size_t need = state_size(&probe);
    if (size != need || h.payload_bytes != need - sizeof h)
        return set_error(MOE_ERR_FORMAT, "moe_ctx_load: state is %zu bytes, expected %zu", size, need);
    if (fnv1a(0xcbf29ce484222325ull, (const uint8_t *)buf + sizeof h, need - sizeof h) != h.checksum)
        return set_error(MOE_ERR_FORMAT, "moe_ctx_load: checksum mismatch (corrupted state)");
    const uint8_t *p = (const uint8_t *)buf + sizeof h;
    size_t lb = (size_t)h.n_logits * (size_t)hp->n_vocab * sizeof(float);
    float *nl = NULL; /* allocate first: after kv_load nothing may fail */
    if (h.n_logits > ctx->logits_cap) {
        nl = moe_malloc((size_t)h.n_logits * (size_t)hp->n_vocab * sizeof(float));
        if (!nl) return set_error(MOE_ERR_NO_MEMORY, "moe_ctx_load: out of memory");
    }
    moe_status st = ctx->ops->kv_load(ctx->be, p + lb, h.pos);
    if (st) {
        moe_free(nl);
        return st;
    }
    if (nl) {
        moe_free(ctx->logits);
        ctx->logits = nl;
        ctx->logits_cap = h.n_logits;
    }
    memcpy(ctx->logits, p, lb);
    ctx->pos = h.pos;
    ctx->n_logits = h.n_logits;
    return MOE_OK;
}

/* ============================================================================================ */
/* 9. sampling                                                                                   */
/* ============================================================================================ */
/* SAMPLER: moe_sampler_* live here. */
struct moe_sampler { moe_sampler_params p; };

moe_status moe_sampler_new(const moe_sampler_params *params, moe_sampler **out) {
    if (!out) return set_error(MOE_ERR_INVALID_ARG, "moe_sampler_new: out is NULL");
    moe_sampler *s = moe_calloc(1, sizeof *s);
    if (!s) return set_error(MOE_ERR_NO_MEMORY, "moe_sampler_new: out of memory");
    if (params) s->p = *params;
    *out = s;
    return MOE_OK;
}
void moe_sampler_free(moe_sampler *s) { moe_free(s); }
moe_token moe_sample(moe_sampler *s, const float *logits, int32_t n_vocab) {
    (void)s;
    if (!logits || n_vocab <= 0) return -1;
    moe_token best = 0;
    for (int32_t i = 1; i < n_vocab; i++)
        if (logits[i] > logits[best]) best = i;
    return best;
}
void moe_sampler_accept(moe_sampler *s, moe_token token) { (void)s; (void)token; }
void moe_sampler_reset(moe_sampler *s) { (void)s; }

/* ============================================================================================ */
/* 10. public API glue                                                                           */
/* ============================================================================================ */
void moe_model_free(moe_model *model) {
    if (!model) return;
    if (model->vk) moe_vk_free(model->vk);
    vocab_free(model->vocab);
    moe_free(model->w.layers);
    moe_free(model->expert_tables);
    moe_free(model->owned);
    gguf_free(&model->gguf);
    file_unmap(&model->file);
    moe_free(model);
}

static int report_progress(const moe_load_params *p, float f) {
    return p->progress ? p->progress(f, p->user) : 0;
}

moe_status moe_load(const char *path, const moe_load_params *params, moe_model **out) {
    if (!out) return set_error(MOE_ERR_INVALID_ARG, "moe_load: out is NULL");
    *out = NULL;
    if (!path) return set_error(MOE_ERR_INVALID_ARG, "moe_load: path is NULL");
    moe_load_params p = {0};
    if (params) p = *params;
    if (p.backend < MOE_BACKEND_AUTO || p.backend > MOE_BACKEND_VULKAN || p.n_threads < 0 || p.device_index < 0)
        return set_error(MOE_ERR_INVALID_ARG, "moe_load: bad backend %d, n_threads %d or device_index %d", p.backend,
                         p.n_threads, p.device_index);
    double t0 = now_s();
    moe_model *m = moe_calloc(1, sizeof *m);
    if (!m) return set_error(MOE_ERR_NO_MEMORY, "moe_load: out of memory");
    m->file.fd = -1;
    m->log.fn = p.log;
    m->log.user = p.user;
    m->n_threads = p.n_threads ? p.n_threads : cpu_count();
    m->bos = m->eos = -1;
    moe_status st;
    struct stat sb;
    if (stat(path, &sb) == 0 && S_ISDIR(sb.st_mode)) {
        st = set_error(MOE_ERR_UNSUPPORTED, "moe_load: '%s' is a directory; Hugging Face directories are not supported yet", path);
        goto fail;
    }
    /* keep the file resident unless a host budget below its size asks for on-demand reads */
    if ((st = file_map(&m->file, path, p.host_budget_bytes == 0))) goto fail;
    if (report_progress(&p, 0.0f)) goto cancelled;
    if ((st = gguf_parse(&m->gguf, m->file.data, m->file.size))) goto fail;
    if ((st = load_hparams(m))) goto fail;
    if ((st = bind_qwen3moe(m))) goto fail;
    if (report_progress(&p, 0.5f)) goto cancelled;
    if ((st = vocab_load_gguf(&m->gguf, &m->vocab))) goto fail;
    {
        int64_t v = -1;
        if ((st = gguf_get_int(&m->gguf, "tokenizer.ggml.bos_token_id", 0, 0, m->w.hp.n_vocab - 1, &v))) goto fail;
        m->bos = (moe_token)v;
        v = -1;
        if ((st = gguf_get_int(&m->gguf, "tokenizer.ggml.eos_token_id", 0, 0, m->w.hp.n_vocab - 1, &v))) goto fail;
        m->eos = (moe_token)v;
    }
    for (int64_t i = 0; i < m->gguf.n_tensors; i++) {
        uint64_t n = 1;
        for (int d = 0; d < MOE_MAX_DIMS; d++) n *= (uint64_t)m->gguf.tensors[i].ne[d];
        m->n_params += n;
    }
    m->backend = MOE_BACKEND_CPU;
    if (p.backend != MOE_BACKEND_CPU) {
        st = moe_vk_init(&m->w, p.device_index, m->log.fn, m->log.user, &m->vk);
        if (st) {
            if (p.backend == MOE_BACKEND_VULKAN) goto fail;
            log_msg(&m->log, MOE_LOG_INFO, "Vulkan not used (%s); running on the CPU", moe_last_error());
            m->vk = NULL;
        } else m->backend = MOE_BACKEND_VULKAN;
    }
    log_msg(&m->log, MOE_LOG_INFO, "loaded %s: %d layers, %d experts (top-%d), vocab %d, %.1f M params", m->arch_name,
            m->w.hp.n_layer, m->w.hp.n_expert, m->w.hp.n_expert_used, m->w.hp.n_vocab, (double)m->n_params / 1e6);
    if (report_progress(&p, 1.0f)) goto cancelled;
    m->t_load_s = now_s() - t0;
    *out = m;
    return MOE_OK;
cancelled:
    st = set_error(MOE_ERR_CANCELLED, "moe_load: cancelled by the progress callback");
fail:
    moe_model_free(m);
    return st;
}

moe_status moe_model_get_info(const moe_model *model, moe_model_info *out) {
    if (!model || !out) return set_error(MOE_ERR_INVALID_ARG, "moe_model_get_info: NULL argument");
    memset(out, 0, sizeof *out);
    snprintf(out->arch, sizeof out->arch, "%s", model->arch_name);
    out->n_vocab = model->w.hp.n_vocab;
    out->n_layer = model->w.hp.n_layer;
    out->n_embd = model->w.hp.n_embd;
    out->n_ctx_train = model->w.hp.n_ctx_train;
    out->n_expert = model->w.hp.n_expert;
    out->n_expert_used = model->w.hp.n_expert_used;
    out->bos = model->bos;
    out->eos = model->eos;
    out->n_params = model->n_params;
    out->file_bytes = model->file.size;
    out->backend = model->backend;
    return MOE_OK;
}

/* tokenizer API: filled in by the tokenizer section's issue */
int32_t moe_tokenize(const moe_model *model, const char *text, int32_t text_len, moe_token *out, int32_t cap, int32_t flags) {
    (void)model; (void)text; (void)text_len; (void)out; (void)cap; (void)flags;
    return set_error(MOE_ERR_UNSUPPORTED, "moe_tokenize: the tokenizer is not implemented yet");
}
int32_t moe_token_to_piece(const moe_model *model, moe_token token, char *buf, int32_t cap) {
    (void)model; (void)token; (void)buf; (void)cap;
    return set_error(MOE_ERR_UNSUPPORTED, "moe_token_to_piece: the tokenizer is not implemented yet");
}
int32_t moe_detokenize(const moe_model *model, const moe_token *tokens, int32_t n_tokens, char *buf, int32_t cap, int32_t flags) {
    (void)model; (void)tokens; (void)n_tokens; (void)buf; (void)cap; (void)flags;
    return set_error(MOE_ERR_UNSUPPORTED, "moe_detokenize: the tokenizer is not implemented yet");
}
int32_t moe_token_is_eog(const moe_model *model, moe_token token) {
    return model && token >= 0 && token == model->eos;
}
int32_t moe_chat_apply(const moe_model *model, const char *const *roles, const char *const *contents, int32_t n_messages,
                       int32_t add_assistant_prompt, char *buf, int32_t cap) {
    (void)model; (void)roles; (void)contents; (void)n_messages; (void)add_assistant_prompt; (void)buf; (void)cap;
    return set_error(MOE_ERR_UNSUPPORTED, "moe_chat_apply: chat templates are not implemented yet");
}
