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
     8. streaming       expert placement and streaming policy: the host expert cache
     9. contexts        KV cache, step, rewind, save/load
    10. sampling
    11. public API glue
*/
#define _GNU_SOURCE
#if defined(_WIN32) && !defined(_FILE_OFFSET_BITS)
#define _FILE_OFFSET_BITS 64 /* a 64-bit off_t for the positioned reads (mingw-w64) */
#endif
#define MOE_INTERNAL
#include "moe.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#ifdef _WIN32
#define WIN32_LEAN_AND_MEAN
#include <windows.h>
#include <io.h>
#include <process.h>
#else
#include <pthread.h>
#include <sys/mman.h>
#include <unistd.h>
#endif

#if defined(__GNUC__)
#define MOE_MAYBE_UNUSED __attribute__((unused))
#else
#define MOE_MAYBE_UNUSED
#endif

/* ============================================================================================ */
/* 1. platform                                                                                   */
/* ============================================================================================ */
#ifdef _WIN32
/* ---- Win32 equivalents of the POSIX calls used below ---------------------------------------
   Threads: the pthread subset moe uses (mutex, condition variable, once, create / join) on SRW
   locks, condition variables, INIT_ONCE and _beginthreadex. Files: CRT descriptors opened in
   binary mode, positioned reads with ReadFile at an OVERLAPPED offset, and mappings through
   CreateFileMapping / MapViewOfFile (file_map below). Directory listing: the C runtime's
   <dirent.h> (mingw-w64). Compiled by make test-mingw (x86_64-w64-mingw32-gcc); not run here. */
_Static_assert(sizeof(off_t) == 8, "moe needs a 64-bit off_t on Windows (_FILE_OFFSET_BITS 64)");
typedef SRWLOCK win_mutex;
typedef CONDITION_VARIABLE win_cond;
typedef INIT_ONCE win_once_t;
typedef HANDLE win_thread;
static int win_mutex_init(win_mutex *m, const void *attr) { (void)attr; InitializeSRWLock(m); return 0; }
static int win_mutex_destroy(win_mutex *m) { (void)m; return 0; }
static int win_mutex_lock(win_mutex *m) { AcquireSRWLockExclusive(m); return 0; }
static int win_mutex_unlock(win_mutex *m) { ReleaseSRWLockExclusive(m); return 0; }
static int win_cond_init(win_cond *c, const void *attr) { (void)attr; InitializeConditionVariable(c); return 0; }
static int win_cond_destroy(win_cond *c) { (void)c; return 0; }
static int win_cond_wait(win_cond *c, win_mutex *m) { return SleepConditionVariableSRW(c, m, INFINITE, 0) ? 0 : EINVAL; }
static int win_cond_signal(win_cond *c) { WakeConditionVariable(c); return 0; }
static int win_cond_broadcast(win_cond *c) { WakeAllConditionVariable(c); return 0; }
typedef struct win_once_fn { void (*fn)(void); } win_once_fn;
static BOOL CALLBACK win_once_call(PINIT_ONCE once, PVOID param, PVOID *ctx) {
    (void)once;
    (void)ctx;
    ((win_once_fn *)param)->fn();
    return TRUE;
}
static int win_once(win_once_t *once, void (*fn)(void)) {
    win_once_fn f = {fn};
    return InitOnceExecuteOnce(once, win_once_call, &f, NULL) ? 0 : EINVAL;
}
typedef struct win_thread_start { void *(*fn)(void *); void *arg; } win_thread_start;
static unsigned __stdcall win_thread_main(void *p) {
    win_thread_start s = *(win_thread_start *)p;
    free(p);
    s.fn(s.arg);
    return 0;
}
static int win_thread_create(win_thread *t, const void *attr, void *(*fn)(void *), void *arg) {
    (void)attr;
    win_thread_start *s = malloc(sizeof *s);
    if (!s) return ENOMEM;
    s->fn = fn;
    s->arg = arg;
    uintptr_t h = _beginthreadex(NULL, 0, win_thread_main, s, 0, NULL);
    if (!h) { free(s); return EAGAIN; }
    *t = (HANDLE)h;
    return 0;
}
static int win_thread_join(win_thread t, void **ret) {
    if (ret) *ret = NULL;
    WaitForSingleObject(t, INFINITE);
    CloseHandle(t);
    return 0;
}
#define pthread_mutex_t win_mutex
#define pthread_mutex_init win_mutex_init
#define pthread_mutex_destroy win_mutex_destroy
#define pthread_mutex_lock win_mutex_lock
#define pthread_mutex_unlock win_mutex_unlock
#define pthread_cond_t win_cond
#define pthread_cond_init win_cond_init
#define pthread_cond_destroy win_cond_destroy
#define pthread_cond_wait win_cond_wait
#define pthread_cond_signal win_cond_signal
#define pthread_cond_broadcast win_cond_broadcast
/* waits on c at most ns nanoseconds (rounded up to milliseconds); spurious wake-ups are the caller's */
static void cond_wait_ns(win_cond *c, win_mutex *m, uint64_t ns) {
    uint64_t ms = ns / 1000000u + 1;
    SleepConditionVariableSRW(c, m, ms > 0x7fffffffu ? 0x7fffffffu : (DWORD)ms, 0);
}
#define pthread_once_t win_once_t
#define PTHREAD_ONCE_INIT INIT_ONCE_STATIC_INIT
#define pthread_once win_once
#define pthread_t win_thread
#define pthread_create win_thread_create
#define pthread_join win_thread_join

#else
/* waits on c at most ns nanoseconds; spurious wake-ups are the caller's */
static void cond_wait_ns(pthread_cond_t *c, pthread_mutex_t *m, uint64_t ns) {
    struct timespec ts; /* condition variables time out against CLOCK_REALTIME by default */
    clock_gettime(CLOCK_REALTIME, &ts);
    uint64_t add = ns < 86400ull * 1000000000ull ? ns : 86400ull * 1000000000ull, nsec = (uint64_t)ts.tv_nsec + add % 1000000000u;
    ts.tv_sec += (time_t)(add / 1000000000u + nsec / 1000000000u);
    ts.tv_nsec = (long)(nsec % 1000000000u);
    pthread_cond_timedwait(c, m, &ts);
}
#endif
#ifdef _WIN32
/* every open() below passes O_CLOEXEC: on Windows that is "not inherited" and binary mode */
#ifndef O_CLOEXEC
#define O_CLOEXEC (_O_NOINHERIT | _O_BINARY)
#endif
#ifndef R_OK
#define R_OK 4
#endif
/* pread: ReadFile at an OVERLAPPED offset (the descriptor's file position is not relied on) */
static ssize_t win_pread(int fd, void *buf, size_t n, uint64_t off) {
    HANDLE h = (HANDLE)_get_osfhandle(fd);
    if (h == INVALID_HANDLE_VALUE) { errno = EBADF; return -1; }
    OVERLAPPED ov;
    memset(&ov, 0, sizeof ov);
    ov.Offset = (DWORD)off;
    ov.OffsetHigh = (DWORD)(off >> 32);
    DWORD got = 0, want = n > ((size_t)1 << 30) ? (DWORD)1 << 30 : (DWORD)n;
    if (!ReadFile(h, buf, want, &got, &ov)) {
        if (GetLastError() == ERROR_HANDLE_EOF) return 0;
        errno = EIO;
        return -1;
    }
    return (ssize_t)got;
}
#define pread(fd, buf, n, off) win_pread(fd, buf, n, (uint64_t)(off))
#endif

/* memory of the host expert cache's slots: aligned for O_DIRECT reads */
static void *aligned_bytes(size_t align, size_t n) {
#ifdef _WIN32
    return _aligned_malloc(n, align);
#else
    void *p = NULL;
    return posix_memalign(&p, align, n) == 0 ? p : NULL;
#endif
}
static void aligned_bytes_free(void *p) {
#ifdef _WIN32
    _aligned_free(p);
#else
    free(p);
#endif
}

static long os_page_size(void) {
#ifdef _WIN32
    SYSTEM_INFO si;
    GetSystemInfo(&si);
    return (long)si.dwPageSize;
#else
    return sysconf(_SC_PAGESIZE);
#endif
}


/* Test hooks (moe_test_*, not in moe.h) exist only in test builds: the Makefile compiles the tests
   with -DMOE_TEST_HOOKS; the library and vendored builds have none. */
#ifdef MOE_TEST_HOOKS
static _Atomic long g_alloc_countdown = -1; /* -1 = never fail */
#endif

/* Allocation goes through these two so that tests can inject failures (moe_test_fail_alloc_after). */
static void *moe_malloc(size_t n) {
#ifdef MOE_TEST_HOOKS
    long c = atomic_load(&g_alloc_countdown);
    if (c >= 0) {
        if (atomic_fetch_sub(&g_alloc_countdown, 1) <= 0) return NULL;
    }
#endif
    return malloc(n ? n : 1);
}
static void *moe_calloc(size_t count, size_t size) {
    if (size && count > SIZE_MAX / size) return NULL;
    void *p = moe_malloc(count * size);
    if (p) memset(p, 0, count * size);
    return p;
}
static void moe_free(void *p) { free(p); }

#ifdef MOE_TEST_HOOKS
/* Test hook: the n-th allocation from now fails; -1 switches failures off. */
MOE_HIDDEN void moe_test_fail_alloc_after(long n);
void moe_test_fail_alloc_after(long n) { atomic_store(&g_alloc_countdown, n); }
#endif

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

int32_t moe_abi_version(void) { return MOE_ABI_VERSION; }

size_t moe_struct_size(int32_t which) {
    switch (which) {
    case MOE_STRUCT_LOAD_PARAMS: return sizeof(moe_load_params);
    case MOE_STRUCT_MODEL_INFO: return sizeof(moe_model_info);
    case MOE_STRUCT_CTX_PARAMS: return sizeof(moe_ctx_params);
    case MOE_STRUCT_SAMPLER_PARAMS: return sizeof(moe_sampler_params);
    case MOE_STRUCT_SAVE_PARAMS: return sizeof(moe_save_params);
    case MOE_STRUCT_STATS: return sizeof(moe_stats);
    case MOE_STRUCT_PROFILE_ENTRY: return sizeof(moe_profile_entry);
    case MOE_STRUCT_VK_HANDLES: return sizeof(moe_vk_handles);
    default: return set_error(MOE_ERR_INVALID_ARG, "moe_struct_size: unknown struct id %d", which), 0;
    }
}

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
    case MOE_ERR_TIMEOUT: return "timeout (still running)";
    case MOE_ERR_BUSY: return "busy (a step is in flight)";
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
#ifdef _WIN32
    LARGE_INTEGER t, f;
    QueryPerformanceCounter(&t);
    QueryPerformanceFrequency(&f);
    return (double)t.QuadPart / (double)f.QuadPart;
#else
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
#endif
}

/* ---- read-only file mapping ---------------------------------------------------------------- */
typedef struct moe_file {
    const uint8_t *data;
    size_t size;
    int fd;
    void *heap;                /* small files: read into this allocation instead of mapped */
    size_t map_len;            /* resident mappings: bytes reserved at data (2 MiB multiple), else 0 */
} moe_file;
#define MOE_HUGE_PAGE ((size_t)2 << 20)

/* Files up to this size are read into memory: cheaper than a mapping to set up and tear down
   (an munmap can cost more than parsing a small file), and nothing to share with the page cache. */
#define MOE_READ_SMALL_FILES (4u << 20)

/* populate: fault every page in now (one sequential read) instead of page by page during the
   first steps; used when the weights are meant to stay resident (small files are then read into
   memory). Without it the file stays a mapping with its descriptor (read on demand). */
static moe_status file_map(moe_file *f, const char *path, int populate) {
    memset(f, 0, sizeof *f);
    f->fd = -1;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return set_error(MOE_ERR_IO, "cannot open '%s': %s", path, strerror(errno));
#ifdef _WIN32
    /* the size from the handle (a CRT struct stat may hold only 32 bits of it) */
    struct { int64_t st_size; } st;
    LARGE_INTEGER size;
    HANDLE fh = (HANDLE)_get_osfhandle(fd);
    if (GetFileType(fh) != FILE_TYPE_DISK) {
        close(fd);
        return set_error(MOE_ERR_IO, "'%s' is not a regular file", path);
    }
    if (!GetFileSizeEx(fh, &size)) {
        close(fd);
        return set_error(MOE_ERR_IO, "cannot stat '%s': Windows error %lu", path, (unsigned long)GetLastError());
    }
    st.st_size = size.QuadPart;
#else
    struct stat st;
    if (fstat(fd, &st) != 0) {
        close(fd);
        return set_error(MOE_ERR_IO, "cannot stat '%s': %s", path, strerror(errno));
    }
    if (!S_ISREG(st.st_mode)) {
        close(fd);
        return set_error(MOE_ERR_IO, "'%s' is not a regular file", path);
    }
#endif
    if (st.st_size == 0) {
        close(fd);
        return set_error(MOE_ERR_FORMAT, "'%s' is empty", path);
    }
    if (populate && (uint64_t)st.st_size <= MOE_READ_SMALL_FILES) { /* not for on-demand reads (expert streaming) */
        uint8_t *h = moe_malloc((size_t)st.st_size + 63);
        if (!h) {
            close(fd);
            return set_error(MOE_ERR_NO_MEMORY, "out of memory reading '%s'", path);
        }
        uint8_t *d = h + ((64 - ((uintptr_t)h & 63)) & 63); /* tensor data keeps the file's alignment */
        size_t got = 0;
        while (got < (size_t)st.st_size) {
            ssize_t r = pread(fd, d + got, (size_t)st.st_size - got, (off_t)got);
            if (r < 0 && errno == EINTR) continue;
            if (r <= 0) {
                int e = r < 0 ? errno : EIO;
                moe_free(h);
                close(fd);
                return set_error(MOE_ERR_IO, "cannot read '%s': %s", path, strerror(e));
            }
            got += (size_t)r;
        }
        close(fd);
        f->heap = h;
        f->data = d;
        f->size = (size_t)st.st_size;
        return MOE_OK;
    }
#ifdef _WIN32
    (void)populate;
    HANDLE mh = CreateFileMappingA(fh, NULL, PAGE_READONLY, 0, 0, NULL);
    void *p = mh ? MapViewOfFile(mh, FILE_MAP_READ, 0, 0, 0) : NULL;
    DWORD map_err = GetLastError();
    if (mh) CloseHandle(mh); /* the view keeps the mapping */
    if (!p) {
        close(fd);
        return set_error(MOE_ERR_IO, "cannot map '%s': Windows error %lu", path, (unsigned long)map_err);
    }
#else
    int flags = MAP_PRIVATE;
#ifdef MAP_POPULATE
    if (populate) flags |= MAP_POPULATE;
#else
    (void)populate;
#endif
    void *p = MAP_FAILED;
    size_t len = ((size_t)st.st_size + MOE_HUGE_PAGE - 1) & ~(MOE_HUGE_PAGE - 1);
    if (populate) { /* resident: at a 2 MiB boundary, the range up to the next one reserved (file_huge_pages) */
        uint8_t *res = mmap(NULL, len + MOE_HUGE_PAGE, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (res != MAP_FAILED) {
            uint8_t *al = (uint8_t *)(((uintptr_t)res + MOE_HUGE_PAGE - 1) & ~(uintptr_t)(MOE_HUGE_PAGE - 1));
            if (al > res) munmap(res, (size_t)(al - res));
            if (res + MOE_HUGE_PAGE > al) munmap(al + len, (size_t)(res + MOE_HUGE_PAGE - al));
            p = mmap(al, (size_t)st.st_size, PROT_READ, flags | MAP_FIXED, fd, 0);
            if (p == MAP_FAILED) munmap(al, len);
            else f->map_len = len;
        }
    }
    if (p == MAP_FAILED) p = mmap(NULL, (size_t)st.st_size, PROT_READ, flags, fd, 0);
    if (p == MAP_FAILED) {
        close(fd);
        return set_error(MOE_ERR_IO, "cannot map '%s': %s", path, strerror(errno));
    }
#endif
    f->data = p;
    f->size = (size_t)st.st_size;
    f->fd = fd;
    return MOE_OK;
}

/* CPU backend, resident weights: the mapping's pages become anonymous memory in 2 MiB pages at the
   same addresses (every pointer into the file stays valid). Matrix-vector products stream the
   weights: with 4 KiB pages every page costs a TLB walk and the hardware prefetchers stop at each
   page boundary. Best effort: on any failure the file mapping stays. Opt-in, MOE_HUGEPAGES=1: the
   copy needs the file's size in fresh memory, which the kernel zeroes first; on the 2-core
   development VM that made a 2.4 GiB load take 13 s instead of 2.8 s (and the peak RSS double)
   for tg32 +5..10% (noisy), so it is not the default. */
static void file_huge_pages(moe_file *f) {
#if defined(MADV_HUGEPAGE) && defined(MREMAP_FIXED)
    const char *e = getenv("MOE_HUGEPAGES");
    if (!f->map_len || !e || strcmp(e, "1")) return;
    size_t len = f->map_len;
    uint8_t *res = mmap(NULL, len + MOE_HUGE_PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (res == MAP_FAILED) return;
    uint8_t *al = (uint8_t *)(((uintptr_t)res + MOE_HUGE_PAGE - 1) & ~(uintptr_t)(MOE_HUGE_PAGE - 1));
    if (al > res) munmap(res, (size_t)(al - res));
    if (res + MOE_HUGE_PAGE > al) munmap(al + len, (size_t)(res + MOE_HUGE_PAGE - al));
    if (madvise(al, len, MADV_HUGEPAGE) != 0) {
        munmap(al, len);
        return;
    }
    memcpy(al, f->data, f->size);
    void *r = MAP_FAILED;
    if (mprotect(al, len, PROT_READ) == 0) r = mremap(al, len, len, MREMAP_MAYMOVE | MREMAP_FIXED, (void *)(uintptr_t)f->data);
    if (r == MAP_FAILED) munmap(al, len);
#else
    (void)f;
#endif
}

static void file_unmap(moe_file *f) {
    if (f->heap) moe_free(f->heap);
#ifdef _WIN32
    else if (f->data) UnmapViewOfFile(f->data);
#else
    else if (f->data) munmap((void *)f->data, f->map_len ? f->map_len : f->size);
#endif
    f->heap = NULL;
    if (f->fd >= 0) close(f->fd);
    f->data = NULL;
    f->fd = -1;
}

/* ---- thread pool ----------------------------------------------------------------------------
   A fixed set of workers that run parallel-fors. The calling thread takes part, so a pool of n
   threads has n-1 workers. Tasks are handed out by an atomic counter.
   One pool per model, shared by all its CPU contexts (16 NPC contexts on 16 cores must not start
   16 × 15 workers). Steps of several contexts at the same time each post their parallel-for as a
   job; every job runs on its calling thread plus the workers, which spread evenly over the jobs
   with tasks left (a worker takes the job with the fewest workers, then the one with the fewest
   tasks left, and looks again after each task once a new job has come). So a one-token decode
   beside a long prefill starts at once with its share of the threads instead of queueing behind
   the prefill's large operations (measured: with a turn per parallel-for, a decode step beside a
   256-token prefill took 3-4× as long as with this). The thread index a task gets is unique
   within its job: the per-thread scratch it indexes belongs to the job's context, so results do
   not depend on who else uses the pool. */
typedef void (*task_fn)(void *arg, int64_t task, int thread);

typedef struct pool_job {
    task_fn fn;
    void *arg;
    int64_t n_tasks;
    _Atomic int64_t next;      /* the next task to hand out */
    int helpers;               /* workers inside the job (under the pool's mu) */
    struct pool_job *link;     /* the pool's active jobs, oldest first */
} pool_job;

typedef struct thread_pool {
    int n_threads;
    pthread_t *workers;
    pthread_mutex_t mu;
    pthread_cond_t wake;       /* a job was posted, or quit */
    pthread_cond_t done;       /* a job's last worker left it */
    pool_job *jobs;            /* jobs being run (on their callers' stacks) */
    _Atomic uint64_t posted;   /* jobs posted so far: busy workers re-balance when it moves */
    int quit;
} thread_pool;

typedef struct worker_arg { thread_pool *pool; int index; } worker_arg;

/* under mu: the job with tasks left and the fewest workers; of equals, the one with the fewest
   tasks left (a decode step's small operation before a prefill's large one: shortest first keeps
   the waiting short), or NULL */
static pool_job *pool_pick(thread_pool *p) {
    pool_job *best = NULL;
    int64_t best_left = 0;
    for (pool_job *j = p->jobs; j; j = j->link) {
        int64_t left = j->n_tasks - atomic_load(&j->next);
        if (left > 0 && (!best || j->helpers < best->helpers || (j->helpers == best->helpers && left < best_left))) best = j, best_left = left;
    }
    return best;
}

static void *pool_worker(void *varg) {
    worker_arg *wa = varg;
    thread_pool *p = wa->pool;
    int index = wa->index;
    moe_free(wa);
    pthread_mutex_lock(&p->mu);
    for (;;) {
        pool_job *j = NULL;
        while (!p->quit && !(j = pool_pick(p))) pthread_cond_wait(&p->wake, &p->mu);
        if (p->quit) break;
        j->helpers++;
        uint64_t seen = atomic_load(&p->posted);
        pthread_mutex_unlock(&p->mu);
        for (;;) {
            int64_t t = atomic_fetch_add(&j->next, 1);
            if (t >= j->n_tasks) break;
            j->fn(j->arg, t, index);
            if (atomic_load(&p->posted) != seen) break; /* a new job: pick again (maybe this one) */
        }
        pthread_mutex_lock(&p->mu);
        if (--j->helpers == 0) pthread_cond_broadcast(&p->done);
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
    atomic_init(&p->posted, 0);
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

/* Runs fn(arg, t, thread) for t in [0, n_tasks) on the calling thread (thread 0) and the workers,
   and returns when all are done. Other threads may run their own jobs on the pool meanwhile.
   Tasks must not call pool_run. */
static void pool_run(thread_pool *p, task_fn fn, void *arg, int64_t n_tasks) {
    if (n_tasks <= 0) return;
    if (p->n_threads == 1 || n_tasks == 1) {
        for (int64_t t = 0; t < n_tasks; t++) fn(arg, t, 0);
        return;
    }
    pool_job j = {fn, arg, n_tasks, 0, 0, NULL};
    atomic_init(&j.next, 0);
    pthread_mutex_lock(&p->mu);
    pool_job **end = &p->jobs;
    while (*end) end = &(*end)->link;
    *end = &j;
    atomic_fetch_add(&p->posted, 1);
    pthread_cond_broadcast(&p->wake);
    pthread_mutex_unlock(&p->mu);
    for (int64_t t; (t = atomic_fetch_add(&j.next, 1)) < n_tasks;) fn(arg, t, 0);
    pthread_mutex_lock(&p->mu);
    while (j.helpers > 0) pthread_cond_wait(&p->done, &p->mu); /* no worker joins it now: no task is left */
    pool_job **at = &p->jobs;
    while (*at != &j) at = &(*at)->link;
    *at = j.link;
    pthread_mutex_unlock(&p->mu);
}

static int cpu_count(void) {
#ifdef _WIN32
    SYSTEM_INFO si;
    GetSystemInfo(&si);
    long n = (long)si.dwNumberOfProcessors;
#else
    long n = sysconf(_SC_NPROCESSORS_ONLN);
#endif
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
    const uint8_t **expert_ptrs; /* 3-D tensors assembled from a Hugging Face directory: one slab
                                    per expert, not contiguous (NULL for GGUF files) */
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

/* A tensor's bytes come from memory, or from a producer called at write time (so a converter
   holds one tensor at a time, not the whole model). */
typedef moe_status (*gguf_produce_fn)(void *arg, uint8_t *dst, uint64_t size);
typedef struct gguf_wtensor { const void *data; gguf_produce_fn produce; void *arg; uint64_t size; } gguf_wtensor;

typedef struct gguf_writer {
    gguf_buf kv, info;
    uint64_t n_kv, n_tensors, data_size;
    uint32_t alignment;
    gguf_wtensor *t;           /* [n_tensors] */
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

/* Adds a tensor: its bytes are `data` (valid until gw_write_file) or, when data is NULL, what
   produce(arg, ...) writes at write time. ne is innermost first. */
static moe_status gw_tensor_from(gguf_writer *w, const char *name, int32_t type, int n_dims, const int64_t *ne,
                                 const void *data, gguf_produce_fn produce, void *arg) {
    int64_t rows = 1;
    for (int d = 1; d < n_dims; d++) rows *= ne[d];
    uint64_t size = type_row_bytes(type, ne[0]) * (uint64_t)rows;
    if (!size) return set_error(MOE_ERR_INVALID_ARG, "gguf writer: tensor '%s' has a row length that does not fit its type", name);
    if (w->n_tensors == w->cap) {
        uint64_t cap = w->cap ? w->cap * 2 : 64;
        gguf_wtensor *t = moe_malloc(cap * sizeof *t);
        if (!t) return set_error(MOE_ERR_NO_MEMORY, "gguf writer: out of memory");
        if (w->n_tensors) memcpy(t, w->t, w->n_tensors * sizeof *t);
        moe_free(w->t);
        w->t = t;
        w->cap = cap;
    }
    uint32_t al = w->alignment ? w->alignment : 32;
    gb_str(&w->info, name);
    gb_u32(&w->info, (uint32_t)n_dims);
    for (int d = 0; d < n_dims; d++) gb_u64(&w->info, (uint64_t)ne[d]);
    gb_u32(&w->info, (uint32_t)type);
    gb_u64(&w->info, w->data_size);
    gguf_wtensor wt = {data, produce, arg, size};
    w->t[w->n_tensors++] = wt;
    w->data_size += (size + al - 1) / al * al;
    return MOE_OK;
}

MOE_MAYBE_UNUSED static moe_status gw_tensor(gguf_writer *w, const char *name, int32_t type, int n_dims, const int64_t *ne,
                                             const void *data) {
    return gw_tensor_from(w, name, type, n_dims, ne, data, NULL, NULL);
}

MOE_MAYBE_UNUSED static void gw_free(gguf_writer *w) {
    moe_free(w->kv.p);
    moe_free(w->info.p);
    moe_free(w->t);
    memset(w, 0, sizeof *w);
}

static int gw_pad(FILE *f, uint64_t pad) {
    static const uint8_t zeros[64] = {0};
    for (; pad; pad -= pad > 64 ? 64 : pad)
        if (fwrite(zeros, 1, pad > 64 ? 64 : pad, f) != (pad > 64 ? 64 : pad)) return 0;
    return 1;
}

MOE_MAYBE_UNUSED static moe_status gw_write_file(gguf_writer *w, const char *path) {
    if (w->kv.oom || w->info.oom) return set_error(MOE_ERR_NO_MEMORY, "gguf writer: out of memory");
    uint32_t al = w->alignment ? w->alignment : 32;
    FILE *f = fopen(path, "wb");
    if (!f) return set_error(MOE_ERR_IO, "gguf writer: cannot create '%s': %s", path, strerror(errno));
    uint32_t version = 3;
    moe_status st = MOE_OK;
    uint8_t *buf = NULL;
    int ok = fwrite("GGUF", 1, 4, f) == 4 && fwrite(&version, 4, 1, f) == 1 && fwrite(&w->n_tensors, 8, 1, f) == 1 &&
             fwrite(&w->n_kv, 8, 1, f) == 1 && (!w->kv.n || fwrite(w->kv.p, 1, w->kv.n, f) == w->kv.n) &&
             (!w->info.n || fwrite(w->info.p, 1, w->info.n, f) == w->info.n);
    uint64_t pos = 24 + w->kv.n + w->info.n;
    ok = ok && gw_pad(f, (al - pos % al) % al);
    for (uint64_t i = 0; ok && !st && i < w->n_tensors; i++) {
        const gguf_wtensor *t = &w->t[i];
        const void *bytes = t->data;
        if (!bytes) {
            moe_free(buf);
            if (!(buf = moe_malloc(t->size))) {
                st = set_error(MOE_ERR_NO_MEMORY, "gguf writer: out of memory for a %llu-byte tensor", (unsigned long long)t->size);
                break;
            }
            if ((st = t->produce(t->arg, buf, t->size))) break;
            bytes = buf;
        }
        ok = fwrite(bytes, 1, t->size, f) == t->size && gw_pad(f, (al - t->size % al) % al);
    }
    moe_free(buf);
    if (fclose(f) != 0) ok = 0;
    if (!st && !ok) st = set_error(MOE_ERR_IO, "gguf writer: cannot write '%s': %s", path, strerror(errno));
    if (st) remove(path);
    return st;
}

/* ---- JSON (RFC 8259), strict -----------------------------------------------------------------
   For tokenizer.json, tokenizer_config.json and config.json. The document is parsed once into a
   flat array of nodes in document order (a "tape"); each node knows where its subtree ends, so
   siblings are reached by a jump. Strings stay in the source: a node records where they are and
   whether they hold escapes (json_str() decodes those). Rejected with a line:column message:
   anything RFC 8259 rejects (trailing commas, comments, single quotes, leading zeros, NaN, raw
   control characters in strings, bad escapes, lone surrogates), invalid UTF-8 anywhere, nesting
   deeper than JSON_MAX_DEPTH, and data after the value. A leading UTF-8 BOM is skipped. */
enum { JSON_NULL, JSON_FALSE, JSON_TRUE, JSON_NUMBER, JSON_STRING, JSON_ARRAY, JSON_OBJECT };
#define JSON_MAX_DEPTH 256

typedef struct json_node {
    uint8_t type;      /* JSON_* */
    uint8_t escaped;   /* strings: holds backslash escapes */
    uint32_t len;      /* strings / numbers: source bytes (no quotes); arrays: elements; objects: members */
    uint32_t end;      /* index of the first node after this subtree */
    uint32_t off;      /* source offset of the value (strings: just after the opening quote) */
} json_node;           /* an object's children are key, value, key, value, ... */

typedef struct json_doc {
    const char *src;
    size_t n;
    json_node *nodes;
    uint32_t n_nodes, cap;
    const char *what;  /* file name for messages */
} json_doc;

static void json_free(json_doc *d) {
    moe_free(d->nodes);
    d->nodes = NULL;
    d->n_nodes = d->cap = 0;
}

static moe_status json_fail(const json_doc *d, size_t pos, const char *msg) {
    size_t line = 1, col = 1;
    for (size_t i = 0; i < pos && i < d->n; i++) {
        if (d->src[i] == '\n') { line++; col = 1; } else col++;
    }
    return set_error(MOE_ERR_FORMAT, "json: %s: line %zu column %zu: %s", d->what ? d->what : "input", line, col, msg);
}

/* Length of the valid UTF-8 sequence at p (1..4), or 0 if invalid (overlong, surrogate, > U+10FFFF). */
static int utf8_valid_len(const uint8_t *p, size_t n) {
    uint8_t c = p[0];
    if (c < 0x80) return 1;
    if (c < 0xC2 || c > 0xF4) return 0;
    int len = c < 0xE0 ? 2 : c < 0xF0 ? 3 : 4;
    if ((size_t)len > n) return 0;
    for (int i = 1; i < len; i++)
        if ((p[i] & 0xC0) != 0x80) return 0;
    if (c == 0xE0 && p[1] < 0xA0) return 0;   /* overlong */
    if (c == 0xED && p[1] > 0x9F) return 0;   /* surrogate */
    if (c == 0xF0 && p[1] < 0x90) return 0;   /* overlong */
    if (c == 0xF4 && p[1] > 0x8F) return 0;   /* > U+10FFFF */
    return len;
}

static int json_hex4(const char *p, uint32_t *v) {
    uint32_t x = 0;
    for (int i = 0; i < 4; i++) {
        char c = p[i];
        x <<= 4;
        if (c >= '0' && c <= '9') x |= (uint32_t)(c - '0');
        else if (c >= 'a' && c <= 'f') x |= (uint32_t)(c - 'a' + 10);
        else if (c >= 'A' && c <= 'F') x |= (uint32_t)(c - 'A' + 10);
        else return 0;
    }
    *v = x;
    return 1;
}

static moe_status json_push(json_doc *d, uint8_t type, size_t off, uint32_t *index) {
    if (d->n_nodes == d->cap) {
        uint32_t cap = d->cap ? d->cap * 2 : 1024;
        if (d->cap >= UINT32_MAX / 2) return set_error(MOE_ERR_FORMAT, "json: %s: too many values", d->what);
        json_node *nn = moe_malloc((size_t)cap * sizeof *nn);
        if (!nn) return set_error(MOE_ERR_NO_MEMORY, "json: %s: out of memory for %u values", d->what, cap);
        if (d->nodes) memcpy(nn, d->nodes, (size_t)d->n_nodes * sizeof *nn);
        moe_free(d->nodes);
        d->nodes = nn;
        d->cap = cap;
    }
    json_node *x = &d->nodes[d->n_nodes];
    memset(x, 0, sizeof *x);
    x->type = type;
    x->off = (uint32_t)off;
    *index = d->n_nodes++;
    return MOE_OK;
}

static size_t json_ws(const json_doc *d, size_t p) {
    while (p < d->n && (d->src[p] == ' ' || d->src[p] == '\t' || d->src[p] == '\n' || d->src[p] == '\r')) p++;
    return p;
}

static moe_status json_string(json_doc *d, size_t *pp) {
    size_t p = *pp + 1; /* after the quote */
    uint32_t idx;
    moe_status st = json_push(d, JSON_STRING, p, &idx);
    if (st) return st;
    int escaped = 0;
    for (;;) {
        if (p >= d->n) return json_fail(d, *pp, "unterminated string");
        uint8_t c = (uint8_t)d->src[p];
        if (c == '"') break;
        if (c < 0x20) return json_fail(d, p, "raw control character in a string (must be escaped)");
        if (c == '\\') {
            escaped = 1;
            if (p + 1 >= d->n) return json_fail(d, p, "unterminated escape");
            char e = d->src[p + 1];
            if (e == 'u') {
                uint32_t u, u2;
                if (p + 6 > d->n || !json_hex4(d->src + p + 2, &u)) return json_fail(d, p, "bad \\u escape (needs 4 hex digits)");
                p += 6;
                if (u >= 0xD800 && u <= 0xDBFF) {
                    if (p + 6 > d->n || d->src[p] != '\\' || d->src[p + 1] != 'u' || !json_hex4(d->src + p + 2, &u2) ||
                        u2 < 0xDC00 || u2 > 0xDFFF)
                        return json_fail(d, p, "high surrogate escape not followed by a low surrogate");
                    p += 6;
                } else if (u >= 0xDC00 && u <= 0xDFFF) {
                    return json_fail(d, p - 6, "lone low surrogate escape");
                }
                continue;
            }
            if (!strchr("\"\\/bfnrt", e) || e == 0) return json_fail(d, p, "unknown escape");
            p += 2;
            continue;
        }
        int l = utf8_valid_len((const uint8_t *)d->src + p, d->n - p);
        if (!l) return json_fail(d, p, "invalid UTF-8 in a string");
        p += (size_t)l;
    }
    if (p - *pp - 1 > UINT32_MAX) return json_fail(d, *pp, "string too long");
    d->nodes[idx].len = (uint32_t)(p - *pp - 1);
    d->nodes[idx].escaped = (uint8_t)escaped;
    d->nodes[idx].end = idx + 1;
    *pp = p + 1;
    return MOE_OK;
}

static moe_status json_value(json_doc *d, size_t *pp, int depth) {
    size_t p = json_ws(d, *pp);
    if (p >= d->n) return json_fail(d, p, "unexpected end of input (expected a value)");
    char c = d->src[p];
    uint32_t idx;
    moe_status st;
    if (c == '"') {
        *pp = p;
        return json_string(d, pp);
    }
    if (c == '{' || c == '[') {
        if (depth >= JSON_MAX_DEPTH) return json_fail(d, p, "nesting deeper than 256 levels");
        int obj = c == '{';
        if ((st = json_push(d, obj ? JSON_OBJECT : JSON_ARRAY, p, &idx))) return st;
        uint32_t count = 0;
        p = json_ws(d, p + 1);
        if (p < d->n && d->src[p] == (obj ? '}' : ']')) {
            p++;
        } else {
            for (;;) {
                if (obj) {
                    p = json_ws(d, p);
                    if (p >= d->n || d->src[p] != '"') return json_fail(d, p, "expected a string key");
                    if ((st = json_string(d, &p))) return st;
                    p = json_ws(d, p);
                    if (p >= d->n || d->src[p] != ':') return json_fail(d, p, "expected ':' after a key");
                    p++;
                }
                if ((st = json_value(d, &p, depth + 1))) return st;
                if (count == UINT32_MAX) return json_fail(d, p, "too many elements");
                count++;
                p = json_ws(d, p);
                if (p >= d->n) return json_fail(d, p, obj ? "unterminated object" : "unterminated array");
                if (d->src[p] == ',') { p++; continue; }
                if (d->src[p] == (obj ? '}' : ']')) { p++; break; }
                return json_fail(d, p, obj ? "expected ',' or '}'" : "expected ',' or ']'");
            }
        }
        d->nodes[idx].len = count;
        d->nodes[idx].end = d->n_nodes;
        *pp = p;
        return MOE_OK;
    }
    static const char *const lits[3] = {"null", "false", "true"};
    for (int k = 0; k < 3; k++) {
        size_t l = strlen(lits[k]);
        if (d->n - p >= l && memcmp(d->src + p, lits[k], l) == 0) {
            if ((st = json_push(d, (uint8_t)(JSON_NULL + k), p, &idx))) return st;
            d->nodes[idx].len = (uint32_t)l;
            d->nodes[idx].end = idx + 1;
            *pp = p + l;
            return MOE_OK;
        }
    }
    if (c == '-' || (c >= '0' && c <= '9')) {
        size_t q = p;
        if (d->src[q] == '-') q++;
        if (q >= d->n || d->src[q] < '0' || d->src[q] > '9') return json_fail(d, q, "bad number");
        if (d->src[q] == '0') {
            q++;
            if (q < d->n && d->src[q] >= '0' && d->src[q] <= '9') return json_fail(d, q, "leading zero in a number");
        } else {
            while (q < d->n && d->src[q] >= '0' && d->src[q] <= '9') q++;
        }
        if (q < d->n && d->src[q] == '.') {
            q++;
            if (q >= d->n || d->src[q] < '0' || d->src[q] > '9') return json_fail(d, q, "bad number: digits must follow '.'");
            while (q < d->n && d->src[q] >= '0' && d->src[q] <= '9') q++;
        }
        if (q < d->n && (d->src[q] == 'e' || d->src[q] == 'E')) {
            q++;
            if (q < d->n && (d->src[q] == '+' || d->src[q] == '-')) q++;
            if (q >= d->n || d->src[q] < '0' || d->src[q] > '9') return json_fail(d, q, "bad number: digits must follow the exponent");
            while (q < d->n && d->src[q] >= '0' && d->src[q] <= '9') q++;
        }
        if (q - p > 1000) return json_fail(d, p, "number too long");
        if ((st = json_push(d, JSON_NUMBER, p, &idx))) return st;
        d->nodes[idx].len = (uint32_t)(q - p);
        d->nodes[idx].end = idx + 1;
        *pp = q;
        return MOE_OK;
    }
    return json_fail(d, p, "unexpected character (expected a value)");
}

/* Parses src[0..n) (which must stay alive while the document is used). */
static moe_status json_parse(json_doc *d, const char *src, size_t n, const char *what) {
    memset(d, 0, sizeof *d);
    d->what = what;
    if (n >= UINT32_MAX) return set_error(MOE_ERR_FORMAT, "json: %s: %zu bytes is too large (4 GiB at most)", what, n);
    size_t p = 0;
    if (n >= 3 && memcmp(src, "\xEF\xBB\xBF", 3) == 0) p = 3;
    d->src = src;
    d->n = n;
    moe_status st = json_value(d, &p, 0);
    if (!st) {
        p = json_ws(d, p);
        if (p != n) st = json_fail(d, p, "unexpected data after the JSON value");
    }
    if (st) json_free(d);
    return st;
}

static int json_is(const json_doc *d, uint32_t i, int type) { return i && i < d->n_nodes && d->nodes[i].type == type; }

/* Decoded bytes of string node i into out (capacity >= node len); returns the decoded length. */
static size_t json_str_decode(const json_doc *d, uint32_t i, char *out) {
    const json_node *x = &d->nodes[i];
    const char *s = d->src + x->off;
    if (!x->escaped) {
        memcpy(out, s, x->len);
        return x->len;
    }
    size_t o = 0;
    for (uint32_t p = 0; p < x->len;) {
        if (s[p] != '\\') { out[o++] = s[p++]; continue; }
        char e = s[p + 1];
        if (e != 'u') {
            out[o++] = e == 'b' ? '\b' : e == 'f' ? '\f' : e == 'n' ? '\n' : e == 'r' ? '\r' : e == 't' ? '\t' : e;
            p += 2;
            continue;
        }
        uint32_t u = 0, u2 = 0;
        json_hex4(s + p + 2, &u);
        p += 6;
        if (u >= 0xD800 && u <= 0xDBFF) {
            json_hex4(s + p + 2, &u2);
            p += 6;
            u = 0x10000 + ((u - 0xD800) << 10) + (u2 - 0xDC00);
        }
        if (u < 0x80) out[o++] = (char)u;
        else if (u < 0x800) { out[o++] = (char)(0xC0 | (u >> 6)); out[o++] = (char)(0x80 | (u & 63)); }
        else if (u < 0x10000) {
            out[o++] = (char)(0xE0 | (u >> 12)); out[o++] = (char)(0x80 | ((u >> 6) & 63)); out[o++] = (char)(0x80 | (u & 63));
        } else {
            out[o++] = (char)(0xF0 | (u >> 18)); out[o++] = (char)(0x80 | ((u >> 12) & 63));
            out[o++] = (char)(0x80 | ((u >> 6) & 63)); out[o++] = (char)(0x80 | (u & 63));
        }
    }
    return o;
}

/* String node i compared with a NUL-terminated string. */
static int json_str_eq(const json_doc *d, uint32_t i, const char *z) {
    if (!json_is(d, i, JSON_STRING)) return 0;
    const json_node *x = &d->nodes[i];
    size_t zl = strlen(z);
    if (!x->escaped) return x->len == zl && memcmp(d->src + x->off, z, zl) == 0;
    if (x->len > 4096) return 0;
    char buf[4096];
    size_t l = json_str_decode(d, i, buf);
    return l == zl && memcmp(buf, z, zl) == 0;
}

/* The member value of object node o under key, or 0 if absent (node 0 is never a member). */
static uint32_t json_get(const json_doc *d, uint32_t o, const char *key) {
    if (!d->nodes || o >= d->n_nodes || d->nodes[o].type != JSON_OBJECT) return 0;
    size_t kl = strlen(key);
    for (uint32_t i = o + 1; i < d->nodes[o].end; i = d->nodes[i + 1].end) {
        const json_node *k = &d->nodes[i];
        if (k->escaped ? json_str_eq(d, i, key) : (k->len == kl && memcmp(d->src + k->off, key, kl) == 0)) return i + 1;
    }
    return 0;
}

/* Integer value of number node i (no fraction or exponent), within [lo, hi]. */
static int json_int(const json_doc *d, uint32_t i, int64_t lo, int64_t hi, int64_t *out) {
    if (!json_is(d, i, JSON_NUMBER)) return 0;
    const char *s = d->src + d->nodes[i].off;
    uint32_t n = d->nodes[i].len, p = 0;
    int neg = s[0] == '-';
    if (neg) p++;
    int64_t v = 0;
    for (; p < n; p++) {
        if (s[p] < '0' || s[p] > '9') return 0;
        if (v > (INT64_MAX - 9) / 10) return 0;
        v = v * 10 + (s[p] - '0');
    }
    if (neg) v = -v;
    if (v < lo || v > hi) return 0;
    *out = v;
    return 1;
}

/* Number node i as a double (locale-independent; within an ulp or two of strtod). */
MOE_MAYBE_UNUSED static int json_double(const json_doc *d, uint32_t i, double *out) {
    if (!json_is(d, i, JSON_NUMBER)) return 0;
    const char *s = d->src + d->nodes[i].off;
    uint32_t n = d->nodes[i].len, p = 0;
    int neg = s[0] == '-', digits = 0;
    if (neg) p++;
    uint64_t mant = 0;
    int64_t exp10 = 0;
    for (; p < n && s[p] >= '0' && s[p] <= '9'; p++) {
        if (digits < 19) { mant = mant * 10 + (uint64_t)(s[p] - '0'); if (mant) digits++; } else exp10++;
    }
    if (p < n && s[p] == '.')
        for (p++; p < n && s[p] >= '0' && s[p] <= '9'; p++)
            if (digits < 19) { mant = mant * 10 + (uint64_t)(s[p] - '0'); exp10--; if (mant) digits++; }
    if (p < n && (s[p] == 'e' || s[p] == 'E')) {
        p++;
        int eneg = s[p] == '-';
        if (s[p] == '+' || s[p] == '-') p++;
        int64_t e = 0;
        for (; p < n; p++) if (e < 100000) e = e * 10 + (s[p] - '0');
        exp10 += eneg ? -e : e;
    }
    double v = (double)mant;
    if (exp10 > 0) v *= pow(10.0, (double)(exp10 > 400 ? 400 : exp10));
    else if (exp10 < 0) v /= pow(10.0, (double)(exp10 < -400 ? 400 : -exp10));
    *out = neg ? -v : v;
    return 1;
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
   The CPU kernel set. A process uses one set for everything, so prefill equals decode bit for
   bit. Two families:
   - f32 activations (cpu_exact = 1, and every type without an int8 kernel): the eight-lane
     order of dot_acc_add above, one __m256 holding the lanes, with fused multiply-add; fused
     per-type dots compute each weight exactly as its dequant function does.
   - int8 activations (the default): below, portable code first, then its AVX2 twin. */
/* out[r·nt + t] = row r · token t: nr weight rows of nb blocks, rb bytes apart, nt ≤ 4 tokens */
typedef void (*q8_dot_fn)(const uint8_t *w, size_t rb, int nr, const void *const *x, int nt, int64_t nb, float *out);

typedef struct cpu_kernels {
    float (*dot)(const float *w, const float *x, int64_t n);
    float (*row_dot)(const moe_type_traits *tt, const uint8_t *row, const float *x, int64_t n);
    /* out[t] = dot(w, x[t], n) for t < nt ≤ 4, each exactly as dot computes it */
    void (*dot_n)(const float *w, const float *const *x, int nt, int64_t n, float *out);
    /* int8 activations: quantize n floats (a whole row) into q8a / q8k blocks */
    void (*quant_q8a)(const float *x, void *out, int64_t n);
    void (*quant_q8k)(const float *x, void *out, int64_t n);
    /* int8 dots of weight rows with nt ≤ 4 quantized activation rows */
    q8_dot_fn q8_0, q4_0, mxfp4, q4_k, q5_k, q6_k;
    /* n f16 values to f32 (exact: any implementation gives the same floats) */
    void (*f16_row)(const void *src, float *dst, int64_t n);
} cpu_kernels;

static void dot_f32_n(const float *w, const float *const *x, int nt, int64_t n, float *out) {
    for (int t = 0; t < nt; t++) out[t] = dot_f32(w, x[t], n);
}

/* ---- int8 activations ---------------------------------------------------------------------------
   llama.cpp's scheme: an op quantizes each activation row once, to int8 with an f32 scale per
   block, and every weight block then meets it in integer arithmetic.

     q8a block (for Q8_0, Q4_0, MXFP4): 32 elements      q8k block (Q4_K, Q5_K, Q6_K): 256 elements
     +---------+------+                                   +----------+-------------+------+---------+
     | q[32]   | d f32|                                   | q[256]   | bsum16[16]  | d f32| pad     |
     +---------+------+                                   +----------+-------------+------+---------+
       0..31     32..35                                     0..255     256..287      288    292..319
     x ≈ d·q;  amax = max|x| of the block, d = amax/127, q = nearest(x·(127/amax)) in −127..127:
     −128 never occurs (|x·(127/amax)| ≤ 127·(1 + 2^−23) before rounding). bsum16 holds the sums
     of q over each 16 elements, so a K-quant's "− dmin·m" and Q6_K's "− 32" cost one multiply
     per sub-block instead of one per element. A block with amax < 1e-30 is all zero
     (d = 0); a block holding inf or NaN gets d = NaN, so the product is NaN like the f32 path's.

   What a dot computes is DEFINED by eight integer lanes, the layout that AVX2's maddubs
   (adjacent byte pairs → int16) followed by madd (adjacent int16 pairs → int32) produces: lane L
   of a 32-element chunk sums the products of its elements 4L..4L+3. Per weight block, each lane
   sums its chunks weighted by their integer sub-block scales, exactly in int32 (bounds at each
   kernel); then, in f32, acc[L] = fma(d_w·d_x, (float)lane[L], acc[L]) (K-quants add the min
   term the same way) and the eight lanes are summed in dot_acc_sum's order. The portable code
   below and the AVX2 code compute the same integers and the same float operations (explicit
   fma: no contraction can differ), so they agree bit for bit, and a weight row processed with
   one token or with four gives every token the same float.

   maddubs saturation (it adds two u8·s8 products into an int16, saturating at ±32767): with
   activations in −127..127 the largest pair is 2·128·127 = 32512 (Q8_0, Q4_0, MXFP4 via the sign
   trick |w| ≤ 128), 2·63·127 = 16002 (Q6_K codes 0..63), 2·31·127 = 7874 (Q5_K), 2·15·127 = 3810
   (Q4_K): never saturated. */
typedef struct q8a_block { int8_t q[32]; float d; } q8a_block;
typedef struct q8k_block { int8_t q[256]; int16_t bsum16[16]; float d, pad[7]; } q8k_block;
enum { Q8_NONE = 0, Q8_A = 1, Q8_K = 2 };

/* which activation format a weight type's int8 kernel takes (Q8_NONE: f32 activations) */
static int q8_format(int32_t type) {
    switch (type) {
    case MOE_TYPE_Q8_0: case MOE_TYPE_Q4_0: case MOE_TYPE_MXFP4: return Q8_A;
    case MOE_TYPE_Q4_K: case MOE_TYPE_Q5_K: case MOE_TYPE_Q6_K: return Q8_K;
    default: return Q8_NONE;
    }
}

/* bytes of one quantized activation row of n elements (n a multiple of the block) */
static size_t q8_row_bytes(int fmt, int64_t n) {
    return fmt == Q8_K ? (size_t)(n / QK_K) * sizeof(q8k_block) : (size_t)(n / 32) * sizeof(q8a_block);
}

static q8_dot_fn q8_kernel(const cpu_kernels *k, int32_t type) {
    switch (type) {
    case MOE_TYPE_Q8_0: return k->q8_0;
    case MOE_TYPE_Q4_0: return k->q4_0;
    case MOE_TYPE_MXFP4: return k->mxfp4;
    case MOE_TYPE_Q4_K: return k->q4_k;
    case MOE_TYPE_Q5_K: return k->q5_k;
    case MOE_TYPE_Q6_K: return k->q6_k;
    default: return NULL;
    }
}

static float lanes8_sum(const float *acc) {
    dot_acc a;
    memcpy(a.lane, acc, sizeof a.lane);
    a.tail = 0;
    return dot_acc_sum(&a);
}

/* the scale of a block from its amax (bad: the block held inf or NaN); returns 127/amax, or 0
   when the block is stored as all zeros */
static float q8_scale(float amax, int bad, float *d) {
    if (bad) { *d = NAN; return 0; }
    if (!(amax >= 1e-30f)) { *d = 0; return 0; }
    *d = amax / 127.0f;
    return 127.0f / amax;
}

static void q8_block_ref(const float *x, int n, int8_t *q, float *d) {
    float amax = 0;
    int bad = 0;
    for (int i = 0; i < n; i++) {
        float a = fabsf(x[i]);
        bad |= !(a < INFINITY);
        amax = fmaxf(amax, a);
    }
    float id = q8_scale(amax, bad, d);
    for (int i = 0; i < n; i++) q[i] = (int8_t)(id != 0 ? clamp_i(round_i(x[i] * id), -127, 127) : 0);
}

static void q8k_bsums(q8k_block *y) {
    for (int s = 0; s < 16; s++) {
        int sum = 0;
        for (int l = 0; l < 16; l++) sum += y->q[16 * s + l];
        y->bsum16[s] = (int16_t)sum;
    }
}

static void quant_q8a_ref(const float *x, void *out, int64_t n) {
    q8a_block *y = out;
    for (int64_t b = 0; b < n / 32; b++) q8_block_ref(x + 32 * b, 32, y[b].q, &y[b].d);
}

static void quant_q8k_ref(const float *x, void *out, int64_t n) {
    q8k_block *y = out;
    for (int64_t b = 0; b < n / QK_K; b++) {
        memset(y[b].pad, 0, sizeof y[b].pad);
        q8_block_ref(x + QK_K * b, QK_K, y[b].q, &y[b].d);
        q8k_bsums(&y[b]);
    }
}

/* lane L of a 32-element chunk of weights w (as small ints) and activations x */
static int32_t lane4(const int *w, const int8_t *x, int L) {
    return w[4 * L] * x[4 * L] + w[4 * L + 1] * x[4 * L + 1] + w[4 * L + 2] * x[4 * L + 2] + w[4 * L + 3] * x[4 * L + 3];
}

/* acc[L] += d·lane[L] for one 32-element block: Q8_0, Q4_0 and MXFP4 (w: the 32 codes as ints) */
static void q8a_block_acc(const int *w, float dw, const q8a_block *x, float *acc) {
    float d = dw * x->d;
    for (int L = 0; L < 8; L++) acc[L] = fmaf(d, (float)lane4(w, x->q, L), acc[L]);
}

/* The reference int8 dot products: out[i] (i = row·nt + token) = Σ over blocks of one format's
   block accumulator, a row and a token at a time. One loop serves every format. */
typedef void (*ref_block_acc_fn)(const uint8_t *blk, const void *x, float *acc);

static void q8_dot_rows_ref(const uint8_t *w0, size_t rb, int nr, const void *const *x, int nt, int64_t nb,
                            size_t w_block, size_t x_block, ref_block_acc_fn block_acc, float *out) {
    for (int i = 0; i < nr * nt; i++) {
        const uint8_t *w = w0 + (size_t)(i / nt) * rb;
        const uint8_t *xb = x[i % nt];
        float acc[8] = {0};
        for (int64_t b = 0; b < nb; b++) block_acc(w + w_block * (size_t)b, xb + x_block * (size_t)b, acc);
        out[i] = lanes8_sum(acc);
    }
}

static void q8_0_block_acc(const uint8_t *p, const void *x, float *acc) {
    int q[32];
    for (int j = 0; j < 32; j++) q[j] = (int8_t)p[2 + j];
    q8a_block_acc(q, fp16_to_f32(rd16(p)), x, acc);
}

static void q4_0_block_acc(const uint8_t *p, const void *x, float *acc) {
    int q[32];
    for (int j = 0; j < 16; j++) {
        q[j] = (p[2 + j] & 0xf) - 8;
        q[j + 16] = (p[2 + j] >> 4) - 8;
    }
    q8a_block_acc(q, fp16_to_f32(rd16(p)), x, acc);
}

static void mxfp4_block_acc(const uint8_t *p, const void *x, float *acc) {
    int q[32];
    for (int j = 0; j < 16; j++) {
        q[j] = k_mxfp4_values[p[1 + j] & 0xf];
        q[j + 16] = k_mxfp4_values[p[1 + j] >> 4];
    }
    q8a_block_acc(q, e8m0_to_f32_half(p[0]), x, acc);
}

static void q8_dot_q8_0_ref(const uint8_t *w0, size_t rb, int nr, const void *const *x, int nt, int64_t nb, float *out) {
    q8_dot_rows_ref(w0, rb, nr, x, nt, nb, 34, sizeof(q8a_block), q8_0_block_acc, out);
}
static void q8_dot_q4_0_ref(const uint8_t *w0, size_t rb, int nr, const void *const *x, int nt, int64_t nb, float *out) {
    q8_dot_rows_ref(w0, rb, nr, x, nt, nb, 18, sizeof(q8a_block), q4_0_block_acc, out);
}
static void q8_dot_mxfp4_ref(const uint8_t *w0, size_t rb, int nr, const void *const *x, int nt, int64_t nb, float *out) {
    q8_dot_rows_ref(w0, rb, nr, x, nt, nb, 17, sizeof(q8a_block), mxfp4_block_acc, out);
}

/* Q4_K / Q5_K super-block (qh NULL for Q4_K):
     lane[L] = Σ_s sc[s]·(Σ of q·x over elements 32s+4L..32s+4L+3)
     mlane[L] = m[L]·(bsum16[2L] + bsum16[2L+1])   (the min term of sub-block L)
     acc[L] = fma(d·dx, lane[L], acc[L]);  acc[L] = fma(−(dmin·dx), mlane[L], acc[L])
   |lane| ≤ 8·63·4·31·127 = 7.9e6 and |mlane| ≤ 63·32·127: exact in int32 and in f32. */
static void k45_block_acc(const uint8_t *blk, const uint8_t *qh, const uint8_t *qs, const q8k_block *x, float *acc) {
    int32_t lane[8] = {0};
    int32_t mlane[8];
    for (int s = 0; s < 8; s++) {
        uint8_t sc, m;
        get_scale_min_k(blk + 4, s, &sc, &m);
        mlane[s] = (int32_t)m * (x->bsum16[2 * s] + x->bsum16[2 * s + 1]);
        const uint8_t *q = qs + 32 * (s / 2);
        int w[32];
        for (int l = 0; l < 32; l++) w[l] = (s & 1 ? q[l] >> 4 : q[l] & 0xf) + (qh && (qh[l] >> s & 1) ? 16 : 0);
        for (int L = 0; L < 8; L++) lane[L] += (int32_t)sc * lane4(w, x->q + 32 * s, L);
    }
    float dd = fp16_to_f32(rd16(blk)) * x->d, dm = -(fp16_to_f32(rd16(blk + 2)) * x->d);
    for (int L = 0; L < 8; L++) {
        acc[L] = fmaf(dd, (float)lane[L], acc[L]);
        acc[L] = fmaf(dm, (float)mlane[L], acc[L]);
    }
}

static void q4_k_block_acc(const uint8_t *blk, const void *x, float *acc) { k45_block_acc(blk, NULL, blk + 16, x, acc); }
static void q5_k_block_acc(const uint8_t *blk, const void *x, float *acc) { k45_block_acc(blk, blk + 16, blk + 48, x, acc); }

static void q8_dot_q4_k_ref(const uint8_t *w0, size_t rb, int nr, const void *const *x, int nt, int64_t nb, float *out) {
    q8_dot_rows_ref(w0, rb, nr, x, nt, nb, 144, sizeof(q8k_block), q4_k_block_acc, out);
}
static void q8_dot_q5_k_ref(const uint8_t *w0, size_t rb, int nr, const void *const *x, int nt, int64_t nb, float *out) {
    q8_dot_rows_ref(w0, rb, nr, x, nt, nb, 176, sizeof(q8k_block), q5_k_block_acc, out);
}

/* Q6_K super-block, chunk c = elements 32c..32c+31 (half c/4, part c%4 of dequant_q6_k), codes
   q = 0..63 unsigned, the "− 32" taken out through bsum16:
     raw[L]  = Σ_c sc[2c + L/4]·(Σ of q·x over elements 32c+4L..32c+4L+3)
     lane[L] = raw[L] − 32·(sc[2L]·bsum16[2L] + sc[2L+1]·bsum16[2L+1])
     acc[L]  = fma(d·dx, lane[L], acc[L])
   |raw| ≤ 8·128·4·63·127 = 3.3e7 and the correction ≤ 32·2·128·16·127: int32 is exact. */
static void q6_k_block_acc(const uint8_t *blk, const void *xv, float *acc) {
    const q8k_block *x = xv;
    const int8_t *sc = (const int8_t *)(blk + 192);
    int32_t lane[8] = {0};
    for (int c = 0; c < 8; c++) {
        const uint8_t *ql = blk + 64 * (c / 4) + 32 * (c & 1), *qh = blk + 128 + 32 * (c / 4);
        int lo_shift = 4 * ((c & 3) >> 1), hi_shift = 2 * (c & 3), w[32];
        for (int l = 0; l < 32; l++) w[l] = (ql[l] >> lo_shift & 0xf) | (qh[l] >> hi_shift & 3) << 4;
        for (int L = 0; L < 8; L++) lane[L] += (int32_t)sc[2 * c + L / 4] * lane4(w, x->q + 32 * c, L);
    }
    float dd = fp16_to_f32(rd16(blk + 208)) * x->d;
    for (int L = 0; L < 8; L++) {
        int32_t corr = (int32_t)sc[2 * L] * x->bsum16[2 * L] + (int32_t)sc[2 * L + 1] * x->bsum16[2 * L + 1];
        acc[L] = fmaf(dd, (float)(lane[L] - 32 * corr), acc[L]);
    }
}

static void q8_dot_q6_k_ref(const uint8_t *w0, size_t rb, int nr, const void *const *x, int nt, int64_t nb, float *out) {
    q8_dot_rows_ref(w0, rb, nr, x, nt, nb, 210, sizeof(q8k_block), q6_k_block_acc, out);
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <cpuid.h>
#include <immintrin.h>
#define MOE_AVX2 __attribute__((target("avx2,fma,f16c")))

/* AVX2 code must not call ordinary (SSE-compiled) functions while ymm values are live: the
   state transition costs more than the work (measured 25x on our CI's EPYC). Every AVX2
   function is therefore flattened, and per-type dequant functions are called directly so that
   they are inlined and compiled for AVX2 too. The int8 kernels are written once for nt tokens
   (AVX2_INLINE, nt a constant at each call site) and instantiated for nt = 1..4. */
#define MOE_AVX2_FLAT MOE_AVX2 __attribute__((flatten))
#define AVX2_INLINE MOE_AVX2 static inline __attribute__((always_inline))
/* an empty asm that claims to change v: the integer sums before it are done in program order.
   Without it GCC reassociates each token's lane sum into a tree of all the products of a block,
   keeping sixteen of them live and spilling them to the stack. */
#define AVX2_KEEP(v) __asm__("" : "+x"(v))
/* Weights stream from a file mapping in 4 KiB pages, where the hardware prefetcher stops at
   every page boundary; a software prefetch AVX2_PF bytes ahead of each block's cache lines
   doubled the rate at which a decode kernel reads them (measured 4 → 8-9 GB/s on the CI's
   EPYC). Past the end of a matrix it touches nothing: prefetches do not fault. */
#define AVX2_PF 4096
#define AVX2_PREFETCH(p, bytes)                                                                     \
    do {                                                                                            \
        for (int pf_ = 0; pf_ < (bytes); pf_ += 64) _mm_prefetch((const char *)(p) + AVX2_PF + pf_, _MM_HINT_T0); \
    } while (0)

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

/* avx2_dot for nt tokens sharing each weight load; every token's lanes see the same fmadds */
AVX2_INLINE void avx2_dot_nt(const float *w, const float *const *x, const int nt, int64_t n, float *out) {
    __m256 acc[4];
    int64_t n8 = n / 8 * 8;
#pragma GCC unroll 4
    for (int t = 0; t < nt; t++) acc[t] = _mm256_setzero_ps();
    for (int64_t i = 0; i < n8; i += 8) {
        __m256 wv = _mm256_loadu_ps(w + i);
#pragma GCC unroll 4
        for (int t = 0; t < nt; t++) acc[t] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x[t] + i), acc[t]);
    }
    for (int t = 0; t < nt; t++) {
        float tail = 0;
        for (int64_t i = n8; i < n; i++) tail += w[i] * x[t][i];
        out[t] = avx2_finish(acc[t], tail);
    }
}

MOE_AVX2_FLAT static void avx2_dot_n(const float *w, const float *const *x, int nt, int64_t n, float *out) {
    switch (nt) {
    case 1: avx2_dot_nt(w, x, 1, n, out); break;
    case 2: avx2_dot_nt(w, x, 2, n, out); break;
    case 3: avx2_dot_nt(w, x, 3, n, out); break;
    default: avx2_dot_nt(w, x, 4, n, out); break;
    }
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
AVX2_CHUNKED_DOT(dequant_q5_k)
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

/* f16 → f32, eight at a time (F16C converts exactly, as fp16_to_f32 does) */
MOE_AVX2_FLAT static void avx2_f16_row(const void *src, float *dst, int64_t n) {
    const uint8_t *p = src;
    int64_t n8 = n / 8 * 8;
    for (int64_t i = 0; i < n8; i += 8) _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p + 2 * i))));
    for (int64_t i = n8; i < n; i++) dst[i] = _cvtsh_ss(rd16(p + 2 * i));
}

/* Q4_K fused: weight = (d·sc)·q − dmin·m, computed as dequant_k45 does (all products exact) */
MOE_AVX2_FLAT static float avx2_dot_q4_k(const uint8_t *row, const float *x, int64_t n) {
    __m256 acc = _mm256_setzero_ps();
    const __m256i low4 = _mm256_set1_epi32(0xf);
    for (int64_t b = 0; b < n / QK_K; b++, row += 144) {
        float d = _cvtsh_ss(rd16(row)), dmin = _cvtsh_ss(rd16(row + 2));
        const uint8_t *qs = row + 16;
        for (int g = 0; g < 4; g++, qs += 32, x += 64) {
            uint8_t s0, m0, s1, m1;
            get_scale_min_k(row + 4, 2 * g, &s0, &m0);
            get_scale_min_k(row + 4, 2 * g + 1, &s1, &m1);
            __m256 d0 = _mm256_set1_ps(d * (float)s0), mm0 = _mm256_set1_ps(dmin * (float)m0);
            __m256 d1 = _mm256_set1_ps(d * (float)s1), mm1 = _mm256_set1_ps(dmin * (float)m1);
            for (int l = 0; l < 32; l += 8) {
                __m256i q = _mm256_and_si256(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(qs + l))), low4);
                __m256 w = _mm256_sub_ps(_mm256_mul_ps(d0, _mm256_cvtepi32_ps(q)), mm0);
                acc = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + l), acc);
            }
            for (int l = 0; l < 32; l += 8) {
                __m256i q = _mm256_srli_epi32(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(qs + l))), 4);
                __m256 w = _mm256_sub_ps(_mm256_mul_ps(d1, _mm256_cvtepi32_ps(q)), mm1);
                acc = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + 32 + l), acc);
            }
        }
    }
    return avx2_finish(acc, 0);
}

/* Q6_K fused: weight = (d·sc)·(q − 32), in dequant_q6_k's order and grouping */
MOE_AVX2_FLAT static float avx2_dot_q6_k(const uint8_t *row, const float *x, int64_t n) {
    __m256 acc = _mm256_setzero_ps();
    const __m256i m4 = _mm256_set1_epi32(0xf), m3 = _mm256_set1_epi32(3), k32 = _mm256_set1_epi32(32);
    for (int64_t b = 0; b < n / QK_K; b++, row += 210) {
        const uint8_t *ql = row, *qh = row + 128;
        const int8_t *sc = (const int8_t *)(row + 192);
        float d = _cvtsh_ss(rd16(row + 208));
        for (int h = 0; h < 2; h++, ql += 64, qh += 32, sc += 8, x += 128)
            for (int part = 0; part < 4; part++) {      /* y[32·part + l]: elements in order */
                const uint8_t *qlp = ql + (part & 1) * 32;
                int lo_shift = (part >> 1) * 4, hi_shift = part * 2;
                for (int l = 0; l < 32; l += 8) {
                    __m256 ds = _mm256_set1_ps(d * (float)sc[l / 16 + 2 * part]);
                    __m256i lo = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(qlp + l)));
                    __m256i hi = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(qh + l)));
                    lo = _mm256_and_si256(_mm256_srlv_epi32(lo, _mm256_set1_epi32(lo_shift)), m4);
                    hi = _mm256_and_si256(_mm256_srlv_epi32(hi, _mm256_set1_epi32(hi_shift)), m3);
                    __m256i q = _mm256_sub_epi32(_mm256_or_si256(lo, _mm256_slli_epi32(hi, 4)), k32);
                    acc = _mm256_fmadd_ps(_mm256_mul_ps(ds, _mm256_cvtepi32_ps(q)), _mm256_loadu_ps(x + 32 * part + l), acc);
                }
            }
    }
    return avx2_finish(acc, 0);
}

static float avx2_row_dot(const moe_type_traits *tt, const uint8_t *row, const float *x, int64_t n) {
    if (tt->dequant == dequant_f32) return avx2_dot((const float *)(const void *)row, x, n);
    if (tt->dequant == dequant_q8_0) return avx2_dot_q8_0(row, x, n);
    if (tt->dequant == dequant_f16) return avx2_dot_f16(row, x, n);
    if (tt->dequant == dequant_bf16) return avx2_dot_dequant_bf16(tt, row, x, n);
    if (tt->dequant == dequant_q4_0) return avx2_dot_dequant_q4_0(tt, row, x, n);
    if (tt->dequant == dequant_q4_k) return avx2_dot_q4_k(row, x, n);
    if (tt->dequant == dequant_q5_k) return avx2_dot_dequant_q5_k(tt, row, x, n);
    if (tt->dequant == dequant_q6_k) return avx2_dot_q6_k(row, x, n);
    if (tt->dequant == dequant_mxfp4) return avx2_dot_dequant_mxfp4(tt, row, x, n);
    return row_dot(tt, row, x, n);
}

/* ---- AVX2 int8 activations: the twins of the portable code above ---- */

/* n = 32·k floats → q (the same values as q8_block_ref: same amax, same 127/amax, the same
   products rounded to nearest-even by cvtps) */
AVX2_INLINE void avx2_q8_block(const float *x, int n, int8_t *q, float *d) {
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff)), inf = _mm256_set1_ps(INFINITY);
    __m256 vmax = _mm256_setzero_ps(), vbad = _mm256_setzero_ps();
    for (int i = 0; i < n; i += 8) {
        __m256 a = _mm256_and_ps(_mm256_loadu_ps(x + i), absmask);
        vbad = _mm256_or_ps(vbad, _mm256_cmp_ps(a, inf, _CMP_NLT_UQ));
        vmax = _mm256_max_ps(vmax, a);
    }
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(vmax), _mm256_extractf128_ps(vmax, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
    float id = q8_scale(_mm_cvtss_f32(m4), _mm256_movemask_ps(vbad) != 0, d);
    if (id == 0) {
        memset(q, 0, (size_t)n);
        return;
    }
    const __m256 vid = _mm256_set1_ps(id);
    const __m256i perm = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (int i = 0; i < n; i += 32) {
        __m256i i0 = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + i), vid));
        __m256i i1 = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + i + 8), vid));
        __m256i i2 = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + i + 16), vid));
        __m256i i3 = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + i + 24), vid));
        __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(i0, i1), _mm256_packs_epi32(i2, i3));
        _mm256_storeu_si256((__m256i *)(q + i), _mm256_permutevar8x32_epi32(p, perm));
    }
}

MOE_AVX2_FLAT static void avx2_quant_q8a(const float *x, void *out, int64_t n) {
    q8a_block *y = out;
    for (int64_t b = 0; b < n / 32; b++) avx2_q8_block(x + 32 * b, 32, y[b].q, &y[b].d);
}

MOE_AVX2_FLAT static void avx2_quant_q8k(const float *x, void *out, int64_t n) {
    q8k_block *y = out;
    const __m256i ones8 = _mm256_set1_epi8(1), ones16 = _mm256_set1_epi16(1);
    for (int64_t b = 0; b < n / QK_K; b++) {
        memset(y[b].pad, 0, sizeof y[b].pad);
        avx2_q8_block(x + QK_K * b, QK_K, y[b].q, &y[b].d);
        /* per 32 bytes: pair sums (maddubs of 1·q, |sum| ≤ 254), then sums of 4, of 8, of 16 */
        for (int c = 0; c < 8; c += 2) {
            __m256i s0 = _mm256_madd_epi16(_mm256_maddubs_epi16(ones8, _mm256_loadu_si256((const __m256i *)(y[b].q + 32 * c))), ones16);
            __m256i s1 = _mm256_madd_epi16(_mm256_maddubs_epi16(ones8, _mm256_loadu_si256((const __m256i *)(y[b].q + 32 * c + 32))), ones16);
            __m256i s = _mm256_hadd_epi32(s0, s1);   /* per 128-bit half: 8-sums of s0 lo, s1 lo | s0 hi, s1 hi */
            s = _mm256_hadd_epi32(s, s);             /* 16-sums: [c.0, c+1.0, c.0, c+1.0 | c.1, c+1.1, ...] */
            int32_t v[8];
            _mm256_storeu_si256((__m256i *)v, s);
            y[b].bsum16[2 * c] = (int16_t)v[0];
            y[b].bsum16[2 * c + 1] = (int16_t)v[4];
            y[b].bsum16[2 * c + 2] = (int16_t)v[1];
            y[b].bsum16[2 * c + 3] = (int16_t)v[5];
        }
    }
}

/* the activation scale of block b of token t, times a weight scale, broadcast */
#define AVX2_DX(xb, b, dw) _mm256_mul_ps((dw), _mm256_broadcast_ss(&(xb)[b].d))

/* lanes8_sum in registers: hadd pairs (l0+l1, l2+l3 | l4+l5, l6+l7), then the pairs of those,
   then the halves, then + 0 (dot_acc_sum's tail): the same additions in the same order */
AVX2_INLINE float avx2_lanes_sum(__m256 v) {
    __m256 h = _mm256_hadd_ps(v, v);
    h = _mm256_hadd_ps(h, h);
    __m128 s = _mm_add_ss(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_setzero_ps()));
}

/* Tiles: NR weight rows (consecutive, rb bytes apart) × NT tokens, NR·NT ≤ 4, every loop over r
   and t unrolled so that the accumulators stay in registers. out[r·NT + t]. */

/* Q8_0, Q4_0, MXFP4: a block's 32 codes as int8 (wq), through the sign trick (|w| ≤ 128 as u8,
   x·sign(w) in −127..127), then acc = fma(d_w·d_x, lanes, acc) */
AVX2_INLINE void avx2_q8a_block(__m256i wq, __m256 dw, const q8a_block *const *x, const int NT, int64_t b, __m256 *acc) {
    const __m256i aw = _mm256_abs_epi8(wq), ones16 = _mm256_set1_epi16(1);
#pragma GCC unroll 4
    for (int t = 0; t < NT; t++) {
        __m256i xq = _mm256_loadu_si256((const __m256i *)x[t][b].q);
        __m256i s = _mm256_madd_epi16(_mm256_maddubs_epi16(aw, _mm256_sign_epi8(xq, wq)), ones16);
        acc[t] = _mm256_fmadd_ps(AVX2_DX(x[t], b, dw), _mm256_cvtepi32_ps(s), acc[t]);
    }
}

/* 16 bytes of nibbles → 32 codes in element order (low nibbles = elements 0..15) */
AVX2_INLINE __m256i avx2_nibbles(const uint8_t *p) {
    __m128i b = _mm_loadu_si128((const __m128i *)p);
    return _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(b, 4), b), _mm256_set1_epi8(0xf));
}

enum { AVX2_Q8_0, AVX2_Q4_0, AVX2_MXFP4 };

AVX2_INLINE void avx2_q8a_tile(const uint8_t *w, size_t rb, const int NR, const void *const *xv, const int NT, int64_t nb,
                               float *out, const int kind) {
    const q8a_block *x[4];
    __m256 acc[2][4];
    const __m256i table = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)k_mxfp4_values));
#pragma GCC unroll 4
    for (int t = 0; t < NT; t++) x[t] = xv[t];
#pragma GCC unroll 2
    for (int r = 0; r < NR; r++)
#pragma GCC unroll 4
        for (int t = 0; t < NT; t++) acc[r][t] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
#pragma GCC unroll 2
        for (int r = 0; r < NR; r++) {
            const uint8_t *p = w + (size_t)r * rb;
            AVX2_PREFETCH(p + (kind == AVX2_Q8_0 ? 34 : kind == AVX2_Q4_0 ? 18 : 17) * b, 1);
            if (kind == AVX2_Q8_0) {
                p += 34 * b;
                avx2_q8a_block(_mm256_loadu_si256((const __m256i *)(p + 2)), _mm256_set1_ps(_cvtsh_ss(rd16(p))), x, NT, b, acc[r]);
            } else if (kind == AVX2_Q4_0) {
                p += 18 * b;
                avx2_q8a_block(_mm256_sub_epi8(avx2_nibbles(p + 2), _mm256_set1_epi8(8)), _mm256_set1_ps(_cvtsh_ss(rd16(p))), x,
                               NT, b, acc[r]);
            } else {
                p += 17 * b;
                avx2_q8a_block(_mm256_shuffle_epi8(table, avx2_nibbles(p + 1)), _mm256_set1_ps(e8m0_to_f32_half(p[0])), x, NT,
                               b, acc[r]);
            }
        }
    }
#pragma GCC unroll 2
    for (int r = 0; r < NR; r++)
#pragma GCC unroll 4
        for (int t = 0; t < NT; t++) out[r * NT + t] = avx2_lanes_sum(acc[r][t]);
}

/* the 12 scale bytes of a Q4_K / Q5_K block (p = blk + 4; 16 bytes are read, all inside the
   block) → bytes sc[0..7], m[0..7], as get_scale_min_k decodes them */
AVX2_INLINE __m128i avx2_k45_scales(const uint8_t *p) {
    const __m128i v = _mm_loadu_si128((const __m128i *)p);
    /* low bits: sc0-3 = b0-3 & 63, sc4-7 = b8-11 & 15, m0-3 = b4-7 & 63, m4-7 = b8-11 >> 4 */
    const __m128i a = _mm_shuffle_epi8(v, _mm_setr_epi8(0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 6, 7, 8, 9, 10, 11));
    __m128i lo = _mm_and_si128(a, _mm_setr_epi8(63, 63, 63, 63, 15, 15, 15, 15, 63, 63, 63, 63, 0, 0, 0, 0));
    lo = _mm_or_si128(lo, _mm_and_si128(_mm_srli_epi16(a, 4), _mm_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 15, 15, 15, 15)));
    /* high bits of sc4-7 and m4-7: bits 6-7 of b0-3 and b4-7, moved to bits 4-5 */
    const __m128i b = _mm_shuffle_epi8(v, _mm_setr_epi8(-1, -1, -1, -1, 0, 1, 2, 3, -1, -1, -1, -1, 4, 5, 6, 7));
    return _mm_or_si128(lo, _mm_and_si128(_mm_srli_epi16(b, 2), _mm_set1_epi8(0x30)));
}

/* Q4_K / Q5_K (q5 = 0 / 1): per group g of 64 elements, the codes of sub-blocks 2g and 2g+1;
   maddubs → int16 pairs, madd with the sub-block scale → the lanes; the min term of lane L,
   m[L]·(bsum16[2L] + bsum16[2L+1]), is one madd of the mins (each twice) with bsum16. */
AVX2_INLINE void avx2_k45_tile(const uint8_t *w, size_t rb, const int NR, const void *const *xv, const int NT, int64_t nb,
                               float *out, const int q5) {
    const int bb = q5 ? 176 : 144, qs_off = q5 ? 48 : 16;
    const q8k_block *x[4];
    __m256 acc[2][4];
#pragma GCC unroll 4
    for (int t = 0; t < NT; t++) x[t] = xv[t];
#pragma GCC unroll 2
    for (int r = 0; r < NR; r++)
#pragma GCC unroll 4
        for (int t = 0; t < NT; t++) acc[r][t] = _mm256_setzero_ps();
    const __m256i m4 = _mm256_set1_epi8(0xf), one = _mm256_set1_epi8(1);
    for (int64_t b = 0; b < nb; b++) {
#pragma GCC unroll 2
        for (int r = 0; r < NR; r++) {
            const uint8_t *p = w + (size_t)r * rb + (size_t)b * (size_t)bb;
            AVX2_PREFETCH(p, bb);
            const __m128i scm = avx2_k45_scales(p + 4);           /* sc[0..7], m[0..7] */
            const __m256i sc16 = _mm256_broadcastsi128_si256(_mm_cvtepu8_epi16(scm));
            const __m256i hb = q5 ? _mm256_loadu_si256((const __m256i *)(p + 16)) : _mm256_setzero_si256();
            __m256i lane[4];
#pragma GCC unroll 4
            for (int t = 0; t < NT; t++) lane[t] = _mm256_setzero_si256();
#pragma GCC unroll 4
            for (int g = 0; g < 4; g++) {
                __m256i q = _mm256_loadu_si256((const __m256i *)(p + qs_off + 32 * g));
                __m256i lo = _mm256_and_si256(q, m4), hi = _mm256_and_si256(_mm256_srli_epi16(q, 4), m4);
                if (q5) {
                    lo = _mm256_or_si256(lo, _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hb, 2 * g), one), 4));
                    hi = _mm256_or_si256(hi, _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hb, 2 * g + 1), one), 4));
                }
                /* broadcast the int16 scales sc[2g] and sc[2g+1] */
                __m256i s_lo = _mm256_shuffle_epi8(sc16, _mm256_set1_epi16((short)(0x0100 + 0x0202 * (2 * g))));
                __m256i s_hi = _mm256_shuffle_epi8(sc16, _mm256_set1_epi16((short)(0x0100 + 0x0202 * (2 * g + 1))));
#pragma GCC unroll 4
                for (int t = 0; t < NT; t++) {
                    __m256i p_lo = _mm256_maddubs_epi16(lo, _mm256_loadu_si256((const __m256i *)(x[t][b].q + 64 * g)));
                    __m256i p_hi = _mm256_maddubs_epi16(hi, _mm256_loadu_si256((const __m256i *)(x[t][b].q + 64 * g + 32)));
                    lane[t] = _mm256_add_epi32(lane[t], _mm256_add_epi32(_mm256_madd_epi16(p_lo, s_lo), _mm256_madd_epi16(p_hi, s_hi)));
                    AVX2_KEEP(lane[t]);
                }
            }
            const __m256i m2 = _mm256_cvtepu8_epi16(_mm_shuffle_epi8(scm, _mm_setr_epi8(8, 8, 9, 9, 10, 10, 11, 11, 12, 12, 13, 13, 14, 14, 15, 15)));
            const __m256 d = _mm256_set1_ps(_cvtsh_ss(rd16(p))), dmin = _mm256_set1_ps(-_cvtsh_ss(rd16(p + 2)));
#pragma GCC unroll 4
            for (int t = 0; t < NT; t++) {
                __m256i ml = _mm256_madd_epi16(m2, _mm256_loadu_si256((const __m256i *)x[t][b].bsum16));
                acc[r][t] = _mm256_fmadd_ps(AVX2_DX(x[t], b, d), _mm256_cvtepi32_ps(lane[t]), acc[r][t]);
                acc[r][t] = _mm256_fmadd_ps(AVX2_DX(x[t], b, dmin), _mm256_cvtepi32_ps(ml), acc[r][t]);
            }
        }
    }
#pragma GCC unroll 2
    for (int r = 0; r < NR; r++)
#pragma GCC unroll 4
        for (int t = 0; t < NT; t++) out[r * NT + t] = avx2_lanes_sum(acc[r][t]);
}

/* Q6_K: the four 32-element chunks of each half rebuilt as codes 0..63, maddubs with the
   activations, madd with [sc[2c] ×8 | sc[2c+1] ×8]; the "− 32" through bsum16 at the end */
AVX2_INLINE void avx2_q6_k_tile(const uint8_t *w, size_t rb, const int NR, const void *const *xv, const int NT, int64_t nb,
                                float *out) {
    const q8k_block *x[4];
    __m256 acc[2][4];
#pragma GCC unroll 4
    for (int t = 0; t < NT; t++) x[t] = xv[t];
#pragma GCC unroll 2
    for (int r = 0; r < NR; r++)
#pragma GCC unroll 4
        for (int t = 0; t < NT; t++) acc[r][t] = _mm256_setzero_ps();
    const __m256i m4 = _mm256_set1_epi8(0xf), m3 = _mm256_set1_epi8(3);
    for (int64_t b = 0; b < nb; b++) {
#pragma GCC unroll 2
        for (int r = 0; r < NR; r++) {
            const uint8_t *p = w + (size_t)r * rb + (size_t)b * 210;
            AVX2_PREFETCH(p, 210);
            const __m256i sc16 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(p + 192)));
            /* sc16 as int16 [0..7 | 8..15]; chunk c needs [sc[2c] ×8 | sc[2c+1] ×8]: both from one
               half, which the two broadcasts below put in both halves */
            const __m256i sc_a = _mm256_permute2x128_si256(sc16, sc16, 0x00), sc_b = _mm256_permute2x128_si256(sc16, sc16, 0x11);
            __m256i lane[4];
#pragma GCC unroll 4
            for (int t = 0; t < NT; t++) lane[t] = _mm256_setzero_si256();
#pragma GCC unroll 2
            for (int h = 0; h < 2; h++) {
                __m256i ql0 = _mm256_loadu_si256((const __m256i *)(p + 64 * h));
                __m256i ql1 = _mm256_loadu_si256((const __m256i *)(p + 64 * h + 32));
                __m256i qh = _mm256_loadu_si256((const __m256i *)(p + 128 + 32 * h));
                __m256i q[4];
                q[0] = _mm256_or_si256(_mm256_and_si256(ql0, m4), _mm256_slli_epi16(_mm256_and_si256(qh, m3), 4));
                q[1] = _mm256_or_si256(_mm256_and_si256(ql1, m4), _mm256_slli_epi16(_mm256_and_si256(qh, _mm256_slli_epi16(m3, 2)), 2));
                q[2] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql0, 4), m4), _mm256_and_si256(qh, _mm256_slli_epi16(m3, 4)));
                q[3] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql1, 4), m4),
                                       _mm256_srli_epi16(_mm256_and_si256(qh, _mm256_slli_epi16(m3, 6)), 2));
#pragma GCC unroll 4
                for (int k = 0; k < 4; k++) {
                    const int c = 4 * h + k, e = (2 * c) & 7;  /* sc[2c] is int16 e of its half */
                    const __m256i pick = _mm256_setr_epi8((char)(2 * e), (char)(2 * e + 1), (char)(2 * e), (char)(2 * e + 1),
                        (char)(2 * e), (char)(2 * e + 1), (char)(2 * e), (char)(2 * e + 1), (char)(2 * e), (char)(2 * e + 1),
                        (char)(2 * e), (char)(2 * e + 1), (char)(2 * e), (char)(2 * e + 1), (char)(2 * e), (char)(2 * e + 1),
                        (char)(2 * e + 2), (char)(2 * e + 3), (char)(2 * e + 2), (char)(2 * e + 3), (char)(2 * e + 2),
                        (char)(2 * e + 3), (char)(2 * e + 2), (char)(2 * e + 3), (char)(2 * e + 2), (char)(2 * e + 3),
                        (char)(2 * e + 2), (char)(2 * e + 3), (char)(2 * e + 2), (char)(2 * e + 3), (char)(2 * e + 2),
                        (char)(2 * e + 3));
                    const __m256i s = _mm256_shuffle_epi8(c < 4 ? sc_a : sc_b, pick);
#pragma GCC unroll 4
                    for (int t = 0; t < NT; t++) {
                        __m256i pr = _mm256_maddubs_epi16(q[k], _mm256_loadu_si256((const __m256i *)(x[t][b].q + 32 * c)));
                        lane[t] = _mm256_add_epi32(lane[t], _mm256_madd_epi16(pr, s));
                        AVX2_KEEP(lane[t]);
                    }
                }
            }
            const __m256 d = _mm256_set1_ps(_cvtsh_ss(rd16(p + 208)));
#pragma GCC unroll 4
            for (int t = 0; t < NT; t++) {
                __m256i corr = _mm256_madd_epi16(sc16, _mm256_loadu_si256((const __m256i *)x[t][b].bsum16));
                __m256i l = _mm256_sub_epi32(lane[t], _mm256_slli_epi32(corr, 5));
                acc[r][t] = _mm256_fmadd_ps(AVX2_DX(x[t], b, d), _mm256_cvtepi32_ps(l), acc[r][t]);
            }
        }
    }
#pragma GCC unroll 2
    for (int r = 0; r < NR; r++)
#pragma GCC unroll 4
        for (int t = 0; t < NT; t++) out[r * NT + t] = avx2_lanes_sum(acc[r][t]);
}

AVX2_INLINE void avx2_q8_0_tile(const uint8_t *w, size_t rb, const int NR, const void *const *x, const int NT, int64_t nb, float *out) {
    avx2_q8a_tile(w, rb, NR, x, NT, nb, out, AVX2_Q8_0);
}
AVX2_INLINE void avx2_q4_0_tile(const uint8_t *w, size_t rb, const int NR, const void *const *x, const int NT, int64_t nb, float *out) {
    avx2_q8a_tile(w, rb, NR, x, NT, nb, out, AVX2_Q4_0);
}
AVX2_INLINE void avx2_mxfp4_tile(const uint8_t *w, size_t rb, const int NR, const void *const *x, const int NT, int64_t nb, float *out) {
    avx2_q8a_tile(w, rb, NR, x, NT, nb, out, AVX2_MXFP4);
}
AVX2_INLINE void avx2_q4_k_tile(const uint8_t *w, size_t rb, const int NR, const void *const *x, const int NT, int64_t nb, float *out) {
    avx2_k45_tile(w, rb, NR, x, NT, nb, out, 0);
}
AVX2_INLINE void avx2_q5_k_tile(const uint8_t *w, size_t rb, const int NR, const void *const *x, const int NT, int64_t nb, float *out) {
    avx2_k45_tile(w, rb, NR, x, NT, nb, out, 1);
}

/* one entry point per type: rows two at a time for one or two tokens, one at a time for three
   or four (NR·NT ≤ 4 keeps the accumulators in the 16 ymm registers). one_row: one token goes
   through rows one at a time too: Q6_K's two-row tile ran at 7-12 GB/s against 15-21 GB/s for
   one row (a 255 MB lm head, single thread, best of 7, four alternations); the floats are the
   same either way (each row has its own accumulators). */
#define AVX2_Q8_ENTRY(name, one_row)                                                                \
    MOE_AVX2_FLAT static void avx2_q8_dot_##name(const uint8_t *w, size_t rb, int nr, const void *const *x, int nt, \
                                                 int64_t nb, float *out) {                          \
        int r = 0;                                                                                  \
        if (nt == 1 && !(one_row))                                                                  \
            for (; r + 2 <= nr; r += 2) avx2_##name##_tile(w + (size_t)r * rb, rb, 2, x, 1, nb, out + r); \
        if (nt == 2)                                                                                \
            for (; r + 2 <= nr; r += 2) avx2_##name##_tile(w + (size_t)r * rb, rb, 2, x, 2, nb, out + 2 * r); \
        for (; r < nr; r++) {                                                                       \
            const uint8_t *wr = w + (size_t)r * rb;                                                 \
            switch (nt) {                                                                           \
            case 1: avx2_##name##_tile(wr, rb, 1, x, 1, nb, out + r); break;                        \
            case 2: avx2_##name##_tile(wr, rb, 1, x, 2, nb, out + 2 * r); break;                    \
            case 3: avx2_##name##_tile(wr, rb, 1, x, 3, nb, out + 3 * r); break;                    \
            default: avx2_##name##_tile(wr, rb, 1, x, 4, nb, out + 4 * r); break;                   \
            }                                                                                       \
        }                                                                                           \
    }
AVX2_Q8_ENTRY(q8_0, 0)
AVX2_Q8_ENTRY(q4_0, 0)
AVX2_Q8_ENTRY(mxfp4, 0)
AVX2_Q8_ENTRY(q4_k, 0)
AVX2_Q8_ENTRY(q5_k, 0)
AVX2_Q8_ENTRY(q6_k, 1)

static int cpu_has_avx2(void) {
    unsigned a, b, c, d;
    __builtin_cpu_init();
    if (!__builtin_cpu_supports("avx2") || !__builtin_cpu_supports("fma")) return 0;
    if (!__get_cpuid(1, &a, &b, &c, &d)) return 0;
    return (c >> 29) & 1; /* F16C */
}
#endif

/* the portable set: what every CPU runs, and the reference the AVX2 set must equal */
static cpu_kernels cpu_kernels_portable(void) {
    cpu_kernels k = {dot_f32, row_dot, dot_f32_n, quant_q8a_ref, quant_q8k_ref, q8_dot_q8_0_ref, q8_dot_q4_0_ref,
                     q8_dot_mxfp4_ref, q8_dot_q4_k_ref, q8_dot_q5_k_ref, q8_dot_q6_k_ref, dequant_f16};
    return k;
}

static cpu_kernels cpu_kernels_pick(void) {
    cpu_kernels k = cpu_kernels_portable();
#ifdef MOE_AVX2
    if (cpu_has_avx2()) {
        cpu_kernels a = {avx2_dot, avx2_row_dot, avx2_dot_n, avx2_quant_q8a, avx2_quant_q8k, avx2_q8_dot_q8_0,
                         avx2_q8_dot_q4_0, avx2_q8_dot_mxfp4, avx2_q8_dot_q4_k, avx2_q8_dot_q5_k, avx2_q8_dot_q6_k, avx2_f16_row};
        k = a;
    }
#endif
    return k;
}

/* ============================================================================================ */
/* 4. tokenizer                                                                                  */
/* ============================================================================================ */
/* Vocabularies (GGUF tokenizer.ggml.* or Hugging Face tokenizer.json), the split regexes of the
   supported families, NFC, BPE, added/special tokens. The public tokenizer API and the chat
   templates are at the end of section 10. */
/* BEGIN GENERATED UNICODE TABLES: gen/gen_unicode_tables.py from the Unicode 15.0.0 character database
   (2134 category ranges, 779 normalization ranges, 2061 canonical decompositions); do not edit. */
#define MOE_UNICODE_VERSION "15.0.0"
#define K_DIGITS "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz+-"
enum { K_UCAT_N = 2134, K_UNORM_N = 779, K_UDECOMP_N = 2061 };
static const char k_ucat_rows[][96] = { /* 2134 values */
    "0s4m2c9Gr7W5n3WDY3WDc5GcDGp4Gr3W1IGr1JGLm1HmBHo3WCId4oRe1o7d1XNe1Y2n1d1n1Y1Ho1X1Y2HY1Ho1n1Y1Hd1n",
    "2Y1HIX1IHY1Hu1n1Y1Z1HIp1X2Y1HY1He1Y8d1o8X1d1n1t1YTn3Y1HY1X1IHd2Y4pY1IpDW9Z2W6Z7m2p3GJGq8du1Z2GHI",
    "GZ1Im1HGX3GHm1HGHY1Hm8Ho4nHIX1o1t1oBn2IGHIHY1X1oPdOWHKt3XRe1Y6d1Wm1HWJZ1GY3mKa4mMKGKW1KW1KGZ4mDZ",
    "2W2qEm5p2qLrAW5Z2a1Jmn1JKm3a1Z3a1W1KZ2b1Z5m1Z1GZ8KJaFmDZ1qi1p5Gb7Z5qGp4W1Z2Ga1GZ1aBZ2Kp4Kp1Km2Z9",
    "qCm1Z2m5p2WCJW3q4Z4aLWCKpGaRp1KZ9Kp3a5W1b1W5Ja8m1JW4Z1W1Z1WBJm3JGp1W2a1JKm3a1W1a1p1Ga4GZ2W1Jq1W1",
    "b1Z5W1b1W3Z1GKGa1m1JW3Z2W1Z1WBJm3JW1JW1JW1a1GKm2a2W1a1m1q1Gp3W2JGr3a5Z1q1Gq5m1Jm4Jm1JWBJm3JW1Jm2",
    "a1JKW4Km1Km1Z1Gp7a1W1b1W5p4KW3Km1JW4Z1W1Z1WBJm3JW1Jm2a1JKm3a1W1a1m1q3m1Z2W1Jq1W1b1W5JLW3a5JGJW3p",
    "1m1JW2p1W1JGJW1p1W1p1m1p1W6a2m2q1m1KW2Z1Ga3Gb7m6q6p2W4Jm1JmBJW8a1JKm3Km1KW2q3W1Jm1Z1GZ1a1W1b1W5b",
    "4m3JKm1JW4Jm1JmBJW5Jm2a1JKm3Km1KW2q3W1Z3W1Ja1W1b1W5Ja1Ga6Z2m4Jm1JqKZ1Km3Km1KZ2Gp2q1Lp3q1W1b1m9JW",
    "3Km1JW9p1WCJm4JGZ1m3q1Ga2W3KGKW4b3W5a1W1p6aOJa1m3p2q3W4LW5pJW1JGJm2JWCJGJa5Ja1p4GZ1m2JGKm3LW5Z1W",
    "2ZGGqBW1b3WAKGKGKGa2Z1W4JWIa2WAKZ1q2m5KWIq4GpSqLZALW5Z3a3Z2a2p1Kp1a1p3q1Z2q6Z6KLa5W2X1WJHGn2GY1m",
    "LJIp1ma5JW2Z1m3JGJW2Z1mKJW2Z1mGJW2Z1m3JGJW2Z1m7JmSJW2Z1mX1a1m1r4WAp1W8X8Wh1Y1W3p1Ws9Z1s8JWDp2mb1",
    "r1p1W4p3a9W2p4q9m1p5a9W1Z6m6Jm1KW1Z6aQWGp1GZ2KGb1W5b3W5q8m1KLW5Z3mi1p3q2Z1aHJGp2WZ1Z5mFKW6a2W6b5",
    "Z5WFZ1m2p5WMZ2WDb3m5pIqBm2Z2qQW5KmEa1LW5b3W5p6Ga4mFqOp2qNp8W4r1W5q8m4a6p1aFp6b1Z5aMW7Z6aIWAb4W5p",
    "1r1Z5WIY1m4n3mLX1m1a8m1KpAa2Ja3Ja1p1Go2ZMoVp6IZHqIdW1og2t4om1n4Y4W3X1W3Y1X4Y4X4Y4W3X1W3Y1W4HGHGH",
    "GHIX4Y4W7Y1X4Y4X4Y4X4Y4m2IX1m2IGo1m1IX1m2o1W2Y1X1W2Y2X4m2o2m1IX1m2s1m5sEW1s2GsNGb8JGb1W3p2LW5Z3m",
    "6qPmGn8GX2GY1Ho1X1o1GHGn1m2X3GHGHGHW2IHY2JY2GY1X1W1n2IW2Y2GLnPILm2bhBWUbd1WBbx9WFXsHYOXOIHo1e1X3",
    "Y2HIX1IZ3X1t1Yn1W1e3a2n1IGr4GY1WJIGo2GZ1WSp3Gq7JmBp4m3Jm3Jm3Jm3Jm3Jm3Jm3Jm3KWGpNGce7GZ2b1GrCq4W3",
    "Jm2b1p1W1Z2Wh1a1W1Z1m1JWj1JW2p2mLJWl1r1W2Z5WGZOW8bGW5bFW4Lm7bGW5rJm7ZW5WWd3ZW1mcwApX1WNZ1mc4p1b8",
    "Z5W1dAZNKW2KW5JNZEa1Z1bZ1a5W1pIm4d1o6t1ZVIe4X2d1p4Ge1Z2No1t1XAo2Ht2n7e2m1n2IGIGNm2ZCn1IJo1Jq3Jq1",
    "Ja2JqBm2a2Gr1W3Z5WQa6Z1aPW9b5W5a3Z9W3p1GJa1LZ5aEW4Z1qBm6Z6mEq1Z2qNW7Z7LW5Z3q2Jb5Z5m2JqKW7p4q1Ja4",
    "W1b1W5Z3mBp1Kp1aPJKp1a1Z1q2Z1KJGZCm1Z1q5m2Z1q1W1Z5W3Z1W3Z1W3p4m3Jm3ImLJY2p4GY3Ze1qHW4KW1b1W5Z3Wo",
    "k5Z6mBZ2mOZYa4Wt5Z1Wr1YJm3Y6m2p2KJW5Jm6Jm2JGJW1JW1JWs1pGmr5Z9WW1Z1WRZKW6a2W8a8W8ZW1m2JmZ2r9W5n3W",
    "DY3WDp5mi1p1W3Z1W3Z1W3Z1m1pHW6JWDJm9JW1Jm7Z1W7ZHmz1b6mMb6mSr8W1qu1GZX2mEp1mOq7LmDZ2bGW2p4bAJb4Gp",
    "2aJm2p2WFZ1WIZ2W4Lm2XLYKZKWd1b1W5X3WIY2WIZ2WKZ4WQX6m5Hm7Hm3HW1Im5Im7Im3IW1pX1mx4p4WBZ5W4ZCW3JWLJ",
    "m4pY1W3Z1GJWMJW1p1GZ1mBb1Z4mBb1p3mFb4m4ZOm9JW1r2p2bBW3Z2WDZZ1WSb2Z1b1W8b1ZNKm1KW1q2Z2W2Jm1JmEa1m",
    "1a2Lm4pBrEW1JrEm1ZGW4JaEW1b2m2Z8WRZ5WBb1Z4m9r2Z4W9rBm3Ze1ma1nRmPo6mPr3Z3aIW2b4W5bp4mFJWLKW1p1W1q",
    "b1p1rEZ5GZ4aBr5W2pDa9W2ZLrAm3ZAmBq4p1qQm7r5aFJa1Z1Gq4Z2qMm5q3Gp6mCr3W5a3p1aIW7LW5Z2KZ1GZ4qHGZ1Gq",
    "4p1aOZ7W2a2W2Kb1Z5GJGb2WAp5W9JqCW6a3Ja1GZVm3JGJW2Jm7JW5p3qNW6r2W5a3W2JW4Z1W1Z1WBJm3JW1Jm2KZ1Km3a",
    "1W1a1m1Z1Ga3Gp2q2W1a1m3q1m2pb2qQZ9W2r2W5a2Jm1ZFaOZAW1JGb4W5Zp2qNm3a1m4pBa2W1ZHaOm8p1Gr5W5ZJqLp6G",
    "r3W5ZRmDa1m7b2W6Z2m3py2aMm7no1YGbGm9Z6W4Z1GZ1W4JW1JaCW3KW1a1Z2KJKW1b6W5ZZ1W4Z1qJm3a1p3GJKGpDKZ5a",
    "Kp3KW2a4GZ4Kp5aNW8p1GZ9ma1pZ4m4JqIW4KZ4Gr7mEp2WFa1WBKW7pa1m3JW1JaJW3q1GKW1Kp3KGb4W5Z3W3JW1JaGm2K",
    "W1Kp2Gr3W5Zx4q9W2q4Z1KJm6JaHm3q1m2r6W5Zh1Gr7mApLWjEbp1mt1p8WY3Zcf1mm1p7WuGa8Ja3m7Zr+1mZ9pyc4my8p",
    "3mFLW5Z3md1LW5Z3WFa1m2p5aOm3p4W2b6W5Lm3JmAp2m9XuAYGbGmBpq1mb1a2JKmRq3Z2m6ZW1W1JKGq5W1Z7Wy-2Z4WhJ",
    "ZLm4pph4W2Jm3JW1Jmn4p7GpEm1Z1GZ7W2Z4Wc6ZYa1mr1p2m6p1m4p3W5q1W1qmf2WNa1mBal8m2q1W3a4W4a1m3aFW2ag2",
    "m1rz1WAb6WAbs1mCnZ2YDXDYDm3IX9YDXDGHW1X1GX1W1X1W2HY4W2IGIm3In5YDXDW1HW2X1W4Hm3IXDW1HW2Hm2HGn1m3I",
    "XDYDXDYDXDYDXDYDXDYDXDYDWEX1mCImCIX3mCImCIX3mCImCIX3mCImCIX3mCImCIX3IGb1WPaW8mRa2WPa4Ga7GaBm2Km7",
    "YeHZ5IWAY3W3qg3m3Km8a1m3KW1Km2p2WVqGGZu1mMq1p3m3b1W5Z2GpW5aFGp8aMb2W5Zh7aEb2W5ZpBm3JW2JW1Jm7JmY3",
    "b1q4m3nKYHaHp3Gb2W5rhCmTLm1LW2bc1mMLm7ZX3W2JmDJW1JGZ1GJW5JW2JGJGZ3GZ2GJGJGJm1JW1JGZ1GJGJGJGJGJW1",
    "JGZ1W2Jm3JW2JW2JGJW5Jm8p2m1Jm2Jm8bY9m6rnh1W5ZZGWmxKZGWzW2Z3Wl3Z1WXw2Z7muq3plm1Wl8ZnNmbj2p2WmX2ae",
    "rxAWu3",
};
static const char *const k_ucat = (const char *)&k_ucat_rows;
static const char k_unorm_rows[][96] = { /* 779 values */
    "0ctWOcd5ct1cd7ct2cd1ct1cd1ct1ed2yc1ed4us1yc1gc5ys2gs4yc2ys4yc2ys1yc2XW2Xm4yc1cd4cl3ct2cl1mt2cd1y",
    "c1cd3yc3WW2cd1yc3cd4ed1yc1cd2fd1gd1fd2gd1fd2cd1WWDWe4WW1We9WW1We8WW1cdx7WW5ycf8cd1yc4cd1+c3yc1cd",
    "1yc6cd6yc2cd1+c2ad1cd1gW1hW1iW1jW1kW1lW1mW1nW1oW1pW1qW2rW1sW1WW1tW1WW1uW1vW1WW1cd1yc1WW1oW1WW1cd",
    "e2+W8-W1WX1WW1xWm1yW1zW1+W1-W1WX1XX1YX1ct1ys2yc1cd1yc5cd1yc2WW1ZXGWW1cdb3WW7cd2yc4cd1WW1cd2WW2yc",
    "1cd1yc2WW1aXZ1WW1cdUyc1cd1yc2cd1yc2cd3yc1cd2yc1cd1yc3cd1yc1cd1yc1cd1yc1cd1WW2cdW5yc7cd1WW1yc9WW1",
    "cdOWW4cd1WW9cd1WW3cd1WW5ych1WW3cdy1yc1cd3WW4cdg1yc5cd5WWEyc1cd1yc2cd1yc2cd1yc3xW3yW1zW1cd1yc3cd1",
    "yc2cd2WW5dmy1WW1fWGWW1cd3yc1cd1WW2We3WW8dWy2WW1Wm1WW1fWEWW1Wm9WW1We4WW2We1WW1cdUWW1Weq1WW1We2WW1",
    "dW5WW1fWGWW1WeBWW3We2WW1dWz2WW1fWGWW1dWk3WW1Wm1WW1fWEWW1Wm8WW2We4WW2WmW3WW1fWEWW1Wm9WW1dWa3WW1fW",
    "GWW1qY7xo1WW1dWb3WW1Wm5WW1fWAWW1Wm7WW2fWa3WW2Wm1WW1fWEWW1Wm9WW1fmo3WW1Wm4WW1WmFWW1dZu2fW2WW1hZDW",
    "W4sZi3fW2WW1wZDWW4yci2WW2ycRWW1yc1WW1uc1WW1We9WW1We9WW1We4WW1We4WW1We4WW1WeCWW1Xa7Ya1We1aa1We1WW",
    "2We1WW1Ya1WW4Ya2We1cd1fW2WW1cd1WW2WeBWW1We9WW1We4WW1We4WW1We4WW1WeCWW1ycCWW1Wmd3WW1dW8WW1fW1WW2y",
    "co2WW1Wmp6WWLWmo1WWRcdwCWW3fWqTWW2fWUWW1fWz4WW1cdAWW1adh6WW1+cl4cd1yc1WW1cdx6yc1WW1fWd2WW1cdKWW8",
    "yc2WW1cdm1yc5cd6yc2WW1yc1cd2yc2cd2yc5cd1WW4dWb3Wm1WW1fWEWW1cdc1yc1cd1WW7fWs1WW2dWw1WW1fWBWW2dWZ2",
    "WW1cdu4WW3XW1yc1cd5yc2cd4WW1XW1WW7yc4WW1cd6WW1cd3WW2cdc6yc2cd1yc7cd1gd2sc1yc1gc1cd1edb1ad1yc2wc1",
    "cd1fd1yc1cd1yc1WW1WenBWW1We1WW1We1WW1We1WW1We1WW1We1WW1We1WW1Wez1WW1We2WW1WeAWW1We1WW1We7WW1We7W",
    "W1We7WW1We7WW1We2WW2We9WW1We1WW1We1WW1We2WW2cdk6XW2cd2XW4cd3WW2cd4WW1XW3cd2yc1cd1XW1yc2cd4WW1Wer",
    "1WW1We3WW2WezFWW2Wenz1WW1cdoGWW3fWj4WW1cdW3WWW1wcgHad1ed1+c1Wd1WW2emf3WW2cdqkTWW1cd4WWAcdW1WW2cd",
    "m2WW2fWq8WW1fWb1WW1fWt4WW1cdRWWIycv1WW3fWb1WW1dW-2WW1fWCWW1cdl7WW1cd1yc2WW1cd2WW2cd5WW2cd1WW1fWq",
    "1WW1fWs7WW1WeoeJWWk8We2WW1We1WW1We2WWAWe1WW1We1WW1We2WW2We3WWa2We2WWg3WeZ2wW1We1WW1WeAWWDWe1WW5W",
    "e1WW1We1WW2We1WW2We1WW9cdnMyc7cd7WW2ycjUWW1ycY7WW1cdr4WW5ycoq1WW1cd1WW1cde1XW1yc1WW1fW4WW1cdb5yc",
    "1WW1cdzHWW4cdZCWW2ycm2WW3ycc2cd2yc3cd1yc1WW4cdn1yc1cd1yc1WW1fWW6WW1fWf1WW1fWEWW1fWv1dm1WW1cdb2WW",
    "3Wma1WW1fWBWW2dW+1WW1fWi2WW1dW9WW1fWg3dW1WW1dWo5fW1WW1dWm2WW2Wm1WW1fWEWW1Wm9WW1cdEWW7cd3WW5fWj6W",
    "W1dW3WW1cdNWW1Wmn2WW1Wm9WW1Wm2WW1fW4dW1WW1Wmh7WW1fWFdW1WW1fW+3WW1fWs3dW1WW1fWp3WW1fWj8dW1WW1Wmr7",
    "WW1fWCWW2dW4WW1fWy4WW1fWp2WW1fWIWW1fWn2WW1fWbDWW1dWY8WW1fW1WW2fWn2WW1fWfDWW2XWjzIWW5cdx1WW7cWvb1",
    "WW2XWibJWW1We-b5uc7XW2WW3Yd3uc1WW5yc8WW8cd2yc5WW2cdUWW4WeDWW6cdX4WW3cdxj3WW7cd1WWHcd2WW7cd1WW2cd",
    "1WW5cda3WW1cdW5WW7cdtBWW1cdz1WW4edyFyc2cd1WW1ycWVWW7cdj3dW6WW1WerrZ2WW+G",
};
static const char *const k_unorm = (const char *)&k_unorm_rows;
static const char k_udecomp_rows[][96] = { /* 6183 values */
    "WCX2WO2X2XO2X2YO2X2ZO2X2eO2X2gO4Z2dP2b2WO2b2XO2b2YO2b2eO2f2WO2f2XO2f2YO2f2eO4k2ZO2l2WO2l2XO2l2YO",
    "2l2ZO2l2eO6r2WO2r2XO2r2YO2r2eO2v2XO6X3WO2X3XO2X3YO2X3ZO2X3eO2X3gO4Z3dP2b3WO2b3XO2b3YO2b3eO2f3WO2",
    "f3XO2f3YO2f3eO4k3ZO2l3WO2l3XO2l3YO2l3ZO2l3eO6r3WO2r3XO2r3YO2r3eO2v3XO4v3eO2X2aO2X3aO2X2cO2X3cO2X",
    "2eP2X3eP2Z2XO2Z3XO2Z2YO2Z3YO2Z2dO2Z3dO2Z2iO2Z3iO2a2iO2a3iO6b2aO2b3aO2b2cO2b3cO2b2dO2b3dO2b2eP2b3",
    "eP2b2iO2b3iO2d2YO2d3YO2d2cO2d3cO2d2dO2d3dO2d2dP2d3dP2e2YO2e3YO6f2ZO2f3ZO2f2aO2f3aO2f2cO2f3cO2f2e",
    "P2f3eP2f2dO8g2YO2g3YO2h2dP2h3dP4i2XO2i3XO2i2dP2i3dP2i2iO2i3iOAk2XO2k3XO2k2dP2k3dP2k2iO2k3iO8l2aO",
    "2l3aO2l2cO2l3cO2l2hO2l3hO6o2XO2o3XO2o2dP2o3dP2o2iO2o3iO2p2XO2p3XO2p2YO2p3YO2p2dP2p3dP2p2iO2p3iO2",
    "q2dP2q3dP2q2iO2q3iO6r2ZO2r3ZO2r2aO2r3aO2r2cO2r3cO2r2gO2r3gO2r2hO2r3hO2r2eP2r3eP2t2YO2t3YO2v2YO2v",
    "3YO2v2eO2w2XO2w3XO2w2dO2w3dO2w2iO2w3iOa2l2xO2l3xOSr2xO2r3xOw1X2iO2X3iO2f2iO2f3iO2l2iO2l3iO2r2iO2",
    "r3iO2y6aO2y7aO2y6XO2y7XO2y6iO2y7iO2y6WO2y7WO4a6aO2a7aO2cHaO2dHaO2c6aO2c7aO6d2iO2d3iO2h2iO2h3iO2l",
    "2eP2l3eP2gFaO2hFaO2tDiO2oKiO2g3iO8d2XO2d3XO6k2WO2k3WO2b6XO2b7XO2c6XO2c7XO2u6XO2u7XO2X2lO2X3lO2X2",
    "nO2X3nO2b2lO2b3lO2b2nO2b3nO2f2lO2f3lO2f2nO2f3nO2l2lO2l3lO2l2nO2l3nO2o2lO2o3lO2o2nO2o3nO2r2lO2r3l",
    "O2r2nO2r3nO2p2cP2p3cP2q2cP2q3cP6e2iO2e3iOEX2dO2X3dO2b2dP2b3dP2s6aO2s7aO2r6aO2r7aO2l2dO2l3dO2kHaO",
    "2lHaO2v2aO2v3aOxGWO03XO05pO03eOXOX3vL0Lx10Ee5XO2nSXO3t502rSXO2tSXO2vSXO4-SXO4bTXO2fTXO2gUXOq1vSe",
    "O2bTeO2nTXO2rTXO2tTXO2vTXO2hUXOq1vTeO2bUeO2-TXO2bUXO2fUXOAoUXO2oUeOu2rW1WO2rW1eO4pW1XO8cW1eOAwW1",
    "XO2uW1WO2ZX1cOMuW1cOW2uX1cOk1rX1WO2rX1eO4pX1XO8sY1eOAwX1XO2uX1WO2ZY1cOm1qZ1lO2rZ1lOq4sW1cO2sX1cO",
    "SmW1cO2mX1cO2mW1eO2mX1eO6rW1cO2rX1cO6uc1eO2vc1eO2sW1eO2sX1eO2tW1eO2tX1eO6uW1aO2uX1aO2uW1eO2uX1eO",
    "2+W1eO2+X1eO6ed1eO2fd1eO2jX1eO2jY1eO2ZX1aO2ZY1aO2ZX1eO2ZY1eO2ZX1hO2ZY1hO2dX1eO2dY1eO6hX1eO2hY1eO",
    "oIdn1po12dn1qo12eo1qo12dn1ro12go1qo1q9rs1qo14Xs1qo1Y1os1qo1ib1ef2yf2Gmf2yf26pf2yf2f2re2yf23se2yf",
    "23te2yf23ye2yf23Xf2yf23Yf2yf23hf2yf23lf2yf2u6dk2+j22dk2tk2X1Xj2yj23Yj2yj25lj2yj2f5on2yn27un2yn2d",
    "2sm2yn23tm2yn23ym2yn27hn2yn2qEdw2sw26dw2+v22dw2tw2X1Xv2yv23Yv2yv2k3oy2t+2i3c+2+z22d+2+z22c+2t+2u",
    "7cY3sY3m7-b3rc3Ecc3rc32cc3sc34cc3Yc32gc3rc3+7cg3+f32dg3+f32cg3tg3y8vk3gk34vk3lk32yk3gk32vk3-k3hM",
    "Yw3tz3Liw3tz3Bnw3tz3Bsw3tz3Bxw3tz3RWw3rz3Lnx3ox35nx3qx33oz3Wy35pz3Wy3Jnx3Wy3b1oy3tz3Lyy3tz3BXz3t",
    "z3Bcz3tz3Bhz3tz3Rmy3rz3w6bX4kX4Wk5bu6rv64du6rv64fu6rv64hu6rv64ju6rv68nu6rv6o2wv6rv64yv6rv66+v6rv",
    "62-v6rv64Yw6rv6wh1X2bP2X3bP2Y2dO2Y3dO2Y2ZP2Y3ZP2Y2nP2Y3nP2d6XO2d7XO2a2dO2a3dO2a2ZP2a3ZP2a2nP2a3n",
    "P2a2dP2a3dP2a2jP2a3jP2o8WO2p8WO2o8XO2p8XO2b2jP2b3jP2b2mP2b3mP2eHcO2fHcO2c2dO2c3dO2d2aO2d3aO2e2dO",
    "2e3dO2e2ZP2e3ZP2e2eO2e3eO2e2dP2e3dP2e2kP2e3kP2f2mP2f3mP2l6XO2l7XO2h2XO2h3XO2h2ZP2h3ZP2h2nP2h3nP2",
    "i2ZP2i3ZP2sn7aO2tn7aO2i2nP2i3nP2i2jP2i3jP2j2XO2j3XO2j2dO2j3dO2j2ZP2j3ZP2k2dO2k3dO2k2ZP2k3ZP2k2nP",
    "2k3nP2k2jP2k3jP2r6XO2r7XO2r6eO2r7eO2iAWO2jAWO2iAXO2jAXO2m2XO2m3XO2m2dO2m3dO2o2dO2o3dO2o2ZP2o3ZP2",
    "wo7aO2xo7aO2o2nP2o3nP2p2dO2p3dO2p2ZP2p3ZP2wAdO2xAdO2WBdO2XBdO2Yp7dO2Zp7dO2q2dO2q3dO2q2ZP2q3ZP2q2",
    "nP2q3nP2q2jP2q3jP2r2aP2r3aP2r2mP2r3mP2r2jP2r3jP2eBXO2fBXO2gBeO2hBeO2s2ZO2s3ZO2s2ZP2s3ZP2t2WO2t3W",
    "O2t2XO2t3XO2t2eO2t3eO2t2dO2t3dO2t2ZP2t3ZP2u2dO2u3dO2u2eO2u3eO2v2dO2v3dO2w2YO2w3YO2w2ZP2w3ZP2w2nP",
    "2w3nP2e3nP2q3eO2t3gO2v3gO4-BdOAX2ZP2X3ZP2X2fO2X3fO2Y6XO2Y7XO2Y6WO2Y7WO2Y6fO2Y7fO2Y6ZO2Y7ZO2Wr7YO",
    "2Xr7YO2Y8XO2Z8XO2Y8WO2Z8WO2Y8fO2Z8fO2Y8ZO2Z8ZO2Wr7cO2Xr7cO2b2ZP2b3ZP2b2fO2b3fO2b2ZO2b3ZO2g6XO2g7",
    "XO2g6WO2g7WO2g6fO2g7fO2g6ZO2g7ZO2ur7YO2vr7YO2f2fO2f3fO2f2ZP2f3ZP2l2ZP2l3ZP2l2fO2l3fO2q6XO2q7XO2q",
    "6WO2q7WO2q6fO2q7fO2q6ZO2q7ZO2is7YO2js7YO2WDXO2XDXO2WDWO2XDWO2WDfO2XDfO2WDZO2XDZO2WDZP2XDZP2r2ZP2",
    "r3ZP2r2fO2r3fO2lDXO2mDXO2lDWO2mDWO2lDfO2mDfO2lDZO2mDZO2lDZP2mDZP2v2WO2v3WO2v2ZP2v3ZP2v2fO2v3fO2v",
    "2ZO2v3ZOEnTpO2nTqO2Wu7WO2Xu7WO2Wu7XO2Xu7XO2Wu7YQ2Xu7YQ2nSpO2nSqO2eu7WO2fu7WO2eu7XO2fu7XO2eu7YQ2f",
    "u7YQ2rTpO2rTqO2mu7WO2nu7WO2mu7XO2nu7XO6rSpO2rSqO2uu7WO2vu7WO2uu7XO2vu7XO6tTpO2tTqO2Wv7WO2Xv7WO2W",
    "v7XO2Xv7XO2Wv7YQ2Xv7YQ2tSpO2tSqO2ev7WO2fv7WO2ev7XO2fv7XO2ev7YQ2fv7YQ2vTpO2vTqO2mv7WO2nv7WO2mv7XO",
    "2nv7XO2mv7YQ2nv7YQ2vSpO2vSqO2uv7WO2vv7WO2uv7XO2vv7XO2uv7YQ2vv7YQ2-TpO2-TqO2Ww7WO2Xw7WO2Ww7XO2Xw7",
    "XO6-SpO2-SqO2ew7WO2fw7WO2ew7XO2fw7XO6bUpO2bUqO2mw7WO2nw7WO2mw7XO2nw7XO2mw7YQ2nw7YQ4bTqO4vw7WO4vw",
    "7XO4vw7YQ2fUpO2fUqO2Wx7WO2Xx7WO2Wx7XO2Xx7XO2Wx7YQ2Xx7YQ2fTpO2fTqO2ex7WO2fx7WO2ex7XO2fx7XO2ex7YQ2",
    "fx7YQ2nTWO3iT02rTWO3jT02tTWO3kT02vTWO3lT02-TWO3iU02bUWO3jU02fUWO3kU06Wu7bQ2Xu7bQ2Yu7bQ2Zu7bQ2au7",
    "bQ2bu7bQ2cu7bQ2du7bQ2eu7bQ2fu7bQ2gu7bQ2hu7bQ2iu7bQ2ju7bQ2ku7bQ2lu7bQ2Wv7bQ2Xv7bQ2Yv7bQ2Zv7bQ2av7",
    "bQ2bv7bQ2cv7bQ2dv7bQ2ev7bQ2fv7bQ2gv7bQ2hv7bQ2iv7bQ2jv7bQ2kv7bQ2lv7bQ2Wx7bQ2Xx7bQ2Yx7bQ2Zx7bQ2ax7",
    "bQ2bx7bQ2cx7bQ2dx7bQ2ex7bQ2fx7bQ2gx7bQ2hx7bQ2ix7bQ2jx7bQ2kx7bQ2lx7bQ2nTcO2nTaO2mx7bQ2nTbQ2iTbQ4n",
    "TYQ2sz7bQ2nScO2nSaO2nSWO3cS02nSbQ5vT06e5YQ2qx7bQ2tTbQ2kTbQ4tTYQ2c+7bQ2rSWO3eS02tSWO3fS02tSbQ2-z7",
    "WO2-z7XO2-z7YQ2vTcO2vTaO2gUWO3mS06vTYQ2gUYQ2vScO2vSaO2vSWO3gS04+-7WO2+-7XO2+-7YQ2bUcO2bUaO2hUWO3",
    "mT02XUpO2XUqO2bUYQ2hUYQ2bTcO2bTaO2bTWO3kS02XTqO2e5WO3bS03W306yx7bQ2fUbQ2kUbQ4fUYQ2s-7bQ2-SWO3iS0",
    "2fTWO3lS02fTbQ3q507YW803ZW80hIfT09h203b60+6mi8uP2oi8uPc1qi8uP+1mk8uP2qk8uP2ok8uPg3Zm8uPAem8uP6hm",
    "8uPm1Zn8uP4bn8uPs1yn8uP6Zo8uP6bo8uP4eo8uPk1z1uP4Xp8uPMjo8uP2y1uP2+1uP2ap8uP2bp8uP6op8uP2pp8uP6sp",
    "8uP2tp8uPEwp8uP2xp8uP6Yq8uP2Zq8uP6cq8uP2dq8uPc2Yr8uP2er8uP2fr8uP2hr8uPY3yp8uP2zp8uP2nq8uP2oq8uPE",
    "or8uP2pr8uP2qr8uP2rr8uPv3eWC03fWC0bx3zsAuPWt2hYCvaC4jYCvaC4lYCvaC4nYCvaC4pYCvaC4rYCvaC4tYCvaC4vY",
    "CvaC4xYCvaC4zYCvaC4-YCvaC4XZCvaC6aZCvaC4cZCvaC4eZCvaCElZCvaC2lZCwaC4oZCvaC2oZCwaC4rZCvaC2rZCwaC4",
    "uZCvaC2uZCwaC4xZCvaC2xZCwaCk1cYCvaCKzaCvaCShbCvaC4jbCvaC4lbCvaC4nbCvaC4pbCvaC4rbCvaC4tbCvaC4vbCv",
    "aC4xbCvaC4zbCvaC4-bCvaC4XcCvaC6acCvaC4ccCvaC4ecCvaCElcCvaC2lcCwaC4ocCvaC2ocCwaC4rcCvaC2rcCwaC4uc",
    "CvaC2ucCwaC4xcCvaC2xcCwaCk1cbCvaC6ldCvaC2mdCvaC2ndCvaC2odCvaC8zdCvaCbWa3eYZ103qtP03gsZ103ecZ103n",
    "sR03onJ03b-K03yyd103yyd103ngM03nka103diL03egM03slO03fpT03byV03-nX103wzX103udY103laa103YmQ03xeR03",
    "vcS03++S03zXX103gha103nlc103YqJ03rxK03auQ03xmS03jnX103+md103mgN03h-R03jkX103ahY103fsO03ukW103-WY",
    "103gsN03tuP03ghR03ytS03kca103cyJ03tjK03+sK03acP03psQ03mmS03dtT03XWW103cmX103yoX103llZ103ovb103lx",
    "c103wld103iaU03-hU03WjV03f+W103aua103-pd103ssY103-cM03auN03WZV03+ZW103YpS03gcU03YcZ103ttb103ucM0",
    "3YZN03pmQ03wkR03luR03lfV03tnV03hob103osK03haW103ykK03ikK03ymU03+jV03n-W103rpb103WyY103lsO03YmQ03",
    "+tY103vnJ03d-M03oWO03dyS03mhT03tuK03xdU03-zJ03fzN03jmJ03icR03uhP03YfV03Z+K03+YM03XuT03fYX103grY1",
    "03wzQ03mzZ103eaR03+tO03btW103WzO03bhT03krJ03fhK03fkK03XaQ03ddV03lpW103osY103lka103rtK03YYL03phM0",
    "3itN03bkP03+-R03gfU03jjb103gpc103tqd103ksd103xqK03csP03txQ03YxZ103qpN03miO03WmO03waP03ZvR03fgS03",
    "faT03gkU03qlV03lZW103cvZ103kdX103ZXa103gwa103tmK03ZrK03zbL03ecS03YcY103grY103fsN03r-N03xxO03kzQ0",
    "3+XV03rxS03atJ03vtL03d-M03wjN03yWO03ozS03fZT03wyV03cYW103qna103stb103ewb103uWc103hyJ03kjU03qja10",
    "3urb103XdO03cqJ03wcK03k-M03-XN03viP03YmQ03kkS03YoT03ydX103yZa103jyd103eqP03knb103fqK03xxP03p-P03",
    "XgR03yqR03fWT03vgT03hZU03meV03+Yc103jhK03knO03upb103hXK03veN03glR03gvZ103hyN03agO03tWQ03dyS03cqb",
    "103fnK03lWL03bZN03pmP03kwP03ebQ03bdR03cWT03YlT03vxV03lcY103XdY103ika103Ytb103-vK03wrR03zWL03mkS0",
    "3uaT03wlX103Zrb103tYd103-qd103tyP03hkR03elW103hsU03WvU03oaV03WsS03vaS03uwY103WsJ03svW103wnK03dmK",
    "03crN03psO03scV03byM03+eR03qrP03xvZ103iYY103job103hiY103psN03WgK03WkL07wYM05qpP07+kK03gvS03gsT03",
    "yfU03+gU03bhU03liU03swb103+bV03zzV05omX105utY107uXa103zda109ldc103ydc103efc103qjd103+ca103trb103",
    "kzJ03ddK03jgK03fsK03atK03nwK03ziL03cmL03epL03WYM03ebM03aZN03kZN03qaO03ehO03kiO03olO03lgP03YlP03n",
    "qP03baQ03thR03wmR03YvR03khS03hnS03YXT03naU03+fU03fgU03egU03mgU03sgU03zgU03jiU03kiU03WoU03XqU03W+",
    "U03qlV03fmV03XoV03oxV03bWW103jlW103vpW103vpW103tYX103meY103siY103XuY103vvY103pcZ103eeZ103szZ103u",
    "Xa103Ztb103--b103xXc103rZO03ktm403umW107cnJ03rjK03ehK03WyJ03bgK03WiK03dsK03wtK03ziL03rgL03viL03Y",
    "lL03wYM03pbM03agM03qgM03YpM03evM03osN03vsN03fxN03jzN03ucO03kgO03eeO03kiO03WhO03olO03qnO03a+O03yW",
    "P03oYP03sgP03qpP03tuP03xuP03swP03vxQ03wzQ03XgR03xsR03hsR03YvR03+WS03khS03dzT03rnS03lrS03gvS03nZT",
    "03ceT03xfT03zmT03-mT03gsT03xsT03qtT03gwT03WwT03icU03nrU03W+U03xZV03xgV03qlV03+vV03bWW103owW103l-",
    "W103vxX103XgY103ciY103siY103-rY103utY103hsY103XuY103+tY103jtY103vvY103gyY103eeZ103uvZ103oZa103vi",
    "a103spa103ypb103Ztb103swb103x+b103--b103hWc103xXc103ouc103yyd103gYg403aYg403r+i403zyE03uWG03vXG0",
    "3foq403mct403ps-403Zwd103kyd10f4vk1qj15ol1tj1Nfl1Xk13fl1Yk13fw+1Xk13fw+1Yk13mk1tj13mk1uj13mk1yj1",
    "3nk1yj13ok1yj13pk1yj13qk1yj13rk1yj13sk1yj15uk1yj13vk1yj13wk1yj13xk1yj13yk1yj15+k1yj15Wl1yj13Xl1y",
    "j15Zl1yj13al1yj15cl1yj13dl1yj13el1yj13fl1yj13gl1yj13rk1vj13nk1-j13xk1-j13al1-j1uqAvaa2wba24xaa2w",
    "ba2Ubba2wba2c8nfa2dfa22ofa2dfa2uX1dwa2+va22dwa2twa2+Mvbb2wbb22vbb2mbb24vbb2zbb2uFujb2ljb22vjb2lj",
    "b2wt1rfc2mfc2jYy2tgq3bhq33ugq3bhq33-gq3khq33-gq3lhq33-gq3mhq33-gq3nhq33-gq3ohq3l5vjq3bhq33wjq3bh",
    "q33xjq3khq33yjq3khq33xjq3lhq33yjq3lhq3Xap4znJ03unJ03XoJ03YfW403WxJ03kzJ03xzJ03YWK03wZK03vaK03ddK",
    "03lcK03+aD03wnX403jgK03qgK03ahK03thK03yeX403vbD03dhK03jiK03hgX403tiK03ajK03isJ03ijK03rjK03-ka503",
    "rlK03ZmK03-cD03xnK03coK03opK03tpK03reD03dsK03fsK03atK03wtK03buK03cuK03tuK03fwK03nwK03wwK03pxK03z",
    "xK03-xK03-xK03-xK03inY403mZS03g+K03-+K03ZxY403h-K03n-K03cWL03+aL03uXL03eYL03eZL03YbL03sdL03meL03",
    "pgL03ZhL03aiL03aiL03viL03hjL03pjL03YkL03suL03cmL03tuL03noL03qpL03dmK03kdM03k+L03q-L03jWM03hyL03o",
    "XM03nXM03ibM03adb403odM03tdM03ceM03weM03YfM03YhM03erb403gtb403ilM03xmM03dnM03ukM03cpM03ktD03ytD0",
    "3euM03+vM03+vM03ekc403Z+M03u+M03d-M03p-M03uuc403--M03cWN03pwN03YXN03XyD03WZN03kZN03WcN03jaN03ald",
    "403ZgN03cld403khN03hhN03yhN03XlN03YlN03lXE03zlN03enN03znN03fpN03YZE03Zie403yZE03mrN03prN03srN03g",
    "sN03oye503+tN03nve403nve403XmW103YvN03YvN03dcE03uri403wku403YxN03hxN03ZdE03wyN03j+N03t+N03v-N03X",
    "aO03wfE03yeE03qaO03qsf403dcO03egO03igO03kgO03igO03whO03kiO03ojO03ajO03ljO03+kO03olO03slO03mmO03x",
    "mO03zoO03nrO03qsO03mwO03iug403zvO03ytO03exO03ZyO03a-O03n-g403YXP03b+O03fzO03knE03fZP03+ZP03zaP03",
    "tZP03ipE03lgP03ihP03gWi403ZlP03utP03foP03vuE03nqP03euE03atE03oiK03riK03WuP03yqP03jbW103v+G03tuP0",
    "3xuP03XvP03+wP03pwP03Z+i403fwE03w-P03byP03oYQ03baQ03jZj403kaQ03-WQ03qeQ03zyE03YgQ03ZjQ03glQ03erQ",
    "03Zrj403xsQ03uWF03XvQ03dbk403qwQ03kYF03oxQ03-yQ03wzQ03xzQ03jqk403hed403wtk403kYR03ybl403-bR03jcR",
    "03dZR03seR03+fR03thR03XgR03fhR03uhR03biR03+el403qfR03lnR03kpR03pfF03hsR03dsR03nsl403vlR03kxR03+w",
    "l403kyl403c+R03vXS03+WS03xWS03siF03gYS03zZS03tZS03jbS03bfX403bgS03Zpm403yiS03hzm403enS03rnS03moS",
    "03emn403WqS03rqS03rvn403qWo403wxS03hyS03irF03bzS03urF03urF03dYT03yYT03nZT03baT03gcT03xuF03afT03s",
    "Xp403+fT03oap403mhT03-ie403mmT03Xzp403uzp403aYq403y-F03eWG03qtT03pdq403odq403veq403pfq403+uT03-u",
    "T03-uT03gwT03vXG03hyT03cYG03saG03zWr403kYU03iaU03icU03ZdG03cnr403sgU03wqr403bsr403liU03hlU03lfG0",
    "3WoU03goU03loU03yhs403drs403drs403ktU03YmG03hzs403c+U03f+U03dnG03Wat403ocV03WrG03edV03ZdV03WeV03",
    "cyt403ZhV03XuG03dkV03YmV03boV03qvG03enu403dou403vwG03vsu403wxV03+vu403ryV03w-V03bWW103wcv403Zfv4",
    "03WZW103ejv403mZW103-wi403r+G03obW103ZeW103hWH03+fW103rrM03dzv403rzv403pyi403yyi403XmW103amW103+",
    "yZ103hZH03nqW103hqW103zqW103prK03nrW103prW103zrW103ctW103yvw403btW103zuW103ZxW103jzW103ZvW103zzW",
    "103d-W103tYX103pwW103g+W103i+W103y+W103sXx403hhx403rcx403hfH03ndX103pdX103seX103g+y403ahX103ivx4",
    "03zgH03XhH03nzx403ocy403hhH03moX103yoX103dpX103fpX103frX103eqX103kuX103YtX103vxX103evX103hxX103c",
    "yX103tkH03X-X103XWY103vlH03WZY103ZZY103dpz403tcY103+cY103rnH03wdY103xbD03kb+403ch+403+rH03dsH03W",
    "rY103jtY103gyY103rYZ103eb-403hbZ103XcZ103xeZ103thZ103lv-403aWY403hkZ103yjZ103mlZ103+cY403qsZ103u",
    "vZ103okX503jlX503qaa103nda103nea103kvX503xea103una103tsa103usa103ypa103v-a103rWb103w-Y503hib103r",
    "iI03tjb103thZ503clI03Zsb103ojN03Zvb103bga503wma503kpI03spI03W-b103gWb503orI03sab503hWc103hWc103f",
    "Xc103sjb503Ydc103pvI03ffc103djc103Ykc103+lc103k+I03mvc503ouc103WYd103zdd103kcJ03jdJ03dhd103kce50",
    "3udJ03bee503kme503nqe503xrd103sgJ03vtd103+td103bud103lud103sud103xvd103Wmf50",
};
static const char *const k_udecomp = (const char *)&k_udecomp_rows;
/* END GENERATED UNICODE TABLES */

typedef struct moe_vocab moe_vocab;

/* ---- Unicode: classes for the split regexes, NFC ---------------------------------------------
   The tables above are decoded once (pthread_once) into arrays; the Basic Multilingual Plane
   gets a direct 64 KiB class table, astral code points a binary search. Bytes that are not
   valid UTF-8 are carried as pseudo code points 0x110000 + byte: class "other", never
   normalized, written back as the same byte, so every input round-trips. */
enum { UC_OTHER = 0, UC_UPPER = 1, UC_LOWER = 2, UC_OLETTER = 3, UC_MARK = 4, UC_NUMBER = 5, UC_SPACE = 6 };
#define UC_BAD_BASE 0x110000u

static uint8_t g_uc_bmp[0x10000];
static uint32_t *g_uc_astral_start;   /* class ranges above the BMP */
static uint8_t *g_uc_astral_cls;
static int g_uc_astral_n;
static uint32_t *g_un_start;          /* normalization ranges: qc << 8 | ccc */
static uint16_t *g_un_val;
static int g_un_n;
static uint32_t *g_ud;                /* decompositions: cp, first, second|flag (sorted by cp) */
static uint64_t *g_uc_comp;           /* sorted (first << 21 | second) << 21 | composite */
static uint8_t g_un_bmp[0x10000 / 8];  /* BMP code points with a non-zero NFC_QC or ccc */
static int g_uc_comp_n;
static int g_uc_ok;
static pthread_once_t g_uc_once = PTHREAD_ONCE_INIT;

static const char *uc_varint(const char *p, uint32_t *v) {
    uint32_t x = 0;
    int shift = 0;
    for (;;) {
        const char *d = strchr(K_DIGITS, *p++);
        uint32_t k = d ? (uint32_t)(d - K_DIGITS) : 0;
        if (k < 32) { *v = x | k << shift; return p; }
        x |= (k - 32) << shift;
        shift += 5;
    }
}

static int cmp_u64(const void *a, const void *b) {
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

static void uc_init(void) {
    uint32_t *start = moe_malloc(K_UCAT_N * sizeof *start);
    uint8_t *cls = moe_malloc(K_UCAT_N);
    g_un_start = moe_malloc(K_UNORM_N * sizeof *g_un_start);
    g_un_val = moe_malloc(K_UNORM_N * sizeof *g_un_val);
    g_ud = moe_malloc(3 * K_UDECOMP_N * sizeof *g_ud);
    g_uc_comp = moe_malloc(K_UDECOMP_N * sizeof *g_uc_comp);
    if (!start || !cls || !g_un_start || !g_un_val || !g_ud || !g_uc_comp) {
        moe_free(start); moe_free(cls);
        return; /* g_uc_ok stays 0: callers report out of memory */
    }
    const char *p = k_ucat;
    uint32_t s = 0, v;
    for (int i = 0; i < K_UCAT_N; i++) {
        p = uc_varint(p, &v);
        s += v >> 4;
        start[i] = s;
        cls[i] = (uint8_t)(v & 15);
    }
    int first_astral = K_UCAT_N;
    for (int i = 0; i < K_UCAT_N; i++) {
        uint32_t end = i + 1 < K_UCAT_N ? start[i + 1] : 0x110000;
        for (uint32_t c = start[i]; c < end && c < 0x10000; c++)
            g_uc_bmp[c] = cls[i] == 7 ? (c % 2 ? UC_LOWER : UC_UPPER) : cls[i] == 8 ? (c % 2 ? UC_UPPER : UC_LOWER) : cls[i];
        if (end > 0x10000 && first_astral == K_UCAT_N) first_astral = i;
    }
    /* keep the astral part (the range containing 0x10000 onward) */
    g_uc_astral_n = K_UCAT_N - first_astral;
    memmove(start, start + first_astral, (size_t)g_uc_astral_n * sizeof *start);
    memmove(cls, cls + first_astral, (size_t)g_uc_astral_n);
    g_uc_astral_start = start;
    g_uc_astral_cls = cls;
    p = k_unorm;
    s = 0;
    for (int i = 0; i < K_UNORM_N; i++) {
        p = uc_varint(p, &v);
        s += v >> 10;
        g_un_start[i] = s;
        g_un_val[i] = (uint16_t)(v & 1023);
    }
    g_un_n = K_UNORM_N;
    for (int i = 0; i < K_UNORM_N; i++) {
        uint32_t end = i + 1 < K_UNORM_N ? g_un_start[i + 1] : 0x110000;
        for (uint32_t c = g_un_start[i]; g_un_val[i] && c < end && c < 0x10000; c++) g_un_bmp[c >> 3] |= (uint8_t)(1u << (c & 7));
    }
    p = k_udecomp;
    s = 0;
    for (int i = 0; i < K_UDECOMP_N; i++) {
        uint32_t a, b;
        p = uc_varint(p, &v);
        p = uc_varint(p, &a);
        p = uc_varint(p, &b);
        s += v >> 1;
        g_ud[3 * i] = s;
        g_ud[3 * i + 1] = a;
        g_ud[3 * i + 2] = b | (v & 1u) << 31;
        if (!(v & 1) && b) g_uc_comp[g_uc_comp_n++] = ((uint64_t)a << 21 | b) << 21 | s;
    }
    qsort(g_uc_comp, (size_t)g_uc_comp_n, sizeof *g_uc_comp, cmp_u64);
    g_uc_ok = 1;
}

static int uc_ready(void) {
    pthread_once(&g_uc_once, uc_init);
    return g_uc_ok;
}

static inline int uc_class(uint32_t c) {
    if (c < 0x10000) return g_uc_bmp[c];
    if (c >= UC_BAD_BASE) return UC_OTHER;
    int lo = 0, hi = g_uc_astral_n - 1;
    while (lo < hi) {
        int mid = (lo + hi + 1) / 2;
        if (g_uc_astral_start[mid] <= c) lo = mid; else hi = mid - 1;
    }
    int k = g_uc_astral_cls[lo];
    return k == 7 ? (c % 2 ? UC_LOWER : UC_UPPER) : k == 8 ? (c % 2 ? UC_UPPER : UC_LOWER) : k;
}

static uint16_t uc_norm(uint32_t c) { /* NFC_QC << 8 | ccc */
    if (c < 0x300 || c >= UC_BAD_BASE) return 0;
    if (c < 0x10000 && !(g_un_bmp[c >> 3] & (1u << (c & 7)))) return 0;
    int lo = 0, hi = g_un_n - 1;
    while (lo < hi) {
        int mid = (lo + hi + 1) / 2;
        if (g_un_start[mid] <= c) lo = mid; else hi = mid - 1;
    }
    return g_un_val[lo];
}

/* Decodes one code point at s (n > 0 bytes left); invalid bytes give UC_BAD_BASE + byte, length 1. */
static inline uint32_t utf8_next(const uint8_t *s, size_t n, int *len) {
    uint8_t c = s[0];
    if (c < 0x80) { *len = 1; return c; }
    int l = utf8_valid_len(s, n);
    if (!l) { *len = 1; return UC_BAD_BASE + c; }
    *len = l;
    if (l == 2) return (uint32_t)(c & 0x1F) << 6 | (s[1] & 0x3F);
    if (l == 3) return (uint32_t)(c & 0x0F) << 12 | (uint32_t)(s[1] & 0x3F) << 6 | (s[2] & 0x3F);
    return (uint32_t)(c & 0x07) << 18 | (uint32_t)(s[1] & 0x3F) << 12 | (uint32_t)(s[2] & 0x3F) << 6 | (s[3] & 0x3F);
}

static inline int utf8_put(uint32_t c, uint8_t *o) {
    if (c >= UC_BAD_BASE) { o[0] = (uint8_t)(c - UC_BAD_BASE); return 1; }
    if (c < 0x80) { o[0] = (uint8_t)c; return 1; }
    if (c < 0x800) { o[0] = (uint8_t)(0xC0 | c >> 6); o[1] = (uint8_t)(0x80 | (c & 63)); return 2; }
    if (c < 0x10000) {
        o[0] = (uint8_t)(0xE0 | c >> 12); o[1] = (uint8_t)(0x80 | (c >> 6 & 63)); o[2] = (uint8_t)(0x80 | (c & 63));
        return 3;
    }
    o[0] = (uint8_t)(0xF0 | c >> 18); o[1] = (uint8_t)(0x80 | (c >> 12 & 63));
    o[2] = (uint8_t)(0x80 | (c >> 6 & 63)); o[3] = (uint8_t)(0x80 | (c & 63));
    return 4;
}

enum { HANGUL_S = 0xAC00, HANGUL_L = 0x1100, HANGUL_V = 0x1161, HANGUL_T = 0x11A7, HANGUL_NV = 21, HANGUL_NT = 28,
       HANGUL_N = 588, HANGUL_SCOUNT = 11172 };

static const uint32_t *uc_decomp_entry(uint32_t c) {
    int lo = 0, hi = K_UDECOMP_N - 1;
    while (lo <= hi) {
        int mid = (lo + hi) / 2;
        uint32_t m = g_ud[3 * mid];
        if (m == c) return &g_ud[3 * mid];
        if (m < c) lo = mid + 1; else hi = mid - 1;
    }
    return NULL;
}

/* Full canonical decomposition of c appended to out; returns the count (at most 4 per level). */
static int uc_decompose(uint32_t c, uint32_t *out, int depth) {
    if (c >= HANGUL_S && c < HANGUL_S + HANGUL_SCOUNT) {
        uint32_t si = c - HANGUL_S;
        out[0] = HANGUL_L + si / HANGUL_N;
        out[1] = HANGUL_V + (si % HANGUL_N) / HANGUL_NT;
        if (si % HANGUL_NT) { out[2] = HANGUL_T + si % HANGUL_NT; return 3; }
        return 2;
    }
    const uint32_t *e = c >= 0xC0 && c < UC_BAD_BASE && depth < 8 ? uc_decomp_entry(c) : NULL;
    if (!e) { out[0] = c; return 1; }
    int n = uc_decompose(e[1], out, depth + 1);
    uint32_t second = e[2] & 0x7FFFFFFFu;
    if (second) n += uc_decompose(second, out + n, depth + 1);
    return n;
}

static uint32_t uc_compose(uint32_t a, uint32_t b) {
    if (a >= HANGUL_L && a < HANGUL_L + 19 && b >= HANGUL_V && b < HANGUL_V + HANGUL_NV)
        return HANGUL_S + ((a - HANGUL_L) * HANGUL_NV + (b - HANGUL_V)) * HANGUL_NT;
    if (a >= HANGUL_S && a < HANGUL_S + HANGUL_SCOUNT && (a - HANGUL_S) % HANGUL_NT == 0 && b > HANGUL_T &&
        b < HANGUL_T + HANGUL_NT)
        return a + (b - HANGUL_T);
    uint64_t key = (uint64_t)a << 21 | b;
    int lo = 0, hi = g_uc_comp_n - 1;
    while (lo <= hi) {
        int mid = (lo + hi) / 2;
        uint64_t k = g_uc_comp[mid] >> 21;
        if (k == key) return (uint32_t)(g_uc_comp[mid] & 0x1FFFFF);
        if (k < key) lo = mid + 1; else hi = mid - 1;
    }
    return 0;
}

static size_t nfc(const uint8_t *s, size_t n, uint8_t *out, uint32_t *cps);

/* NFC of s[0..n) into out, normalizing only the stretches that need it: a starter whose NFC_QC
   is Yes cannot combine with anything before it, so the text between two such boundaries can
   be normalized on its own. Returns 0 (and writes nothing) when s is already NFC. */
static size_t nfc_spans(const uint8_t *s, size_t n, uint8_t *out, uint32_t *cps, int *changed) {
    size_t o = 0, copied = 0, safe = 0;
    int last_ccc = 0;
    *changed = 0;
    for (size_t i = 0; i < n;) {
        if (s[i] < 0x80) { safe = i; last_ccc = 0; i++; continue; }
        int l;
        uint32_t c = utf8_next(s + i, n - i, &l);
        uint16_t v = uc_norm(c);
        int ccc = v & 255;
        if (!(v >> 8) && !(ccc && last_ccc > ccc)) {
            if (!v) safe = i;
            last_ccc = ccc;
            i += (size_t)l;
            continue;
        }
        size_t q = i + (size_t)l; /* the stretch runs to the next safe boundary */
        while (q < n) {
            if (s[q] < 0x80) break;
            int l2;
            uint32_t c2 = utf8_next(s + q, n - q, &l2);
            if (!uc_norm(c2)) break;
            q += (size_t)l2;
        }
        memcpy(out + o, s + copied, safe - copied);
        o += safe - copied;
        o += nfc(s + safe, q - safe, out + o, cps);
        copied = safe = i = q;
        last_ccc = 0;
        *changed = 1;
    }
    if (!*changed) return 0;
    memcpy(out + o, s + copied, n - copied);
    return o + n - copied;
}

/* NFC of s[0..n) into out (capacity >= 3 n + 4); cps: scratch of 3 n + 4 code points (full
   decomposition yields at most 1.5 code points per UTF-8 byte). */
static size_t nfc(const uint8_t *s, size_t n, uint8_t *out, uint32_t *cps) {
    size_t m = 0;
    for (size_t i = 0; i < n;) { /* decompose */
        int l;
        uint32_t c = utf8_next(s + i, n - i, &l);
        i += (size_t)l;
        m += (size_t)uc_decompose(c, cps + m, 0);
    }
    for (size_t i = 0; i < m;) { /* canonical order: stable sort of each run of non-starters */
        if (!(uc_norm(cps[i]) & 255)) { i++; continue; }
        size_t j = i;
        while (j < m && (uc_norm(cps[j]) & 255)) j++;
        for (size_t a = i + 1; a < j; a++) {
            uint32_t x = cps[a];
            int cx = uc_norm(x) & 255;
            size_t b = a;
            while (b > i && (uc_norm(cps[b - 1]) & 255) > cx) { cps[b] = cps[b - 1]; b--; }
            cps[b] = x;
        }
        i = j;
    }
    /* compose (the reference algorithm of UAX #15) */
    size_t w = 0;
    ptrdiff_t sp = -1;  /* last starter in the output */
    int last = 256;     /* class of the last character kept after it */
    for (size_t i = 0; i < m; i++) {
        uint32_t c = cps[i];
        int ccc = uc_norm(c) & 255;
        if (sp >= 0) {
            uint32_t comp = uc_compose(cps[sp], c);
            if (comp && (last < ccc || last == 0)) {
                cps[sp] = comp;
                continue;
            }
        }
        if (ccc == 0) sp = (ptrdiff_t)w;
        last = ccc;
        cps[w++] = c;
    }
    size_t o = 0;
    for (size_t i = 0; i < w; i++) o += (size_t)utf8_put(cps[i], out + o);
    return o;
}

/* ---- vocabulary -------------------------------------------------------------------------------
   One engine covers both families: BPE over token ids with a (left, right) -> (rank, result)
   merge table, lowest rank first and leftmost among equals (what Hugging Face `tokenizers`
   does). Byte-level vocabularies (GGUF "gpt2") start from one token per byte; SentencePiece-style
   ones (GGUF "llama", Gemma) start from one token per character with <0xXX> byte fallback and
   see spaces as U+2581. GGUF "llama" vocabularies that carry scores and no merges get their merge
   table derived from the scores the way the Hugging Face converter derives it. */
enum { TT_NORMAL = 1, TT_UNKNOWN = 2, TT_CONTROL = 3, TT_USER = 4, TT_UNUSED = 5, TT_BYTE = 6 }; /* GGUF token types */
enum { VK_BYTES = 1, VK_SPM = 2 };
enum { PRE_NONE = 0, PRE_GPT2, PRE_LLAMA3, PRE_QWEN2, PRE_O200K };
enum { CHAT_UNKNOWN = 0, CHAT_CHATML, CHAT_QWEN3, CHAT_GEMMA, CHAT_HARMONY, CHAT_GEMMA4 };
enum { CHATF_G4_EMPTY_THOUGHT = 1, CHATF_G4_CONTINUE = 2 }; /* Gemma 4 template revisions, see chat_gemma4 */
enum { TF_SELF = 1, TF_SPECIAL = 2, TF_ADDED = 4, TF_LSTRIP = 8, TF_RSTRIP = 16, TF_SINGLE_WORD = 32, TF_EOG = 64 };

typedef struct vocab_token {
    uint32_t text, text_len;    /* the token as stored in the file (byte-level or U+2581 form) */
    uint32_t piece, piece_len;  /* the bytes it stands for in text */
    float score;
    uint8_t type;               /* TT_* */
    uint8_t flags;              /* TF_* */
} vocab_token;

typedef struct merge_slot { uint64_t key; uint32_t rank; int32_t id; } merge_slot;
typedef struct trie_node { int32_t child, next, token; uint8_t byte; } trie_node;

struct moe_vocab {
    int32_t n_tokens, kind, pre, nfc, add_space_prefix, byte_fallback, ignore_merges, chat, chat_flags;
    int32_t gguf_gemma4;        /* tokenizer.ggml.model "gemma4" (llama.cpp's converter for Gemma 4) */
    int32_t bos, eos, eot, eom, unk, pad, add_bos, add_eos;
    int32_t prefix[4], n_prefix, suffix[4], n_suffix;   /* what MOE_TOKENIZE_ADD_SPECIAL adds */
    vocab_token *tok;
    uint8_t *blob;
    size_t blob_len, blob_cap;
    uint64_t *hash;             /* open addressing: fingerprint << 32 | token id, by lookup key (piece or text) */
    uint32_t hash_mask;
    merge_slot *merges;
    uint32_t merge_mask, n_merges;
    uint64_t *merge_filter;     /* one bit per hash of a (left, right) pair: 0 = certainly no merge */
    uint32_t filter_mask;
    int32_t byte_tok[256];      /* byte-level: the token of each byte; SPM: <0xXX> (or -1) */
    int32_t *char_tok;          /* SPM: the token of each BMP character (-1: none), to skip hashing */
    trie_node *trie;            /* added tokens, for matching them in text */
    int32_t n_trie, cap_trie;
    uint8_t first_byte[32];     /* bitmap: bytes that can start an added token */
    char *template_text;        /* chat template from the metadata, if any */
    char arch[32];
    char unsupported[160];      /* set when the metadata names a tokenizer we do not implement */
};

static void vocab_free(moe_vocab *v) {
    if (!v) return;
    moe_free(v->tok);
    moe_free(v->blob);
    moe_free(v->hash);
    moe_free(v->merges);
    moe_free(v->merge_filter);
    moe_free(v->char_tok);
    moe_free(v->trie);
    moe_free(v->template_text);
    moe_free(v);
}

static const uint8_t *tok_text(const moe_vocab *v, int32_t id) { return v->blob + v->tok[id].text; }
static const uint8_t *tok_piece(const moe_vocab *v, int32_t id) { return v->blob + v->tok[id].piece; }

static uint64_t hash_bytes(const uint8_t *p, size_t n) {
    uint64_t h = 0x9E3779B97F4A7C15ull ^ (n * 0xff51afd7ed558ccdull);
    while (n >= 8) {
        uint64_t x;
        memcpy(&x, p, 8);
        h = (h ^ x) * 0xff51afd7ed558ccdull;
        h ^= h >> 32;
        p += 8;
        n -= 8;
    }
    uint64_t x = 0;
    for (size_t i = 0; i < n; i++) x |= (uint64_t)p[i] << (8 * i);
    h = (h ^ x) * 0xc4ceb9fe1a85ec53ull;
    return h ^ (h >> 29);
}

static moe_status blob_add(moe_vocab *v, const void *p, size_t n, uint32_t *off) {
    if (v->blob_len + n > v->blob_cap) {
        size_t cap = v->blob_cap ? v->blob_cap : 1 << 16;
        while (cap < v->blob_len + n) cap *= 2;
        if (cap > UINT32_MAX) return set_error(MOE_ERR_FORMAT, "tokenizer: token strings exceed 4 GiB");
        uint8_t *nb = moe_malloc(cap);
        if (!nb) return set_error(MOE_ERR_NO_MEMORY, "tokenizer: out of memory for token strings");
        if (v->blob_len) memcpy(nb, v->blob, v->blob_len);
        moe_free(v->blob);
        v->blob = nb;
        v->blob_cap = cap;
    }
    if (n) memcpy(v->blob + v->blob_len, p, n);
    *off = (uint32_t)v->blob_len;
    v->blob_len += n;
    return MOE_OK;
}

/* The key that BPE looks tokens up by: raw bytes for byte-level vocabularies, text for SPM. */
static const uint8_t *tok_key(const moe_vocab *v, int32_t id, uint32_t *len) {
    if (v->kind == VK_BYTES) { *len = v->tok[id].piece_len; return tok_piece(v, id); }
    *len = v->tok[id].text_len;
    return tok_text(v, id);
}

#define HASH_EMPTY UINT64_MAX

static int32_t vocab_find(const moe_vocab *v, const uint8_t *key, size_t n) {
    if (!v->hash) return -1;
    uint64_t h = hash_bytes(key, n);
    uint32_t fp = (uint32_t)(h >> 32), i = (uint32_t)h & v->hash_mask;
    for (;; i = (i + 1) & v->hash_mask) {
        uint64_t e = v->hash[i];
        if (e == HASH_EMPTY) return -1;
        if ((uint32_t)(e >> 32) != fp) continue;
        int32_t id = (int32_t)(uint32_t)e;
        uint32_t kl;
        const uint8_t *k = tok_key(v, id, &kl);
        if (kl == n && memcmp(k, key, n) == 0) return id;
    }
}

/* Tokens BPE can produce or look up: not control tokens, and for byte-level vocabularies not
   added ones either (Hugging Face keeps those outside the model's vocabulary). */
static int tok_in_model(const moe_vocab *v, int32_t id) {
    int t = v->tok[id].type;
    if (t == TT_CONTROL || (v->tok[id].flags & TF_ADDED && v->kind == VK_BYTES)) return 0;
    return t != TT_USER || v->kind == VK_SPM;
}

static moe_status vocab_build_hash(moe_vocab *v) {
    uint32_t size = 1024;
    while (size < (uint32_t)v->n_tokens * 2u) size *= 2;
    v->hash = moe_malloc(size * sizeof *v->hash);
    if (!v->hash) return set_error(MOE_ERR_NO_MEMORY, "tokenizer: out of memory for the token table");
    for (uint32_t i = 0; i < size; i++) v->hash[i] = HASH_EMPTY;
    v->hash_mask = size - 1;
    for (int32_t id = 0; id < v->n_tokens; id++) {
        if (!tok_in_model(v, id)) continue;
        uint32_t kl;
        const uint8_t *k = tok_key(v, id, &kl);
        if (kl == 0) continue;
        if (vocab_find(v, k, kl) >= 0) continue; /* duplicate strings: the first id wins */
        uint64_t h = hash_bytes(k, kl);
        uint32_t i = (uint32_t)h & v->hash_mask;
        while (v->hash[i] != HASH_EMPTY) i = (i + 1) & v->hash_mask;
        v->hash[i] = (h >> 32) << 32 | (uint32_t)id;
    }
    return MOE_OK;
}

static moe_status merges_alloc(moe_vocab *v, uint32_t n) {
    uint32_t size = 1024;
    while (size < n + n / 2 + 2) {
        if (size >= (1u << 30)) return set_error(MOE_ERR_FORMAT, "tokenizer: too many merges (%u)", n);
        size *= 2;
    }
    v->merges = moe_malloc((size_t)size * sizeof *v->merges);
    if (!v->merges) return set_error(MOE_ERR_NO_MEMORY, "tokenizer: out of memory for %u merges", n);
    for (uint32_t i = 0; i < size; i++) v->merges[i].key = UINT64_MAX;
    v->merge_mask = size - 1;
    uint32_t bits = 1u << 16;
    while (bits < n * 8u && bits < (1u << 30)) bits *= 2;
    v->merge_filter = moe_calloc(bits / 64, sizeof *v->merge_filter);
    if (!v->merge_filter) return set_error(MOE_ERR_NO_MEMORY, "tokenizer: out of memory for %u merges", n);
    v->filter_mask = bits - 1;
    return MOE_OK;
}

static inline uint32_t merge_hash(uint64_t key) { return (uint32_t)((key * 0x9E3779B97F4A7C15ull) >> 32); }

/* Later duplicates replace earlier ones (as in Hugging Face, whose map keeps the last). */
static void merge_put(moe_vocab *v, int32_t a, int32_t b, uint32_t rank, int32_t id) {
    uint64_t key = (uint64_t)(uint32_t)a << 32 | (uint32_t)b;
    uint32_t i = merge_hash(key) & v->merge_mask;
    while (v->merges[i].key != UINT64_MAX && v->merges[i].key != key) i = (i + 1) & v->merge_mask;
    if (v->merges[i].key == UINT64_MAX) v->n_merges++;
    uint32_t f = (uint32_t)((key * 0xC2B2AE3D27D4EB4Full) >> 32) & v->filter_mask;
    v->merge_filter[f >> 6] |= 1ull << (f & 63);
    v->merges[i].key = key;
    v->merges[i].rank = rank;
    v->merges[i].id = id;
}

static inline const merge_slot *merge_get(const moe_vocab *v, int32_t a, int32_t b) {
    uint64_t key = (uint64_t)(uint32_t)a << 32 | (uint32_t)b;
    uint32_t f = (uint32_t)((key * 0xC2B2AE3D27D4EB4Full) >> 32) & v->filter_mask;
    if (!(v->merge_filter[f >> 6] >> (f & 63) & 1)) return NULL;
    uint32_t i = merge_hash(key) & v->merge_mask;
    for (;; i = (i + 1) & v->merge_mask) {
        const merge_slot *s = &v->merges[i];
        if (s->key == key) return s;
        if (s->key == UINT64_MAX) return NULL;
    }
}

/* Adds a merge given as the two token strings (as stored: byte-level or U+2581 form). */
static moe_status merge_add_text(moe_vocab *v, const uint8_t *a, size_t na, const uint8_t *b, size_t nb, uint32_t rank,
                                 int32_t *text_index /* hash over text */, uint32_t text_mask) {
    int32_t ids[3] = {-1, -1, -1};
    uint8_t small[256], *buf = na + nb <= sizeof small ? small : moe_malloc(na + nb);
    if (!buf) return set_error(MOE_ERR_NO_MEMORY, "tokenizer: out of memory");
    const uint8_t *keys[3] = {a, b, buf};
    size_t lens[3] = {na, nb, na + nb};
    memcpy(buf, a, na);
    memcpy(buf + na, b, nb);
    for (int k = 0; k < 3; k++) {
        uint32_t i = (uint32_t)hash_bytes(keys[k], lens[k]) & text_mask;
        for (;; i = (i + 1) & text_mask) {
            int32_t id = text_index[i];
            if (id < 0) break;
            if (v->tok[id].text_len == lens[k] && memcmp(tok_text(v, id), keys[k], lens[k]) == 0) { ids[k] = id; break; }
        }
        if (ids[k] < 0) { /* Hugging Face refuses such a file; so do we */
            if (buf != small) moe_free(buf);
            return set_error(MOE_ERR_FORMAT, "tokenizer: merge %u ('%.*s' + '%.*s') names a token missing from the vocabulary",
                             rank, (int)(na > 40 ? 40 : na), (const char *)a, (int)(nb > 40 ? 40 : nb), (const char *)b);
        }
    }
    if (buf != small) moe_free(buf);
    merge_put(v, ids[0], ids[1], rank, ids[2]);
    return MOE_OK;
}

/* A hash of token ids by their stored text (for resolving merges and added tokens). */
static int32_t *text_index_build(const moe_vocab *v, uint32_t *mask_out) {
    uint32_t size = 1024;
    while (size < (uint32_t)v->n_tokens * 2u) size *= 2;
    int32_t *t = moe_malloc(size * sizeof *t);
    if (!t) return NULL;
    memset(t, 0xFF, size * sizeof *t);
    for (int32_t id = 0; id < v->n_tokens; id++) {
        const vocab_token *x = &v->tok[id];
        if (x->type == TT_UNUSED && x->text_len == 0) continue;
        uint32_t i = (uint32_t)hash_bytes(tok_text(v, id), x->text_len) & (size - 1);
        int dup = 0;
        for (; t[i] >= 0; i = (i + 1) & (size - 1)) {
            const vocab_token *y = &v->tok[t[i]];
            if (y->text_len == x->text_len && memcmp(tok_text(v, t[i]), tok_text(v, id), x->text_len) == 0) {
                /* prefer the model's own token over an added one with the same text */
                if ((y->flags & TF_ADDED) && !(x->flags & TF_ADDED)) t[i] = id;
                dup = 1;
                break;
            }
        }
        if (!dup) t[i] = id;
    }
    *mask_out = size - 1;
    return t;
}

/* ---- byte-level mapping (GPT-2): bytes <-> printable code points ------------------------------ */
static uint32_t g_byte_to_cp[256];
static int16_t g_cp_to_byte[324];   /* inverse, for code points < 324 */
static pthread_once_t g_bytemap_once = PTHREAD_ONCE_INIT;

static void bytemap_init(void) {
    int n = 0;
    for (int i = 0; i < 324; i++) g_cp_to_byte[i] = -1;
    for (int b = 0; b < 256; b++) {
        int keep = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE);
        g_byte_to_cp[b] = keep ? (uint32_t)b : (uint32_t)(256 + n++);
        g_cp_to_byte[g_byte_to_cp[b]] = (int16_t)b;
    }
}

/* Decodes a byte-level token text into raw bytes (out: capacity >= n). Characters outside the
   mapping are kept as their UTF-8 (added tokens are stored that way). */
static size_t bytelevel_decode(const uint8_t *s, size_t n, uint8_t *out) {
    size_t o = 0;
    for (size_t i = 0; i < n;) {
        int l;
        uint32_t c = utf8_next(s + i, n - i, &l);
        if (c < 324 && g_cp_to_byte[c] >= 0) out[o++] = (uint8_t)g_cp_to_byte[c];
        else { memcpy(out + o, s + i, (size_t)l); o += (size_t)l; }
        i += (size_t)l;
    }
    return o;
}

/* ---- BPE -------------------------------------------------------------------------------------- */
static int g_bpe_small_max = 48;    /* words up to this many symbols use the quadratic loop (tests lower it) */

typedef struct bpe_heap_item { uint32_t rank, pos; int32_t id; } bpe_heap_item;

typedef struct tok_scratch {        /* per-call working memory, sized by the text */
    int32_t *ids;
    uint32_t *rank;
    int32_t *nid;
    int32_t *prev, *next;           /* for the heap path: grown to the longest word seen */
    bpe_heap_item *heap;
    size_t heap_cap;                /* symbols prev/next/heap can take */
    size_t cap;                     /* text bytes */
    uint8_t *norm;                  /* normalized text */
    uint32_t *cps;                  /* code points (NFC scratch, splitting) */
    uint8_t *cls;
    uint32_t *off;
} tok_scratch;

static inline int heap_less(const bpe_heap_item *a, const bpe_heap_item *b) {
    return a->rank < b->rank || (a->rank == b->rank && a->pos < b->pos);
}

static void heap_push(bpe_heap_item *h, size_t *n, bpe_heap_item x) {
    size_t i = (*n)++;
    while (i > 0) {
        size_t p = (i - 1) / 2;
        if (!heap_less(&x, &h[p])) break;
        h[i] = h[p];
        i = p;
    }
    h[i] = x;
}

static bpe_heap_item heap_pop(bpe_heap_item *h, size_t *n) {
    bpe_heap_item top = h[0], x = h[--(*n)];
    size_t i = 0;
    for (;;) {
        size_t c = 2 * i + 1;
        if (c >= *n) break;
        if (c + 1 < *n && heap_less(&h[c + 1], &h[c])) c++;
        if (!heap_less(&h[c], &x)) break;
        h[i] = h[c];
        i = c;
    }
    if (*n) h[i] = x;
    return top;
}

/* Merges ids[0..n) in place; returns the new count. */
static int bpe_merge(const moe_vocab *v, tok_scratch *sc, int32_t *ids, int n) {
    if (n < 2 || !v->merges) return n;
    if (n <= g_bpe_small_max) {
        uint32_t *rank = sc->rank;
        int32_t *nid = sc->nid;
        for (int i = 0; i + 1 < n; i++) {
            const merge_slot *m = merge_get(v, ids[i], ids[i + 1]);
            rank[i] = m ? m->rank : UINT32_MAX;
            nid[i] = m ? m->id : -1;
        }
        for (;;) {
            int best = -1;
            uint32_t br = UINT32_MAX;
            for (int i = 0; i + 1 < n; i++)
                if (rank[i] < br) { br = rank[i]; best = i; }
            if (best < 0) break;
            ids[best] = nid[best];
            for (int i = best + 1; i + 1 < n; i++) { ids[i] = ids[i + 1]; rank[i] = rank[i + 1]; nid[i] = nid[i + 1]; }
            n--;
            for (int i = best - 1; i <= best; i++) {
                if (i < 0 || i + 1 >= n) continue;
                const merge_slot *m = merge_get(v, ids[i], ids[i + 1]);
                rank[i] = m ? m->rank : UINT32_MAX;
                nid[i] = m ? m->id : -1;
            }
        }
        return n;
    }
    if ((size_t)n > sc->heap_cap) {
        moe_free(sc->prev);
        moe_free(sc->next);
        moe_free(sc->heap);
        sc->prev = moe_malloc((size_t)n * sizeof *sc->prev);
        sc->next = moe_malloc((size_t)n * sizeof *sc->next);
        sc->heap = moe_malloc((size_t)n * 3 * sizeof *sc->heap);
        sc->heap_cap = sc->prev && sc->next && sc->heap ? (size_t)n : 0;
        if (!sc->heap_cap) { /* out of memory: the slow way, one scan per merge, same result */
            for (;;) {
                int best = -1;
                uint32_t br = UINT32_MAX;
                int32_t bid = -1;
                for (int i = 0; i + 1 < n; i++) {
                    const merge_slot *m = merge_get(v, ids[i], ids[i + 1]);
                    if (m && m->rank < br) { br = m->rank; best = i; bid = m->id; }
                }
                if (best < 0) return n;
                ids[best] = bid;
                memmove(ids + best + 1, ids + best + 2, (size_t)(n - best - 2) * sizeof *ids);
                n--;
            }
        }
    }
    int32_t *prev = sc->prev, *next = sc->next;
    bpe_heap_item *h = sc->heap;
    size_t hn = 0;
    for (int i = 0; i < n; i++) { prev[i] = i - 1; next[i] = i + 1 < n ? i + 1 : -1; }
    for (int i = 0; i + 1 < n; i++) {
        const merge_slot *m = merge_get(v, ids[i], ids[i + 1]);
        if (m) heap_push(h, &hn, (bpe_heap_item){m->rank, (uint32_t)i, m->id});
    }
    while (hn) {
        bpe_heap_item it = heap_pop(h, &hn);
        int p = (int)it.pos, q = next[p];
        if (ids[p] < 0 || q < 0) continue;
        const merge_slot *m = merge_get(v, ids[p], ids[q]);
        if (!m || m->id != it.id) continue;
        ids[p] = it.id;
        ids[q] = -1;
        next[p] = next[q];
        if (next[q] >= 0) prev[next[q]] = p;
        if (prev[p] >= 0 && (m = merge_get(v, ids[prev[p]], ids[p])))
            heap_push(h, &hn, (bpe_heap_item){m->rank, (uint32_t)prev[p], m->id});
        if (next[p] >= 0 && (m = merge_get(v, ids[p], ids[next[p]])))
            heap_push(h, &hn, (bpe_heap_item){m->rank, (uint32_t)p, m->id});
    }
    int w = 0;
    for (int i = 0; i >= 0; i = next[i]) ids[w++] = ids[i];
    return w;
}

/* ---- output ----------------------------------------------------------------------------------- */
typedef struct tok_out { moe_token *out; int64_t cap, n; } tok_out;
static inline void emit(tok_out *o, int32_t id) {
    if (o->n < o->cap) o->out[o->n] = id;
    o->n++;
}

/* Byte-level BPE of one pre-tokenized word. */
static void bpe_word_bytes(const moe_vocab *v, tok_scratch *sc, const uint8_t *w, size_t n, tok_out *o) {
    if (n == 0) return;
    int32_t id = n > 1 ? vocab_find(v, w, n) : -1;
    if (id >= 0 && (v->ignore_merges || (v->tok[id].flags & TF_SELF))) { emit(o, id); return; }
    int32_t *ids = sc->ids;
    for (size_t i = 0; i < n; i++) ids[i] = v->byte_tok[w[i]];
    int m = bpe_merge(v, sc, ids, (int)n);
    for (int i = 0; i < m; i++) emit(o, ids[i]);
}

/* ---- pre-tokenizer splits ------------------------------------------------------------------------
   Hand-written matchers for the split regexes of the supported families, with the regex engine's
   semantics (leftmost alternative first, greedy quantifiers with backtracking); each returns the
   end of the piece that starts at code point i. Classes: \p{L} = upper | lower | other letter,
   \s = White_Space, and the alternatives below quote the regexes they implement.
     gpt2:   's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
     llama3: (?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+
     qwen2:  the same with \p{N} (single digits)
     o200k:  [^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?|
             [^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|
             \p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+ */
typedef struct split_text { const uint32_t *cp; const uint8_t *cls; size_t n; } split_text;

#define UCM(k) (1u << (k))
#define M_L (UCM(UC_UPPER) | UCM(UC_LOWER) | UCM(UC_OLETTER))
#define M_A (UCM(UC_UPPER) | UCM(UC_OLETTER) | UCM(UC_MARK))   /* o200k: Lu Lt Lm Lo M */
#define M_B (UCM(UC_LOWER) | UCM(UC_OLETTER) | UCM(UC_MARK))   /* o200k: Ll Lm Lo M */

static inline int in(const split_text *t, size_t i, uint32_t mask) { return i < t->n && (UCM(t->cls[i]) & mask); }
static inline int is_nl(const split_text *t, size_t i) { return i < t->n && (t->cp[i] == '\r' || t->cp[i] == '\n'); }
static inline int is_ws(const split_text *t, size_t i) { return in(t, i, UCM(UC_SPACE)); }
static inline int is_o(const split_text *t, size_t i) { /* [^\s\p{L}\p{N}] */
    return i < t->n && !(UCM(t->cls[i]) & (M_L | UCM(UC_NUMBER) | UCM(UC_SPACE)));
}
static inline int is_prefix(const split_text *t, size_t i) { /* [^\r\n\p{L}\p{N}] */
    return i < t->n && !is_nl(t, i) && !(UCM(t->cls[i]) & (M_L | UCM(UC_NUMBER)));
}
static inline size_t run(const split_text *t, size_t i, uint32_t mask) {
    while (in(t, i, mask)) i++;
    return i;
}

/* 's 't 're 've 'm 'll 'd at i; ci: case-insensitive (ſ folds to s). Returns the end or 0. */
static size_t contraction(const split_text *t, size_t i, int ci) {
    if (i + 1 >= t->n || t->cp[i] != '\'') return 0;
    uint32_t a = t->cp[i + 1], b = i + 2 < t->n ? t->cp[i + 2] : 0;
    if (ci) {
        if (a >= 'A' && a <= 'Z') a += 32;
        if (b >= 'A' && b <= 'Z') b += 32;
        if (a == 0x17F) a = 's';
    }
    if (a == 's' || a == 't' || a == 'm' || a == 'd') return i + 2;
    if ((a == 'r' && b == 'e') || (a == 'v' && b == 'e') || (a == 'l' && b == 'l')) return i + 3;
    return 0;
}

/* the three whitespace alternatives shared by all: \s*[\r\n]+ (not gpt2) | \s+(?!\S) | \s+ */
static size_t split_ws(const split_text *t, size_t i, int newline_alt) {
    size_t e = i;
    while (is_ws(t, e)) e++;
    if (e == i) return 0;
    if (newline_alt)
        for (size_t q = e; q > i; q--)
            if (is_nl(t, q - 1)) return q;
    if (e == t->n) return e;
    return e - i >= 2 ? e - 1 : e;
}

static size_t split_gpt2(const split_text *t, size_t i) {
    size_t e;
    if ((e = contraction(t, i, 0))) return e;
    size_t j = (t->cp[i] == ' ' && i + 1 < t->n) ? i + 1 : i;
    if (in(t, j, M_L)) return run(t, j, M_L);
    if (in(t, j, UCM(UC_NUMBER))) return run(t, j, UCM(UC_NUMBER));
    if (is_o(t, j)) { while (is_o(t, j)) j++; return j; }
    if ((e = split_ws(t, i, 0))) return e;
    return i + 1;
}

static size_t split_llama3(const split_text *t, size_t i, size_t max_digits) {
    size_t e;
    if ((e = contraction(t, i, 1))) return e;
    if (is_prefix(t, i) && in(t, i + 1, M_L)) return run(t, i + 1, M_L);
    if (in(t, i, M_L)) return run(t, i, M_L);
    if (in(t, i, UCM(UC_NUMBER))) {
        e = i;
        while (e - i < max_digits && in(t, e, UCM(UC_NUMBER))) e++;
        return e;
    }
    size_t j = (t->cp[i] == ' ' && is_o(t, i + 1)) ? i + 1 : i;
    if (is_o(t, j)) {
        while (is_o(t, j)) j++;
        while (is_nl(t, j)) j++;
        return j;
    }
    if ((e = split_ws(t, i, 1))) return e;
    return i + 1;
}

/* o200k: A*B+ with backtracking of A* (A and B overlap), then an optional contraction. */
static size_t o200k_ab(const split_text *t, size_t j) {
    size_t ka = run(t, j, M_A) - j;
    for (size_t k = ka + 1; k-- > 0;) {
        if (in(t, j + k, M_B)) {
            size_t e = run(t, j + k, M_B), c = contraction(t, e, 1);
            return c ? c : e;
        }
    }
    return 0;
}

static size_t o200k_a(const split_text *t, size_t j) { /* A+B* then an optional contraction */
    size_t e = run(t, j, M_A);
    if (e == j) return 0;
    e = run(t, e, M_B);
    size_t c = contraction(t, e, 1);
    return c ? c : e;
}

static size_t split_o200k(const split_text *t, size_t i) {
    size_t e;
    if (is_prefix(t, i) && (e = o200k_ab(t, i + 1))) return e;
    if ((e = o200k_ab(t, i))) return e;
    if (is_prefix(t, i) && (e = o200k_a(t, i + 1))) return e;
    if ((e = o200k_a(t, i))) return e;
    if (in(t, i, UCM(UC_NUMBER))) {
        e = i;
        while (e - i < 3 && in(t, e, UCM(UC_NUMBER))) e++;
        return e;
    }
    size_t j = (t->cp[i] == ' ' && is_o(t, i + 1)) ? i + 1 : i;
    if (is_o(t, j)) {
        while (is_o(t, j)) j++;
        while (is_nl(t, j) || (j < t->n && t->cp[j] == '/')) j++;
        return j;
    }
    if ((e = split_ws(t, i, 1))) return e;
    return i + 1;
}

static size_t split_next(int pre, const split_text *t, size_t i) {
    switch (pre) {
    case PRE_GPT2: return split_gpt2(t, i);
    case PRE_LLAMA3: return split_llama3(t, i, 3);
    case PRE_QWEN2: return split_llama3(t, i, 1);
    case PRE_O200K: return split_o200k(t, i);
    default: return t->n;
    }
}

/* ---- encoding ------------------------------------------------------------------------------------ */
static moe_status scratch_init(tok_scratch *sc, size_t n) {
    memset(sc, 0, sizeof *sc);
    /* normalization at most triples the bytes (NFC; SPM's U+2581 for spaces); every symbol,
       code point or offset comes from at least one normalized byte */
    size_t cap = n + 8, big = 3 * cap;
    if (cap > (SIZE_MAX / 64)) return set_error(MOE_ERR_NO_MEMORY, "tokenizer: text too large");
    sc->cap = cap;
    sc->ids = moe_malloc(big * sizeof(int32_t));
    sc->rank = moe_malloc((size_t)(g_bpe_small_max + 1) * sizeof(uint32_t));
    sc->nid = moe_malloc((size_t)(g_bpe_small_max + 1) * sizeof(int32_t));
    sc->norm = moe_malloc(big);
    sc->cps = moe_malloc(big * sizeof(uint32_t));
    sc->cls = moe_malloc(big);
    sc->off = moe_malloc(big * sizeof(uint32_t));
    if (!sc->ids || !sc->rank || !sc->nid || !sc->norm || !sc->cps || !sc->cls || !sc->off)
        return set_error(MOE_ERR_NO_MEMORY, "tokenizer: out of memory for a text of %zu bytes", n);
    return MOE_OK;
}

static void scratch_free(tok_scratch *sc) {
    moe_free(sc->ids); moe_free(sc->prev); moe_free(sc->next); moe_free(sc->rank); moe_free(sc->nid);
    moe_free(sc->heap); moe_free(sc->norm); moe_free(sc->cps); moe_free(sc->cls); moe_free(sc->off);
}

/* SentencePiece-style BPE of a whole (normalized, U+2581 for spaces) segment. */
static void bpe_spm(const moe_vocab *v, tok_scratch *sc, const uint8_t *s, size_t n, tok_out *o) {
    int32_t *ids = sc->ids;
    int m = 0, last_unk = 0;
    for (size_t i = 0; i < n;) {
        int l;
        uint32_t c = utf8_next(s + i, n - i, &l);
        int32_t id = c < 0x10000 && v->char_tok ? v->char_tok[c] : c >= UC_BAD_BASE ? -1 : vocab_find(v, s + i, (size_t)l);
        if (id >= 0) {
            ids[m++] = id;
            last_unk = 0;
        } else {
            int ok = v->byte_fallback;
            for (int k = 0; k < l && ok; k++) ok = v->byte_tok[s[i + k]] >= 0;
            if (ok) {
                for (int k = 0; k < l; k++) ids[m++] = v->byte_tok[s[i + k]];
                last_unk = 0;
            } else if (v->unk >= 0 && !last_unk) {
                ids[m++] = v->unk;
                last_unk = 1;
            }
        }
        i += (size_t)l;
    }
    m = bpe_merge(v, sc, ids, m);
    for (int i = 0; i < m; i++) emit(o, ids[i]);
}

/* Normalize, split and BPE one stretch of text that holds no added token. */
static void encode_segment(const moe_vocab *v, tok_scratch *sc, const uint8_t *s, size_t n, tok_out *o) {
    if (n == 0) return;
    if (v->kind == VK_SPM) {
        uint8_t *b = sc->norm;
        size_t m = 0;
        if (v->add_space_prefix) { memcpy(b, "\xE2\x96\x81", 3); m = 3; }
        for (size_t i = 0; i < n; i++) {
            if (s[i] == ' ') { memcpy(b + m, "\xE2\x96\x81", 3); m += 3; } else b[m++] = s[i];
        }
        bpe_spm(v, sc, b, m, o);
        return;
    }
    if (v->nfc) {
        int changed;
        size_t m = nfc_spans(s, n, sc->norm, sc->cps, &changed);
        if (changed) { s = sc->norm; n = m; }
    }
    if (v->pre == PRE_NONE) {
        bpe_word_bytes(v, sc, s, n, o);
        return;
    }
    /* code points with their classes and byte offsets */
    size_t m = 0;
    uint32_t *cp = sc->cps; /* free again once nfc() is done */
    for (size_t i = 0; i < n;) {
        int l = 1;
        uint32_t c = s[i] < 0x80 ? s[i] : utf8_next(s + i, n - i, &l);
        cp[m] = c;
        sc->cls[m] = (uint8_t)uc_class(c);
        sc->off[m] = (uint32_t)i;
        m++;
        i += (size_t)l;
    }
    sc->off[m] = (uint32_t)n;
    split_text t = {cp, sc->cls, m};
    for (size_t i = 0; i < m;) {
        size_t e = split_next(v->pre, &t, i);
        if (e <= i || e > m) e = i + 1;
        bpe_word_bytes(v, sc, s + sc->off[i], sc->off[e] - sc->off[i], o);
        i = e;
    }
}

/* Longest added token starting at s[0..n): its id and length, or -1. */
static int32_t added_match(const moe_vocab *v, const uint8_t *s, size_t n, size_t *len) {
    int32_t best = -1, node = 0;
    for (size_t i = 0; i < n; i++) {
        int32_t c = v->trie[node].child;
        while (c >= 0 && v->trie[c].byte != s[i]) c = v->trie[c].next;
        if (c < 0) break;
        node = c;
        if (v->trie[node].token >= 0) { best = v->trie[node].token; *len = i + 1; }
    }
    return best;
}

static int is_word_char(const uint8_t *s, size_t n) { /* for single_word: letters, digits, '_' */
    int l;
    uint32_t c = utf8_next(s, n, &l);
    int k = uc_class(c);
    return c == '_' || k == UC_UPPER || k == UC_LOWER || k == UC_OLETTER || k == UC_NUMBER;
}

static size_t utf8_prev(const uint8_t *s, size_t i) { /* start of the code point before offset i */
    size_t j = i - 1;
    while (j > 0 && i - j < 4 && (s[j] & 0xC0) == 0x80) j--;
    int l;
    utf8_next(s + j, i - j, &l);
    return j + (size_t)l == i ? j : i - 1;
}

/* The whole pipeline: split at added tokens (leftmost-longest, as Hugging Face does), encode the
   text between them. Without parse_special, special tokens found in the text stay text. */
static void encode_text(const moe_vocab *v, tok_scratch *sc, const uint8_t *s, size_t n, int parse_special, tok_out *o) {
    size_t seg = 0, i = 0;
    while (i < n) {
        if (!(v->first_byte[s[i] >> 3] & (1u << (s[i] & 7)))) { i++; continue; }
        size_t len = 0;
        int32_t id = added_match(v, s + i, n - i, &len);
        if (id < 0) { i++; continue; }
        uint8_t f = v->tok[id].flags;
        if ((f & TF_SPECIAL) && !parse_special) { i += len; continue; }
        size_t start = i, stop = i + len;
        if ((f & TF_SINGLE_WORD) && ((start > 0 && is_word_char(s + utf8_prev(s, start), n - utf8_prev(s, start))) ||
                                     (stop < n && is_word_char(s + stop, n - stop)))) {
            i = stop;
            continue;
        }
        if (f & TF_LSTRIP)
            while (start > seg) {
                size_t p = utf8_prev(s, start);
                int l;
                if (uc_class(utf8_next(s + p, n - p, &l)) != UC_SPACE) break;
                start = p;
            }
        if (f & TF_RSTRIP)
            while (stop < n) {
                int l;
                if (uc_class(utf8_next(s + stop, n - stop, &l)) != UC_SPACE) break;
                stop += (size_t)l;
            }
        encode_segment(v, sc, s + seg, start - seg, o);
        emit(o, id);
        seg = i = stop;
    }
    encode_segment(v, sc, s + seg, n - seg, o);
}

/* ---- building a vocabulary ---------------------------------------------------------------------- */
static moe_status vocab_alloc(moe_vocab **out, int64_t n_tokens) {
    if (n_tokens <= 0 || n_tokens > (1 << 24))
        return set_error(MOE_ERR_FORMAT, "tokenizer: %lld tokens is not a plausible vocabulary size", (long long)n_tokens);
    moe_vocab *v = moe_calloc(1, sizeof *v);
    if (!v) return set_error(MOE_ERR_NO_MEMORY, "tokenizer: out of memory");
    v->tok = moe_calloc((size_t)n_tokens, sizeof *v->tok);
    if (!v->tok) {
        moe_free(v);
        return set_error(MOE_ERR_NO_MEMORY, "tokenizer: out of memory for %lld tokens", (long long)n_tokens);
    }
    v->n_tokens = (int32_t)n_tokens;
    v->bos = v->eos = v->eot = v->eom = v->unk = v->pad = -1;
    for (int i = 0; i < 256; i++) v->byte_tok[i] = -1;
    *out = v;
    return MOE_OK;
}

static int hex_digit(uint8_t c) {
    return c >= '0' && c <= '9' ? c - '0' : c >= 'A' && c <= 'F' ? c - 'A' + 10 : c >= 'a' && c <= 'f' ? c - 'a' + 10 : -1;
}

/* Stores token id's text and derives the bytes it stands for. */
static moe_status vocab_set_token(moe_vocab *v, int32_t id, const uint8_t *text, size_t n, int type) {
    if (n > (1u << 20)) return set_error(MOE_ERR_FORMAT, "tokenizer: token %d is %zu bytes long", id, n);
    vocab_token *t = &v->tok[id];
    moe_status st = blob_add(v, text, n, &t->text);
    if (st) return st;
    t->text_len = (uint32_t)n;
    t->type = (uint8_t)type;
    uint8_t small[64], *buf = n <= sizeof small ? small : moe_malloc(n + 1);
    if (!buf) return set_error(MOE_ERR_NO_MEMORY, "tokenizer: out of memory");
    size_t m = 0;
    int hex = -1;
    if (type == TT_BYTE || (v->byte_fallback && n == 6 && memcmp(text, "<0x", 3) == 0 && text[5] == '>')) {
        int hi = n == 6 ? hex_digit(text[3]) : -1, lo = n == 6 ? hex_digit(text[4]) : -1;
        if (hi >= 0 && lo >= 0 && !memcmp(text, "<0x", 3) && text[5] == '>') hex = hi * 16 + lo;
    }
    if (hex >= 0) {
        buf[m++] = (uint8_t)hex;
        t->type = TT_BYTE;
        if (v->byte_tok[hex] < 0) v->byte_tok[hex] = id;
    } else if (v->kind == VK_BYTES && (type == TT_NORMAL || type == TT_UNUSED || type == TT_UNKNOWN || type == TT_BYTE)) {
        m = bytelevel_decode(text, n, buf);
    } else if (v->kind == VK_SPM) {
        for (size_t i = 0; i < n;) {
            if (i + 3 <= n && memcmp(text + i, "\xE2\x96\x81", 3) == 0) { buf[m++] = ' '; i += 3; } else buf[m++] = text[i++];
        }
    } else {
        memcpy(buf, text, n);
        m = n;
    }
    st = blob_add(v, buf, m, &t->piece);
    t->piece_len = (uint32_t)m;
    if (buf != small) moe_free(buf);
    return st;
}

static moe_status trie_add(moe_vocab *v, const uint8_t *s, size_t n, int32_t id) {
    int32_t node = 0;
    for (size_t i = 0; i < n; i++) {
        int32_t c = v->trie[node].child;
        while (c >= 0 && v->trie[c].byte != s[i]) c = v->trie[c].next;
        if (c < 0) {
            if (v->n_trie == v->cap_trie) {
                int32_t cap = v->cap_trie * 2;
                trie_node *nt = moe_malloc((size_t)cap * sizeof *nt);
                if (!nt) return set_error(MOE_ERR_NO_MEMORY, "tokenizer: out of memory for added tokens");
                memcpy(nt, v->trie, (size_t)v->n_trie * sizeof *nt);
                moe_free(v->trie);
                v->trie = nt;
                v->cap_trie = cap;
            }
            c = v->n_trie++;
            v->trie[c] = (trie_node){-1, v->trie[node].child, -1, s[i]};
            v->trie[node].child = c;
        }
        node = c;
    }
    if (v->trie[node].token < 0) v->trie[node].token = id; /* duplicates: the first id wins */
    if (n) v->first_byte[s[0] >> 3] |= (uint8_t)(1u << (s[0] & 7));
    return MOE_OK;
}

static int tok_text_is(const moe_vocab *v, int32_t id, const char *z) {
    size_t n = strlen(z);
    return id >= 0 && id < v->n_tokens && v->tok[id].text_len == n && memcmp(tok_text(v, id), z, n) == 0;
}

static int32_t vocab_find_text(const moe_vocab *v, const char *z) {
    for (int32_t id = 0; id < v->n_tokens; id++)
        if (tok_text_is(v, id, z)) return id;
    return -1;
}

static const char *const k_eog_texts[] = {"<|im_end|>", "<|endoftext|>", "<end_of_turn>", "<turn|>", "<|return|>", "<|call|>",
                                          "<|eot_id|>", "<|eom_id|>", "<|end_of_text|>", "</s>", "<eos>", NULL};

/* The chat format: the template text first, then the architecture, then the vocabulary's own
   markers. Gemma 4's template shipped in revisions that differ for plain chats in two places
   (chat_gemma4): whether the generation prompt ends with an empty thought block (the larger
   models' templates do; the E2B/E4B ones do not) and whether an assistant message that follows
   an assistant message continues its turn. The template text says which; without one we assume
   the larger models' current template. */
static void vocab_detect_chat(moe_vocab *v) {
    const char *tt = v->template_text;
    v->chat = CHAT_UNKNOWN;
    v->chat_flags = 0;
    if (tt) {
        if (strstr(tt, "<|turn>")) {
            v->chat = CHAT_GEMMA4;
            if (strstr(tt, "<|channel>thought\\n<channel|>")) v->chat_flags |= CHATF_G4_EMPTY_THOUGHT;
            if (strstr(tt, "continue_same_model_turn")) v->chat_flags |= CHATF_G4_CONTINUE;
        } else if (strstr(tt, "<|im_start|>")) {
            v->chat = strstr(tt, "<think>") || strstr(tt, "reasoning_content") ? CHAT_QWEN3 : CHAT_CHATML;
        } else if (strstr(tt, "<start_of_turn>")) {
            v->chat = CHAT_GEMMA;
        } else if (strstr(tt, "<|start|>") && strstr(tt, "<|channel|>")) {
            v->chat = CHAT_HARMONY;
        }
        return;
    }
    if (!strncmp(v->arch, "qwen3", 5)) v->chat = CHAT_QWEN3;
    else if (!strncmp(v->arch, "qwen2", 5)) v->chat = CHAT_CHATML;
    else if (!strncmp(v->arch, "gemma4", 6)) v->chat = CHAT_GEMMA4; /* "gemma4", config.json's "gemma4_text" */
    else if (!strncmp(v->arch, "gemma", 5)) v->chat = CHAT_GEMMA;
    else if (!strcmp(v->arch, "gpt-oss") || !strcmp(v->arch, "gpt_oss")) v->chat = CHAT_HARMONY;
    if (v->chat == CHAT_UNKNOWN) {
        if (vocab_find_text(v, "<|im_start|>") >= 0 && vocab_find_text(v, "<|im_end|>") >= 0)
            v->chat = vocab_find_text(v, "<think>") >= 0 ? CHAT_QWEN3 : CHAT_CHATML;
        else if (vocab_find_text(v, "<|turn>") >= 0 && vocab_find_text(v, "<turn|>") >= 0) v->chat = CHAT_GEMMA4;
        else if (vocab_find_text(v, "<start_of_turn>") >= 0 && vocab_find_text(v, "<end_of_turn>") >= 0) v->chat = CHAT_GEMMA;
        else if (vocab_find_text(v, "<|start|>") >= 0 && vocab_find_text(v, "<|channel|>") >= 0 &&
                 vocab_find_text(v, "<|message|>") >= 0) v->chat = CHAT_HARMONY;
    }
    if (v->chat == CHAT_GEMMA4) v->chat_flags = CHATF_G4_EMPTY_THOUGHT | CHATF_G4_CONTINUE;
}

/* Everything that follows once tokens, types and merges are in: lookups, added-token matching,
   end-of-generation marks, the chat format. */
static moe_status vocab_finish(moe_vocab *v) {
    moe_status st;
    if ((st = vocab_build_hash(v))) return st;
    if (v->kind == VK_BYTES) {
        for (int b = 0; b < 256; b++) {
            uint8_t c = (uint8_t)b;
            v->byte_tok[b] = vocab_find(v, &c, 1);
            if (v->byte_tok[b] < 0)
                return set_error(MOE_ERR_FORMAT, "tokenizer: byte-level vocabulary has no token for byte 0x%02X", b);
        }
        /* a word that is itself a token needs no merging when BPE of its bytes gives that token */
        tok_scratch sc;
        int32_t maxlen = 0;
        for (int32_t id = 0; id < v->n_tokens; id++)
            if ((int32_t)v->tok[id].piece_len > maxlen) maxlen = (int32_t)v->tok[id].piece_len;
        if ((st = scratch_init(&sc, (size_t)maxlen))) { scratch_free(&sc); return st; }
        for (int32_t id = 0; id < v->n_tokens && !v->ignore_merges; id++) {
            vocab_token *t = &v->tok[id];
            if (t->piece_len < 2 || !tok_in_model(v, id) || vocab_find(v, tok_piece(v, id), t->piece_len) != id) continue;
            for (uint32_t i = 0; i < t->piece_len; i++) sc.ids[i] = v->byte_tok[tok_piece(v, id)[i]];
            if (bpe_merge(v, &sc, sc.ids, (int)t->piece_len) == 1 && sc.ids[0] == id) t->flags |= TF_SELF;
        }
        scratch_free(&sc);
    }
    if (v->kind == VK_SPM) {
        v->char_tok = moe_malloc(0x10000 * sizeof *v->char_tok);
        if (!v->char_tok) return set_error(MOE_ERR_NO_MEMORY, "tokenizer: out of memory");
        /* = vocab_find(utf8(c)) for every BMP c, found from the tokens whose key is one character
           (65,536 hash probes would dominate loading a small vocabulary) */
        for (uint32_t c = 0; c < 0x10000; c++) v->char_tok[c] = -1;
        for (int32_t id = 0; id < v->n_tokens; id++) {
            uint32_t kl;
            const uint8_t *k = tok_key(v, id, &kl);
            if (kl < 1 || kl > 3) continue;
            int l;
            uint32_t c = utf8_next(k, kl, &l);
            uint8_t u[4];
            if ((uint32_t)l != kl || c >= 0x10000 || (c >= 0xD800 && c < 0xE000) || utf8_put(c, u) != (int)kl ||
                memcmp(u, k, kl) || v->char_tok[c] >= 0)
                continue;
            v->char_tok[c] = vocab_find(v, k, kl);
        }
    }
    v->cap_trie = 256;
    v->trie = moe_malloc((size_t)v->cap_trie * sizeof *v->trie);
    if (!v->trie) return set_error(MOE_ERR_NO_MEMORY, "tokenizer: out of memory");
    v->trie[0] = (trie_node){-1, -1, -1, 0};
    v->n_trie = 1;
    for (int32_t id = 0; id < v->n_tokens; id++) {
        vocab_token *t = &v->tok[id];
        if (t->type == TT_CONTROL || t->type == TT_UNKNOWN) t->flags |= TF_SPECIAL | TF_ADDED;
        if (t->type == TT_USER) t->flags |= TF_ADDED;
        if ((t->flags & TF_ADDED) && t->text_len && (st = trie_add(v, tok_text(v, id), t->text_len, id))) return st;
    }
    int32_t marks[3] = {v->eos, v->eot, v->eom};
    for (int k = 0; k < 3; k++)
        if (marks[k] >= 0 && marks[k] < v->n_tokens) v->tok[marks[k]].flags |= TF_EOG;
    for (int32_t id = 0; id < v->n_tokens; id++)
        if (v->tok[id].flags & TF_SPECIAL)
            for (int k = 0; k_eog_texts[k]; k++)
                if (tok_text_is(v, id, k_eog_texts[k])) v->tok[id].flags |= TF_EOG;
    vocab_detect_chat(v);
    if (v->add_bos && v->bos >= 0 && v->n_prefix == 0) v->prefix[v->n_prefix++] = v->bos;
    if (v->add_eos && v->eos >= 0 && v->n_suffix == 0) v->suffix[v->n_suffix++] = v->eos;
    return MOE_OK;
}

/* Merges for a SentencePiece vocabulary that has scores but no merge list, derived the way the
   Hugging Face converter does: every split of a token into two tokens is a merge, ranked by the
   token's score (higher first; ties in token order, then by the two halves' ids). */
typedef struct spm_merge { float score; int32_t id, a, b; } spm_merge;

static int cmp_spm_merge(const void *x, const void *y) {
    const spm_merge *p = x, *q = y;
    if (p->score != q->score) return p->score > q->score ? -1 : 1;
    if (p->id != q->id) return p->id < q->id ? -1 : 1;
    if (p->a != q->a) return p->a < q->a ? -1 : 1;
    return (p->b > q->b) - (p->b < q->b);
}

static moe_status vocab_merges_from_scores(moe_vocab *v) {
    uint32_t mask;
    int32_t *index = text_index_build(v, &mask);
    if (!index) return set_error(MOE_ERR_NO_MEMORY, "tokenizer: out of memory");
    size_t n = 0, cap = (size_t)v->n_tokens * 2 + 16;
    spm_merge *list = moe_malloc(cap * sizeof *list);
    moe_status st = MOE_OK;
    if (!list) { moe_free(index); return set_error(MOE_ERR_NO_MEMORY, "tokenizer: out of memory"); }
    for (int32_t id = 0; id < v->n_tokens && !st; id++) {
        const vocab_token *t = &v->tok[id];
        const uint8_t *s = tok_text(v, id);
        if (t->type == TT_BYTE || t->text_len < 2) continue;
        for (uint32_t k = 1; k < t->text_len; k++) {
            if ((s[k] & 0xC0) == 0x80) continue; /* split at character boundaries */
            int32_t ids[2] = {-1, -1};
            const uint8_t *ps[2] = {s, s + k};
            uint32_t ls[2] = {k, t->text_len - k};
            for (int h = 0; h < 2; h++) {
                uint32_t i = (uint32_t)hash_bytes(ps[h], ls[h]) & mask;
                for (; index[i] >= 0; i = (i + 1) & mask)
                    if (v->tok[index[i]].text_len == ls[h] && memcmp(tok_text(v, index[i]), ps[h], ls[h]) == 0) { ids[h] = index[i]; break; }
            }
            if (ids[0] < 0 || ids[1] < 0) continue;
            if (n == cap) {
                spm_merge *nl = moe_malloc(cap * 2 * sizeof *nl);
                if (!nl) { st = set_error(MOE_ERR_NO_MEMORY, "tokenizer: out of memory"); break; }
                memcpy(nl, list, n * sizeof *nl);
                moe_free(list);
                list = nl;
                cap *= 2;
            }
            list[n++] = (spm_merge){t->score, id, ids[0], ids[1]};
        }
    }
    moe_free(index);
    if (!st && n > (1u << 26)) st = set_error(MOE_ERR_FORMAT, "tokenizer: %zu merges derived from the scores is too many", n);
    if (!st) {
        qsort(list, n, sizeof *list, cmp_spm_merge);
        if (!(st = merges_alloc(v, (uint32_t)n)))
            for (size_t i = 0; i < n; i++) merge_put(v, list[i].a, list[i].b, (uint32_t)i, list[i].id);
    }
    moe_free(list);
    return st;
}

/* ---- from GGUF metadata (tokenizer.ggml.*, as llama.cpp's converter writes it) ---------------------- */
static moe_status gguf_opt_bool(const gguf_file *g, const char *key, int32_t *out) {
    int64_t x = *out;
    moe_status st = gguf_get_int(g, key, 0, 0, 1, &x);
    *out = (int32_t)x;
    return st;
}

/* Gemma 4's control tokens that llama.cpp's converter stores as USER_DEFINED (so that llama.cpp
   prints them for its chat parser) although tokenizer.json marks them special. */
static const char *const k_gemma4_visible[] = {"<|channel>", "<channel|>", "<|tool_call>", "<tool_call|>", "<|tool_response>",
                                               "<tool_response|>", "<|\"|>", NULL};

/* Token types of a "gemma4" GGUF brought back to what tokenizer.json says, so that both files of
   one model tokenize and detokenize alike. The converter (gguf-py's LlamaHfVocab) types every
   token below the base vocabulary size NORMAL unless it is special, which loses "added" for the
   tokens Hugging Face matches in the text before BPE: the whitespace runs ("\n\n", "\t\t",
   "\u2581\u2581", ...) and every longer token no merge makes (HTML tags, <unusedN>, <mask>: BPE
   cannot produce those, so in tokenizer.json they can only be added tokens). It also types the
   visible control tokens above USER_DEFINED; tokenizer.json has them special. */
static moe_status vocab_gemma4_types(moe_vocab *v) {
    uint8_t *made = moe_calloc(((size_t)v->n_tokens + 7) / 8, 1);
    if (!made) return set_error(MOE_ERR_NO_MEMORY, "tokenizer: out of memory");
    for (uint32_t i = 0; v->merges && i <= v->merge_mask; i++)
        if (v->merges[i].key != UINT64_MAX) made[v->merges[i].id >> 3] |= (uint8_t)(1u << (v->merges[i].id & 7));
    for (int32_t id = 0; id < v->n_tokens; id++) {
        vocab_token *t = &v->tok[id];
        if (t->type == TT_USER)
            for (int k = 0; k_gemma4_visible[k]; k++)
                if (tok_text_is(v, id, k_gemma4_visible[k])) t->type = TT_CONTROL;
        if (t->type != TT_NORMAL || !t->text_len) continue;
        const uint8_t *p = tok_text(v, id);
        size_t n = t->text_len, i = 0;
        int l, chars = 0;
        uint32_t first = utf8_next(p, n, &l), c = first;
        int ws = first == '\n' || first == '\t' || first == 0x2581;
        while (i < n) {
            c = utf8_next(p + i, n - i, &l);
            i += (size_t)l;
            chars++;
            ws &= c == first;
        }
        int unmade = chars > 1 && !(made[id >> 3] >> (id & 7) & 1);
        if ((ws && (first != 0x2581 || chars > 1)) || unmade) t->type = TT_USER; /* a lone U+2581 is an ordinary piece */
    }
    moe_free(made);
    return MOE_OK;
}

static moe_status vocab_load_gguf(const gguf_file *g, moe_vocab **out) {
    *out = NULL;
    gguf_str model = {0}, pre = {0}, tmpl = {0}, arch = {0};
    moe_status st;
    if ((st = gguf_get_str(g, "tokenizer.ggml.model", 0, &model))) return st;
    if (!model.p || gguf_str_eq(model, "none")) return MOE_OK; /* no tokenizer: the model still loads */
    const gguf_kv *tokens = gguf_find(g, "tokenizer.ggml.tokens");
    if (!tokens || tokens->type != GGUF_ARRAY || tokens->arr_type != GGUF_STRING)
        return set_error(MOE_ERR_FORMAT, "gguf: tokenizer.ggml.tokens is missing or not a string array");
    moe_vocab *v = NULL;
    if ((st = vocab_alloc(&v, (int64_t)tokens->arr_n))) return st;
    gguf_str *strs = NULL;
    if ((st = gguf_get_str(g, "tokenizer.ggml.pre", 0, &pre)) || (st = gguf_get_str(g, "tokenizer.chat_template", 0, &tmpl)) ||
        (st = gguf_get_str(g, "general.architecture", 0, &arch)))
        goto fail;
    if (arch.p) snprintf(v->arch, sizeof v->arch, "%.*s", (int)(arch.n < 31 ? arch.n : 31), arch.p);
    if (gguf_str_eq(model, "gpt2")) {
        v->kind = VK_BYTES;
        pthread_once(&g_bytemap_once, bytemap_init);
        if (!pre.p || gguf_str_eq(pre, "default") || gguf_str_eq(pre, "gpt2") || gguf_str_eq(pre, "gpt-2")) v->pre = PRE_GPT2;
        else if (gguf_str_eq(pre, "qwen2")) { v->pre = PRE_QWEN2; v->nfc = 1; }
        else if (gguf_str_eq(pre, "llama-bpe") || gguf_str_eq(pre, "llama3")) v->pre = PRE_LLAMA3;
        else if (gguf_str_eq(pre, "gpt-4o")) { v->pre = PRE_O200K; v->ignore_merges = 1; }
        else snprintf(v->unsupported, sizeof v->unsupported, "pre-tokenizer '%.*s' (tokenizer.ggml.pre) is not supported",
                      (int)(pre.n > 60 ? 60 : pre.n), pre.p);
    } else if (gguf_str_eq(model, "llama") || gguf_str_eq(model, "gemma4")) {
        /* "gemma4" is llama.cpp's name for Gemma 4's SentencePiece-style BPE: the same engine, with
           the merge list required and no space prefix (see vocab_gemma4_types for its token types) */
        v->kind = VK_SPM;
        v->byte_fallback = 1;
        v->gguf_gemma4 = gguf_str_eq(model, "gemma4");
        v->add_space_prefix = !v->gguf_gemma4;
        v->add_bos = 1;
    } else {
        snprintf(v->unsupported, sizeof v->unsupported, "tokenizer model '%.*s' (tokenizer.ggml.model) is not supported",
                 (int)(model.n > 60 ? 60 : model.n), model.p);
        v->kind = VK_BYTES;
        pthread_once(&g_bytemap_once, bytemap_init);
    }
    if ((st = gguf_opt_bool(g, "tokenizer.ggml.add_space_prefix", &v->add_space_prefix)) ||
        (st = gguf_opt_bool(g, "tokenizer.ggml.add_bos_token", &v->add_bos)) ||
        (st = gguf_opt_bool(g, "tokenizer.ggml.add_eos_token", &v->add_eos)))
        goto fail;
    if (v->kind == VK_BYTES) v->add_space_prefix = 0;
    const gguf_kv *types = gguf_find(g, "tokenizer.ggml.token_type");
    const gguf_kv *scores = gguf_find(g, "tokenizer.ggml.scores");
    if (types && (types->type != GGUF_ARRAY || types->arr_type != GGUF_I32 || types->arr_n != tokens->arr_n)) {
        st = set_error(MOE_ERR_FORMAT, "gguf: tokenizer.ggml.token_type must be an int32 array with one entry per token");
        goto fail;
    }
    if (scores && (scores->type != GGUF_ARRAY || scores->arr_type != GGUF_F32 || scores->arr_n != tokens->arr_n)) {
        st = set_error(MOE_ERR_FORMAT, "gguf: tokenizer.ggml.scores must be a float32 array with one entry per token");
        goto fail;
    }
    strs = moe_malloc((size_t)tokens->arr_n * sizeof *strs);
    if (!strs) { st = set_error(MOE_ERR_NO_MEMORY, "tokenizer: out of memory"); goto fail; }
    gguf_array_strings(tokens, strs);
    for (int32_t id = 0; id < v->n_tokens; id++) {
        int32_t type = TT_NORMAL;
        if (types) memcpy(&type, types->val + 4 * (size_t)id, 4);
        if (type < TT_NORMAL || type > TT_BYTE) type = TT_NORMAL;
        if ((st = vocab_set_token(v, id, (const uint8_t *)strs[id].p, strs[id].n, type))) goto fail;
        if (scores) {
            float sc;
            memcpy(&sc, scores->val + 4 * (size_t)id, 4);
            v->tok[id].score = isfinite(sc) ? sc : 0.0f;
        }
    }
    static const char *const id_keys[] = {"tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
                                           "tokenizer.ggml.eom_token_id", "tokenizer.ggml.unknown_token_id", "tokenizer.ggml.padding_token_id"};
    int32_t *id_vals[] = {&v->bos, &v->eos, &v->eot, &v->eom, &v->unk, &v->pad};
    for (int k = 0; k < 6; k++) {
        int64_t x = -1;
        if ((st = gguf_get_int(g, id_keys[k], 0, -1, v->n_tokens - 1, &x))) goto fail;
        *id_vals[k] = (int32_t)x;
    }
    const gguf_kv *merges = gguf_find(g, "tokenizer.ggml.merges");
    if (merges && (merges->type != GGUF_ARRAY || merges->arr_type != GGUF_STRING)) {
        st = set_error(MOE_ERR_FORMAT, "gguf: tokenizer.ggml.merges must be a string array");
        goto fail;
    }
    if (merges && merges->arr_n) {
        if (merges->arr_n > (1u << 26)) { st = set_error(MOE_ERR_FORMAT, "gguf: too many merges"); goto fail; }
        gguf_str *ms = moe_malloc((size_t)merges->arr_n * sizeof *ms);
        uint32_t mask;
        int32_t *index = text_index_build(v, &mask);
        if (!ms || !index || (st = merges_alloc(v, (uint32_t)merges->arr_n)) != MOE_OK) {
            moe_free(ms);
            moe_free(index);
            if (!st) st = set_error(MOE_ERR_NO_MEMORY, "tokenizer: out of memory for merges");
            goto fail;
        }
        gguf_array_strings(merges, ms);
        for (uint64_t i = 0; i < merges->arr_n && !st; i++) {
            const uint8_t *p = (const uint8_t *)ms[i].p;
            size_t n = ms[i].n, sp = 1;
            while (sp < n && p[sp] != ' ') sp++; /* like llama.cpp: the first space after the first byte */
            if (sp >= n) st = set_error(MOE_ERR_FORMAT, "gguf: merge %llu ('%.*s') has no space", (unsigned long long)i,
                                        (int)(n > 40 ? 40 : n), (const char *)p);
            else st = merge_add_text(v, p, sp, p + sp + 1, n - sp - 1, (uint32_t)i, index, mask);
        }
        moe_free(ms);
        moe_free(index);
        if (st) goto fail;
    } else if (v->gguf_gemma4) { /* its scores are placeholders (-1000): only the merges rank */
        st = set_error(MOE_ERR_FORMAT, "gguf: a 'gemma4' vocabulary needs tokenizer.ggml.merges");
        goto fail;
    } else if (v->kind == VK_SPM) {
        if (!scores) { st = set_error(MOE_ERR_FORMAT, "gguf: a 'llama' vocabulary needs tokenizer.ggml.scores or merges"); goto fail; }
        if ((st = vocab_merges_from_scores(v))) goto fail;
    } else if (!merges && !v->unsupported[0]) { /* an empty list is a vocabulary of single symbols */
        st = set_error(MOE_ERR_FORMAT, "gguf: a 'gpt2' vocabulary needs tokenizer.ggml.merges");
        goto fail;
    }
    if (tmpl.p) {
        v->template_text = moe_malloc(tmpl.n + 1);
        if (!v->template_text) { st = set_error(MOE_ERR_NO_MEMORY, "tokenizer: out of memory"); goto fail; }
        memcpy(v->template_text, tmpl.p, tmpl.n);
        v->template_text[tmpl.n] = 0;
    }
    if (v->gguf_gemma4 && (st = vocab_gemma4_types(v))) goto fail;
    if (!v->unsupported[0] && (st = vocab_finish(v))) goto fail;
    moe_free(strs);
    *out = v;
    return MOE_OK;
fail:
    moe_free(strs);
    vocab_free(v);
    return st;
}

/* ---- from a Hugging Face tokenizer.json (+ tokenizer_config.json, config.json) ---------------------- */
static const char *const k_split_regex[][2] = {
    {"qwen2", "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"},
    {"llama3", "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"},
    {"o200k", "[^\\r\\n\\p{L}\\p{N}]?[\\p{Lu}\\p{Lt}\\p{Lm}\\p{Lo}\\p{M}]*[\\p{Ll}\\p{Lm}\\p{Lo}\\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?|"
              "[^\\r\\n\\p{L}\\p{N}]?[\\p{Lu}\\p{Lt}\\p{Lm}\\p{Lo}\\p{M}]+[\\p{Ll}\\p{Lm}\\p{Lo}\\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|"
              "\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n/]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"},
    {"gpt2", "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+"},
};
static const int k_split_pre[] = {PRE_QWEN2, PRE_LLAMA3, PRE_O200K, PRE_GPT2};

typedef struct json_file { moe_file f; json_doc d; int open; } json_file;

static moe_status json_file_open(json_file *jf, const char *path, const char *what) {
    memset(jf, 0, sizeof *jf);
    moe_status st = file_map(&jf->f, path, 0);
    if (st) return st;
    if ((st = json_parse(&jf->d, (const char *)jf->f.data, jf->f.size, what))) {
        file_unmap(&jf->f);
        return st;
    }
    jf->open = 1;
    return MOE_OK;
}

static void json_file_close(json_file *jf) {
    if (!jf->open) return;
    json_free(&jf->d);
    file_unmap(&jf->f);
    jf->open = 0;
}

/* A string node decoded into a NUL-terminated malloc'd copy (NULL if not a string or no memory). */
static char *json_strdup(const json_doc *d, uint32_t i) {
    if (!json_is(d, i, JSON_STRING)) return NULL;
    char *s = moe_malloc((size_t)d->nodes[i].len + 1);
    if (s) s[json_str_decode(d, i, s)] = 0;
    return s;
}

static int json_bool(const json_doc *d, uint32_t i, int dflt) {
    return json_is(d, i, JSON_TRUE) ? 1 : json_is(d, i, JSON_FALSE) ? 0 : dflt;
}

static int json_type_is(const json_doc *d, uint32_t o, const char *type) { return json_str_eq(d, json_get(d, o, "type"), type); }

/* Finds the token named by a tokenizer_config entry ("<eos>" or {"content": "<eos>"}). */
static int32_t config_token(const moe_vocab *v, const json_doc *d, uint32_t i) {
    if (json_is(d, i, JSON_OBJECT)) i = json_get(d, i, "content");
    char *s = json_strdup(d, i);
    int32_t id = s ? vocab_find_text(v, s) : -1;
    moe_free(s);
    return id;
}

#define UNSUPPORTED(...) do { snprintf(v->unsupported, sizeof v->unsupported, __VA_ARGS__); } while (0)

static moe_status vocab_from_json(const json_doc *d, moe_vocab **out) {
    *out = NULL;
    uint32_t root = 0, model = json_get(d, root, "model");
    if (!json_is(d, model, JSON_OBJECT)) return set_error(MOE_ERR_FORMAT, "tokenizer.json: no \"model\" object");
    uint32_t vocab = json_get(d, model, "vocab"), added = json_get(d, root, "added_tokens"), merges = json_get(d, model, "merges");
    int bpe = json_type_is(d, model, "BPE") || (!json_get(d, model, "type") && json_is(d, merges, JSON_ARRAY));
    if (!json_is(d, vocab, JSON_OBJECT)) {
        if (!bpe) return set_error(MOE_ERR_UNSUPPORTED, "tokenizer.json: only BPE models are supported (this one is not)");
        return set_error(MOE_ERR_FORMAT, "tokenizer.json: model.vocab is not an object");
    }
    int64_t n = 0, id;
    for (uint32_t i = vocab + 1; i < d->nodes[vocab].end; i = d->nodes[i + 1].end) {
        if (!json_int(d, i + 1, 0, (1 << 24) - 1, &id))
            return set_error(MOE_ERR_FORMAT, "tokenizer.json: a model.vocab id is not an integer in [0, 2^24)");
        if (id >= n) n = id + 1;
    }
    if (added && !json_is(d, added, JSON_ARRAY)) return set_error(MOE_ERR_FORMAT, "tokenizer.json: added_tokens is not an array");
    if (added)
        for (uint32_t i = added + 1; i < d->nodes[added].end; i = d->nodes[i].end) {
            if (!json_is(d, i, JSON_OBJECT) || !json_int(d, json_get(d, i, "id"), 0, (1 << 24) - 1, &id) ||
                !json_is(d, json_get(d, i, "content"), JSON_STRING))
                return set_error(MOE_ERR_FORMAT, "tokenizer.json: an added_tokens entry lacks an integer id or a content string");
            if (id >= n) n = id + 1;
        }
    moe_vocab *v = NULL;
    moe_status st = vocab_alloc(&v, n);
    if (st) return st;
    char *buf = NULL;
    int32_t *index = NULL;
    if (!bpe) UNSUPPORTED("tokenizer.json: model type is not BPE (only BPE vocabularies are supported)");
    /* what kind of BPE: byte-level, or SentencePiece-style (U+2581 for spaces, byte fallback) */
    uint32_t norm = json_get(d, root, "normalizer"), pret = json_get(d, root, "pre_tokenizer"), dec = json_get(d, root, "decoder");
    int byte_level = json_type_is(d, pret, "ByteLevel") || json_type_is(d, dec, "ByteLevel");
    uint32_t pre_list = json_type_is(d, pret, "Sequence") ? json_get(d, pret, "pretokenizers") : 0;
    if (json_is(d, pre_list, JSON_ARRAY))
        for (uint32_t i = pre_list + 1; i < d->nodes[pre_list].end; i = d->nodes[i].end)
            if (json_type_is(d, i, "ByteLevel")) byte_level = 1;
    v->byte_fallback = json_bool(d, json_get(d, model, "byte_fallback"), 0);
    v->ignore_merges = json_bool(d, json_get(d, model, "ignore_merges"), 0);
    v->kind = byte_level ? VK_BYTES : VK_SPM;
    if (byte_level) pthread_once(&g_bytemap_once, bytemap_init);
    /* normalizer */
    if (json_type_is(d, norm, "NFC")) v->nfc = 1;
    else if (norm && !json_is(d, norm, JSON_NULL)) {
        uint32_t list = json_type_is(d, norm, "Sequence") ? json_get(d, norm, "normalizers") : 0;
        int ok = 1, replaces = 0;
        if (list && !json_is(d, list, JSON_ARRAY)) ok = 0;
        uint32_t i = list ? list + 1 : norm, end = list ? d->nodes[list].end : d->nodes[norm].end;
        for (; i < end && ok; i = d->nodes[i].end) {
            if (json_type_is(d, i, "Replace") && json_str_eq(d, json_get(d, json_get(d, i, "pattern"), "String"), " ") &&
                json_str_eq(d, json_get(d, i, "content"), "\xE2\x96\x81") && !byte_level)
                replaces = 1;
            else if (json_type_is(d, i, "Prepend") && json_str_eq(d, json_get(d, i, "prepend"), "\xE2\x96\x81") && !byte_level)
                v->add_space_prefix = 1;
            else if (json_type_is(d, i, "NFC"))
                v->nfc = 1;
            else
                ok = 0;
        }
        if (!ok || (!byte_level && !replaces)) UNSUPPORTED("tokenizer.json: this normalizer is not supported");
    } else if (!byte_level) {
        UNSUPPORTED("tokenizer.json: a SentencePiece-style vocabulary without the space normalizer is not supported");
    }
    if (v->nfc && !byte_level) UNSUPPORTED("tokenizer.json: NFC with a SentencePiece-style vocabulary is not supported");
    /* pre-tokenizer */
    if (byte_level) {
        if (json_type_is(d, pret, "ByteLevel")) {
            if (json_bool(d, json_get(d, pret, "add_prefix_space"), 0)) UNSUPPORTED("tokenizer.json: ByteLevel add_prefix_space is not supported");
            v->pre = json_bool(d, json_get(d, pret, "use_regex"), 1) ? PRE_GPT2 : PRE_NONE;
        } else if (json_is(d, pre_list, JSON_ARRAY)) {
            int n_split = 0;
            for (uint32_t i = pre_list + 1; i < d->nodes[pre_list].end; i = d->nodes[i].end) {
                if (json_type_is(d, i, "ByteLevel")) {
                    if (json_bool(d, json_get(d, i, "use_regex"), 1) || json_bool(d, json_get(d, i, "add_prefix_space"), 0))
                        UNSUPPORTED("tokenizer.json: ByteLevel after a Split must have use_regex and add_prefix_space off");
                } else if (json_type_is(d, i, "Split") && json_str_eq(d, json_get(d, i, "behavior"), "Isolated") &&
                           !json_bool(d, json_get(d, i, "invert"), 0)) {
                    uint32_t re = json_get(d, json_get(d, i, "pattern"), "Regex");
                    int found = 0;
                    for (int k = 0; k < 4 && !found; k++)
                        if (json_str_eq(d, re, k_split_regex[k][1])) { v->pre = k_split_pre[k]; found = 1; }
                    if (!found || n_split++) UNSUPPORTED("tokenizer.json: this split regex is not one of the supported families "
                                                         "(Qwen2, Llama-3, GPT-4o, GPT-2)");
                } else {
                    UNSUPPORTED("tokenizer.json: this pre-tokenizer sequence is not supported");
                }
            }
        } else if (pret && !json_is(d, pret, JSON_NULL)) {
            UNSUPPORTED("tokenizer.json: this pre-tokenizer is not supported with a byte-level vocabulary");
        }
    } else if (pret && !json_is(d, pret, JSON_NULL) &&
               !(json_type_is(d, pret, "Split") && json_str_eq(d, json_get(d, json_get(d, pret, "pattern"), "String"), " "))) {
        UNSUPPORTED("tokenizer.json: this pre-tokenizer is not supported with a SentencePiece-style vocabulary");
    }
    uint32_t dropout = json_get(d, model, "dropout");
    double dp = 0;
    if (dropout && !json_is(d, dropout, JSON_NULL) && (!json_double(d, dropout, &dp) || dp != 0))
        UNSUPPORTED("tokenizer.json: BPE dropout is not supported");
    uint32_t cs = json_get(d, model, "continuing_subword_prefix"), ew = json_get(d, model, "end_of_word_suffix");
    if ((cs && !json_is(d, cs, JSON_NULL) && !json_str_eq(d, cs, "")) || (ew && !json_is(d, ew, JSON_NULL) && !json_str_eq(d, ew, "")))
        UNSUPPORTED("tokenizer.json: subword prefixes / word suffixes are not supported");
    /* tokens */
    size_t maxlen = 0; /* every string of the document fits in buf decoded */
    for (uint32_t i = 0; i < d->n_nodes; i++)
        if (d->nodes[i].type == JSON_STRING && d->nodes[i].len > maxlen) maxlen = d->nodes[i].len;
    buf = moe_malloc(maxlen + 1);
    if (!buf) { st = set_error(MOE_ERR_NO_MEMORY, "tokenizer: out of memory"); goto fail; }
    for (int32_t k = 0; k < v->n_tokens; k++) v->tok[k].type = 0;
    for (uint32_t i = vocab + 1; i < d->nodes[vocab].end; i = d->nodes[i + 1].end) {
        json_int(d, i + 1, 0, n - 1, &id);
        if (v->tok[id].type) { st = set_error(MOE_ERR_FORMAT, "tokenizer.json: id %lld appears twice in model.vocab", (long long)id); goto fail; }
        size_t l = json_str_decode(d, i, buf);
        if ((st = vocab_set_token(v, (int32_t)id, (const uint8_t *)buf, l, TT_NORMAL))) goto fail;
    }
    if (added)
        for (uint32_t i = added + 1; i < d->nodes[added].end; i = d->nodes[i].end) {
            json_int(d, json_get(d, i, "id"), 0, n - 1, &id);
            size_t l = json_str_decode(d, json_get(d, i, "content"), buf);
            int special = json_bool(d, json_get(d, i, "special"), 0);
            if ((st = vocab_set_token(v, (int32_t)id, (const uint8_t *)buf, l, special ? TT_CONTROL : TT_USER))) goto fail;
            vocab_token *t = &v->tok[id];
            t->flags |= TF_ADDED;
            if (json_bool(d, json_get(d, i, "lstrip"), 0)) t->flags |= TF_LSTRIP;
            if (json_bool(d, json_get(d, i, "rstrip"), 0)) t->flags |= TF_RSTRIP;
            if (json_bool(d, json_get(d, i, "single_word"), 0)) t->flags |= TF_SINGLE_WORD;
        }
    for (int32_t k = 0; k < v->n_tokens; k++)
        if (!v->tok[k].type) v->tok[k].type = TT_UNUSED; /* a gap in the ids */
    uint32_t unk = json_get(d, model, "unk_token");
    if (json_is(d, unk, JSON_STRING)) {
        size_t l = json_str_decode(d, unk, buf);
        buf[l] = 0;
        v->unk = vocab_find_text(v, buf);
    }
    /* merges: "a b" strings or [a, b] pairs, rank = position */
    if (merges && !json_is(d, merges, JSON_ARRAY)) { st = set_error(MOE_ERR_FORMAT, "tokenizer.json: model.merges is not an array"); goto fail; }
    uint32_t mask;
    index = text_index_build(v, &mask);
    if (!index || (st = merges_alloc(v, merges ? d->nodes[merges].len : 0)) != MOE_OK) {
        if (!st) st = set_error(MOE_ERR_NO_MEMORY, "tokenizer: out of memory for merges");
        goto fail;
    }
    if (merges) {
        uint32_t rank = 0;
        for (uint32_t i = merges + 1; i < d->nodes[merges].end; i = d->nodes[i].end, rank++) {
            if (json_is(d, i, JSON_STRING)) {
                size_t l = json_str_decode(d, i, buf), sp = 0;
                while (sp < l && buf[sp] != ' ') sp++;
                if (sp == l || memchr(buf + sp + 1, ' ', l - sp - 1)) {
                    st = set_error(MOE_ERR_FORMAT, "tokenizer.json: merge %u is not two tokens separated by one space", rank);
                    goto fail;
                }
                st = merge_add_text(v, (const uint8_t *)buf, sp, (const uint8_t *)buf + sp + 1, l - sp - 1, rank, index, mask);
            } else if (json_is(d, i, JSON_ARRAY) && d->nodes[i].len == 2 && json_is(d, i + 1, JSON_STRING) &&
                       json_is(d, i + 2, JSON_STRING)) {
                size_t la = json_str_decode(d, i + 1, buf);
                char *b2 = moe_malloc((size_t)d->nodes[i + 2].len + 1); /* buf holds the first half */
                if (!b2) { st = set_error(MOE_ERR_NO_MEMORY, "tokenizer: out of memory"); goto fail; }
                size_t lb = json_str_decode(d, i + 2, b2);
                st = merge_add_text(v, (const uint8_t *)buf, la, (const uint8_t *)b2, lb, rank, index, mask);
                moe_free(b2);
            } else {
                st = set_error(MOE_ERR_FORMAT, "tokenizer.json: merge %u is neither \"a b\" nor [\"a\", \"b\"]", rank);
            }
            if (st) goto fail;
        }
    }
    /* what add_special_tokens adds: a TemplateProcessing post-processor */
    uint32_t pp = json_get(d, root, "post_processor");
    uint32_t procs = json_type_is(d, pp, "Sequence") ? json_get(d, pp, "processors") : 0;
    for (uint32_t i = json_is(d, procs, JSON_ARRAY) ? procs + 1 : pp, e = json_is(d, procs, JSON_ARRAY) ? d->nodes[procs].end : pp + 1;
         i && i < e; i = d->nodes[i].end) {
        if (!json_type_is(d, i, "TemplateProcessing")) continue;
        uint32_t single = json_get(d, i, "single"), specials = json_get(d, i, "special_tokens");
        if (!json_is(d, single, JSON_ARRAY)) continue;
        int after = 0;
        for (uint32_t k = single + 1; k < d->nodes[single].end; k = d->nodes[k].end) {
            if (json_get(d, k, "Sequence")) { after = 1; continue; }
            uint32_t sname = json_get(d, json_get(d, k, "SpecialToken"), "id");
            char *name = json_strdup(d, sname);
            uint32_t ids = 0;
            if (name) ids = json_get(d, json_get(d, specials, name), "ids");
            moe_free(name);
            if (!json_is(d, ids, JSON_ARRAY)) continue;
            for (uint32_t q = ids + 1; q < d->nodes[ids].end; q = d->nodes[q].end) {
                int64_t x;
                if (!json_int(d, q, 0, v->n_tokens - 1, &x)) continue;
                if (!after && v->n_prefix < 4) v->prefix[v->n_prefix++] = (int32_t)x;
                if (after && v->n_suffix < 4) v->suffix[v->n_suffix++] = (int32_t)x;
            }
        }
    }
    moe_free(buf);
    moe_free(index);
    *out = v;
    return MOE_OK;
fail:
    moe_free(buf);
    moe_free(index);
    vocab_free(v);
    return st;
}

/* Reads tokenizer_config.json (chat template, special tokens, add_bos/eos) and config.json
   (architecture, eos ids) when present; either may be NULL. */
static moe_status vocab_apply_configs(moe_vocab *v, const json_doc *tc, const json_doc *cfg) {
    if (tc) {
        uint32_t t = json_get(tc, 0, "chat_template");
        if (json_is(tc, t, JSON_ARRAY)) { /* [{"name": "default", "template": "..."}] */
            uint32_t pick = 0;
            for (uint32_t i = t + 1; i < tc->nodes[t].end; i = tc->nodes[i].end)
                if (!pick || json_str_eq(tc, json_get(tc, i, "name"), "default")) pick = json_get(tc, i, "template");
            t = pick;
        }
        if (json_is(tc, t, JSON_STRING) && !(v->template_text = json_strdup(tc, t)))
            return set_error(MOE_ERR_NO_MEMORY, "tokenizer: out of memory");
        int32_t id;
        if ((id = config_token(v, tc, json_get(tc, 0, "bos_token"))) >= 0) v->bos = id;
        if ((id = config_token(v, tc, json_get(tc, 0, "eos_token"))) >= 0) v->eos = id;
        if ((id = config_token(v, tc, json_get(tc, 0, "pad_token"))) >= 0) v->pad = id;
        if ((id = config_token(v, tc, json_get(tc, 0, "unk_token"))) >= 0 && v->unk < 0) v->unk = id;
        if (v->n_prefix == 0) v->add_bos = json_bool(tc, json_get(tc, 0, "add_bos_token"), 0);
        if (v->n_suffix == 0) v->add_eos = json_bool(tc, json_get(tc, 0, "add_eos_token"), 0);
    }
    if (cfg) {
        char *mt = json_strdup(cfg, json_get(cfg, 0, "model_type"));
        if (mt) snprintf(v->arch, sizeof v->arch, "%s", mt);
        moe_free(mt);
        uint32_t e = json_get(cfg, 0, "eos_token_id");
        int64_t x;
        if (json_int(cfg, e, 0, v->n_tokens - 1, &x)) v->tok[x].flags |= TF_EOG;
        if (json_is(cfg, e, JSON_ARRAY))
            for (uint32_t i = e + 1; i < cfg->nodes[e].end; i = cfg->nodes[i].end)
                if (json_int(cfg, i, 0, v->n_tokens - 1, &x)) v->tok[x].flags |= TF_EOG;
    }
    return MOE_OK;
}
/* Writes the vocabulary as tokenizer.ggml.* keys, the way llama.cpp's converter names them, so
   that both llama.cpp and vocab_load_gguf read it back (merges are written for SentencePiece
   vocabularies too: vocab_load_gguf prefers them to the scores; the scores written are derived
   from the merge ranks, which is what llama.cpp's SentencePiece tokenizer ranks by). */
static void gw_kv_bytes_array(gguf_writer *w, const char *key, uint64_t n) {
    gb_str(&w->kv, key);
    gb_u32(&w->kv, GGUF_ARRAY);
    gb_u32(&w->kv, GGUF_STRING);
    gb_u64(&w->kv, n);
    w->n_kv++;
}

typedef struct merge_rank { uint32_t rank; int32_t a, b, id; } merge_rank;
static int cmp_merge_rank(const void *x, const void *y) {
    const merge_rank *p = x, *q = y;
    return (p->rank > q->rank) - (p->rank < q->rank);
}

static moe_status vocab_write_gguf(const moe_vocab *v, gguf_writer *w) {
    if (v->unsupported[0]) return MOE_OK; /* nothing we could describe faithfully */
    const char *pre = NULL;
    if (v->kind == VK_BYTES) {
        pre = v->pre == PRE_QWEN2 ? "qwen2" : v->pre == PRE_LLAMA3 ? "llama-bpe" : v->pre == PRE_O200K ? "gpt-4o" :
              v->pre == PRE_GPT2 ? "gpt-2" : NULL;
        if (!pre || v->nfc != (v->pre == PRE_QWEN2) || v->ignore_merges != (v->pre == PRE_O200K))
            return set_error(MOE_ERR_UNSUPPORTED, "gguf writer: this vocabulary's pre-tokenizer has no tokenizer.ggml.pre name");
    }
    merge_rank *ms = moe_malloc(((size_t)v->n_merges + 1) * sizeof *ms);
    float *scores = v->kind == VK_SPM ? moe_malloc((size_t)v->n_tokens * sizeof *scores) : NULL;
    int32_t *types = moe_malloc((size_t)v->n_tokens * sizeof *types);
    if (!ms || !types || (v->kind == VK_SPM && !scores)) {
        moe_free(ms); moe_free(scores); moe_free(types);
        return set_error(MOE_ERR_NO_MEMORY, "gguf writer: out of memory for the vocabulary");
    }
    uint32_t nm = 0;
    for (uint32_t i = 0; v->merges && i <= v->merge_mask; i++)
        if (v->merges[i].key != UINT64_MAX)
            ms[nm++] = (merge_rank){v->merges[i].rank, (int32_t)(v->merges[i].key >> 32), (int32_t)(uint32_t)v->merges[i].key, v->merges[i].id};
    qsort(ms, nm, sizeof *ms, cmp_merge_rank);
    /* Gemma 4 under llama.cpp's name for it, with the visible control tokens USER_DEFINED as its
       converter writes them (vocab_gemma4_types reads both back) */
    int gemma4 = v->kind == VK_SPM && (v->gguf_gemma4 || !strncmp(v->arch, "gemma4", 6));
    gw_kv_str(w, "tokenizer.ggml.model", gemma4 ? "gemma4" : v->kind == VK_SPM ? "llama" : "gpt2");
    if (pre) gw_kv_str(w, "tokenizer.ggml.pre", pre);
    gw_kv_bytes_array(w, "tokenizer.ggml.tokens", (uint64_t)v->n_tokens);
    for (int32_t i = 0; i < v->n_tokens; i++) {
        gb_u64(&w->kv, v->tok[i].text_len);
        gb_put(&w->kv, tok_text(v, i), v->tok[i].text_len);
        types[i] = v->tok[i].type;
        for (int k = 0; gemma4 && types[i] == TT_CONTROL && k_gemma4_visible[k]; k++)
            if (tok_text_is(v, i, k_gemma4_visible[k])) types[i] = TT_USER;
    }
    gw_kv_array(w, "tokenizer.ggml.token_type", GGUF_I32, types, (uint64_t)v->n_tokens);
    if (scores) {
        int have = 0;
        for (int32_t i = 0; i < v->n_tokens; i++) have |= v->tok[i].score != 0.0f;
        for (int32_t i = 0; i < v->n_tokens; i++) scores[i] = have ? v->tok[i].score : -1e9f;
        for (uint32_t i = nm; !have && i-- > 0;) scores[ms[i].id] = -(float)ms[i].rank;
        gw_kv_array(w, "tokenizer.ggml.scores", GGUF_F32, scores, (uint64_t)v->n_tokens);
        gw_kv_bool(w, "tokenizer.ggml.add_space_prefix", v->add_space_prefix);
    }
    if (nm) {
        gw_kv_bytes_array(w, "tokenizer.ggml.merges", nm);
        for (uint32_t i = 0; i < nm; i++) {
            uint32_t la = v->tok[ms[i].a].text_len, lb = v->tok[ms[i].b].text_len;
            gb_u64(&w->kv, (uint64_t)la + 1 + lb);
            gb_put(&w->kv, tok_text(v, ms[i].a), la);
            gb_put(&w->kv, " ", 1);
            gb_put(&w->kv, tok_text(v, ms[i].b), lb);
        }
    }
    static const char *const id_keys[] = {"tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
                                           "tokenizer.ggml.eom_token_id", "tokenizer.ggml.unknown_token_id", "tokenizer.ggml.padding_token_id"};
    const int32_t ids[] = {v->bos, v->eos, v->eot, v->eom, v->unk, v->pad};
    for (int k = 0; k < 6; k++)
        if (ids[k] >= 0) gw_kv_u32(w, id_keys[k], (uint32_t)ids[k]);
    gw_kv_bool(w, "tokenizer.ggml.add_bos_token", v->n_prefix > 0 && v->prefix[0] == v->bos);
    gw_kv_bool(w, "tokenizer.ggml.add_eos_token", v->n_suffix > 0 && v->suffix[0] == v->eos);
    if (v->template_text) gw_kv_str(w, "tokenizer.chat_template", v->template_text);
    moe_free(ms);
    moe_free(scores);
    moe_free(types);
    return w->kv.oom ? set_error(MOE_ERR_NO_MEMORY, "gguf writer: out of memory for the vocabulary") : MOE_OK;
}

/* ============================================================================================ */
/* 5. model                                                                                      */
/* ============================================================================================ */
/* DESIGN.md, "Architectures are data": an architecture is one row of k_archs (end of section 6):
   how its hyperparameters are read (GGUF keys, config.json) into a per-layer plan, which tensors
   each layer has (one list, walked by the GGUF binder, the Hugging Face loader, the GGUF writer
   and the Vulkan uploader), how its hyperparameters are written back, and its forward pass. */

/* One tensor an architecture expects, with its shape from the layer's plan. */
enum { TS_OPTIONAL = 1 };
typedef struct tensor_spec {
    int32_t role, n_dims, flags;
    int64_t ne[3];             /* innermost first, as GGUF */
    const char *hf;            /* Hugging Face name, "%d" = layer; experts: the module path */
} tensor_spec;
#define MAX_TENSOR_SPECS 48

typedef struct moe_arch moe_arch;

struct moe_model {
    moe_weights w;             /* hyperparameters, plans and weights: what a backend needs */
    const moe_arch *arch;
    char arch_name[32];
    moe_file file;
    gguf_file gguf;            /* a GGUF file's tables, or the tensor table of a HF directory */
    moe_file *shards;          /* Hugging Face directory: the mapped *.safetensors files */
    int n_shards;
    char *hf_names;            /* HF directory: GGUF-style names of its tensors */
    const uint8_t **hf_expert_ptrs;
    float *owned;              /* f32 copies of 1-D weights (norms) */
    float *rope_freqs;         /* made when a model needs rope_freqs and its source had none */
    const uint8_t **expert_tables;
    moe_vocab *vocab;
    moe_token bos, eos;
    int32_t backend, n_threads;
    int32_t cpu_exact;         /* moe_load_params.cpu_exact, normalised to 0/1 */
    moe_logger log;
    moe_vk_backend *vk;
    moe_xcache *xc;            /* host expert cache: NULL unless host_budget_bytes is below the weights */
    /* the CPU compute threads of all contexts (section 1, thread pool): started by the first CPU
       context, under pool_mu (contexts may be made on several threads), ended with the model */
    thread_pool *pool;
    pthread_mutex_t pool_mu;
    uint64_t n_params;
    double t_load_s;
    /* references: the caller's (moe_load, released by moe_model_free) plus one per context; the
       last release destroys the model, so contexts outlive a freed model handle */
    _Atomic int32_t refs;
    void **hf_owned;           /* tensors rebuilt at load (regrouped HF rows, f32 conv weights) */
    int n_hf_owned;
};
static void model_release(moe_model *model); /* section 11: drops a reference, the last destroys */

struct moe_arch {
    const char *name;          /* GGUF general.architecture */
    const char *hf_type;       /* config.json model_type */
    moe_status (*hparams_gguf)(moe_model *m);
    moe_status (*hparams_hf)(moe_model *m, const json_doc *d);
    /* the tensors of layer l (l = -1: the global ones); returns their count */
    int (*tensors)(const moe_weights *w, int layer, tensor_spec *out);
    void (*write_hparams)(const moe_model *m, gguf_writer *gw);
    moe_status (*finish)(moe_model *m);  /* optional: after the tensors are bound */
    /* one chunk of n tokens at positions pos0..; logits of the last n_out rows into ACT_LOGITS */
    void (*forward)(void *be, const moe_ops *o, const moe_weights *w, const moe_token *tokens, int n, int pos0, int n_out);
};

/* the architecture of a GGUF general.architecture or a config.json model_type (the other NULL),
   with its index in the table; NULL when unsupported (the error text lists the supported ones) */
static const moe_arch *arch_find(const char *gguf_name, const char *hf_type, int32_t *index);

#define ROLE_NAME(role, name) name,
static const char *const k_global_names[MOE_GT_COUNT] = {MOE_GLOBAL_TENSORS(ROLE_NAME)};
static const char *const k_layer_names[MOE_LT_COUNT] = {MOE_LAYER_TENSORS(ROLE_NAME)};
#undef ROLE_NAME

/* the GGUF name of a tensor: "token_embd.weight", "blk.3.attn_q.weight" */
static void tensor_gguf_name(char *buf, size_t cap, int layer, int role) {
    if (layer < 0) snprintf(buf, cap, "%s", k_global_names[role]);
    else snprintf(buf, cap, "blk.%d.%s", layer, k_layer_names[role]);
}

static tensor_spec spec(int role, int n_dims, int64_t ne0, int64_t ne1, int64_t ne2, const char *hf) {
    tensor_spec s = {role, n_dims, 0, {ne0, ne1, ne2}, hf};
    return s;
}

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

/* ---- the per-layer plan ---- */
static moe_status plan_alloc(moe_model *m) {
    m->w.layers = moe_calloc((size_t)m->w.hp.n_layer, sizeof *m->w.layers);
    m->w.caches = moe_calloc((size_t)m->w.hp.n_layer, sizeof *m->w.caches);
    m->w.states = moe_calloc((size_t)m->w.hp.n_layer, sizeof *m->w.states);
    if (!m->w.layers || !m->w.caches || !m->w.states) return set_error(MOE_ERR_NO_MEMORY, "model: out of memory for the layer table");
    return MOE_OK;
}

/* After an architecture filled every layer's plan (attn.cache = the layer whose K/V it reads):
   numbers the KV caches, checks the geometry, and takes the model-wide maxima buffers are
   sized for. */
static moe_status plan_finish(moe_model *m) {
    moe_hparams *hp = &m->w.hp;
    hp->n_cache = hp->n_state = 0;
    hp->n_head = hp->n_head_kv = hp->head_dim = hp->n_ff_exp = hp->n_ff = hp->n_expert = hp->n_expert_used = 0;
    hp->dn_conv = hp->dn_value = hp->dn_v_head = hp->dn_qkv = 0;
#define MAXI(f, v) (hp->f = hp->f > (v) ? hp->f : (v))
    for (int l = 0; l < hp->n_layer; l++) {
        moe_layer_plan *p = &m->w.layers[l].p;
        if (p->attn_kind == MOE_ATTN_FULL || p->attn_kind == MOE_ATTN_SLIDING) {
            moe_attn *a = &p->attn;
            if (a->n_head < 1 || a->n_head_kv < 1 || a->n_head % a->n_head_kv || a->head_dim < 2 || a->head_dim % 2)
                return set_error(MOE_ERR_FORMAT, "model: layer %d: %d query heads, %d kv heads of size %d do not fit together",
                                 l, a->n_head, a->n_head_kv, a->head_dim);
            if (p->rope.n_rot > a->head_dim || p->rope.n_rot % 2 || p->rope.n_freq > p->rope.n_rot / 2 || !(p->rope.base > 0))
                return set_error(MOE_ERR_FORMAT, "model: layer %d: rope over %d dims (%d frequencies, base %g) does not fit head size %d",
                                 l, p->rope.n_rot, p->rope.n_freq, (double)p->rope.base, a->head_dim);
            if ((p->attn_kind == MOE_ATTN_SLIDING) != (a->window > 0))
                return set_error(MOE_ERR_FORMAT, "model: layer %d: a sliding layer needs a window and a full one none", l);
            if (a->store) {
                if (a->cache != l) return set_error(MOE_ERR_FORMAT, "model: layer %d stores into the cache of layer %d", l, a->cache);
                moe_cache_plan *c = &m->w.caches[hp->n_cache];
                c->layer = l;
                c->kv_width = a->n_head_kv * a->head_dim;
                c->window = a->window;
                a->cache = hp->n_cache++;
            } else { /* KV sharing: an earlier layer of the same kind and geometry fills it */
                int src = a->cache;
                const moe_attn *sa = src >= 0 && src < l ? &m->w.layers[src].p.attn : NULL;
                if (!sa || !sa->store || sa->n_head_kv != a->n_head_kv || sa->head_dim != a->head_dim || sa->window != a->window)
                    return set_error(MOE_ERR_FORMAT, "model: layer %d shares the KV cache of layer %d, which does not fit", l, src);
                a->cache = sa->cache;
            }
            MAXI(n_head, a->n_head);
            MAXI(n_head_kv, a->n_head_kv);
            MAXI(head_dim, a->head_dim);
            if (p->attn_gate) { /* q and its gate come through ACT_DN_QKV, the gate stays in ACT_DN_Z */
                MAXI(dn_qkv, 2 * a->n_head * a->head_dim);
                MAXI(dn_value, a->n_head * a->head_dim);
            }
        }
        if (p->attn_kind == MOE_ATTN_DELTANET) { /* hybrid models: one recurrent state per layer */
            moe_deltanet *dn = &p->dn;
            int64_t conv = 2 * (int64_t)dn->n_k_head * dn->k_dim + (int64_t)dn->n_v_head * dn->v_dim;
            int64_t rec = (int64_t)dn->n_v_head * dn->k_dim * dn->v_dim;
            if (dn->n_k_head < 1 || dn->n_v_head % dn->n_k_head || dn->conv_k < 1 || conv * dn->conv_k > INT32_MAX || rec > INT32_MAX)
                return set_error(MOE_ERR_FORMAT, "model: layer %d: Gated DeltaNet geometry does not fit", l);
            moe_state_plan *s = &m->w.states[hp->n_state];
            s->layer = l;
            s->conv_elems = (int32_t)(conv * (dn->conv_k - 1));
            s->rec_elems = (int32_t)rec;
            dn->state = hp->n_state++;
            MAXI(dn_conv, (int32_t)conv);
            MAXI(dn_qkv, (int32_t)conv);
            MAXI(dn_value, dn->n_v_head * dn->v_dim);
            MAXI(dn_v_head, dn->n_v_head);
        }
        MAXI(n_ff, p->n_ff_shexp); /* the shared expert's hidden rows go through ACT_FF / ACT_FF2 */
        if (p->ffn_kind != MOE_FFN_DENSE) {
            if (p->n_expert < 1 || p->n_expert_used < 1 || p->n_expert_used > p->n_expert || p->n_ff_exp < 1)
                return set_error(MOE_ERR_FORMAT, "model: layer %d: %d experts, %d used, width %d", l, p->n_expert, p->n_expert_used, p->n_ff_exp);
            MAXI(n_expert, p->n_expert);
            MAXI(n_expert_used, p->n_expert_used);
            MAXI(n_ff_exp, p->n_ff_exp);
        }
        MAXI(n_ff, p->n_ff);
    }
#undef MAXI
    if (!(hp->rms_eps > 0)) return set_error(MOE_ERR_FORMAT, "model: rms epsilon must be positive");
    return MOE_OK;
}

/* ---- binding tensors ---- */
/* 1-D weights (norms) are small: keep them as f32 whatever the file stored, so kernels need
   only one norm-weight type. */
static moe_status weights_to_f32(moe_model *m) {
    size_t total = 0;
    for (int l = -1; l < m->w.hp.n_layer; l++)
        for (int r = 0; r < (l < 0 ? MOE_GT_COUNT : MOE_LT_COUNT); r++) {
            const moe_weight *w = moe_weight_of(&m->w, l, r);
            if (w->data && w->n_dims == 1) total += (size_t)w->ne[0];
        }
    m->owned = moe_malloc((total ? total : 1) * sizeof(float));
    if (!m->owned) return set_error(MOE_ERR_NO_MEMORY, "model: out of memory for norm weights");
    float *p = m->owned;
    for (int l = -1; l < m->w.hp.n_layer; l++)
        for (int r = 0; r < (l < 0 ? MOE_GT_COUNT : MOE_LT_COUNT); r++) {
            moe_weight *w = moe_weight_of(&m->w, l, r);
            if (!w->data || w->n_dims != 1) continue;
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

/* Binds every tensor the architecture lists, by its GGUF name, with its shape checked. */
static moe_status bind_tensors(moe_model *m) {
    moe_hparams *hp = &m->w.hp;
    moe_status st;
    const gguf_tensor *emb = gguf_find_tensor(&m->gguf, k_global_names[MOE_TOK_EMBD]);
    if (!emb) return set_error(MOE_ERR_FORMAT, "model: required tensor '%s' is missing", k_global_names[MOE_TOK_EMBD]);
    hp->n_vocab = (int32_t)(emb->ne[1] > INT32_MAX ? 0 : emb->ne[1]);
    size_t n_tables = 0; /* expert tables: one per 3-D tensor */
    tensor_spec sp[MAX_TENSOR_SPECS];
    for (int l = 0; l < hp->n_layer; l++) {
        int n = m->arch->tensors(&m->w, l, sp);
        for (int i = 0; i < n; i++) n_tables += sp[i].n_dims == 3 ? (size_t)sp[i].ne[2] : 0;
    }
    m->expert_tables = moe_calloc(n_tables ? n_tables : 1, sizeof *m->expert_tables);
    if (!m->expert_tables) return set_error(MOE_ERR_NO_MEMORY, "model: out of memory for the expert tables");
    const uint8_t **table = m->expert_tables;
    char name[96];
    for (int l = -1; l < hp->n_layer; l++) {
        int n = m->arch->tensors(&m->w, l, sp);
        for (int i = 0; i < n; i++) {
            const tensor_spec *s = &sp[i];
            moe_weight *w = moe_weight_of(&m->w, l, s->role);
            tensor_gguf_name(name, sizeof name, l, s->role);
            int up = s->role == MOE_UP_EXPS;
            if ((s->role == MOE_GATE_EXPS || up) && !gguf_find_tensor(&m->gguf, name)) {
                /* gate and up experts fused in one tensor: ffn_gate_up_exps [E, 2F, X] */
                snprintf(name, sizeof name, "blk.%d.ffn_gate_up_exps.weight", l);
                if (gguf_find_tensor(&m->gguf, name)) {
                    if ((st = bind_weight(m, w, name, 1, 3, s->ne[0], 2 * s->ne[1], s->ne[2]))) return st;
                    w->ne[1] = s->ne[1];
                    w->expert_bytes = w->row_bytes * (uint64_t)s->ne[1];
                    w->nbytes = w->expert_bytes * (uint64_t)s->ne[2];
                    for (int64_t e = 0; e < s->ne[2]; e++) table[e] = w->data + (uint64_t)(2 * e + up) * w->expert_bytes;
                    w->expert_data = table;
                    table += s->ne[2];
                    continue;
                }
                tensor_gguf_name(name, sizeof name, l, s->role);
            }
            if ((st = bind_weight(m, w, name, !(s->flags & TS_OPTIONAL), s->n_dims, s->ne[0], s->ne[1], s->ne[2]))) return st;
            if (s->n_dims != 3 || !w->data) continue;
            const gguf_tensor *t = gguf_find_tensor(&m->gguf, name);
            for (int64_t e = 0; e < s->ne[2]; e++)
                table[e] = t->expert_ptrs ? t->expert_ptrs[e] : w->data + (uint64_t)e * w->expert_bytes;
            w->expert_data = table;
            table += s->ne[2];
        }
    }
    if (!m->w.g[MOE_OUTPUT].data) m->w.g[MOE_OUTPUT] = m->w.g[MOE_TOK_EMBD]; /* tied embeddings */
    if ((st = weights_to_f32(m))) return st;
    return m->arch->finish ? m->arch->finish(m) : MOE_OK;
}

/* ---- GGUF hyperparameters ---- */
static moe_status gguf_arch_int(const moe_model *m, const char *suffix, int required, int64_t lo, int64_t hi, int64_t dflt, int32_t *out) {
    char key[96];
    snprintf(key, sizeof key, "%s.%s", m->arch_name, suffix);
    int64_t v = dflt;
    moe_status st = gguf_get_int(&m->gguf, key, required, lo, hi, &v);
    if (!st) *out = (int32_t)v;
    return st;
}

static moe_status gguf_arch_f32(const moe_model *m, const char *suffix, float *out) {
    char key[96];
    snprintf(key, sizeof key, "%s.%s", m->arch_name, suffix);
    return gguf_get_f32(&m->gguf, key, 0, out);
}

/* Reads general.architecture and dispatches to that architecture's reader. */
static moe_status load_hparams(moe_model *m) {
    gguf_str arch = {0};
    moe_status st = gguf_get_str(&m->gguf, "general.architecture", 1, &arch);
    if (st) return st;
    memcpy(m->arch_name, arch.p, arch.n < 31 ? arch.n : 31);
    if (!(m->arch = arch_find(m->arch_name, NULL, &m->w.hp.arch))) return MOE_ERR_UNSUPPORTED;
    if ((st = m->arch->hparams_gguf(m)) || (st = plan_finish(m))) return st;
    return MOE_OK;
}

/* ---- Qwen3-MoE (ARCHITECTURES.md §1): every layer full attention + routed SwiGLU experts ---- */
static void qwen3moe_plan(moe_model *m, int n_head, int n_head_kv, int head_dim, int n_rot, float rope_base,
                          int n_expert, int n_expert_used, int n_ff_exp, int norm_topk) {
    for (int l = 0; l < m->w.hp.n_layer; l++) {
        moe_layer_plan *p = &m->w.layers[l].p;
        p->attn_kind = MOE_ATTN_FULL;
        moe_attn a = {n_head, n_head_kv, head_dim, 0, 1.0f / sqrtf((float)head_dim), l, 1};
        p->attn = a;
        moe_rope r = {n_rot, n_rot / 2, n_rot, rope_base};
        p->rope = r;
        p->ffn_kind = MOE_FFN_MOE;
        p->act = MOE_ACT_SILU;
        p->n_expert = n_expert;
        p->n_expert_used = n_expert_used;
        p->n_ff_exp = n_ff_exp;
        p->norm_topk = norm_topk;
    }
}

static moe_status qwen3moe_hparams_gguf(moe_model *m) {
    moe_hparams *hp = &m->w.hp;
    moe_status st;
    int32_t n_head, n_head_kv, head_dim, n_rot, n_expert, n_used, n_ff_exp, norm_topk, v_len;
    if ((st = gguf_arch_int(m, "embedding_length", 1, 1, 1 << 20, 0, &hp->n_embd)) ||
        (st = gguf_arch_int(m, "block_count", 1, 1, 4096, 0, &hp->n_layer)) ||
        (st = gguf_arch_int(m, "attention.head_count", 1, 1, 4096, 0, &n_head)) ||
        (st = gguf_arch_int(m, "attention.head_count_kv", 0, 1, 4096, n_head, &n_head_kv)) ||
        (st = gguf_arch_int(m, "attention.key_length", 0, 2, 4096, hp->n_embd / n_head, &head_dim)) ||
        (st = gguf_arch_int(m, "context_length", 0, 1, INT32_MAX, 4096, &hp->n_ctx_train)) ||
        (st = gguf_arch_int(m, "expert_count", 1, 1, 4096, 0, &n_expert)) ||
        (st = gguf_arch_int(m, "expert_used_count", 1, 1, 4096, 0, &n_used)) ||
        (st = gguf_arch_int(m, "expert_feed_forward_length", 1, 1, 1 << 20, 0, &n_ff_exp)) ||
        (st = gguf_arch_int(m, "rope.dimension_count", 0, 2, 4096, head_dim, &n_rot)) ||
        (st = gguf_arch_int(m, "expert_weights_norm", 0, 0, 1, 1, &norm_topk)) ||
        (st = gguf_arch_int(m, "attention.value_length", 0, 1, 4096, head_dim, &v_len)))
        return st;
    if (v_len != head_dim) return set_error(MOE_ERR_UNSUPPORTED, "model: value_length %d != key_length %d", v_len, head_dim);
    float rope_base = 10000.0f;
    hp->rms_eps = 1e-6f;
    if ((st = gguf_arch_f32(m, "attention.layer_norm_rms_epsilon", &hp->rms_eps)) || (st = gguf_arch_f32(m, "rope.freq_base", &rope_base)))
        return st;
    if (n_head % n_head_kv)
        return set_error(MOE_ERR_FORMAT, "model: %d query heads is not a multiple of %d kv heads", n_head, n_head_kv);
    if (n_used > n_expert) return set_error(MOE_ERR_FORMAT, "model: expert_used_count %d > expert_count %d", n_used, n_expert);
    if (n_rot > head_dim || n_rot % 2)
        return set_error(MOE_ERR_FORMAT, "model: rope dimension %d does not fit head size %d", n_rot, head_dim);
    if (!(hp->rms_eps > 0) || !(rope_base > 0)) return set_error(MOE_ERR_FORMAT, "model: rms epsilon and rope base must be positive");
    if ((st = plan_alloc(m))) return st;
    qwen3moe_plan(m, n_head, n_head_kv, head_dim, n_rot, rope_base, n_expert, n_used, n_ff_exp, norm_topk);
    return MOE_OK;
}

static moe_status qwen3moe_hparams_hf(moe_model *m, const json_doc *d) {
    moe_hparams *hp = &m->w.hp;
    int32_t n_head = 0, n_head_kv = 0, head_dim = 0, n_expert = 0, n_used = 0, n_ff_exp = 0;
    struct { const char *key; int32_t *dst; int64_t lo, hi; int required; } ints[] = {
        {"hidden_size", &hp->n_embd, 1, 1 << 20, 1}, {"num_hidden_layers", &hp->n_layer, 1, 4096, 1},
        {"num_attention_heads", &n_head, 1, 4096, 1}, {"num_key_value_heads", &n_head_kv, 1, 4096, 1},
        {"head_dim", &head_dim, 2, 4096, 0}, {"num_experts", &n_expert, 1, 4096, 1},
        {"num_experts_per_tok", &n_used, 1, 4096, 1}, {"moe_intermediate_size", &n_ff_exp, 1, 1 << 20, 1},
        {"max_position_embeddings", &hp->n_ctx_train, 1, INT32_MAX, 0}, {"decoder_sparse_step", NULL, 1, 1, 0}};
    hp->n_ctx_train = 4096;
    for (size_t i = 0; i < sizeof ints / sizeof ints[0]; i++) {
        uint32_t n = json_get(d, 0, ints[i].key);
        int64_t v;
        if (!n && !ints[i].required) continue;
        if (!json_int(d, n, ints[i].lo, ints[i].hi, &v))
            return set_error(n ? MOE_ERR_FORMAT : MOE_ERR_FORMAT, "config.json: '%s' is %s", ints[i].key,
                             n ? (ints[i].dst ? "out of range or not an integer" : "not 1 (models with dense layers are not supported)") : "missing");
        if (ints[i].dst) *ints[i].dst = (int32_t)v;
    }
    uint32_t mlp_only = json_get(d, 0, "mlp_only_layers");
    if (json_is(d, mlp_only, JSON_ARRAY) && d->nodes[mlp_only].len)
        return set_error(MOE_ERR_UNSUPPORTED, "config.json: mlp_only_layers (dense layers) are not supported");
    if (!head_dim) head_dim = hp->n_embd / n_head;
    double eps = 1e-6, theta = 10000.0;
    uint32_t n = json_get(d, 0, "rms_norm_eps");
    if (n && !json_double(d, n, &eps)) return set_error(MOE_ERR_FORMAT, "config.json: rms_norm_eps is not a number");
    n = json_get(d, 0, "rope_theta");
    if (!n) n = json_get(d, json_get(d, 0, "rope_parameters"), "rope_theta");
    if (n && !json_double(d, n, &theta)) return set_error(MOE_ERR_FORMAT, "config.json: rope_theta is not a number");
    uint32_t scaling = json_get(d, 0, "rope_scaling");
    if (scaling && !json_is(d, scaling, JSON_NULL))
        return set_error(MOE_ERR_UNSUPPORTED, "config.json: rope_scaling is not supported yet");
    hp->rms_eps = (float)eps;
    int norm_topk = json_bool(d, json_get(d, 0, "norm_topk_prob"), 0);
    if (n_head % n_head_kv || n_used > n_expert || !(hp->rms_eps > 0) || !(theta > 0) || head_dim % 2)
        return set_error(MOE_ERR_FORMAT, "config.json: inconsistent heads, experts, rms_norm_eps or rope_theta");
    moe_status st = plan_alloc(m);
    if (st) return st;
    qwen3moe_plan(m, n_head, n_head_kv, head_dim, head_dim, (float)theta, n_expert, n_used, n_ff_exp, norm_topk);
    return MOE_OK;
}

static int qwen3moe_tensors(const moe_weights *w, int l, tensor_spec *out) {
    const moe_hparams *hp = &w->hp;
    int64_t E = hp->n_embd, V = hp->n_vocab;
    int n = 0;
    if (l < 0) {
        out[n++] = spec(MOE_TOK_EMBD, 2, E, V, 1, "model.embed_tokens.weight");
        out[n++] = spec(MOE_OUTPUT_NORM, 1, E, 1, 1, "model.norm.weight");
        out[n] = spec(MOE_OUTPUT, 2, E, V, 1, "lm_head.weight");
        out[n++].flags = TS_OPTIONAL;
        return n;
    }
    const moe_layer_plan *p = &w->layers[l].p;
    int64_t hd = p->attn.head_dim, Q = (int64_t)p->attn.n_head * hd, KV = (int64_t)p->attn.n_head_kv * hd;
    int64_t F = p->n_ff_exp, X = p->n_expert;
    out[n++] = spec(MOE_ATTN_NORM, 1, E, 1, 1, "model.layers.%d.input_layernorm.weight");
    out[n++] = spec(MOE_WQ, 2, E, Q, 1, "model.layers.%d.self_attn.q_proj.weight");
    out[n++] = spec(MOE_WK, 2, E, KV, 1, "model.layers.%d.self_attn.k_proj.weight");
    out[n++] = spec(MOE_WV, 2, E, KV, 1, "model.layers.%d.self_attn.v_proj.weight");
    out[n++] = spec(MOE_WO, 2, Q, E, 1, "model.layers.%d.self_attn.o_proj.weight");
    out[n++] = spec(MOE_Q_NORM, 1, hd, 1, 1, "model.layers.%d.self_attn.q_norm.weight");
    out[n++] = spec(MOE_K_NORM, 1, hd, 1, 1, "model.layers.%d.self_attn.k_norm.weight");
    out[n++] = spec(MOE_FFN_NORM, 1, E, 1, 1, "model.layers.%d.post_attention_layernorm.weight");
    out[n++] = spec(MOE_ROUTER, 2, E, X, 1, "model.layers.%d.mlp.gate.weight");
    out[n++] = spec(MOE_GATE_EXPS, 3, E, F, X, "model.layers.%d.mlp.experts");
    out[n++] = spec(MOE_UP_EXPS, 3, E, F, X, "model.layers.%d.mlp.experts");
    out[n++] = spec(MOE_DOWN_EXPS, 3, F, E, X, "model.layers.%d.mlp.experts");
    return n;
}

static void qwen3moe_write_hparams(const moe_model *m, gguf_writer *gw) {
    const moe_hparams *hp = &m->w.hp;
    const moe_layer_plan *p = &m->w.layers[0].p;
    char key[128];
    const char *arch = m->arch_name;
#define KV_U32(k, v) (snprintf(key, sizeof key, "%s.%s", arch, k), gw_kv_u32(gw, key, (uint32_t)(v)))
#define KV_F32(k, v) (snprintf(key, sizeof key, "%s.%s", arch, k), gw_kv_f32(gw, key, (v)))
    KV_U32("context_length", hp->n_ctx_train);
    KV_U32("embedding_length", hp->n_embd);
    KV_U32("block_count", hp->n_layer);
    KV_U32("feed_forward_length", p->n_ff_exp);
    KV_U32("attention.head_count", p->attn.n_head);
    KV_U32("attention.head_count_kv", p->attn.n_head_kv);
    KV_U32("attention.key_length", p->attn.head_dim);
    KV_U32("attention.value_length", p->attn.head_dim);
    KV_U32("rope.dimension_count", p->rope.n_rot);
    KV_U32("expert_count", p->n_expert);
    KV_U32("expert_used_count", p->n_expert_used);
    KV_U32("expert_feed_forward_length", p->n_ff_exp);
    KV_F32("attention.layer_norm_rms_epsilon", hp->rms_eps);
    KV_F32("rope.freq_base", p->rope.base);
#undef KV_U32
#undef KV_F32
    if (!p->norm_topk) {
        snprintf(key, sizeof key, "%s.expert_weights_norm", arch);
        gw_kv_bool(gw, key, 0);
    }
}

/* ---- Gemma 4 (ARCHITECTURES.md §2): sliding / full attention layers with their own geometry,
   K = V on full layers, sandwich norms, a dense GeGLU MLP (with routed experts beside it in the
   MoE model), per-layer embeddings and KV sharing in the small dense models ---- */

/* an integer per layer: a GGUF array of n_layer integers (or bools), or one value for all */
static moe_status gguf_layer_ints(const moe_model *m, const char *suffix, int required, int64_t lo, int64_t hi, int32_t dflt,
                                  int32_t *out) {
    char key[96];
    snprintf(key, sizeof key, "%s.%s", m->arch_name, suffix);
    int n = m->w.hp.n_layer;
    const gguf_kv *kv = gguf_find(&m->gguf, key);
    if (!kv || kv->type != GGUF_ARRAY) {
        int32_t v = dflt;
        moe_status st = gguf_arch_int(m, suffix, required, lo, hi, dflt, &v);
        for (int l = 0; l < n; l++) out[l] = v;
        return st;
    }
    size_t es = kv->arr_type == GGUF_U8 || kv->arr_type == GGUF_I8 || kv->arr_type == GGUF_BOOL ? 1
              : kv->arr_type == GGUF_U16 || kv->arr_type == GGUF_I16 ? 2
              : kv->arr_type == GGUF_U32 || kv->arr_type == GGUF_I32 ? 4
              : kv->arr_type == GGUF_U64 || kv->arr_type == GGUF_I64 ? 8 : 0;
    if (!es || kv->arr_n != (uint64_t)n)
        return set_error(MOE_ERR_FORMAT, "gguf: key '%s' must be an integer or an array of %d integers", key, n);
    for (int l = 0; l < n; l++) {
        gguf_kv e = {kv->key, kv->arr_type, 0, 0, kv->val + (size_t)l * es};
        int64_t v;
        if (!kv_as_i64(&e, &v) || v < lo || v > hi)
            return set_error(MOE_ERR_FORMAT, "gguf: key '%s'[%d] is outside [%lld, %lld]", key, l, (long long)lo, (long long)hi);
        out[l] = (int32_t)v;
    }
    return MOE_OK;
}

/* x rounded to the nearest bf16 (ties to even), as torch casts a Python float */
static float round_bf16(float x) {
    uint32_t u;
    memcpy(&u, &x, 4);
    u = (u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u;
    memcpy(&x, &u, 4);
    return x;
}

/* What both readers know of a Gemma 4 model, turned into plans by gemma4_plan. */
typedef struct gemma4_cfg {
    int32_t n_head, hd_swa, hd_full, window, n_ple, n_shared, n_expert, n_used, n_ff_exp;
    int32_t *sliding, *n_kv, *n_ff, *v_from_k;  /* [n_layer] */
    moe_rope rope_swa, rope_full;
} gemma4_cfg;

static moe_status gemma4_plan(moe_model *m, const gemma4_cfg *c) {
    moe_hparams *hp = &m->w.hp;
    int L = hp->n_layer, first_shared = L - c->n_shared;
    if (c->n_shared < 0 || c->n_shared >= L) return set_error(MOE_ERR_FORMAT, "model: %d KV-shared layers of %d", c->n_shared, L);
    moe_status st = plan_alloc(m);
    if (st) return st;
    for (int l = 0; l < L; l++) {
        moe_layer_plan *p = &m->w.layers[l].p;
        int sliding = c->sliding[l] != 0, hd = sliding ? c->hd_swa : c->hd_full;
        p->attn_kind = sliding ? MOE_ATTN_SLIDING : MOE_ATTN_FULL;
        moe_attn a = {c->n_head, c->n_kv[l], hd, sliding ? c->window : 0, 1.0f, l, 1};
        if (l >= first_shared) { /* K/V of the last non-shared layer of the same kind */
            a.store = 0;
            a.cache = -1;
            for (int j = first_shared - 1; j >= 0 && a.cache < 0; j--)
                if ((c->sliding[j] != 0) == sliding) a.cache = j;
            if (a.cache < 0) return set_error(MOE_ERR_FORMAT, "model: KV-shared layer %d has no earlier layer of its kind", l);
            a.n_head_kv = m->w.layers[a.cache].p.attn.n_head_kv;
        }
        p->attn = a;
        p->rope = sliding ? c->rope_swa : c->rope_full;
        p->v_from_k = c->v_from_k[l];
        p->v_norm = 1;
        p->ffn_kind = c->n_expert ? MOE_FFN_MOE_DENSE : MOE_FFN_DENSE;
        p->act = MOE_ACT_GELU_TANH;
        p->n_ff = c->n_ff[l];
        p->n_expert = c->n_expert;
        p->n_expert_used = c->n_used;
        p->n_ff_exp = c->n_ff_exp;
        p->norm_topk = 1;
        p->layer_scale = 0; /* read from layer_output_scale once the tensors are bound */
        if (p->n_ff < 1) return set_error(MOE_ERR_FORMAT, "model: layer %d has no dense FFN width", l);
    }
    hp->n_ple = c->n_ple;
    return MOE_OK;
}

static moe_status gemma4_hparams_gguf(moe_model *m) {
    moe_hparams *hp = &m->w.hp;
    gemma4_cfg c;
    memset(&c, 0, sizeof c);
    moe_status st;
    if ((st = gguf_arch_int(m, "embedding_length", 1, 1, 1 << 20, 0, &hp->n_embd)) ||
        (st = gguf_arch_int(m, "block_count", 1, 1, 4096, 0, &hp->n_layer)) ||
        (st = gguf_arch_int(m, "context_length", 0, 1, INT32_MAX, 131072, &hp->n_ctx_train)) ||
        (st = gguf_arch_int(m, "attention.head_count", 1, 1, 4096, 0, &c.n_head)) ||
        (st = gguf_arch_int(m, "attention.key_length", 1, 2, 4096, 0, &c.hd_full)) ||
        (st = gguf_arch_int(m, "attention.key_length_swa", 0, 2, 4096, c.hd_full, &c.hd_swa)) ||
        (st = gguf_arch_int(m, "attention.sliding_window", 1, 1, INT32_MAX, 0, &c.window)) ||
        (st = gguf_arch_int(m, "attention.shared_kv_layers", 0, 0, 4096, 0, &c.n_shared)) ||
        (st = gguf_arch_int(m, "embedding_length_per_layer_input", 0, 0, 1 << 16, 0, &c.n_ple)) ||
        (st = gguf_arch_int(m, "expert_count", 0, 0, 4096, 0, &c.n_expert)) ||
        (st = gguf_arch_int(m, "expert_used_count", c.n_expert > 0, 0, 4096, 0, &c.n_used)) ||
        (st = gguf_arch_int(m, "expert_feed_forward_length", c.n_expert > 0, 0, 1 << 20, 0, &c.n_ff_exp)))
        return st;
    int32_t v_len = c.hd_full, v_len_swa = c.hd_swa, rot = c.hd_full, rot_swa = c.hd_swa;
    if ((st = gguf_arch_int(m, "attention.value_length", 0, 1, 4096, c.hd_full, &v_len)) ||
        (st = gguf_arch_int(m, "attention.value_length_swa", 0, 1, 4096, c.hd_swa, &v_len_swa)) ||
        (st = gguf_arch_int(m, "rope.dimension_count", 0, 2, 4096, c.hd_full, &rot)) ||
        (st = gguf_arch_int(m, "rope.dimension_count_swa", 0, 2, 4096, c.hd_swa, &rot_swa)))
        return st;
    if (v_len != c.hd_full || v_len_swa != c.hd_swa)
        return set_error(MOE_ERR_UNSUPPORTED, "model: value lengths %d/%d differ from key lengths %d/%d", v_len, v_len_swa, c.hd_full, c.hd_swa);
    float base = 1e6f, base_swa = 1e4f;
    hp->rms_eps = 1e-6f;
    hp->logit_softcap = 0;
    /* the embedding scales as HF runs the bf16 release (llama.cpp uses the exact square roots,
       0.1 % away); files we write carry the ones their source used */
    hp->embd_scale = round_bf16(sqrtf((float)hp->n_embd));
    hp->ple_scale = c.n_ple ? round_bf16(sqrtf((float)c.n_ple)) : 0;
    if ((st = gguf_arch_f32(m, "attention.layer_norm_rms_epsilon", &hp->rms_eps)) || (st = gguf_arch_f32(m, "rope.freq_base", &base)) ||
        (st = gguf_arch_f32(m, "rope.freq_base_swa", &base_swa)) || (st = gguf_arch_f32(m, "final_logit_softcapping", &hp->logit_softcap)) ||
        (st = gguf_arch_f32(m, "embedding_scale", &hp->embd_scale)) || (st = gguf_arch_f32(m, "embedding_scale_per_layer", &hp->ple_scale)))
        return st;
    const gguf_tensor *pt = gguf_find_tensor(&m->gguf, k_global_names[MOE_PLE_TOK_EMBD]);
    hp->n_vocab_ple = pt && pt->ne[1] <= INT32_MAX ? (int32_t)pt->ne[1] : 0;
    int L = hp->n_layer;
    int32_t *arrs = moe_calloc((size_t)L * 4, sizeof *arrs);
    if (!arrs) return set_error(MOE_ERR_NO_MEMORY, "model: out of memory");
    c.sliding = arrs, c.n_kv = arrs + L, c.n_ff = arrs + 2 * L, c.v_from_k = arrs + 3 * L;
    if ((st = gguf_layer_ints(m, "attention.sliding_window_pattern", 1, 0, 1, 0, c.sliding)) ||
        (st = gguf_layer_ints(m, "attention.head_count_kv", 0, 1, 4096, c.n_head, c.n_kv)) ||
        (st = gguf_layer_ints(m, "feed_forward_length", 1, 1, 1 << 20, 0, c.n_ff)))
        goto done;
    /* full layers without attn_v take V from the K projection; proportional rope from rope_freqs
       (frequency divisors: 1 for the rotated pairs, huge for the rest) */
    for (int l = 0; l < L; l++) {
        char name[96];
        tensor_gguf_name(name, sizeof name, l, MOE_WV);
        c.v_from_k[l] = !c.sliding[l] && !gguf_find_tensor(&m->gguf, name) && l < L - c.n_shared;
    }
    int n_freq = rot / 2;
    const gguf_tensor *rf = gguf_find_tensor(&m->gguf, k_global_names[MOE_ROPE_FREQS]);
    if (rf) {
        float f[4096];
        if (rf->ne[0] != rot / 2 || rf->ne[1] != 1 || !type_traits(rf->type) || rf->ne[0] > 4096) {
            st = set_error(MOE_ERR_FORMAT, "model: rope_freqs must hold %d factors", rot / 2);
            goto done;
        }
        type_traits(rf->type)->dequant(rf->data, f, rf->ne[0]);
        n_freq = 0;
        while (n_freq < rot / 2 && f[n_freq] == 1.0f) n_freq++;
        for (int i = n_freq; i < rot / 2 && !st; i++)
            if (!(f[i] >= 1e20f)) st = set_error(MOE_ERR_UNSUPPORTED, "model: rope_freqs other than 1 then 1e30 are not supported");
        if (st) goto done;
    }
    moe_rope rs = {rot_swa, rot_swa / 2, rot_swa, base_swa}, rfull = {rot, n_freq, rot, base};
    c.rope_swa = rs;
    c.rope_full = rfull;
    st = gemma4_plan(m, &c);
done:
    moe_free(arrs);
    return st;
}

static moe_status gemma4_hparams_hf(moe_model *m, const json_doc *d) {
    moe_hparams *hp = &m->w.hp;
    uint32_t tc = json_get(d, 0, "text_config");
    if (!json_is(d, tc, JSON_OBJECT)) tc = 0;
    gemma4_cfg c;
    memset(&c, 0, sizeof c);
    int32_t n_kv = 0, n_kv_full = 0, n_ff = 0, vocab_ple = 0;
    struct { const char *key; int32_t *dst; int64_t lo, hi; int required; } ints[] = {
        {"hidden_size", &hp->n_embd, 1, 1 << 20, 1}, {"num_hidden_layers", &hp->n_layer, 1, 4096, 1},
        {"num_attention_heads", &c.n_head, 1, 4096, 1}, {"num_key_value_heads", &n_kv, 1, 4096, 1},
        {"num_global_key_value_heads", &n_kv_full, 1, 4096, 0}, {"head_dim", &c.hd_swa, 2, 4096, 1},
        {"global_head_dim", &c.hd_full, 2, 4096, 0}, {"intermediate_size", &n_ff, 1, 1 << 20, 1},
        {"sliding_window", &c.window, 1, INT32_MAX, 1}, {"num_experts", &c.n_expert, 0, 4096, 0},
        {"top_k_experts", &c.n_used, 0, 4096, 0}, {"moe_intermediate_size", &c.n_ff_exp, 0, 1 << 20, 0},
        {"hidden_size_per_layer_input", &c.n_ple, 0, 1 << 16, 0}, {"vocab_size_per_layer_input", &vocab_ple, 0, INT32_MAX, 0},
        {"num_kv_shared_layers", &c.n_shared, 0, 4096, 0}, {"max_position_embeddings", &hp->n_ctx_train, 1, INT32_MAX, 0}};
    hp->n_ctx_train = 131072;
    for (size_t i = 0; i < sizeof ints / sizeof ints[0]; i++) {
        uint32_t n = json_get(d, tc, ints[i].key);
        int64_t v;
        if ((!n || json_is(d, n, JSON_NULL)) && !ints[i].required) continue;
        if (!json_int(d, n, ints[i].lo, ints[i].hi, &v))
            return set_error(MOE_ERR_FORMAT, "config.json: '%s' is %s", ints[i].key, n ? "out of range or not an integer" : "missing");
        *ints[i].dst = (int32_t)v;
    }
    if (!c.hd_full) c.hd_full = c.hd_swa;
    if (!json_bool(d, json_get(d, tc, "enable_moe_block"), 0)) c.n_expert = c.n_used = c.n_ff_exp = 0;
    else if (!c.n_expert || !c.n_used || !c.n_ff_exp) return set_error(MOE_ERR_FORMAT, "config.json: the MoE block needs num_experts, top_k_experts and moe_intermediate_size");
    int k_eq_v = json_bool(d, json_get(d, tc, "attention_k_eq_v"), 0), double_wide = json_bool(d, json_get(d, tc, "use_double_wide_mlp"), 0);
    double eps = 1e-6, cap = 0;
    uint32_t n = json_get(d, tc, "rms_norm_eps");
    if (n && !json_double(d, n, &eps)) return set_error(MOE_ERR_FORMAT, "config.json: rms_norm_eps is not a number");
    n = json_get(d, tc, "final_logit_softcapping");
    if (n && !json_is(d, n, JSON_NULL) && !json_double(d, n, &cap)) return set_error(MOE_ERR_FORMAT, "config.json: final_logit_softcapping is not a number");
    hp->rms_eps = (float)eps;
    hp->logit_softcap = (float)cap;
    /* HF scales the embedding by sqrt(hidden) cast to the model's dtype */
    uint32_t dt = json_get(d, tc, "dtype");
    if (!dt) dt = json_get(d, tc, "torch_dtype");
    if (!dt) dt = json_get(d, 0, "dtype");
    if (!dt) dt = json_get(d, 0, "torch_dtype");
    int bf16 = !dt || json_str_eq(d, dt, "bfloat16");
    hp->embd_scale = bf16 ? round_bf16(sqrtf((float)hp->n_embd)) : sqrtf((float)hp->n_embd);
    hp->ple_scale = c.n_ple ? (bf16 ? round_bf16(sqrtf((float)c.n_ple)) : sqrtf((float)c.n_ple)) : 0;
    hp->n_vocab_ple = vocab_ple;
    /* rope: rope_parameters.{sliding_attention, full_attention} */
    uint32_t rp = json_get(d, tc, "rope_parameters");
    double th_swa = 10000.0, th_full = 1000000.0, partial = 1.0;
    uint32_t rs = json_get(d, rp, "sliding_attention"), rfl = json_get(d, rp, "full_attention");
    if ((n = json_get(d, rs, "rope_theta")) && !json_double(d, n, &th_swa)) return set_error(MOE_ERR_FORMAT, "config.json: rope_theta is not a number");
    if ((n = json_get(d, rfl, "rope_theta")) && !json_double(d, n, &th_full)) return set_error(MOE_ERR_FORMAT, "config.json: rope_theta is not a number");
    if ((n = json_get(d, rfl, "partial_rotary_factor")) && !json_double(d, n, &partial)) return set_error(MOE_ERR_FORMAT, "config.json: partial_rotary_factor is not a number");
    uint32_t rt = json_get(d, rfl, "rope_type");
    if (rt && !json_str_eq(d, rt, "proportional") && !json_str_eq(d, rt, "default"))
        return set_error(MOE_ERR_UNSUPPORTED, "config.json: full-attention rope_type other than proportional or default");
    if (!(th_swa > 0) || !(th_full > 0) || !(partial > 0) || partial > 1) return set_error(MOE_ERR_FORMAT, "config.json: bad rope parameters");
    moe_rope r1 = {c.hd_swa, c.hd_swa / 2, c.hd_swa, (float)th_swa}, r2 = {c.hd_full, (int32_t)(partial * c.hd_full / 2), c.hd_full, (float)th_full};
    c.rope_swa = r1;
    c.rope_full = r2;
    int L = hp->n_layer;
    int32_t *arrs = moe_calloc((size_t)L * 4, sizeof *arrs);
    if (!arrs) return set_error(MOE_ERR_NO_MEMORY, "config.json: out of memory");
    c.sliding = arrs, c.n_kv = arrs + L, c.n_ff = arrs + 2 * L, c.v_from_k = arrs + 3 * L;
    moe_status st = MOE_OK;
    uint32_t lt = json_get(d, tc, "layer_types");
    if (!json_is(d, lt, JSON_ARRAY) || d->nodes[lt].len != (uint32_t)L) st = set_error(MOE_ERR_FORMAT, "config.json: layer_types must list %d layers", L);
    int l = 0;
    for (uint32_t j = lt + 1; !st && j < d->nodes[lt].end; j = d->nodes[j].end, l++) {
        int sl = json_str_eq(d, j, "sliding_attention");
        if (!sl && !json_str_eq(d, j, "full_attention")) st = set_error(MOE_ERR_UNSUPPORTED, "config.json: layer %d has an unknown layer type", l);
        c.sliding[l] = sl;
        c.v_from_k[l] = !sl && k_eq_v;
        c.n_kv[l] = !sl && k_eq_v && n_kv_full ? n_kv_full : n_kv;
        c.n_ff[l] = n_ff * (double_wide && l >= L - c.n_shared ? 2 : 1);
    }
    if (!st) st = gemma4_plan(m, &c);
    moe_free(arrs);
    return st;
}

#define G4 "model.language_model."
static int gemma4_tensors(const moe_weights *w, int l, tensor_spec *out) {
    const moe_hparams *hp = &w->hp;
    int64_t E = hp->n_embd, V = hp->n_vocab, P = hp->n_ple, LP = (int64_t)hp->n_layer * hp->n_ple;
    int n = 0;
    if (l < 0) {
        out[n++] = spec(MOE_TOK_EMBD, 2, E, V, 1, G4 "embed_tokens.weight");
        out[n++] = spec(MOE_OUTPUT_NORM, 1, E, 1, 1, G4 "norm.weight");
        out[n] = spec(MOE_OUTPUT, 2, E, V, 1, "lm_head.weight");
        out[n++].flags = TS_OPTIONAL;
        int32_t rot = 0; /* rope_freqs: GGUF only (llama.cpp's form of proportional rope) */
        for (int j = 0; j < hp->n_layer; j++)
            if (w->layers[j].p.attn_kind == MOE_ATTN_FULL) rot = w->layers[j].p.rope.n_rot;
        if (rot) {
            out[n] = spec(MOE_ROPE_FREQS, 1, rot / 2, 1, 1, NULL);
            out[n++].flags = TS_OPTIONAL;
        }
        if (P) {
            out[n++] = spec(MOE_PLE_TOK_EMBD, 2, LP, hp->n_vocab_ple, 1, G4 "embed_tokens_per_layer.weight");
            out[n++] = spec(MOE_PLE_MODEL_PROJ, 2, E, LP, 1, G4 "per_layer_model_projection.weight");
            out[n++] = spec(MOE_PLE_PROJ_NORM, 1, P, 1, 1, G4 "per_layer_projection_norm.weight");
        }
        return n;
    }
    const moe_layer_plan *p = &w->layers[l].p;
    int64_t hd = p->attn.head_dim, Q = (int64_t)p->attn.n_head * hd, KV = (int64_t)p->attn.n_head_kv * hd;
    int64_t F = p->n_ff, X = p->n_expert, FX = p->n_ff_exp;
    out[n++] = spec(MOE_ATTN_NORM, 1, E, 1, 1, G4 "layers.%d.input_layernorm.weight");
    out[n++] = spec(MOE_WQ, 2, E, Q, 1, G4 "layers.%d.self_attn.q_proj.weight");
    if (p->attn.store) {
        out[n++] = spec(MOE_WK, 2, E, KV, 1, G4 "layers.%d.self_attn.k_proj.weight");
        if (!p->v_from_k) out[n++] = spec(MOE_WV, 2, E, KV, 1, G4 "layers.%d.self_attn.v_proj.weight");
    }
    out[n++] = spec(MOE_WO, 2, Q, E, 1, G4 "layers.%d.self_attn.o_proj.weight");
    out[n++] = spec(MOE_Q_NORM, 1, hd, 1, 1, G4 "layers.%d.self_attn.q_norm.weight");
    if (p->attn.store) out[n++] = spec(MOE_K_NORM, 1, hd, 1, 1, G4 "layers.%d.self_attn.k_norm.weight");
    out[n++] = spec(MOE_POST_ATTN_NORM, 1, E, 1, 1, G4 "layers.%d.post_attention_layernorm.weight");
    out[n++] = spec(MOE_FFN_NORM, 1, E, 1, 1, G4 "layers.%d.pre_feedforward_layernorm.weight");
    out[n++] = spec(MOE_FFN_GATE, 2, E, F, 1, G4 "layers.%d.mlp.gate_proj.weight");
    out[n++] = spec(MOE_FFN_UP, 2, E, F, 1, G4 "layers.%d.mlp.up_proj.weight");
    out[n++] = spec(MOE_FFN_DOWN, 2, F, E, 1, G4 "layers.%d.mlp.down_proj.weight");
    out[n++] = spec(MOE_POST_FFN_NORM, 1, E, 1, 1, G4 "layers.%d.post_feedforward_layernorm.weight");
    if (p->ffn_kind == MOE_FFN_MOE_DENSE) {
        out[n++] = spec(MOE_POST_FFN_NORM_1, 1, E, 1, 1, G4 "layers.%d.post_feedforward_layernorm_1.weight");
        out[n++] = spec(MOE_ROUTER, 2, E, X, 1, G4 "layers.%d.router.proj.weight");
        out[n++] = spec(MOE_ROUTER_SCALE, 1, E, 1, 1, G4 "layers.%d.router.scale");
        out[n++] = spec(MOE_EXPERT_SCALE, 1, X, 1, 1, G4 "layers.%d.router.per_expert_scale");
        out[n++] = spec(MOE_PRE_FFN_NORM_2, 1, E, 1, 1, G4 "layers.%d.pre_feedforward_layernorm_2.weight");
        out[n++] = spec(MOE_GATE_EXPS, 3, E, FX, X, G4 "layers.%d.experts");
        out[n++] = spec(MOE_UP_EXPS, 3, E, FX, X, G4 "layers.%d.experts");
        out[n++] = spec(MOE_DOWN_EXPS, 3, FX, E, X, G4 "layers.%d.experts");
        out[n++] = spec(MOE_POST_FFN_NORM_2, 1, E, 1, 1, G4 "layers.%d.post_feedforward_layernorm_2.weight");
    }
    out[n++] = spec(MOE_LAYER_SCALE, 1, 1, 1, 1, G4 "layers.%d.layer_scalar");
    if (P) {
        out[n++] = spec(MOE_PLE_GATE, 2, E, P, 1, G4 "layers.%d.per_layer_input_gate.weight");
        out[n++] = spec(MOE_PLE_PROJ, 2, P, E, 1, G4 "layers.%d.per_layer_projection.weight");
        out[n++] = spec(MOE_PLE_POST_NORM, 1, E, 1, 1, G4 "layers.%d.post_per_layer_input_norm.weight");
    }
    return n;
}
#undef G4

/* after binding: the layer scalars into the plans, rope_freqs made when the source had none
   (a GGUF we write must carry it for llama.cpp) */
static moe_status gemma4_finish(moe_model *m) {
    moe_hparams *hp = &m->w.hp;
    for (int l = 0; l < hp->n_layer; l++) {
        moe_layer *L = &m->w.layers[l];
        const moe_weight *s = moe_lw(L, MOE_LAYER_SCALE);
        L->p.layer_scale = s ? ((const float *)s->data)[0] : 0;
        if (L->p.attn_kind == MOE_ATTN_FULL && !m->w.g[MOE_ROPE_FREQS].data) {
            const moe_rope *r = &L->p.rope;
            int half = r->n_rot / 2;
            float *f = moe_malloc((size_t)half * sizeof *f);
            if (!f) return set_error(MOE_ERR_NO_MEMORY, "model: out of memory");
            for (int i = 0; i < half; i++) f[i] = i < r->n_freq ? 1.0f : 1e30f;
            m->rope_freqs = f;
            moe_weight *w = &m->w.g[MOE_ROPE_FREQS];
            w->name = k_global_names[MOE_ROPE_FREQS];
            w->type = MOE_TYPE_F32;
            w->n_dims = 1;
            w->ne[0] = half;
            w->ne[1] = w->ne[2] = w->ne[3] = 1;
            w->nbytes = w->row_bytes = (uint64_t)half * 4;
            w->data = (const uint8_t *)f;
        }
    }
    if (hp->n_ple && hp->n_vocab_ple < hp->n_vocab)
        return set_error(MOE_ERR_FORMAT, "model: the per-layer embedding has %d rows for %d tokens", hp->n_vocab_ple, hp->n_vocab);
    return MOE_OK;
}

static void gemma4_write_hparams(const moe_model *m, gguf_writer *gw) {
    const moe_hparams *hp = &m->w.hp;
    int L = hp->n_layer;
    char key[128];
    const char *arch = m->arch_name;
    const moe_layer_plan *full = NULL, *swa = NULL;
    for (int l = 0; l < L; l++) {
        const moe_layer_plan *p = &m->w.layers[l].p;
        if (p->attn_kind == MOE_ATTN_FULL && !full) full = p;
        if (p->attn_kind == MOE_ATTN_SLIDING && !swa) swa = p;
    }
    if (!full) full = &m->w.layers[0].p;
    if (!swa) swa = full;
#define KV_U32(k, v) (snprintf(key, sizeof key, "%s.%s", arch, k), gw_kv_u32(gw, key, (uint32_t)(v)))
#define KV_F32(k, v) (snprintf(key, sizeof key, "%s.%s", arch, k), gw_kv_f32(gw, key, (v)))
    KV_U32("context_length", hp->n_ctx_train);
    KV_U32("embedding_length", hp->n_embd);
    KV_U32("block_count", L);
    KV_U32("attention.head_count", full->attn.n_head);
    KV_U32("attention.key_length", full->attn.head_dim);
    KV_U32("attention.value_length", full->attn.head_dim);
    KV_U32("attention.key_length_swa", swa->attn.head_dim);
    KV_U32("attention.value_length_swa", swa->attn.head_dim);
    KV_U32("attention.sliding_window", swa->attn.window);
    KV_U32("rope.dimension_count", full->rope.n_rot);
    KV_U32("rope.dimension_count_swa", swa->rope.n_rot);
    KV_F32("rope.freq_base", full->rope.base);
    KV_F32("rope.freq_base_swa", swa->rope.base);
    KV_F32("attention.layer_norm_rms_epsilon", hp->rms_eps);
    KV_F32("final_logit_softcapping", hp->logit_softcap);
    KV_F32("embedding_scale", hp->embd_scale);
    if (hp->n_ple) KV_F32("embedding_scale_per_layer", hp->ple_scale);
    int n_shared = 0;
    for (int l = 0; l < L; l++) n_shared += !m->w.layers[l].p.attn.store;
    KV_U32("attention.shared_kv_layers", n_shared);
    if (hp->n_ple) KV_U32("embedding_length_per_layer_input", hp->n_ple);
    if (full->n_expert) {
        KV_U32("expert_count", full->n_expert);
        KV_U32("expert_used_count", full->n_expert_used);
        KV_U32("expert_feed_forward_length", full->n_ff_exp);
    }
#undef KV_U32
#undef KV_F32
    int32_t *v = moe_malloc((size_t)L * sizeof *v);
    uint8_t *b = moe_malloc((size_t)L);
    if (v && b) { /* per-layer arrays */
        for (int l = 0; l < L; l++) b[l] = m->w.layers[l].p.attn_kind == MOE_ATTN_SLIDING;
        snprintf(key, sizeof key, "%s.attention.sliding_window_pattern", arch);
        gw_kv_array(gw, key, GGUF_BOOL, b, (uint64_t)L);
        for (int l = 0; l < L; l++) v[l] = m->w.layers[l].p.attn.n_head_kv;
        snprintf(key, sizeof key, "%s.attention.head_count_kv", arch);
        gw_kv_array(gw, key, GGUF_I32, v, (uint64_t)L);
        for (int l = 0; l < L; l++) v[l] = m->w.layers[l].p.n_ff;
        snprintf(key, sizeof key, "%s.feed_forward_length", arch);
        gw_kv_array(gw, key, GGUF_I32, v, (uint64_t)L);
    } else gw->kv.oom = 1;
    moe_free(v);
    moe_free(b);
}


/* ==== hybrid Gated DeltaNet models: Qwen3-Next, Qwen3.5-MoE, dense Qwen3.5 (ARCHITECTURES.md §3) ====
   Three of every four layers are Gated DeltaNet (linear attention with a recurrent f32 state),
   every fourth is gated full attention (q carries an output gate; partial rope over a quarter of
   the head; q/k norms); the FFN is routed SwiGLU experts plus a shared expert gated by
   sigmoid(w·x) (Qwen3-Next, Qwen3.5-MoE) or one dense SwiGLU (Qwen3.5).
   Conventions, settled at load so the forward pass sees one form:
   - norms: the weights are the multipliers (GGUF and MLX store them so; Hugging Face checkpoints
     store w of y = r(x)·(1 + w), and loading adds the 1), except the DeltaNet output norm,
     plain in every format;
   - ssm_a holds -exp(A_log) (GGUF; loading a Hugging Face A_log converts it);
   - q_all | k_all | v_all and z are separate projections (Qwen3-Next's per-key-head interleaved
     in_proj_qkvz is regrouped at load, as llama.cpp's converter does); Qwen3-Next's b/a stay
     one grouped projection (ssm_ba, dn.ba_grouped);
   - value heads: Hugging Face's grouped order, or the tiled order of llama.cpp's Qwen3.5 GGUFs
     (dn.v_tiled), which only changes which key head a value head reads. */
typedef struct hybrid_geom {
    int32_t n_head, n_head_kv, head_dim, n_rot;
    float rope_base;
    int32_t nk, nv, dk, dv, conv_k;
    int32_t n_expert, n_used, n_ff_exp, n_ff_shexp, n_ff;  /* n_expert 0: a dense FFN of n_ff */
    int32_t norm_topk, v_tiled, ba_grouped, interval;
} hybrid_geom;

static moe_status hybrid_plan(moe_model *m, const hybrid_geom *g, const uint8_t *full) {
    if (g->n_head < 1 || g->n_head_kv < 1 || g->n_head % g->n_head_kv || g->head_dim < 2 || g->n_rot > g->head_dim || g->n_rot < 2 || g->n_rot % 2)
        return set_error(MOE_ERR_FORMAT, "model: attention heads %d / %d of size %d with rope over %d do not fit together",
                         g->n_head, g->n_head_kv, g->head_dim, g->n_rot);
    if (g->nk < 1 || g->nv < g->nk || g->nv % g->nk || g->dk < 1 || g->dv < 1 || g->conv_k < 1 || g->conv_k > 16)
        return set_error(MOE_ERR_FORMAT, "model: Gated DeltaNet with %d key heads, %d value heads (%d, %d wide), conv %d does not fit",
                         g->nk, g->nv, g->dk, g->dv, g->conv_k);
    if (g->n_expert ? (g->n_used < 1 || g->n_used > g->n_expert || g->n_ff_exp < 1) : g->n_ff < 1)
        return set_error(MOE_ERR_FORMAT, "model: FFN with %d experts (%d used, width %d), dense width %d", g->n_expert, g->n_used,
                         g->n_ff_exp, g->n_ff);
    moe_status st = plan_alloc(m);
    if (st) return st;
    for (int l = 0; l < m->w.hp.n_layer; l++) {
        moe_layer_plan *p = &m->w.layers[l].p;
        if (full[l]) {
            p->attn_kind = MOE_ATTN_FULL;
            moe_attn a = {g->n_head, g->n_head_kv, g->head_dim, 0, 1.0f / sqrtf((float)g->head_dim), l, 1};
            p->attn = a;
            moe_rope r = {g->n_rot, g->n_rot / 2, g->n_rot, g->rope_base};
            p->rope = r;
            p->attn_gate = 1;
        } else {
            p->attn_kind = MOE_ATTN_DELTANET;
            moe_deltanet dn = {g->nk, g->nv, g->dk, g->dv, g->conv_k, g->v_tiled && g->nk != g->nv, g->ba_grouped, 0};
            p->dn = dn;
        }
        p->act = MOE_ACT_SILU;
        if (g->n_expert) {
            p->ffn_kind = g->n_ff_shexp > 0 ? MOE_FFN_MOE_SHARED : MOE_FFN_MOE;
            p->n_expert = g->n_expert;
            p->n_expert_used = g->n_used;
            p->n_ff_exp = g->n_ff_exp;
            p->n_ff_shexp = g->n_ff_shexp;
            p->norm_topk = g->norm_topk;
        } else {
            p->ffn_kind = MOE_FFN_DENSE;
            p->n_ff = g->n_ff;
        }
    }
    return MOE_OK;
}

static int arch_is(const moe_model *m, const char *name) { return !strcmp(m->arch->name, name); }

static moe_status hybrid_hparams_gguf(moe_model *m) {
    moe_hparams *hp = &m->w.hp;
    hybrid_geom g = {0};
    moe_status st;
    int32_t v_len, inner;
    if ((st = gguf_arch_int(m, "embedding_length", 1, 1, 1 << 20, 0, &hp->n_embd)) ||
        (st = gguf_arch_int(m, "block_count", 1, 1, 4096, 0, &hp->n_layer)) ||
        (st = gguf_arch_int(m, "context_length", 0, 1, INT32_MAX, 4096, &hp->n_ctx_train)) ||
        (st = gguf_arch_int(m, "attention.head_count", 1, 1, 4096, 0, &g.n_head)) ||
        (st = gguf_arch_int(m, "attention.head_count_kv", 0, 1, 4096, g.n_head, &g.n_head_kv)) ||
        (st = gguf_arch_int(m, "attention.key_length", 0, 2, 4096, hp->n_embd / g.n_head, &g.head_dim)) ||
        (st = gguf_arch_int(m, "attention.value_length", 0, 1, 4096, g.head_dim, &v_len)) ||
        (st = gguf_arch_int(m, "rope.dimension_count", 0, 2, 4096, g.head_dim / 4, &g.n_rot)) ||
        (st = gguf_arch_int(m, "ssm.conv_kernel", 1, 1, 16, 0, &g.conv_k)) ||
        (st = gguf_arch_int(m, "ssm.state_size", 1, 1, 4096, 0, &g.dk)) ||
        (st = gguf_arch_int(m, "ssm.group_count", 1, 1, 4096, 0, &g.nk)) ||
        (st = gguf_arch_int(m, "ssm.time_step_rank", 1, 1, 4096, 0, &g.nv)) ||
        (st = gguf_arch_int(m, "ssm.inner_size", 1, 1, 1 << 24, 0, &inner)) ||
        (st = gguf_arch_int(m, "full_attention_interval", 0, 1, 4096, 4, &g.interval)))
        return st;
    if (v_len != g.head_dim) return set_error(MOE_ERR_UNSUPPORTED, "model: value_length %d != key_length %d", v_len, g.head_dim);
    if (inner % g.nv) return set_error(MOE_ERR_FORMAT, "model: ssm.inner_size %d is not a multiple of ssm.time_step_rank %d", inner, g.nv);
    g.dv = inner / g.nv;
    if (arch_is(m, "qwen35")) {
        if ((st = gguf_arch_int(m, "feed_forward_length", 1, 1, 1 << 20, 0, &g.n_ff))) return st;
    } else if ((st = gguf_arch_int(m, "expert_count", 1, 1, 4096, 0, &g.n_expert)) ||
               (st = gguf_arch_int(m, "expert_used_count", 1, 1, 4096, 0, &g.n_used)) ||
               (st = gguf_arch_int(m, "expert_feed_forward_length", 1, 1, 1 << 20, 0, &g.n_ff_exp)) ||
               (st = gguf_arch_int(m, "expert_shared_feed_forward_length", 0, 0, 1 << 20, 0, &g.n_ff_shexp)) ||
               (st = gguf_arch_int(m, "expert_weights_norm", 0, 0, 1, 1, &g.norm_topk)))
        return st;
    g.rope_base = 10000.0f;
    hp->rms_eps = 1e-6f;
    if ((st = gguf_arch_f32(m, "attention.layer_norm_rms_epsilon", &hp->rms_eps)) || (st = gguf_arch_f32(m, "rope.freq_base", &g.rope_base)))
        return st;
    g.v_tiled = !arch_is(m, "qwen3next"); /* llama.cpp reorders Qwen3.5's value heads, not Qwen3-Next's */
    g.ba_grouped = arch_is(m, "qwen3next");
    uint8_t *full = moe_calloc((size_t)hp->n_layer, 1);
    if (!full) return set_error(MOE_ERR_NO_MEMORY, "model: out of memory");
    for (int l = 0; l < hp->n_layer; l++) full[l] = (l + 1) % g.interval == 0;
    st = hybrid_plan(m, &g, full);
    moe_free(full);
    return st;
}

/* config.json: the text model's keys at the top (qwen3_next, qwen3_5*_text) or under text_config */
static moe_status hybrid_hparams_hf(moe_model *m, const json_doc *d) {
    moe_hparams *hp = &m->w.hp;
    uint32_t root = json_get(d, 0, "text_config");
    if (!json_is(d, root, JSON_OBJECT)) root = 0;
    if (json_get(d, 0, "vision_config")) log_msg(&m->log, MOE_LOG_INFO, "config.json: the vision tower (model.visual.*) is not loaded");
    hybrid_geom g = {0};
    int32_t moe = !arch_is(m, "qwen35");
    struct { const char *key; int32_t *dst; int64_t lo, hi; int required; } ints[] = {
        {"hidden_size", &hp->n_embd, 1, 1 << 20, 1}, {"num_hidden_layers", &hp->n_layer, 1, 4096, 1},
        {"num_attention_heads", &g.n_head, 1, 4096, 1}, {"num_key_value_heads", &g.n_head_kv, 1, 4096, 1},
        {"head_dim", &g.head_dim, 2, 4096, 0}, {"max_position_embeddings", &hp->n_ctx_train, 1, INT32_MAX, 0},
        {"linear_conv_kernel_dim", &g.conv_k, 1, 16, 1}, {"linear_key_head_dim", &g.dk, 1, 4096, 1},
        {"linear_value_head_dim", &g.dv, 1, 4096, 1}, {"linear_num_key_heads", &g.nk, 1, 4096, 1},
        {"linear_num_value_heads", &g.nv, 1, 4096, 1}, {"full_attention_interval", &g.interval, 1, 4096, 0},
        {"num_experts", &g.n_expert, 1, 4096, moe}, {"num_experts_per_tok", &g.n_used, 1, 4096, moe},
        {"moe_intermediate_size", &g.n_ff_exp, 1, 1 << 20, moe}, {"shared_expert_intermediate_size", &g.n_ff_shexp, 0, 1 << 20, 0},
        {"intermediate_size", &g.n_ff, 1, 1 << 20, !moe}};
    hp->n_ctx_train = 4096;
    g.interval = 4;
    for (size_t i = 0; i < sizeof ints / sizeof ints[0]; i++) {
        uint32_t n = json_get(d, root, ints[i].key);
        int64_t v;
        if (!n && !ints[i].required) continue;
        if (!json_int(d, n, ints[i].lo, ints[i].hi, &v))
            return set_error(MOE_ERR_FORMAT, "config.json: '%s' is %s", ints[i].key, n ? "out of range or not an integer" : "missing");
        *ints[i].dst = (int32_t)v;
    }
    if (!moe) g.n_expert = 0;
    uint32_t mlp_only = json_get(d, root, "mlp_only_layers");
    if (json_is(d, mlp_only, JSON_ARRAY) && d->nodes[mlp_only].len)
        return set_error(MOE_ERR_UNSUPPORTED, "config.json: mlp_only_layers (dense layers) are not supported");
    if (!g.head_dim) g.head_dim = hp->n_embd / g.n_head;
    uint32_t rp = json_get(d, root, "rope_parameters");
    if (!rp) rp = json_get(d, root, "rope_scaling");
    double eps = 1e-6, theta = 10000.0, partial = 0.25;
    uint32_t n = json_get(d, root, "rms_norm_eps");
    if (n && !json_double(d, n, &eps)) return set_error(MOE_ERR_FORMAT, "config.json: rms_norm_eps is not a number");
    if (!(n = json_get(d, root, "rope_theta"))) n = json_get(d, rp, "rope_theta");
    if (n && !json_double(d, n, &theta)) return set_error(MOE_ERR_FORMAT, "config.json: rope_theta is not a number");
    if (!(n = json_get(d, root, "partial_rotary_factor"))) n = json_get(d, rp, "partial_rotary_factor");
    if (n && !json_double(d, n, &partial)) return set_error(MOE_ERR_FORMAT, "config.json: partial_rotary_factor is not a number");
    uint32_t rt = json_get(d, rp, "rope_type");
    if (!rt) rt = json_get(d, rp, "type");
    if (rt && !json_str_eq(d, rt, "default"))
        return set_error(MOE_ERR_UNSUPPORTED, "config.json: rope type other than 'default' is not supported yet");
    hp->rms_eps = (float)eps;
    g.rope_base = (float)theta;
    g.n_rot = (int32_t)(g.head_dim * partial);
    g.norm_topk = json_bool(d, json_get(d, root, "norm_topk_prob"), 1);
    if (!arch_is(m, "qwen3next")) g.norm_topk = 1; /* Qwen3.5's router always renormalises */
    g.ba_grouped = arch_is(m, "qwen3next");
    if (!(hp->rms_eps > 0) || !(theta > 0)) return set_error(MOE_ERR_FORMAT, "config.json: rms_norm_eps and rope_theta must be positive");
    uint8_t *full = moe_calloc((size_t)hp->n_layer, 1);
    if (!full) return set_error(MOE_ERR_NO_MEMORY, "model: out of memory");
    uint32_t lt = json_get(d, root, "layer_types");
    if (json_is(d, lt, JSON_ARRAY)) {
        if (d->nodes[lt].len != (uint32_t)hp->n_layer) {
            moe_free(full);
            return set_error(MOE_ERR_FORMAT, "config.json: layer_types has %u entries for %d layers", d->nodes[lt].len, hp->n_layer);
        }
        int l = 0;
        for (uint32_t j = lt + 1; j < d->nodes[lt].end; j = d->nodes[j].end, l++) {
            if (json_str_eq(d, j, "full_attention")) full[l] = 1;
            else if (!json_str_eq(d, j, "linear_attention")) {
                moe_free(full);
                return set_error(MOE_ERR_UNSUPPORTED, "config.json: layer_types[%d] is neither linear_attention nor full_attention", l);
            }
        }
    } else
        for (int l = 0; l < hp->n_layer; l++) full[l] = (l + 1) % g.interval == 0;
    moe_status st = hybrid_plan(m, &g, full);
    moe_free(full);
    return st;
}

enum { TS_HF_QKVZ = 2 };   /* Qwen3-Next HF: rows regrouped out of in_proj_qkvz at load */

/* the tensors of one layer; prefix: the HF name of the text model ("model." or
   "model.language_model.") */
static int hybrid_tensors(const moe_weights *w, int l, tensor_spec *out, const char *const *hf) {
    const moe_hparams *hp = &w->hp;
    int64_t E = hp->n_embd, V = hp->n_vocab;
    int n = 0;
    if (l < 0) {
        out[n++] = spec(MOE_TOK_EMBD, 2, E, V, 1, hf[0]);
        out[n++] = spec(MOE_OUTPUT_NORM, 1, E, 1, 1, hf[1]);
        out[n] = spec(MOE_OUTPUT, 2, E, V, 1, "lm_head.weight");
        out[n++].flags = TS_OPTIONAL;
        return n;
    }
    const moe_layer_plan *p = &w->layers[l].p;
    const char *const *h = hf + 2; /* the per-layer names, in the order below */
    out[n++] = spec(MOE_ATTN_NORM, 1, E, 1, 1, h[0]);
    out[n++] = spec(MOE_POST_ATTN_NORM, 1, E, 1, 1, h[1]);
    if (p->attn_kind == MOE_ATTN_FULL) {
        int64_t hd = p->attn.head_dim, Q = (int64_t)p->attn.n_head * hd, KV = (int64_t)p->attn.n_head_kv * hd;
        out[n++] = spec(MOE_WQ, 2, E, 2 * Q, 1, h[2]);
        out[n++] = spec(MOE_WK, 2, E, KV, 1, h[3]);
        out[n++] = spec(MOE_WV, 2, E, KV, 1, h[4]);
        out[n++] = spec(MOE_WO, 2, Q, E, 1, h[5]);
        out[n++] = spec(MOE_Q_NORM, 1, hd, 1, 1, h[6]);
        out[n++] = spec(MOE_K_NORM, 1, hd, 1, 1, h[7]);
    } else {
        const moe_deltanet *dn = &p->dn;
        int64_t KD = (int64_t)dn->n_k_head * dn->k_dim, VD = (int64_t)dn->n_v_head * dn->v_dim, C = 2 * KD + VD;
        out[n] = spec(MOE_SSM_QKV, 2, E, C, 1, h[8]);
        if (dn->ba_grouped && strstr(h[8], "qkvz")) out[n].flags = TS_HF_QKVZ;
        n++;
        out[n] = spec(MOE_SSM_Z, 2, E, VD, 1, h[9]);
        if (dn->ba_grouped && strstr(h[9], "qkvz")) out[n].flags = TS_HF_QKVZ;
        n++;
        if (dn->ba_grouped) out[n++] = spec(MOE_SSM_BA, 2, E, 2 * (int64_t)dn->n_v_head, 1, h[10]);
        else {
            out[n++] = spec(MOE_SSM_BETA, 2, E, dn->n_v_head, 1, h[10]);
            out[n++] = spec(MOE_SSM_ALPHA, 2, E, dn->n_v_head, 1, h[11]);
        }
        out[n++] = spec(MOE_SSM_CONV, 2, dn->conv_k, C, 1, h[12]);
        out[n++] = spec(MOE_SSM_DT, 1, dn->n_v_head, 1, 1, h[13]);
        out[n++] = spec(MOE_SSM_A, 1, dn->n_v_head, 1, 1, h[14]);
        out[n++] = spec(MOE_SSM_NORM, 1, dn->v_dim, 1, 1, h[15]);
        out[n++] = spec(MOE_SSM_OUT, 2, VD, E, 1, h[16]);
    }
    if (p->ffn_kind == MOE_FFN_DENSE) {
        out[n++] = spec(MOE_FFN_GATE, 2, E, p->n_ff, 1, h[17]);
        out[n++] = spec(MOE_FFN_UP, 2, E, p->n_ff, 1, h[18]);
        out[n++] = spec(MOE_FFN_DOWN, 2, p->n_ff, E, 1, h[19]);
    } else {
        int64_t F = p->n_ff_exp, X = p->n_expert;
        out[n++] = spec(MOE_ROUTER, 2, E, X, 1, h[20]);
        out[n++] = spec(MOE_GATE_EXPS, 3, E, F, X, h[21]);
        out[n++] = spec(MOE_UP_EXPS, 3, E, F, X, h[21]);
        out[n++] = spec(MOE_DOWN_EXPS, 3, F, E, X, h[21]);
        if (p->ffn_kind == MOE_FFN_MOE_SHARED) {
            int64_t Fs = p->n_ff_shexp;
            out[n++] = spec(MOE_FFN_GATE_INP_SHEXP, 1, E, 1, 1, h[22]);
            out[n++] = spec(MOE_FFN_GATE_SHEXP, 2, E, Fs, 1, h[23]);
            out[n++] = spec(MOE_FFN_UP_SHEXP, 2, E, Fs, 1, h[24]);
            out[n++] = spec(MOE_FFN_DOWN_SHEXP, 2, Fs, E, 1, h[25]);
        }
    }
    return n;
}

#define HYB_LAYER_NAMES(P, QKV, Z, B, A)                                                                                       \
    P "layers.%d.input_layernorm.weight", P "layers.%d.post_attention_layernorm.weight", P "layers.%d.self_attn.q_proj.weight", \
        P "layers.%d.self_attn.k_proj.weight", P "layers.%d.self_attn.v_proj.weight", P "layers.%d.self_attn.o_proj.weight",   \
        P "layers.%d.self_attn.q_norm.weight", P "layers.%d.self_attn.k_norm.weight", P "layers.%d.linear_attn." QKV ".weight", \
        P "layers.%d.linear_attn." Z ".weight", P "layers.%d.linear_attn." B ".weight", P "layers.%d.linear_attn." A ".weight",  \
        P "layers.%d.linear_attn.conv1d.weight", P "layers.%d.linear_attn.dt_bias", P "layers.%d.linear_attn.A_log",            \
        P "layers.%d.linear_attn.norm.weight", P "layers.%d.linear_attn.out_proj.weight", P "layers.%d.mlp.gate_proj.weight",   \
        P "layers.%d.mlp.up_proj.weight", P "layers.%d.mlp.down_proj.weight", P "layers.%d.mlp.gate.weight",                    \
        P "layers.%d.mlp.experts", P "layers.%d.mlp.shared_expert_gate.weight", P "layers.%d.mlp.shared_expert.gate_proj.weight", \
        P "layers.%d.mlp.shared_expert.up_proj.weight", P "layers.%d.mlp.shared_expert.down_proj.weight"

static int qwen3next_tensors(const moe_weights *w, int l, tensor_spec *out) {
    static const char *const hf[] = {"model.embed_tokens.weight", "model.norm.weight",
                                     HYB_LAYER_NAMES("model.", "in_proj_qkvz", "in_proj_qkvz", "in_proj_ba", "-")};
    return hybrid_tensors(w, l, out, hf);
}

/* Qwen3.5 checkpoints are multimodal: the text model is model.language_model.* (a text-only
   save, model.*, is found too: see hf_find_text) */
static int qwen35_tensors(const moe_weights *w, int l, tensor_spec *out) {
    static const char *const hf[] = {"model.language_model.embed_tokens.weight", "model.language_model.norm.weight",
                                     HYB_LAYER_NAMES("model.language_model.", "in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a")};
    return hybrid_tensors(w, l, out, hf);
}

static void hybrid_write_hparams(const moe_model *m, gguf_writer *gw) {
    const moe_hparams *hp = &m->w.hp;
    const moe_layer_plan *pa = NULL, *pd = NULL;
    int interval = 0;
    for (int l = 0; l < hp->n_layer; l++) {
        const moe_layer_plan *p = &m->w.layers[l].p;
        if (p->attn_kind == MOE_ATTN_FULL && !pa) pa = p, interval = l + 1;
        if (p->attn_kind == MOE_ATTN_DELTANET && !pd) pd = p;
    }
    const moe_layer_plan *p0 = &m->w.layers[0].p;
    char key[128];
    const char *arch = m->arch_name;
#define KV_U32(k, v) (snprintf(key, sizeof key, "%s.%s", arch, k), gw_kv_u32(gw, key, (uint32_t)(v)))
#define KV_F32(k, v) (snprintf(key, sizeof key, "%s.%s", arch, k), gw_kv_f32(gw, key, (v)))
    KV_U32("context_length", hp->n_ctx_train);
    KV_U32("embedding_length", hp->n_embd);
    KV_U32("block_count", hp->n_layer);
    KV_F32("attention.layer_norm_rms_epsilon", hp->rms_eps);
    if (pa) {
        KV_U32("attention.head_count", pa->attn.n_head);
        KV_U32("attention.head_count_kv", pa->attn.n_head_kv);
        KV_U32("attention.key_length", pa->attn.head_dim);
        KV_U32("attention.value_length", pa->attn.head_dim);
        KV_U32("rope.dimension_count", pa->rope.n_rot);
        KV_F32("rope.freq_base", pa->rope.base);
        KV_U32("full_attention_interval", interval);
    }
    if (pd) {
        KV_U32("ssm.conv_kernel", pd->dn.conv_k);
        KV_U32("ssm.state_size", pd->dn.k_dim);
        KV_U32("ssm.group_count", pd->dn.n_k_head);
        KV_U32("ssm.time_step_rank", pd->dn.n_v_head);
        KV_U32("ssm.inner_size", pd->dn.n_v_head * pd->dn.v_dim);
    }
    if (p0->ffn_kind == MOE_FFN_DENSE) KV_U32("feed_forward_length", p0->n_ff);
    else {
        KV_U32("expert_count", p0->n_expert);
        KV_U32("expert_used_count", p0->n_expert_used);
        KV_U32("expert_feed_forward_length", p0->n_ff_exp);
        if (p0->n_ff_shexp) KV_U32("expert_shared_feed_forward_length", p0->n_ff_shexp);
    }
#undef KV_U32
#undef KV_F32
}

static moe_status hf_own(moe_model *m, void *p);

/* After binding: the conv weights as f32 (few values, read whole by the conv kernels); from a
   Hugging Face directory also the norms' 1 + w and A_log → -exp(A_log) (both in the f32 copies
   weights_to_f32 made); GGUF files hold them so already. */
static moe_status hybrid_finish(moe_model *m) {
    for (int l = 0; l < m->w.hp.n_layer; l++) {
        moe_weight *w = &m->w.layers[l].t[MOE_SSM_CONV];
        if (!w->data || w->type == MOE_TYPE_F32) continue;
        size_t cnt = (size_t)w->ne[0] * (size_t)w->ne[1];
        float *f = moe_malloc(cnt * sizeof *f);
        moe_status st = f ? hf_own(m, f) : set_error(MOE_ERR_NO_MEMORY, "model: out of memory");
        if (st) {
            moe_free(f);
            return st;
        }
        const moe_type_traits *tt = type_traits(w->type);
        for (int64_t r = 0; r < w->ne[1]; r++) tt->dequant(w->data + (uint64_t)r * w->row_bytes, f + r * w->ne[0], w->ne[0]);
        for (size_t i = 0; i < cnt; i++)
            if (!isfinite(f[i])) return set_error(MOE_ERR_FORMAT, "model: tensor '%s' holds a non-finite value", w->name);
        w->data = (const uint8_t *)f;
        w->type = MOE_TYPE_F32;
        w->row_bytes = (uint64_t)w->ne[0] * 4;
        w->nbytes = (uint64_t)cnt * 4;
    }
    if (!m->hf_names) return MOE_OK;
    float *g = (float *)(uintptr_t)m->w.g[MOE_OUTPUT_NORM].data;
    for (int64_t i = 0; i < m->w.g[MOE_OUTPUT_NORM].ne[0]; i++) g[i] += 1.0f;
    static const int one_plus[] = {MOE_ATTN_NORM, MOE_POST_ATTN_NORM, MOE_Q_NORM, MOE_K_NORM};
    for (int l = 0; l < m->w.hp.n_layer; l++) {
        moe_layer *L = &m->w.layers[l];
        for (size_t r = 0; r < sizeof one_plus / sizeof one_plus[0]; r++) {
            moe_weight *w = &L->t[one_plus[r]];
            float *v = (float *)(uintptr_t)w->data;
            for (int64_t i = 0; v && i < w->ne[0]; i++) v[i] += 1.0f;
        }
        moe_weight *a = &L->t[MOE_SSM_A];
        float *v = (float *)(uintptr_t)a->data;
        for (int64_t i = 0; v && i < a->ne[0]; i++) v[i] = -expf(v[i]);
    }
    return MOE_OK;
}

/* ---- Hugging Face directories: config.json + *.safetensors (+ tokenizer.json) -------------------
   The safetensors tensors are renamed to the GGUF names llama.cpp's converter uses (dims reversed:
   a [out, in] matrix is ne = {in, out}) in a tensor table like a GGUF file's, so binding and the
   forward pass are shared. Experts stored one tensor per expert (the original Qwen3-MoE layout) or
   fused per layer (transformers 5: experts.gate_up_proj [E, 2·ff, in], experts.down_proj
   [E, out, ff]) become 3-D entries whose slabs are reached through expert_ptrs. */
#define HF_NAME_LEN 64          /* GGUF-style names we give HF tensors */
#define HF_SRC_NAME_LEN 200     /* names in a safetensors header (vision towers have long ones) */

#define HF_MAX_DIMS 8
typedef struct hf_tensor {
    const char *name;
    size_t name_len;
    int32_t type, n_dims;
    int64_t shape[HF_MAX_DIMS];   /* up to 8: vision towers hold 5-D convolutions (skipped, still parsed) */
    const uint8_t *data;
    uint64_t nbytes;
    int used;                  /* the model takes it (the others are logged as skipped) */
} hf_tensor;

typedef struct hf_table { hf_tensor *t; int64_t n, cap; } hf_table;

static moe_status hf_parse_safetensors(const moe_file *f, const char *path, json_doc *d, hf_table *tab) {
    uint64_t hlen = 0;
    if (f->size < 8) return set_error(MOE_ERR_FORMAT, "safetensors '%s': truncated (no header length)", path);
    memcpy(&hlen, f->data, 8);
    if (hlen > f->size - 8) return set_error(MOE_ERR_FORMAT, "safetensors '%s': header length %llu runs past the end", path, (unsigned long long)hlen);
    moe_status st = json_parse(d, (const char *)f->data + 8, (size_t)hlen, path);
    if (st) return st;
    if (!d->n_nodes || d->nodes[0].type != JSON_OBJECT) return set_error(MOE_ERR_FORMAT, "safetensors '%s': the header is not a JSON object", path);
    const uint8_t *data = f->data + 8 + hlen;
    uint64_t avail = f->size - 8 - hlen;
    for (uint32_t i = 1; i < d->nodes[0].end; i = d->nodes[i + 1].end) {
        if (json_str_eq(d, i, "__metadata__")) continue;
        uint32_t v = i + 1, dt = json_get(d, v, "dtype"), shape = json_get(d, v, "shape"), offs = json_get(d, v, "data_offsets");
        hf_tensor t = {0};
        t.name = d->src + d->nodes[i].off;
        t.name_len = d->nodes[i].len;
        if (d->nodes[i].escaped || t.name_len >= HF_SRC_NAME_LEN)
            return set_error(MOE_ERR_FORMAT, "safetensors '%s': tensor name '%.*s' is escaped or too long", path, (int)(t.name_len > 80 ? 80 : t.name_len), t.name);
        size_t es = 0;
        if (json_str_eq(d, dt, "F32")) t.type = MOE_TYPE_F32, es = 4;
        else if (json_str_eq(d, dt, "F16")) t.type = MOE_TYPE_F16, es = 2;
        else if (json_str_eq(d, dt, "BF16")) t.type = MOE_TYPE_BF16, es = 2;
        else if (json_is(d, dt, JSON_STRING)) t.type = -1; /* other dtypes are fine unless a weight we need uses one */
        else return set_error(MOE_ERR_FORMAT, "safetensors '%s': tensor '%.*s' has no dtype", path, (int)t.name_len, t.name);
        if (!json_is(d, shape, JSON_ARRAY) || d->nodes[shape].len > HF_MAX_DIMS || !json_is(d, offs, JSON_ARRAY) ||
            d->nodes[offs].len != 2)
            return set_error(MOE_ERR_FORMAT, "safetensors '%s': tensor '%.*s' needs a shape of <= %d dims and 2 data_offsets", path, (int)t.name_len,
                             t.name, HF_MAX_DIMS);
        uint64_t count = 1;
        t.n_dims = (int32_t)d->nodes[shape].len;
        int k = 0;
        for (uint32_t j = shape + 1; j < d->nodes[shape].end; j = d->nodes[j].end, k++) {
            if (!json_int(d, j, 1, INT64_MAX / 2, &t.shape[k]) || count > UINT64_MAX / 16 / (uint64_t)t.shape[k])
                return set_error(MOE_ERR_FORMAT, "safetensors '%s': tensor '%.*s' has a bad or overflowing shape", path, (int)t.name_len, t.name);
            count *= (uint64_t)t.shape[k];
        }
        int64_t b = 0, e = 0;
        if (!json_int(d, offs + 1, 0, INT64_MAX, &b) || !json_int(d, d->nodes[offs + 1].end, 0, INT64_MAX, &e) || b > e ||
            (uint64_t)e > avail || (es && (uint64_t)(e - b) != count * es))
            return set_error(MOE_ERR_FORMAT, "safetensors '%s': tensor '%.*s': data_offsets [%lld, %lld] do not fit the file or its shape",
                             path, (int)t.name_len, t.name, (long long)b, (long long)e);
        t.data = data + b;
        t.nbytes = (uint64_t)(e - b);
        if (tab->n == tab->cap) {
            int64_t cap = tab->cap ? 2 * tab->cap : 256;
            hf_tensor *nt = moe_malloc((size_t)cap * sizeof *nt);
            if (!nt) return set_error(MOE_ERR_NO_MEMORY, "safetensors: out of memory");
            if (tab->n) memcpy(nt, tab->t, (size_t)tab->n * sizeof *nt);
            moe_free(tab->t);
            tab->t = nt;
            tab->cap = cap;
        }
        tab->t[tab->n++] = t;
    }
    return MOE_OK;
}

static const hf_tensor *hf_find(const hf_table *tab, const char *name) {
    size_t n = strlen(name);
    for (int64_t i = 0; i < tab->n; i++)
        if (tab->t[i].name_len == n && memcmp(tab->t[i].name, name, n) == 0) return &tab->t[i];
    return NULL;
}

/* Adds a GGUF-named entry for one HF tensor (dims reversed). */
static moe_status hf_add(moe_model *m, const hf_tensor *src, const char *gguf_name, int64_t n_dims_override,
                         const int64_t *ne_override, const uint8_t **expert_ptrs) {
    gguf_file *g = &m->gguf;
    gguf_tensor *t = &g->tensors[g->n_tensors];
    char *nm = m->hf_names + (size_t)g->n_tensors * HF_NAME_LEN;
    snprintf(nm, HF_NAME_LEN, "%s", gguf_name);
    memset(t, 0, sizeof *t);
    t->name.p = nm;
    t->name.n = strlen(nm);
    if (src->type < 0) return set_error(MOE_ERR_UNSUPPORTED, "safetensors: tensor '%.*s' has a dtype we do not read (F32, F16, BF16)", (int)src->name_len, src->name);
    if (!ne_override && src->n_dims > MOE_MAX_DIMS)
        return set_error(MOE_ERR_FORMAT, "safetensors: tensor '%.*s' has %d dims, more than a weight of ours has", (int)src->name_len, src->name, src->n_dims);
    t->type = src->type;
    for (int d = 0; d < MOE_MAX_DIMS; d++) t->ne[d] = 1;
    if (ne_override) {
        t->n_dims = (int32_t)n_dims_override;
        for (int d = 0; d < t->n_dims; d++) t->ne[d] = ne_override[d];
    } else {
        t->n_dims = src->n_dims;
        for (int d = 0; d < src->n_dims; d++) t->ne[d] = src->shape[src->n_dims - 1 - d];
    }
    t->data = src->data;
    t->expert_ptrs = expert_ptrs;
    t->nbytes = type_row_bytes(t->type, t->ne[0]) * (uint64_t)(t->ne[1] * t->ne[2] * t->ne[3]);
    g->n_tensors++;
    return MOE_OK;
}

/* Reads model_type (top level, or text_config's for multimodal checkpoints) and dispatches to
   that architecture's reader. */
static moe_status hf_hparams(moe_model *m, const json_doc *d) {
    uint32_t mt = json_get(d, 0, "model_type");
    if (!mt) mt = json_get(d, json_get(d, 0, "text_config"), "model_type");
    char *name = json_strdup(d, mt);
    if (!name) return set_error(mt ? MOE_ERR_NO_MEMORY : MOE_ERR_FORMAT, "config.json: %s", mt ? "out of memory" : "no model_type");
    m->arch = arch_find(NULL, name, &m->w.hp.arch);
    moe_free(name);
    if (!m->arch) return MOE_ERR_UNSUPPORTED;
    snprintf(m->arch_name, sizeof m->arch_name, "%s", m->arch->name);
    moe_status st = m->arch->hparams_hf(m, d);
    return st ? st : plan_finish(m);
}

/* The experts of one layer for one GGUF role: fused per layer (transformers 5: PATH.gate_up_proj
   [X, 2F, E] holding gate rows then up rows, PATH.down_proj [X, E, F]) or one tensor per expert
   (PATH.N.{gate,up,down}_proj.weight). Their slabs are reached through expert_ptrs. */
static moe_status hf_add_experts(moe_model *m, const hf_table *tab, const tensor_spec *s, int l, const uint8_t **ptrs) {
    char hn[HF_SRC_NAME_LEN + 40], path[HF_SRC_NAME_LEN], gn[HF_NAME_LEN];
    int k = s->role == MOE_GATE_EXPS ? 0 : s->role == MOE_UP_EXPS ? 1 : 2;
    int64_t X = s->ne[2], rows = s->ne[1], cols = s->ne[0];
    snprintf(path, sizeof path, s->hf, l);
    snprintf(hn, sizeof hn, k == 2 ? "%s.down_proj" : "%s.gate_up_proj", path);
    const hf_tensor *fused = hf_find(tab, hn), *first = NULL;
    if (fused) {
        int64_t frows = k == 2 ? rows : 2 * rows;
        if (fused->n_dims != 3 || fused->shape[0] != X || fused->shape[1] != frows || fused->shape[2] != cols || fused->type < 0)
            return set_error(MOE_ERR_FORMAT, "safetensors: '%s' must be [%lld, %lld, %lld] of a dtype we read", hn, (long long)X,
                             (long long)frows, (long long)cols);
        uint64_t rb = type_row_bytes(fused->type, cols);
        for (int64_t e = 0; e < X; e++) ptrs[e] = fused->data + ((uint64_t)e * (uint64_t)frows + (k == 1 ? (uint64_t)rows : 0)) * rb;
        first = fused;
        ((hf_tensor *)(uintptr_t)fused)->used = 1;
    } else {
        static const char *const proj[3] = {"gate_proj", "up_proj", "down_proj"};
        for (int64_t e = 0; e < X; e++) {
            snprintf(hn, sizeof hn, "%s.%lld.%s.weight", path, (long long)e, proj[k]);
            const hf_tensor *t = hf_find(tab, hn);
            if (!t) return set_error(MOE_ERR_FORMAT, "safetensors: required tensor '%s' is missing", hn);
            ((hf_tensor *)(uintptr_t)t)->used = 1;
            if (t->n_dims != 2 || t->shape[0] != rows || t->shape[1] != cols || t->type < 0 || (first && t->type != first->type))
                return set_error(MOE_ERR_FORMAT, "safetensors: '%s' must be [%lld, %lld] with the dtype of expert 0", hn,
                                 (long long)rows, (long long)cols);
            if (!first) first = t;
            ptrs[e] = t->data;
        }
    }
    tensor_gguf_name(gn, sizeof gn, l, s->role);
    return hf_add(m, first, gn, 3, s->ne, ptrs);
}

/* the model frees p with itself */
static moe_status hf_own(moe_model *m, void *p) {
    void **no = moe_malloc((size_t)(m->n_hf_owned + 1) * sizeof *no);
    if (!no) return set_error(MOE_ERR_NO_MEMORY, "model: out of memory");
    if (m->n_hf_owned) memcpy(no, m->hf_owned, (size_t)m->n_hf_owned * sizeof *no);
    moe_free(m->hf_owned);
    m->hf_owned = no;
    m->hf_owned[m->n_hf_owned++] = p;
    return MOE_OK;
}

/* A tensor of a multimodal checkpoint's text model (model.language_model.X), or of a text-only
   save of it (model.X). */
static const hf_tensor *hf_find_text(const hf_table *tab, const char *name) {
    const hf_tensor *t = hf_find(tab, name);
    static const char lm[] = "model.language_model.";
    if (!t && !strncmp(name, lm, sizeof lm - 1)) {
        char alt[HF_SRC_NAME_LEN + 48];
        snprintf(alt, sizeof alt, "model.%s", name + sizeof lm - 1);
        t = hf_find(tab, alt);
    }
    return t;
}

/* Qwen3-Next's in_proj_qkvz [nk][q (dk) | k (dk) | v (r·dv) | z (r·dv)] rows, regrouped into
   attn_qkv = [q_all | k_all | v_all] or attn_gate = z (llama.cpp's converter does the same). */
static moe_status hf_regroup_qkvz(moe_model *m, const hf_tensor *t, const tensor_spec *s, int l, const char *gguf_name) {
    const moe_deltanet *dn = &m->w.layers[l].p.dn;
    int64_t nk = dn->n_k_head, dk = dn->k_dim, rv = (int64_t)(dn->n_v_head / dn->n_k_head) * dn->v_dim, G = 2 * dk + 2 * rv;
    int64_t cols = s->ne[0];
    if (t->type < 0 || t->n_dims != 2 || t->shape[0] != nk * G || t->shape[1] != cols)
        return set_error(MOE_ERR_FORMAT, "safetensors: '%.*s' must be [%lld, %lld] of a dtype we read", (int)t->name_len, t->name,
                         (long long)(nk * G), (long long)cols);
    uint64_t rb = type_row_bytes(t->type, cols);
    uint8_t *dst = moe_malloc((size_t)(rb * (uint64_t)s->ne[1]));
    if (!dst || hf_own(m, dst)) {
        moe_free(dst);
        return set_error(MOE_ERR_NO_MEMORY, "safetensors: out of memory regrouping '%.*s'", (int)t->name_len, t->name);
    }
    uint8_t *o = dst;
    /* parts of each group: q, k, v for attn_qkv, z for attn_gate */
    int64_t off[4] = {0, dk, 2 * dk, 2 * dk + rv}, len[4] = {dk, dk, rv, rv};
    int p0 = s->role == MOE_SSM_Z ? 3 : 0, p1 = s->role == MOE_SSM_Z ? 4 : 3;
    for (int part = p0; part < p1; part++)
        for (int64_t g = 0; g < nk; g++, o += rb * (uint64_t)len[part])
            memcpy(o, t->data + rb * (uint64_t)(g * G + off[part]), (size_t)(rb * (uint64_t)len[part]));
    hf_tensor c = *t;
    c.data = dst;
    c.n_dims = 2;
    c.shape[0] = s->ne[1];
    return hf_add(m, &c, gguf_name, 0, NULL, NULL);
}

/* Walks the architecture's tensor list and enters each HF tensor under its GGUF name. */
static moe_status hf_build_table(moe_model *m, const hf_table *tab) {
    const moe_hparams *hp = &m->w.hp;
    tensor_spec sp[MAX_TENSOR_SPECS];
    int64_t max_t = 0;
    size_t n_ptrs = 0;
    for (int l = -1; l < hp->n_layer; l++) {
        int n = m->arch->tensors(&m->w, l, sp);
        max_t += n;
        for (int i = 0; i < n; i++) n_ptrs += sp[i].n_dims == 3 ? (size_t)sp[i].ne[2] : 0;
    }
    gguf_file *g = &m->gguf;
    g->tensors = moe_calloc((size_t)max_t, sizeof *g->tensors);
    m->hf_names = moe_malloc((size_t)max_t * HF_NAME_LEN);
    m->hf_expert_ptrs = moe_calloc(n_ptrs ? n_ptrs : 1, sizeof *m->hf_expert_ptrs);
    if (!g->tensors || !m->hf_names || !m->hf_expert_ptrs) return set_error(MOE_ERR_NO_MEMORY, "moe_load: out of memory for the tensor table");
    const uint8_t **ptrs = m->hf_expert_ptrs;
    char hn[HF_SRC_NAME_LEN + 40], gn[HF_NAME_LEN];
    moe_status st;
    for (int l = -1; l < hp->n_layer; l++) {
        int n = m->arch->tensors(&m->w, l, sp);
        for (int i = 0; i < n; i++) {
            const tensor_spec *s = &sp[i];
            if (s->n_dims == 3) {
                if ((st = hf_add_experts(m, tab, s, l, ptrs))) return st;
                ptrs += s->ne[2];
                continue;
            }
            if (!s->hf) continue; /* no Hugging Face counterpart */
            snprintf(hn, sizeof hn, s->hf, l);
            const hf_tensor *t = hf_find_text(tab, hn);
            if (!t) {
                if (s->flags & TS_OPTIONAL) continue;
                return set_error(MOE_ERR_FORMAT, "safetensors: required tensor '%s' is missing", hn);
            }
            tensor_gguf_name(gn, sizeof gn, l, s->role);
            ((hf_tensor *)(uintptr_t)t)->used = 1;
            if (s->flags & TS_HF_QKVZ) {
                if ((st = hf_regroup_qkvz(m, t, s, l, gn))) return st;
                continue;
            }
            /* the same elements in another rank (conv1d [C, 1, K], shared_expert_gate [1, E]):
               take the list's shape */
            int64_t cnt = 1, want = 1;
            for (int d = 0; d < t->n_dims; d++) cnt *= t->shape[d];
            for (int d = 0; d < s->n_dims; d++) want *= s->ne[d];
            int squeeze = t->n_dims != s->n_dims && cnt == want && t->shape[t->n_dims - 1] == s->ne[0];
            if ((st = hf_add(m, t, gn, squeeze ? s->n_dims : 0, squeeze ? s->ne : NULL, NULL))) return st;
        }
    }
    /* what the text model does not take: vision / audio towers of multimodal checkpoints, K/V
       projections that KV-shared layers ignore; said once, not an error */
    int64_t n_tower = 0, n_other = 0;
    const hf_tensor *example = NULL;
    for (int64_t i = 0; i < tab->n; i++) {
        const hf_tensor *t = &tab->t[i];
        if (t->used) continue;
        static const char *const towers[] = {"model.vision_tower.", "model.embed_vision.", "model.audio_tower.", "model.embed_audio.",
                                             "model.visual."};
        int tower = 0;
        for (size_t k = 0; k < sizeof towers / sizeof towers[0]; k++)
            tower |= t->name_len > strlen(towers[k]) && !memcmp(t->name, towers[k], strlen(towers[k]));
        if (tower) n_tower++;
        else n_other++;
        if (!example) example = t;
    }
    if (example)
        log_msg(&m->log, MOE_LOG_INFO, "safetensors: skipped %lld vision/audio tower tensors and %lld other tensors the text model does not use (e.g. '%.*s')",
                (long long)n_tower, (long long)n_other, (int)(example->name_len > 100 ? 100 : example->name_len), example->name);
    return MOE_OK;
}

static int ends_with(const char *s, const char *suffix) {
    size_t n = strlen(s), k = strlen(suffix);
    return n >= k && !strcmp(s + n - k, suffix);
}

/* Maps every *.safetensors of dir, reads config.json, builds the tensor table. */
static moe_status hf_load_dir(moe_model *m, const char *dir) {
    size_t dl = strlen(dir);
    char *path = moe_malloc(dl + 512);
    if (!path) return set_error(MOE_ERR_NO_MEMORY, "moe_load: out of memory");
    json_file cfg;
    memset(&cfg, 0, sizeof cfg);
    hf_table tab = {0};
    json_doc *docs = NULL;
    moe_status st;
    snprintf(path, dl + 512, "%s/config.json", dir);
    if ((st = json_file_open(&cfg, path, "config.json"))) goto done;
    if ((st = hf_hparams(m, &cfg.d))) goto done;
    DIR *dp = opendir(dir);
    if (!dp) { st = set_error(MOE_ERR_IO, "moe_load: cannot list '%s': %s", dir, strerror(errno)); goto done; }
    struct dirent *de;
    int n_files = 0;
    while ((de = readdir(dp)))
        if (ends_with(de->d_name, ".safetensors")) n_files++;
    m->shards = moe_calloc((size_t)(n_files ? n_files : 1), sizeof *m->shards);
    docs = moe_calloc((size_t)(n_files ? n_files : 1), sizeof *docs);
    if (!m->shards || !docs) { closedir(dp); st = set_error(MOE_ERR_NO_MEMORY, "moe_load: out of memory"); goto done; }
    rewinddir(dp);
    while (!st && (de = readdir(dp)) && m->n_shards < n_files) {
        if (!ends_with(de->d_name, ".safetensors") || strlen(de->d_name) > 400) continue;
        snprintf(path, dl + 512, "%s/%s", dir, de->d_name);
        moe_file *f = &m->shards[m->n_shards];
        f->fd = -1;
        if ((st = file_map(f, path, 1))) break;
        m->n_shards++;
        st = hf_parse_safetensors(f, path, &docs[m->n_shards - 1], &tab);
    }
    closedir(dp);
    if (st) goto done;
    if (!m->n_shards) { st = set_error(MOE_ERR_FORMAT, "moe_load: '%s' has config.json but no *.safetensors", dir); goto done; }
    st = hf_build_table(m, &tab);
    for (int i = 0; i < m->n_shards; i++) m->file.size += m->shards[i].size;
done:
    for (int i = 0; docs && i < m->n_shards; i++) json_free(&docs[i]); /* names were copied into hf_names */
    moe_free(docs);
    moe_free(tab.t);
    json_file_close(&cfg);
    moe_free(path);
    return st;
}

/* ============================================================================================ */
/* 6. forward passes                                                                             */
/* ============================================================================================ */
/* Attention block with per-head q/k norms (Qwen3-MoE, ARCHITECTURES.md §1.2):
   x += Wo · attn(rope(qnorm(Wq a)), rope(knorm(Wk a)), Wv a) with a = norm(x). */
static void attention_block(void *be, const moe_ops *o, const moe_weights *w, int l, int n, int pos0) {
    const moe_hparams *hp = &w->hp;
    const moe_layer *L = &w->layers[l];
    const moe_attn *a = &L->p.attn;
    o->rmsnorm(be, ACT_XN, ACT_X, moe_lw(L, MOE_ATTN_NORM), n, hp->n_embd, hp->rms_eps);
    o->matmul(be, ACT_Q, moe_lw(L, MOE_WQ), ACT_XN, 0, n);          /* [n][n_head·hd] */
    o->matmul(be, ACT_K, moe_lw(L, MOE_WK), ACT_XN, 0, n);          /* [n][n_kv·hd]   */
    o->matmul(be, ACT_V, moe_lw(L, MOE_WV), ACT_XN, 0, n);
    o->rmsnorm(be, ACT_Q, ACT_Q, moe_lw(L, MOE_Q_NORM), n * a->n_head, a->head_dim, hp->rms_eps);
    o->rmsnorm(be, ACT_K, ACT_K, moe_lw(L, MOE_K_NORM), n * a->n_head_kv, a->head_dim, hp->rms_eps);
    o->rope(be, ACT_Q, n, a->n_head, a->head_dim, &L->p.rope, pos0);
    o->rope(be, ACT_K, n, a->n_head_kv, a->head_dim, &L->p.rope, pos0);
    o->attention(be, a, n, pos0);                                  /* [n][n_head·hd] */
    o->matmul(be, ACT_OUT, moe_lw(L, MOE_WO), ACT_ATTN, 0, n);
    o->add(be, ACT_X, ACT_OUT, n, hp->n_embd);
}

/* Routed experts: out = Σ_topk w_e · down_e( act(gate_e src) ⊙ up_e src ). */
static void routed_experts(void *be, const moe_ops *o, const moe_layer *L, int dst, int src, int n) {
    const moe_layer_plan *p = &L->p;
    moe_route r = {p->n_expert, p->n_expert_used, p->norm_topk, NULL};
    o->route(be, moe_lw(L, MOE_ROUTER), &r, src, n);               /* [n][n_expert] → top-k */
    o->experts_glu(be, moe_lw(L, MOE_GATE_EXPS), moe_lw(L, MOE_UP_EXPS), p->act, src, n);
    o->experts_down(be, dst, moe_lw(L, MOE_DOWN_EXPS), n);         /* [n][n_embd] */
}

/* Mixture-of-experts FFN block: x += Σ_topk w_e · SwiGLU_e(norm(x)). */
static void moe_ffn_block(void *be, const moe_ops *o, const moe_weights *w, int l, int n) {
    const moe_hparams *hp = &w->hp;
    const moe_layer *L = &w->layers[l];
    o->rmsnorm(be, ACT_XN, ACT_X, moe_lw(L, MOE_FFN_NORM), n, hp->n_embd, hp->rms_eps);
    routed_experts(be, o, L, ACT_OUT, ACT_XN, n);
    o->add(be, ACT_X, ACT_OUT, n, hp->n_embd);
}

/* The logits of the last n_out of n rows of ACT_XN (the final-normed stream), in chunks of what
   ACT_LOGITS holds, each published as rows of the step's logits. */
static void lm_head(void *be, const moe_ops *o, const moe_weights *w, int n, int n_out) {
    int cap = o->logits_rows(be);
    for (int r0 = 0; r0 < n_out; r0 += cap) {
        int k = n_out - r0 < cap ? n_out - r0 : cap;
        o->matmul(be, ACT_LOGITS, &w->g[MOE_OUTPUT], ACT_XN, n - n_out + r0, k);   /* [k][n_vocab] */
        if (w->hp.logit_softcap > 0) o->softcap(be, ACT_LOGITS, k, w->hp.n_vocab, w->hp.logit_softcap);
        o->logits_out(be, r0, k);
    }
}

/* One chunk of n tokens at positions pos0..; logits for the last n_out rows are the step's. */
static void forward_qwen3moe(void *be, const moe_ops *o, const moe_weights *w, const moe_token *tokens,
                             int n, int pos0, int n_out) {
    const moe_hparams *hp = &w->hp;
    o->embed(be, ACT_X, &w->g[MOE_TOK_EMBD], tokens, n);       /* [n][n_embd] */
    for (int l = 0; l < hp->n_layer; l++) {
        attention_block(be, o, w, l, n, pos0);
        moe_ffn_block(be, o, w, l, n);
    }
    o->rmsnorm(be, ACT_XN, ACT_X, &w->g[MOE_OUTPUT_NORM], n, hp->n_embd, hp->rms_eps);
    lm_head(be, o, w, n, n_out);
}

/* Dense gated MLP: dst = down( act(gate · src) ⊙ (up · src) ). */
static void dense_glu(void *be, const moe_ops *o, const moe_layer *L, int dst, int src, int n) {
    int F = L->p.n_ff;
    o->matmul(be, ACT_FF, moe_lw(L, MOE_FFN_GATE), src, 0, n);     /* [n][n_ff] */
    o->matmul(be, ACT_FF2, moe_lw(L, MOE_FFN_UP), src, 0, n);
    o->glu(be, ACT_FF, ACT_FF, ACT_FF2, 0, F, n, F, L->p.act);
    o->matmul(be, dst, moe_lw(L, MOE_FFN_DOWN), ACT_FF, 0, n);       /* [n][n_embd] */
}

/* Gemma 4 attention (ARCHITECTURES.md §2.3): q/k norms, V = the raw K projection on K = V
   layers, V normed without weight, scale 1, a sliding window or all keys, a sandwich norm:
   x += post_norm(Wo · attn(...)). KV-shared layers compute only q and read another layer's cache. */
static void gemma4_attention_block(void *be, const moe_ops *o, const moe_weights *w, int l, int n, int pos0) {
    const moe_hparams *hp = &w->hp;
    const moe_layer *L = &w->layers[l];
    const moe_attn *a = &L->p.attn;
    int E = hp->n_embd, kvw = a->n_head_kv * a->head_dim;
    o->rmsnorm(be, ACT_XN, ACT_X, moe_lw(L, MOE_ATTN_NORM), n, E, hp->rms_eps);
    o->matmul(be, ACT_Q, moe_lw(L, MOE_WQ), ACT_XN, 0, n);          /* [n][n_head·hd] */
    if (a->store) {
        o->matmul(be, ACT_K, moe_lw(L, MOE_WK), ACT_XN, 0, n);      /* [n][n_kv·hd] */
        if (L->p.v_from_k) o->copy(be, ACT_V, ACT_K, n, kvw);
        else o->matmul(be, ACT_V, moe_lw(L, MOE_WV), ACT_XN, 0, n);
        if (L->p.v_norm) o->rmsnorm(be, ACT_V, ACT_V, NULL, n * a->n_head_kv, a->head_dim, hp->rms_eps);
    }
    o->rmsnorm(be, ACT_Q, ACT_Q, moe_lw(L, MOE_Q_NORM), n * a->n_head, a->head_dim, hp->rms_eps);
    if (a->store) o->rmsnorm(be, ACT_K, ACT_K, moe_lw(L, MOE_K_NORM), n * a->n_head_kv, a->head_dim, hp->rms_eps);
    o->rope(be, ACT_Q, n, a->n_head, a->head_dim, &L->p.rope, pos0);
    if (a->store) o->rope(be, ACT_K, n, a->n_head_kv, a->head_dim, &L->p.rope, pos0);
    o->attention(be, a, n, pos0);
    o->matmul(be, ACT_OUT, moe_lw(L, MOE_WO), ACT_ATTN, 0, n);
    o->rmsnorm(be, ACT_OUT, ACT_OUT, moe_lw(L, MOE_POST_ATTN_NORM), n, E, hp->rms_eps);
    o->add(be, ACT_X, ACT_OUT, n, E);
}

/* Gemma 4 FFN: a dense GeGLU MLP, and in the MoE model routed experts beside it (the router
   reads r(x) · scale · hidden^-0.5, the experts their own norm of x), each branch normed, their
   sum normed again: x += post_norm(post_norm_1(mlp) + post_norm_2(experts)). */
static void gemma4_ffn_block(void *be, const moe_ops *o, const moe_weights *w, int l, int n) {
    const moe_hparams *hp = &w->hp;
    const moe_layer *L = &w->layers[l];
    int E = hp->n_embd;
    float eps = hp->rms_eps;
    o->rmsnorm(be, ACT_XN, ACT_X, moe_lw(L, MOE_FFN_NORM), n, E, eps);
    dense_glu(be, o, L, ACT_OUT, ACT_XN, n);
    if (L->p.ffn_kind == MOE_FFN_MOE_DENSE) {
        o->rmsnorm(be, ACT_OUT, ACT_OUT, moe_lw(L, MOE_POST_FFN_NORM_1), n, E, eps);
        o->rmsnorm(be, ACT_OUT2, ACT_X, moe_lw(L, MOE_ROUTER_SCALE), n, E, eps);   /* router input */
        o->scale(be, ACT_OUT2, n, E, NULL, 1.0f / sqrtf((float)E));
        moe_route r = {L->p.n_expert, L->p.n_expert_used, L->p.norm_topk, moe_lw(L, MOE_EXPERT_SCALE)};
        o->route(be, moe_lw(L, MOE_ROUTER), &r, ACT_OUT2, n);
        o->rmsnorm(be, ACT_XN, ACT_X, moe_lw(L, MOE_PRE_FFN_NORM_2), n, E, eps);
        o->experts_glu(be, moe_lw(L, MOE_GATE_EXPS), moe_lw(L, MOE_UP_EXPS), L->p.act, ACT_XN, n);
        o->experts_down(be, ACT_OUT2, moe_lw(L, MOE_DOWN_EXPS), n);
        o->rmsnorm(be, ACT_OUT2, ACT_OUT2, moe_lw(L, MOE_POST_FFN_NORM_2), n, E, eps);
        o->add(be, ACT_OUT, ACT_OUT2, n, E);
    }
    o->rmsnorm(be, ACT_OUT, ACT_OUT, moe_lw(L, MOE_POST_FFN_NORM), n, E, eps);
    o->add(be, ACT_X, ACT_OUT, n, E);
}

/* Per-layer embeddings (Gemma 4 E2B/E4B): for every layer l a P-wide input
   pli[l] = (norm(proj · e · hidden^-0.5) + emb_ple[tok] · sqrt(P)) · 2^-0.5 into ACT_PLE. */
static void ple_inputs(void *be, const moe_ops *o, const moe_weights *w, const moe_token *tokens, int n) {
    const moe_hparams *hp = &w->hp;
    int P = hp->n_ple, LP = hp->n_layer * P;
    o->embed(be, ACT_PLE2, &w->g[MOE_PLE_TOK_EMBD], tokens, n);    /* [n][L·P] */
    o->scale(be, ACT_PLE2, n, LP, NULL, hp->ple_scale);
    o->matmul(be, ACT_PLE, &w->g[MOE_PLE_MODEL_PROJ], ACT_X, 0, n); /* from the scaled embedding */
    o->scale(be, ACT_PLE, n, LP, NULL, 1.0f / sqrtf((float)hp->n_embd));
    o->rmsnorm(be, ACT_PLE, ACT_PLE, &w->g[MOE_PLE_PROJ_NORM], n * hp->n_layer, P, hp->rms_eps);
    o->add(be, ACT_PLE, ACT_PLE2, n, LP);
    o->scale(be, ACT_PLE, n, LP, NULL, 0.70710678118654752f);
}

/* the end of a layer with per-layer embeddings: x += norm(proj · (gelu(gate · x) ⊙ pli[l])) */
static void ple_block(void *be, const moe_ops *o, const moe_weights *w, int l, int n) {
    const moe_hparams *hp = &w->hp;
    const moe_layer *L = &w->layers[l];
    int P = hp->n_ple;
    o->matmul(be, ACT_PLE2, moe_lw(L, MOE_PLE_GATE), ACT_X, 0, n);   /* [n][P] */
    o->glu(be, ACT_PLE2, ACT_PLE2, ACT_PLE, l * P, hp->n_layer * P, n, P, MOE_ACT_GELU_TANH);
    o->matmul(be, ACT_OUT, moe_lw(L, MOE_PLE_PROJ), ACT_PLE2, 0, n);
    o->rmsnorm(be, ACT_OUT, ACT_OUT, moe_lw(L, MOE_PLE_POST_NORM), n, hp->n_embd, hp->rms_eps);
    o->add(be, ACT_X, ACT_OUT, n, hp->n_embd);
}

static void forward_gemma4(void *be, const moe_ops *o, const moe_weights *w, const moe_token *tokens, int n, int pos0, int n_out) {
    const moe_hparams *hp = &w->hp;
    o->embed(be, ACT_X, &w->g[MOE_TOK_EMBD], tokens, n);       /* [n][n_embd] */
    o->scale(be, ACT_X, n, hp->n_embd, NULL, hp->embd_scale);
    if (hp->n_ple) ple_inputs(be, o, w, tokens, n);
    for (int l = 0; l < hp->n_layer; l++) {
        gemma4_attention_block(be, o, w, l, n, pos0);
        gemma4_ffn_block(be, o, w, l, n);
        if (hp->n_ple) ple_block(be, o, w, l, n);
        if (w->layers[l].p.layer_scale != 0) o->scale(be, ACT_X, n, hp->n_embd, NULL, w->layers[l].p.layer_scale);
    }
    o->rmsnorm(be, ACT_XN, ACT_X, &w->g[MOE_OUTPUT_NORM], n, hp->n_embd, hp->rms_eps);
    lm_head(be, o, w, n, n_out);
}

/* ==== hybrid Gated DeltaNet models (ARCHITECTURES.md §3): the blocks and the forward pass ==== */
/* Gated full attention (§3.3): q_proj gives [q | gate] per head; o ⊙= sigmoid(gate) before Wo. */
static void gated_attention_block(void *be, const moe_ops *o, const moe_weights *w, int l, int n, int pos0) {
    const moe_hparams *hp = &w->hp;
    const moe_layer *L = &w->layers[l];
    const moe_attn *a = &L->p.attn;
    o->rmsnorm(be, ACT_XN, ACT_X, moe_lw(L, MOE_ATTN_NORM), n, hp->n_embd, hp->rms_eps);
    o->matmul(be, ACT_DN_QKV, moe_lw(L, MOE_WQ), ACT_XN, 0, n);     /* [n][n_head][q | gate] */
    o->split_heads(be, ACT_Q, ACT_DN_Z, ACT_DN_QKV, n, a->n_head, a->head_dim);
    o->matmul(be, ACT_K, moe_lw(L, MOE_WK), ACT_XN, 0, n);
    o->matmul(be, ACT_V, moe_lw(L, MOE_WV), ACT_XN, 0, n);
    o->rmsnorm(be, ACT_Q, ACT_Q, moe_lw(L, MOE_Q_NORM), n * a->n_head, a->head_dim, hp->rms_eps);
    o->rmsnorm(be, ACT_K, ACT_K, moe_lw(L, MOE_K_NORM), n * a->n_head_kv, a->head_dim, hp->rms_eps);
    o->rope(be, ACT_Q, n, a->n_head, a->head_dim, &L->p.rope, pos0); /* partial: the first n_rot dims */
    o->rope(be, ACT_K, n, a->n_head_kv, a->head_dim, &L->p.rope, pos0);
    o->attention(be, a, n, pos0);                                     /* [n][n_head·hd] */
    o->sigmoid_mul(be, ACT_ATTN, ACT_DN_Z, n, a->n_head * a->head_dim);
    o->matmul(be, ACT_OUT, moe_lw(L, MOE_WO), ACT_ATTN, 0, n);
    o->add(be, ACT_X, ACT_OUT, n, hp->n_embd);
}

/* Gated DeltaNet (§3.4): x += out_proj( gnorm(delta_rule(conv(qkv a)), silu(z a)) ). */
static void deltanet_block(void *be, const moe_ops *o, const moe_weights *w, int l, int n) {
    const moe_hparams *hp = &w->hp;
    const moe_layer *L = &w->layers[l];
    const moe_deltanet *dn = &L->p.dn;
    o->rmsnorm(be, ACT_XN, ACT_X, moe_lw(L, MOE_ATTN_NORM), n, hp->n_embd, hp->rms_eps);
    o->matmul(be, ACT_DN_QKV, moe_lw(L, MOE_SSM_QKV), ACT_XN, 0, n); /* [n][q_all | k_all | v_all] */
    o->matmul(be, ACT_DN_Z, moe_lw(L, MOE_SSM_Z), ACT_XN, 0, n);     /* [n][nv·dv] */
    if (dn->ba_grouped) o->matmul(be, ACT_DN_BETA, moe_lw(L, MOE_SSM_BA), ACT_XN, 0, n); /* [n][nk][b | a] */
    else {
        o->matmul(be, ACT_DN_BETA, moe_lw(L, MOE_SSM_BETA), ACT_XN, 0, n);   /* [n][nv] */
        o->matmul(be, ACT_DN_ALPHA, moe_lw(L, MOE_SSM_ALPHA), ACT_XN, 0, n); /* [n][nv] */
    }
    o->ssm_conv(be, dn, moe_lw(L, MOE_SSM_CONV), n);                  /* silu(conv) → ACT_DN_CONV */
    o->delta_net(be, dn, moe_lw(L, MOE_SSM_A), moe_lw(L, MOE_SSM_DT), n); /* → ACT_DN_O [n][nv·dv] */
    o->gated_rmsnorm(be, ACT_DN_O, ACT_DN_Z, moe_lw(L, MOE_SSM_NORM), n * dn->n_v_head, dn->v_dim, hp->rms_eps);
    o->matmul(be, ACT_OUT, moe_lw(L, MOE_SSM_OUT), ACT_DN_O, 0, n);
    o->add(be, ACT_X, ACT_OUT, n, hp->n_embd);
}

/* SwiGLU MLP: dst = down( silu(gate src) ⊙ up src ), hidden rows in ACT_FF / ACT_FF2 */
static void swiglu_mlp(void *be, const moe_ops *o, const moe_weight *gate, const moe_weight *up, const moe_weight *down,
                       int dst, int src, int n) {
    int F = (int)gate->ne[1];
    o->matmul(be, ACT_FF, gate, src, 0, n);
    o->matmul(be, ACT_FF2, up, src, 0, n);
    o->glu(be, ACT_FF, ACT_FF, ACT_FF2, 0, F, n, F, MOE_ACT_SILU);
    o->matmul(be, dst, down, ACT_FF, 0, n);
}

/* FFN (§3.5): x += routed experts + sigmoid(w·m) · shared expert(m), or a dense SwiGLU. */
static void hybrid_ffn_block(void *be, const moe_ops *o, const moe_weights *w, int l, int n) {
    const moe_hparams *hp = &w->hp;
    const moe_layer *L = &w->layers[l];
    o->rmsnorm(be, ACT_XN, ACT_X, moe_lw(L, MOE_POST_ATTN_NORM), n, hp->n_embd, hp->rms_eps);
    if (L->p.ffn_kind == MOE_FFN_DENSE)
        swiglu_mlp(be, o, moe_lw(L, MOE_FFN_GATE), moe_lw(L, MOE_FFN_UP), moe_lw(L, MOE_FFN_DOWN), ACT_OUT, ACT_XN, n);
    else {
        routed_experts(be, o, L, ACT_OUT, ACT_XN, n);
        if (L->p.ffn_kind == MOE_FFN_MOE_SHARED) {
            swiglu_mlp(be, o, moe_lw(L, MOE_FFN_GATE_SHEXP), moe_lw(L, MOE_FFN_UP_SHEXP), moe_lw(L, MOE_FFN_DOWN_SHEXP), ACT_OUT2, ACT_XN, n);
            o->gate_rows(be, ACT_OUT2, ACT_XN, moe_lw(L, MOE_FFN_GATE_INP_SHEXP), n, hp->n_embd);
            o->add(be, ACT_OUT, ACT_OUT2, n, hp->n_embd);
        }
    }
    o->add(be, ACT_X, ACT_OUT, n, hp->n_embd);
}

static void forward_hybrid(void *be, const moe_ops *o, const moe_weights *w, const moe_token *tokens, int n, int pos0, int n_out) {
    const moe_hparams *hp = &w->hp;
    o->embed(be, ACT_X, &w->g[MOE_TOK_EMBD], tokens, n);
    for (int l = 0; l < hp->n_layer; l++) {
        if (w->layers[l].p.attn_kind == MOE_ATTN_DELTANET) deltanet_block(be, o, w, l, n);
        else gated_attention_block(be, o, w, l, n, pos0);
        hybrid_ffn_block(be, o, w, l, n);
    }
    o->rmsnorm(be, ACT_XN, ACT_X, &w->g[MOE_OUTPUT_NORM], n, hp->n_embd, hp->rms_eps);
    lm_head(be, o, w, n, n_out);
}

/* ---- the architecture table ---- */
static const moe_arch k_archs[] = {
    {"qwen3moe", "qwen3_moe", qwen3moe_hparams_gguf, qwen3moe_hparams_hf, qwen3moe_tensors, qwen3moe_write_hparams, NULL, forward_qwen3moe},
    {"gemma4", "gemma4", gemma4_hparams_gguf, gemma4_hparams_hf, gemma4_tensors, gemma4_write_hparams, gemma4_finish, forward_gemma4},
    {"gemma4", "gemma4_text", gemma4_hparams_gguf, gemma4_hparams_hf, gemma4_tensors, gemma4_write_hparams, gemma4_finish, forward_gemma4},
    /* hybrid Gated DeltaNet models */
    {"qwen3next", "qwen3_next", hybrid_hparams_gguf, hybrid_hparams_hf, qwen3next_tensors, hybrid_write_hparams, hybrid_finish, forward_hybrid},
    {"qwen35moe", "qwen3_5_moe", hybrid_hparams_gguf, hybrid_hparams_hf, qwen35_tensors, hybrid_write_hparams, hybrid_finish, forward_hybrid},
    {"qwen35", "qwen3_5", hybrid_hparams_gguf, hybrid_hparams_hf, qwen35_tensors, hybrid_write_hparams, hybrid_finish, forward_hybrid},
    {"qwen35moe", "qwen3_5_moe_text", hybrid_hparams_gguf, hybrid_hparams_hf, qwen35_tensors, hybrid_write_hparams, hybrid_finish, forward_hybrid},
    {"qwen35", "qwen3_5_text", hybrid_hparams_gguf, hybrid_hparams_hf, qwen35_tensors, hybrid_write_hparams, hybrid_finish, forward_hybrid},
};

static const moe_arch *arch_find(const char *gguf_name, const char *hf_type, int32_t *index) {
    char list[256] = "";
    for (size_t i = 0; i < sizeof k_archs / sizeof k_archs[0]; i++) {
        const moe_arch *a = &k_archs[i];
        if ((gguf_name && !strcmp(gguf_name, a->name)) || (hf_type && !strcmp(hf_type, a->hf_type))) {
            *index = (int32_t)i;
            return a;
        }
        size_t len = strlen(list);
        snprintf(list + len, sizeof list - len, "%s%s", len ? ", " : "", gguf_name ? a->name : a->hf_type);
    }
    if (gguf_name) set_error(MOE_ERR_UNSUPPORTED, "model: architecture '%s' is not supported yet (supported: %s)", gguf_name, list);
    else set_error(MOE_ERR_UNSUPPORTED, "config.json: model_type '%s' is not supported (supported: %s)", hf_type, list);
    return NULL;
}

/* ============================================================================================ */
/* 7. CPU backend                                                                                */
/* ============================================================================================ */
#define CPU_ROWS_PER_TASK 16

/* expert streaming (section 8): the host cache and what the CPU expert ops ask of it */
#define XS_MAX_T MOE_XS_MAX_T /* expert tensors per layer */
typedef moe_xs_counts xs_counts; /* per-context counters (moe_stats and the prediction hit rate), moe.h */
static int xs_acquire(moe_xcache *xc, int l, const int32_t *ids, int n, const int32_t *pairs,
                      const uint8_t **tab, int32_t *sl, xs_counts *cnt);
static void xs_release(moe_xcache *xc, int l, const int32_t *ids, int n);
static void xs_prefetch(moe_xcache *xc, int l, const int32_t *ids, const uint8_t *cls, int n, xs_counts *cnt);
static void xs_judge(moe_xcache *xc, int l, uint8_t *pred, const int32_t *ids, int n);
static int xs_prefetch_on(const moe_xcache *xc);

typedef struct cpu_ctx {
    cpu_kernels k;
    uint64_t bytes;            /* host memory this context holds */
    const moe_weights *w;
    moe_ctx_shape shape;
    thread_pool *pool;         /* the model's, shared by its contexts (not owned) */
    int n_threads;             /* the pool's: per-thread scratch below has this many parts */
    float *act[ACT_COUNT];
    void *k_cache, *v_cache;   /* every cache's rows, one after the other, f32 or f16 */
    size_t *kv_off;            /* [n_cache] element offset of cache c */
    int32_t *kv_rows;          /* [n_cache] rows of cache c (moe_cache_rows) */
    int kv_f16;
    float *row_buf;            /* per thread: one dequantized weight row */
    int exact;                 /* cpu_exact: f32 activations in every matrix product */
    uint8_t *xq;               /* int8 mode: the quantized activation rows of the current op */
    size_t xq_cap;
    float *att_buf;            /* per thread: n_ctx scores of up to n_head heads + head_dim scratch */
    size_t row_buf_len, att_buf_len;
    /* MoE routing state for n_batch tokens, from route to experts_down */
    int route_n, route_k;      /* tokens routed, experts per token */
    int32_t *topk_id;          /* [n][k] */
    float *topk_w;             /* [n][k] */
    int32_t *pair_of;          /* [n·k]  (token, slot) → pair index, pairs grouped by expert */
    int32_t *pair_tok;         /* [n·k]  token of each pair */
    int32_t *exp_start;        /* [n_expert + 1] */
    int32_t *tasks;            /* (expert, first row) work items */
    float *pair_h, *pair_u;    /* [n·k][n_ff] */
    float *pair_out;           /* [n·k][n_embd] */
    /* expert streaming (section 8): the model's host cache, and this context's view of the group
       of experts it has pinned; fail: the step's first error (the rest of its expert work is
       skipped, end_step reports it) */
    moe_xcache *xs;
    const uint8_t **xtab;      /* [XS_MAX_T][n_expert] slabs of the pinned group */
    int32_t *xids, *xpairs, *xslots;   /* [n_expert] distinct experts of a layer, their pairs, slots */
    float *xpred;              /* [n_embd + n_expert] prediction scratch */
    uint8_t *xpredset;         /* [n_layer][n_expert] experts predicted for a layer: 0, or its class + 1 */
    uint8_t *xpredmade;        /* [n_layer] a prediction was made for the layer this step */
    moe_status fail;
    xs_counts xcnt;
    struct cpu_prof *prof;     /* moe_ctx_profile: time per op kind; NULL when off */
    /* hybrid models: recurrent states, each its conv rows then its f32 delta-rule state */
    float *st;                 /* the live states [st_elems] */
    size_t *st_off;            /* [n_state] offset of state s in st */
    size_t st_elems;
    float *ckpt;               /* [n_ckpt][st_elems] checkpoints */
    int n_ckpt;
    float *dn_buf;             /* per thread: the delta rule's scratch (token or chunked form) */
    size_t dn_buf_len;
    int dn_chunked;            /* MOE_CPU_DN_CHUNKED=1: prefill in the chunked (WY) form */
    struct cpu_batch *batch;   /* moe_step_batch's scratch context: the pass's segments; else NULL */
} cpu_ctx;

struct moe_ctx {
    moe_model *model;
    const moe_ops *ops;
    int32_t n_ctx, n_batch, kv_type, logits_all;
    int32_t pos;
    moe_token *tokens;         /* [n_ctx] the tokens at positions 0 .. pos-1 (for recomputation) */
    int32_t ring_lo;           /* sliding-window rings hold every position in [ring_lo, pos) */
    int32_t needs_repair;      /* a failed step clobbered ring rows still needed: recompute first */
    float *logits;             /* [logits_cap rows][n_vocab] on the host */
    int32_t n_logits, logits_cap;
    moe_stats stats;
    void *be;                  /* the backend's per-context state (cpu_ctx or Vulkan's) */
    cpu_ctx *cpu;              /* == be on the CPU backend, else NULL */
    /* hybrid models: a recurrent state cannot be rewound by moving pos (moe_ctx_rewind) */
    uint8_t *seg;              /* [n_ctx] 1 where a forward chunk began */
    int32_t ckpt_every;        /* 0: no recurrent state; else slot s holds the states at (s+1)·ckpt_every */
    int32_t n_ckpt;
    uint8_t *ckpt_ok;          /* [n_ckpt] */
    /* abort and asynchronous steps (moe.h, ASYNCHRONOUS STEPS) */
    int32_t (*abort)(void *user);
    void *abort_user;
    int32_t backup_slot;       /* recurrent states with an abort callback: the slot holding the states
                                  from before the step (put back on a cancel); -1 = none */
    atomic_int stop;           /* moe_ctx_free asks the step in flight to stop */
    int32_t in_flight;         /* submitted and not yet collected by moe_step_wait */
    struct ctx_worker *wk;     /* the worker thread, started by the first moe_step_submit */
    /* moe_step_batch on the CPU: the scratch context whose buffers hold the rows of all contexts
       of a pass, kept by the first context of the call for the next one (NULL until then) */
    cpu_ctx *batch_cc;
    int32_t batch_rows;
    void *batch_vk;            /* the same on Vulkan: moe_vk.c's lead context of a pass */
    int32_t batch_vk_rows, batch_vk_outs; /* its rows, and the logits rows it keeps */
    uint32_t max_submit_us;    /* Vulkan (moe_ctx_params): the lead of the passes this context keeps takes them too */
    int32_t low_priority;
    int32_t profiling;         /* moe_ctx_profile is on (a pass times no context's ops) */
};

/* the abort poll the backends call: moe_ctx_free's stop, then the caller's callback */
static int32_t ctx_abort_poll(void *user) {
    moe_ctx *c = user;
    return atomic_load(&c->stop) || (c->abort && c->abort(c->abort_user));
}

/* Every call on a context but moe_step_wait and moe_ctx_free is refused while a step is in flight:
   the worker owns the context until moe_step_wait has collected the step. */
#define CTX_NOT_BUSY(ctx, fn, ret)                                                                             \
    do {                                                                                                       \
        if ((ctx)->in_flight) {                                                                                \
            set_error(MOE_ERR_BUSY, "%s: a step is in flight on this context (moe_step_submit): call moe_step_wait first", fn); \
            return ret;                                                                                        \
        }                                                                                                      \
    } while (0)

static float *act_row(cpu_ctx *cc, int buf, int row, int width) { return cc->act[buf] + (size_t)row * (size_t)width; }

static int act_width(const moe_weights *w, int buf) {
    const moe_hparams *hp = &w->hp;
    switch (buf) {
    case ACT_Q: case ACT_ATTN: return hp->n_head * hp->head_dim;
    case ACT_K: case ACT_V: return hp->n_head_kv * hp->head_dim;
    case ACT_ROUTER: return hp->n_expert;
    case ACT_LOGITS: return hp->n_vocab;
    case ACT_FF: case ACT_FF2: return hp->n_ff;
    case ACT_PLE: case ACT_PLE2: return hp->n_layer * hp->n_ple;
    /* hybrid models (Gated DeltaNet) */
    case ACT_DN_QKV: return hp->dn_qkv;
    case ACT_DN_CONV: return hp->dn_conv;
    case ACT_DN_Z: return hp->dn_value;
    case ACT_DN_BETA: return 2 * hp->dn_v_head;
    case ACT_DN_ALPHA: return hp->dn_v_head;
    case ACT_DN_O: return hp->dn_value;
    default: return hp->n_embd;
    }
}

static void cpu_embed(void *be, int dst, const moe_weight *w, const moe_token *tokens, int n) {
    cpu_ctx *cc = be;
    if (cc->fail) return; /* a cancelled or failed step: inputs never computed */
    const moe_type_traits *tt = type_traits(w->type);
    for (int i = 0; i < n; i++)
        tt->dequant(w->data + (uint64_t)tokens[i] * w->row_bytes, act_row(cc, dst, i, (int)w->ne[0]), w->ne[0]);
}

static void cpu_rmsnorm(void *be, int dst, int src, const moe_weight *w, int n_rows, int width, float eps) {
    cpu_ctx *cc = be;
    if (cc->fail) return; /* a cancelled or failed step: its inputs were never computed (valgrind) */
    const float *g = w ? (const float *)w->data : NULL;
    for (int r = 0; r < n_rows; r++) {
        const float *x = act_row(cc, src, r, width);
        float *y = act_row(cc, dst, r, width);
        float scale = 1.0f / sqrtf(cc->k.dot(x, x, width) / (float)width + eps);
        for (int i = 0; i < width; i++) y[i] = x[i] * scale * (g ? g[i] : 1.0f);
    }
}

/* dst[i·dst_stride + r] = W_r · src_i for rows r of a task; src_i is activation row x0 + i or,
   with a gather list, row x0 + idx[i]: f32 rows of src, or (int8 mode, qdot set) the rows of xq. */
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
    int64_t xbase;             /* experts_down: pair index of src row 0 (a group's first pair) */
    /* int8 activations (NULL qdot: f32) */
    q8_dot_fn qdot;
    const uint8_t *xq;
    size_t xq_stride;
    int64_t nb;                /* weight blocks per row */
} mm_job;

/* Tokens go through a weight row four at a time: the row is read from memory once and its
   unpacked codes (int8) or dequantized floats (f32) are reused; each token's sum is computed
   exactly as it would be alone, so prefill still equals decode bit for bit. */
static void mm_rows(const mm_job *j, const uint8_t *w, int64_t r0, int64_t r1, int64_t x0, const int32_t *idx, int n,
                    float *dst, int thread) {
    const cpu_kernels *k = &j->cc->k;
    float out[4 * CPU_ROWS_PER_TASK];
    if (j->qdot) { /* runs of 16 rows (in L1 after the first pass) against 4 tokens at a time */
        for (int64_t c0 = r0; c0 < r1; c0 += CPU_ROWS_PER_TASK) {
            int64_t c1 = c0 + CPU_ROWS_PER_TASK < r1 ? c0 + CPU_ROWS_PER_TASK : r1;
            for (int i0 = 0; i0 < n; i0 += 4) {
                int nt = n - i0 < 4 ? n - i0 : 4;
                const void *xs[4];
                for (int t = 0; t < nt; t++) xs[t] = j->xq + (size_t)(x0 + (idx ? idx[i0 + t] : i0 + t)) * j->xq_stride;
                j->qdot(w + (uint64_t)c0 * j->row_bytes, j->row_bytes, (int)(c1 - c0), xs, nt, j->nb, out);
                for (int64_t r = c0; r < c1; r++)
                    for (int t = 0; t < nt; t++) dst[(int64_t)(i0 + t) * j->dst_stride + r] = out[(r - c0) * nt + t];
            }
        }
        return;
    }
    float *row = j->cc->row_buf + (size_t)thread * j->cc->row_buf_len;
    for (int64_t r = r0; r < r1; r++) {
        const uint8_t *wr = w + (uint64_t)r * j->row_bytes;
        if (n == 1) {
            dst[r] = k->row_dot(j->tt, wr, j->src + (x0 + (idx ? idx[0] : 0)) * j->K, j->K);
            continue;
        }
        j->tt->dequant(wr, row, j->K);
        for (int i0 = 0; i0 < n; i0 += 4) {
            int nt = n - i0 < 4 ? n - i0 : 4;
            const float *xs[4];
            for (int t = 0; t < nt; t++) xs[t] = j->src + (x0 + (idx ? idx[i0 + t] : i0 + t)) * j->K;
            k->dot_n(row, xs, nt, j->K, out);
            for (int t = 0; t < nt; t++) dst[(int64_t)(i0 + t) * j->dst_stride + r] = out[t];
        }
    }
}

/* int8 mode: quantizes n_rows activation rows (j->K wide, from src) for a weight of this type
   into the context's xq and points the job at them; leaves the job on f32 in exact mode or
   for types without an int8 kernel. */
typedef struct q8_job { const cpu_kernels *k; int fmt; const float *src; int64_t K; uint8_t *dst; size_t stride; int n; } q8_job;
#define Q8_ROWS_PER_TASK 8

static void q8_rows_task(void *arg, int64_t t, int thread) {
    (void)thread;
    const q8_job *q = arg;
    for (int64_t i = t * Q8_ROWS_PER_TASK; i < q->n && i < (t + 1) * Q8_ROWS_PER_TASK; i++)
        (q->fmt == Q8_K ? q->k->quant_q8k : q->k->quant_q8a)(q->src + i * q->K, q->dst + (size_t)i * q->stride, q->K);
}

static void mm_quant_src(cpu_ctx *cc, mm_job *j, int32_t type, const float *src, int n_rows) {
    int fmt = q8_format(type);
    j->qdot = NULL;
    if (cc->exact || !fmt || !cc->xq) return;
    q8_job q = {&cc->k, fmt, src, j->K, cc->xq, q8_row_bytes(fmt, j->K), n_rows};
    if ((size_t)n_rows * q.stride > cc->xq_cap) return; /* cannot happen: sized for the largest op */
    pool_run(cc->pool, q8_rows_task, &q, (n_rows + Q8_ROWS_PER_TASK - 1) / Q8_ROWS_PER_TASK);
    j->qdot = q8_kernel(&cc->k, type);
    j->xq = cc->xq;
    j->xq_stride = q.stride;
    j->nb = j->K / j->tt->block_elems;
}

/* A dense matrix goes out in tasks of 64 rows: each thread then reads longer contiguous runs,
   and the prefetch that runs ahead of the kernels restarts less often. */
#define CPU_DENSE_ROWS_PER_TASK 64

static void mm_dense_task(void *arg, int64_t t, int thread) {
    const mm_job *j = arg;
    int64_t r0 = t * CPU_DENSE_ROWS_PER_TASK, r1 = r0 + CPU_DENSE_ROWS_PER_TASK < j->M ? r0 + CPU_DENSE_ROWS_PER_TASK : j->M;
    mm_rows(j, j->w, r0, r1, 0, j->idx, j->n, j->dst, thread);
}

/* abort (moe_ctx_params): polled where a layer's token mixing begins (attention, delta rule), so a
   cancel waits for one block at most; after it (or any failure) the heavy ops of the rest of the
   chunk do nothing, their results being thrown away with the step */
static int cpu_stopped(cpu_ctx *cc) {
    if (!cc->fail && cc->shape.abort && cc->shape.abort(cc->shape.abort_user))
        cc->fail = set_error(MOE_ERR_CANCELLED, "moe_step: cancelled by the abort callback");
    return cc->fail != MOE_OK;
}

static void cpu_matmul(void *be, int dst, const moe_weight *w, int src, int src_row0, int n) {
    cpu_ctx *cc = be;
    if (n <= 0 || cc->fail) return;
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
    mm_quant_src(cc, &j, w->type, j.src, n);
    pool_run(cc->pool, mm_dense_task, &j, (j.M + CPU_DENSE_ROWS_PER_TASK - 1) / CPU_DENSE_ROWS_PER_TASK);
}

static void cpu_rope(void *be, int buf, int n, int n_head, int head_dim, const moe_rope *rope, int pos0) {
    cpu_ctx *cc = be;
    if (cc->fail) return; /* a cancelled or failed step: inputs never computed */
    int half = rope->n_rot / 2;
    for (int i = 0; i < n; i++) {
        float pos = (float)(pos0 + i);
        for (int p = 0; p < rope->n_freq; p++) { /* pairs p >= n_freq turn by angle 0: unchanged */
            /* as HF: inv_freq in f32, angle = f32(pos · inv_freq), cos/sin of that */
            float inv_freq = (float)(1.0 / pow((double)rope->base, (double)(2 * p) / (double)rope->freq_dim));
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

/* a K or V row of the cache as f32: a pointer into an f32 cache, or converted into tmp */
static const float *kv_get(const cpu_ctx *cc, const void *cache, size_t at, float *tmp, int n) {
    if (!cc->kv_f16) return (const float *)cache + at;
    cc->k.f16_row((const uint8_t *)cache + at * 2, tmp, n);
    return tmp;
}

/* split: each (token, KV head) task covers its group's query heads in `split` parts */
typedef struct attn_job { cpu_ctx *cc; const moe_attn *a; int n, pos0, split; } attn_job;

/* one (token, KV head, part of its query heads): each K and V row is read (and converted from
   f16) once for all the heads that share it; per head, the softmax over the keys it sees in
   position order and every float operation are those of one head alone */
static void attn_task(void *arg, int64_t t, int thread) {
    const attn_job *j = arg;
    cpu_ctx *cc = j->cc;
    const moe_attn *a = j->a;
    int hd = a->head_dim, kvw = a->n_head_kv * hd, group = a->n_head / a->n_head_kv;
    int part = (int)(t % j->split), kvh = (int)(t / j->split % a->n_head_kv), i = (int)(t / j->split / a->n_head_kv);
    int h0 = kvh * group + part * group / j->split, h1 = kvh * group + (part + 1) * group / j->split, nh = h1 - h0;
    int pos = j->pos0 + i, p0 = a->window && pos >= a->window ? pos - a->window + 1 : 0, np = pos - p0 + 1;
    size_t cache_off = cc->kv_off[a->cache] + (size_t)kvh * (size_t)hd;
    int rows = cc->kv_rows[a->cache];
    float *scores = cc->att_buf + (size_t)thread * cc->att_buf_len; /* [nh][np] */
    float *tmp = scores + (size_t)cc->shape.n_ctx * (size_t)a->n_head;
    const float *q = act_row(cc, ACT_Q, i, a->n_head * hd) + (size_t)h0 * (size_t)hd;
    float *out = act_row(cc, ACT_ATTN, i, a->n_head * hd) + (size_t)h0 * (size_t)hd;
    for (int p = p0; p <= pos; p++) {
        const float *k = kv_get(cc, cc->k_cache, cache_off + (size_t)(p % rows) * (size_t)kvw, tmp, hd);
        for (int h = 0; h < nh; h++) scores[(size_t)h * np + (p - p0)] = cc->k.dot(q + (size_t)h * hd, k, hd) * a->scale;
    }
    float inv[64 * 4];
    for (int h = 0; h < nh; h++) {
        float *sc = scores + (size_t)h * np, mx = -INFINITY, sum = 0;
        for (int p = 0; p < np; p++) mx = fmaxf(mx, sc[p]);
        for (int p = 0; p < np; p++) sum += (sc[p] = expf(sc[p] - mx));
        inv[h] = 1.0f / sum;
    }
    memset(out, 0, (size_t)nh * (size_t)hd * sizeof *out);
    for (int p = p0; p <= pos; p++) {
        const float *v = kv_get(cc, cc->v_cache, cache_off + (size_t)(p % rows) * (size_t)kvw, tmp, hd);
        for (int h = 0; h < nh; h++) {
            float wgt = scores[(size_t)h * np + (p - p0)] * inv[h], *o = out + (size_t)h * hd;
            for (int d = 0; d < hd; d++) o[d] += wgt * v[d];
        }
    }
}

/* stores ACT_K / ACT_V rows as positions pos0.. of the cache, and gives the attention job with
   its task count: enough tasks for the threads, and at most 256 heads per task (inv[] above) */
static attn_job attn_prepare(cpu_ctx *cc, const moe_attn *a, int n, int pos0, int64_t *n_tasks) {
    int kvw = a->n_head_kv * a->head_dim, rows = cc->kv_rows[a->cache], group = a->n_head / a->n_head_kv;
    for (int i = 0; a->store && i < n; i++) {
        size_t at = cc->kv_off[a->cache] + (size_t)((pos0 + i) % rows) * (size_t)kvw;
        kv_put(cc, cc->k_cache, at, act_row(cc, ACT_K, i, kvw), kvw);
        kv_put(cc, cc->v_cache, at, act_row(cc, ACT_V, i, kvw), kvw);
    }
    int split = 1;
    while (split < group && ((int64_t)n * a->n_head_kv * split < 2 * cc->n_threads || group / split > 256)) split++;
    attn_job j = {cc, a, n, pos0, split};
    *n_tasks = (int64_t)n * a->n_head_kv * split;
    return j;
}

static void cpu_attention(void *be, const moe_attn *a, int n, int pos0) {
    cpu_ctx *cc = be;
    if (cpu_stopped(cc)) return;
    int64_t n_tasks;
    attn_job j = attn_prepare(cc, a, n, pos0, &n_tasks);
    pool_run(cc->pool, attn_task, &j, n_tasks);
}

static void cpu_add(void *be, int dst, int src, int n, int width) {
    cpu_ctx *cc = be;
    if (cc->fail) return; /* a cancelled or failed step: inputs never computed */
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
    mm_rows(j, j->expert_data[e], r0, r1, 0, j->idx + p0, np, j->dst + (size_t)p0 * (size_t)j->M, thread);
    if (j->expert_data2)
        mm_rows(j, j->expert_data2[e], r0, r1, 0, j->idx + p0, np, j->dst2 + (size_t)p0 * (size_t)j->M, thread);
}

static void moe_down_task(void *arg, int64_t t, int thread) {
    const mm_job *j = arg;
    int e = j->cc->tasks[2 * t], r0 = j->cc->tasks[2 * t + 1];
    int r1 = r0 + CPU_ROWS_PER_TASK < j->M ? r0 + CPU_ROWS_PER_TASK : (int)j->M;
    int p0 = j->exp_start[e], np = j->exp_start[e + 1] - p0;
    mm_rows(j, j->expert_data[e], r0, r1, p0 - j->xbase, NULL, np, j->dst + (size_t)p0 * (size_t)j->M, thread);
}

/* work items (expert, first row) for the experts [e0, e1) that have pairs */
static int64_t expert_tasks(cpu_ctx *cc, const int32_t *exp_start, int e0, int e1, int64_t rows) {
    int64_t nt = 0;
    for (int e = e0; e < e1; e++) {
        if (exp_start[e + 1] == exp_start[e]) continue;
        for (int64_t r = 0; r < rows; r += CPU_ROWS_PER_TASK) {
            cc->tasks[2 * nt] = e;
            cc->tasks[2 * nt + 1] = (int32_t)r;
            nt++;
        }
    }
    return nt;
}

/* router logits, top-k per token, then the (token, slot) pairs grouped by expert */
static void cpu_route(void *be, const moe_weight *router, const moe_route *r, int src, int n) {
    cpu_ctx *cc = be;
    if (cc->fail) return;
    int k = r->k, E = r->n_expert;
    if (router) cpu_matmul(be, ACT_ROUTER, router, src, 0, n); /* [n][n_expert] */
    const float *es = r->expert_scale ? (const float *)r->expert_scale->data : NULL;
    for (int i = 0; i < n; i++) {
        router_topk(act_row(cc, ACT_ROUTER, i, E), E, k, r->norm, cc->topk_id + i * k, cc->topk_w + i * k);
        for (int s = 0; es && s < k; s++) cc->topk_w[i * k + s] *= es[cc->topk_id[i * k + s]];
    }
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
    cc->route_n = n;
    cc->route_k = k;
}

static float glu_act(int act, float g) {
    switch (act) {
    case MOE_ACT_GELU_TANH: return 0.5f * g * (1.0f + tanhf(0.7978845608028654f * (g + 0.044715f * g * g * g)));
    default: return g / (1.0f + expf(-g));                     /* silu */
    }
}

/* gate and up rows of the pairs of experts [e0, e1) into pair_h / pair_u, then pair_h = act(gate) ⊙ up;
   gd / ud: the experts' slabs (the weights' own tables, or a streamed group's) */
static void cpu_glu_range(cpu_ctx *cc, const moe_weight *gate, const uint8_t *const *gd, const moe_weight *up,
                          const uint8_t *const *ud, int act, int src, int n, int e0, int e1) {
    int ff = (int)gate->ne[1], D = (int)gate->ne[0];
    const int32_t *start = cc->exp_start;
    mm_job j = {0};
    j.cc = cc;
    j.exp_start = start;
    j.idx = cc->pair_tok;
    j.src = act_row(cc, src, 0, D);
    j.tt = type_traits(gate->type);
    j.K = D;
    j.M = ff;
    j.row_bytes = gate->row_bytes;
    j.expert_data = gd;
    j.expert_data2 = ud;
    j.dst = cc->pair_h;
    j.dst2 = cc->pair_u;
    j.dst_stride = ff;
    mm_quant_src(cc, &j, gate->type, j.src, n);
    if (up->type == gate->type) pool_run(cc->pool, moe_gate_up_task, &j, expert_tasks(cc, start, e0, e1, ff));
    else { /* rare: run the two as separate passes (their activations may need different formats) */
        mm_job ju = j;
        j.expert_data2 = NULL;
        pool_run(cc->pool, moe_gate_up_task, &j, expert_tasks(cc, start, e0, e1, ff));
        ju.tt = type_traits(up->type);
        ju.row_bytes = up->row_bytes;
        ju.expert_data = ud;
        ju.expert_data2 = NULL;
        ju.dst = cc->pair_u;
        mm_quant_src(cc, &ju, up->type, ju.src, n);
        pool_run(cc->pool, moe_gate_up_task, &ju, expert_tasks(cc, start, e0, e1, ff));
    }
    for (size_t i = (size_t)start[e0] * (size_t)ff; i < (size_t)start[e1] * (size_t)ff; i++)
        cc->pair_h[i] = glu_act(act, cc->pair_h[i]) * cc->pair_u[i];
}

/* down rows of the pairs of experts [e0, e1) into pair_out (dd: the experts' slabs) */
static void cpu_down_range(cpu_ctx *cc, const moe_weight *down, const uint8_t *const *dd, int e0, int e1) {
    int ff = (int)down->ne[0], D = (int)down->ne[1];
    int p0 = cc->exp_start[e0], p1 = cc->exp_start[e1];
    mm_job jd = {0};
    jd.cc = cc;
    jd.exp_start = cc->exp_start;
    jd.src = cc->pair_h + (size_t)p0 * (size_t)ff;
    jd.xbase = p0;
    jd.tt = type_traits(down->type);
    jd.K = ff;
    jd.M = D;
    jd.row_bytes = down->row_bytes;
    jd.expert_data = dd;
    jd.dst = cc->pair_out;
    jd.dst_stride = D;
    mm_quant_src(cc, &jd, down->type, jd.src, p1 - p0);
    pool_run(cc->pool, moe_down_task, &jd, expert_tasks(cc, cc->exp_start, e0, e1, D));
}

/* the layer of an expert weight, and the index of its slab in a streamed unit */
static int cpu_expert_layer(const cpu_ctx *cc, const moe_weight *mw, int *slab) {
    const moe_layer *L0 = cc->w->layers;
    int l = (int)(((const char *)mw - (const char *)L0) / (ptrdiff_t)sizeof *L0);
    int role = (int)(mw - L0[l].t), t = 0;
    for (int r = 0; r < role; r++) t += L0[l].t[r].data && L0[l].t[r].n_dims == 3;
    *slab = t;
    return l;
}

/* Prediction: the next MoE layer's router applied to the current hidden state (the residual
   before this layer's FFN, normed with the next layer's FFN norm); its top-k experts for each
   token of a short step are predicted, each with its best rank among the tokens as its class
   (xs_prefetch reads ahead those whose class has good odds; xs_judge scores them at that layer). */
static void cpu_predict_prefetch(cpu_ctx *cc, int l, int n) {
    const moe_weights *w = cc->w;
    int l2 = l + 1;
    while (l2 < w->hp.n_layer && !moe_lw(&w->layers[l2], MOE_GATE_EXPS)) l2++;
    if (l2 >= w->hp.n_layer || n > 4) return;
    const moe_layer *L = &w->layers[l2];
    const moe_weight *router = moe_lw(L, MOE_ROUTER), *norm = moe_lw(L, MOE_FFN_NORM);
    if (!router) return;
    int D = w->hp.n_embd, E = L->p.n_expert, k = L->p.n_expert_used, nd = 0;
    float *xn = cc->xpred, *logit = cc->xpred + D;
    uint8_t *set = cc->xpredset + (size_t)l2 * (size_t)w->hp.n_expert;
    memset(set, 0, (size_t)E);
    const moe_type_traits *tt = type_traits(router->type);
    for (int i = 0; i < n; i++) {
        const float *x = act_row(cc, ACT_X, i, D);
        float scale = 1.0f / sqrtf(cc->k.dot(x, x, D) / (float)D + w->hp.rms_eps);
        for (int d = 0; d < D; d++) xn[d] = x[d] * scale * (norm ? ((const float *)norm->data)[d] : 1.0f);
        for (int e = 0; e < E; e++) logit[e] = cc->k.row_dot(tt, router->data + (uint64_t)e * router->row_bytes, xn, D);
        for (int s = 0; s < k && s < E; s++) { /* this token's top-k, in rank order */
            int best = 0;
            for (int e = 1; e < E; e++)
                if (logit[e] > logit[best]) best = e;
            logit[best] = -INFINITY;
            if (!set[best] || set[best] > s + 1) set[best] = (uint8_t)(s + 1 < 127 ? s + 1 : 127);
        }
    }
    uint8_t *cls = (uint8_t *)logit; /* the logits are spent: scratch of E bytes */
    for (int e = 0; e < E; e++)
        if (set[e]) { /* xslots is free scratch outside xs_acquire */
            cc->xslots[nd] = e;
            cls[nd++] = (uint8_t)(set[e] - 1);
        }
    cc->xpredmade[l2] = 1;
    xs_prefetch(cc->xs, l2, cc->xslots, cls, nd, &cc->xcnt);
}

/* Streamed experts: the layer's distinct experts in groups the host cache can hold at once;
   each group's pairs go through gate/up and down exactly as in a resident run. */
static void cpu_experts_streamed(cpu_ctx *cc, const moe_weight *gate, const moe_weight *up, int act, int src, int n) {
    int tg, tu, td, E = (int)gate->ne[2], nd = 0;
    int l = cpu_expert_layer(cc, gate, &tg);
    cpu_expert_layer(cc, up, &tu);
    const moe_weight *down = moe_lw(&cc->w->layers[l], MOE_DOWN_EXPS);
    cpu_expert_layer(cc, down, &td);
    int32_t *ids = cc->xids, *pairs = cc->xpairs;
    const uint8_t *pred = cc->xpredmade[l] ? cc->xpredset + (size_t)l * (size_t)cc->w->hp.n_expert : NULL;
    for (int e = 0; e < E; e++)
        if (cc->exp_start[e + 1] > cc->exp_start[e]) {
            pairs[nd] = cc->exp_start[e + 1] - cc->exp_start[e];
            ids[nd++] = e;
            if (pred) cc->xcnt.pred_hits += pred[e] != 0;
        }
    if (pred) {
        cc->xcnt.pred_total += (uint64_t)nd;
        xs_judge(cc->xs, l, cc->xpredset + (size_t)l * (size_t)cc->w->hp.n_expert, ids, nd);
    }
    cc->xpredmade[l] = 0;
    const uint8_t **tab = cc->xtab;
    for (int i = 0; i < nd;) {
        int g = xs_acquire(cc->xs, l, ids + i, nd - i, pairs + i, tab, cc->xslots, &cc->xcnt);
        if (g < 0) {
            cc->fail = g;
            return;
        }
        if (i == 0 && g == nd && xs_prefetch_on(cc->xs)) cpu_predict_prefetch(cc, l, n); /* all pinned: read ahead meanwhile */
        int e0 = ids[i], e1 = ids[i + g - 1] + 1;
        cpu_glu_range(cc, gate, tab + (size_t)tg * (size_t)E, up, tab + (size_t)tu * (size_t)E, act, src, n, e0, e1);
        cpu_down_range(cc, down, tab + (size_t)td * (size_t)E, e0, e1);
        xs_release(cc->xs, l, ids + i, g);
        i += g;
    }
}

/* gate and up rows of every routed pair into pair_h / pair_u, then pair_h = act(gate) ⊙ up; when
   experts stream, the whole expert computation (down included) happens here, group by group */
static void cpu_experts_glu(void *be, const moe_weight *gate, const moe_weight *up, int act, int src, int n) {
    cpu_ctx *cc = be;
    if (cc->fail) return;
    if (cc->xs) cpu_experts_streamed(cc, gate, up, act, src, n);
    else cpu_glu_range(cc, gate, gate->expert_data, up, up->expert_data, act, src, n, 0, (int)gate->ne[2]);
}

/* down rows of every pair into pair_out, then each token's weighted sum over its k slots */
static void cpu_experts_down(void *be, int dst, const moe_weight *down, int n) {
    cpu_ctx *cc = be;
    if (cc->fail) return; /* a cancelled or failed step: inputs never computed */
    int D = (int)down->ne[1], k = cc->route_k;
    if (cc->fail) return;
    if (!cc->xs) cpu_down_range(cc, down, down->expert_data, 0, (int)down->ne[2]);
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

static void cpu_scale(void *be, int buf, int n, int width, const moe_weight *w, float s) {
    cpu_ctx *cc = be;
    if (cc->fail) return; /* a cancelled or failed step: inputs never computed */
    const float *g = w ? (const float *)w->data : NULL;
    for (int i = 0; i < n; i++) {
        float *x = act_row(cc, buf, i, width);
        for (int j = 0; j < width; j++) x[j] *= g ? s * g[j] : s;
    }
}

static void cpu_copy(void *be, int dst, int src, int n, int width) {
    cpu_ctx *cc = be;
    if (cc->fail) return; /* a cancelled or failed step: inputs never computed */
    memcpy(cc->act[dst], cc->act[src], (size_t)n * (size_t)width * sizeof(float));
}

static void cpu_glu(void *be, int dst, int gate, int up, int up_col0, int up_stride, int n, int width, int act) {
    cpu_ctx *cc = be;
    if (cc->fail) return; /* a cancelled or failed step: inputs never computed */
    for (int i = 0; i < n; i++) {
        const float *g = act_row(cc, gate, i, width), *u = act_row(cc, up, i, up_stride) + up_col0;
        float *y = act_row(cc, dst, i, width);
        for (int j = 0; j < width; j++) y[j] = glu_act(act, g[j]) * u[j];
    }
}

static void cpu_softcap(void *be, int buf, int n, int width, float cap) {
    cpu_ctx *cc = be;
    if (cc->fail) return; /* a cancelled or failed step: inputs never computed */
    float *x = cc->act[buf];
    for (size_t i = 0; i < (size_t)n * (size_t)width; i++) x[i] = cap * tanhf(x[i] / cap);
}

static int cpu_logits_rows(const void *be) {
    const cpu_ctx *cc = be;
    return cc->shape.logits_all ? cc->shape.n_batch : 1;
}

static void cpu_logits_out(void *be, int row0, int n) { (void)be, (void)row0, (void)n; } /* ACT_LOGITS holds them all */

static void cpu_read_logits(void *be, float *dst, int n) {
    cpu_ctx *cc = be;
    memcpy(dst, cc->act[ACT_LOGITS], (size_t)n * (size_t)cc->w->hp.n_vocab * sizeof(float));
}

static void cpu_begin_step(void *be) {
    cpu_ctx *cc = be;
    cc->fail = MOE_OK;
    if (cc->xpredmade) memset(cc->xpredmade, 0, (size_t)cc->w->hp.n_layer);
}
static moe_status cpu_end_step(void *be) { return ((cpu_ctx *)be)->fail; }

/* per cache, K then V rows of the positions it holds among [0, n_pos), in position order */
static void cpu_kv_copy(cpu_ctx *cc, uint8_t *host, int n_pos, int to_host) {
    const moe_weights *w = cc->w;
    size_t es = cc->kv_f16 ? 2 : 4;
    for (int c = 0; c < w->hp.n_cache; c++) {
        size_t rb = (size_t)w->caches[c].kv_width * es;
        int rows = cc->kv_rows[c], p0 = n_pos > rows ? n_pos - rows : 0;
        for (int kv = 0; kv < 2; kv++)
            for (int p = p0; p < n_pos; p++, host += rb) {
                uint8_t *row = (uint8_t *)(kv ? cc->v_cache : cc->k_cache) + (cc->kv_off[c] + (size_t)(p % rows) * (size_t)w->caches[c].kv_width) * es;
                if (to_host) memcpy(host, row, rb);
                else memcpy(row, host, rb);
            }
    }
}
static moe_status cpu_kv_save(void *be, void *dst, int n_pos) {
    cpu_kv_copy(be, dst, n_pos, 1);
    return MOE_OK;
}
static moe_status cpu_kv_load(void *be, const void *src, int n_pos) {
    cpu_kv_copy(be, (uint8_t *)(uintptr_t)src, n_pos, 0);
    return MOE_OK;
}

static void cpu_stats(const void *be, moe_stats *out) {
    const cpu_ctx *cc = be;
    out->host_bytes += cc->bytes;
    out->expert_hits += cc->xcnt.hits;
    out->expert_misses += cc->xcnt.misses;
    out->expert_bytes_streamed += cc->xcnt.bytes;
}

/* ---- hybrid models (Gated DeltaNet): gates, conv with state, the delta rule, the states ----
   Every op computes each token exactly as it would alone (prefill == decode, bit for bit): the
   recurrence runs token by token in f32 within each value head's task. */
static float sigmoid_f(float x) { return 1.0f / (1.0f + expf(-x)); }

static void cpu_split_heads(void *be, int dst_a, int dst_b, int src, int n, int n_head, int head_dim) {
    cpu_ctx *cc = be;
    if (cc->fail) return; /* a cancelled or failed step: inputs never computed */
    size_t hb = (size_t)head_dim * sizeof(float);
    for (int i = 0; i < n; i++)
        for (int h = 0; h < n_head; h++) {
            const float *s = act_row(cc, src, i, 2 * n_head * head_dim) + (size_t)h * 2 * (size_t)head_dim;
            memcpy(act_row(cc, dst_a, i, n_head * head_dim) + (size_t)h * (size_t)head_dim, s, hb);
            memcpy(act_row(cc, dst_b, i, n_head * head_dim) + (size_t)h * (size_t)head_dim, s + head_dim, hb);
        }
}

static void cpu_sigmoid_mul(void *be, int dst, int gate, int n, int width) {
    cpu_ctx *cc = be;
    if (cc->fail) return; /* a cancelled or failed step: inputs never computed */
    float *d = cc->act[dst];
    const float *g = cc->act[gate];
    for (size_t i = 0; i < (size_t)n * (size_t)width; i++) d[i] *= sigmoid_f(g[i]);
}

static void cpu_gate_rows(void *be, int dst, int src, const moe_weight *w, int n, int width) {
    cpu_ctx *cc = be;
    if (cc->fail) return; /* a cancelled or failed step: inputs never computed */
    for (int i = 0; i < n; i++) {
        float g = sigmoid_f(cc->k.dot((const float *)w->data, act_row(cc, src, i, width), width));
        float *d = act_row(cc, dst, i, width);
        for (int j = 0; j < width; j++) d[j] *= g;
    }
}

static int dn_channels(const moe_deltanet *dn) { return 2 * dn->n_k_head * dn->k_dim + dn->n_v_head * dn->v_dim; }

/* y_t[c] = silu(Σ_j w[c][j] · x_{t-K+1+j}[c]); inputs before the chunk come from the state, which
   holds the last K-1 inputs, oldest first ([K-1][C]) */
static void cpu_ssm_conv(void *be, const moe_deltanet *dn, const moe_weight *w, int n) {
    cpu_ctx *cc = be;
    if (cpu_stopped(cc)) return;
    int K = dn->conv_k, C = dn_channels(dn);
    float *state = cc->st + cc->st_off[dn->state];
    const moe_type_traits *tt = type_traits(w->type);
    float wk[16], keep[16];
    for (int c = 0; c < C; c++) {
        tt->dequant(w->data + (uint64_t)c * w->row_bytes, wk, K);
        for (int t = 0; t < n; t++) {
            float y = 0;
            for (int j = 0; j < K; j++) {
                int s = t - (K - 1) + j;
                y += wk[j] * (s >= 0 ? act_row(cc, ACT_DN_QKV, s, C)[c] : state[(size_t)(K - 1 + s) * (size_t)C + (size_t)c]);
            }
            act_row(cc, ACT_DN_CONV, t, C)[c] = y / (1.0f + expf(-y));
        }
        for (int j = 0; j < K - 1; j++) {
            int s = n - (K - 1) + j;
            keep[j] = s >= 0 ? act_row(cc, ACT_DN_QKV, s, C)[c] : state[(size_t)(K - 1 + s) * (size_t)C + (size_t)c];
        }
        for (int j = 0; j < K - 1; j++) state[(size_t)j * (size_t)C + (size_t)c] = keep[j];
    }
}

typedef struct dn_job { cpu_ctx *cc; const moe_deltanet *dn; const float *a_coef, *dt; int n; } dn_job;

/* one value head j over the chunk's tokens, its state S [k_dim][v_dim] in f32:
   S ← α S;  u = β (v − Sᵀk̂);  S ← S + k̂ ⊗ u;  o = Sᵀ q̂ */
static void dn_head_task(void *arg, int64_t jj, int thread) {
    const dn_job *jb = arg;
    cpu_ctx *cc = jb->cc;
    const moe_deltanet *dn = jb->dn;
    int j = (int)jj, nk = dn->n_k_head, nv = dn->n_v_head, dk = dn->k_dim, dv = dn->v_dim, r = nv / nk;
    int kh = dn->v_tiled ? j % nk : j / r, C = dn_channels(dn);
    float *S = cc->st + cc->st_off[dn->state] + (size_t)cc->w->states[dn->state].conv_elems + (size_t)j * (size_t)dk * (size_t)dv;
    float *q = cc->dn_buf + (size_t)thread * cc->dn_buf_len, *k = q + dk, *u = k + dk;
    float qscale = 1.0f / sqrtf((float)dk);
    for (int t = 0; t < jb->n; t++) {
        const float *x = act_row(cc, ACT_DN_CONV, t, C);
        const float *qs = x + (size_t)kh * (size_t)dk, *ks = x + (size_t)(nk + kh) * (size_t)dk, *v = x + 2 * (size_t)nk * (size_t)dk + (size_t)j * (size_t)dv;
        float qi = 1.0f / sqrtf(cc->k.dot(qs, qs, dk) + 1e-6f), ki = 1.0f / sqrtf(cc->k.dot(ks, ks, dk) + 1e-6f);
        for (int i = 0; i < dk; i++) q[i] = qs[i] * qi * qscale, k[i] = ks[i] * ki;
        float b, a;
        if (dn->ba_grouped) {
            const float *row = act_row(cc, ACT_DN_BETA, t, 2 * nv) + (size_t)(j / r) * 2 * (size_t)r;
            b = row[j % r], a = row[r + j % r];
        } else b = act_row(cc, ACT_DN_BETA, t, nv)[j], a = act_row(cc, ACT_DN_ALPHA, t, nv)[j];
        float beta = sigmoid_f(b), z = a + jb->dt[j], sp = z > 20.0f ? z : log1pf(expf(z)), alpha = expf(jb->a_coef[j] * sp);
        memset(u, 0, (size_t)dv * sizeof *u);
        for (int i = 0; i < dk; i++) {
            float *row = S + (size_t)i * (size_t)dv;
            for (int d = 0; d < dv; d++) {
                row[d] *= alpha;
                u[d] += row[d] * k[i];
            }
        }
        for (int d = 0; d < dv; d++) u[d] = (v[d] - u[d]) * beta;
        float *o = act_row(cc, ACT_DN_O, t, nv * dv) + (size_t)j * (size_t)dv;
        memset(o, 0, (size_t)dv * sizeof *o);
        for (int i = 0; i < dk; i++) {
            float *row = S + (size_t)i * (size_t)dv;
            for (int d = 0; d < dv; d++) {
                row[d] += k[i] * u[d];
                o[d] += row[d] * q[i];
            }
        }
    }
}

/* The chunked (WY) form of the same recurrence (ARCHITECTURES.md §3.4, HF's chunk_gated_delta_rule),
   in sub-chunks of DN_CHUNK tokens counted from the op's first token. Within a sub-chunk of L
   tokens, G_i = Σ_{s<=i} g_s, A_ij = -β_i e^{G_i-G_j} k̂_i·k̂_j (j < i):
     (I - A) U = diag(β) V,  (I - A) W = diag(β e^G) K̂   (forward substitution)
     V' = U - W S0;  O_i = e^{G_i} q̂_i S0 + Σ_{j<=i} e^{G_i-G_j} (q̂_i·k̂_j) V'_j
     S = e^{G_L} S0 + Σ_i e^{G_L-G_i} k̂_i ⊗ V'_i.
   Row i uses rows <= i only, so a chunk cut short (a rewind's replay) gives the same rows.
   Mathematically equal to the token recurrence; the rounding differs (~1e-6 relative), so it is
   opt-in (MOE_CPU_DN_CHUNKED=1): the default keeps prefill == decode bit for bit. Nor is it
   faster on the CPU: per token and head it does ~3·dk·dv + 1.5·L·(dk + dv) multiply-adds in
   double against the token form's 4·dk·dv in f32 over a state that stays in cache (measured on
   a 4-layer qwen35moe synth, pp512 on 2 threads: the attention + delta-rule kind 1.22 s chunked
   vs 1.30 s token by token, within the noise of a loaded machine). */
#define DN_CHUNK 64

static size_t dn_chunk_scratch(int dk, int dv) { return 2 * ((size_t)DN_CHUNK * (size_t)(3 * dk + 2 * dv + DN_CHUNK + 2) + (size_t)dv); } /* doubles */

static double dn_dot(const double *a, const double *b, int n) {
    double s = 0;
    for (int i = 0; i < n; i++) s += a[i] * b[i];
    return s;
}

static void dn_chunk_head_task(void *arg, int64_t jj, int thread) {
    const dn_job *jb = arg;
    cpu_ctx *cc = jb->cc;
    const moe_deltanet *dn = jb->dn;
    int j = (int)jj, nk = dn->n_k_head, nv = dn->n_v_head, dk = dn->k_dim, dv = dn->v_dim, r = nv / nk;
    int kh = dn->v_tiled ? j % nk : j / r, C = dn_channels(dn);
    float *S = cc->st + cc->st_off[dn->state] + (size_t)cc->w->states[dn->state].conv_elems + (size_t)j * (size_t)dk * (size_t)dv;
    /* the chunk's intermediates in double: the substitution amplifies rounding (f32 gave ~2e-5
       of the logit range against the token recurrence, double ~4e-6); the state stays f32 */
    double *Q = (double *)(void *)(cc->dn_buf + (size_t)thread * cc->dn_buf_len), *Kh = Q + DN_CHUNK * dk, *Wm = Kh + DN_CHUNK * dk;
    double *U = Wm + DN_CHUNK * dk, *Vv = U + DN_CHUNK * dv, *A = Vv + DN_CHUNK * dv, *G = A + DN_CHUNK * DN_CHUNK, *B = G + DN_CHUNK;
    float qscale = 1.0f / sqrtf((float)dk);
    for (int c0 = 0; c0 < jb->n; c0 += DN_CHUNK) {
        int L = jb->n - c0 < DN_CHUNK ? jb->n - c0 : DN_CHUNK;
        double gsum = 0;
        for (int t = 0; t < L; t++) {
            const float *x = act_row(cc, ACT_DN_CONV, c0 + t, C);
            const float *qs = x + (size_t)kh * dk, *ks = x + (size_t)(nk + kh) * dk, *v = x + 2 * (size_t)nk * dk + (size_t)j * dv;
            float qi = 1.0f / sqrtf(cc->k.dot(qs, qs, dk) + 1e-6f), ki = 1.0f / sqrtf(cc->k.dot(ks, ks, dk) + 1e-6f);
            for (int i = 0; i < dk; i++) Q[t * dk + i] = qs[i] * qi * qscale, Kh[t * dk + i] = ks[i] * ki;
            for (int d = 0; d < dv; d++) Vv[t * dv + d] = v[d];
            float b, a;
            if (dn->ba_grouped) {
                const float *row = act_row(cc, ACT_DN_BETA, c0 + t, 2 * nv) + (size_t)(j / r) * 2 * (size_t)r;
                b = row[j % r], a = row[r + j % r];
            } else b = act_row(cc, ACT_DN_BETA, c0 + t, nv)[j], a = act_row(cc, ACT_DN_ALPHA, c0 + t, nv)[j];
            float z = a + jb->dt[j], sp = z > 20.0f ? z : log1pf(expf(z));
            B[t] = sigmoid_f(b);
            G[t] = gsum += jb->a_coef[j] * sp;
        }
        for (int t = 0; t < L; t++) { /* forward substitution, row by row */
            for (int s = 0; s < t; s++) A[t * DN_CHUNK + s] = -B[t] * exp(G[t] - G[s]) * dn_dot(Kh + (size_t)t * dk, Kh + (size_t)s * dk, dk);
            double eg = B[t] * exp(G[t]);
            for (int d = 0; d < dv; d++) U[t * dv + d] = B[t] * Vv[t * dv + d];
            for (int i = 0; i < dk; i++) Wm[t * dk + i] = eg * Kh[t * dk + i];
            for (int s = 0; s < t; s++) {
                double a = A[t * DN_CHUNK + s];
                for (int d = 0; d < dv; d++) U[t * dv + d] += a * U[s * dv + d];
                for (int i = 0; i < dk; i++) Wm[t * dk + i] += a * Wm[s * dk + i];
            }
            /* V'_t = U_t - W_t S0, into v_t's place (U stays for the later rows' substitution) */
            double *vp = Vv + (size_t)t * dv;
            memcpy(vp, U + (size_t)t * dv, (size_t)dv * sizeof *vp);
            for (int i = 0; i < dk; i++) {
                double w = Wm[t * dk + i];
                const float *srow = S + (size_t)i * dv;
                for (int d = 0; d < dv; d++) vp[d] -= w * srow[d];
            }
            /* O_t = e^{G_t} q̂_t S0 + Σ_{s<=t} e^{G_t-G_s} (q̂_t·k̂_s) V'_s */
            double *oa = B + DN_CHUNK; /* one output row */
            float *o = act_row(cc, ACT_DN_O, c0 + t, nv * dv) + (size_t)j * dv;
            double et = exp(G[t]);
            for (int d = 0; d < dv; d++) oa[d] = 0;
            for (int i = 0; i < dk; i++) {
                double qv = Q[t * dk + i] * et;
                const float *srow = S + (size_t)i * dv;
                for (int d = 0; d < dv; d++) oa[d] += qv * srow[d];
            }
            for (int s = 0; s <= t; s++) {
                double c = exp(G[t] - G[s]) * dn_dot(Q + (size_t)t * dk, Kh + (size_t)s * dk, dk);
                for (int d = 0; d < dv; d++) oa[d] += c * Vv[s * dv + d];
            }
            for (int d = 0; d < dv; d++) o[d] = (float)oa[d];
        }
        /* S = e^{G_L} S0 + Σ_t e^{G_L - G_t} k̂_t ⊗ V'_t */
        double eL = exp(G[L - 1]), *acc = Wm; /* W is done with: one state row at a time */
        for (int i = 0; i < dk; i++) {
            float *srow = S + (size_t)i * dv;
            for (int d = 0; d < dv; d++) acc[d] = srow[d] * eL;
            for (int t = 0; t < L; t++) {
                double c = exp(G[L - 1] - G[t]) * Kh[t * dk + i];
                for (int d = 0; d < dv; d++) acc[d] += c * Vv[t * dv + d];
            }
            for (int d = 0; d < dv; d++) srow[d] = (float)acc[d];
        }
    }
}

static void cpu_delta_net(void *be, const moe_deltanet *dn, const moe_weight *a_coef, const moe_weight *dt_bias, int n) {
    cpu_ctx *cc = be;
    if (cc->fail) return;
    dn_job j = {cc, dn, (const float *)a_coef->data, (const float *)dt_bias->data, n};
    pool_run(cc->pool, cc->dn_chunked && n > 1 ? dn_chunk_head_task : dn_head_task, &j, dn->n_v_head);
}

static void cpu_gated_rmsnorm(void *be, int dst, int gate, const moe_weight *w, int n_rows, int width, float eps) {
    cpu_ctx *cc = be;
    if (cc->fail) return; /* a cancelled or failed step: inputs never computed */
    const float *g = (const float *)w->data;
    for (int r = 0; r < n_rows; r++) {
        float *x = act_row(cc, dst, r, width);
        const float *z = act_row(cc, gate, r, width);
        float scale = 1.0f / sqrtf(cc->k.dot(x, x, width) / (float)width + eps);
        for (int i = 0; i < width; i++) x[i] = x[i] * scale * g[i] * (z[i] / (1.0f + expf(-z[i])));
    }
}

static moe_status cpu_state_save(void *be, float *dst) {
    cpu_ctx *cc = be;
    memcpy(dst, cc->st, cc->st_elems * sizeof(float));
    return MOE_OK;
}
static moe_status cpu_state_load(void *be, const float *src) {
    cpu_ctx *cc = be;
    memcpy(cc->st, src, cc->st_elems * sizeof(float));
    return MOE_OK;
}
static void cpu_state_checkpoint(void *be, int slot) {
    cpu_ctx *cc = be;
    memcpy(cc->ckpt + (size_t)slot * cc->st_elems, cc->st, cc->st_elems * sizeof(float));
}
static void cpu_state_restore(void *be, int slot) {
    cpu_ctx *cc = be;
    if (slot < 0) memset(cc->st, 0, cc->st_elems * sizeof(float));
    else memcpy(cc->st, cc->ckpt + (size_t)slot * cc->st_elems, cc->st_elems * sizeof(float));
}

/* ---- profiling (moe_ctx_profile): the ops table below, with every op timed ----------------------
   A context that profiles runs through k_cpu_prof_ops: each op is timed and charged to a kind
   (op and weight type) of the step's phase, with the bytes it had to read and write and its
   flops estimated from its shapes. */
#define CPU_PROF_MAX 64
typedef struct cpu_prof_ent { char kind[48]; int decode, calls; double s, bytes, flops; } cpu_prof_ent;
typedef struct cpu_prof { int on, n, decode, new_step; uint64_t tokens[2]; cpu_prof_ent e[CPU_PROF_MAX]; } cpu_prof;

static void prof_charge(cpu_ctx *cc, const char *kind, const moe_weight *w, double t0, double bytes, double flops) {
    cpu_prof *p = cc->prof;
    double dt = now_s() - t0;
    char name[48];
    const moe_type_traits *tt = w ? type_traits(w->type) : NULL;
    snprintf(name, sizeof name, "%s%s%s", kind, tt ? " " : "", tt ? tt->name : "");
    int i = 0;
    while (i < p->n && (p->e[i].decode != p->decode || strcmp(p->e[i].kind, name))) i++;
    if (i == p->n) {
        if (p->n == CPU_PROF_MAX) return;
        memset(&p->e[i], 0, sizeof p->e[i]);
        memcpy(p->e[i].kind, name, sizeof name);
        p->e[i].decode = p->decode;
        p->n++;
    }
    p->e[i].calls++;
    p->e[i].s += dt;
    p->e[i].bytes += bytes;
    p->e[i].flops += flops;
}

/* weight bytes of the experts that have pairs (the routed ones) */
static double prof_routed_experts(const cpu_ctx *cc, const moe_weight *w) {
    double e = 0;
    for (int x = 0; x < (int)w->ne[2]; x++) e += cc->exp_start[x + 1] > cc->exp_start[x];
    return e * (double)w->expert_bytes;
}

static void prof_embed(void *be, int dst, const moe_weight *w, const moe_token *tokens, int n) {
    cpu_ctx *cc = be;
    if (cc->prof->new_step) { /* the step's first op: its phase */
        cc->prof->new_step = 0;
        cc->prof->decode = n == 1;
        cc->prof->tokens[n == 1] += (uint64_t)n;
    }
    double t0 = now_s();
    cpu_embed(be, dst, w, tokens, n);
    prof_charge(cc, "embed", NULL, t0, (double)n * ((double)w->row_bytes + 4.0 * (double)w->ne[0]), 0);
}
static void prof_rmsnorm(void *be, int dst, int src, const moe_weight *w, int n_rows, int width, float eps) {
    double t0 = now_s();
    cpu_rmsnorm(be, dst, src, w, n_rows, width, eps);
    prof_charge(be, "rmsnorm", NULL, t0, 8.0 * n_rows * width, 4.0 * n_rows * width);
}
static void prof_matmul(void *be, int dst, const moe_weight *w, int src, int src_row0, int n) {
    double t0 = now_s();
    cpu_matmul(be, dst, w, src, src_row0, n);
    double K = (double)w->ne[0], M = (double)w->ne[1];
    prof_charge(be, dst == ACT_LOGITS ? "lm head" : n == 1 ? "matvec" : "matmul", w, t0, M * (double)w->row_bytes + 4.0 * n * (K + M),
                2.0 * n * K * M);
}
static void prof_rope(void *be, int buf, int n, int n_head, int head_dim, const moe_rope *rope, int pos0) {
    double t0 = now_s();
    cpu_rope(be, buf, n, n_head, head_dim, rope, pos0);
    prof_charge(be, "rope", NULL, t0, 8.0 * n * n_head * head_dim, 0);
}
static void prof_attention(void *be, const moe_attn *a, int n, int pos0) {
    cpu_ctx *cc = be;
    double t0 = now_s(), keys = 0;
    for (int i = 0; i < n; i++) {
        int pos = pos0 + i, p0 = a->window && pos >= a->window ? pos - a->window + 1 : 0;
        keys += pos - p0 + 1;
    }
    cpu_attention(be, a, n, pos0);
    double es = cc->kv_f16 ? 2 : 4, hd = a->head_dim;
    prof_charge(cc, cc->kv_f16 ? "attention f16" : "attention f32", NULL, t0,
                2.0 * keys * a->n_head_kv * hd * es + 8.0 * n * a->n_head * hd, 4.0 * keys * a->n_head * hd);
}
static void prof_add(void *be, int dst, int src, int n, int width) {
    double t0 = now_s();
    cpu_add(be, dst, src, n, width);
    prof_charge(be, "add", NULL, t0, 12.0 * n * width, 1.0 * n * width);
}
static void prof_route(void *be, const moe_weight *router, const moe_route *r, int src, int n) {
    double t0 = now_s();
    cpu_route(be, router, r, src, n);
    double K = router ? (double)router->ne[0] : 0;
    prof_charge(be, "route", router, t0, router ? (double)router->nbytes + 4.0 * n * K : 0, 2.0 * n * K * r->n_expert);
}
static void prof_experts_glu(void *be, const moe_weight *gate, const moe_weight *up, int act, int src, int n) {
    cpu_ctx *cc = be;
    double t0 = now_s();
    cpu_experts_glu(be, gate, up, act, src, n);
    double pairs = (double)n * cc->route_k, D = (double)gate->ne[0], ff = (double)gate->ne[1];
    prof_charge(cc, n == 1 ? "expert gate+up matvec" : "expert gate+up matmul", gate, t0,
                prof_routed_experts(cc, gate) + prof_routed_experts(cc, up) + 4.0 * (n * D + pairs * ff), 4.0 * pairs * D * ff);
}
static void prof_experts_down(void *be, int dst, const moe_weight *down, int n) {
    cpu_ctx *cc = be;
    double t0 = now_s();
    cpu_experts_down(be, dst, down, n);
    double pairs = (double)n * cc->route_k, ff = (double)down->ne[0], D = (double)down->ne[1];
    prof_charge(cc, n == 1 ? "expert down matvec" : "expert down matmul", down, t0, prof_routed_experts(cc, down) + 4.0 * (pairs * ff + n * D),
                2.0 * pairs * D * ff);
}
static void prof_scale(void *be, int buf, int n, int width, const moe_weight *w, float s) {
    double t0 = now_s();
    cpu_scale(be, buf, n, width, w, s);
    prof_charge(be, "elementwise", NULL, t0, 8.0 * n * width, 1.0 * n * width);
}
static void prof_copy(void *be, int dst, int src, int n, int width) {
    double t0 = now_s();
    cpu_copy(be, dst, src, n, width);
    prof_charge(be, "copy", NULL, t0, 8.0 * n * width, 0);
}
static void prof_glu(void *be, int dst, int gate, int up, int up_col0, int up_stride, int n, int width, int act) {
    double t0 = now_s();
    cpu_glu(be, dst, gate, up, up_col0, up_stride, n, width, act);
    prof_charge(be, "elementwise", NULL, t0, 12.0 * n * width, 4.0 * n * width);
}
static void prof_softcap(void *be, int buf, int n, int width, float cap) {
    double t0 = now_s();
    cpu_softcap(be, buf, n, width, cap);
    prof_charge(be, "elementwise", NULL, t0, 8.0 * n * width, 2.0 * n * width);
}
static void prof_begin_step(void *be) {
    cpu_ctx *cc = be;
    cc->prof->new_step = 1;
    cpu_begin_step(be);
}

static moe_status cpu_profile(void *be, int on) {
    cpu_ctx *cc = be;
    if (!cc->prof && !(cc->prof = moe_calloc(1, sizeof *cc->prof))) return set_error(MOE_ERR_NO_MEMORY, "profile: out of memory");
    memset(cc->prof, 0, sizeof *cc->prof);
    cc->prof->on = on;
    return MOE_OK;
}

static int cpu_profile_get(const void *be, moe_profile_entry *out, int cap) {
    const cpu_ctx *cc = be;
    const cpu_prof *p = cc->prof;
    if (!p) return 0;
    int done[CPU_PROF_MAX] = {0};
    for (int k = 0; k < p->n; k++) { /* largest time first */
        int b = -1;
        for (int i = 0; i < p->n; i++)
            if (!done[i] && (b < 0 || p->e[i].s > p->e[b].s)) b = i;
        done[b] = 1;
        if (k >= cap) continue;
        moe_profile_entry *o = &out[k];
        memset(o, 0, sizeof *o);
        memcpy(o->kind, p->e[b].kind, sizeof o->kind);
        o->decode = p->e[b].decode;
        o->calls = p->e[b].calls;
        o->seconds = p->e[b].s;
        o->bytes = p->e[b].bytes;
        o->flops = p->e[b].flops;
        o->tokens = p->tokens[o->decode];
    }
    return p->n;
}

/* the bandwidth probe: the pool's threads read (then copy) a buffer far larger than the caches */
#define PROBE_BYTES ((size_t)256 << 20)
#define PROBE_TASK_BYTES ((size_t)1 << 20)
typedef struct probe_job { const uint64_t *src; uint64_t *dst; volatile uint64_t *sink; } probe_job;
static void probe_read_task(void *arg, int64_t t, int thread) {
    const probe_job *j = arg;
    const uint64_t *p = j->src + (size_t)t * (PROBE_TASK_BYTES / 8);
    uint64_t a0 = 0, a1 = 0, a2 = 0, a3 = 0;
    for (size_t i = 0; i < PROBE_TASK_BYTES / 8; i += 8) {
        a0 += p[i] ^ p[i + 4];
        a1 += p[i + 1] ^ p[i + 5];
        a2 += p[i + 2] ^ p[i + 6];
        a3 += p[i + 3] ^ p[i + 7];
    }
    j->sink[8 * thread] += a0 + a1 + a2 + a3;
}
static void probe_copy_task(void *arg, int64_t t, int thread) {
    (void)thread;
    const probe_job *j = arg;
    memcpy(j->dst + (size_t)t * (PROBE_TASK_BYTES / 8), j->src + (size_t)t * (PROBE_TASK_BYTES / 8), PROBE_TASK_BYTES);
}
static moe_status cpu_probe(void *be, double *read_gbs, double *copy_gbs) {
    cpu_ctx *cc = be;
    uint64_t *a = moe_malloc(PROBE_BYTES), *b = moe_malloc(PROBE_BYTES);
    volatile uint64_t *sink = moe_calloc((size_t)cc->n_threads * 8, sizeof(uint64_t));
    if (!a || !b || !sink) {
        moe_free(a);
        moe_free(b);
        moe_free((void *)(uintptr_t)sink);
        return set_error(MOE_ERR_NO_MEMORY, "bandwidth probe: out of memory");
    }
    memset(a, 1, PROBE_BYTES);
    memset(b, 2, PROBE_BYTES);
    probe_job j = {a, b, sink};
    double best_r = 1e30, best_c = 1e30;
    for (int rep = 0; rep < 5; rep++) {
        double t0 = now_s();
        pool_run(cc->pool, probe_read_task, &j, (int64_t)(PROBE_BYTES / PROBE_TASK_BYTES));
        double t1 = now_s();
        pool_run(cc->pool, probe_copy_task, &j, (int64_t)(PROBE_BYTES / PROBE_TASK_BYTES));
        double t2 = now_s();
        if (t1 - t0 < best_r) best_r = t1 - t0;
        if (t2 - t1 < best_c) best_c = t2 - t1;
    }
    if (read_gbs) *read_gbs = (double)PROBE_BYTES / best_r / 1e9;
    if (copy_gbs) *copy_gbs = 2.0 * (double)PROBE_BYTES / best_c / 1e9;
    moe_free(a);
    moe_free(b);
    moe_free((void *)(uintptr_t)sink);
    return MOE_OK;
}

static const moe_ops k_cpu_prof_ops = {prof_embed, prof_rmsnorm, prof_matmul, prof_rope, prof_attention, prof_add, prof_route,
                                       prof_experts_glu, prof_experts_down, prof_scale, prof_copy, prof_glu, prof_softcap,
                                       prof_begin_step, cpu_end_step, cpu_logits_rows, cpu_logits_out, cpu_read_logits,
                                       cpu_kv_save, cpu_kv_load, cpu_stats, cpu_profile, cpu_profile_get, cpu_probe,
                                       cpu_split_heads, cpu_sigmoid_mul, cpu_gate_rows, cpu_ssm_conv, cpu_delta_net,
                                       cpu_gated_rmsnorm, cpu_state_save, cpu_state_load, cpu_state_checkpoint, cpu_state_restore, NULL};

static const moe_ops k_cpu_ops = {cpu_embed, cpu_rmsnorm, cpu_matmul, cpu_rope, cpu_attention, cpu_add, cpu_route,
                                  cpu_experts_glu, cpu_experts_down, cpu_scale, cpu_copy, cpu_glu, cpu_softcap,
                                  cpu_begin_step, cpu_end_step, cpu_logits_rows, cpu_logits_out, cpu_read_logits,
                                  cpu_kv_save, cpu_kv_load, cpu_stats, cpu_profile, cpu_profile_get, cpu_probe,
                                  /* hybrid models (Gated DeltaNet) */
                                  cpu_split_heads, cpu_sigmoid_mul, cpu_gate_rows, cpu_ssm_conv, cpu_delta_net, cpu_gated_rmsnorm,
                                  cpu_state_save, cpu_state_load, cpu_state_checkpoint, cpu_state_restore, NULL};

/* ---- one forward pass for many contexts (moe_step_batch) ---------------------------------------
   The forward runs once over the rows of all contexts, in a scratch context (the lead): every op
   that treats rows one by one (norms, matrix products, routing, experts, elementwise) runs there
   on all rows at once, so each weight is read once per pass. The ops that read a context's own
   history (rope at its positions, attention over its KV cache, the conv and delta-rule states) run
   segment by segment on that context, its activation pointers aimed at its rows of the lead's
   buffers: no copies. The CPU kernels compute each row exactly as they would alone (mm_rows), so
   the results are bit for bit those of separate moe_step calls. */
typedef struct cpu_bseg {
    cpu_ctx *cc;               /* the context of the segment */
    int row0, n, pos0;         /* its rows in the lead's buffers, its first position */
    int n_out, out0;           /* its rows of logits, and where they start among the pass's */
    float *dst;                /* where its logits go (the context's staged rows) */
    int ctx_i, ck;             /* its context in the call; the checkpoint slot it ends at, or -1 */
} cpu_bseg;
#define BT_MAX_AIM 4
typedef struct cpu_batch {
    cpu_bseg *seg;
    int n_seg, logit_rows;
    /* per segment: activation pointers while aimed [BT_MAX_AIM], attention jobs, first tasks */
    float **saved;
    attn_job *jobs;
    int64_t *task0;
} cpu_batch;
/* aims cc's activation buffers bufs[i] (rows widths[i] floats wide) at rows row0.. of the lead's,
   keeping the old pointers in saved; bt_unaim puts them back */
static void bt_aim(cpu_ctx *cc, const cpu_ctx *lead, const int *bufs, const int *widths, int nb, int row0, float **saved) {
    for (int i = 0; i < nb; i++) {
        float *at = lead->act[bufs[i]] + (size_t)row0 * (size_t)widths[i];
        saved[i] = cc->act[bufs[i]];
        cc->act[bufs[i]] = at;
    }
}
static void bt_unaim(cpu_ctx *cc, const int *bufs, int nb, float *const *saved) {
    for (int i = 0; i < nb; i++) cc->act[bufs[i]] = saved[i];
}

/* runs a per-context op on every segment: its context sees its rows of bufs as rows 0.. */
typedef void (*bt_seg_fn)(cpu_ctx *cc, const cpu_bseg *s, const void *arg);
static void bt_each(cpu_ctx *lead, const int *bufs, const int *widths, int nb, bt_seg_fn fn, const void *arg) {
    const cpu_batch *b = lead->batch;
    float *saved[BT_MAX_AIM];
    for (int i = 0; i < b->n_seg; i++) {
        const cpu_bseg *s = &b->seg[i];
        bt_aim(s->cc, lead, bufs, widths, nb, s->row0, saved);
        fn(s->cc, s, arg);
        bt_unaim(s->cc, bufs, nb, saved);
    }
}

typedef struct bt_rope_arg { int buf, n_head, head_dim; const moe_rope *rope; } bt_rope_arg;
static void bt_rope_seg(cpu_ctx *cc, const cpu_bseg *s, const void *arg) {
    const bt_rope_arg *r = arg;
    cpu_rope(cc, r->buf, s->n, r->n_head, r->head_dim, r->rope, s->pos0);
}
static void bt_rope(void *be, int buf, int n, int n_head, int head_dim, const moe_rope *rope, int pos0) {
    (void)n, (void)pos0; /* the segments have their own */
    bt_rope_arg r = {buf, n_head, head_dim, rope};
    int width = n_head * head_dim;
    bt_each(be, &buf, &width, 1, bt_rope_seg, &r);
}

/* Attention of all segments in one pool run (a decode pass of 64 contexts would otherwise wake
   the threads 64 times per layer): segment i's tasks are task0[i] .. task0[i + 1] - 1, each run
   as cpu_attention runs it on its context (a thread's attention scratch is its own in any
   context, so segments may share the threads). */
typedef struct bt_attn_job { const cpu_batch *b; } bt_attn_job;
static void bt_attn_task(void *arg, int64_t t, int thread) {
    const cpu_batch *b = ((const bt_attn_job *)arg)->b;
    int lo = 0, hi = b->n_seg - 1;
    while (lo < hi) { /* the last segment whose first task is <= t */
        int mid = (lo + hi + 1) / 2;
        if (b->task0[mid] <= t) lo = mid;
        else hi = mid - 1;
    }
    attn_task(&b->jobs[lo], t - b->task0[lo], thread);
}

static void bt_attention(void *be, const moe_attn *a, int n, int pos0) {
    (void)n, (void)pos0;
    cpu_ctx *lead = be;
    cpu_batch *b = lead->batch;
    int q = a->n_head * a->head_dim, kv = a->n_head_kv * a->head_dim;
    const int bufs[] = {ACT_Q, ACT_K, ACT_V, ACT_ATTN}, widths[] = {q, kv, kv, q};
    int64_t tasks = 0, nt;
    for (int i = 0; i < b->n_seg; i++) {
        const cpu_bseg *s = &b->seg[i];
        bt_aim(s->cc, lead, bufs, widths, 4, s->row0, b->saved + (size_t)i * BT_MAX_AIM);
        b->jobs[i] = attn_prepare(s->cc, a, s->n, s->pos0, &nt);
        b->task0[i] = tasks;
        tasks += nt;
    }
    bt_attn_job j = {b};
    pool_run(lead->pool, bt_attn_task, &j, tasks);
    for (int i = 0; i < b->n_seg; i++) bt_unaim(b->seg[i].cc, bufs, 4, b->saved + (size_t)i * BT_MAX_AIM);
}

typedef struct bt_dn_arg { const moe_deltanet *dn; const moe_weight *w, *w2; } bt_dn_arg;
static void bt_ssm_conv_seg(cpu_ctx *cc, const cpu_bseg *s, const void *arg) {
    const bt_dn_arg *d = arg;
    cpu_ssm_conv(cc, d->dn, d->w, s->n);
}
static void bt_ssm_conv(void *be, const moe_deltanet *dn, const moe_weight *w, int n) {
    (void)n;
    bt_dn_arg d = {dn, w, NULL};
    int C = dn_channels(dn);
    const int bufs[] = {ACT_DN_QKV, ACT_DN_CONV}, widths[] = {C, C};
    bt_each(be, bufs, widths, 2, bt_ssm_conv_seg, &d);
}

static void bt_delta_net_seg(cpu_ctx *cc, const cpu_bseg *s, const void *arg) {
    const bt_dn_arg *d = arg;
    cpu_delta_net(cc, d->dn, d->w, d->w2, s->n);
}
static void bt_delta_net(void *be, const moe_deltanet *dn, const moe_weight *a_coef, const moe_weight *dt_bias, int n) {
    (void)n;
    bt_dn_arg d = {dn, a_coef, dt_bias};
    int nv = dn->n_v_head;
    const int bufs[] = {ACT_DN_CONV, ACT_DN_BETA, ACT_DN_ALPHA, ACT_DN_O},
              widths[] = {dn_channels(dn), dn->ba_grouped ? 2 * nv : nv, nv, nv * dn->v_dim};
    bt_each(be, bufs, widths, 4, bt_delta_net_seg, &d);
}

static int bt_logits_rows(const void *be) { return ((const cpu_ctx *)be)->batch->logit_rows; }

/* rows row0.. of the pass's logits (in ACT_LOGITS) go to their contexts' staged rows */
static void bt_logits_out(void *be, int row0, int n) {
    cpu_ctx *lead = be;
    const cpu_batch *b = lead->batch;
    size_t nv = (size_t)lead->w->hp.n_vocab;
    for (int i = 0, r = row0; i < b->n_seg && r < row0 + n; i++) {
        const cpu_bseg *s = &b->seg[i];
        for (; r < row0 + n && r < s->out0 + s->n_out; r++)
            memcpy(s->dst + (size_t)(r - s->out0) * nv, lead->act[ACT_LOGITS] + (size_t)(r - row0) * nv, nv * sizeof(float));
    }
}

/* the CPU ops with the per-context ones above */
static moe_ops bt_ops(void) {
    moe_ops o = k_cpu_ops;
    o.rope = bt_rope;
    o.attention = bt_attention;
    o.ssm_conv = bt_ssm_conv;
    o.delta_net = bt_delta_net;
    o.logits_rows = bt_logits_rows;
    o.logits_out = bt_logits_out;
    return o;
}

static void cpu_ctx_free(void *be) {
    cpu_ctx *cc = be;
    if (!cc) return;
    for (int i = 0; i < ACT_COUNT; i++) moe_free(cc->act[i]);
    moe_free(cc->k_cache);
    moe_free(cc->v_cache);
    moe_free(cc->kv_off);
    moe_free(cc->kv_rows);
    moe_free(cc->row_buf);
    moe_free(cc->xq);
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
    moe_free(cc->xtab);
    moe_free(cc->xids);
    moe_free(cc->xpairs);
    moe_free(cc->xslots);
    moe_free(cc->xpred);
    moe_free(cc->xpredset);
    moe_free(cc->xpredmade);
    moe_free(cc->prof);
    moe_free(cc->st);
    moe_free(cc->st_off);
    moe_free(cc->ckpt);
    moe_free(cc->dn_buf);
    moe_free(cc);
}

static size_t mul_or_zero(size_t a, size_t b) { return (b && a > SIZE_MAX / b) ? 0 : a * b; }

/* allocation that counts what a context holds (for moe_ctx_get_stats) */
static void *cc_alloc(cpu_ctx *cc, size_t n) {
    void *p = moe_malloc(n);
    if (p) cc->bytes += n;
    return p;
}

/* pool: the model's (model_pool), shared with its other contexts; shape->n_threads is its size */
static moe_status cpu_ctx_new(const moe_weights *w, const moe_ctx_shape *shape, thread_pool *pool, void **out) {
    const moe_hparams *hp = &w->hp;
    cpu_ctx *cc = moe_calloc(1, sizeof *cc);
    if (!cc) return set_error(MOE_ERR_NO_MEMORY, "context: out of memory");
    cc->k = cpu_kernels_pick();
    cc->w = w;
    cc->shape = *shape;
    cc->pool = pool;
    const moe_ctx_shape *c = shape;
    size_t nb = (size_t)c->n_batch, k = (size_t)hp->n_expert_used;
    int ok = 1;
    for (int i = 0; i < ACT_COUNT; i++) {
        size_t rows = (i == ACT_LOGITS && !c->logits_all) ? 1 : nb;
        ok = ok && (cc->act[i] = cc_alloc(cc, mul_or_zero(rows, (size_t)act_width(w, i)) * sizeof(float)));
    }
    /* the KV caches, one after the other in each of the K and V allocations */
    size_t n_cache = (size_t)hp->n_cache, kv_elems = 0;
    ok = ok && (cc->kv_off = cc_alloc(cc, (n_cache ? n_cache : 1) * sizeof *cc->kv_off)) &&
         (cc->kv_rows = cc_alloc(cc, (n_cache ? n_cache : 1) * sizeof *cc->kv_rows));
    for (size_t i = 0; ok && i < n_cache; i++) {
        cc->kv_rows[i] = moe_cache_rows(&w->caches[i], c->n_ctx, c->n_batch);
        cc->kv_off[i] = kv_elems;
        size_t add = mul_or_zero((size_t)cc->kv_rows[i], (size_t)w->caches[i].kv_width);
        kv_elems = add && kv_elems + add >= kv_elems ? kv_elems + add : 0;
        ok = kv_elems != 0;
    }
    cc->kv_f16 = c->kv_type == MOE_KV_F16;
    size_t kv_bytes = mul_or_zero(kv_elems ? kv_elems : 1, cc->kv_f16 ? 2 : 4);
    ok = ok && kv_bytes && (cc->k_cache = cc_alloc(cc, kv_bytes)) && (cc->v_cache = cc_alloc(cc, kv_bytes));
    cc->n_threads = shape->n_threads;
    size_t maxk = (size_t)hp->n_embd;
    if ((size_t)(hp->n_head * hp->head_dim) > maxk) maxk = (size_t)(hp->n_head * hp->head_dim);
    if ((size_t)hp->n_ff_exp > maxk) maxk = (size_t)hp->n_ff_exp;
    if ((size_t)hp->n_ff > maxk) maxk = (size_t)hp->n_ff;
    cc->row_buf_len = maxk;
    cc->att_buf_len = (size_t)c->n_ctx * (size_t)hp->n_head + (size_t)hp->head_dim; /* scores of up to n_head heads, one row */
    size_t max_rows = (size_t)(hp->n_ff_exp > hp->n_embd ? hp->n_ff_exp : hp->n_embd);
    size_t n_tasks = (size_t)hp->n_expert * ((max_rows + CPU_ROWS_PER_TASK - 1) / CPU_ROWS_PER_TASK);
    ok = ok && (cc->row_buf = cc_alloc(cc, mul_or_zero((size_t)cc->n_threads, maxk) * sizeof(float)));
    ok = ok && (cc->att_buf = cc_alloc(cc, mul_or_zero((size_t)cc->n_threads, cc->att_buf_len) * sizeof(float)));
    ok = ok && (cc->topk_id = cc_alloc(cc, nb * k * sizeof(int32_t))) && (cc->topk_w = cc_alloc(cc, nb * k * sizeof(float)));
    ok = ok && (cc->pair_of = cc_alloc(cc, nb * k * sizeof(int32_t))) && (cc->pair_tok = cc_alloc(cc, nb * k * sizeof(int32_t)));
    ok = ok && (cc->exp_start = cc_alloc(cc, ((size_t)hp->n_expert + 1) * sizeof(int32_t)));
    ok = ok && (cc->tasks = cc_alloc(cc, n_tasks * 2 * sizeof(int32_t)));
    ok = ok && (cc->pair_h = cc_alloc(cc, mul_or_zero(nb * k, (size_t)hp->n_ff_exp) * sizeof(float)));
    ok = ok && (cc->pair_u = cc_alloc(cc, mul_or_zero(nb * k, (size_t)hp->n_ff_exp) * sizeof(float)));
    ok = ok && (cc->pair_out = cc_alloc(cc, mul_or_zero(nb * k, (size_t)hp->n_embd) * sizeof(float)));
    /* int8 mode: quantized activation rows for the widest op, at 320 bytes per 256 elements
       (q8k; q8a needs 288) */
    cc->exact = shape->cpu_exact != 0;
    size_t xq_elems = mul_or_zero(nb, maxk);
    if (mul_or_zero(nb * k, (size_t)hp->n_ff_exp) > xq_elems) xq_elems = mul_or_zero(nb * k, (size_t)hp->n_ff_exp);
    cc->xq_cap = mul_or_zero(xq_elems / 256 + 1, sizeof(q8k_block));
    ok = ok && (cc->exact || (cc->xq = cc_alloc(cc, cc->xq_cap)));
    /* hybrid models: the recurrent states and their checkpoints */
    size_t ns = (size_t)hp->n_state, max_dn = 1;
    ok = ok && (cc->st_off = cc_alloc(cc, (ns ? ns : 1) * sizeof *cc->st_off));
    for (size_t i = 0; ok && i < ns; i++) {
        cc->st_off[i] = cc->st_elems;
        cc->st_elems += (size_t)w->states[i].conv_elems + (size_t)w->states[i].rec_elems;
        const moe_deltanet *dn = &w->layers[w->states[i].layer].p.dn;
        if ((size_t)(2 * dn->k_dim + dn->v_dim) > max_dn) max_dn = (size_t)(2 * dn->k_dim + dn->v_dim);
        if (dn_chunk_scratch(dn->k_dim, dn->v_dim) > max_dn) max_dn = dn_chunk_scratch(dn->k_dim, dn->v_dim);
    }
    max_dn += max_dn & 1; /* even: each thread's part starts 8-byte aligned */
    const char *chunked = getenv("MOE_CPU_DN_CHUNKED");
    cc->dn_chunked = chunked && chunked[0] == '1';
    cc->n_ckpt = ns ? moe_ckpt_slots(shape->n_ctx) + (shape->state_backup ? 1 : 0) : 0;
    cc->dn_buf_len = max_dn;
    ok = ok && (cc->st = cc_alloc(cc, (cc->st_elems ? cc->st_elems : 1) * sizeof(float)));
    ok = ok && (cc->ckpt = cc_alloc(cc, mul_or_zero(cc->n_ckpt ? (size_t)cc->n_ckpt : 1, cc->st_elems ? cc->st_elems : 1) * sizeof(float)));
    ok = ok && (cc->dn_buf = cc_alloc(cc, mul_or_zero((size_t)cc->n_threads, max_dn) * sizeof(float)));
    if (ok) memset(cc->st, 0, (cc->st_elems ? cc->st_elems : 1) * sizeof(float));
    if (!ok) {
        cpu_ctx_free(cc);
        return set_error(MOE_ERR_NO_MEMORY, "context: out of memory for the KV cache and scratch buffers (n_ctx %d, n_batch %d)",
                         c->n_ctx, c->n_batch);
    }
    *out = cc;
    return MOE_OK;
}

/* joins a context to the model's host expert cache (section 8) */
static moe_status cpu_stream_attach(cpu_ctx *cc, moe_xcache *xc) {
    const moe_hparams *hp = &cc->w->hp;
    size_t E = (size_t)hp->n_expert;
    int ok = (cc->xtab = cc_alloc(cc, XS_MAX_T * E * sizeof *cc->xtab)) && (cc->xids = cc_alloc(cc, E * sizeof(int32_t))) &&
             (cc->xpairs = cc_alloc(cc, E * sizeof(int32_t))) && (cc->xslots = cc_alloc(cc, E * sizeof(int32_t))) &&
             (cc->xpred = cc_alloc(cc, ((size_t)hp->n_embd + E) * sizeof(float))) &&
             (cc->xpredset = cc_alloc(cc, (size_t)hp->n_layer * E)) && (cc->xpredmade = cc_alloc(cc, (size_t)hp->n_layer));
    if (!ok) return set_error(MOE_ERR_NO_MEMORY, "context: out of memory for the expert tables");
    memset(cc->xpredmade, 0, (size_t)hp->n_layer);
    cc->xs = xc;
    return MOE_OK;
}

/* ============================================================================================ */
/* 8. expert placement and streaming policy                                                      */
/* ============================================================================================ */
/* DESIGN.md, "Expert streaming". Backend-neutral: the host expert cache under
   host_budget_bytes, shared by every context of a model.

   A unit is one expert of one layer: the slabs of all its 3-D tensors (gate, up, down), read
   from the file with pread (one read per slab) into a slot of a cache of our own, never through
   the mapping, so the page cache does not grow with the experts (buffered reads drop their pages
   again with POSIX_FADV_DONTNEED; MOE_IO_DIRECT=1 reads with O_DIRECT instead). Non-expert
   weights stay mapped and resident.

   The router's choice is the sync point (the route op). A backend asks for a layer's distinct
   experts with xs_acquire: those present are pinned (hits), the missing ones get slots from the
   eviction policy (moe_xs_pol: moe_xs_victim and moe_xs_touch, the one place the policy lives)
   and are read by the I/O threads while the caller waits (misses). When the cache cannot hold all of a step's experts at once
   (a large prefill batch), xs_acquire pins a leading group and the backend computes the experts
   group by group: each (token, expert) pair's result is computed exactly as in a resident run,
   so the logits are bit-identical at every budget. xs_prefetch starts reads early for experts a
   backend predicts (the next layer's router applied to the current hidden state); prefetched
   units are unpinned and evictable once they have landed. Predictions are judged at their layer
   (xs_judge) and only those of a class with good odds are read ahead (prefetch throttling below).

   Failure: a read that fails leaves its slot empty; the caller's step fails with MOE_ERR_IO and
   the context is as before (the backend skips the rest of the step's expert work).

   The Vulkan backend uses this same cache under its GPU slot cache when both budgets are below
   the weights (moe_vk.c "GPU expert slot cache"): at each MoE layer's route op it asks
   moe_xs_gather for the experts its slots lack (xs_acquire group by group, copied out into its
   host-visible stage, released) and moe_xs_prefetch for the next layer's likely ones. */

enum { XS_EMPTY = 0, XS_LOADING = 1, XS_READY = 2 };
enum { XS_LRU = MOE_XS_LRU, XS_LFU = MOE_XS_LFU, XS_SLRU = MOE_XS_SLRU };
#define XS_ALIGN 4096u      /* O_DIRECT alignment of buffer, offset and length */
#define XS_NONFINITE (-1)   /* xs_read_slab: the slab read fine but holds a non-finite value */
static int slab_values_bad(const uint8_t *p, uint64_t n, int32_t type); /* section 10 */
/* Prefetch throttling. A prefetch that is used costs nothing extra (the unit would have been read
   anyway, later and on the critical path); one that is not wastes its read and evicts a unit that
   might have hit. So every prediction is judged when the layer's real choice comes (whether the
   unit was read ahead or not, so a layer that stopped prefetching keeps being judged), per layer
   and per class (the predictor's confidence: the expert's best rank in the predicted router's
   order over the step's tokens; later ranks share the last class), and a prediction is read ahead
   only when its class's odds of being routed reach XS_PF_MIN_ODDS. */
#define XS_PF_CLS 8
#define XS_PF_DECAY 0.97f     /* the counts forget with a horizon of about 30 judgments per class */
/* Default of the odds a class needs (MOE_PREFETCH_ODDS=0..1 overrides; 0 reads every prediction
   ahead, as before throttling). 1/2 would be the break-even in bytes, but a dropped prediction that
   was right costs a stall (and a hit), so the default keeps the middle classes: on the 6-layer
   synth Qwen3 at 10/25/50% of the expert bytes it drops the classes routed less than a third of
   the time (the last ranks), 5-9% fewer bytes per decoded token for <= 1.3 points of hit rate. */
#define XS_PF_MIN_ODDS 0.35f

#ifdef MOE_TEST_HOOKS
/* Test hook (test builds only): the n-th expert read from now fails half-way with EIO (once);
   -1 switches it off. */
static _Atomic long g_io_countdown = -1;
MOE_HIDDEN void moe_test_fail_io_after(long n);
void moe_test_fail_io_after(long n) { atomic_store(&g_io_countdown, n); }
#endif

struct moe_xcache {
    int n_layer, E;                 /* units: layer · E + expert */
    /* per layer: its expert tensors (roles in role order) and where each slab's region sits in a slot */
    int32_t *lt_n;                  /* [n_layer] expert tensors of the layer */
    int32_t *lt_role;               /* [n_layer][XS_MAX_T] */
    int32_t *lt_type;               /* [n_layer][XS_MAX_T] storage type (MOE_TYPE_*) */
    uint64_t *lt_len;               /* [n_layer][XS_MAX_T] slab bytes */
    uint64_t *lt_roff;              /* [n_layer][XS_MAX_T] region offset in a slot */
    uint64_t *unit_bytes;           /* [n_layer] bytes of one unit (sum of slabs) */
    /* where each slab is in the files */
    int32_t *src_file;              /* [n_layer][XS_MAX_T][E] index into fd[] */
    uint64_t *src_off;              /* [n_layer][XS_MAX_T][E] byte offset in that file */
    int n_files;
    int *fd, *fd_direct;            /* buffered and O_DIRECT descriptors (fd_direct -1: none) */
    int direct;
    /* the slots */
    int32_t n_slots, policy;
    uint64_t slot_bytes;
    uint8_t *mem;
    int32_t *map;                   /* [n_layer · E] slot of a unit, -1 = not cached */
    int32_t *key, *pins;            /* per slot: unit (-1 none), pins by acquiring contexts */
    uint8_t *state;                 /* XS_* */
    uint8_t *prefetched;            /* loaded by a prefetch: 1 in flight, 2 landed, 3 in flight and already
                                       asked for; 0 once used (or a demand load) */
    int32_t *err;                   /* errno of the failed read (demand loads) */
    uint64_t *err_off;
    moe_xs_pol pol;                 /* the eviction policy's state */
    pthread_mutex_t mu;
    pthread_cond_t cv;              /* a slot settled or was unpinned */
    pthread_cond_t jobs;            /* a load was queued, or quit */
    int32_t *queue;                 /* ring of slots to load, n_slots entries */
    int32_t q_head, q_n;
    pthread_t *io;
    int n_io, quit, sync_ok;
    int prefetch;                   /* predict and prefetch the next layer's experts */
    float *pf_seen, *pf_right;      /* [n_layer][XS_PF_CLS] predictions judged; of them routed (decayed counts) */
    float pf_min_odds;              /* a prediction is read ahead from these odds of being routed (MOE_PREFETCH_ODDS) */
    uint64_t total_read;            /* bytes read from the files (all contexts) */
};

static uint64_t xs_align_up(uint64_t v, uint64_t a) { return (v + a - 1) / a * a; }
static size_t xs_i3(const moe_xcache *xc, int l, int t, int e) { return ((size_t)l * XS_MAX_T + (size_t)t) * (size_t)xc->E + (size_t)e; }

/* the bytes of slab t of the unit in slot s (its region holds the aligned read around it) */
static const uint8_t *xs_slab(const moe_xcache *xc, int32_t s, int l, int t, int e) {
    uint64_t off = xc->src_off[xs_i3(xc, l, t, e)];
    return xc->mem + (uint64_t)s * xc->slot_bytes + xc->lt_roff[(size_t)l * XS_MAX_T + (size_t)t] + (off % XS_ALIGN);
}

/* Reads one slab into its region: the aligned range around it (O_DIRECT) or the slab itself.
   0 or an errno. */
static int xs_read_slab(moe_xcache *xc, int32_t s, int l, int t, int e) {
    size_t i3 = xs_i3(xc, l, t, e);
    uint64_t off = xc->src_off[i3], len = xc->lt_len[(size_t)l * XS_MAX_T + (size_t)t];
    uint8_t *region = xc->mem + (uint64_t)s * xc->slot_bytes + xc->lt_roff[(size_t)l * XS_MAX_T + (size_t)t];
    int f = xc->src_file[i3];
    uint64_t a0 = off - off % XS_ALIGN;
    int direct = xc->direct && xc->fd_direct[f] >= 0;
    uint64_t pos = direct ? a0 : off, end = direct ? xs_align_up(off + len, XS_ALIGN) : off + len;
    uint8_t *dst = direct ? region : region + off % XS_ALIGN;
#ifdef MOE_TEST_HOOKS
    long c = atomic_load(&g_io_countdown);
    int inject = c >= 0 && atomic_fetch_sub(&g_io_countdown, 1) == 0;
#else
    const int inject = 0;
#endif
    uint64_t done = 0, need = direct ? off + len - a0 : len;
    while (pos + done < end) {
        if (inject && done >= need / 2) return EIO; /* the injected failure, half-way through */
        uint64_t want = end - pos - done;
        if (inject && done < need / 2) want = need / 2 - done > 0 ? need / 2 - done : 1;
        if (want > ((uint64_t)1 << 30)) want = (uint64_t)1 << 30;
        ssize_t r = pread(direct ? xc->fd_direct[f] : xc->fd[f], dst + done, (size_t)want, (off_t)(pos + done));
        if (r < 0) {
            if (errno == EINTR) continue;
            if (direct && errno == EINVAL && done == 0) { /* this file system refuses O_DIRECT here */
                direct = 0;
                pos = off;
                end = off + len;
                dst = region + off % XS_ALIGN;
                need = len;
                continue;
            }
            return errno ? errno : EIO;
        }
        if (r == 0) break; /* end of file: fine past the slab (the aligned tail), else short */
        done += (uint64_t)r;
    }
    if (inject) return EIO;
    if (done < need) return EIO;
#ifdef POSIX_FADV_DONTNEED
    if (!direct) posix_fadvise(xc->fd[f], (off_t)off, (off_t)len, POSIX_FADV_DONTNEED); /* no second copy in the page cache */
#endif
    /* the load check of streamed experts happens here, as their bytes arrive (section 10) */
    return slab_values_bad(region + off % XS_ALIGN, len, xc->lt_type[(size_t)l * XS_MAX_T + (size_t)t]) ? XS_NONFINITE : 0;
}

/* reads every slab of the unit in slot s (called without the lock; the slot is LOADING) */
static int xs_load_unit(moe_xcache *xc, int32_t s, int32_t key, uint64_t *bad_off) {
    int l = key / xc->E, e = key % xc->E;
    for (int t = 0; t < xc->lt_n[l]; t++) {
        int r = xs_read_slab(xc, s, l, t, e);
        if (r) {
            *bad_off = xc->src_off[xs_i3(xc, l, t, e)];
            return r;
        }
    }
    return 0;
}

static void *xs_io_main(void *arg) {
    moe_xcache *xc = arg;
    pthread_mutex_lock(&xc->mu);
    for (;;) {
        while (!xc->quit && xc->q_n == 0) pthread_cond_wait(&xc->jobs, &xc->mu);
        if (xc->quit) break;
        int32_t s = xc->queue[xc->q_head];
        xc->q_head = (xc->q_head + 1) % xc->n_slots;
        xc->q_n--;
        int32_t key = xc->key[s];
        pthread_mutex_unlock(&xc->mu);
        uint64_t bad = 0;
        int r = xs_load_unit(xc, s, key, &bad);
        pthread_mutex_lock(&xc->mu);
        if (!r) {
            xc->state[s] = XS_READY;
            xc->prefetched[s] = xc->prefetched[s] == 1 ? 2 : 0;
            xc->total_read += xc->unit_bytes[key / xc->E];
            pthread_cond_broadcast(&xc->cv);
            continue;
        } else if (xc->prefetched[s] && xc->pins[s] > 0) { /* a context waits for it: retry as its own read */
            xc->prefetched[s] = 0;
            xc->queue[(xc->q_head + xc->q_n++) % xc->n_slots] = s;
            pthread_cond_signal(&xc->jobs);
            continue;
        } else { /* the slot goes back to empty; a waiting context reports the error */
            xc->state[s] = XS_EMPTY;
            xc->map[key] = -1;
            xc->key[s] = -1;
            xc->err[s] = r;
            xc->err_off[s] = bad;
        }
        xc->prefetched[s] = 0;
        pthread_cond_broadcast(&xc->cv);
    }
    pthread_mutex_unlock(&xc->mu);
    return NULL;
}

/* The eviction policy, in one place (moe.h moe_xs_pol): which slot gives way for a new unit,
   and what a use of a slot changes.
   LRU: the least recently used slot. A prefill touches every expert of every layer once, in layer
   order: when that is more than the cache holds, LRU evicts each unit just before the scan comes
   back to it and nothing ever hits (0% on a pp512 at a quarter of the experts).
   LFU: fewest uses since the unit came (counts halved every n uses; ties to the least recent).
   SLRU: two segments. Protected (at most 4/5 of the slots) holds the units the router chose most:
   each unit's routed pairs are counted whether it is cached or not (decayed: halved once 8 pairs
   per unit were counted), and a unit enters the protected segment when there is room or when it
   outweighs the protected unit it displaces (which goes back to probation). Victims come from
   the probation segment (least recent first), so a scan only turns probation over. A protected
   slot gives way only when nothing else can, and never to a step larger than the cache
   (spare_prot: its other experts can wait for the next group, or be read from their homes). */
int moe_xs_pol_init(moe_xs_pol *p, int32_t kind, int32_t n_slots, int32_t n_units, const int32_t *key) {
    memset(p, 0, sizeof *p);
    p->kind = kind;
    p->n = n_slots;
    p->n_units = n_units;
    p->key = key;
    p->decay_at = (uint64_t)n_slots;
    p->max_prot = (int32_t)((int64_t)n_slots * 4 / 5);
    size_t n = (size_t)(n_slots > 0 ? n_slots : 1);
    p->stamp = moe_calloc(n, sizeof *p->stamp);
    p->freq = moe_calloc(n, sizeof *p->freq);
    p->prot = moe_calloc(n, 1);
    p->hist = moe_calloc((size_t)(n_units > 0 ? n_units : 1), sizeof *p->hist);
    if (p->stamp && p->freq && p->prot && p->hist) return 1;
    moe_xs_pol_free(p);
    return 0;
}

void moe_xs_pol_free(moe_xs_pol *p) {
    moe_free(p->stamp);
    moe_free(p->freq);
    moe_free(p->prot);
    moe_free(p->hist);
    p->stamp = NULL;
    p->freq = p->hist = NULL;
    p->prot = NULL;
}

/* SLRU: the unit's weight; a slot's unit -1 (empty) weighs nothing */
static float xs_pol_weight(const moe_xs_pol *p, int32_t s) { return p->key[s] >= 0 ? p->hist[p->key[s]] : 0.0f; }

int32_t moe_xs_victim(const moe_xs_pol *p, const int32_t *pins, const uint8_t *state, uint64_t used_after, int spare_prot) {
    int32_t best = -1;
    int slru = p->kind == MOE_XS_SLRU;
    for (int32_t s = 0; s < p->n; s++) {
        if ((pins && pins[s]) || state[s] == XS_LOADING) continue;
        if (state[s] == XS_EMPTY) return s;
        if (p->stamp[s] > used_after || (slru && spare_prot && p->prot[s])) continue;
        if (best < 0) { best = s; continue; }
        if (slru && p->prot[s] != p->prot[best]) {
            if (!p->prot[s]) best = s; /* probation before protected */
        } else if (p->kind == MOE_XS_LFU && p->freq[s] != p->freq[best]) {
            if (p->freq[s] < p->freq[best]) best = s;
        } else if (p->stamp[s] < p->stamp[best]) best = s;
    }
    return best;
}

void moe_xs_pol_count(moe_xs_pol *p, int32_t unit, uint32_t pairs) {
    if (p->kind != MOE_XS_SLRU) return;
    p->hist[unit] += (float)pairs;
    if ((p->hist_added += pairs) >= 8.0 * p->n_units) {
        for (int32_t u = 0; u < p->n_units; u++) p->hist[u] *= 0.5f;
        p->hist_added = 0;
    }
}

void moe_xs_pol_forget(moe_xs_pol *p) {
    if (p->n > 0) memset(p->prot, 0, (size_t)p->n);
    p->n_prot = 0;
}

void moe_xs_touch(moe_xs_pol *p, int32_t s, uint32_t pairs, int fresh) {
    p->stamp[s] = ++p->tick;
    if (fresh) p->freq[s] = 0;
    p->freq[s] += 1.0f;
    if (p->tick >= p->decay_at) {
        for (int32_t i = 0; i < p->n; i++) p->freq[i] *= 0.5f;
        p->decay_at = p->tick + (uint64_t)p->n;
    }
    if (p->kind != MOE_XS_SLRU || p->key[s] < 0) return;
    moe_xs_pol_count(p, p->key[s], pairs);
    if (fresh && p->prot[s]) { /* the slot's previous unit was protected (a protected victim) */
        p->prot[s] = 0;
        p->n_prot--;
    }
    if (p->prot[s] || !pairs) return; /* (no pairs: a prefetch's guess, judged at its first use) */
    if (p->n_prot < p->max_prot) {
        p->prot[s] = 1;
        p->n_prot++;
        return;
    }
    int32_t q = -1; /* the weakest protected unit (least recent among equals) */
    for (int32_t i = 0; i < p->n; i++)
        if (p->prot[i] && (q < 0 || xs_pol_weight(p, i) < xs_pol_weight(p, q) ||
                           (xs_pol_weight(p, i) == xs_pol_weight(p, q) && p->stamp[i] < p->stamp[q])))
            q = i;
    if (q >= 0 && xs_pol_weight(p, s) > xs_pol_weight(p, q)) { /* s takes q's place; q goes back to probation */
        p->prot[q] = 0;
        p->prot[s] = 1;
    }
}

int32_t moe_xs_policy_env(void) {
    const char *v = getenv("MOE_EVICT");
    if (!v || !*v || !strcmp(v, "slru")) return XS_SLRU;
    return !strcmp(v, "lru") ? XS_LRU : !strcmp(v, "lfu") ? XS_LFU : -1;
}

/* spare_prot: a protected unit stays (a prefetch, or a group that can go on without this slot) */
static int32_t xs_victim(const moe_xcache *xc, int spare_prot) { return moe_xs_victim(&xc->pol, xc->pins, xc->state, UINT64_MAX, spare_prot); }

const char *moe_xs_policy_name(int32_t kind) {
    return kind == XS_LFU ? "LFU (with decay)" : kind == XS_SLRU ? "SLRU (protected by routed pairs)" : "LRU";
}

/* takes slot s for unit key and queues its load (lock held) */
static void xs_claim(moe_xcache *xc, int32_t s, int32_t key, int prefetch, uint32_t pairs) {
    if (xc->key[s] >= 0) xc->map[xc->key[s]] = -1;
    xc->key[s] = key;
    xc->map[key] = s;
    xc->state[s] = XS_LOADING;
    xc->prefetched[s] = (uint8_t)prefetch;
    xc->err[s] = 0;
    moe_xs_touch(&xc->pol, s, pairs, 1);
    xc->queue[(xc->q_head + xc->q_n++) % xc->n_slots] = s;
    pthread_cond_signal(&xc->jobs);
}


/* Pins a leading group of the n distinct experts ids[] of layer l (pairs[i]: the routed pairs of
   ids[i], for the counters), reading the missing ones, and points tab[t·E + e] at slab t of each;
   sl: scratch of n slots. Returns the group size (>= 1), or a negative moe_status with the error
   set and nothing pinned. */
static int xs_acquire(moe_xcache *xc, int l, const int32_t *ids, int n, const int32_t *pairs,
                      const uint8_t **tab, int32_t *sl, xs_counts *cnt) {
    int E = xc->E, g = 0;
    pthread_mutex_lock(&xc->mu);
    for (;;) {
        for (g = 0; g < n; g++) {
            int32_t key = l * E + ids[g], s = xc->map[key];
            if (s >= 0) {
                xc->pins[s]++;
                if (xc->prefetched[s] == 1 || xc->prefetched[s] == 2) {
                    cnt->pf_used++;
                    xc->prefetched[s] = xc->prefetched[s] == 1 ? 3 : 0;
                }
                moe_xs_touch(&xc->pol, s, (uint32_t)pairs[g], 0);
                cnt->hits += (uint64_t)pairs[g];
            } else {
                if ((s = xs_victim(xc, g > 0)) < 0) break;
                xs_claim(xc, s, key, 0, (uint32_t)pairs[g]);
                xc->pins[s] = 1;
                cnt->misses += (uint64_t)pairs[g];
                cnt->bytes += xc->unit_bytes[l];
            }
            sl[g] = s;
        }
        if (g > 0) break;
        pthread_cond_wait(&xc->cv, &xc->mu); /* every slot pinned by other contexts, or loading */
    }
    /* wait for the group's loads; a pinned slot only goes back to empty when its read failed */
    int failed = -1;
    for (int i = 0; i < g; i++) {
        while (xc->state[sl[i]] == XS_LOADING) pthread_cond_wait(&xc->cv, &xc->mu);
        if (xc->state[sl[i]] == XS_EMPTY && failed < 0) failed = i;
    }
    if (failed >= 0) {
        int err = xc->err[sl[failed]];
        uint64_t off = xc->err_off[sl[failed]];
        for (int i = 0; i < g; i++) xc->pins[sl[i]]--;
        pthread_cond_broadcast(&xc->cv);
        pthread_mutex_unlock(&xc->mu);
        if (err == XS_NONFINITE)
            return set_error(MOE_ERR_FORMAT, "expert streaming: expert %d of layer %d (file offset %llu) holds a non-finite value",
                             ids[failed], l, (unsigned long long)off);
        return set_error(MOE_ERR_IO, "expert streaming: reading expert %d of layer %d (file offset %llu) failed: %s", ids[failed], l,
                         (unsigned long long)off, strerror(err ? err : EIO));
    }
    for (int i = 0; i < g; i++)
        for (int t = 0; t < xc->lt_n[l]; t++) tab[(size_t)t * (size_t)E + (size_t)ids[i]] = xs_slab(xc, sl[i], l, t, ids[i]);
    pthread_mutex_unlock(&xc->mu);
    return g;
}

static void xs_release(moe_xcache *xc, int l, const int32_t *ids, int n) {
    pthread_mutex_lock(&xc->mu);
    for (int i = 0; i < n; i++) {
        int32_t s = xc->map[l * xc->E + ids[i]];
        if (s >= 0 && xc->pins[s] > 0) xc->pins[s]--;
    }
    pthread_cond_broadcast(&xc->cv);
    pthread_mutex_unlock(&xc->mu);
}

/* the odds that a prediction of class c for layer l is routed (decayed counts, Laplace prior 1/2) */
static float xs_pf_odds(const moe_xcache *xc, int l, int c) {
    size_t i = (size_t)l * XS_PF_CLS + (size_t)c;
    return (xc->pf_right[i] + 1.0f) / (xc->pf_seen[i] + 2.0f);
}

static int xs_pf_class(int c) { return c < XS_PF_CLS - 1 ? c : XS_PF_CLS - 1; }

/* Judges the predictions for layer l against its real choice: pred[e] (E entries) is 0 or the
   class + 1 of a prediction of expert e; ids[] the n distinct experts routed. Clears pred. */
static void xs_judge(moe_xcache *xc, int l, uint8_t *pred, const int32_t *ids, int n) {
    pthread_mutex_lock(&xc->mu);
    float *seen = xc->pf_seen + (size_t)l * XS_PF_CLS, *right = xc->pf_right + (size_t)l * XS_PF_CLS;
    for (int i = 0; i < n; i++)
        if (pred[ids[i]]) right[xs_pf_class(pred[ids[i]] - 1)] += 1.0f;
    for (int e = 0; e < xc->E; e++)
        if (pred[e]) {
            int c = xs_pf_class(pred[e] - 1);
            seen[c] = seen[c] * XS_PF_DECAY + 1.0f;
            right[c] *= XS_PF_DECAY; /* (its own hit, added above, decays once with it: right <= seen holds) */
            pred[e] = 0;
        }
    pthread_mutex_unlock(&xc->mu);
}

/* Starts reads of the experts ids[] of layer l (cls[i]: the class of ids[i]; NULL: all class 0)
   that are not cached and whose class has good odds, best class first, into slots the policy
   gives up (never pinned, loading or protected ones). */
static void xs_prefetch(moe_xcache *xc, int l, const int32_t *ids, const uint8_t *cls, int n, xs_counts *cnt) {
    pthread_mutex_lock(&xc->mu);
    for (int c = 0; c < XS_PF_CLS; c++) {
        if (xs_pf_odds(xc, l, c) < xc->pf_min_odds) continue;
        for (int i = 0; i < n; i++) {
            int32_t key = l * xc->E + ids[i];
            if (xs_pf_class(cls ? cls[i] : 0) != c || xc->map[key] >= 0) continue;
            int32_t s = xs_victim(xc, 1);
            if (s < 0) goto out;
            xs_claim(xc, s, key, 1, 0);
            cnt->pf_issued++;
            cnt->bytes += xc->unit_bytes[l];
        }
    }
out:
    pthread_mutex_unlock(&xc->mu);
}

static int xs_prefetch_on(const moe_xcache *xc) { return xc->prefetch; }

moe_status moe_xs_gather(moe_xcache *xc, int l, const int32_t *ids, int n, const int32_t *pairs, uint8_t *const *dst, xs_counts *cnt) {
    const uint8_t **tab = moe_malloc((size_t)XS_MAX_T * (size_t)xc->E * sizeof *tab);
    int32_t *sl = moe_malloc((size_t)(n > 0 ? n : 1) * sizeof *sl);
    moe_status st = tab && sl ? MOE_OK : set_error(MOE_ERR_NO_MEMORY, "expert streaming: out of memory");
    for (int i = 0; i < n && !st;) { /* a group at a time: pinned, copied out, released */
        int g = xs_acquire(xc, l, ids + i, n - i, pairs + i, tab, sl, cnt);
        if (g < 0) {
            st = (moe_status)g;
            break;
        }
        for (int j = i; j < i + g; j++)
            for (int t = 0; t < xc->lt_n[l]; t++)
                memcpy(dst[(size_t)j * XS_MAX_T + (size_t)t], tab[(size_t)t * (size_t)xc->E + (size_t)ids[j]],
                       (size_t)xc->lt_len[(size_t)l * XS_MAX_T + (size_t)t]);
        xs_release(xc, l, ids + i, g);
        i += g;
    }
    moe_free(tab);
    moe_free(sl);
    return st;
}

int moe_xs_prefetch(moe_xcache *xc, int l, const int32_t *ids, const uint8_t *cls, int n, xs_counts *cnt) {
    if (!xc || !xs_prefetch_on(xc)) return 0;
    xs_prefetch(xc, l, ids, cls, n, cnt);
    return 1;
}

void moe_xs_judge(moe_xcache *xc, int l, uint8_t *pred, const int32_t *ids, int n) {
    if (xc) xs_judge(xc, l, pred, ids, n);
}

static void xs_free(moe_xcache *xc) {
    if (!xc) return;
    if (xc->sync_ok) {
        pthread_mutex_lock(&xc->mu);
        xc->quit = 1;
        pthread_cond_broadcast(&xc->jobs);
        pthread_mutex_unlock(&xc->mu);
        for (int i = 0; i < xc->n_io; i++) pthread_join(xc->io[i], NULL);
        pthread_mutex_destroy(&xc->mu);
        pthread_cond_destroy(&xc->cv);
        pthread_cond_destroy(&xc->jobs);
    }
    for (int i = 0; i < xc->n_files; i++)
        if (xc->fd_direct && xc->fd_direct[i] >= 0) close(xc->fd_direct[i]);
    moe_free(xc->fd);
    moe_free(xc->fd_direct);
    moe_free(xc->io);
    aligned_bytes_free(xc->mem);
    moe_free(xc->lt_n);
    moe_free(xc->lt_role);
    moe_free(xc->lt_type);
    moe_free(xc->lt_len);
    moe_free(xc->lt_roff);
    moe_free(xc->unit_bytes);
    moe_free(xc->src_file);
    moe_free(xc->src_off);
    moe_free(xc->map);
    moe_free(xc->key);
    moe_free(xc->pins);
    moe_free(xc->state);
    moe_free(xc->prefetched);
    moe_free(xc->pf_seen);
    moe_free(xc->pf_right);
    moe_free(xc->err);
    moe_free(xc->err_off);
    moe_xs_pol_free(&xc->pol);
    moe_free(xc->queue);
    moe_free(xc);
}

static int xs_env_int(const char *name, int dflt) {
    const char *v = getenv(name);
    return v && *v ? atoi(v) : dflt;
}

/* the file (index into files[]) that holds p, with its offset; -1 when p is in none */
static int xs_locate(const moe_file *const *files, int n_files, const uint8_t *p, uint64_t len, uint64_t *off) {
    for (int i = 0; i < n_files; i++) {
        const moe_file *f = files[i];
        if (f->data && p >= f->data && p + len <= f->data + f->size && f->fd >= 0) {
            *off = (uint64_t)(p - f->data);
            return i;
        }
    }
    return -1;
}

/* Sizes for choosing budgets (moe_model_info.weight_bytes / expert_bytes): every tensor as
   stored, and the routed experts among them. */
static void model_weight_sizes(const moe_model *m, uint64_t *weight_bytes, uint64_t *expert_bytes) {
    uint64_t all = 0, ex = 0;
    for (int64_t i = 0; i < m->gguf.n_tensors; i++) {
        all += m->gguf.tensors[i].nbytes;
        if (!m->w.hp.n_layer && m->gguf.tensors[i].ne[2] > 1) ex += m->gguf.tensors[i].nbytes; /* vocab_only: no plan, 3-D = experts */
    }
    for (int l = 0; l < m->w.hp.n_layer; l++)
        for (int r = 0; r < MOE_LT_COUNT; r++) {
            const moe_weight *w = &m->w.layers[l].t[r];
            if (w->data && w->n_dims == 3) ex += w->expert_bytes * (uint64_t)w->ne[2];
        }
    *weight_bytes = all;
    *expert_bytes = ex;
}

/* Vulkan with a host budget: the experts live on the device after the upload, so their pages of
   the mapping (and of the page cache, as far as the OS lets go) are given back. */
static void xs_drop_expert_pages(const moe_model *m) {
    long pg = os_page_size();
    uintptr_t mask = (uintptr_t)(pg > 0 ? pg : 4096) - 1;
    const moe_file *files[1 + 64];
    int n_files = 0;
    if (m->file.data) files[n_files++] = &m->file;
    for (int i = 0; i < m->n_shards && n_files < 65; i++) files[n_files++] = &m->shards[i];
    for (int l = 0; l < m->w.hp.n_layer; l++)
        for (int r = 0; r < MOE_LT_COUNT; r++) {
            const moe_weight *w = &m->w.layers[l].t[r];
            if (!w->data || w->n_dims != 3) continue;
            for (int64_t e = 0; e < w->ne[2]; e++) {
                uint64_t off;
                if (xs_locate(files, n_files, w->expert_data[e], w->expert_bytes, &off) < 0) continue; /* not file pages (converted): kept */
                uintptr_t a = (uintptr_t)w->expert_data[e], b = a + w->expert_bytes;
                uintptr_t a1 = (a + mask) & ~mask, b1 = b & ~mask; /* whole pages inside the slab only */
#ifdef _WIN32
                if (b1 > a1) VirtualUnlock((void *)a1, b1 - a1); /* unlocked pages: trimmed from the working set */
#else
                if (b1 > a1) madvise((void *)a1, b1 - a1, MADV_DONTNEED);
#endif
            }
        }
#ifdef POSIX_FADV_DONTNEED
    if (m->file.fd >= 0) posix_fadvise(m->file.fd, 0, 0, POSIX_FADV_DONTNEED);
#endif
}

/* Sets up the host expert cache when host_budget_bytes is below the weights: checks the minimum
   working set (the non-expert weights plus one token's experts of the widest layer), sizes the
   slots, finds every slab in the files and starts the I/O threads. stage: under the Vulkan GPU
   slot cache, which stages one layer's experts in host-visible memory on their way to the
   device (moe_vk.c): that much (n_expert slots' worth) of the budget is set aside for it. */
static moe_status xs_setup(moe_model *m, uint64_t budget, int stage) {
    const moe_hparams *hp = &m->w.hp;
    uint64_t weight_bytes, expert_bytes;
    model_weight_sizes(m, &weight_bytes, &expert_bytes);
    if (!budget || budget >= weight_bytes || !expert_bytes) return MOE_OK;
    moe_xcache *xc = moe_calloc(1, sizeof *xc);
    if (!xc) return set_error(MOE_ERR_NO_MEMORY, "moe_load: out of memory for the expert cache");
    int L = hp->n_layer, E = hp->n_expert;
    xc->n_layer = L;
    xc->E = E;
    size_t n3 = (size_t)L * XS_MAX_T * (size_t)E;
    int ok = (xc->lt_n = moe_calloc((size_t)L, sizeof *xc->lt_n)) && (xc->lt_role = moe_calloc((size_t)L * XS_MAX_T, sizeof *xc->lt_role)) &&
             (xc->lt_type = moe_calloc((size_t)L * XS_MAX_T, sizeof *xc->lt_type)) &&
             (xc->lt_len = moe_calloc((size_t)L * XS_MAX_T, sizeof *xc->lt_len)) &&
             (xc->lt_roff = moe_calloc((size_t)L * XS_MAX_T, sizeof *xc->lt_roff)) &&
             (xc->unit_bytes = moe_calloc((size_t)L, sizeof *xc->unit_bytes)) && (xc->src_file = moe_calloc(n3, sizeof *xc->src_file)) &&
             (xc->src_off = moe_calloc(n3, sizeof *xc->src_off));
    const moe_file *files[1 + 64];
    int n_files = 0;
    if (m->file.data) files[n_files++] = &m->file;
    for (int i = 0; i < m->n_shards && n_files < 65; i++) files[n_files++] = &m->shards[i];
    moe_status st = MOE_OK;
    uint64_t slot = 0, stage_unit = 0;
    int n_units = 0;
    for (int l = 0; ok && !st && l < L; l++) {
        uint64_t roff = 0, su = 0;
        for (int r = 0; r < MOE_LT_COUNT && !st; r++) {
            const moe_weight *w = &m->w.layers[l].t[r];
            if (!w->data || w->n_dims != 3) continue;
            int t = xc->lt_n[l]++;
            if (t >= XS_MAX_T || w->ne[2] > E) { st = set_error(MOE_ERR_UNSUPPORTED, "expert streaming: layer %d has too many expert tensors", l); break; }
            xc->lt_role[(size_t)l * XS_MAX_T + (size_t)t] = r;
            xc->lt_type[(size_t)l * XS_MAX_T + (size_t)t] = w->type;
            xc->lt_len[(size_t)l * XS_MAX_T + (size_t)t] = w->expert_bytes;
            xc->lt_roff[(size_t)l * XS_MAX_T + (size_t)t] = roff;
            roff += xs_align_up(w->expert_bytes + XS_ALIGN, XS_ALIGN);
            su += xs_align_up(w->expert_bytes + 16, 256); /* as moe_vk.c places a slab in the stage (VK_PAD, VK_ALIGN) */
            xc->unit_bytes[l] += w->expert_bytes;
            for (int64_t e = 0; e < w->ne[2]; e++) {
                size_t i3 = xs_i3(xc, l, t, (int)e);
                int f = xs_locate(files, n_files, w->expert_data[e], w->expert_bytes, &xc->src_off[i3]);
                if (f < 0) { st = set_error(MOE_ERR_UNSUPPORTED, "expert streaming: the experts of '%s' are not stored as file bytes", w->name); break; }
                xc->src_file[i3] = f;
            }
        }
        if (xc->lt_n[l]) n_units += E;
        if (roff > slot) slot = roff;
        if (su > stage_unit) stage_unit = su;
    }
    if (!ok) st = set_error(MOE_ERR_NO_MEMORY, "moe_load: out of memory for the expert cache");
    if (st) { xs_free(xc); return st; }
    xc->slot_bytes = slot;
    uint64_t reserve = stage ? (uint64_t)E * stage_unit : 0;
    uint64_t rest = weight_bytes - expert_bytes + reserve, min = rest + (uint64_t)hp->n_expert_used * slot;
    if (budget < min) {
        xs_free(xc);
        return set_error(MOE_ERR_NO_MEMORY, "moe_load: host_budget_bytes %llu is below the minimum working set of %llu bytes (%.1f MiB: "
                         "non-expert weights %llu%s + %d experts of %llu bytes)", (unsigned long long)budget, (unsigned long long)min,
                         (double)min / 1048576.0, (unsigned long long)(weight_bytes - expert_bytes),
                         stage ? " + one layer's experts staged for the GPU" : "", hp->n_expert_used, (unsigned long long)slot);
    }
    uint64_t n_slots = (budget - rest) / slot;
    xc->n_slots = (int32_t)(n_slots > (uint64_t)n_units ? (uint64_t)n_units : n_slots);
    if ((xc->policy = moe_xs_policy_env()) < 0) {
        xs_free(xc);
        return set_error(MOE_ERR_INVALID_ARG, "moe_load: MOE_EVICT=%s: expected lru, lfu or slru", getenv("MOE_EVICT"));
    }
    xc->prefetch = xs_env_int("MOE_PREFETCH", 1) != 0;
    const char *odds = getenv("MOE_PREFETCH_ODDS");
    char *odds_end = NULL;
    xc->pf_min_odds = odds && *odds ? strtof(odds, &odds_end) : XS_PF_MIN_ODDS;
    if (odds && *odds && (*odds_end || !(xc->pf_min_odds >= 0.0f && xc->pf_min_odds <= 1.0f))) {
        xs_free(xc);
        return set_error(MOE_ERR_INVALID_ARG, "moe_load: MOE_PREFETCH_ODDS=%s: expected a number from 0 to 1", odds);
    }
    xc->direct = xs_env_int("MOE_IO_DIRECT", 0) != 0;
    size_t ns = (size_t)xc->n_slots;
    void *mem = aligned_bytes(XS_ALIGN, ns ? (size_t)xc->slot_bytes * ns : XS_ALIGN);
    ok = mem != NULL;
    xc->mem = mem;
    ok = ok && (xc->map = moe_malloc((size_t)L * (size_t)E * sizeof *xc->map)) && (xc->key = moe_malloc(ns * sizeof *xc->key)) &&
         (xc->pins = moe_calloc(ns, sizeof *xc->pins)) && (xc->state = moe_calloc(ns, 1)) && (xc->prefetched = moe_calloc(ns, 1)) &&
         (xc->pf_seen = moe_calloc((size_t)L * XS_PF_CLS, sizeof(float))) && (xc->pf_right = moe_calloc((size_t)L * XS_PF_CLS, sizeof(float))) &&
         (xc->err = moe_calloc(ns, sizeof *xc->err)) && (xc->err_off = moe_calloc(ns, sizeof *xc->err_off)) &&
         moe_xs_pol_init(&xc->pol, xc->policy, xc->n_slots, L * E, xc->key) &&
         (xc->queue = moe_malloc(ns * sizeof *xc->queue)) && (xc->fd = moe_malloc((size_t)n_files * sizeof(int))) &&
         (xc->fd_direct = moe_malloc((size_t)n_files * sizeof(int)));
    if (!ok) { xs_free(xc); return set_error(MOE_ERR_NO_MEMORY, "moe_load: out of memory for the expert cache (%d slots of %llu bytes)", xc->n_slots, (unsigned long long)slot); }
    for (size_t i = 0; i < (size_t)L * (size_t)E; i++) xc->map[i] = -1;
    for (size_t i = 0; i < ns; i++) xc->key[i] = -1;
    xc->n_files = n_files;
    for (int i = 0; i < n_files; i++) {
        xc->fd[i] = files[i]->fd;
        xc->fd_direct[i] = -1;
#ifdef O_DIRECT
        if (xc->direct) {
            char path[64];
            snprintf(path, sizeof path, "/proc/self/fd/%d", files[i]->fd);
            xc->fd_direct[i] = open(path, O_RDONLY | O_DIRECT | O_CLOEXEC);
        }
#endif
    }
    pthread_mutex_init(&xc->mu, NULL);
    pthread_cond_init(&xc->cv, NULL);
    pthread_cond_init(&xc->jobs, NULL);
    xc->sync_ok = 1;
    int n_io = xs_env_int("MOE_IO_THREADS", 4);
    n_io = n_io < 1 ? 1 : n_io > 64 ? 64 : n_io;
    if (!(xc->io = moe_calloc((size_t)n_io, sizeof *xc->io))) { xs_free(xc); return set_error(MOE_ERR_NO_MEMORY, "moe_load: out of memory"); }
    for (; xc->n_io < n_io; xc->n_io++)
        if (pthread_create(&xc->io[xc->n_io], NULL, xs_io_main, xc) != 0) {
            if (xc->n_io > 0) break;
            xs_free(xc);
            return set_error(MOE_ERR_NO_MEMORY, "moe_load: cannot start an I/O thread");
        }
    log_msg(&m->log, MOE_LOG_INFO, "expert streaming: host cache of %d of %d experts (%.1f MiB in slots of %.2f MiB; minimum working set %.1f MiB%s), "
            "%s reads, %d I/O threads, %s eviction, prefetch %s (of predictions with odds >= %.2f)", xc->n_slots, n_units, (double)(xc->slot_bytes * ns) / 1048576.0,
            (double)slot / 1048576.0, (double)min / 1048576.0, stage ? ", with the GPU's one-layer stage" : "", xc->direct ? "O_DIRECT" : "buffered", xc->n_io,
            moe_xs_policy_name(xc->policy), xc->prefetch ? "on" : "off", (double)xc->pf_min_odds);
    m->xc = xc;
    return MOE_OK;
}

/* ============================================================================================ */
/* 9. contexts                                                                                   */
/* ============================================================================================ */
#define MOE_DEFAULT_N_BATCH 256

/* the model's CPU thread pool, started on first use (a model that only tokenizes, or runs on
   Vulkan, starts no threads); a failure leaves none, and the next context tries again */
static moe_status model_pool(moe_model *m, thread_pool **out) {
    moe_status st = MOE_OK;
    pthread_mutex_lock(&m->pool_mu);
    if (!m->pool) st = pool_new(m->n_threads, &m->pool);
    *out = m->pool;
    pthread_mutex_unlock(&m->pool_mu);
    return st;
}

moe_status moe_ctx_new(moe_model *model, const moe_ctx_params *params, moe_ctx **out) {
    if (!out) return set_error(MOE_ERR_INVALID_ARG, "moe_ctx_new: out is NULL");
    *out = NULL;
    if (!model) return set_error(MOE_ERR_INVALID_ARG, "moe_ctx_new: model is NULL");
    if (model->w.hp.n_layer == 0) return set_error(MOE_ERR_UNSUPPORTED, "moe_ctx_new: the model was loaded with vocab_only (no weights)");
    moe_ctx_params p = {0};
    if (params) p = *params;
    const moe_hparams *hp = &model->w.hp;
    if (p.n_ctx < 0 || p.n_batch < 0 || p.logits_all < 0 || p.logits_all > 1)
        return set_error(MOE_ERR_INVALID_ARG, "moe_ctx_new: negative n_ctx / n_batch or logits_all not 0/1");
    if (p.low_priority < 0 || p.low_priority > 1 || (!p.abort && p.abort_user))
        return set_error(MOE_ERR_INVALID_ARG, "moe_ctx_new: low_priority not 0/1, or abort_user without an abort callback");
    if (p.kv_type != MOE_KV_F16 && p.kv_type != MOE_KV_F32)
        return set_error(p.kv_type == MOE_KV_Q8_0 ? MOE_ERR_UNSUPPORTED : MOE_ERR_INVALID_ARG,
                         "moe_ctx_new: kv_type %d is not supported (use MOE_KV_F16 or MOE_KV_F32)", p.kv_type);
    if (p.n_ctx == 0) p.n_ctx = hp->n_ctx_train < 4096 ? hp->n_ctx_train : 4096;
    else if (p.n_ctx > hp->n_ctx_train) /* allowed, but said: positions past training are extrapolation */
        log_msg(&model->log, MOE_LOG_WARN,
                "moe_ctx_new: n_ctx %d is beyond the model's trained context of %d tokens; output past position %d may degrade",
                p.n_ctx, hp->n_ctx_train, hp->n_ctx_train);
    if (p.n_batch == 0) p.n_batch = MOE_DEFAULT_N_BATCH;
    if (p.n_batch > p.n_ctx) p.n_batch = p.n_ctx;
    moe_ctx *c = moe_calloc(1, sizeof *c);
    if (!c) return set_error(MOE_ERR_NO_MEMORY, "moe_ctx_new: out of memory");
    c->model = model;
    c->n_ctx = p.n_ctx;
    c->n_batch = p.n_batch;
    c->kv_type = p.kv_type;
    c->logits_all = p.logits_all;
    c->abort = p.abort;
    c->abort_user = p.abort_user;
    c->backup_slot = -1;
    atomic_init(&c->stop, 0);
    c->ops = &k_cpu_ops;
    c->logits_cap = c->logits_all ? 0 : 1;
    c->logits = moe_calloc((size_t)hp->n_vocab, sizeof(float));
    if (!c->logits) {
        moe_free(c);
        return set_error(MOE_ERR_NO_MEMORY, "moe_ctx_new: out of memory");
    }
    c->logits_cap = 1;
    c->tokens = moe_malloc((size_t)c->n_ctx * sizeof *c->tokens);
    if (!c->tokens) {
        moe_free(c->logits);
        moe_free(c);
        return set_error(MOE_ERR_NO_MEMORY, "moe_ctx_new: out of memory");
    }
    if (hp->n_state) { /* recurrent states: chunk starts and checkpoints (moe_ctx_rewind) */
        c->ckpt_every = moe_ckpt_every(c->n_ctx);
        c->n_ckpt = moe_ckpt_slots(c->n_ctx);
        c->seg = moe_calloc((size_t)c->n_ctx, 1);
        c->ckpt_ok = moe_calloc((size_t)(c->n_ckpt ? c->n_ckpt : 1), 1);
        if (!c->seg || !c->ckpt_ok) {
            moe_free(c->seg);
            moe_free(c->ckpt_ok);
            moe_free(c->tokens);
            moe_free(c->logits);
            moe_free(c);
            return set_error(MOE_ERR_NO_MEMORY, "moe_ctx_new: out of memory");
        }
    }
    if (hp->n_state && c->abort) c->backup_slot = c->n_ckpt; /* one more slot in the backend, after the checkpoints */
    moe_ctx_shape shape = {c->n_ctx, c->n_batch, c->kv_type, c->logits_all, model->n_threads, model->cpu_exact,
                           ctx_abort_poll, c, c->backup_slot >= 0, p.max_submit_us, p.low_priority != 0, 0, 0};
    c->max_submit_us = p.max_submit_us, c->low_priority = p.low_priority != 0;
    moe_status st;
    if (model->vk) {
        c->ops = &moe_vk_ops;
        st = moe_vk_ctx_new(model->vk, &shape, &c->be);
    } else {
        thread_pool *pool;
        if (!(st = model_pool(model, &pool))) st = cpu_ctx_new(&model->w, &shape, pool, &c->be);
        c->cpu = c->be;
        if (!st && model->xc && (st = cpu_stream_attach(c->cpu, model->xc))) cpu_ctx_free(c->be);
    }
    if (st) {
        moe_free(c->seg);
        moe_free(c->ckpt_ok);
        moe_free(c->tokens);
        moe_free(c->logits);
        moe_free(c);
        return st;
    }
    if (c->ckpt_every) { /* the recurrent states start empty */
        c->ops->begin_step(c->be);
        c->ops->state_restore(c->be, -1);
        if ((st = c->ops->end_step(c->be))) {
            moe_ctx_free(c);
            return st;
        }
    }
    c->stats.t_load_s = model->t_load_s;
    atomic_fetch_add(&model->refs, 1); /* released by moe_ctx_free: the model outlives its contexts */
    *out = c;
    return MOE_OK;
}

static void ctx_worker_stop(moe_ctx *ctx);

void moe_ctx_free(moe_ctx *ctx) {
    if (!ctx) return;
    if (ctx->wk) ctx_worker_stop(ctx); /* a step in flight is asked to stop and waited for */
    if (ctx->cpu && ctx->cpu->xs) {
        const xs_counts *x = &ctx->cpu->xcnt;
        log_msg(&ctx->model->log, MOE_LOG_INFO, "expert streaming (this context): hits %llu, misses %llu (pairs); %.1f MiB read; "
                "prediction of the next layer's experts: %llu of %llu right (%.1f%%); %llu units prefetched, %llu of them used",
                (unsigned long long)x->hits, (unsigned long long)x->misses, (double)x->bytes / 1048576.0, (unsigned long long)x->pred_hits,
                (unsigned long long)x->pred_total, x->pred_total ? 100.0 * (double)x->pred_hits / (double)x->pred_total : 0.0,
                (unsigned long long)x->pf_issued, (unsigned long long)x->pf_used);
    }
    if (ctx->cpu) cpu_ctx_free(ctx->cpu);
    else if (ctx->be) moe_vk_ctx_free(ctx->be);
    cpu_ctx_free(ctx->batch_cc);
    if (ctx->batch_vk) moe_vk_ctx_free(ctx->batch_vk);
    moe_model *model = ctx->model;
    moe_free(ctx->seg);
    moe_free(ctx->ckpt_ok);
    moe_free(ctx->tokens);
    moe_free(ctx->logits);
    moe_free(ctx);
    model_release(model); /* the last reference destroys the model (after moe_model_free) */
}

/* ---- sliding-window rings: what they still hold, and recomputation when that is not enough ----
   A ring keeps window + n_batch - 1 rows: a step can always continue from pos, and a rewind of up
   to n_batch tokens finds the keys it needs. Further rewinds, and a failed step that already
   overwrote rows, recompute the prefix from the token history (a prefill of pos tokens). */
static int32_t ctx_min_ring(const moe_ctx *c) { /* rows of the smallest ring; 0 = none */
    const moe_weights *w = &c->model->w;
    int32_t r = 0;
    for (int i = 0; i < w->hp.n_cache; i++)
        if (w->caches[i].window) {
            int32_t rows = moe_cache_rows(&w->caches[i], c->n_ctx, c->n_batch);
            if (!r || rows < r) r = rows;
        }
    return r;
}

/* do the rings hold the keys a query at position p needs? */
static int ctx_ring_ok(const moe_ctx *c, int32_t p) {
    const moe_weights *w = &c->model->w;
    for (int i = 0; i < w->hp.n_cache; i++) {
        int32_t win = w->caches[i].window, need = win && p >= win ? p - win + 1 : 0;
        if (win && need < p && need < c->ring_lo) return 0;
    }
    return 1;
}

/* runs the forward over n_tokens tokens at pos.. in chunks (pos itself is the caller's to move),
   reading the step's logits into logits (NULL: none) */
static moe_status ctx_run(moe_ctx *ctx, const moe_token *tokens, int32_t n_tokens, float *logits);

/* ---- recurrent states (hybrid models): checkpoints and replay (moe.h, moe_ctx_rewind) ---- */
/* checkpoints of positions past pos are stale: slot s holds position (s + 1) · ckpt_every */
static void ckpt_drop_after(moe_ctx *ctx, int32_t pos) {
    for (int32_t s = pos / ctx->ckpt_every; s < ctx->n_ckpt; s++) ctx->ckpt_ok[s] = 0;
}

/* Recurrent states (and caches) at p (<= ctx->pos): the newest valid checkpoint at or before p
   (else zeros at 0), then the tokens from there to p again, in the chunks they first went through
   (seg), the last one cut at p. Each token's values depend only on earlier tokens and on where
   its chunk began, so the states, and the KV rows written again, come out bit for bit as they
   were when the context first stood at p. */
static moe_status states_rebuild(moe_ctx *ctx, int32_t p) {
    const moe_model *m = ctx->model;
    int32_t slot = -1, c = 0;
    ckpt_drop_after(ctx, p);
    for (int32_t s = p / ctx->ckpt_every - 1; s >= 0; s--)
        if (s < ctx->n_ckpt && ctx->ckpt_ok[s]) {
            slot = s;
            c = (s + 1) * ctx->ckpt_every;
            break;
        }
    ctx->n_logits = 0;
    ctx->needs_repair = 1;
    ctx->ops->begin_step(ctx->be);
    ctx->ops->state_restore(ctx->be, slot);
    moe_status st = ctx->ops->end_step(ctx->be);
    for (int32_t q = c, e; !st && q < p; q = e) {
        for (e = q + 1; e < p && !ctx->seg[e]; e++) {}
        int32_t ck = e % ctx->ckpt_every == 0 ? e / ctx->ckpt_every - 1 : -1;
        if (ck >= ctx->n_ckpt) ck = -1;
        ctx->ops->begin_step(ctx->be);
        m->arch->forward(ctx->be, ctx->ops, &m->w, ctx->tokens + q, e - q, q, 0);
        if (ck >= 0) ctx->ops->state_checkpoint(ctx->be, ck);
        st = ctx->ops->end_step(ctx->be);
        if (!st && ck >= 0) ctx->ckpt_ok[ck] = 1;
    }
    if (!st) {
        ctx->pos = p;
        ctx->needs_repair = 0;
    }
    return st;
}

/* recomputes the caches (and recurrent states) of positions [0, p) from the token history */
static moe_status ctx_recompute(moe_ctx *ctx, int32_t p) {
    if (ctx->ckpt_every) return states_rebuild(ctx, p);
    ctx->pos = 0;
    ctx->ring_lo = 0;
    ctx->n_logits = 0;
    ctx->needs_repair = 1;
    moe_status st = p ? ctx_run(ctx, ctx->tokens, p, NULL) : MOE_OK;
    if (!st) {
        ctx->pos = p;
        ctx->needs_repair = 0;
    }
    return st;
}

/* A step cancelled after some of it ran (positions from p0 on): pos and the host logits were never
   touched, cache rows past p0 are never read; the recurrent states come back from the step's
   backup slot (without one, only moe_ctx_free's stop gets here, or a replay repairs them), and
   sliding-window rings that lost rows are recomputed before the next use, as after any failure. */
static moe_status ctx_cancelled(moe_ctx *ctx, int32_t p0) {
    if (!ctx_ring_ok(ctx, p0)) ctx->needs_repair = 1;
    if (ctx->ckpt_every) {
        ckpt_drop_after(ctx, p0);
        moe_status st = MOE_ERR_CANCELLED;
        if (ctx->backup_slot >= 0) {
            ctx->ops->begin_step(ctx->be);
            ctx->ops->state_restore(ctx->be, ctx->backup_slot);
            st = ctx->ops->end_step(ctx->be);
        }
        if (st) ctx->needs_repair = 1;
    }
    return set_error(MOE_ERR_CANCELLED, "moe_step: cancelled by the abort callback; the context is as before the step");
}
/* The next chunk of a step at position q with left tokens still to go: at most n_batch tokens, and
   with recurrent states ending at the next checkpoint position (*ck: its slot, else -1); marks
   where the chunk begins. ctx_run and moe_step_batch cut steps the same way. */
static int32_t ctx_chunk(moe_ctx *ctx, int32_t q, int32_t left, int32_t *ck) {
    int32_t n = left < ctx->n_batch ? left : ctx->n_batch;
    *ck = -1;
    if (ctx->ckpt_every) { /* recurrent states: chunks also end at checkpoint positions */
        int32_t next = (q / ctx->ckpt_every + 1) * ctx->ckpt_every;
        if (q + n >= next) n = next - q, *ck = next / ctx->ckpt_every - 1;
        if (*ck >= ctx->n_ckpt) *ck = -1;
        memset(ctx->seg + q, 0, (size_t)n);
        ctx->seg[q] = 1;
    }
    return n;
}

/* after the forward pass of the chunk [q, q + n): the rings have moved on */
static void ctx_chunk_ran(moe_ctx *ctx, int32_t q, int32_t n, int32_t min_ring) {
    if (min_ring && q + n - min_ring > ctx->ring_lo) ctx->ring_lo = q + n - min_ring;
}

/* A step failed after its forward pass ran from p0 (pos unchanged): cache rows written past it
   are never read, but rings may have lost rows and recurrent states have moved on: recompute
   before the next use. */
static void ctx_step_failed(moe_ctx *ctx, int32_t p0) {
    if (!ctx_ring_ok(ctx, p0) || ctx->ckpt_every) ctx->needs_repair = 1;
    if (ctx->ckpt_every) ckpt_drop_after(ctx, p0);
}

static moe_status ctx_run(moe_ctx *ctx, const moe_token *tokens, int32_t n_tokens, float *logits) {
    const moe_model *m = ctx->model;
    int32_t done = 0, p0 = ctx->pos, min_ring = ctx_min_ring(ctx);
    if (tokens != ctx->tokens + p0) memcpy(ctx->tokens + p0, tokens, (size_t)n_tokens * sizeof *tokens);
    while (done < n_tokens) {
        int32_t ck, n = ctx_chunk(ctx, p0 + done, n_tokens - done, &ck);
        int32_t n_out = !logits ? 0 : ctx->logits_all ? n : (done + n == n_tokens ? 1 : 0);
        if (ctx_abort_poll(ctx)) /* before a chunk: nothing of this one has run */
            return done ? ctx_cancelled(ctx, p0) : set_error(MOE_ERR_CANCELLED, "moe_step: cancelled by the abort callback before it began");
        ctx->ops->begin_step(ctx->be);
        if (!done && ctx->backup_slot >= 0) ctx->ops->state_checkpoint(ctx->be, ctx->backup_slot);
        m->arch->forward(ctx->be, ctx->ops, &m->w, tokens + done, n, p0 + done, n_out);
        if (ck >= 0) ctx->ops->state_checkpoint(ctx->be, ck);
        moe_status st = ctx->ops->end_step(ctx->be);
        ctx_chunk_ran(ctx, p0 + done, n, min_ring);
        if (st == MOE_ERR_CANCELLED) return ctx_cancelled(ctx, p0);
        if (st) {
            ctx_step_failed(ctx, p0);
            return st;
        }
        if (ck >= 0) ctx->ckpt_ok[ck] = 1;
        if (n_out) ctx->ops->read_logits(ctx->be, logits + (size_t)(ctx->logits_all ? done : 0) * (size_t)m->w.hp.n_vocab, n_out);
        done += n;
    }
    return MOE_OK;
}

/* ---- a step's checks and bookkeeping, shared by moe_step, moe_step_submit and moe_step_batch ---- */
/* tokens in the vocabulary and room for them (fn names the caller in the message) */
static moe_status step_check(const moe_ctx *ctx, const moe_token *tokens, int32_t n_tokens, const char *fn) {
    if (!ctx) return set_error(MOE_ERR_INVALID_ARG, "%s: ctx is NULL", fn);
    CTX_NOT_BUSY(ctx, fn, MOE_ERR_BUSY);
    if (!tokens || n_tokens <= 0) return set_error(MOE_ERR_INVALID_ARG, "%s: no tokens (tokens NULL or n_tokens %d)", fn, n_tokens);
    const moe_model *m = ctx->model;
    for (int32_t i = 0; i < n_tokens; i++)
        if (tokens[i] < 0 || tokens[i] >= m->w.hp.n_vocab)
            return set_error(MOE_ERR_INVALID_ARG, "%s: token %d at index %d is outside the vocabulary [0, %d)", fn,
                             tokens[i], i, m->w.hp.n_vocab);
    if (n_tokens > ctx->n_ctx - ctx->pos)
        return set_error(MOE_ERR_CONTEXT_FULL, "%s: %d tokens do not fit: context holds %d of %d", fn, n_tokens,
                         ctx->pos, ctx->n_ctx);
    return MOE_OK;
}

static int32_t step_rows(const moe_ctx *ctx, int32_t n_tokens) { return ctx->logits_all ? n_tokens : 1; }

/* The new rows of logits are read behind the current ones (kept until the step has succeeded, so
   that a failure leaves ctx as it was), then moved to the front: grows before anything changes
   and gives where the new rows go. */
static moe_status step_stage(moe_ctx *ctx, int32_t n_tokens, const char *fn, float **stage) {
    int32_t rows = step_rows(ctx, n_tokens), keep = ctx->n_logits;
    const size_t nv = (size_t)ctx->model->w.hp.n_vocab;
    if (keep + rows > ctx->logits_cap) {
        float *nl = moe_malloc(mul_or_zero((size_t)(keep + rows), nv) * sizeof(float));
        if (!nl) return set_error(MOE_ERR_NO_MEMORY, "%s: out of memory for %d rows of logits", fn, keep + rows);
        memcpy(nl, ctx->logits, (size_t)keep * nv * sizeof(float));
        moe_free(ctx->logits);
        ctx->logits = nl;
        ctx->logits_cap = keep + rows;
    }
    *stage = ctx->logits + (size_t)keep * nv;
    return MOE_OK;
}

/* an earlier failed step left rings without rows the next one needs: recompute them first */
static moe_status step_repair(moe_ctx *ctx) {
    if (!ctx->needs_repair) return MOE_OK;
    int32_t keep = ctx->n_logits, pos = ctx->pos;
    moe_status st = ctx_recompute(ctx, pos);
    if (st) ctx->pos = pos; /* still to be repaired: the next step tries again */
    else ctx->n_logits = keep; /* the host copy of the logits was never touched */
    return st;
}

/* No NaN/Inf may leave a step (weights are checked finite at load): refuse to hand them out */
static moe_status step_finite(moe_ctx *ctx, const float *stage, int32_t n_tokens, const char *fn) {
    size_t nv = (size_t)ctx->model->w.hp.n_vocab, all = (size_t)step_rows(ctx, n_tokens) * nv;
    for (size_t i = 0; i < all; i++)
        if (!isfinite(stage[i])) {
            size_t bad = 0;
            for (size_t j = i; j < all; j++) bad += !isfinite(stage[j]);
            ctx_step_failed(ctx, ctx->pos);
            return set_error(MOE_ERR_FORMAT, "%s: the forward pass gave %zu non-finite logit(s) of %zu (first: row %zu, token %zu, "
                             "%s): weights too large for f32, or a bug in moe (please report it); the context is unchanged",
                             fn, bad, all, i / nv, i % nv, isnan(stage[i]) ? "NaN" : "inf");
        }
    return MOE_OK;
}

/* the step took effect: its logits to the front, the position and the counters move on */
static void step_commit(moe_ctx *ctx, const float *stage, int32_t n_tokens, double dt) {
    const moe_model *m = ctx->model;
    int32_t rows = step_rows(ctx, n_tokens);
    if (stage != ctx->logits) memmove(ctx->logits, stage, (size_t)rows * (size_t)m->w.hp.n_vocab * sizeof(float));
    ctx->pos += n_tokens;
    ctx->n_logits = rows;
    /* resident experts: each token's top-k experts in each MoE layer are hits (a streaming
       backend counts its own hits and misses) */
    for (int l = 0; !m->xc && !(m->vk && moe_vk_streams_experts(m->vk)) && l < m->w.hp.n_layer; l++)
        if (m->w.layers[l].p.ffn_kind != MOE_FFN_DENSE) ctx->stats.expert_hits += (uint64_t)n_tokens * (uint64_t)m->w.layers[l].p.n_expert_used;
    if (n_tokens == 1) {
        ctx->stats.n_gen_tokens++;
        ctx->stats.t_gen_s += dt;
    } else {
        ctx->stats.n_prompt_tokens += (uint64_t)n_tokens;
        ctx->stats.t_prompt_s += dt;
    }
}

/* the step itself, after step_check and step_stage: on the caller's thread (moe_step) or the
   context's worker (moe_step_submit) */
static moe_status step_run(moe_ctx *ctx, const moe_token *tokens, int32_t n_tokens) {
    float *stage = ctx->logits + (size_t)ctx->n_logits * (size_t)ctx->model->w.hp.n_vocab;
    double t0 = now_s();
    moe_status st;
    if ((st = step_repair(ctx)) || (st = ctx_run(ctx, tokens, n_tokens, stage)) ||
        (st = step_finite(ctx, stage, n_tokens, "moe_step")))
        return st;
    step_commit(ctx, stage, n_tokens, now_s() - t0);
    return MOE_OK;
}

moe_status moe_step(moe_ctx *ctx, const moe_token *tokens, int32_t n_tokens) {
    moe_status st = step_check(ctx, tokens, n_tokens, "moe_step");
    float *stage;
    if (st || (st = step_stage(ctx, n_tokens, "moe_step", &stage))) return st;
    return step_run(ctx, tokens, n_tokens);
}


/* ---- asynchronous steps: one worker thread per context (moe.h, ASYNCHRONOUS STEPS) ----
   Per context rather than per model: a context is stepped by one thread at a time anyway, and its
   worker is then simply that thread, so contexts of one model still run concurrently. It sleeps
   on its condition variable between steps and costs nothing but its stack. The hand-over goes
   through mu: the worker owns the context from the post of a job until done is seen under mu. */
typedef struct ctx_worker {
    pthread_t th;
    pthread_mutex_t mu;
    pthread_cond_t cv;         /* a job was posted, a job is done, or quit */
    int has_job, done, quit;
    moe_token *tok;            /* the submitted tokens (the caller's buffer may go away) */
    int32_t n, cap;
    moe_status st;
    char err[512];             /* the worker's moe_last_error() of a failed step */
} ctx_worker;

static void *ctx_worker_main(void *arg) {
    moe_ctx *c = arg;
    ctx_worker *w = c->wk;
    pthread_mutex_lock(&w->mu);
    for (;;) {
        while (!w->has_job && !w->quit) pthread_cond_wait(&w->cv, &w->mu);
        if (!w->has_job) break; /* quit */
        pthread_mutex_unlock(&w->mu);
        moe_status st = step_run(c, w->tok, w->n);
        pthread_mutex_lock(&w->mu);
        w->st = st;
        if (st) snprintf(w->err, sizeof w->err, "%s", moe_last_error());
        w->has_job = 0;
        w->done = 1;
        pthread_cond_broadcast(&w->cv);
    }
    pthread_mutex_unlock(&w->mu);
    return NULL;
}

static moe_status ctx_worker_start(moe_ctx *ctx) {
    ctx_worker *w = moe_calloc(1, sizeof *w);
    if (!w) return set_error(MOE_ERR_NO_MEMORY, "moe_step_submit: out of memory");
    pthread_mutex_init(&w->mu, NULL);
    pthread_cond_init(&w->cv, NULL);
    ctx->wk = w;
    if (pthread_create(&w->th, NULL, ctx_worker_main, ctx) != 0) {
        pthread_mutex_destroy(&w->mu);
        pthread_cond_destroy(&w->cv);
        moe_free(w);
        ctx->wk = NULL;
        return set_error(MOE_ERR_NO_MEMORY, "moe_step_submit: cannot start the context's worker thread");
    }
    return MOE_OK;
}

static void ctx_worker_stop(moe_ctx *ctx) {
    ctx_worker *w = ctx->wk;
    atomic_store(&ctx->stop, 1); /* a step in flight stops at its next poll */
    pthread_mutex_lock(&w->mu);
    w->quit = 1;
    pthread_cond_broadcast(&w->cv);
    pthread_mutex_unlock(&w->mu);
    pthread_join(w->th, NULL);   /* the worker finishes its job first, then sees quit */
    pthread_mutex_destroy(&w->mu);
    pthread_cond_destroy(&w->cv);
    moe_free(w->tok);
    moe_free(w);
    ctx->wk = NULL;
}

moe_status moe_step_submit(moe_ctx *ctx, const moe_token *tokens, int32_t n_tokens) {
    moe_status st = step_check(ctx, tokens, n_tokens, "moe_step_submit");
    float *stage;
    if (st || (st = step_stage(ctx, n_tokens, "moe_step_submit", &stage))) return st;
    if (!ctx->wk && (st = ctx_worker_start(ctx))) return st;
    ctx_worker *w = ctx->wk;
    if (n_tokens > w->cap) { /* the worker is idle: its buffer is ours to grow */
        moe_token *nt = moe_malloc((size_t)n_tokens * sizeof *nt);
        if (!nt) return set_error(MOE_ERR_NO_MEMORY, "moe_step_submit: out of memory for %d tokens", n_tokens);
        moe_free(w->tok);
        w->tok = nt;
        w->cap = n_tokens;
    }
    memcpy(w->tok, tokens, (size_t)n_tokens * sizeof *tokens);
    pthread_mutex_lock(&w->mu);
    w->n = n_tokens;
    w->done = 0;
    w->has_job = 1;
    pthread_cond_broadcast(&w->cv);
    pthread_mutex_unlock(&w->mu);
    ctx->in_flight = 1;
    return MOE_OK;
}

moe_status moe_step_wait(moe_ctx *ctx, uint64_t timeout_ns) {
    if (!ctx) return set_error(MOE_ERR_INVALID_ARG, "moe_step_wait: ctx is NULL");
    if (!ctx->in_flight) return set_error(MOE_ERR_INVALID_ARG, "moe_step_wait: no step in flight (moe_step_submit first)");
    ctx_worker *w = ctx->wk;
    double t_end = now_s() + (double)timeout_ns * 1e-9;
    pthread_mutex_lock(&w->mu);
    while (!w->done && timeout_ns) {
        if (timeout_ns == UINT64_MAX) pthread_cond_wait(&w->cv, &w->mu);
        else {
            double left = t_end - now_s();
            if (left <= 0) break;
            cond_wait_ns(&w->cv, &w->mu, (uint64_t)(left * 1e9) + 1);
        }
    }
    int done = w->done;
    moe_status st = w->st;
    if (done && st) set_error(st, "%s", w->err);
    pthread_mutex_unlock(&w->mu);
    if (!done) return set_error(MOE_ERR_TIMEOUT, "moe_step_wait: the step is still running");
    ctx->in_flight = 0;
    return st;
}

moe_status moe_ctx_submit_times(moe_ctx *ctx, uint64_t *n_submits, double *max_us, double *total_us, int32_t reset) {
    if (!ctx) return set_error(MOE_ERR_INVALID_ARG, "moe_ctx_submit_times: ctx is NULL");
    CTX_NOT_BUSY(ctx, "moe_ctx_submit_times", MOE_ERR_BUSY);
    if (!ctx->ops->submit_times) return set_error(MOE_ERR_UNSUPPORTED, "moe_ctx_submit_times: the CPU backend has no queue submissions");
    return ctx->ops->submit_times(ctx->be, n_submits, max_us, total_us, reset != 0);
}

/* ---- moe_step_batch: n contexts of one model in one forward pass ---- */
#define BT_MIN_ROWS 512        /* rows of one pass at most (or the largest n_batch of the call) */
#define BT_LOGIT_ROWS 32       /* logits rows the lead computes at a time (lm_head chunks) */

/* The scratch context of a pass of up to rows rows, kept by owner for later calls. It runs no
   attention or recurrence of its own (the contexts do, on their caches), so its KV cache and
   attention scratch go; ACT_LOGITS holds BT_LOGIT_ROWS rows. */
static moe_status bt_scratch(moe_ctx *owner, int32_t rows) {
    if (owner->batch_cc && owner->batch_rows >= rows) return MOE_OK;
    const moe_model *m = owner->model;
    moe_ctx_shape shape = {rows, rows, MOE_KV_F16, 0, m->n_threads, m->cpu_exact, NULL, NULL, 0, 0, 0, 0, 0};
    void *be;
    moe_status st = cpu_ctx_new(&m->w, &shape, owner->cpu->pool, &be); /* the contexts' pool: a CPU pass */
    if (st) return st;
    cpu_ctx *cc = be;
    float *lg = moe_malloc((size_t)BT_LOGIT_ROWS * (size_t)m->w.hp.n_vocab * sizeof(float));
    if (!lg) {
        cpu_ctx_free(cc);
        return set_error(MOE_ERR_NO_MEMORY, "moe_step_batch: out of memory for the logits of a pass");
    }
    moe_free(cc->act[ACT_LOGITS]);
    cc->act[ACT_LOGITS] = lg;
    moe_free(cc->k_cache), moe_free(cc->v_cache), moe_free(cc->att_buf), moe_free(cc->st), moe_free(cc->ckpt);
    cc->k_cache = cc->v_cache = NULL, cc->att_buf = cc->st = cc->ckpt = NULL;
    cpu_ctx_free(owner->batch_cc);
    owner->batch_cc = cc;
    owner->batch_rows = rows;
    return MOE_OK;
}

/* per context of a batched step: where its logits go, how far it is */
typedef struct bt_item { float *stage; int32_t done, min_ring; } bt_item;

/* The next pass: each context's step is cut into the chunks ctx_run would make; a pass takes the
   next chunk of as many contexts as fit in its cap rows (decode: all of them in one), their tokens
   in tok. Returns its segments (0: every step is done), its rows and its logits rows. */
static int bt_plan(moe_ctx *const *ctxs, const moe_token *const *tokens, const int32_t *n_tokens, int32_t n_ctxs, const bt_item *it,
                   cpu_bseg *seg, moe_token *tok, int32_t cap, int32_t *first, int32_t *rows_out, int32_t *outs_out) {
    int n_seg = 0;
    int32_t rows = 0, outs = 0;
    size_t nv = (size_t)ctxs[0]->model->w.hp.n_vocab;
    while (*first < n_ctxs && it[*first].done == n_tokens[*first]) (*first)++;
    for (int32_t i = *first; i < n_ctxs; i++) {
        moe_ctx *c = ctxs[i];
        int32_t done = it[i].done, q = c->pos + done, k;
        if (done == n_tokens[i]) continue;
        int32_t n = ctx_chunk(c, q, n_tokens[i] - done, &k);
        if (rows + n > cap) break; /* the rest go in the next pass */
        cpu_bseg *s = &seg[n_seg++];
        s->cc = c->cpu, s->row0 = rows, s->n = n, s->pos0 = q;
        s->n_out = c->logits_all ? n : (done + n == n_tokens[i] ? 1 : 0);
        s->out0 = outs;
        s->dst = it[i].stage + (size_t)(c->logits_all ? done : 0) * nv;
        s->ctx_i = i, s->ck = k;
        memcpy(tok + rows, tokens[i] + done, (size_t)n * sizeof *tok);
        rows += n, outs += s->n_out;
    }
    *rows_out = rows, *outs_out = outs;
    return n_seg;
}

/* before a pass: any context's abort callback (or its moe_ctx_free) cancels the whole call */
static moe_status bt_abort_poll(moe_ctx *const *ctxs, int32_t n_ctxs) {
    for (int32_t i = 0; i < n_ctxs; i++)
        if (ctx_abort_poll(ctxs[i]))
            return set_error(MOE_ERR_CANCELLED, "moe_step_batch (context %d): cancelled by the abort callback; every context is as before the call", i);
    return MOE_OK;
}

/* The CPU pass: the lead's forward over the rows of all segments (bt_ops). */
static moe_status bt_run(moe_ctx *const *ctxs, const moe_token *const *tokens, const int32_t *n_tokens, int32_t n_ctxs,
                         bt_item *it, cpu_batch *bb, moe_token *tok, int32_t cap) {
    const moe_model *m = ctxs[0]->model;
    cpu_ctx *lead = ctxs[0]->batch_cc;
    const moe_hparams *hp = &m->w.hp;
    size_t E = (size_t)hp->n_embd;
    moe_ops ops = bt_ops();
    cpu_batch b = *bb;
    cpu_bseg *seg = b.seg;
    moe_status st = MOE_OK;
    b.logit_rows = BT_LOGIT_ROWS;
    lead->batch = &b;
    for (int32_t first = 0; !st;) {
        int32_t rows, outs;
        if (!(b.n_seg = bt_plan(ctxs, tokens, n_tokens, n_ctxs, it, seg, tok, cap, &first, &rows, &outs))) break;
        if ((st = bt_abort_poll(ctxs, n_ctxs))) break;
        cpu_begin_step(lead);
        for (int i = 0; i < b.n_seg; i++) cpu_begin_step(seg[i].cc);
        m->arch->forward(lead, &ops, &m->w, tok, rows, 0, 0); /* n_out 0: logits below */
        /* the rows that give logits, moved together (in order: never onto a row still to move) */
        for (int i = 0; i < b.n_seg; i++)
            if (seg[i].n_out)
                memmove(lead->act[ACT_XN] + (size_t)seg[i].out0 * E,
                        lead->act[ACT_XN] + (size_t)(seg[i].row0 + seg[i].n - seg[i].n_out) * E, (size_t)seg[i].n_out * E * sizeof(float));
        lm_head(lead, &ops, &m->w, outs, outs);
        st = cpu_end_step(lead);
        for (int i = 0; i < b.n_seg; i++) {
            const cpu_bseg *s = &seg[i];
            moe_ctx *c = ctxs[s->ctx_i];
            if (s->ck >= 0) cpu_state_checkpoint(s->cc, s->ck);
            if (!st) st = cpu_end_step(s->cc);
            ctx_chunk_ran(c, s->pos0, s->n, it[s->ctx_i].min_ring);
            if (!st && s->ck >= 0) c->ckpt_ok[s->ck] = 1;
            it[s->ctx_i].done += s->n;
        }
    }
    lead->batch = NULL;
    return st;
}

/* The Vulkan lead of a pass of up to rows rows and outs logits rows, kept by owner for later calls
   (moe_vk.c section 8): its activations hold the pass's rows, its logits (the LM head's output and
   the readback) only the rows the passes expose: a 64-context prefill of 512 rows keeps 64 rows
   of n_vocab floats, not 512. A new lead keeps the larger of the old and the new sizes, so that
   prefill and decode calls do not rebuild it in turn. Its KV cache and rope tables are never
   used (the contexts' own are): one position's worth. Its submissions go where owner's would
   (low_priority), split under owner's max_submit_us, and poll owner's abort callback between
   them. */
static moe_status bt_vk_scratch(moe_ctx *owner, int32_t rows, int32_t outs) {
    if (owner->batch_vk && owner->batch_vk_rows >= rows && owner->batch_vk_outs >= outs) return MOE_OK;
    if (owner->batch_vk) {
        if (owner->batch_vk_rows > rows) rows = owner->batch_vk_rows;
        if (owner->batch_vk_outs > outs) outs = owner->batch_vk_outs;
    }
    const moe_model *m = owner->model;
    moe_ctx_shape shape = {1, rows, MOE_KV_F16, 1, m->n_threads, m->cpu_exact, ctx_abort_poll, owner, 0,
                           owner->max_submit_us, owner->low_priority, outs, 1};
    void *be;
    moe_status st = moe_vk_ctx_new(m->vk, &shape, &be);
    if (st) return st;
    if (owner->batch_vk) moe_vk_ctx_free(owner->batch_vk);
    owner->batch_vk = be;
    owner->batch_vk_rows = rows;
    owner->batch_vk_outs = outs;
    return MOE_OK;
}

/* The Vulkan pass: one submission per pass (a decode call: one in all), recorded by the lead with
   moe_vk_batch_ops; the logits rows gathered in segment order go to the contexts' staged rows. */
static moe_status bt_vk_run(moe_ctx *const *ctxs, const moe_token *const *tokens, const int32_t *n_tokens, int32_t n_ctxs,
                            bt_item *it, cpu_bseg *seg, moe_vk_seg *vseg, moe_token *tok, int32_t cap) {
    const moe_model *m = ctxs[0]->model;
    void *lead = ctxs[0]->batch_vk;
    const moe_ops *o = &moe_vk_batch_ops;
    moe_status st = MOE_OK;
    for (int32_t first = 0; !st;) {
        int32_t rows, outs;
        int n_seg = bt_plan(ctxs, tokens, n_tokens, n_ctxs, it, seg, tok, cap, &first, &rows, &outs);
        if (!n_seg || (st = bt_abort_poll(ctxs, n_ctxs))) break;
        for (int i = 0; i < n_seg; i++)
            vseg[i] = (moe_vk_seg){ctxs[seg[i].ctx_i]->be, seg[i].row0, seg[i].n, seg[i].pos0, seg[i].n_out, seg[i].out0, seg[i].ck};
        if ((st = moe_vk_batch_begin(lead, vseg, n_seg))) break;
        o->begin_step(lead);
        m->arch->forward(lead, o, &m->w, tok, rows, 0, 0); /* n_out 0: logits below */
        moe_vk_batch_checkpoints(lead);
        moe_vk_batch_gather(lead);
        lm_head(lead, o, &m->w, outs, outs);
        st = o->end_step(lead);
        moe_vk_batch_end(lead);
        for (int i = 0; i < n_seg; i++) {
            const cpu_bseg *s = &seg[i];
            ctx_chunk_ran(ctxs[s->ctx_i], s->pos0, s->n, it[s->ctx_i].min_ring);
            if (!st && s->ck >= 0) ctxs[s->ctx_i]->ckpt_ok[s->ck] = 1;
            if (!st && s->n_out) moe_vk_batch_logits(lead, s->out0, s->n_out, s->dst);
            it[s->ctx_i].done += s->n;
        }
    }
    return st;
}

/* Where a context cannot join a pass (expert streaming, profiling, unaligned rows on Vulkan), the steps run one by
   one; should one fail, the ones before it are taken back (rewound, their logits and counters
   restored), so that every context is as it was. */
static moe_status bt_one_by_one(moe_ctx *const *ctxs, const moe_token *const *tokens, const int32_t *n_tokens, int32_t n_ctxs) {
    if (n_ctxs == 1) return moe_step(ctxs[0], tokens[0], n_tokens[0]);
    size_t nv = (size_t)ctxs[0]->model->w.hp.n_vocab, all = 0;
    for (int32_t i = 0; i < n_ctxs; i++) all += (size_t)ctxs[i]->n_logits * nv;
    typedef struct undo { int32_t pos, n_logits; moe_stats stats; float *logits; } undo;
    undo *u = moe_malloc((size_t)n_ctxs * sizeof *u);
    float *keep = moe_malloc((all ? all : 1) * sizeof(float));
    if (!u || !keep) {
        moe_free(u), moe_free(keep);
        return set_error(MOE_ERR_NO_MEMORY, "moe_step_batch: out of memory");
    }
    moe_status st = MOE_OK;
    float *at = keep;
    int32_t i;
    for (i = 0; i < n_ctxs; i++) {
        moe_ctx *c = ctxs[i];
        u[i] = (undo){c->pos, c->n_logits, c->stats, at};
        memcpy(at, c->logits, (size_t)c->n_logits * nv * sizeof(float));
        at += (size_t)c->n_logits * nv;
    }
    for (i = 0; i < n_ctxs && !st; i++) st = moe_step(ctxs[i], tokens[i], n_tokens[i]);
    if (st) {
        char msg[512];
        snprintf(msg, sizeof msg, "%s", moe_last_error());
        for (int32_t j = 0; j < i - 1; j++) { /* the one that failed is as it was */
            moe_ctx *c = ctxs[j];
            moe_ctx_rewind(c, u[j].pos); /* a failure here leaves needs_repair: recomputed on the next step */
            memcpy(c->logits, u[j].logits, (size_t)u[j].n_logits * nv * sizeof(float));
            c->n_logits = u[j].n_logits;
            c->stats = u[j].stats;
        }
        set_error(st, "moe_step_batch (context %d): %s", i - 1, msg);
    }
    moe_free(u), moe_free(keep);
    return st;
}

moe_status moe_step_batch(moe_ctx *const *ctxs, const moe_token *const *tokens, const int32_t *n_tokens, int32_t n_ctxs) {
    if (n_ctxs <= 0 || !ctxs || !tokens || !n_tokens)
        return set_error(MOE_ERR_INVALID_ARG, "moe_step_batch: n_ctxs is %d (must be > 0) or ctxs / tokens / n_tokens is NULL", n_ctxs);
    char fn[64];
    int batched = n_ctxs > 1;
    for (int32_t i = 0; i < n_ctxs; i++) {
        moe_ctx *c = ctxs[i];
        snprintf(fn, sizeof fn, "moe_step_batch (context %d)", i);
        moe_status st = step_check(c, tokens[i], n_tokens[i], fn);
        if (st) return st;
        if (c->model != ctxs[0]->model)
            return set_error(MOE_ERR_INVALID_ARG, "%s: belongs to another model than context 0 (one pass runs one model)", fn);
        for (int32_t j = 0; j < i; j++)
            if (ctxs[j] == c) return set_error(MOE_ERR_INVALID_ARG, "%s: is context %d again (each context may appear once)", fn, j);
        /* one pass needs the plain ops on every context (profiling times ops one context at a time) */
        batched = batched && (c->ops == &k_cpu_ops || c->ops == &moe_vk_ops) && !c->profiling;
    }
    const moe_model *m = ctxs[0]->model;
    if (!batched || m->xc || (m->vk && moe_vk_batch_unsupported(m->vk))) return bt_one_by_one(ctxs, tokens, n_tokens, n_ctxs);
    int32_t cap = BT_MIN_ROWS, total = 0, outs = 0;
    for (int32_t i = 0; i < n_ctxs; i++) {
        int32_t chunk = n_tokens[i] < ctxs[i]->n_batch ? n_tokens[i] : ctxs[i]->n_batch; /* its rows in one pass at most */
        if (ctxs[i]->n_batch > cap) cap = ctxs[i]->n_batch;
        total += chunk;
        outs += ctxs[i]->logits_all ? chunk : 1; /* the logits rows it exposes in one pass at most (bt_plan) */
    }
    if (total < cap) cap = total; /* decode of a few contexts: a small scratch */
    if (outs > cap) outs = cap;
    size_t nc = (size_t)n_ctxs;
    bt_item *it = moe_malloc(nc * sizeof *it);
    cpu_batch b = {moe_malloc(nc * sizeof(cpu_bseg)), 0, 0, moe_malloc(nc * BT_MAX_AIM * sizeof(float *)),
                   moe_malloc(nc * sizeof(attn_job)), moe_malloc(nc * sizeof(int64_t))};
    moe_token *tok = moe_malloc((size_t)cap * sizeof *tok);
    moe_vk_seg *vseg = m->vk ? moe_malloc(nc * sizeof *vseg) : NULL;
    moe_status st = it && b.seg && b.saved && b.jobs && b.task0 && tok && (vseg || !m->vk) ? MOE_OK : set_error(MOE_ERR_NO_MEMORY, "moe_step_batch: out of memory");
    for (int32_t i = 0; !st && i < n_ctxs; i++) {
        snprintf(fn, sizeof fn, "moe_step_batch (context %d)", i);
        st = step_stage(ctxs[i], n_tokens[i], fn, &it[i].stage);
        it[i].done = 0;
        it[i].min_ring = ctx_min_ring(ctxs[i]);
    }
    if (!st) st = m->vk ? bt_vk_scratch(ctxs[0], cap, outs) : bt_scratch(ctxs[0], cap);
    double t0 = now_s();
    for (int32_t i = 0; !st && i < n_ctxs; i++) st = step_repair(ctxs[i]);
    if (st) goto out;
    for (int32_t i = 0; i < n_ctxs; i++) /* the token history, as ctx_run keeps it */
        memcpy(ctxs[i]->tokens + ctxs[i]->pos, tokens[i], (size_t)n_tokens[i] * sizeof(moe_token));
    st = m->vk ? bt_vk_run(ctxs, tokens, n_tokens, n_ctxs, it, b.seg, vseg, tok, cap) : bt_run(ctxs, tokens, n_tokens, n_ctxs, it, &b, tok, cap);
    for (int32_t i = 0; !st && i < n_ctxs; i++) {
        snprintf(fn, sizeof fn, "moe_step_batch (context %d)", i);
        st = step_finite(ctxs[i], it[i].stage, n_tokens[i], fn);
    }
    if (st) { /* every context ran: none may move on */
        for (int32_t i = 0; i < n_ctxs; i++) ctx_step_failed(ctxs[i], ctxs[i]->pos);
        goto out;
    }
    double dt = now_s() - t0;
    for (int32_t i = 0; i < n_ctxs; i++) step_commit(ctxs[i], it[i].stage, n_tokens[i], dt);
out:
    moe_free(it), moe_free(b.seg), moe_free(b.saved), moe_free(b.jobs), moe_free(b.task0), moe_free(tok), moe_free(vseg);
    return st;
}

const float *moe_logits(const moe_ctx *ctx, int32_t i) {
    if (!ctx) return set_error(MOE_ERR_INVALID_ARG, "moe_logits: ctx is NULL"), NULL;
    CTX_NOT_BUSY(ctx, "moe_logits", NULL);
    if (ctx->n_logits == 0)
        return set_error(MOE_ERR_INVALID_ARG, "moe_logits: no logits yet (%s)",
                         ctx->pos ? "the context was rewound or loaded without them: step a token first"
                                  : "no step has run on this context"), NULL;
    if (i == -1) return ctx->logits + (size_t)(ctx->n_logits - 1) * (size_t)ctx->model->w.hp.n_vocab;
    if (i < 0 || !ctx->logits_all || i >= ctx->n_logits) {
        if (i >= 0 && !ctx->logits_all)
            set_error(MOE_ERR_INVALID_ARG, "moe_logits: row %d needs a context made with logits_all = 1 (use -1 for the last token)", i);
        else
            set_error(MOE_ERR_INVALID_ARG, "moe_logits: row %d is outside the last step's %d row(s) (or -1)", i, ctx->n_logits);
        return NULL;
    }
    return ctx->logits + (size_t)i * (size_t)ctx->model->w.hp.n_vocab;
}

int32_t moe_ctx_pos(const moe_ctx *ctx) {
    if (!ctx) return set_error(MOE_ERR_INVALID_ARG, "moe_ctx_pos: ctx is NULL"), 0;
    CTX_NOT_BUSY(ctx, "moe_ctx_pos", MOE_ERR_BUSY);
    return ctx->pos;
}

moe_status moe_ctx_rewind(moe_ctx *ctx, int32_t pos) {
    if (!ctx) return set_error(MOE_ERR_INVALID_ARG, "moe_ctx_rewind: ctx is NULL");
    CTX_NOT_BUSY(ctx, "moe_ctx_rewind", MOE_ERR_BUSY);
    if (pos < 0 || pos > ctx->pos)
        return set_error(MOE_ERR_INVALID_ARG, "moe_ctx_rewind: position %d is outside [0, %d]", pos, ctx->pos);
    if (pos < ctx->pos) ctx->n_logits = 0; /* the logits belonged to a token that is gone */
    int back = pos < ctx->pos;
    ctx->pos = pos;
    if (ctx->needs_repair || !ctx_ring_ok(ctx, pos) || (ctx->ckpt_every && back)) return ctx_recompute(ctx, pos);
    return MOE_OK;
}

moe_status moe_ctx_profile(moe_ctx *ctx, int32_t on) {
    if (!ctx) return set_error(MOE_ERR_INVALID_ARG, "moe_ctx_profile: NULL context");
    CTX_NOT_BUSY(ctx, "moe_ctx_profile", MOE_ERR_BUSY);
    if (!ctx->ops->profile) return set_error(MOE_ERR_UNSUPPORTED, "moe_ctx_profile: this backend cannot profile");
    moe_status st = ctx->ops->profile(ctx->be, on != 0);
    if (!st && ctx->cpu) ctx->ops = on ? &k_cpu_prof_ops : &k_cpu_ops;
    if (!st) ctx->profiling = on != 0;
    return st;
}

int32_t moe_ctx_profile_get(const moe_ctx *ctx, moe_profile_entry *out, int32_t cap) {
    if (!ctx || (cap > 0 && !out)) return set_error(MOE_ERR_INVALID_ARG, "moe_ctx_profile_get: NULL argument"), 0;
    CTX_NOT_BUSY(ctx, "moe_ctx_profile_get", MOE_ERR_BUSY);
    return ctx->ops->profile_get ? ctx->ops->profile_get(ctx->be, out, cap < 0 ? 0 : cap) : 0;
}

moe_status moe_ctx_probe_bandwidth(moe_ctx *ctx, double *read_gbs, double *copy_gbs) {
    if (!ctx) return set_error(MOE_ERR_INVALID_ARG, "moe_ctx_probe_bandwidth: NULL context");
    CTX_NOT_BUSY(ctx, "moe_ctx_probe_bandwidth", MOE_ERR_BUSY);
    if (!ctx->ops->probe) return set_error(MOE_ERR_UNSUPPORTED, "moe_ctx_probe_bandwidth: not on this backend");
    return ctx->ops->probe(ctx->be, read_gbs, copy_gbs);
}

moe_status moe_ctx_get_stats(const moe_ctx *ctx, moe_stats *out) {
    if (!ctx || !out) return set_error(MOE_ERR_INVALID_ARG, "moe_ctx_get_stats: NULL argument");
    CTX_NOT_BUSY(ctx, "moe_ctx_get_stats", MOE_ERR_BUSY);
    *out = ctx->stats;
    out->host_bytes += (uint64_t)ctx->logits_cap * (uint64_t)ctx->model->w.hp.n_vocab * sizeof(float) +
                       (uint64_t)ctx->n_ctx * sizeof(moe_token);
    if (ctx->ops->stats) ctx->ops->stats(ctx->be, out);
    if (ctx->batch_vk) { /* the lead of moe_step_batch's passes that ctx keeps: its buffers (its KV cache too) are scratch */
        moe_stats lead = {0};
        moe_vk_ops.stats(ctx->batch_vk, &lead);
        out->gpu_bytes_scratch += lead.gpu_bytes_kv + lead.gpu_bytes_scratch;
    }
    return MOE_OK;
}

/* ---- save / load: a versioned header, the logits of the last step, the token history, then the
   cache rows in use (a ring: the positions it holds) ---- */
#define MOE_STATE_MAGIC 0x5453454du /* "MEST" */
#define MOE_STATE_VERSION 4u /* 2: the model fingerprint covers the tensor table and data samples; 3: token history, rings;
                                4: recurrent states and chunk starts (hybrid models) after the caches */
typedef struct state_header {
    uint32_t magic, version;
    int32_t n_layer, n_head_kv, head_dim, n_vocab, n_ctx, kv_type, pos, n_logits;
    int32_t n_batch, ring_lo;  /* rings: their size follows n_batch; positions they still hold */
    uint64_t model_fingerprint, payload_bytes, checksum;
} state_header;

uint64_t moe_fnv1a(uint64_t h, const void *data, size_t n) {
    const uint8_t *p = data;
    for (size_t i = 0; i < n; i++) h = (h ^ p[i]) * 0x100000001b3ull;
    return h;
}

/* The model's identity, for states: the tensor table (names, types, shapes) and the first and last
   64 bytes of every tensor, so two models of one shape (a base and its fine-tune) differ. O(tensors),
   independent of how layers bind their weights. */
static uint64_t model_fingerprint(const moe_model *m) {
    const gguf_file *g = &m->gguf;
    uint64_t h = moe_fnv1a(0xcbf29ce484222325ull, &g->n_tensors, sizeof g->n_tensors);
    int32_t nv = m->w.hp.n_vocab;
    h = moe_fnv1a(h, &nv, sizeof nv);
    for (int64_t i = 0; i < g->n_tensors; i++) {
        const gguf_tensor *t = &g->tensors[i];
        h = moe_fnv1a(h, t->name.p, (size_t)t->name.n);
        h = moe_fnv1a(h, &t->type, sizeof t->type);
        h = moe_fnv1a(h, t->ne, sizeof t->ne);
        const uint8_t *first = t->expert_ptrs ? t->expert_ptrs[0] : t->data;
        const uint8_t *last = t->expert_ptrs ? t->expert_ptrs[t->ne[2] - 1] : t->data;
        uint64_t slab = t->expert_ptrs ? t->nbytes / (uint64_t)t->ne[2] : t->nbytes, n = slab < 64 ? slab : 64;
        if (first) h = moe_fnv1a(h, first, (size_t)n);
        if (last) h = moe_fnv1a(h, last + slab - n, (size_t)n);
    }
    return h;
}

/* the KV payload: per cache, K then V rows of the positions it holds (ops.kv_save) */
static size_t state_kv_bytes(const moe_ctx *c) {
    const moe_weights *w = &c->model->w;
    size_t total = 0, es = c->kv_type == MOE_KV_F16 ? 2 : 4;
    for (int i = 0; i < w->hp.n_cache; i++) {
        int32_t rows = moe_cache_rows(&w->caches[i], c->n_ctx, c->n_batch);
        total += 2 * (size_t)(c->pos < rows ? c->pos : rows) * (size_t)w->caches[i].kv_width * es;
    }
    return total;
}

/* recurrent states (hybrid models), after the caches: every state's f32 elements (ops.state_save),
   then the chunk starts (1 byte per position) */
static size_t state_rec_elems(const moe_ctx *c) {
    const moe_weights *w = &c->model->w;
    size_t n = 0;
    for (int i = 0; i < w->hp.n_state; i++) n += (size_t)w->states[i].conv_elems + (size_t)w->states[i].rec_elems;
    return n;
}

static size_t state_rec_bytes(const moe_ctx *c) {
    return c->ckpt_every ? state_rec_elems(c) * sizeof(float) + (size_t)c->pos : 0;
}

static size_t state_size(const moe_ctx *c) {
    return sizeof(state_header) + (size_t)c->n_logits * (size_t)c->model->w.hp.n_vocab * sizeof(float) +
           (size_t)c->pos * sizeof(moe_token) + state_kv_bytes(c) + state_rec_bytes(c);
}

moe_status moe_ctx_save(const moe_ctx *ctx, void *buf, size_t cap, size_t *size_out) {
    if (!ctx) return set_error(MOE_ERR_INVALID_ARG, "moe_ctx_save: ctx is NULL");
    CTX_NOT_BUSY(ctx, "moe_ctx_save", MOE_ERR_BUSY);
    size_t need = state_size(ctx);
    if (size_out) *size_out = need;
    if (!buf) return MOE_OK;
    if (cap < need) return set_error(MOE_ERR_BUFFER_TOO_SMALL, "moe_ctx_save: needs %zu bytes, buffer has %zu", need, cap);
    if (ctx->needs_repair)
        return set_error(MOE_ERR_DEVICE, "moe_ctx_save: a failed step left the context to be recomputed; step or rewind first");
    const moe_hparams *hp = &ctx->model->w.hp;
    uint8_t *p = (uint8_t *)buf + sizeof(state_header);
    size_t lb = (size_t)ctx->n_logits * (size_t)hp->n_vocab * sizeof(float);
    memcpy(p, ctx->logits, lb);
    p += lb;
    memcpy(p, ctx->tokens, (size_t)ctx->pos * sizeof(moe_token));
    p += (size_t)ctx->pos * sizeof(moe_token);
    moe_status st = ctx->ops->kv_save(ctx->be, p, ctx->pos);
    if (st) return st;
    if (ctx->ckpt_every) { /* the live recurrent states and the chunk starts; not the checkpoints */
        p += state_kv_bytes(ctx);
        if ((st = ctx->ops->state_save(ctx->be, (float *)(void *)p))) return st;
        p += state_rec_elems(ctx) * sizeof(float);
        memcpy(p, ctx->seg, (size_t)ctx->pos);
    }
    state_header h = {MOE_STATE_MAGIC, MOE_STATE_VERSION, hp->n_layer, hp->n_head_kv, hp->head_dim, hp->n_vocab, ctx->n_ctx,
                      ctx->kv_type, ctx->pos, ctx->n_logits, ctx->n_batch, ctx->ring_lo, model_fingerprint(ctx->model), need - sizeof h, 0};
    h.checksum = moe_fnv1a(0xcbf29ce484222325ull, (const uint8_t *)buf + sizeof h, need - sizeof h);
    memcpy(buf, &h, sizeof h);
    return MOE_OK;
}

static int64_t first_nonfinite_elem(const uint8_t *p, uint64_t n, int32_t type); /* with the load checks, section 10 */

/* What is cheap to check in a state's payload (logits, the token history, then per cache the K
   rows and the V rows of the positions it holds, kv_width elements of the cache type each): every
   value finite, every token in the vocabulary. Walks the same layout as state_kv_bytes. */
static moe_status state_payload_check(const moe_ctx *ctx, const uint8_t *p, int32_t n_logits, int32_t pos) {
    const moe_weights *w = &ctx->model->w;
    int32_t n_vocab = w->hp.n_vocab;
    int64_t at = first_nonfinite_elem(p, (uint64_t)n_logits * (uint64_t)n_vocab, MOE_TYPE_F32);
    if (at >= 0)
        return set_error(MOE_ERR_FORMAT, "moe_ctx_load: the state's logits hold a non-finite value (row %lld, token %lld); refused",
                         (long long)(at / n_vocab), (long long)(at % n_vocab));
    p += (size_t)n_logits * (size_t)n_vocab * sizeof(float);
    for (int32_t i = 0; i < pos; i++, p += sizeof(moe_token)) {
        moe_token t;
        memcpy(&t, p, sizeof t);
        if (t < 0 || t >= n_vocab) return set_error(MOE_ERR_FORMAT, "moe_ctx_load: token %d at position %d is outside the vocabulary; refused", t, i);
    }
    int32_t et = ctx->kv_type == MOE_KV_F16 ? MOE_TYPE_F16 : MOE_TYPE_F32;
    for (int c = 0; c < w->hp.n_cache; c++) {
        int32_t rows = moe_cache_rows(&w->caches[c], ctx->n_ctx, ctx->n_batch), held = pos < rows ? pos : rows;
        size_t row_elems = (size_t)w->caches[c].kv_width, row_bytes = row_elems * (ctx->kv_type == MOE_KV_F16 ? 2 : 4);
        for (int kv = 0; kv < 2; kv++)
            for (int32_t r = 0; r < held; r++, p += row_bytes)
                if ((at = first_nonfinite_elem(p, row_elems, et)) >= 0)
                    return set_error(MOE_ERR_FORMAT, "moe_ctx_load: the state's %s cache of layer %d holds a non-finite value "
                                     "(position %d, element %lld); refused", kv ? "V" : "K", w->caches[c].layer, pos - held + r, (long long)at);
    }
    if (ctx->ckpt_every) { /* recurrent states finite; chunk starts 0/1, the first position one */
        for (int i = 0; i < w->hp.n_state; i++) {
            size_t n = (size_t)w->states[i].conv_elems + (size_t)w->states[i].rec_elems;
            if ((at = first_nonfinite_elem(p, n, MOE_TYPE_F32)) >= 0)
                return set_error(MOE_ERR_FORMAT, "moe_ctx_load: the state's recurrent state of layer %d holds a non-finite value "
                                 "(element %lld); refused", w->states[i].layer, (long long)at);
            p += n * sizeof(float);
        }
        for (int32_t i = 0; i < pos; i++)
            if (p[i] > 1 || (i == 0 && p[i] != 1))
                return set_error(MOE_ERR_FORMAT, "moe_ctx_load: chunk start %d at position %d is not %s; refused", p[i], i, i ? "0 or 1" : "1");
    }
    return MOE_OK;
}

moe_status moe_ctx_load(moe_ctx *ctx, const void *buf, size_t size) {
    if (!ctx || !buf) return set_error(MOE_ERR_INVALID_ARG, "moe_ctx_load: NULL argument");
    CTX_NOT_BUSY(ctx, "moe_ctx_load", MOE_ERR_BUSY);
    const moe_hparams *hp = &ctx->model->w.hp;
    state_header h;
    if (size < sizeof h) return set_error(MOE_ERR_FORMAT, "moe_ctx_load: %zu bytes is too small for a context state", size);
    memcpy(&h, buf, sizeof h);
    if (h.magic != MOE_STATE_MAGIC) return set_error(MOE_ERR_FORMAT, "moe_ctx_load: not a moe context state (bad magic)");
    if (h.version != MOE_STATE_VERSION)
        return set_error(MOE_ERR_FORMAT, "moe_ctx_load: state format version %u, this build reads version %u", h.version, MOE_STATE_VERSION);
    if (h.model_fingerprint != model_fingerprint(ctx->model) || h.n_layer != hp->n_layer || h.n_head_kv != hp->n_head_kv ||
        h.head_dim != hp->head_dim || h.n_vocab != hp->n_vocab)
        return set_error(MOE_ERR_INVALID_ARG, "moe_ctx_load: the state was saved from a different model");
    if (h.n_ctx != ctx->n_ctx || h.kv_type != ctx->kv_type)
        return set_error(MOE_ERR_INVALID_ARG, "moe_ctx_load: the state was saved from a context with n_ctx %d / kv_type %d, this one has %d / %d",
                         h.n_ctx, h.kv_type, ctx->n_ctx, ctx->kv_type);
    if (ctx_min_ring(ctx) && h.n_batch != ctx->n_batch)
        return set_error(MOE_ERR_INVALID_ARG, "moe_ctx_load: the state was saved from a context with n_batch %d, this one has %d "
                         "(sliding-window caches are sized by it)", h.n_batch, ctx->n_batch);
    if (h.pos < 0 || h.pos > ctx->n_ctx)
        return set_error(MOE_ERR_FORMAT, "moe_ctx_load: position %d is outside [0, %d] (corrupted state)", h.pos, ctx->n_ctx);
    if (h.n_logits < 0 || h.n_logits > h.pos || (h.n_logits > 1 && !ctx->logits_all))
        return set_error(MOE_ERR_FORMAT, "moe_ctx_load: %d logit rows for %d positions%s (corrupted state)", h.n_logits, h.pos,
                         ctx->logits_all ? "" : " in a context without logits_all");
    if (h.ring_lo < 0 || h.ring_lo > h.pos)
        return set_error(MOE_ERR_FORMAT, "moe_ctx_load: ring extent %d for %d positions (corrupted state)", h.ring_lo, h.pos);
    moe_ctx probe = *ctx;
    probe.pos = h.pos;
    probe.n_logits = h.n_logits;
    size_t need = state_size(&probe);
    if (size != need || h.payload_bytes != need - sizeof h)
        return set_error(MOE_ERR_FORMAT, "moe_ctx_load: state is %zu bytes, but position %d with %d logit row(s) needs %zu "
                         "(corrupted state)", size, h.pos, h.n_logits, need);
    if (moe_fnv1a(0xcbf29ce484222325ull, (const uint8_t *)buf + sizeof h, need - sizeof h) != h.checksum)
        return set_error(MOE_ERR_FORMAT, "moe_ctx_load: checksum mismatch (corrupted state)");
    const uint8_t *p = (const uint8_t *)buf + sizeof h;
    moe_status vst = state_payload_check(ctx, p, h.n_logits, h.pos);
    if (vst) return vst;
    size_t lb = (size_t)h.n_logits * (size_t)hp->n_vocab * sizeof(float), tb = (size_t)h.pos * sizeof(moe_token);
    float *nl = NULL; /* allocate first: after kv_load nothing may fail */
    if (h.n_logits > ctx->logits_cap) {
        nl = moe_malloc((size_t)h.n_logits * (size_t)hp->n_vocab * sizeof(float));
        if (!nl) return set_error(MOE_ERR_NO_MEMORY, "moe_ctx_load: out of memory");
    }
    moe_status st = ctx->ops->kv_load(ctx->be, p + lb + tb, h.pos);
    const uint8_t *r = p + lb + tb + state_kv_bytes(&probe);
    if (!st && ctx->ckpt_every) st = ctx->ops->state_load(ctx->be, (const float *)(const void *)r);
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
    memcpy(ctx->tokens, p + lb, tb);
    ctx->pos = h.pos;
    ctx->n_logits = h.n_logits;
    ctx->ring_lo = h.ring_lo;
    ctx->needs_repair = 0;
    if (ctx->ckpt_every) { /* checkpoints are not in a state (moe.h): rewinds replay from the start */
        memcpy(ctx->seg, r + state_rec_elems(ctx) * sizeof(float), (size_t)h.pos);
        memset(ctx->ckpt_ok, 0, (size_t)(ctx->n_ckpt ? ctx->n_ckpt : 1));
    }
    return MOE_OK;
}

/* ============================================================================================ */
/* 10. sampling                                                                                  */
/* ============================================================================================ */
/* moe_sample runs one fixed pipeline (documented in moe.h):

       penalties → top-k → temperature → top-p → min-p → draw

   Portability: the same seed and the same logits give the same token on every platform. The
   only floating-point work is a few correctly rounded IEEE operations per token (the penalties,
   then (logit - max) · 2^32·log2(e)/T), none of which a compiler may contract into an FMA with a
   different result. From there on everything is integer arithmetic: each candidate's weight is
   q = floor(2^44 · e^x) from a fixed-point exponential (smp_weight), so every sum is exact, its
   order does not matter, and top-p, min-p and the draw are exact integer decisions. Ties in the
   ranking are broken by token id, so the ranking is total.

   The RNG is xoshiro256** (Blackman & Vigna, 2018), its four state words filled by four
   successive outputs of splitmix64 started at `seed`. Every moe_sample call with temperature > 0
   consumes exactly one output r and uses its top 24 bits U = r >> 40 (u = U / 2^24 in [0, 1)).

   Cost: O(n_vocab) per call (top-k O(n log k), top-p an expected-linear selection, no sort).
   Scratch: one allocation sized for the largest n_vocab seen, grown when needed, never per call;
   the token history is a ring of repeat_last_n tokens allocated by moe_sampler_new. */

typedef struct smp_cand {
    float logit;     /* after penalties */
    int32_t id;
    uint64_t q;      /* weight floor(2^44 · e^((logit - max) / T)); the best token has 2^44 */
} smp_cand;

struct moe_sampler {
    moe_sampler_params p;     /* as given, validated */
    int32_t window;           /* effective repeat_last_n */
    moe_token *hist;          /* ring of the last `window` recorded tokens */
    int32_t hist_len, hist_pos;
    uint64_t rng[4];          /* xoshiro256** state */
    int32_t cap;              /* scratch capacity in tokens */
    smp_cand *cand, *tmp;     /* [cap] each */
    int32_t *counts;          /* [cap], all zero between calls */
};

/* ---- RNG ----------------------------------------------------------------------------------- */
static uint64_t smp_splitmix64(uint64_t *x) {
    uint64_t z = (*x += 0x9E3779B97F4A7C15u);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9u;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBu;
    return z ^ (z >> 31);
}

static uint64_t smp_rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }

static uint64_t smp_next(uint64_t s[4]) {
    uint64_t result = smp_rotl(s[1] * 5, 7) * 9;
    uint64_t t = s[1] << 17;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = smp_rotl(s[3], 45);
    return result;
}

static void smp_seed(moe_sampler *s) {
    uint64_t x = s->p.seed;
    for (int i = 0; i < 4; i++) s->rng[i] = smp_splitmix64(&x);
}

/* ---- a portable exponential ------------------------------------------------------------------
   smp_exp2_q44(yq) = floor(2^44 · 2^(yq / 2^32)) for yq <= 0 (0 once below 2^-45), with integers
   only, so every platform gets the same value; relative error below 1e-9 (plus floor's unit).
   yq = k·2^32 + f with k = floor(yq / 2^32) and f = i·2^28 + r; 2^(f/2^32) = 2^(i/16) ·
   e^(r·ln 2 / 2^32) in 32.32 fixed point: a table of 2^(i/16) rounded to nearest, and a
   degree-5 Taylor series (Horner, coefficients 1/n! rounded to 32 bits) for r·ln 2 < 0.0434;
   the result is then shifted by k + 12 (as (m << 12) >> -k). */
static const uint64_t smp_exp2_16th[16] = {   /* round(2^(i/16) · 2^32) */
    4294967296u, 4485121744u, 4683695048u, 4891059943u, 5107605667u, 5333738689u, 5569883475u, 5816483285u,
    6074001000u, 6342919999u, 6623745059u, 6917003306u, 7223245206u, 7543045592u, 7877004752u, 8225749546u};

#define SMP_ONE (1ull << 44)   /* the weight of 2^0 */

static uint64_t smp_exp2_q44(int64_t yq) {
    if (yq >= 0) return SMP_ONE;
    if (yq <= -46 * 4294967296ll) return 0;            /* 2^44 · 2^-46 < 1 */
    int64_t k = -(int64_t)(((uint64_t)(-yq) + 0xFFFFFFFFu) >> 32);    /* floor(yq / 2^32), -46..-1 */
    uint64_t f = (uint64_t)(yq - k * 4294967296ll);    /* [0, 2^32) */
    uint64_t t = ((f & 0x0FFFFFFFu) * 2977044472u) >> 32;   /* r·ln 2 < 0.0434, ln 2 ≈ 2977044472 / 2^32 */
    uint64_t h = 35791394u;                            /* Horner in 32.32: 1/120, 1/24, 1/6, 1/2, 1 */
    h = 178956971u + ((h * t) >> 32);
    h = 715827883u + ((h * t) >> 32);
    h = 2147483648u + ((h * t) >> 32);
    h = 4294967296u + ((h * t) >> 32);
    uint64_t em1 = (h * t) >> 32;                      /* e^(r ln 2) - 1; the t^6/720 term < 2^-36 */
    uint64_t base = smp_exp2_16th[f >> 28];
    uint64_t m = base + ((base * em1) >> 32);          /* 2^(f/2^32) · 2^32, in [2^32, 2^33) */
    return (m << 12) >> -k;                            /* 2^44 · 2^k · m / 2^32, m << 12 < 2^45 */
}

/* The weight of a logit: floor(2^44 · e^((logit - max) / T)) = smp_exp2_q44(yq) with
   yq = (int64_t)(((double)logit - (double)max) · kt), kt = 2^32 · log2(e) / T (in double, once per
   call), truncated toward zero; 0 far below the maximum (and for NaN), 2^44 at the maximum. */
static uint64_t smp_weight(float logit, float lmax, double kt) {
    if (logit == lmax) return SMP_ONE;
    double y = ((double)logit - (double)lmax) * kt;
    if (!(y > -46.0 * 4294967296.0)) return 0;
    return smp_exp2_q44((int64_t)y);
}

/* the ranking: higher logit first, then lower id */
static int smp_better(const smp_cand *a, const smp_cand *b) {
    return a->logit > b->logit || (a->logit == b->logit && a->id < b->id);
}

static int smp_cmp(const void *pa, const void *pb) {
    const smp_cand *a = pa, *b = pb;
    return smp_better(a, b) ? -1 : smp_better(b, a);
}

/* ---- lifecycle ------------------------------------------------------------------------------ */
moe_status moe_sampler_new(const moe_sampler_params *params, moe_sampler **out) {
    if (!out) return set_error(MOE_ERR_INVALID_ARG, "moe_sampler_new: out is NULL");
    *out = NULL;
    moe_sampler_params p;
    memset(&p, 0, sizeof p);
    if (params) p = *params;
    if (isnan(p.temperature)) return set_error(MOE_ERR_INVALID_ARG, "moe_sampler_new: temperature is NaN");
    if (p.top_k < 0) return set_error(MOE_ERR_INVALID_ARG, "moe_sampler_new: top_k %d < 0", p.top_k);
    if (!(p.top_p >= 0.0f && p.top_p <= 1.0f))
        return set_error(MOE_ERR_INVALID_ARG, "moe_sampler_new: top_p %g is not in [0, 1]", (double)p.top_p);
    if (!(p.min_p >= 0.0f && p.min_p <= 1.0f))
        return set_error(MOE_ERR_INVALID_ARG, "moe_sampler_new: min_p %g is not in [0, 1]", (double)p.min_p);
    if (!(p.repeat_penalty >= 0.0f) || !isfinite(p.repeat_penalty))
        return set_error(MOE_ERR_INVALID_ARG, "moe_sampler_new: repeat_penalty %g is negative or not finite",
                         (double)p.repeat_penalty);
    if (p.repeat_last_n < 0)
        return set_error(MOE_ERR_INVALID_ARG, "moe_sampler_new: repeat_last_n %d < 0", p.repeat_last_n);
    if (!isfinite(p.presence_penalty) || !isfinite(p.frequency_penalty))
        return set_error(MOE_ERR_INVALID_ARG, "moe_sampler_new: presence/frequency penalty is not finite");
    moe_sampler *s = moe_calloc(1, sizeof *s);
    if (!s) return set_error(MOE_ERR_NO_MEMORY, "moe_sampler_new: out of memory");
    s->p = p;
    const int32_t window = p.repeat_last_n ? p.repeat_last_n : 64;
    s->window = window;
    s->hist = moe_malloc((size_t)window * sizeof *s->hist);
    if (!s->hist) {
        moe_free(s);
        return set_error(MOE_ERR_NO_MEMORY, "moe_sampler_new: out of memory for a history of %d tokens", window);
    }
    smp_seed(s);
    *out = s;
    return MOE_OK;
}

void moe_sampler_free(moe_sampler *s) {
    if (!s) return;
    moe_free(s->hist);
    moe_free(s->cand);
    moe_free(s->tmp);
    moe_free(s->counts);
    moe_free(s);
}

void moe_sampler_accept(moe_sampler *s, moe_token token) {
    if (!s || token < 0) return;
    s->hist[s->hist_pos] = token;
    s->hist_pos = s->hist_pos + 1 == s->window ? 0 : s->hist_pos + 1;
    if (s->hist_len < s->window) s->hist_len++;
}

void moe_sampler_reset(moe_sampler *s) {
    if (!s) return;
    s->hist_len = s->hist_pos = 0;
    smp_seed(s);
}

/* Grows the scratch to n tokens; on failure the old buffers stay (still fine for smaller n). */
static int smp_reserve(moe_sampler *s, int32_t n) {
    if (n <= s->cap) return 1;
    smp_cand *c = moe_malloc((size_t)n * sizeof *c), *t = moe_malloc((size_t)n * sizeof *t);
    int32_t *k = moe_calloc((size_t)n, sizeof *k);
    if (!c || !t || !k) {
        moe_free(c);
        moe_free(t);
        moe_free(k);
        return 0;
    }
    moe_free(s->cand);
    moe_free(s->tmp);
    moe_free(s->counts);
    s->cand = c, s->tmp = t, s->counts = k, s->cap = n;
    return 1;
}

/* ---- the stages ----------------------------------------------------------------------------- */
/* Penalties (llama.cpp's semantics) in place on cand[0..n_vocab), which is in id order: for each
   distinct token seen c > 0 times in the history window,
       logit = logit > 0 ? logit / repeat_penalty : logit * repeat_penalty   (unless 0 or 1)
       logit = logit - (c · frequency_penalty + presence_penalty)
   c · frequency_penalty is exact in double, so an FMA contraction could not change the sum. */
static void smp_penalize(moe_sampler *s, smp_cand *cand, int32_t n_vocab) {
    const float rp = s->p.repeat_penalty;
    const int use_rp = rp != 0.0f && rp != 1.0f;
    const float fp = s->p.frequency_penalty, pp = s->p.presence_penalty;
    if (!use_rp && fp == 0.0f && pp == 0.0f) return;
    for (int32_t i = 0; i < s->hist_len; i++)
        if (s->hist[i] < n_vocab) s->counts[s->hist[i]]++;
    for (int32_t i = 0; i < s->hist_len; i++) {
        moe_token t = s->hist[i];
        if (t >= n_vocab || s->counts[t] == 0) continue;   /* seen already */
        float l = cand[t].logit;
        if (use_rp) l = l > 0.0f ? l / rp : l * rp;
        double sub = (double)s->counts[t] * (double)fp + (double)pp;
        cand[t].logit = (float)((double)l - sub);
        s->counts[t] = 0;
    }
}

/* The k-th best of c[0..n) (1 <= k < n) through a min-heap of the k best seen so far, its worst
   at the root; h is scratch for k entries. O(n log k). */
static smp_cand smp_kth_best(const smp_cand *c, int32_t n, int32_t k, smp_cand *h) {
    for (int32_t i = 0; i < n; i++) {
        int32_t j;
        if (i < k) {                               /* push, sifting up */
            for (j = i; j > 0 && smp_better(&h[(j - 1) / 2], &c[i]); j = (j - 1) / 2) h[j] = h[(j - 1) / 2];
            h[j] = c[i];
        } else if (smp_better(&c[i], &h[0])) {     /* replace the root, sifting down */
            for (j = 0;;) {
                int32_t a = 2 * j + 1, b = a + 1, w = j;
                const smp_cand *wv = &c[i];
                if (a < k && smp_better(wv, &h[a])) w = a, wv = &h[a];
                if (b < k && smp_better(wv, &h[b])) w = b;
                if (w == j) break;
                h[j] = h[w];
                j = w;
            }
            h[j] = c[i];
        }
    }
    return h[0];
}

/* The top-p cut: the candidate at which the running weight of c[0..n), taken in ranking order,
   first reaches `need` (need <= the total weight). The weights are integers, so prefix sums do
   not depend on summation order and no full sort is needed: candidates are binned by
   (lmax - logit) · 4 / T — monotone in the ranking, so each bin is a run of the ranking — the
   bin holding the cut is found from per-bin sums, and only that bin goes through a
   quickselect-style search (after 64 rounds, a sort). Expected O(n); the result is the one a
   full sort would give. */
static smp_cand smp_top_p_cut(const smp_cand *c, int32_t n, float lmax, float temperature, double need, smp_cand *t,
                              int max_rounds) {
    enum { NB = 64 };
    const float scale = 4.0f / temperature;
#define SMP_BIN(l) ((l) == lmax ? 0 : ((lmax - (l)) * scale < (float)(NB - 1) ? (int)((lmax - (l)) * scale) : NB - 1))
    uint64_t wsum[NB] = {0};
    for (int32_t i = 0; i < n; i++) wsum[SMP_BIN(c[i].logit)] += c[i].q;
    uint64_t above = 0;        /* weight of every candidate ranked before the ones searched */
    int bin = 0;
    while (bin < NB - 1 && !((double)(above + wsum[bin]) >= need)) above += wsum[bin++];
    int32_t lo = 0, hi = 0;    /* the cut lies in t[lo..hi) */
    for (int32_t i = 0; i < n; i++)
        if (SMP_BIN(c[i].logit) == bin) t[hi++] = c[i];
#undef SMP_BIN
    for (int rounds = 0; hi - lo > 1; rounds++) {
        if (rounds == max_rounds) {   /* a pathological order: sort what is left and walk it */
            qsort(t + lo, (size_t)(hi - lo), sizeof *t, smp_cmp);
            for (; lo < hi - 1; lo++) {
                if ((double)(above + t[lo].q) >= need) break;
                above += t[lo].q;
            }
            break;
        }
        int32_t mid = lo + (hi - lo) / 2, last = hi - 1, piv;
        /* median of three (by rank) as the pivot, moved to the end */
        const smp_cand *a = &t[lo], *b = &t[mid], *z = &t[last];
        if (smp_better(a, b)) piv = smp_better(b, z) ? mid : smp_better(a, z) ? last : lo;
        else piv = smp_better(a, z) ? lo : smp_better(b, z) ? last : mid;
        smp_cand tmp = t[piv]; t[piv] = t[last]; t[last] = tmp;
        const smp_cand pv = t[last];
        int32_t m = lo;            /* Lomuto: the better ones to t[lo..m) */
        uint64_t wb = 0;
        for (int32_t i = lo; i < last; i++)
            if (smp_better(&t[i], &pv)) {
                wb += t[i].q;
                tmp = t[i]; t[i] = t[m]; t[m] = tmp;
                m++;
            }
        t[last] = t[m];
        t[m] = pv;
        if ((double)(above + wb) >= need) hi = m;
        else if ((double)(above + wb + pv.q) >= need) return pv;
        else above += wb + pv.q, lo = m + 1;
    }
    return t[lo];
}

/* keeps the candidates ranked at or before cut, in id order; returns the new count */
static int32_t smp_keep_upto(smp_cand *c, int32_t n, const smp_cand *cut) {
    int32_t m = 0;
    for (int32_t i = 0; i < n; i++)
        if (!smp_better(cut, &c[i])) c[m++] = c[i];
    return m;
}

moe_token moe_sample(moe_sampler *s, const float *logits, int32_t n_vocab) {
    if (!s || !logits || n_vocab <= 0) {
        set_error(MOE_ERR_INVALID_ARG, "moe_sample: %s",
                  !s ? "sampler is NULL" : !logits ? "logits is NULL" : "n_vocab <= 0");
        return -1;
    }
    const int greedy = !(s->p.temperature > 0.0f);
    const int penalties = (s->p.repeat_penalty != 0.0f && s->p.repeat_penalty != 1.0f) ||
                          s->p.frequency_penalty != 0.0f || s->p.presence_penalty != 0.0f;
    moe_token pick = -1;

    if (greedy && !penalties) {                /* argmax, ties to the lowest id, no scratch */
        float best = -INFINITY;
        for (int32_t i = 0; i < n_vocab; i++)
            if (logits[i] > best) best = logits[i], pick = i;   /* NaN never compares greater */
        if (pick < 0) goto no_finite;
        moe_sampler_accept(s, pick);
        return pick;
    }
    if (!smp_reserve(s, n_vocab)) {
        set_error(MOE_ERR_NO_MEMORY, "moe_sample: out of memory for %d candidates", n_vocab);
        return -1;
    }
    smp_cand *c = s->cand;
    for (int32_t i = 0; i < n_vocab; i++) {
        c[i].logit = isnan(logits[i]) ? -INFINITY : logits[i];
        c[i].id = i;
    }
    smp_penalize(s, c, n_vocab);

    /* only finite or +inf logits are candidates; find the best */
    int32_t n = 0;
    float lmax = -INFINITY;
    for (int32_t i = 0; i < n_vocab; i++) {
        const float v = c[i].logit;
        if (!(v > -INFINITY)) continue;
        if (v > lmax) lmax = v, pick = i;
        c[n++] = c[i];
    }
    if (n == 0) goto no_finite;
    if (greedy) {
        moe_sampler_accept(s, pick);
        return pick;
    }

    /* top-k */
    if (s->p.top_k > 0 && s->p.top_k < n) {
        smp_cand kth = smp_kth_best(c, n, s->p.top_k, s->tmp);
        n = smp_keep_upto(c, n, &kth);
    }

    /* temperature: integer weights; every logit equal to the maximum (+inf included) gets the
       top weight one = 2^44, or less above 2^19 candidates so that sums stay below 2^63 */
    int qs = 0;
    while ((uint64_t)n > (1ull << (19 + qs))) qs++;   /* n · 2^(44 - qs) <= 2^63 */
    const uint64_t one = SMP_ONE >> qs;
    const double kt = 4294967296.0 * 1.4426950408889634 / (double)s->p.temperature;
    uint64_t total = 0;
    for (int32_t i = 0; i < n; i++) {
        c[i].q = smp_weight(c[i].logit, lmax, kt) >> qs;
        total += c[i].q;
    }

    /* top-p: the shortest prefix of the ranking whose weight reaches top_p · total */
    if (s->p.top_p > 0.0f && s->p.top_p < 1.0f && n > 1) {
        smp_cand cut = smp_top_p_cut(c, n, lmax, s->p.temperature, (double)s->p.top_p * (double)total, s->tmp, 64);
        n = smp_keep_upto(c, n, &cut);
    }

    /* min-p: weight >= min_p · one (the best token is still here, with weight one) */
    if (s->p.min_p > 0.0f && n > 1) {
        const double thr = (double)s->p.min_p * (double)one;
        int32_t m = 0;
        for (int32_t i = 0; i < n; i++)
            if ((double)c[i].q >= thr) c[m++] = c[i];
        n = m;
    }

    /* draw: target = floor(U · total / 2^24) < total; the first candidate in id order whose
       running weight exceeds it */
    total = 0;
    for (int32_t i = 0; i < n; i++) total += c[i].q;
    const uint64_t u = smp_next(s->rng) >> 40;
    pick = -1;
    const uint64_t target = u * (total >> 24) + ((u * (total & 0xFFFFFFu)) >> 24);
    uint64_t cum = 0;
    for (int32_t i = 0; i < n; i++) {
        cum += c[i].q;
        if (cum > target) {
            pick = c[i].id;
            break;
        }
    }
    moe_sampler_accept(s, pick);
    return pick;

no_finite:
    set_error(MOE_ERR_INVALID_ARG, "moe_sample: no finite logit (all %d are NaN or -inf after penalties)", n_vocab);
    return -1;
}

/* ============================================================================================ */
/* 11. public API glue                                                                           */
/* ============================================================================================ */
static void model_destroy(moe_model *model) {
    pool_free(model->pool); /* no context is left: nothing runs on it */
    pthread_mutex_destroy(&model->pool_mu);
    if (model->vk) moe_vk_free(model->vk);
    xs_free(model->xc);
    vocab_free(model->vocab);
    moe_free(model->w.layers);
    moe_free(model->w.caches);
    moe_free(model->w.states);
    for (int i = 0; i < model->n_hf_owned; i++) moe_free(model->hf_owned[i]);
    moe_free(model->hf_owned);
    moe_free(model->expert_tables);
    moe_free(model->owned);
    moe_free(model->rope_freqs);
    gguf_free(&model->gguf);
    file_unmap(&model->file);
    for (int i = 0; i < model->n_shards; i++) file_unmap(&model->shards[i]);
    moe_free(model->shards);
    moe_free(model->hf_names);
    moe_free(model->hf_expert_ptrs);
    moe_free(model);
}

/* drops one reference (the caller's, or a context's); the last one destroys the model */
static void model_release(moe_model *model) {
    if (atomic_fetch_sub(&model->refs, 1) == 1) model_destroy(model);
}

void moe_model_free(moe_model *model) {
    if (model) model_release(model);
}

static moe_status model_load_vocab_only(moe_model *m, const char *path, int hf); /* with the tokenizer API below */
static moe_status vocab_load_hf(const char *path, moe_vocab **out);

/* ---- load-time value checks: no weight may hold a NaN or an infinity ------------------------
   Generic over the tensor table (GGUF or a Hugging Face directory's), independent of how layers
   bind their tensors. F32/F16/BF16 tensors: every element. Block types: the fields that scale a
   block (one NaN scale makes every logit NaN): Q8_0 and Q4_0 d; Q4_K and Q5_K d and dmin; Q6_K d
   (its int8 sub-block scales are always finite); MXFP4 e8m0 exponents of 253 and up, whose codes
   can overflow to inf, are decoded and checked. One pass over the scale fields: cheap next to
   reading the file. */
typedef struct scale_fields { int32_t type; uint8_t n, off[2]; } scale_fields;
static const scale_fields k_scale_fields[] = {
    {MOE_TYPE_Q8_0, 1, {0, 0}}, {MOE_TYPE_Q4_0, 1, {0, 0}}, {MOE_TYPE_Q4_K, 2, {0, 2}},
    {MOE_TYPE_Q5_K, 2, {0, 2}}, {MOE_TYPE_Q6_K, 1, {208, 0}},
};

/* index of the first non-finite value in [0, n) or -1; elem: 2 (f16 / bf16) or 4 (f32) bytes */
static int64_t first_nonfinite_elem(const uint8_t *p, uint64_t n, int32_t type) {
    const uint64_t chunk = 4096;
    for (uint64_t i0 = 0; i0 < n; i0 += chunk) {
        uint64_t i1 = n - i0 < chunk ? n : i0 + chunk;
        int bad = 0;
        if (type == MOE_TYPE_F32) {
            for (uint64_t i = i0; i < i1; i++) {
                uint32_t x;
                memcpy(&x, p + 4 * i, 4);
                bad |= (x & 0x7f800000u) == 0x7f800000u;
            }
        } else {
            uint16_t mask = type == MOE_TYPE_F16 ? 0x7c00 : 0x7f80;
            for (uint64_t i = i0; i < i1; i++) bad |= (rd16(p + 2 * i) & mask) == mask;
        }
        if (!bad) continue;
        for (uint64_t i = i0; i < i1; i++) {
            float f;
            if (type == MOE_TYPE_F32) memcpy(&f, p + 4 * i, 4);
            else f = type == MOE_TYPE_F16 ? fp16_to_f32(rd16(p + 2 * i)) : bf16_to_f32(rd16(p + 2 * i));
            if (!isfinite(f)) return (int64_t)i;
        }
    }
    return -1;
}

/* index of the first block of slab p (n_blocks blocks) whose scale is not finite, or -1 */
static int64_t first_bad_block(const uint8_t *p, uint64_t n_blocks, int32_t type, const moe_type_traits *tt, float *bad_value) {
    const uint64_t bb = (uint64_t)tt->block_bytes;
    if (type == MOE_TYPE_MXFP4) {
        float v[QK_MXFP4];
        for (uint64_t b = 0; b < n_blocks; b++)
            if (p[b * bb] >= 253) {
                dequant_mxfp4(p + b * bb, v, QK_MXFP4);
                for (int j = 0; j < QK_MXFP4; j++)
                    if (!isfinite(v[j])) return *bad_value = v[j], (int64_t)b;
            }
        return -1;
    }
    for (size_t k = 0; k < sizeof k_scale_fields / sizeof k_scale_fields[0]; k++) {
        const scale_fields *sf = &k_scale_fields[k];
        if (sf->type != type) continue;
        for (uint64_t b = 0; b < n_blocks; b++) {
            int bad = 0;
            for (int f = 0; f < sf->n; f++) bad |= (rd16(p + b * bb + sf->off[f]) & 0x7c00) == 0x7c00;
            if (bad) {
                for (int f = 0; f < sf->n; f++) {
                    float d = fp16_to_f32(rd16(p + b * bb + sf->off[f]));
                    if (!isfinite(d)) *bad_value = d;
                }
                return (int64_t)b;
            }
        }
    }
    return -1;
}

/* 1 when a slab of n bytes of the given type holds a non-finite value (or block scale) */
static int slab_values_bad(const uint8_t *p, uint64_t n, int32_t type) {
    const moe_type_traits *tt = type_traits(type);
    if (!tt) return 0;
    float v = 0;
    if (type == MOE_TYPE_F32 || type == MOE_TYPE_F16 || type == MOE_TYPE_BF16)
        return first_nonfinite_elem(p, n / (uint64_t)tt->block_bytes, type) >= 0;
    return first_bad_block(p, n / (uint64_t)tt->block_bytes, type, tt, &v) >= 0;
}

/* which: CHECK_ALL, or CHECK_NOT_EXPERTS / CHECK_EXPERTS (3-D tensors) to check the routed experts
   apart: a streamed model checks each expert as the host tier reads it (xs_read_slab) instead of
   reading the whole file at load */
enum { CHECK_ALL, CHECK_NOT_EXPERTS, CHECK_EXPERTS };
static moe_status check_tensor_values(const gguf_file *g, int which) {
    for (int64_t i = 0; i < g->n_tensors; i++) {
        const gguf_tensor *t = &g->tensors[i];
        const moe_type_traits *tt = type_traits(t->type);
        if (!tt || (!t->data && !t->expert_ptrs)) continue;
        int expert = t->expert_ptrs || t->ne[2] > 1;
        if ((which == CHECK_NOT_EXPERTS && expert) || (which == CHECK_EXPERTS && !expert)) continue;
        /* a tensor assembled from per-expert slabs is checked slab by slab */
        uint64_t n_slabs = t->expert_ptrs ? (uint64_t)t->ne[2] : 1, slab_bytes = t->nbytes / n_slabs;
        uint64_t row_bytes = type_row_bytes(t->type, t->ne[0]);
        for (uint64_t e = 0; e < n_slabs; e++) {
            const uint8_t *p = t->expert_ptrs ? t->expert_ptrs[e] : t->data;
            int dense = t->type == MOE_TYPE_F32 || t->type == MOE_TYPE_F16 || t->type == MOE_TYPE_BF16;
            if (dense) {
                uint64_t n = slab_bytes / (uint64_t)tt->block_bytes;
                int64_t at = first_nonfinite_elem(p, n, t->type);
                if (at >= 0) {
                    uint64_t idx = e * n + (uint64_t)at;
                    return set_error(MOE_ERR_FORMAT, "model: tensor '%.*s' holds a non-finite value at element %llu (row %llu)",
                                     (int)t->name.n, t->name.p, (unsigned long long)idx,
                                     (unsigned long long)(idx / (uint64_t)t->ne[0]));
                }
            } else {
                uint64_t n_blocks = slab_bytes / (uint64_t)tt->block_bytes;
                float v = NAN;
                int64_t at = first_bad_block(p, n_blocks, t->type, tt, &v);
                if (at >= 0) {
                    uint64_t blk = e * n_blocks + (uint64_t)at;
                    return set_error(MOE_ERR_FORMAT, "model: tensor '%.*s' (%s): block %llu (row %llu) has a non-finite scale (%s)",
                                     (int)t->name.n, t->name.p, tt->name, (unsigned long long)blk,
                                     (unsigned long long)(blk * (uint64_t)tt->block_bytes / row_bytes),
                                     isnan(v) ? "NaN" : v > 0 ? "+inf" : "-inf");
                }
            }
        }
    }
    return MOE_OK;
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
    if (p.vk && (p.backend == MOE_BACKEND_CPU || !p.vk->instance || !p.vk->physical_device || !p.vk->device || !p.vk->queue))
        return set_error(MOE_ERR_INVALID_ARG, "moe_load: moe_load_params.vk %s",
                         p.backend == MOE_BACKEND_CPU ? "is for the Vulkan backend, but MOE_BACKEND_CPU was asked for"
                                                      : "needs instance, physical_device, device and queue (one is NULL)");
    if (!p.vk_pipeline_cache_data != !p.vk_pipeline_cache_size)
        return set_error(MOE_ERR_INVALID_ARG, "moe_load: vk_pipeline_cache_data and vk_pipeline_cache_size go together");
    double t0 = now_s();
    moe_model *m = moe_calloc(1, sizeof *m);
    if (!m) return set_error(MOE_ERR_NO_MEMORY, "moe_load: out of memory");
    atomic_init(&m->refs, 1); /* the caller's */
    pthread_mutex_init(&m->pool_mu, NULL);
    m->file.fd = -1;
    m->log.fn = p.log;
    m->log.user = p.user;
    m->n_threads = p.n_threads ? p.n_threads : cpu_count();
    m->cpu_exact = p.cpu_exact != 0;
    m->bos = m->eos = -1;
    moe_status st;
    struct stat sb;
    {   /* tokenizer only: vocab_only, or a path to a tokenizer.json */
        size_t pl = strlen(path);
        int is_dir = stat(path, &sb) == 0 && S_ISDIR(sb.st_mode), is_json = pl >= 5 && !strcmp(path + pl - 5, ".json");
        if (p.vocab_only || is_json) {
            if ((st = model_load_vocab_only(m, path, is_dir || is_json))) goto fail;
            m->backend = MOE_BACKEND_CPU;
            m->t_load_s = now_s() - t0;
            *out = m;
            return MOE_OK;
        }
    }
    if (report_progress(&p, 0.0f)) goto cancelled;
    if (stat(path, &sb) == 0 && S_ISDIR(sb.st_mode)) { /* a Hugging Face model directory */
        size_t pl = strlen(path);
        char *tj = moe_malloc(pl + 32);
        if (!tj) { st = set_error(MOE_ERR_NO_MEMORY, "moe_load: out of memory"); goto fail; }
        snprintf(tj, pl + 32, "%s/config.json", path);
        int has_config = access(tj, R_OK) == 0;
        snprintf(tj, pl + 32, "%s/tokenizer.json", path);
        int has_tokenizer = access(tj, R_OK) == 0;
        moe_free(tj);
        if (!has_config) {
            st = set_error(MOE_ERR_UNSUPPORTED, "moe_load: directory '%s' has no config.json (not a Hugging Face model directory)", path);
            goto fail;
        }
        if ((st = hf_load_dir(m, path))) goto fail;
        if ((st = bind_tensors(m))) goto fail;
        if (report_progress(&p, 0.5f)) goto cancelled;
        if (has_tokenizer && (st = vocab_load_hf(path, &m->vocab))) goto fail;
        if (m->vocab) m->bos = m->vocab->bos, m->eos = m->vocab->eos;
    } else {
        /* keep the file resident unless a host budget below its size asks for on-demand reads */
        if ((st = file_map(&m->file, path, p.host_budget_bytes == 0))) goto fail;
        if ((st = gguf_parse(&m->gguf, m->file.data, m->file.size))) goto fail;
        if ((st = load_hparams(m))) goto fail;
        if ((st = bind_tensors(m))) goto fail;
        if (report_progress(&p, 0.5f)) goto cancelled;
        if ((st = vocab_load_gguf(&m->gguf, &m->vocab))) goto fail;
    }
    if ((st = check_tensor_values(&m->gguf, CHECK_NOT_EXPERTS))) goto fail;
    if (m->gguf.kv) {
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
        /* both budgets below the weights: the GPU slot cache over the host tier (section 8) */
        uint64_t weight_bytes, expert_bytes;
        model_weight_sizes(m, &weight_bytes, &expert_bytes);
        int tiers = p.gpu_budget_bytes && p.gpu_budget_bytes < weight_bytes && p.host_budget_bytes && p.host_budget_bytes < weight_bytes;
        st = tiers ? xs_setup(m, p.host_budget_bytes, 1) : MOE_OK;
        /* AUTO takes a GPU only: on a CPU-type Vulkan device (lavapipe) our CPU backend is faster */
        moe_vk_opts vo = {p.vk, p.vk_pipeline_cache_path, p.vk_pipeline_cache_data, p.vk_pipeline_cache_size, m->xc};
        if (!st) st = moe_vk_init_opts(&m->w, p.device_index, p.backend == MOE_BACKEND_AUTO, p.gpu_budget_bytes, &vo, m->log.fn, m->log.user, &m->vk);
        if (st) {
            xs_free(m->xc); /* the CPU sets up its own host tier below */
            m->xc = NULL;
            /* the host's own device failing is the host's to hear about, not a reason to fall back */
            if (p.backend == MOE_BACKEND_VULKAN || p.vk) goto fail;
            log_msg(&m->log, MOE_LOG_INFO, "backend: CPU, %d thread(s) (MOE_BACKEND_AUTO: Vulkan not used: %s)", m->n_threads,
                    moe_last_error());
            m->vk = NULL;
        } else {
            m->backend = MOE_BACKEND_VULKAN;
            if (m->xc && !moe_vk_streams_experts(m->vk)) { /* the weights fit the GPU budget after all: no host tier */
                xs_free(m->xc);
                m->xc = NULL;
            }
            if (p.gpu_exact) moe_vk_use_exact(m->vk);
            log_msg(&m->log, MOE_LOG_INFO, "backend: Vulkan (%s)",
                    p.backend == MOE_BACKEND_AUTO ? "MOE_BACKEND_AUTO found a GPU" : "MOE_BACKEND_VULKAN asked for");
        }
    } else
        log_msg(&m->log, MOE_LOG_INFO, "backend: CPU, %d thread(s) (MOE_BACKEND_CPU asked for)", m->n_threads);
    if (!m->vk && !p.host_budget_bytes) file_huge_pages(&m->file); /* resident on the CPU: 2 MiB pages */
    if (!m->vk && (st = xs_setup(m, p.host_budget_bytes, 0))) goto fail; /* the host expert tier (section 8) */
    if (!m->xc && (st = check_tensor_values(&m->gguf, CHECK_EXPERTS))) goto fail; /* else as they are read */
    if (m->vk && (p.host_budget_bytes || moe_vk_streams_experts(m->vk))) xs_drop_expert_pages(m); /* experts live in device or host-visible memory */
    log_msg(&m->log, MOE_LOG_INFO, "loaded %s: %d layers, %d experts (top-%d), vocab %d, %.1f M params", m->arch_name,
            m->w.hp.n_layer, m->w.hp.n_expert, m->w.hp.n_expert_used, m->w.hp.n_vocab, (double)m->n_params / 1e6);
    if (report_progress(&p, 1.0f)) goto cancelled;
    m->t_load_s = now_s() - t0;
    *out = m;
    return MOE_OK;
cancelled:
    st = set_error(MOE_ERR_CANCELLED, "moe_load: cancelled by the progress callback");
fail:
    model_destroy(m);
    return st;
}

moe_status moe_vk_pipeline_cache_get(const moe_model *model, void *buf, size_t cap, size_t *n_out) {
    if (n_out) *n_out = 0;
    if (!model || !n_out || (!buf && cap)) return set_error(MOE_ERR_INVALID_ARG, "moe_vk_pipeline_cache_get: bad arguments");
    if (!model->vk) return set_error(MOE_ERR_UNSUPPORTED, "moe_vk_pipeline_cache_get: the model runs on the CPU backend");
    return moe_vk_pcache_get(model->vk, buf, cap, n_out);
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
    model_weight_sizes(model, &out->weight_bytes, &out->expert_bytes);
    return MOE_OK;
}

/* ============================================================================================ */
/* tokenizer API and chat templates (section 4 holds the machinery)                              */
/* ============================================================================================ */
/* ---- chat templates --------------------------------------------------------------------------------
   Hand-written renderings of the templates the supported families ship (outputs match the Jinja
   templates for plain text messages): ChatML with Qwen3's reasoning handling, Gemma 3's and
   Gemma 4's turns, and gpt-oss's Harmony format. */
typedef struct sbuf { char *p; int64_t n, cap; } sbuf;
static void sb_put(sbuf *b, const char *s, size_t n) {
    if (b->n < b->cap) memcpy(b->p + b->n, s, (size_t)((int64_t)n < b->cap - b->n ? (int64_t)n : b->cap - b->n));
    b->n += (int64_t)n;
}
static void sb_puts(sbuf *b, const char *s) { sb_put(b, s, strlen(s)); }

static int py_space(uint32_t c) { /* Python's str.isspace(), for Jinja's trim */
    return (c >= 9 && c <= 13) || (c >= 0x1C && c <= 0x20) || c == 0x85 || c == 0xA0 || c == 0x1680 ||
           (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 || c == 0x202F || c == 0x205F || c == 0x3000;
}

static void str_trim(const char **s, size_t *n, int only_newlines, int left, int right) {
    const uint8_t *p = (const uint8_t *)*s;
    size_t a = 0, b = *n;
    while (left && a < b) {
        int l;
        uint32_t c = utf8_next(p + a, b - a, &l);
        if (only_newlines ? c != '\n' : !py_space(c)) break;
        a += (size_t)l;
    }
    while (right && b > a) {
        size_t q = utf8_prev(p, b);
        if (q < a) q = a;
        int l;
        uint32_t c = utf8_next(p + q, b - q, &l);
        if (q + (size_t)l != b || (only_newlines ? c != '\n' : !py_space(c))) break;
        b = q;
    }
    *s += a;
    *n = b - a;
}

static const char *mem_find(const char *h, size_t hn, const char *needle) { /* first occurrence or NULL */
    size_t nn = strlen(needle);
    for (size_t i = 0; nn <= hn && i + nn <= hn; i++)
        if (memcmp(h + i, needle, nn) == 0) return h + i;
    return NULL;
}
static const char *mem_rfind(const char *h, size_t hn, const char *needle) {
    size_t nn = strlen(needle);
    for (size_t i = hn >= nn ? hn - nn + 1 : 0; i-- > 0;)
        if (memcmp(h + i, needle, nn) == 0) return h + i;
    return NULL;
}

#ifdef MOE_TEST_HOOKS
static char g_chat_date[16]; /* test hook: a fixed "YYYY-MM-DD" for Harmony's system message */
MOE_HIDDEN void moe_test_set_chat_date(const char *ymd);
void moe_test_set_chat_date(const char *ymd) { snprintf(g_chat_date, sizeof g_chat_date, "%s", ymd ? ymd : ""); }
#else
static const char g_chat_date[1] = "";
#endif

static moe_status chat_qwen3(const char *const *roles, const char *const *contents, int32_t n, int gen, int qwen3, sbuf *b) {
    int32_t last_query = n - 1;
    for (int32_t i = n - 1; i >= 0 && qwen3; i--) {
        const char *c = contents[i];
        size_t cl = strlen(c);
        int tool_resp = cl >= 15 + 16 && !strncmp(c, "<tool_response>", 15) && !strcmp(c + cl - 16, "</tool_response>");
        if (!strcmp(roles[i], "user") && !tool_resp) { last_query = i; break; }
    }
    for (int32_t i = 0; i < n; i++) {
        const char *r = roles[i], *c = contents[i];
        size_t cl = strlen(c);
        if (!strcmp(r, "user") || !strcmp(r, "system")) {
            sb_puts(b, "<|im_start|>"); sb_puts(b, r); sb_puts(b, "\n"); sb_put(b, c, cl); sb_puts(b, "<|im_end|>\n");
        } else if (!strcmp(r, "assistant")) {
            const char *content = c, *reason = "";
            size_t content_n = cl, reason_n = 0;
            const char *end_think = qwen3 ? mem_rfind(c, cl, "</think>") : NULL;
            if (end_think) {
                content = end_think + 8;
                content_n = cl - (size_t)(content - c);
                str_trim(&content, &content_n, 1, 1, 0);
                const char *first = mem_find(c, cl, "</think>");
                reason = c;
                reason_n = (size_t)(first - c);
                str_trim(&reason, &reason_n, 1, 0, 1);
                const char *open = mem_rfind(reason, reason_n, "<think>");
                if (open) { reason_n -= (size_t)(open + 7 - reason); reason = open + 7; }
                str_trim(&reason, &reason_n, 1, 1, 0);
            }
            sb_puts(b, "<|im_start|>assistant\n");
            if (qwen3 && i > last_query && (i == n - 1 || reason_n)) {
                str_trim(&reason, &reason_n, 1, 1, 1);
                sb_puts(b, "<think>\n"); sb_put(b, reason, reason_n); sb_puts(b, "\n</think>\n\n");
                str_trim(&content, &content_n, 1, 1, 0);
            }
            sb_put(b, content, content_n);
            sb_puts(b, "<|im_end|>\n");
        } else if (!strcmp(r, "tool")) {
            if (i == 0 || strcmp(roles[i - 1], "tool")) sb_puts(b, "<|im_start|>user");
            sb_puts(b, "\n<tool_response>\n"); sb_put(b, c, cl); sb_puts(b, "\n</tool_response>");
            if (i == n - 1 || strcmp(roles[i + 1], "tool")) sb_puts(b, "<|im_end|>\n");
        } else {
            return set_error(MOE_ERR_INVALID_ARG, "moe_chat_apply: role '%s' is not one of system, user, assistant, tool", r);
        }
    }
    if (gen) sb_puts(b, "<|im_start|>assistant\n");
    return MOE_OK;
}

static moe_status chat_gemma(const moe_vocab *v, const char *const *roles, const char *const *contents, int32_t n, int gen, sbuf *b) {
    if (v->bos >= 0) sb_put(b, (const char *)tok_text(v, v->bos), v->tok[v->bos].text_len);
    int32_t first = 0;
    const char *prefix = NULL;
    if (n > 0 && !strcmp(roles[0], "system")) { prefix = contents[0]; first = 1; }
    for (int32_t i = first; i < n; i++) {
        int want_user = (i - first) % 2 == 0;
        if ((strcmp(roles[i], "user") == 0) != want_user || (!want_user && strcmp(roles[i], "assistant") && strcmp(roles[i], "model")))
            return set_error(MOE_ERR_INVALID_ARG, "moe_chat_apply: Gemma needs roles to alternate user/assistant/user/... "
                             "(after an optional system message); message %d is '%s'", i, roles[i]);
        sb_puts(b, "<start_of_turn>");
        sb_puts(b, want_user ? "user" : "model");
        sb_puts(b, "\n");
        if (i == first && prefix) { sb_puts(b, prefix); sb_puts(b, "\n\n"); }
        const char *c = contents[i];
        size_t cl = strlen(c);
        str_trim(&c, &cl, 0, 1, 1);
        sb_put(b, c, cl);
        sb_puts(b, "<end_of_turn>\n");
    }
    if (gen) sb_puts(b, "<start_of_turn>model\n");
    return MOE_OK;
}

/* Gemma 4 (the template Google ships with the models, as its Jinja renders plain messages):
     <bos>[<|turn>system\n{first system/developer message, trimmed}<turn|>\n]
     per message <|turn>{role}\n{content}<turn|>\n, assistant -> model, content trimmed; in model
       turns every <|channel>...<channel|> thinking span is cut out first (strip_thinking below)
     generation prompt <|turn>model\n, then the empty thought block <|channel>thought\n<channel|>
       that keeps the model from thinking (thinking is never enabled here).
   Revisions differ in two places (vocab_detect_chat reads which from the template text): the
   E2B/E4B templates end the generation prompt at <|turn>model\n, and since April 2026 an
   assistant message that follows an assistant message continues that turn without a new
   <|turn>model\n header (each message still ends with <turn|>\n). A "tool" message is not
   rendered: the current template drops it unless it answers a tool call (an older one gave it a
   turn of its own), and tool calls are not part of this API. */
static moe_status chat_gemma4(const moe_vocab *v, const char *const *roles, const char *const *contents, int32_t n, int gen, sbuf *b) {
    if (n == 0) return set_error(MOE_ERR_INVALID_ARG, "moe_chat_apply: Gemma 4's template needs at least one message");
    for (int32_t i = 0; i < n; i++) {
        const char *r = roles[i];
        if (strcmp(r, "system") && strcmp(r, "developer") && strcmp(r, "user") && strcmp(r, "assistant") && strcmp(r, "model"))
            return set_error(MOE_ERR_INVALID_ARG, "moe_chat_apply: role '%s' (message %d) is not one of system, developer, user, "
                             "assistant, model for Gemma 4 (tool results need tool calls, which moe_chat_apply does not render)", r, i);
    }
    if (v->bos >= 0) sb_put(b, (const char *)tok_text(v, v->bos), v->tok[v->bos].text_len);
    int32_t first = 0;
    if (!strcmp(roles[0], "system") || !strcmp(roles[0], "developer")) {
        const char *c = contents[0];
        size_t cl = strlen(c);
        str_trim(&c, &cl, 0, 1, 1);
        sb_puts(b, "<|turn>system\n");
        sb_put(b, c, cl);
        sb_puts(b, "<turn|>\n");
        first = 1;
    }
    for (int32_t i = first; i < n; i++) {
        const char *r = roles[i], *c = contents[i];
        size_t cl = strlen(c);
        int model = !strcmp(r, "assistant") || !strcmp(r, "model");
        int cont = model && i > first && !strcmp(roles[i - 1], "assistant") && (v->chat_flags & CHATF_G4_CONTINUE);
        if (!cont) { sb_puts(b, "<|turn>"); sb_puts(b, model ? "model" : r); sb_puts(b, "\n"); }
        if (model) { /* strip_thinking: of each piece between <channel|> markers, what precedes its first <|channel> */
            char *kept = moe_malloc(cl + 1);
            if (!kept) return set_error(MOE_ERR_NO_MEMORY, "moe_chat_apply: out of memory");
            size_t k = 0;
            for (const char *p = c, *end = c + cl; p <= end;) {
                const char *close = mem_find(p, (size_t)(end - p), "<channel|>");
                const char *stop = close ? close : end;
                const char *open = mem_find(p, (size_t)(stop - p), "<|channel>");
                const char *keep_end = open ? open : stop;
                memcpy(kept + k, p, (size_t)(keep_end - p));
                k += (size_t)(keep_end - p);
                if (!close) break;
                p = close + 10;
            }
            const char *t = kept;
            str_trim(&t, &k, 0, 1, 1);
            sb_put(b, t, k);
            moe_free(kept);
        } else {
            str_trim(&c, &cl, 0, 1, 1);
            sb_put(b, c, cl);
        }
        sb_puts(b, "<turn|>\n");
    }
    if (gen) {
        sb_puts(b, "<|turn>model\n");
        if (v->chat_flags & CHATF_G4_EMPTY_THOUGHT) sb_puts(b, "<|channel>thought\n<channel|>");
    }
    return MOE_OK;
}

static moe_status chat_harmony(const char *const *roles, const char *const *contents, int32_t n, int gen, sbuf *b) {
    char date[16];
    if (g_chat_date[0]) snprintf(date, sizeof date, "%s", g_chat_date);
    else {
        time_t now = time(NULL);
        struct tm tmv;
#ifdef _WIN32
        int bad_time = localtime_s(&tmv, &now) != 0;
#else
        int bad_time = !localtime_r(&now, &tmv);
#endif
        if (bad_time || !strftime(date, sizeof date, "%Y-%m-%d", &tmv)) snprintf(date, sizeof date, "1970-01-01");
    }
    sb_puts(b, "<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.\nKnowledge cutoff: 2024-06\n"
               "Current date: ");
    sb_puts(b, date);
    sb_puts(b, "\n\nReasoning: medium\n\n# Valid channels: analysis, commentary, final. Channel must be included for every message.<|end|>");
    int32_t first = 0;
    if (n > 0 && (!strcmp(roles[0], "system") || !strcmp(roles[0], "developer"))) {
        first = 1;
        if (contents[0][0]) { sb_puts(b, "<|start|>developer<|message|># Instructions\n\n"); sb_puts(b, contents[0]); sb_puts(b, "<|end|>"); }
    }
    for (int32_t i = first; i < n; i++) {
        if (!strcmp(roles[i], "user")) {
            sb_puts(b, "<|start|>user<|message|>"); sb_puts(b, contents[i]); sb_puts(b, "<|end|>");
        } else if (!strcmp(roles[i], "assistant")) {
            if (strstr(contents[i], "<|channel|>analysis<|message|>") || strstr(contents[i], "<|channel|>final<|message|>"))
                return set_error(MOE_ERR_INVALID_ARG, "moe_chat_apply: message %d holds <|channel|> markers; pass the final text only", i);
            sb_puts(b, "<|start|>assistant<|channel|>final<|message|>");
            sb_puts(b, contents[i]);
            sb_puts(b, i == n - 1 && !gen ? "<|return|>" : "<|end|>");
        } else {
            return set_error(MOE_ERR_INVALID_ARG, "moe_chat_apply: role '%s' is not supported by the Harmony format here "
                             "(system or developer first, then user / assistant)", roles[i]);
        }
    }
    if (gen) sb_puts(b, "<|start|>assistant");
    return MOE_OK;
}

/* ---- public tokenizer API --------------------------------------------------------------------------- */
static moe_status tok_check(const moe_model *model, const char *fn, const moe_vocab **out) {
    if (!model) return set_error(MOE_ERR_INVALID_ARG, "%s: model is NULL", fn);
    const moe_vocab *v = model->vocab;
    if (!v) return set_error(MOE_ERR_UNSUPPORTED, "%s: this model has no tokenizer (no tokenizer.ggml.* metadata or tokenizer.json)", fn);
    if (v->unsupported[0]) return set_error(MOE_ERR_UNSUPPORTED, "%s: %s", fn, v->unsupported);
    *out = v;
    return MOE_OK;
}

/* The v1 out-parameter rule (moe.h, "Counts through out-parameters"): MOE_OK with *n_out = the count
   written, or MOE_ERR_BUFFER_TOO_SMALL with *n_out = the count needed (nothing written beyond cap). */
static moe_status tok_result(int64_t n, int64_t cap, const char *fn, int32_t *n_out) {
    if (n > INT32_MAX) return set_error(MOE_ERR_INVALID_ARG, "%s: the result (%lld) does not fit an int32", fn, (long long)n);
    *n_out = (int32_t)n;
    if (n > cap)
        return set_error(MOE_ERR_BUFFER_TOO_SMALL, "%s: needs room for %lld, the buffer holds %lld", fn, (long long)n, (long long)cap);
    return MOE_OK;
}

/* n_out is required; on an error other than MOE_ERR_BUFFER_TOO_SMALL it is left 0 */
static moe_status tok_out_check(int32_t *n_out, const char *fn) {
    if (!n_out) return set_error(MOE_ERR_INVALID_ARG, "%s: n_out is NULL (the count comes back through it)", fn);
    *n_out = 0;
    return MOE_OK;
}

moe_status moe_tokenize(const moe_model *model, const char *text, int32_t text_len, moe_token *out, int32_t cap, int32_t flags,
                        int32_t *n_out) {
    const moe_vocab *v = NULL;
    moe_status st = tok_out_check(n_out, "moe_tokenize");
    if (!st) st = tok_check(model, "moe_tokenize", &v);
    if (st) return st;
    if ((!text && text_len) || text_len < 0 || cap < 0 || (!out && cap) || (flags & ~3))
        return set_error(MOE_ERR_INVALID_ARG, "moe_tokenize: bad arguments (text %p, text_len %d, out %p, cap %d, flags %d)",
                         (const void *)text, text_len, (void *)out, cap, flags);
    if (!uc_ready()) return set_error(MOE_ERR_NO_MEMORY, "moe_tokenize: out of memory for the Unicode tables");
    tok_scratch sc;
    if ((st = scratch_init(&sc, (size_t)text_len))) { scratch_free(&sc); return st; }
    tok_out o = {out, cap, 0};
    if (flags & MOE_TOKENIZE_ADD_SPECIAL)
        for (int i = 0; i < v->n_prefix; i++) emit(&o, v->prefix[i]);
    encode_text(v, &sc, (const uint8_t *)text, (size_t)text_len, (flags & MOE_TOKENIZE_PARSE_SPECIAL) != 0, &o);
    if (flags & MOE_TOKENIZE_ADD_SPECIAL)
        for (int i = 0; i < v->n_suffix; i++) emit(&o, v->suffix[i]);
    scratch_free(&sc);
    return tok_result(o.n, cap, "moe_tokenize", n_out);
}

moe_status moe_token_to_piece(const moe_model *model, moe_token token, char *buf, int32_t cap, int32_t *n_out) {
    const moe_vocab *v = NULL;
    moe_status st = tok_out_check(n_out, "moe_token_to_piece");
    if (!st) st = tok_check(model, "moe_token_to_piece", &v);
    if (st) return st;
    if (token < 0 || token >= v->n_tokens)
        return set_error(MOE_ERR_INVALID_ARG, "moe_token_to_piece: token %d is outside the vocabulary [0, %d)", token, v->n_tokens);
    if (cap < 0 || (!buf && cap))
        return set_error(MOE_ERR_INVALID_ARG, "moe_token_to_piece: buffer %s with capacity %d (a size query is buf = NULL, cap = 0)",
                         buf ? "given" : "NULL", cap);
    uint32_t n = v->tok[token].piece_len;
    if ((int64_t)n <= cap) memcpy(buf, tok_piece(v, token), n);
    return tok_result(n, cap, "moe_token_to_piece", n_out);
}

moe_status moe_detokenize(const moe_model *model, const moe_token *tokens, int32_t n_tokens, char *buf, int32_t cap, int32_t flags,
                          int32_t *n_out) {
    const moe_vocab *v = NULL;
    moe_status st = tok_out_check(n_out, "moe_detokenize");
    if (!st) st = tok_check(model, "moe_detokenize", &v);
    if (st) return st;
    if (n_tokens < 0 || (!tokens && n_tokens) || cap < 0 || (!buf && cap) || (flags & ~3))
        return set_error(MOE_ERR_INVALID_ARG, "moe_detokenize: %s",
                         n_tokens < 0 ? "n_tokens is negative" : (!tokens && n_tokens) ? "tokens is NULL"
                         : cap < 0 ? "cap is negative" : (!buf && cap) ? "buf is NULL with a capacity (a size query is buf = NULL, cap = 0)"
                         : "unknown flags");
    /* every token is checked before a byte is written: a bad id leaves buf untouched */
    for (int32_t i = 0; i < n_tokens; i++)
        if (tokens[i] < 0 || tokens[i] >= v->n_tokens)
            return set_error(MOE_ERR_INVALID_ARG, "moe_detokenize: token %d at index %d is outside [0, %d)", tokens[i], i, v->n_tokens);
    sbuf b = {buf, 0, cap};
    for (int32_t i = 0; i < n_tokens; i++) {
        moe_token t = tokens[i];
        if ((v->tok[t].flags & TF_SPECIAL) && !(flags & MOE_TOKENIZE_PARSE_SPECIAL)) continue;
        sb_put(&b, (const char *)tok_piece(v, t), v->tok[t].piece_len);
    }
    return tok_result(b.n, cap, "moe_detokenize", n_out);
}

int32_t moe_token_is_eog(const moe_model *model, moe_token token) {
    if (!model) return set_error(MOE_ERR_INVALID_ARG, "moe_token_is_eog: model is NULL"), 0;
    const moe_vocab *v = model->vocab;
    if (!v) return token >= 0 && token == model->eos;
    return token >= 0 && token < v->n_tokens && (v->tok[token].flags & TF_EOG) != 0;
}

moe_status moe_chat_apply(const moe_model *model, const char *const *roles, const char *const *contents, int32_t n_messages,
                          int32_t add_assistant_prompt, char *buf, int32_t cap, int32_t *n_out) {
    const moe_vocab *v = NULL;
    moe_status st = tok_out_check(n_out, "moe_chat_apply");
    if (!st) st = tok_check(model, "moe_chat_apply", &v);
    if (st) return st;
    if (n_messages < 0 || (n_messages && (!roles || !contents)) || cap < 0 || (!buf && cap) ||
        (add_assistant_prompt != 0 && add_assistant_prompt != 1))
        return set_error(MOE_ERR_INVALID_ARG, "moe_chat_apply: %s",
                         n_messages < 0 ? "n_messages is negative" : (n_messages && (!roles || !contents)) ? "roles or contents is NULL"
                         : cap < 0 ? "cap is negative" : (!buf && cap) ? "buf is NULL with a capacity (a size query is buf = NULL, cap = 0)"
                         : "add_assistant_prompt is not 0/1");
    for (int32_t i = 0; i < n_messages; i++)
        if (!roles[i] || !contents[i]) return set_error(MOE_ERR_INVALID_ARG, "moe_chat_apply: message %d has a NULL role or content", i);
    /* rendered into a scratch buffer first: a template error (an unknown role late in the chat)
       must leave the caller's buffer untouched */
    sbuf b = {NULL, 0, 0};
    for (int pass = 0; pass < 2; pass++) {
        switch (v->chat) {
        case CHAT_QWEN3: st = chat_qwen3(roles, contents, n_messages, add_assistant_prompt, 1, &b); break;
        case CHAT_CHATML: st = chat_qwen3(roles, contents, n_messages, add_assistant_prompt, 0, &b); break;
        case CHAT_GEMMA: st = chat_gemma(v, roles, contents, n_messages, add_assistant_prompt, &b); break;
        case CHAT_GEMMA4: st = chat_gemma4(v, roles, contents, n_messages, add_assistant_prompt, &b); break;
        case CHAT_HARMONY: st = chat_harmony(roles, contents, n_messages, add_assistant_prompt, &b); break;
        default:
            return set_error(MOE_ERR_UNSUPPORTED, "moe_chat_apply: the model's chat template is not one we render "
                             "(supported: ChatML/Qwen3, Gemma 3, Gemma 4, Harmony)%s", v->template_text ? "" : " and it names none");
        }
        if (st) return st;
        /* pass 0 only measured (cap 0) and validated; pass 1 writes when it fits */
        if (pass == 0) {
            if (b.n > cap) return tok_result(b.n, cap, "moe_chat_apply", n_out);
            b = (sbuf){buf, 0, cap};
        }
    }
    if (b.n < cap) buf[b.n] = 0; /* a courtesy NUL when it fits; the count excludes it */
    return tok_result(b.n, cap, "moe_chat_apply", n_out);
}

/* Vocabulary-only loading (moe_load_params.vocab_only, or a path to a tokenizer.json): a GGUF
   file's tokenizer.ggml.* metadata, or a Hugging Face tokenizer.json with the
   tokenizer_config.json and config.json found beside it. No weights: contexts cannot be made. */
static moe_status vocab_load_hf(const char *path, moe_vocab **out) {
    *out = NULL;
    struct stat sb;
    int is_dir = stat(path, &sb) == 0 && S_ISDIR(sb.st_mode);
    size_t pl = strlen(path);
    char *dir = moe_malloc(pl + 32), *file = moe_malloc(pl + 64);
    if (!dir || !file) { moe_free(dir); moe_free(file); return set_error(MOE_ERR_NO_MEMORY, "moe_load: out of memory"); }
    if (is_dir) {
        snprintf(dir, pl + 32, "%s", path);
    } else {
        const char *slash = strrchr(path, '/');
        if (slash) snprintf(dir, pl + 32, "%.*s", (int)(slash - path), path);
        else snprintf(dir, pl + 32, ".");
    }
    json_file tj, tc, cfg;
    memset(&tc, 0, sizeof tc);
    memset(&cfg, 0, sizeof cfg);
    if (is_dir) snprintf(file, pl + 64, "%s/tokenizer.json", dir);
    else snprintf(file, pl + 64, "%s", path);
    moe_status st = json_file_open(&tj, file, "tokenizer.json");
    moe_vocab *v = NULL;
    if (!st) st = vocab_from_json(&tj.d, &v);
    json_file_close(&tj);
    if (!st) {
        snprintf(file, pl + 64, "%s/tokenizer_config.json", dir);
        if (access(file, R_OK) == 0) st = json_file_open(&tc, file, "tokenizer_config.json");
    }
    if (!st) {
        snprintf(file, pl + 64, "%s/config.json", dir);
        if (access(file, R_OK) == 0) st = json_file_open(&cfg, file, "config.json");
    }
    if (!st) st = vocab_apply_configs(v, tc.open ? &tc.d : NULL, cfg.open ? &cfg.d : NULL);
    if (!st && !v->unsupported[0]) st = vocab_finish(v);
    json_file_close(&tc);
    json_file_close(&cfg);
    moe_free(dir);
    moe_free(file);
    if (st) { vocab_free(v); return st; }
    *out = v;
    return MOE_OK;
}

static moe_status model_load_vocab_only(moe_model *m, const char *path, int hf) {
    moe_status st;
    if (hf) {
        if ((st = vocab_load_hf(path, &m->vocab))) return st;
    } else {
        if ((st = file_map(&m->file, path, 0)) || (st = gguf_parse(&m->gguf, m->file.data, m->file.size)) ||
            (st = vocab_load_gguf(&m->gguf, &m->vocab)))
            return st;
        if (!m->vocab) return set_error(MOE_ERR_FORMAT, "moe_load: '%s' has no tokenizer metadata (tokenizer.ggml.model)", path);
    }
    moe_vocab *v = m->vocab;
    if (v->unsupported[0]) return set_error(MOE_ERR_UNSUPPORTED, "moe_load: %s", v->unsupported);
    snprintf(m->arch_name, sizeof m->arch_name, "%s", v->arch);
    m->w.hp.n_vocab = v->n_tokens;
    m->bos = v->bos;
    m->eos = v->eos;
    return MOE_OK;
}

/* ---- model export (GGUF) ------------------------------------------------------------------- */
typedef struct export_tensor {
    const moe_weight *w;
    int32_t type;              /* destination type */
    const moe_save_params *params;
    float progress_lo, progress_hi;
    int32_t *row_map, *col_map;  /* optional: destination row / column i comes from source row / column map[i] */
} export_tensor;

/* dequantize each source row (of any type) and quantize it to the destination type */
static moe_status export_produce(void *arg, uint8_t *dst, uint64_t size) {
    const export_tensor *et = arg;
    const moe_weight *w = et->w;
    const moe_type_traits *src = type_traits(w->type), *out = type_traits(et->type);
    int64_t K = w->ne[0], rows = w->ne[1], n_mat = w->n_dims == 3 ? w->ne[2] : 1;
    uint64_t out_row = type_row_bytes(et->type, K);
    (void)size;
    float *row = moe_malloc((size_t)K * 2 * sizeof *row);
    if (!row) return set_error(MOE_ERR_NO_MEMORY, "moe_model_save: out of memory");
    for (int64_t e = 0; e < n_mat; e++) {
        const uint8_t *base = w->n_dims == 3 ? w->expert_data[e] : w->data;
        for (int64_t r = 0; r < rows; r++, dst += out_row) {
            src->dequant(base + (uint64_t)(et->row_map ? et->row_map[r] : r) * w->row_bytes, row, K);
            if (et->col_map)
                for (int64_t c = 0; c < K; c++) row[K + c] = row[et->col_map[c]];
            out->quant(et->col_map ? row + K : row, dst, K);
        }
        const moe_save_params *p = et->params;
        if (p && p->progress &&
            p->progress(et->progress_lo + (et->progress_hi - et->progress_lo) * (float)(e + 1) / (float)n_mat, p->user)) {
            moe_free(row);
            return set_error(MOE_ERR_CANCELLED, "moe_model_save: cancelled by the progress callback");
        }
    }
    moe_free(row);
    return MOE_OK;
}

static int32_t ftype_matrix_type(int32_t ftype) {
    static const int32_t map[] = {-1, MOE_TYPE_F32, MOE_TYPE_F16, MOE_TYPE_BF16, MOE_TYPE_Q8_0,
                                  MOE_TYPE_Q4_K, MOE_TYPE_Q5_K, MOE_TYPE_Q6_K, MOE_TYPE_Q4_0};
    return ftype >= 0 && ftype < (int32_t)(sizeof map / sizeof map[0]) ? map[ftype] : -2;
}

/* the destination type of one weight under an ftype */
static int32_t export_type(const moe_weight *w, int32_t ftype, int is_output, int is_router) {
    if (w->n_dims == 1) return MOE_TYPE_F32;
    int32_t t = ftype_matrix_type(ftype);
    if (t < 0) t = w->type;                                   /* keep */
    else if (is_router) t = MOE_TYPE_F32;
    else if (is_output && t == MOE_TYPE_Q4_K) t = MOE_TYPE_Q6_K;
    const int32_t fallback[] = {t, MOE_TYPE_Q8_0, MOE_TYPE_F16, MOE_TYPE_F32};
    for (int i = 0; i < 4; i++)
        if (type_row_bytes(fallback[i], w->ne[0])) return fallback[i];
    return MOE_TYPE_F32;
}

/* Qwen3.5 GGUFs hold the value heads in llama.cpp's tiled order (ARCHITECTURES.md §3.8):
   written from a model in Hugging Face's grouped order, tiled head j' = s·nk + g takes grouped
   head g·(nv/nk) + s, in the rows or columns (or 1-D elements) that carry value heads. */
static int32_t *vreorder_map(const moe_deltanet *dn, int64_t n, int64_t off, int64_t unit) {
    int32_t *map = moe_malloc((size_t)n * sizeof *map);
    if (!map) return NULL;
    int nk = dn->n_k_head, r = dn->n_v_head / dn->n_k_head;
    for (int64_t i = 0; i < n; i++) {
        map[i] = (int32_t)i;
        if (i < off || i >= off + (int64_t)dn->n_v_head * unit) continue;
        int64_t h = (i - off) / unit, within = (i - off) % unit, g = h % nk, sv = h / nk;
        map[i] = (int32_t)(off + (g * r + sv) * unit + within);
    }
    return map;
}

static moe_status export_vreorder(const moe_model *m, int l, int role, export_tensor *et) {
    const moe_layer_plan *p = &m->w.layers[l].p;
    const moe_deltanet *dn = &p->dn;
    if (p->attn_kind != MOE_ATTN_DELTANET || dn->v_tiled || dn->n_k_head == dn->n_v_head || !strcmp(m->arch->name, "qwen3next") ||
        strncmp(m->arch->name, "qwen35", 6))
        return MOE_OK;
    int64_t qk = 2 * (int64_t)dn->n_k_head * dn->k_dim, dv = dn->v_dim, n = et->w->ne[1];
    int32_t **map = &et->row_map;
    int64_t off = 0, unit = 1;
    switch (role) {
    case MOE_SSM_QKV: case MOE_SSM_CONV: off = qk, unit = dv; break;
    case MOE_SSM_Z: unit = dv; break;
    case MOE_SSM_BETA: case MOE_SSM_ALPHA: break;
    case MOE_SSM_A: case MOE_SSM_DT: map = &et->col_map, n = et->w->ne[0]; break;
    case MOE_SSM_OUT: map = &et->col_map, n = et->w->ne[0], unit = dv; break;
    default: return MOE_OK;
    }
    if (!(*map = vreorder_map(dn, n, off, unit))) return set_error(MOE_ERR_NO_MEMORY, "moe_model_save: out of memory");
    return MOE_OK;
}

moe_status moe_model_save(const moe_model *model, const char *path, const moe_save_params *params) {
    if (!model || !path) return set_error(MOE_ERR_INVALID_ARG, "moe_model_save: NULL argument");
    moe_save_params p = {0};
    if (params) p = *params;
    if (ftype_matrix_type(p.ftype) == -2) return set_error(MOE_ERR_INVALID_ARG, "moe_model_save: unknown ftype %d", p.ftype);
    if (!model->arch) return set_error(MOE_ERR_UNSUPPORTED, "moe_model_save: the model was loaded with vocab_only (no weights)");
    const moe_hparams *hp = &model->w.hp;
    gguf_writer gw = {0};
    gw_kv_str(&gw, "general.architecture", model->arch_name);
    gw_kv_str(&gw, "general.name", "moe export");
    model->arch->write_hparams(model, &gw);
    moe_status st = model->vocab ? vocab_write_gguf(model->vocab, &gw) : MOE_OK;
    /* one export job per tensor, in the architecture's order (llama.cpp's) */
    tensor_spec sp[MAX_TENSOR_SPECS];
    int n_max = 0, n = 0;
    for (int l = -1; l < hp->n_layer; l++) n_max += model->arch->tensors(&model->w, l, sp);
    export_tensor *jobs = moe_calloc((size_t)n_max, sizeof *jobs);
    char *name_buf = moe_malloc((size_t)n_max * 64);
    if (!st && (!jobs || !name_buf)) st = set_error(MOE_ERR_NO_MEMORY, "moe_model_save: out of memory");
    int tied = model->w.g[MOE_OUTPUT].data == model->w.g[MOE_TOK_EMBD].data;
    for (int l = -1; !st && l < hp->n_layer; l++) {
        int ns = model->arch->tensors(&model->w, l, sp);
        for (int i = 0; !st && i < ns; i++) {
            const moe_weight *w = moe_weight_of(&model->w, l, sp[i].role);
            int is_out = l < 0 && sp[i].role == MOE_OUTPUT, is_router = l >= 0 && sp[i].role == MOE_ROUTER;
            if (!w->data || (is_out && tied)) continue;
            char *nm = name_buf + (size_t)n * 64;
            tensor_gguf_name(nm, 64, l, sp[i].role);
            export_tensor *et = &jobs[n];
            et->w = w;
            et->type = export_type(w, p.ftype, is_out, is_router);
            et->params = &p;
            et->progress_lo = (float)n / (float)n_max;
            et->progress_hi = (float)(n + 1) / (float)n_max;
            if (l >= 0 && !st) st = export_vreorder(model, l, sp[i].role, et);
            int64_t ne[3] = {w->ne[0], w->ne[1], w->ne[2]};
            if (!st) st = gw_tensor_from(&gw, nm, et->type, w->n_dims, ne, NULL, export_produce, et);
            n++;
        }
    }
    if (!st) st = gw_write_file(&gw, path);
    gw_free(&gw);
    for (int i = 0; jobs && i < n; i++) moe_free(jobs[i].row_map), moe_free(jobs[i].col_map);
    moe_free(jobs);
    moe_free(name_buf);
    return st;
}
