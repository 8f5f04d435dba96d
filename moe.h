/* moe.h — run Mixture-of-Experts language models on any Vulkan GPU, with a CPU fallback.

   ABOUT
   moe loads a GGUF file (or a Hugging Face model directory) of a Mixture-of-Experts model
   (Qwen3-MoE and Gemma 4 today; Qwen3.5 / Qwen3-Next, gpt-oss, Mixtral / OLMoE by design) and lets
   you drive generation one step at a time with your own sampling. Vendor four files into your
   project — moe.h, moe.c, moe_vk.c, shaders_embedded.c — and compile them with any C11 compiler:

       cc -O2 -c moe.c moe_vk.c shaders_embedded.c        (link with -lm -lpthread -ldl)

   No other library is needed at build time; the Vulkan loader is opened at run time if present.
   Windows (mingw-w64): the same files, nothing extra to link; threads, file mapping and the
   loader (vulkan-1.dll) go through Win32. Compile with -DMOE_BUILD_DLL to build moe.dll, which
   exports the MOE_API functions only. (make test-mingw cross-compiles it and runs the README
   program under wine; MSVC is not tested.)

   STEP BY STEP (the README's minimal program is this with its error handling; make test runs it)
       moe_model *model = NULL;
       moe_load_params lp = {0};                 // all-zero = defaults
       if (moe_load("model.gguf", &lp, &model) != MOE_OK) { puts(moe_last_error()); return 1; }
       moe_ctx *ctx = NULL;
       moe_ctx_new(model, NULL, &ctx);           // NULL params = defaults
       moe_model_info info;
       moe_model_get_info(model, &info);

       moe_token tok[256];
       int32_t n = 0;                            // counts come back through an out-parameter
       moe_tokenize(model, text, text_len, tok, 256, MOE_TOKENIZE_ADD_SPECIAL, &n);
       moe_step(ctx, tok, n);                    // prefill
       for (int i = 0; i < 200; i++) {
           moe_token t = my_sampler(moe_logits(ctx, -1), info.n_vocab);   // or moe_sample()
           if (moe_token_is_eog(model, t)) break;                         // end of generation
           char piece[256];                      // bytes of one token, maybe part of a UTF-8 char:
           int32_t len = 0;
           moe_token_to_piece(model, t, piece, sizeof piece, &len);
           fwrite(piece, 1, len, stdout);        // pieces concatenated = moe_detokenize()
           moe_step(ctx, &t, 1);                 // decode one token
       }
       moe_ctx_free(ctx);                        // in any order: a context keeps its model alive
       moe_model_free(model);

   ERRORS
   Every fallible call returns a moe_status (0 = MOE_OK, negative = failure). moe_status_str()
   names a code; moe_last_error() returns a thread-local sentence describing the last failure on
   the calling thread (for example "tensor 'blk.3.attn_q.weight': data range 1200..5000 is outside
   the file (4096 bytes)"). Nothing in the library calls exit() or abort() on bad input. A failed
   call leaves its object exactly as it was.

   THREADS AND LIFETIMES
   A moe_model is read-only after loading and can be shared by any number of threads. A moe_ctx
   belongs to one thread at a time; several contexts of one model may run concurrently. On the CPU
   backend a model has one pool of compute threads (n_threads in moe_load_params, the calling
   thread included; started with its first context, ended when the model is really freed), shared
   by all its contexts: 16 contexts of one model use n_threads compute threads, not 16 × n_threads.
   Steps of different contexts running at the same time (from several host threads, or from their
   moe_step_submit workers) share it: each parallel operation runs on its stepping thread plus an
   even share of the pool's workers (small operations first among equals), so a decode step beside
   another context's long prefill slows down but is not queued behind it; each context's results
   are bit-identical to stepping it alone. For the most tokens per second from many contexts, step
   them together with moe_step_batch (one pass, weights read once) instead of concurrently. Vulkan
   contexts do not use the pool.
   May run at the same time on different threads: any calls on different contexts (of one model
   or not); the model's read-only calls (moe_tokenize, moe_token_to_piece, moe_detokenize,
   moe_token_is_eog, moe_chat_apply, moe_model_get_info, moe_ctx_new, moe_model_save) on a shared
   model, also while its contexts step; any calls on different samplers. Never at the same time:
   two calls on one context or on one sampler, and a *_free with any other call on that object.
   The model outlives its contexts (reference counted): moe_load gives the caller one reference
   and every moe_ctx_new takes one more; moe_model_free releases the caller's, moe_ctx_free its
   context's, and the last release frees the model (weights, file mappings, device objects). So
   contexts and their model may be freed in any order: after moe_model_free the caller must not
   use that model pointer again (not even for moe_ctx_new), but its contexts keep working until
   they are freed, and moe_model_free may run while they step on other threads. The log callback
   and user pointer of moe_load_params must stay valid until the model is really freed. A
   moe_sampler depends on nothing. A pointer from moe_logits() lives until the next call on its
   context; moe_last_error()'s text until the next failing call on that thread.

   FRAME LOOPS: ASYNCHRONOUS STEPS, ABORT, GPU TIME PER SUBMISSION
   A game steps a context without blocking its frame: moe_step_submit(ctx, tok, n) in one frame,
   then moe_step_wait(ctx, 0) in the next ones until it stops returning MOE_ERR_TIMEOUT; MOE_OK
   means the logits are ready. In between, only moe_step_wait and moe_ctx_free may be called on
   that context (everything else: MOE_ERR_BUSY). The step runs on the context's worker thread (one
   per context, started by its first submit). moe_ctx_params.abort is polled between chunks and
   layers of a step; non-zero stops it with MOE_ERR_CANCELLED and leaves the context exactly as
   before the step (the same step again gives bit-identical logits). On Vulkan, max_submit_us caps
   the GPU time of one queue submission (a long prefill is split into parts that each fit, so the
   renderer's work interleaves; results bit-identical), low_priority asks for the device's
   low-priority queue, and moe_ctx_submit_times reports the submissions' GPU times. Details at
   moe_step_submit below.

   ABI
   No struct is passed or returned by value, no varargs, no bool (int32_t 0/1), enums are int32_t
   values, every output buffer comes with its capacity. Functions that fill a caller buffer
   (moe_tokenize, moe_token_to_piece, moe_detokenize, moe_chat_apply) return a moe_status and
   report the count through a last argument int32_t *n_out (required):
     MOE_OK                    *n_out = the count written (tokens or bytes);
     MOE_ERR_BUFFER_TOO_SMALL  *n_out = the count needed; nothing is written beyond cap;
     any other status          an error; *n_out = 0 (when n_out is not NULL).
   Size query: buf = NULL with cap = 0, then MOE_ERR_BUFFER_TOO_SMALL with the count needed in
   *n_out (MOE_OK with 0 when the result is empty); a NULL buf with cap > 0 is MOE_ERR_INVALID_ARG.
   Typical use: call with a buffer you have; on MOE_ERR_BUFFER_TOO_SMALL grow it to *n_out and
   call again.

   VERSIONS: WHEN STRUCTS GROW
   Structs only grow at their end, and all-zero means "default" for every field, new ones
   included: a program recompiled against a newer moe.h works unchanged. A program or binding
   built against an OLDER moe.h is kept safe by the ABI version, not by run-time struct sizes:
   every change of the binary interface (a struct that grows or changes, a function whose
   arguments or meaning change) raises MOE_ABI_VERSION, and the shared library's SONAME is
   libmoe.so.<MOE_ABI_VERSION> (make builds build/libmoe.so.3 and the link libmoe.so). A binary
   linked against libmoe.so.3 keeps loading that library, or fails to start; it never runs
   against structs of another size. Adding functions or enum values keeps MOE_ABI_VERSION.
   Bindings that open the library by path (Python ctypes, C#, Go, Rust without moe.h) must compare
   moe_abi_version() with the MOE_ABI_VERSION they were written for and refuse to run on a
   mismatch; moe_struct_size() lets them check each struct they declare (python/moe.py does both).
   Vendored sources (the four files compiled into your program) always agree with themselves.

   LICENSE: see LICENSE in the repository.
*/
#ifndef MOE_H
#define MOE_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define MOE_VERSION_MAJOR 0
#define MOE_VERSION_MINOR 1
#define MOE_VERSION_PATCH 0

#if defined(_WIN32) && defined(MOE_BUILD_DLL)
#define MOE_API __declspec(dllexport)
#elif defined(__GNUC__)
#define MOE_API __attribute__((visibility("default")))
#else
#define MOE_API
#endif

typedef struct moe_model   moe_model;    /* weights + tokenizer; read-only after load, shareable across threads */
typedef struct moe_ctx     moe_ctx;      /* one sequence: KV cache, position, logits; one thread at a time */
typedef struct moe_sampler moe_sampler;  /* sampling settings + RNG + token history */
typedef int32_t moe_token;
typedef int32_t moe_status;

enum { MOE_OK = 0, MOE_ERR_INVALID_ARG = -1, MOE_ERR_IO = -2, MOE_ERR_FORMAT = -3,
       MOE_ERR_UNSUPPORTED = -4, MOE_ERR_NO_MEMORY = -5, MOE_ERR_DEVICE = -6,
       MOE_ERR_CONTEXT_FULL = -7, MOE_ERR_BUFFER_TOO_SMALL = -8, MOE_ERR_CANCELLED = -9,
       MOE_ERR_TIMEOUT = -10,     /* moe_step_wait: the step still runs (not a failure; wait again) */
       MOE_ERR_BUSY = -11 };      /* a step is in flight on this context: only moe_step_wait and
                                     moe_ctx_free are accepted until moe_step_wait returns */
enum { MOE_BACKEND_AUTO = 0, MOE_BACKEND_CPU = 1, MOE_BACKEND_VULKAN = 2 };
enum { MOE_KV_F16 = 0, MOE_KV_F32 = 1, MOE_KV_Q8_0 = 2 /* more may follow */ };
enum { MOE_TOKENIZE_ADD_SPECIAL = 1, MOE_TOKENIZE_PARSE_SPECIAL = 2 };
enum { MOE_LOG_ERROR = 0, MOE_LOG_WARN = 1, MOE_LOG_INFO = 2, MOE_LOG_DEBUG = 3 };

MOE_API const char *moe_version(void);                /* "0.1.0" */

/* ABI version of the library: see VERSIONS above; the shared library is libmoe.so.<this>. */
#define MOE_ABI_VERSION 3
MOE_API int32_t     moe_abi_version(void);            /* MOE_ABI_VERSION of the library as built */
/* sizeof() of a public struct in the library as built (0 for an unknown id), for bindings to check
   their own declarations against. */
enum { MOE_STRUCT_LOAD_PARAMS = 1, MOE_STRUCT_MODEL_INFO = 2, MOE_STRUCT_CTX_PARAMS = 3, MOE_STRUCT_SAMPLER_PARAMS = 4,
       MOE_STRUCT_SAVE_PARAMS = 5, MOE_STRUCT_STATS = 6,
       MOE_STRUCT_PROFILE_ENTRY = 7, MOE_STRUCT_VK_HANDLES = 8 };
MOE_API size_t      moe_struct_size(int32_t which);
MOE_API const char *moe_status_str(moe_status s);     /* static string for a code */
MOE_API const char *moe_last_error(void);             /* thread-local detail of the last failure on this thread */

/* ---- host-owned Vulkan objects (game engines) ----------------------------------------------
   HOST-OWNED VULKAN OBJECTS. An application that already has a VkInstance, VkDevice and a compute
   queue hands them to moe_load through moe_load_params.vk; moe then creates nothing on the
   instance or device level (no instance, device, debug messenger), only buffers, memory, pipelines,
   command pools and fences on the host's device, which it destroys when the model is freed. It
   never destroys the instance, device or queue, and never calls vkDeviceWaitIdle on them.
     1. moe_vk_requirements(physical_device, ...) says what to enable when creating the device:
        one line per item, "api 1.2", "extension NAME", "feature NAME" (NAME: the VkPhysicalDevice*
        Features member), e.g. "extension VK_KHR_push_descriptor" and "feature
        shaderStorageBufferArrayDynamicIndexing"; optional ones (NVIDIA cooperative matrices for
        prefill on tensor cores) are listed only where the device has them.
     2. Create the device with those (more is fine), fill moe_vk_handles and pass
        device_create_info (the VkDeviceCreateInfo used, read during moe_load only) so moe knows
        what is enabled: Vulkan has no query for it. Without it moe assumes the required items only
        and takes no optional path (no cooperative matrices).
     3. With less than required, moe_load fails with MOE_ERR_DEVICE naming what is missing (for
        example "the device was created without VK_KHR_push_descriptor"); without the optional
        items it takes the slower paths. Bad handles (a NULL instance, physical device, device or
        queue, a queue family without compute) give MOE_ERR_INVALID_ARG.
   Queue: every vkQueueSubmit and vkQueueWaitIdle moe makes on the queue runs between
   queue_lock(user, 1) and queue_lock(user, 0) (when queue_lock is set), from whichever thread
   steps a context; the host holds its own lock for its submits to the same queue. Functions are
   loaded through get_instance_proc_addr (NULL: vkGetInstanceProcAddr of libvulkan.so.1 /
   vulkan-1.dll). Lifetime: instance, device and queue must outlive the model (and its contexts:
   the last moe_ctx_free or moe_model_free releases moe's objects on the device). The validation
   layer, if wanted, is the host's to enable (MOE_VK_VALIDATION applies to moe's own instance). */
typedef struct moe_vk_handles {             /* the host keeps ownership; moe never destroys these */
    void    *instance;                      /* VkInstance (API version 1.2 or later) */
    void    *physical_device;               /* VkPhysicalDevice */
    void    *device;                        /* VkDevice, created with what moe_vk_requirements lists */
    void    *queue;                         /* a VkQueue with compute */
    uint32_t queue_family;                  /* the family of queue */
    uint32_t reserved0;
    void    *get_instance_proc_addr;        /* PFN_vkGetInstanceProcAddr; NULL = from libvulkan/vulkan-1.dll */
    void   (*queue_lock)(void *user, int32_t lock);  /* optional: the host's external sync of the queue */
    void    *queue_lock_user;
    const void *device_create_info;         /* optional: the VkDeviceCreateInfo of device (its extension
                                               list and feature chain; read during moe_load only) */
} moe_vk_handles;

/* Which device extensions and features moe wants enabled on physical_device, as text lines (see
   HOST-OWNED VULKAN OBJECTS), into buf with a NUL after them when it fits; *n_out = bytes without
   the NUL; out-parameter rule of ABI above. MOE_ERR_DEVICE (message naming why) when the device
   cannot run moe at all. Physical-device queries go through the loader's exported entry points
   (libvulkan.so.1 / vulkan-1.dll), as there is no instance to ask get_instance_proc_addr with. */
MOE_API moe_status moe_vk_requirements(void *physical_device, void *get_instance_proc_addr, char *buf, int32_t cap,
                                       int32_t *n_out);

/* PIPELINE CACHE. Compiling the compute pipelines (on first use of each kernel) is most of a
   first step on drivers that compile slowly. A cache from moe_load_params.vk_pipeline_cache_path
   or _data is checked before use: moe's envelope (magic, version, length, checksum) and then
   Vulkan's header (header version, vendor, device and pipelineCacheUUID of this device); anything
   else is ignored with a MOE_LOG_WARN line and an empty cache is used: a stale cache (other
   driver or GPU) or a damaged file costs only the compile time. Like a model file, a well-formed
   forged cache cannot be told from a real one: the driver parses its contents. The log says at
   MOE_LOG_INFO how many bytes were used, and when the model is freed how many pipelines were built
   and in how long. The path form writes the cache back when the model is freed (path.tmp.PID,
   then rename, so readers never see half a file). The blob form: moe_vk_pipeline_cache_get. */
/* The model's pipeline cache as it is now (grows as kernels are first used: call it after some
   steps, or before freeing the model), in the envelope moe_load_params.vk_pipeline_cache_data
   takes. Out-parameter rule of ABI above, in bytes (size query: buf NULL, cap 0).
   MOE_ERR_UNSUPPORTED on the CPU backend. */
MOE_API moe_status moe_vk_pipeline_cache_get(const moe_model *model, void *buf, size_t cap, size_t *n_out);

/* ---- load ---------------------------------------------------------------------------------- */
typedef struct moe_load_params {            /* all-zero (or a NULL pointer) means defaults */
    int32_t  backend;                       /* MOE_BACKEND_*; AUTO = Vulkan on a GPU if one is usable,
                                               else the CPU backend (a CPU-type Vulkan device such as
                                               lavapipe or SwiftShader is left to the CPU backend, which
                                               is far faster there; VULKAN asked for explicitly uses it);
                                               the choice and its reason go to log at MOE_LOG_INFO */
    int32_t  device_index;                  /* Vulkan physical device; 0 = best (discrete first) */
    int32_t  n_threads;                     /* CPU threads of the model's compute pool (all its contexts
                                               share it); 0 = all cores */
    int32_t  reserved0;
    uint64_t gpu_budget_bytes;              /* 0 = no limit; caps the device memory of the weights (Vulkan).
                                               Below what they take, non-expert weights stay resident and
                                               the rest is a slot cache of experts; every expert also lives
                                               in host-visible memory (expert bytes of host memory) that the
                                               GPU reads a miss from; logits stay bit-identical. Below the
                                               minimum working set MOE_ERR_NO_MEMORY naming it (AUTO then
                                               takes the CPU). Together with a host_budget_bytes below the
                                               weights: no expert lives in host-visible memory; each MoE
                                               layer's route op waits for the router, the layer's missed
                                               experts come from the host tier into a one-layer stage and
                                               on to the slots (still bit-identical) */
    uint64_t host_budget_bytes;             /* 0 = no limit; caps the host memory of the weights. CPU backend:
                                               below the weights, experts are read from the file with pread
                                               into a cache of the budget less the non-expert weights, on
                                               demand, with read-ahead of the next layer's predicted experts;
                                               logits stay bit-identical. Below the minimum working set
                                               (non-expert weights + one token's experts of a layer) moe_load
                                               fails with MOE_ERR_NO_MEMORY naming it. Environment: MOE_EVICT=
                                               slru (default: scan-resistant, a prefill cannot flush what decode
                                               reuses) | lru | lfu (both tiers; another value: moe_load fails
                                               with MOE_ERR_INVALID_ARG), MOE_PREFETCH=0 | 1 (default), MOE_PREFETCH_ODDS=
                                               0..1 (a predicted expert is read ahead only when predictions
                                               of its rank were routed at least this often at its layer
                                               lately; default 0.35, 0: all; another value: INVALID_ARG),
                                               MOE_IO_DIRECT=1 (O_DIRECT reads), MOE_IO_THREADS=N (4). Vulkan with a
                                               gpu_budget_bytes below the weights too: the same host tier
                                               under the GPU slot cache; its minimum adds one layer's experts
                                               (the stage). Vulkan otherwise: the experts' mapped pages are
                                               dropped after the upload */
    int32_t (*progress)(float fraction, void *user);   /* optional; return non-zero to cancel the load */
    void    (*log)(int32_t level, const char *msg, void *user);  /* optional; default: silent */
    void    *user;
    int32_t  vocab_only;                    /* 1 = load only the tokenizer: a .gguf, a tokenizer.json, or a
                                               directory with tokenizer.json (+ tokenizer_config.json,
                                               config.json); a path ending in .json implies it */
    int32_t  cpu_exact;                     /* CPU backend matrix products: 0 = default, activations quantized
                                               to int8 per block (f32 scale) and multiplied in integers, like
                                               llama.cpp (fast; logits move by ~1% of their range);
                                               1 = f32 activations: bit-reproducible, the reference mode */
    int32_t  gpu_exact;                     /* Vulkan matrix products: 0 = default, prefill tiles on f16
                                               tensor cores where the device has them (activations rounded
                                               to 11 bits: logits move by ~1e-3 of their range); 1 = f32
                                               activations everywhere, within float rounding of cpu_exact
                                               (slower prefill); the reference mode for fixtures */
    const moe_vk_handles *vk;               /* NULL = moe creates its own instance and device; else the
                                               host's Vulkan objects (HOST-OWNED VULKAN OBJECTS above),
                                               with backend VULKAN or AUTO (CPU: MOE_ERR_INVALID_ARG); AUTO
                                               then uses that device whatever its type, and a failure is
                                               returned, never a fallback to the CPU backend */
    const char *vk_pipeline_cache_path;     /* optional: a pipeline cache file, read at load when valid
                                               (else ignored with a log line) and written when the model
                                               is freed (temporary file + rename) */
    const void *vk_pipeline_cache_data;     /* optional: a pipeline cache blob (moe_vk_pipeline_cache_get);
                                               read at load, not kept; with a path too, the blob wins */
    size_t   vk_pipeline_cache_size;
} moe_load_params;

/* path: a .gguf file, or a Hugging Face model directory (config.json + *.safetensors + tokenizer.json);
   with vocab_only (or a path to a tokenizer.json) only the tokenizer is loaded: the tokenizer
   calls work, moe_ctx_new does not; of a .gguf, moe_model_get_info also gives weight_bytes and
   expert_bytes (from the tensor table, no tensor data read) for choosing budgets. */
MOE_API moe_status moe_load(const char *path, const moe_load_params *params, moe_model **out);
/* Releases the caller's reference (NULL-safe): the model is freed now if it has no contexts, else
   when its last context is freed (THREADS AND LIFETIMES above). */
MOE_API void       moe_model_free(moe_model *model);

typedef struct moe_model_info {
    char     arch[32];                      /* "qwen3moe", "gemma4", "qwen35moe", ... */
    int32_t  n_vocab, n_layer, n_embd, n_ctx_train;
    int32_t  n_expert, n_expert_used;       /* 0 for dense models */
    moe_token bos, eos;                     /* -1 when absent */
    uint64_t n_params, file_bytes;
    int32_t  backend;                       /* the backend actually in use */
    uint64_t weight_bytes;                  /* all weights as stored */
    uint64_t expert_bytes;                  /* routed-expert weights: what streaming keeps out of memory */
} moe_model_info;
MOE_API moe_status moe_model_get_info(const moe_model *model, moe_model_info *out);

/* ---- tokenizer ----------------------------------------------------------------------------- */
/* Vocabularies: byte-level BPE (GGUF "gpt2": Qwen2/Qwen3, gpt-oss/GPT-4o, Llama-3, GPT-2 splits)
   and SentencePiece-style BPE with byte fallback (GGUF "llama" and "gemma4": Gemma 3, Gemma 4), from GGUF metadata or a
   Hugging Face tokenizer.json; ids match Hugging Face `tokenizers`. A model without tokenizer
   metadata still loads; these calls then fail with MOE_ERR_UNSUPPORTED.
   Each call returns a moe_status and its count through n_out, as ABI above says: MOE_OK with the
   count written, MOE_ERR_BUFFER_TOO_SMALL with the count needed (moe_last_error() says so), or an
   error with moe_last_error() set. */

/* flags: MOE_TOKENIZE_ADD_SPECIAL adds what the vocabulary adds around a text (BOS for Gemma,
   nothing for Qwen3 or gpt-oss); MOE_TOKENIZE_PARSE_SPECIAL turns special-token text such as
   "<|im_end|>" into that token (longest match), otherwise it is tokenized as plain text. Added
   tokens that are not special (Qwen3's "<think>", Gemma's "\n\n") are always recognised, as in
   Hugging Face. Any bytes are accepted, invalid UTF-8 included.
   *n_out: the token count. Too small a cap: MOE_ERR_BUFFER_TOO_SMALL, and out[0..cap) may have
   been written (the first cap tokens), nothing beyond. */
MOE_API moe_status moe_tokenize(const moe_model *model, const char *text, int32_t text_len,
                                moe_token *out, int32_t cap, int32_t flags, int32_t *n_out);
/* The raw bytes of one token (may be a partial UTF-8 sequence: buffer them while streaming);
   special tokens give their text. Not NUL-terminated. *n_out: the byte count; too small a cap:
   MOE_ERR_BUFFER_TOO_SMALL and buf untouched. */
MOE_API moe_status moe_token_to_piece(const moe_model *model, moe_token token, char *buf, int32_t cap,
                                      int32_t *n_out);
/* Whole-sequence detokenization: the concatenated pieces, byte for byte (not NUL-terminated).
   flags: MOE_TOKENIZE_PARSE_SPECIAL renders special tokens as their text; without it they are
   left out. detokenize(tokenize(x)) == x for any bytes x with the same flags, up to the
   vocabulary's normalization (Qwen3 applies NFC; Gemma reads U+2581 as a space).
   *n_out: the byte count; too small a cap: MOE_ERR_BUFFER_TOO_SMALL, buf[0..cap) holds a prefix.
   A token outside the vocabulary: MOE_ERR_INVALID_ARG, buf untouched. */
MOE_API moe_status moe_detokenize(const moe_model *model, const moe_token *tokens, int32_t n_tokens,
                                  char *buf, int32_t cap, int32_t flags, int32_t *n_out);
/* End of generation: the vocabulary's eos/eot/eom ids and the families' end markers
   (<|im_end|>, <|endoftext|>, <end_of_turn>, <turn|>, <eos>, <|return|>, <|call|>, ...). 0/1 */
MOE_API int32_t moe_token_is_eog(const moe_model *model, moe_token token);

/* Render a chat with the model family's template, chosen from the template text in the metadata,
   else the architecture: ChatML with Qwen3's reasoning rules ("system", "user", "assistant",
   "tool"), Gemma 3 ("user"/"assistant" alternating after an optional "system"; starts with the BOS
   text, so tokenize the result with PARSE_SPECIAL and without ADD_SPECIAL), Gemma 4 ("system" or
   "developer", "user", "assistant"/"model" in any order; BOS text first as for Gemma 3; thinking
   spans <|channel>...<channel|> are cut from assistant messages, and the assistant prompt ends with
   the empty thought block that turns thinking off, where the model's template has it), gpt-oss Harmony
   ("system" or "developer" first, then "user"/"assistant"; the system message carries today's
   date). Other templates give MOE_ERR_UNSUPPORTED, unknown roles MOE_ERR_INVALID_ARG.
   *n_out: the byte count (a NUL follows when it fits, not counted); too small a cap:
   MOE_ERR_BUFFER_TOO_SMALL and buf untouched; an error (unknown role, ...) leaves buf untouched. */
MOE_API moe_status moe_chat_apply(const moe_model *model, const char *const *roles,
                                  const char *const *contents, int32_t n_messages,
                                  int32_t add_assistant_prompt, char *buf, int32_t cap, int32_t *n_out);

/* ---- contexts and stepping ------------------------------------------------------------------ */
typedef struct moe_ctx_params {             /* all-zero (or NULL) means defaults */
    int32_t n_ctx;                          /* 0 = min(model n_ctx_train, 4096) */
    int32_t kv_type;                        /* MOE_KV_* */
    int32_t logits_all;                     /* 1 = keep logits for every token of a step (for scoring) */
    int32_t n_batch;                        /* max tokens per internal prefill chunk; 0 = default (256) */
    int32_t (*abort)(void *user);           /* optional; polled between chunks and layers of a step (CPU:
                                               where each layer's attention or delta rule begins;
                                               Vulkan: between submissions, see max_submit_us).
                                               Non-zero: the step stops with MOE_ERR_CANCELLED and the
                                               context is exactly as before it (ASYNCHRONOUS STEPS) */
    void    *abort_user;
    uint32_t max_submit_us;                 /* Vulkan: cap on the GPU time of one queue submission, in
                                               microseconds; a longer chunk is split into several
                                               submissions (at dispatch boundaries, from a cost estimate
                                               calibrated with timestamps); results are bit-identical.
                                               0 = no cap (one submission per chunk). CPU: ignored.
                                               moe_step_batch: ctxs[0]'s applies to the pass */
    int32_t  low_priority;                  /* 1 = submit to a low-priority queue where moe created the
                                               device and the queue family has two queues (else the
                                               normal queue; the log says which). moe_step_batch:
                                               ctxs[0]'s applies to the pass */
} moe_ctx_params;

MOE_API moe_status moe_ctx_new(moe_model *model, const moe_ctx_params *params, moe_ctx **out);
/* NULL-safe; releases the context's reference to its model (the last one frees the model). */
MOE_API void       moe_ctx_free(moe_ctx *ctx);

/* Feed n_tokens tokens (a prompt chunk or one sampled token) at the current position.
   Afterwards moe_logits() gives the next-token logits. MOE_ERR_CONTEXT_FULL if they do not fit;
   on any error the context is left exactly as before the call. */
MOE_API moe_status   moe_step(moe_ctx *ctx, const moe_token *tokens, int32_t n_tokens);
/* ASYNCHRONOUS STEPS. moe_step_submit starts the same step and returns at once: the context's
   worker thread (one per context, started by its first submit, ended by moe_ctx_free) runs it,
   on the CPU backend computing it, on Vulkan recording and submitting its command buffers and
   waiting on their fences. Validation errors (NULL ctx, bad tokens, MOE_ERR_CONTEXT_FULL) come
   back from submit itself, the context unchanged and no step started. Until moe_step_wait
   returns something other than MOE_ERR_TIMEOUT the context accepts only moe_step_wait and
   moe_ctx_free; every other call on it returns MOE_ERR_BUSY (moe_logits: NULL, moe_ctx_pos:
   MOE_ERR_BUSY) and changes nothing. moe_step_wait(ctx, timeout_ns): MOE_ERR_TIMEOUT while the
   step runs (timeout_ns = 0 polls without blocking, UINT64_MAX waits for good), else the step's
   status exactly as moe_step would have returned it (MOE_OK: logits readable; an error: context
   as before, moe_last_error() on the waiting thread says why). moe_step_wait without a step in
   flight: MOE_ERR_INVALID_ARG. moe_ctx_free during a step asks it to stop (as abort does), waits
   for the worker, then frees. moe_step is submit + wait(UINT64_MAX) without the worker.
   A frame loop: submit in one frame, moe_step_wait(ctx, 0) in the next ones until it is not
   MOE_ERR_TIMEOUT, then read moe_logits and sample.
   ABORT. moe_ctx_params.abort is polled on the thread that runs the step: before each chunk, and
   on the CPU before each layer's blocks, on Vulkan between the submissions of a chunk (see
   max_submit_us: with a cap, a long prefill is stoppable every max_submit_us or so). When it
   returns non-zero the step stops with MOE_ERR_CANCELLED and the context is exactly as before
   the step: position, KV cache, logits, stats, and for hybrid models the conv and recurrent
   states (a context with an abort callback copies them at the start of each step and puts them
   back on a cancel: one copy of the recurrent state per step, see moe_ctx_rewind for sizes).
   Sliding-window layers (Gemma 4) may have lost ring rows to the cancelled chunk; then, as after
   any failed step, the next step or rewind recomputes them first. The same step run again gives
   bit-identical logits. */
MOE_API moe_status   moe_step_submit(moe_ctx *ctx, const moe_token *tokens, int32_t n_tokens);
MOE_API moe_status   moe_step_wait(moe_ctx *ctx, uint64_t timeout_ns);
/* GPU time of this context's queue submissions (Vulkan with timestamps; for frame budgets and
   max_submit_us): how many there were, the longest and their sum, in microseconds, since the
   context was made or this was last called with reset = 1. MOE_ERR_UNSUPPORTED on the CPU
   backend or a queue without timestamps. Any pointer may be NULL. */
MOE_API moe_status   moe_ctx_submit_times(moe_ctx *ctx, uint64_t *n_submits, double *max_us, double *total_us,
                                          int32_t reset);
/* n_vocab floats; i = -1: last token of the last step; i >= 0 (index within the last step) needs
   logits_all. NULL when there are no such logits. Valid until the next call on ctx. */
MOE_API const float *moe_logits(const moe_ctx *ctx, int32_t i);
MOE_API int32_t      moe_ctx_pos(const moe_ctx *ctx);            /* tokens currently in the context */
/* Keeps the first pos tokens and forgets the rest; afterwards the context is bit for bit what it
   was when it first held pos tokens. Cost: none for full-attention caches. Sliding-window layers
   (Gemma 4) keep a ring of window + n_batch - 1 rows, so a rewind of up to n_batch tokens is free
   too; a longer one recomputes the caches from the context's token history (a prefill of pos
   tokens). A failed step can leave a ring short of rows it needs; the next step or rewind then
   recomputes the same way.
   RECURRENT STATE (hybrid Gated DeltaNet models: Qwen3-Next, Qwen3.5). A recurrent state (per
   DeltaNet layer: the conv's last 3 inputs and an f32 nv × k_dim × v_dim matrix) cannot be
   rewound by moving the position, so such a context also keeps
     - where each forward chunk began (1 byte per position, beside the token history),
     - checkpoints of all recurrent states at every K-th position, K = n_ctx / 8 rounded up to a
       multiple of 64 (at least 64): floor((n_ctx - 1) / K) <= 7 slots. Chunks of moe_step also
       end at multiples of K so the checkpoints land there.
   moe_ctx_rewind(ctx, pos) restores the newest checkpoint at or before pos (or the empty state)
   and feeds the tokens from there to pos again, in the chunks they first went through, the last
   one cut at pos. Every op computes a token from earlier tokens only, the same way whatever the
   chunk, so the result is bit-identical to having stopped at pos. (The chunked (WY) form of the
   delta rule, in sub-chunks of 64 counted from an op's first token, keeps this: the replayed op
   is the first one cut at pos, whose rows are those of the uncut op.)
   Cost: memory of (slots + 1) copies of the recurrent state per context — Qwen3-Next-80B
   (36 layers × (2 MiB + 96 KiB)): 75 MiB per copy, 603 MiB for 8 copies at n_ctx 4096;
   Qwen3.5-397B (45 × (4 MiB + 144 KiB)): 186 MiB per copy, 1.46 GiB for 8 — plus 5 bytes per
   position; time: up to K - 1 tokens of prefill per rewind (less when pos is near a
   checkpoint), none when pos is the current position. Rewinds after moe_ctx_load replay from
   the start (or from checkpoints taken since), as snapshots carry only the live state. */
MOE_API moe_status   moe_ctx_rewind(moe_ctx *ctx, int32_t pos);

/* Snapshot / restore of a context (prompt caching). Size query: buf = NULL.
   A state holds the last step's logits, the token history and the cache rows in use (a ring: the
   rows it holds); a hybrid model's also the live recurrent states (f32) and the chunk starts,
   not the checkpoints, so a restored context continues at full speed. It belongs to the model (its tensor table and samples of its weights), n_ctx
   and kv_type it was saved from (and n_batch, for models with sliding-window layers): another
   model or context shape gives MOE_ERR_INVALID_ARG. moe_ctx_load checks what is cheap to check
   (header, version, sizes, positions against the cache rows, checksum, every logit and cache value
   finite, every token in the vocabulary) and refuses a bad state with MOE_ERR_FORMAT, leaving the
   context as it was. It cannot tell a well-formed forged cache from a real one: a state blob is
   as trusted as a model file, so load only states from sources you would take a model file from.
   The format is versioned; a state of another moe version may be refused (MOE_ERR_FORMAT). */
MOE_API moe_status moe_ctx_save(const moe_ctx *ctx, void *buf, size_t cap, size_t *size_out);
MOE_API moe_status moe_ctx_load(moe_ctx *ctx, const void *buf, size_t size);

/* ---- sampling ------------------------------------------------------------------------------
   A moe_sampler holds settings, a seeded RNG and the history of recorded tokens (every token
   moe_sample() returns, and every token given to moe_sampler_accept()). moe_sample() turns one
   row of logits into a token through this fixed pipeline:

     1. penalties    for each distinct token seen c > 0 times among the last repeat_last_n
                     recorded tokens (llama.cpp's semantics):
                       logit = logit > 0 ? logit / repeat_penalty : logit * repeat_penalty
                       logit = logit - (c * frequency_penalty + presence_penalty)
     2. top-k        keep the top_k best tokens
     3. temperature  weight w = floor(2^44 * exp((logit - max) / temperature)), an integer
                     (2^44 becomes 2^(63 - ceil(log2 n)) above n = 2^19 candidates)
     4. top-p        keep the smallest set of best tokens whose weight reaches top_p * total weight
     5. min-p        keep tokens with w >= min_p * w_max (that is, p >= min_p * p_max)
     6. draw         U = the top 24 bits of one RNG output; target = floor(U * W / 2^24), W the
                     kept weight; the pick is the first kept token, in id order, whose running
                     weight exceeds target (so token i has probability w_i / W, to 2^-24)

   "Best" ranks by logit after penalties, ties to the lower token id. NaN logits count as -inf;
   -inf tokens are never picked, and if no other token is left moe_sample() returns -1. Tokens
   more than ~30.5 * temperature below the best get weight 0 (p < 2^-44 p_max) and are never
   drawn. temperature <= 0 is greedy: the argmax after the penalties (ties: lowest id), with no
   RNG draw; top-k / top-p / min-p are moot.

   Determinism: the same seed and the same logits give the same tokens on every platform with
   IEEE-754 floats (not x87). The only floating-point steps are the penalties and, per token,
   y = (double(logit) - double(max)) * (2^32 * log2(e) / temperature), each a correctly rounded
   IEEE operation; exp comes from a fixed-point exp2 of the integer trunc(y) (relative error
   < 1e-9), and every later step is integer arithmetic, so sums are exact in any order.
   The RNG is xoshiro256** (Blackman & Vigna 2018) with its four state words set to four
   successive outputs of splitmix64 started at `seed`; each non-greedy moe_sample() consumes
   exactly one output. (Outputs for seed 0: 0x99ec5f36cb75f2b4, 0xbf6e1f784956452a, ...)

   Cost: O(n_vocab) per call, no sorting. Memory: moe_sampler_new allocates the history;
   moe_sample allocates scratch (36 bytes per token) for the largest n_vocab seen, once. Errors
   (NULL sampler or logits, n_vocab <= 0, out of memory, no finite logit) return -1 and set
   moe_last_error(); the sampler stays usable. One thread at a time per sampler. */
typedef struct moe_sampler_params {         /* all-zero means greedy */
    float    temperature;                   /* <= 0: greedy */
    int32_t  top_k;                         /* 0 = off */
    float    top_p;                         /* 0 or 1 = off */
    float    min_p;                         /* 0 = off */
    float    repeat_penalty;                /* 0 or 1 = off */
    int32_t  repeat_last_n;                 /* history window for penalties; 0 = 64 */
    float    presence_penalty, frequency_penalty;   /* 0 = off */
    uint64_t seed;                          /* same seed + same logits = same tokens */
} moe_sampler_params;

/* params NULL = all zero. MOE_ERR_INVALID_ARG for a NaN temperature, top_k < 0, top_p or min_p
   outside [0, 1], a negative or non-finite repeat_penalty, repeat_last_n < 0, or a non-finite
   presence / frequency penalty. */
MOE_API moe_status moe_sampler_new(const moe_sampler_params *params, moe_sampler **out);
MOE_API void       moe_sampler_free(moe_sampler *s);              /* NULL-safe */
/* Picks a token from n_vocab logits and records it in the history; -1 on error (see above). */
MOE_API moe_token  moe_sample(moe_sampler *s, const float *logits, int32_t n_vocab);
/* Records a token chosen by the caller (for the penalties); negative tokens are ignored. */
MOE_API void       moe_sampler_accept(moe_sampler *s, moe_token token);
/* Forgets the history and re-seeds the RNG with params.seed: the sampler is as new. */
MOE_API void       moe_sampler_reset(moe_sampler *s);

/* ---- export ------------------------------------------------------------------------------- */
/* Writes a loaded model (from GGUF or a Hugging Face directory) as a GGUF file that moe and
   llama.cpp load, re-quantizing the weight matrices. Norms stay F32 and the router F32, as
   llama.cpp's quantizer does; the output matrix of MOE_FTYPE_Q4_K files is Q6_K. A matrix whose
   rows do not fit the chosen block size falls back to Q8_0, then F16. */
enum { MOE_FTYPE_KEEP = 0, MOE_FTYPE_F32 = 1, MOE_FTYPE_F16 = 2, MOE_FTYPE_BF16 = 3, MOE_FTYPE_Q8_0 = 4,
       MOE_FTYPE_Q4_K = 5, MOE_FTYPE_Q5_K = 6, MOE_FTYPE_Q6_K = 7, MOE_FTYPE_Q4_0 = 8 };
typedef struct moe_save_params {            /* all-zero (or NULL) = keep the stored types */
    int32_t ftype;                          /* MOE_FTYPE_* */
    int32_t reserved0;
    int32_t (*progress)(float fraction, void *user);   /* optional; non-zero cancels (no file is left) */
    void    *user;
} moe_save_params;
MOE_API moe_status moe_model_save(const moe_model *model, const char *path, const moe_save_params *params);

/* ---- introspection ------------------------------------------------------------------------- */
/* expert_hits / expert_misses count (token, layer, routed expert) pairs of this context's steps:
   a hit found its expert in memory (a resident run counts hits only; a prefetched expert counts
   as a hit), a miss had to wait for it to be read; expert_bytes_streamed: bytes this context had
   read from the file (demand and prefetch). Vulkan GPU expert cache: a hit found its expert in a
   device slot, a miss read it from host-visible memory; bytes: the missed experts read over the
   bus plus the bytes copied into slots (over a host tier: the missed experts' bytes sent to the
   device once, plus the bytes read from the file). */
typedef struct moe_stats {
    uint64_t gpu_bytes_weights, gpu_bytes_kv, gpu_bytes_scratch, host_bytes;
    uint64_t expert_hits, expert_misses, expert_bytes_streamed;
    uint64_t n_prompt_tokens, n_gen_tokens;
    double   t_prompt_s, t_gen_s, t_load_s;
} moe_stats;
MOE_API moe_status moe_ctx_get_stats(const moe_ctx *ctx, moe_stats *out);

/* Profiling: time per kernel kind. moe_ctx_profile(ctx, 1) clears the counters and starts
   collecting, 0 stops (collecting costs time: the Vulkan backend then serializes its dispatches
   and timestamps each one; the CPU backend times each op). moe_ctx_profile_get copies up to cap
   entries, largest time first, and returns how many there are. seconds: CPU wall time of the op,
   or GPU time between timestamps. bytes / flops: what the kernels of that kind had to read and
   write / compute, estimated from the shapes (weights of the experts actually routed on the CPU,
   of min(n_expert, n·k) experts on the GPU; K/V rows each token attends to); 0 when not counted.
   moe_ctx_probe_bandwidth measures the memory the backend computes from, once: the CPU reads a
   large buffer with the context's threads (read_gbs) and copies one (copy_gbs, read + written
   bytes); Vulkan runs a plain copy kernel between two device buffers (read_gbs = copy_gbs = read
   + written bytes per second). Either pointer may be NULL. */
typedef struct moe_profile_entry {
    char     kind[48];                      /* e.g. "matvec q4_K", "attention f16" */
    int32_t  decode;                        /* 1: steps of one token; 0: prompt steps */
    int32_t  calls;                         /* kernels (dispatches, ops) of this kind */
    double   seconds, bytes, flops;
    uint64_t tokens;                        /* tokens of the steps of this phase */
} moe_profile_entry;
MOE_API moe_status moe_ctx_profile(moe_ctx *ctx, int32_t on);
MOE_API int32_t    moe_ctx_profile_get(const moe_ctx *ctx, moe_profile_entry *out, int32_t cap);
MOE_API moe_status moe_ctx_probe_bandwidth(moe_ctx *ctx, double *read_gbs, double *copy_gbs);

/* ---- one forward pass for many contexts (many characters, one model) ----------------------------
   Steps n_ctxs contexts of the same model together: context i takes the n_tokens[i] tokens at
   tokens[i] (a prompt chunk or one sampled token; contexts may stand at different positions and
   mix prefill with decode). Afterwards moe_logits(ctxs[i], ...) gives each context's logits, as
   after moe_step(ctxs[i], tokens[i], n_tokens[i]).
   - CPU backend: one forward pass over the token rows of all contexts: the weights (dense matrices,
     experts, LM head) are read once per pass, attention runs per context over its own KV cache and
     positions, Gated DeltaNet layers (hybrid models) per context on its own states. Results are
     BIT-IDENTICAL to separate moe_step calls (the batch-shape tolerance is 0): every CPU kernel
     computes a row exactly as it would alone (the same property that makes prefill equal decode).
     A pass holds up to max(512, largest n_batch) rows; longer steps take several passes, each
     context cut into the chunks moe_step would make. The pass's scratch buffers are kept by
     ctxs[0] until it is freed (reuse the same first context for steady frames).
   - Vulkan backend: the same pass as ONE queue submission (no host wait inside it): embedding,
     norms, matrix products, router, experts and LM head run once over all contexts' rows (each
     weight read once per pass); q/k norm + rope, the KV store and attention are dispatched per
     context on its own caches and positions, and so are the conv and delta rule of Gated DeltaNet
     layers (hybrid models) on its own recurrent states (the chunked delta rule where the context
     alone takes it), with its checkpoints written where its lone step writes them. Not
     bit-identical to separate steps: a pass of more than 8 rows takes the tiled matrix-product
     kernels where a context alone takes matrix-vector ones (another summation order, as prefill
     against decode), within 1e-5 of the logit range with f32 KV caches (f16 tensor-core tiles:
     3e-3; f16 KV caches: a K/V element may round to the neighbouring binary16, up to 2e-3; both
     together on a model with sharp attention can drift further over many steps, 5e-2 on our
     Gemma 4 fixture, where gpu_exact keeps 3e-4), greedy tokens the same in our tests; a pass
     of at most 8 rows in all, one per context (up to 8 contexts decoding, or stepping with
     n_batch 1), is bit-identical (segments of several rows may differ from their lone steps in
     the last bits even within 8 rows: the tolerance above).
     The pass's scratch (kept by ctxs[0], counted in its moe_ctx_get_stats gpu_bytes_scratch)
     holds the activations of up to 512 rows but logits (n_vocab floats a row, on the device and in the host-visible readback)
     only for the rows the contexts expose: one per context, every row of a logits_all one; so
     64 contexts prefilling together keep 64 rows of logits, not 512. A pass follows ctxs[0]'s
     low_priority (its queue) and max_submit_us (split into submissions that fit the cap, the same
     results); the other contexts' settings do not apply to it. The abort callbacks of all
     contexts are polled before each pass, ctxs[0]'s also between its submissions.
   - Not batched, stepped one by one inside the call with the same results and the same
     all-or-nothing contract: GPU or host expert streaming (gpu_budget_bytes / host_budget_bytes
     below the weights), contexts with moe_ctx_profile on, and on Vulkan models whose per-head row
     widths (attention, Gated DeltaNet) are not multiples of the device's storage-buffer offset
     alignment.
   Cancel: any context's abort callback, polled before each pass, cancels the whole call
   (MOE_ERR_CANCELLED naming that context); every context is then as before the call.
   Errors: MOE_ERR_INVALID_ARG for n_ctxs <= 0, NULL arrays or contexts, contexts of different
   models, a context given twice, a token outside the vocabulary; MOE_ERR_CONTEXT_FULL when a
   context's tokens do not fit. The message names the context's index. On any error every context
   is left as it was (position, logits, caches, counters). Contexts of one call must not be in use
   by another thread during it. */
MOE_API moe_status moe_step_batch(moe_ctx *const *ctxs, const moe_token *const *tokens,
                                  const int32_t *n_tokens, int32_t n_ctxs);

#ifdef __cplusplus
}
#endif

/* ============================================================================================ */
/* PRIVATE: the interface shared by moe.c and moe_vk.c. Not part of the API; do not use.         */
/* ============================================================================================ */
#ifdef MOE_INTERNAL
/* Names shared by moe.c, moe_vk.c and shaders_embedded.c are marked MOE_HIDDEN: they link across
   those files but are never exported from a shared library (the Makefile also builds the library
   objects with -fvisibility=hidden; make test-symbols checks that libmoe.so exports exactly the
   MOE_API functions above). Windows DLLs export only what MOE_API marks dllexport. */
#if defined(__GNUC__) && !defined(_WIN32) && !defined(__CYGWIN__)
#define MOE_HIDDEN __attribute__((visibility("hidden")))
#else
#define MOE_HIDDEN
#endif

/* Type ids follow ggml's numbering so that GGUF tensor types map directly. */
enum {
    MOE_TYPE_F32 = 0, MOE_TYPE_F16 = 1, MOE_TYPE_Q4_0 = 2, MOE_TYPE_Q8_0 = 8, MOE_TYPE_Q4_K = 12,
    MOE_TYPE_Q5_K = 13, MOE_TYPE_Q6_K = 14, MOE_TYPE_BF16 = 30, MOE_TYPE_MXFP4 = 39
};

#define MOE_MAX_DIMS 4
typedef struct moe_weight {
    const char *name;          /* points into the file's tensor table */
    int32_t type, n_dims;
    int64_t ne[MOE_MAX_DIMS];  /* innermost first: ne[0] = input features */
    uint64_t nbytes, row_bytes;
    const uint8_t *data;       /* host bytes: the file mapping, or model-owned f32 for small vectors */
    /* 3-D expert tensors: one contiguous slab per expert, addressed through this indirection
       table (expert id → where its bytes are now). Streaming changes the table, never the math. */
    uint64_t expert_bytes;
    const uint8_t **expert_data;
    void *dev;                 /* backend-private (Vulkan: buffer + offset) */
} moe_weight;

/* ---- the model description (DESIGN.md, "Architectures are data") ---------------------------
   A model is a few global tensors plus n_layer layers. Each layer carries its plan (which kind
   of attention and FFN it runs, with which geometry and activation) and its tensors by role;
   the forward pass reads the plan, never the architecture's name. One X-macro list names every
   role with its GGUF name: the GGUF binder, the Hugging Face loader, the GGUF writer and the
   Vulkan uploader all walk the tensors through it (moe_model_tensor in moe.c). */
enum { MOE_ATTN_NONE = 0, MOE_ATTN_FULL = 1, MOE_ATTN_SLIDING = 2, MOE_ATTN_DELTANET = 3 };
enum { MOE_FFN_DENSE = 0, MOE_FFN_MOE = 1, MOE_FFN_MOE_SHARED = 2, MOE_FFN_MOE_DENSE = 3 };
enum { MOE_ACT_SILU = 0, MOE_ACT_GELU_TANH = 1, MOE_ACT_SWIGLU_OAI = 2 };

/* X(ROLE, GGUF name) — global tensors */
#define MOE_GLOBAL_TENSORS(X)                                                                      \
    X(TOK_EMBD, "token_embd.weight")                                                               \
    X(OUTPUT_NORM, "output_norm.weight")                                                           \
    X(OUTPUT, "output.weight")                  /* absent: tied to TOK_EMBD */                     \
    X(ROPE_FREQS, "rope_freqs.weight")                                                             \
    X(PLE_TOK_EMBD, "per_layer_token_embd.weight") /* per-layer embeddings (Gemma 4 E2B/E4B) */    \
    X(PLE_MODEL_PROJ, "per_layer_model_proj.weight")                                               \
    X(PLE_PROJ_NORM, "per_layer_proj_norm.weight")
/* X(ROLE, GGUF name after "blk.N.") — tensors of one layer */
#define MOE_LAYER_TENSORS(X)                                                                       \
    X(ATTN_NORM, "attn_norm.weight")                                                               \
    X(WQ, "attn_q.weight")                                                                         \
    X(WK, "attn_k.weight")                                                                         \
    X(WV, "attn_v.weight")                                                                         \
    X(WO, "attn_output.weight")                                                                    \
    X(Q_NORM, "attn_q_norm.weight")                                                                \
    X(K_NORM, "attn_k_norm.weight")                                                                \
    X(POST_ATTN_NORM, "post_attention_norm.weight")                                                \
    X(FFN_NORM, "ffn_norm.weight")                                                                 \
    X(FFN_GATE, "ffn_gate.weight")              /* dense (or shared / parallel) FFN */             \
    X(FFN_UP, "ffn_up.weight")                                                                     \
    X(FFN_DOWN, "ffn_down.weight")                                                                 \
    X(POST_FFN_NORM, "post_ffw_norm.weight")                                                       \
    X(ROUTER, "ffn_gate_inp.weight")                                                               \
    X(GATE_EXPS, "ffn_gate_exps.weight")        /* routed experts: 3-D, [n_expert][rows][cols] */  \
    X(UP_EXPS, "ffn_up_exps.weight")                                                               \
    X(DOWN_EXPS, "ffn_down_exps.weight")                                                           \
    /* Gemma 4: sandwich norms, the MoE beside a dense MLP, router and expert scales, PLE */       \
    X(POST_FFN_NORM_1, "post_ffw_norm_1.weight")                                                   \
    X(PRE_FFN_NORM_2, "pre_ffw_norm_2.weight")                                                     \
    X(POST_FFN_NORM_2, "post_ffw_norm_2.weight")                                                   \
    X(ROUTER_SCALE, "ffn_gate_inp.scale")       /* folded at load: router pre-norm weight */       \
    X(EXPERT_SCALE, "ffn_down_exps.scale")      /* per-expert weight on the routing weights */     \
    X(LAYER_SCALE, "layer_output_scale.weight") /* one value: scales the residual stream */        \
    X(PLE_GATE, "inp_gate.weight")                                                                 \
    X(PLE_PROJ, "proj.weight")                                                                     \
    X(PLE_POST_NORM, "post_norm.weight")                                                           \
    /* hybrid models (Gated DeltaNet, ARCHITECTURES.md §3) */                                      \
    X(SSM_QKV, "attn_qkv.weight")               /* [q_all | k_all | v_all], the conv's input */    \
    X(SSM_Z, "attn_gate.weight")                /* z: the output gate */                           \
    X(SSM_BA, "ssm_ba.weight")                  /* Qwen3-Next: b and a, grouped per key head */    \
    X(SSM_BETA, "ssm_beta.weight")              /* Qwen3.5: b */                                   \
    X(SSM_ALPHA, "ssm_alpha.weight")            /* Qwen3.5: a */                                   \
    X(SSM_CONV, "ssm_conv1d.weight")            /* ne {kernel, channels} */                        \
    X(SSM_DT, "ssm_dt.bias")                                                                       \
    X(SSM_A, "ssm_a")                           /* -exp(A_log) */                                  \
    X(SSM_NORM, "ssm_norm.weight")              /* gated output norm: a plain weight */            \
    X(SSM_OUT, "ssm_out.weight")                                                                   \
    X(FFN_GATE_INP_SHEXP, "ffn_gate_inp_shexp.weight")  /* shared expert: sigmoid gate [n_embd] */ \
    X(FFN_GATE_SHEXP, "ffn_gate_shexp.weight")                                                     \
    X(FFN_UP_SHEXP, "ffn_up_shexp.weight")                                                         \
    X(FFN_DOWN_SHEXP, "ffn_down_shexp.weight")
#define MOE_ROLE_ENUM(role, name) MOE_##role,
enum { MOE_GLOBAL_TENSORS(MOE_ROLE_ENUM) MOE_GT_COUNT };
enum { MOE_LAYER_TENSORS(MOE_ROLE_ENUM) MOE_LT_COUNT };
#undef MOE_ROLE_ENUM

/* NeoX (rotate-half) RoPE: element i of a head pairs with i + n_rot/2 for i < n_rot/2, at angle
   pos · base^(-2i / freq_dim) for i < n_freq and 0 beyond (partial / proportional rope); elements
   from n_rot on pass through. Plain rope: n_freq = n_rot/2, freq_dim = n_rot. */
typedef struct moe_rope {
    int32_t n_rot, n_freq, freq_dim;
    float base;
} moe_rope;

/* The geometry an attention op works with (it never reads the model's hyperparameters). */
typedef struct moe_attn {
    int32_t n_head, n_head_kv, head_dim;
    int32_t window;            /* sliding: keys per query, itself included; 0 = all earlier keys */
    float scale;               /* on q·k */
    int32_t cache;             /* the KV cache it stores into and reads (moe_cache_plan index) */
    int32_t store;             /* 0: KV-shared layer, reads a cache another layer filled */
} moe_attn;

/* A Gated DeltaNet layer (ARCHITECTURES.md §3.4): nk key heads of k_dim, nv value heads of
   v_dim (nv a multiple of nk), a causal conv of conv_k taps over conv_dim = 2·nk·k_dim + nv·v_dim
   channels, and an f32 state of nv · k_dim · v_dim per layer. */
typedef struct moe_deltanet {
    int32_t n_k_head, n_v_head, k_dim, v_dim, conv_k;
    int32_t v_tiled;           /* value head j reads key head j % nk (llama.cpp's Qwen3.5 GGUF order);
                                  0: j / (nv / nk) (Hugging Face's grouped order) */
    int32_t ba_grouped;        /* b and a in one [nk][b (nv/nk) | a (nv/nk)] row (Qwen3-Next's ssm_ba) */
    int32_t state;             /* its recurrent state (moe_state_plan index) */
} moe_deltanet;

typedef struct moe_layer_plan {
    int32_t attn_kind;         /* MOE_ATTN_* */
    moe_attn attn;
    moe_rope rope;
    int32_t v_from_k;          /* V is the raw K projection (Gemma 4 full layers: attention_k_eq_v) */
    int32_t v_norm;            /* per-head RMSNorm without weight on V */
    int32_t ffn_kind;          /* MOE_FFN_* */
    int32_t act;               /* MOE_ACT_*: activation of the gated GLUs */
    int32_t n_ff;              /* dense FFN width; 0 = none */
    int32_t n_expert, n_expert_used, n_ff_exp;
    int32_t norm_topk;         /* renormalise the top-k routing weights */
    float layer_scale;         /* the residual stream is multiplied by it after the layer; 0 = none */
    /* hybrid models (Gated DeltaNet) */
    int32_t attn_gate;         /* full attention: q rows hold [q | gate] per head; o ⊙= sigmoid(gate) */
    moe_deltanet dn;           /* MOE_ATTN_DELTANET */
    int32_t n_ff_shexp;        /* MOE_FFN_MOE_SHARED: the shared expert's width */
} moe_layer_plan;

typedef struct moe_layer {
    moe_layer_plan p;
    moe_weight t[MOE_LT_COUNT];   /* by role; an absent tensor has data == NULL */
} moe_layer;

/* the tensor of a role, or NULL when the layer has none */
static inline const moe_weight *moe_lw(const moe_layer *L, int role) { return L->t[role].data ? &L->t[role] : NULL; }

/* One KV cache: rows of n_kv · head_dim elements for K and for V. A full cache has n_ctx rows
   (row = position); a sliding one is a ring of window + n_batch - 1 rows (row = position mod
   rows), enough for a chunk of n_batch queries that each see window keys. */
typedef struct moe_cache_plan {
    int32_t layer;             /* the layer that fills it */
    int32_t kv_width;          /* n_head_kv · head_dim */
    int32_t window;            /* 0: full */
} moe_cache_plan;

/* rows a cache holds in a context of n_ctx positions and n_batch-token chunks */
static inline int32_t moe_cache_rows(const moe_cache_plan *c, int32_t n_ctx, int32_t n_batch) {
    int64_t r = c->window ? (int64_t)c->window + n_batch - 1 : (int64_t)n_ctx;
    return (int32_t)(r < n_ctx ? r : n_ctx);
}

/* One recurrent state (a Gated DeltaNet layer's): the conv's last conv_k - 1 input rows
   (conv_elems f32) and the delta-rule state (rec_elems = nv · k_dim · v_dim f32). */
typedef struct moe_state_plan {
    int32_t layer;
    int32_t conv_elems, rec_elems;
} moe_state_plan;

/* Model-wide hyperparameters. n_head .. n_ff_exp are the largest over the layers: what
   activation buffers are sized for (each layer's own geometry is in its plan). */
typedef struct moe_hparams {
    int32_t arch;              /* index into the architecture table (moe.c) */
    int32_t n_vocab, n_embd, n_layer, n_ctx_train;
    int32_t n_head, n_head_kv, head_dim, n_ff_exp, n_ff, n_expert, n_expert_used;
    int32_t n_cache;           /* KV caches (layers that store K/V) */
    float rms_eps;
    float embd_scale;          /* the token embedding is multiplied by it; 0 = 1 */
    float logit_softcap;       /* logits = c · tanh(logits / c); 0 = none */
    int32_t n_ple;             /* per-layer embedding width (Gemma 4 E2B/E4B); 0 = none */
    int32_t n_vocab_ple;       /* rows of the per-layer token embedding */
    float ple_scale;           /* the per-layer token embedding is multiplied by it */
    /* hybrid models: recurrent states, and the largest DeltaNet widths */
    int32_t n_state;           /* Gated DeltaNet layers */
    int32_t dn_conv, dn_value, dn_v_head, dn_qkv; /* conv channels, nv·v_dim, nv, widest mixed projection */
} moe_hparams;

typedef struct moe_weights {
    moe_hparams hp;
    moe_weight g[MOE_GT_COUNT];   /* global tensors by role; g[OUTPUT] may alias g[TOK_EMBD] (tied) */
    moe_layer *layers;            /* [n_layer] */
    moe_cache_plan *caches;       /* [n_cache] */
    moe_state_plan *states;       /* [n_state] */
} moe_weights;

/* the weight of a role: layer -1 = global */
static inline moe_weight *moe_weight_of(const moe_weights *w, int layer, int role) {
    moe_weights *mw = (moe_weights *)(uintptr_t)w;
    return layer < 0 ? &mw->g[role] : &mw->layers[layer].t[role];
}

/* What a backend needs to size a context's buffers. */
typedef struct moe_ctx_shape {
    int32_t n_ctx, n_batch, kv_type, logits_all, n_threads;
    int32_t cpu_exact;     /* CPU backend: f32 activations in matrix products (moe_load_params) */
    /* polled by the backend inside a chunk (CPU: per layer; Vulkan: between submissions); non-zero:
       the backend stops the step and end_step returns MOE_ERR_CANCELLED. NULL = never. */
    int32_t (*abort)(void *user);
    void *abort_user;
    int32_t state_backup;  /* recurrent states: one checkpoint slot more, at index moe_ckpt_slots(n_ctx),
                              that holds the states from before the step (put back on a cancel) */
    uint32_t max_submit_us;/* Vulkan: GPU time cap of one submission; 0 = none */
    int32_t low_priority;  /* Vulkan: the low-priority queue where there is one */
    int32_t logit_rows;    /* Vulkan, logits_all: rows of logits a step can give (the LM head's scratch and
                              readback); 0 = n_batch. moe_step_batch's lead: the most its passes expose */
    int32_t batch_lead;    /* Vulkan: moe_step_batch's lead, no recurrent states of its own (a pass
                              runs each context's on its states, checkpoints and delta-rule scratch) */
} moe_ctx_shape;

/* Models with recurrent states: a context of n_ctx positions checkpoints them every
   moe_ckpt_every(n_ctx) positions, in moe_ckpt_slots(n_ctx) slots (see moe_ctx_rewind). */
#define MOE_STATE_CKPTS 8      /* checkpoints cover the context in about this many steps */
#define MOE_CKPT_ALIGN 64      /* ... of a multiple of this many tokens */
static inline int32_t moe_ckpt_every(int32_t n_ctx) {
    int32_t k = (n_ctx + MOE_STATE_CKPTS - 1) / MOE_STATE_CKPTS;
    return k < MOE_CKPT_ALIGN ? MOE_CKPT_ALIGN : (k + MOE_CKPT_ALIGN - 1) / MOE_CKPT_ALIGN * MOE_CKPT_ALIGN;
}
static inline int32_t moe_ckpt_slots(int32_t n_ctx) { return (n_ctx - 1) / moe_ckpt_every(n_ctx); }

/* The forward pass is written once against this op interface. The CPU backend runs each op at
   once; the Vulkan backend records it into the step's command buffer. Activations are
   per-context buffers with fixed roles, each [n rows][width] floats (row = token). */
enum {
    ACT_X,       /* [n][n_embd]          residual stream */
    ACT_XN,      /* [n][n_embd]          normed input of a block */
    ACT_Q,       /* [n][n_head·hd] */
    ACT_K,       /* [n][n_kv·hd] */
    ACT_V,       /* [n][n_kv·hd] */
    ACT_ATTN,    /* [n][n_head·hd]       attention output before Wo */
    ACT_OUT,     /* [n][n_embd]          block output before the residual add */
    ACT_ROUTER,  /* [n][n_expert]        router logits */
    ACT_LOGITS,  /* [n_out][n_vocab] */
    ACT_OUT2,    /* [n][n_embd]          a second block output (a branch beside ACT_OUT) */
    ACT_FF,      /* [n][n_ff]            dense FFN gate, then act(gate) ⊙ up */
    ACT_FF2,     /* [n][n_ff]            dense FFN up */
    ACT_PLE,     /* [n][n_layer·n_ple]   per-layer embedding inputs of every layer */
    ACT_PLE2,    /* [n][n_layer·n_ple]   its token part while it is built; PLE gate of a layer */
    /* hybrid models (Gated DeltaNet) */
    ACT_DN_QKV,  /* [n][dn_qkv]          mixed projection: conv input, or q with its gate */
    ACT_DN_CONV, /* [n][dn_conv]         conv output: q_all | k_all | v_all */
    ACT_DN_Z,    /* [n][max(dn_value, n_head·hd)]  output gates (z, or attention's) */
    ACT_DN_BETA, /* [n][2·dn_v_head]     b (or b and a grouped) */
    ACT_DN_ALPHA,/* [n][dn_v_head]       a */
    ACT_DN_O,    /* [n][dn_value]        delta-rule output (gated-normed in place) */
    ACT_COUNT
};

/* MoE routing kinds (route op): how router logits become k experts and their weights */
typedef struct moe_route {
    int32_t n_expert, k;
    int32_t norm;              /* renormalise the k softmax weights to sum 1 */
    const moe_weight *expert_scale;  /* optional f32 [n_expert]: routing weight of e times it */
} moe_route;

typedef struct moe_ops {
    /* dst[i] = embedding row of tokens[i] */
    void (*embed)(void *be, int dst, const moe_weight *w, const moe_token *tokens, int n);
    /* over n_rows rows of width: dst = src / rms(src) * w (w may be NULL: no scale) */
    void (*rmsnorm)(void *be, int dst, int src, const moe_weight *w, int n_rows, int width, float eps);
    /* dst[i] = W · src[src_row0 + i] for i < n (W: ne[1] outputs × ne[0] inputs) */
    void (*matmul)(void *be, int dst, const moe_weight *w, int src, int src_row0, int n);
    /* RoPE in place on n rows of n_head heads of head_dim, token i at position pos0 + i */
    void (*rope)(void *be, int buf, int n, int n_head, int head_dim, const moe_rope *rope, int pos0);
    /* stores ACT_K / ACT_V rows as positions pos0.. of cache a->cache (unless a->store is 0),
       then causal GQA attention of ACT_Q over that cache into ACT_ATTN: query i sees positions
       [pos0 + i - window + 1, pos0 + i] (from 0 when window is 0) */
    void (*attention)(void *be, const moe_attn *a, int n, int pos0);
    /* dst += src over n rows of width */
    void (*add)(void *be, int dst, int src, int n, int width);
    /* MoE in three ops. route: router logits ACT_ROUTER = router · src for n rows (router NULL:
       ACT_ROUTER already holds them), then softmax → top-k experts and weights per r, kept in
       the backend's routing state (the point where the router's choice exists: a streaming tier
       syncs here). */
    void (*route)(void *be, const moe_weight *router, const moe_route *r, int src, int n);
    /* expert GLU: for every routed (token, expert) pair, h = act(gate_e src) ⊙ (up_e src) */
    void (*experts_glu)(void *be, const moe_weight *gate, const moe_weight *up, int act, int src, int n);
    /* expert down + combine: dst[i] = Σ_e w_e · down_e h over token i's routed experts */
    void (*experts_down)(void *be, int dst, const moe_weight *down, int n);
    /* elementwise, over n rows of width. scale: buf *= s · (w ? w[col] : 1) */
    void (*scale)(void *be, int buf, int n, int width, const moe_weight *w, float s);
    /* dst = src (rows of width; dst and src differ) */
    void (*copy)(void *be, int dst, int src, int n, int width);
    /* dst[i][j] = act(gate[i][j]) · up[i][up_col0 + j], up rows up_stride wide (dst may be gate) */
    void (*glu)(void *be, int dst, int gate, int up, int up_col0, int up_stride, int n, int width, int act);
    /* buf = cap · tanh(buf / cap) */
    void (*softcap)(void *be, int buf, int n, int width, float cap);
    /* A step is bracketed by begin/end: Vulkan records between them and submits at end_step
       (the only place a device error can surface); read_logits is called after end_step. */
    void (*begin_step)(void *be);
    moe_status (*end_step)(void *be);
    /* rows ACT_LOGITS holds (the forward computes logits in chunks of at most this many) */
    int (*logits_rows)(const void *be);
    /* the first n rows of ACT_LOGITS are rows row0.. of the step's logits */
    void (*logits_out)(void *be, int row0, int n);
    /* copy the step's n rows of logits to host memory (after end_step) */
    void (*read_logits)(void *be, float *dst, int n);
    /* copy the cache rows of positions [0, n_pos) to / from host memory, in the cache's element
       type (f16 or f32), laid out cache by cache: [cache][K rows, then V rows][kv_width] */
    moe_status (*kv_save)(void *be, void *dst, int n_pos);
    moe_status (*kv_load)(void *be, const void *src, int n_pos);
    /* adds the backend's counters (memory, experts) to a context's stats; may be NULL */
    void (*stats)(const void *be, moe_stats *out);
    /* profiling (moe_ctx_profile): on/off and clear; the entries; the bandwidth probe. May be NULL */
    moe_status (*profile)(void *be, int on);
    int (*profile_get)(const void *be, moe_profile_entry *out, int cap);
    moe_status (*probe)(void *be, double *read_gbs, double *copy_gbs);
    /* hybrid models (Gated DeltaNet) */
    /* src rows hold n_head heads of [a (head_dim) | b (head_dim)]: dst_a, dst_b get the halves */
    void (*split_heads)(void *be, int dst_a, int dst_b, int src, int n, int n_head, int head_dim);
    /* dst ⊙= sigmoid(gate) over n rows of width */
    void (*sigmoid_mul)(void *be, int dst, int gate, int n, int width);
    /* dst[i] ⊙= sigmoid(w · src[i]) (w: f32 [width]; dst and src rows of width) */
    void (*gate_rows)(void *be, int dst, int src, const moe_weight *w, int n, int width);
    /* causal depthwise conv (conv_k taps; ne {conv_k, channels}) + SiLU over ACT_DN_QKV rows into
       ACT_DN_CONV, the first taps reading the state's last conv_k - 1 inputs; then the state
       keeps the last conv_k - 1 inputs */
    void (*ssm_conv)(void *be, const moe_deltanet *dn, const moe_weight *conv, int n);
    /* gated delta rule over n tokens: q, k, v from ACT_DN_CONV (L2-normalised q·k_dim^-1/2 and
       k), β = sigmoid(b), g = a_coef · softplus(a + dt_bias) from ACT_DN_BETA / ACT_DN_ALPHA,
       the f32 state of dn->state; outputs ACT_DN_O [n][nv·v_dim] */
    void (*delta_net)(void *be, const moe_deltanet *dn, const moe_weight *a_coef, const moe_weight *dt_bias, int n);
    /* dst = dst / rms(dst) · w ⊙ silu(gate) over n_rows rows of width (w: f32 [width]) */
    void (*gated_rmsnorm)(void *be, int dst, int gate, const moe_weight *w, int n_rows, int width, float eps);
    /* all recurrent states to / from host f32, state by state (conv, then recurrent) */
    moe_status (*state_save)(void *be, float *dst);
    moe_status (*state_load)(void *be, const float *src);
    /* checkpoint slot ← the live states; the live states ← slot (slot -1: zeros); inside a step */
    void (*state_checkpoint)(void *be, int slot);
    void (*state_restore)(void *be, int slot);
    /* GPU time of the context's submissions (moe_ctx_submit_times); NULL where there is none */
    moe_status (*submit_times)(void *be, uint64_t *n, double *max_us, double *total_us, int reset);
} moe_ops;

/* The Vulkan backend (moe_vk.c). moe_vk_init returns MOE_OK and a backend, or an error status
   with moe_last_error() set (no loader, no device, missing features). gpu_only (MOE_BACKEND_AUTO)
   leaves CPU-type devices (lavapipe, SwiftShader) out. log (may be NULL) receives the device
   choice and any validation-layer message; it must outlive the backend. */
typedef struct moe_vk_backend moe_vk_backend;
typedef void (*moe_log_fn)(int32_t level, const char *msg, void *user);
MOE_HIDDEN moe_status moe_vk_init(const moe_weights *w, int32_t device_index, int32_t gpu_only, moe_log_fn log,
                                  void *log_user, moe_vk_backend **out);
/* moe_vk_init with a gpu_budget_bytes (0 = no limit): below what the resident weights take on the
   device, the experts get a slot cache (moe_vk.c, "GPU expert slot cache"); MOE_ERR_NO_MEMORY
   naming the minimum below the minimum working set. moe_vk_init is this with 0; moe_vk_init_tiers
   (below) puts the slot cache over a host tier. */
MOE_HIDDEN moe_status moe_vk_init_budget(const moe_weights *w, int32_t device_index, int32_t gpu_only,
                                         uint64_t gpu_budget_bytes, moe_log_fn log, void *log_user, moe_vk_backend **out);
/* The host expert cache (moe.c section 8) under host_budget_bytes, shared by the CPU backend and
   the Vulkan GPU slot cache above it. Per-context counters: */
typedef struct moe_xcache moe_xcache;
#define MOE_XS_MAX_T 4 /* expert tensors per layer */
typedef struct moe_xs_counts {
    uint64_t hits, misses, bytes;           /* (token, expert) pairs; bytes read from the file */
    uint64_t pf_issued, pf_used;            /* units prefetched; of them, used by a later acquire */
    uint64_t pred_total, pred_hits;         /* distinct experts routed where a prediction was made; predicted */
} moe_xs_counts;
/* Copies the slabs of the n distinct experts ids[] of layer l (pairs[i]: routed pairs of ids[i])
   out of the host cache, reading the missing ones from the file: slab t of ids[i] goes to
   dst[i · MOE_XS_MAX_T + t] (slabs in role order of the layer's 3-D tensors). Any number of
   experts: group by group when the cache holds fewer. MOE_ERR_IO / MOE_ERR_FORMAT (non-finite
   value) with the error set; dst may then be partly written. */
MOE_HIDDEN moe_status moe_xs_gather(moe_xcache *xc, int l, const int32_t *ids, int n, const int32_t *pairs, uint8_t *const *dst,
                                    moe_xs_counts *cnt);
/* starts reads of those of ids[] of layer l that the host cache lacks (no waiting); cls[i]: the
   predictor's confidence class of ids[i], 0 the best (NULL: all 0); reads only predictions whose
   class has been routed often enough at this layer (moe_xs_judge); 0 when the host cache does not
   prefetch (MOE_PREFETCH=0) */
MOE_HIDDEN int        moe_xs_prefetch(moe_xcache *xc, int l, const int32_t *ids, const uint8_t *cls, int n, moe_xs_counts *cnt);
/* scores the predictions made for layer l (pred[e]: 0, or class + 1; E entries, cleared) against
   the n distinct experts ids[] the router chose there */
MOE_HIDDEN void       moe_xs_judge(moe_xcache *xc, int l, uint8_t *pred, const int32_t *ids, int n);
/* moe_vk_init_budget with what else moe_load_params carries for Vulkan: the host's objects (NULL:
   moe's own instance and device) and a pipeline cache (path and/or blob, each optional). */
typedef struct moe_vk_opts {
    const moe_vk_handles *host;
    const char *pcache_path;
    const void *pcache_data;
    size_t pcache_size;
    struct moe_xcache *xc;                  /* the host expert tier under the GPU slot cache; NULL: experts from the mapped file */
} moe_vk_opts;
MOE_HIDDEN moe_status moe_vk_init_opts(const moe_weights *w, int32_t device_index, int32_t gpu_only, uint64_t gpu_budget_bytes,
                                       const moe_vk_opts *opts, moe_log_fn log, void *log_user, moe_vk_backend **out);
/* the pipeline cache in moe's envelope (moe_vk_pipeline_cache_get's rule, size_t counts) */
MOE_HIDDEN moe_status moe_vk_pcache_get(moe_vk_backend *vk, void *buf, size_t cap, size_t *n_out);
/* 64-bit FNV-1a: checksums of states and pipeline caches */
MOE_HIDDEN uint64_t   moe_fnv1a(uint64_t h, const void *data, size_t n);
MOE_HIDDEN int        moe_vk_streams_experts(const moe_vk_backend *vk);   /* 1 when the GPU expert slot cache is on */
MOE_HIDDEN void       moe_vk_use_exact(moe_vk_backend *vk);               /* gpu_exact: no f16 tensor-core tiles */
MOE_HIDDEN void       moe_vk_free(moe_vk_backend *vk);
/* The expert eviction policy (moe.c section 8), shared by the host cache and the GPU slot cache,
   one instance per set of slots that compete (the host cache; each layer of the GPU cache).
   Slots: state 0 empty, 1 loading, 2 ready; pins > 0 pinned. MOE_XS_SLRU (the default) keeps a
   protected segment of the units the router chose most (routed pairs, decayed, remembered for
   every unit, cached or not) and turns new units over in a probation segment, so that a prefill
   that touches every expert once cannot flush what decode reuses. */
enum { MOE_XS_LRU = 0, MOE_XS_LFU = 1, MOE_XS_SLRU = 2 };
typedef struct moe_xs_pol {
    int32_t kind, n, n_units;   /* MOE_XS_*, slots, units the history covers */
    const int32_t *key;         /* [n] the unit each slot holds (-1: none); the tier's own array */
    uint64_t *stamp;            /* [n] tick of the slot's last use */
    float *freq;                /* [n] LFU: uses since the unit came, halved every n uses */
    float *hist;                /* [n_units] SLRU: routed pairs of each unit, halved every 8 pairs per unit */
    uint8_t *prot;              /* [n] SLRU: 1 in the protected segment */
    uint64_t tick, decay_at;
    double hist_added;          /* pairs counted since the last halving */
    int32_t n_prot, max_prot;
} moe_xs_pol;
MOE_HIDDEN int     moe_xs_pol_init(moe_xs_pol *p, int32_t kind, int32_t n_slots, int32_t n_units, const int32_t *key); /* 0: out of memory */
MOE_HIDDEN void    moe_xs_pol_free(moe_xs_pol *p);
/* the slot that gives way for a new unit, or -1: never a pinned or loading one, nor one used after
   tick used_after (this step's; UINT64_MAX: no such rule), nor with spare_prot a protected one */
MOE_HIDDEN int32_t moe_xs_victim(const moe_xs_pol *p, const int32_t *pins, const uint8_t *state, uint64_t used_after, int spare_prot);
/* a use of slot s (key[s] already names its unit) by `pairs` routed pairs; fresh: the unit just came */
MOE_HIDDEN void    moe_xs_touch(moe_xs_pol *p, int32_t s, uint32_t pairs, int fresh);
/* SLRU: routed pairs of a unit that got no slot (read from elsewhere); forget: every slot emptied */
MOE_HIDDEN void    moe_xs_pol_count(moe_xs_pol *p, int32_t unit, uint32_t pairs);
MOE_HIDDEN void    moe_xs_pol_forget(moe_xs_pol *p);
MOE_HIDDEN int32_t moe_xs_policy_env(void);   /* MOE_EVICT=lru | lfu | slru (default); -1: another value */
MOE_HIDDEN const char *moe_xs_policy_name(int32_t kind);
MOE_HIDDEN moe_status moe_vk_ctx_new(moe_vk_backend *vk, const moe_ctx_shape *shape, void **be_out);
MOE_HIDDEN void       moe_vk_ctx_free(void *be);
MOE_HIDDEN extern const moe_ops moe_vk_ops;
/* moe_step_batch on Vulkan (moe_vk.c section 8): a scratch context (the lead, moe_vk_ctx_new with
   n_batch = the pass's rows, logits_all, logit_rows = the most logits rows a pass exposes) runs
   the forward over the rows of all segments with moe_vk_batch_ops, between moe_vk_batch_begin
   and moe_vk_batch_end (inside its begin/end_step).
   Segment s: context be's n tokens at positions pos0.., rows row0.. of the pass; its n_out logits
   rows (its last n_out rows) become rows out0.. of the pass's logits. */
/* a segment of a pass: its context, rows, first position, logits rows, and the checkpoint slot of
   the context's recurrent states that it ends at (-1: none) */
typedef struct moe_vk_seg { void *be; int32_t row0, n, pos0, n_out, out0, ck; } moe_vk_seg;
MOE_HIDDEN const char *moe_vk_batch_unsupported(const moe_vk_backend *vk); /* why no pass can run, or NULL */
MOE_HIDDEN moe_status moe_vk_batch_begin(void *lead, const moe_vk_seg *seg, int n_seg); /* seg must outlive the step */
MOE_HIDDEN void       moe_vk_batch_gather(void *lead);  /* after the forward: the logits rows to rows 0.. of ACT_XN */
MOE_HIDDEN void       moe_vk_batch_checkpoints(void *lead); /* after the forward: the segments' state checkpoints */
MOE_HIDDEN void       moe_vk_batch_end(void *lead);
MOE_HIDDEN void       moe_vk_batch_logits(void *lead, int row0, int n, float *dst); /* after end_step */
MOE_HIDDEN extern const moe_ops moe_vk_batch_ops;
MOE_HIDDEN void       moe_internal_set_error(moe_status status, const char *fmt, ...);

/* SPIR-V of the compute shaders, generated into shaders_embedded.c (make shaders), sorted by name. */
typedef struct moe_spirv { const char *name; const uint32_t *code; size_t size_bytes; } moe_spirv;
MOE_HIDDEN extern const moe_spirv moe_vk_spirv[];
MOE_HIDDEN extern const size_t    moe_vk_spirv_count;
#endif

#endif /* MOE_H */
