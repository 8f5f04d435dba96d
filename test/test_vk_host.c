/* test_vk_host — a host (game engine) hands moe its own Vulkan instance, device and queue
   (moe_vk_handles, moe_vk_requirements), and the pipeline cache (path and blob forms).

   1. moe_vk_requirements: the out-parameter rule, bad arguments.
   2. A host creates an instance (with the validation layer under MOE_VK_VALIDATION=1, and its own
      messenger counting messages) and a device with exactly the lines moe_vk_requirements gives,
      hands them over, loads a fixture, steps: logits bit-identical to a run on moe's own device;
      the queue lock is taken around moe's submits, balanced and never nested; moe's shared
      process instance stays untouched; after the model is freed the host's device still works
      (a buffer made and destroyed, vkDeviceWaitIdle) and the host destroys it with the layer
      reporting nothing (no object of moe's left on it).
   3. Devices with less than the requirements: MOE_ERR_DEVICE naming the missing item; bad handles:
      MOE_ERR_INVALID_ARG; in both cases nothing is left on the host's device.
   4. Pipeline cache: the first load writes the file, the second uses it (log line), a damaged,
      truncated or foreign (other pipelineCacheUUID) file is ignored with a warning and the model
      still runs with identical logits; the blob form round-trips through moe_vk_pipeline_cache_get.

   Without a usable Vulkan device every test skips, unless MOE_REQUIRE_VULKAN=1. */
#include "../moe.c"
#include "../moe_vk.c"
#include "../shaders_embedded.c"
#include "test_util.h"

/* Mesa's lavapipe leaks per VkInstance inside libvulkan_lvp.so (see test_vulkan.c), and the
   Khronos validation layer inside its own module per instance destroyed (this test, as a host,
   destroys its instances; moe's own instance never is): exactly those are suppressed. */
const char *__lsan_default_suppressions(void);
const char *__lsan_default_suppressions(void) { return "leak:libvulkan_lvp.so\nleak:libVkLayer_khronos_validation.so\n"; }
static void pin_driver(void) { (void)dlopen("libvulkan_lvp.so", RTLD_NOW | RTLD_NODELETE); }

#define FIXTURE "test/fixtures/qwen3moe_f32.gguf"

static char g_log[16384];
static void test_log(int32_t level, const char *msg, void *user) {
    (void)user;
    if (level <= MOE_LOG_WARN) fprintf(stderr, "moe: %s\n", msg);
    size_t l = strlen(g_log);
    snprintf(g_log + l, sizeof g_log - l, "%s\n", msg);
}

static VkBool32 VKAPI_PTR host_messenger_cb(VkFlags severity, VkFlags types, const VkDebugUtilsMessengerCallbackDataEXT *data, void *user) {
    (void)types;
    (void)user;
    if (severity & (VK_DEBUG_UTILS_MESSAGE_SEVERITY_WARNING_BIT_EXT | VK_DEBUG_UTILS_MESSAGE_SEVERITY_ERROR_BIT_EXT)) {
        g_vk_validation_messages++;
        fprintf(stderr, "host validation: %s\n", data && data->pMessage ? data->pMessage : "(no message)");
    }
    return 0;
}

/* the host's queue lock: counts, and checks it is never taken twice or released unheld */
typedef struct qlock { int depth, n_lock, n_unlock, bad; } qlock;
static void host_queue_lock(void *user, int32_t lock) {
    qlock *q = user;
    if (lock) {
        q->bad |= q->depth != 0;
        q->depth++;
        q->n_lock++;
    } else {
        q->bad |= q->depth != 1;
        q->depth--;
        q->n_unlock++;
    }
}

/* ---- the host ---- */
enum { DROP_NONE = 0, DROP_PUSH_DESCRIPTOR = 1, DROP_DYN_INDEXING = 2, ADD_VMM_ONLY = 4 };
typedef struct host {
    vk_fns f;
    void *lib;
    VkInstance inst;
    VkDebugUtilsMessengerEXT messenger;
    VkPhysicalDevice pd;
    VkDevice dev;
    VkQueue queue;
    uint32_t qfam;
    int validation;
    /* what the device was created with (kept: moe_vk_handles.device_create_info points here) */
    const char *exts[8];
    VkPhysicalDeviceFeatures2 ft;
    VkPhysicalDeviceVulkanMemoryModelFeatures vmm;
    VkPhysicalDeviceShaderFloat16Int8Features f16;
    VkPhysicalDeviceCooperativeMatrixFeaturesNV cm;
    VkDeviceQueueCreateInfo qci;
    float prio;
    VkDeviceCreateInfo dci;
    qlock lock;
    moe_vk_handles h;
} host;

static int require_vulkan(void) { return vk_env_on("MOE_REQUIRE_VULKAN"); }

/* Instance and physical device (the first one moe can run on); 0 when there is none. */
static int host_instance(host *H) {
    memset(H, 0, sizeof *H);
    if (vk_load_global(&H->f, &H->lib)) return 0;
    const char *layers[1] = {"VK_LAYER_KHRONOS_validation"}, *exts[1] = {"VK_EXT_debug_utils"};
    H->validation = vk_env_on("MOE_VK_VALIDATION");
    VkApplicationInfo app = {VK_STRUCTURE_TYPE_APPLICATION_INFO, NULL, "test_vk_host", 1, "engine", 1, VK_API_VERSION_1_2};
    VkInstanceCreateInfo ici = {VK_STRUCTURE_TYPE_INSTANCE_CREATE_INFO, NULL, 0, &app, H->validation ? 1u : 0u, layers,
                                H->validation ? 1u : 0u, exts};
    if (H->f.CreateInstance(&ici, NULL, &H->inst) != VK_SUCCESS) {
        if (H->validation) fail_msg("MOE_VK_VALIDATION=1 but an instance with the validation layer cannot be made");
        return 0;
    }
    assert_null(vk_load_instance(&H->f, H->inst));
    if (H->validation) {
        VkDebugUtilsMessengerCreateInfoEXT mci = {VK_STRUCTURE_TYPE_DEBUG_UTILS_MESSENGER_CREATE_INFO_EXT, NULL, 0,
            VK_DEBUG_UTILS_MESSAGE_SEVERITY_WARNING_BIT_EXT | VK_DEBUG_UTILS_MESSAGE_SEVERITY_ERROR_BIT_EXT,
            VK_DEBUG_UTILS_MESSAGE_TYPE_GENERAL_BIT_EXT | VK_DEBUG_UTILS_MESSAGE_TYPE_VALIDATION_BIT_EXT, host_messenger_cb, NULL};
        assert_int_equal(H->f.CreateDebugUtilsMessengerEXT(H->inst, &mci, NULL, &H->messenger), VK_SUCCESS);
    }
    uint32_t n = 8;
    VkPhysicalDevice pds[8];
    if (H->f.EnumeratePhysicalDevices(H->inst, &n, pds) < VK_SUCCESS) n = 0;
    moe_vk_backend probe_vk;
    memset(&probe_vk, 0, sizeof probe_vk);
    probe_vk.f = H->f;
    for (uint32_t i = 0; i < n && !H->pd; i++) {
        vk_probe p;
        vk_probe_device(&probe_vk, pds[i], &p);
        if (!p.why[0]) H->pd = pds[i], H->qfam = p.qfam;
    }
    return H->pd != NULL;
}

/* The device from moe_vk_requirements' lines, less or more as drop says. */
static VkResult host_device(host *H, int drop) {
    char req[1024];
    int32_t n = 0;
    assert_int_equal(moe_vk_requirements(H->pd, (void *)H->f.GetInstanceProcAddr, req, sizeof req, &n), MOE_OK);
    uint32_t n_ext = 0;
    H->ft.sType = VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_FEATURES_2;
    for (char *line = strtok(req, "\n"); line; line = strtok(NULL, "\n")) {
        static char names[8][64];
        char kind[16], name[64];
        assert_int_equal(sscanf(line, "%15s %63s", kind, name), 2);
        if (!strcmp(kind, "api")) assert_string_equal(name, "1.2");
        else if (!strcmp(kind, "extension")) {
            if ((drop & DROP_PUSH_DESCRIPTOR) && !strcmp(name, "VK_KHR_push_descriptor")) continue;
            assert_true(n_ext < 8);
            snprintf(names[n_ext], sizeof names[n_ext], "%s", name);
            H->exts[n_ext] = names[n_ext];
            n_ext++;
        } else if (!strcmp(kind, "feature")) { /* the optional ones appear on NVIDIA, not on lavapipe */
            if (!strcmp(name, "shaderStorageBufferArrayDynamicIndexing"))
                H->ft.features.shaderStorageBufferArrayDynamicIndexing = !(drop & DROP_DYN_INDEXING);
            else if (!strcmp(name, "shaderFloat16")) H->f16.shaderFloat16 = 1;
            else if (!strcmp(name, "vulkanMemoryModel")) H->vmm.vulkanMemoryModel = 1;
            else if (!strcmp(name, "vulkanMemoryModelDeviceScope")) H->vmm.vulkanMemoryModelDeviceScope = !(drop & ADD_VMM_ONLY);
            else if (!strcmp(name, "cooperativeMatrix")) H->cm.cooperativeMatrix = 1;
            else fail_msg("unknown feature '%s'", name);
        } else fail_msg("unknown requirement line '%s'", line);
    }
    if (drop & ADD_VMM_ONLY) H->vmm.vulkanMemoryModel = 1; /* without device scope: moe's atomics would be invalid */
    /* the feature structs in the chain, those with something on */
    H->f16.sType = VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_SHADER_FLOAT16_INT8_FEATURES;
    H->vmm.sType = VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_VULKAN_MEMORY_MODEL_FEATURES;
    H->cm.sType = VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_COOPERATIVE_MATRIX_FEATURES_NV;
    void **tail = &H->ft.pNext;
    if (H->f16.shaderFloat16) *tail = &H->f16, tail = &H->f16.pNext;
    if (H->vmm.vulkanMemoryModel) *tail = &H->vmm, tail = &H->vmm.pNext;
    if (H->cm.cooperativeMatrix) *tail = &H->cm, tail = &H->cm.pNext;
    H->prio = 1.0f;
    VkDeviceQueueCreateInfo qci = {VK_STRUCTURE_TYPE_DEVICE_QUEUE_CREATE_INFO, NULL, 0, H->qfam, 1, &H->prio};
    H->qci = qci;
    VkDeviceCreateInfo dci = {VK_STRUCTURE_TYPE_DEVICE_CREATE_INFO, &H->ft, 0, 1, &H->qci, 0, NULL, n_ext, H->exts, NULL};
    H->dci = dci;
    VkResult r = H->f.CreateDevice(H->pd, &H->dci, NULL, &H->dev);
    if (r != VK_SUCCESS) return r;
    assert_true(vk_fn_store(&H->f.GetDeviceQueue, H->f.GetDeviceProcAddr(H->dev, "vkGetDeviceQueue")));
    H->f.GetDeviceQueue(H->dev, H->qfam, 0, &H->queue);
    moe_vk_handles h = {H->inst, H->pd, H->dev, H->queue, H->qfam, 0, (void *)H->f.GetInstanceProcAddr, host_queue_lock, &H->lock, &H->dci};
    H->h = h;
    return VK_SUCCESS;
}

/* The host's device still works after moe is done with it, and goes away cleanly. */
static void host_destroy(host *H) {
    if (H->dev) {
        void (VKAPI_PTR *destroy_dev)(VkDevice, const void *);
        VkResult (VKAPI_PTR *create_buf)(VkDevice, const VkBufferCreateInfo *, const void *, VkBuffer *);
        void (VKAPI_PTR *destroy_buf)(VkDevice, VkBuffer, const void *);
        VkResult (VKAPI_PTR *wait_idle)(VkDevice);
        assert_true(vk_fn_store(&create_buf, H->f.GetDeviceProcAddr(H->dev, "vkCreateBuffer")));
        assert_true(vk_fn_store(&destroy_buf, H->f.GetDeviceProcAddr(H->dev, "vkDestroyBuffer")));
        assert_true(vk_fn_store(&wait_idle, H->f.GetDeviceProcAddr(H->dev, "vkDeviceWaitIdle")));
        assert_true(vk_fn_store(&destroy_dev, H->f.GetDeviceProcAddr(H->dev, "vkDestroyDevice")));
        VkBufferCreateInfo bci = {VK_STRUCTURE_TYPE_BUFFER_CREATE_INFO, NULL, 0, 4096, VK_BUFFER_USAGE_STORAGE_BUFFER_BIT,
                                  VK_SHARING_MODE_EXCLUSIVE, 0, NULL};
        VkBuffer b = 0;
        assert_int_equal(create_buf(H->dev, &bci, NULL, &b), VK_SUCCESS);
        destroy_buf(H->dev, b, NULL);
        assert_int_equal(wait_idle(H->dev), VK_SUCCESS);
        destroy_dev(H->dev, NULL); /* the layer reports any object of moe's still on it */
    }
    if (H->messenger) H->f.DestroyDebugUtilsMessengerEXT(H->inst, H->messenger, NULL);
    if (H->inst) H->f.DestroyInstance(H->inst, NULL);
    memset(H, 0, sizeof *H);
}

#define NEED_HOST(H)                                                                                   \
    do {                                                                                               \
        if (!host_instance(H)) {                                                                       \
            host_destroy(H);                                                                           \
            if (require_vulkan()) fail_msg("MOE_REQUIRE_VULKAN=1 but no usable Vulkan device");        \
            print_message("no usable Vulkan device: skipped\n");                                       \
            skip();                                                                                    \
        }                                                                                              \
    } while (0)


/* load, prefill 7 tokens, decode 1; the logits of both steps into out (2 * n_vocab) */
static moe_status run_model(const moe_load_params *lp, float *out, int32_t n_vocab, double *t_first) {
    moe_model *m = NULL;
    moe_ctx *c = NULL;
    double t0 = vk_now_s();
    moe_status st = moe_load(FIXTURE, lp, &m);
    if (st) return st;
    assert_int_equal(moe_ctx_new(m, NULL, &c), MOE_OK);
    moe_token prompt[7] = {1, 7, 42, 100, 3, 9, 77}, next = 5;
    assert_int_equal(moe_step(c, prompt, 7), MOE_OK);
    if (t_first) *t_first = vk_now_s() - t0; /* load + first step: the pipelines are built then */
    memcpy(out, moe_logits(c, -1), (size_t)n_vocab * sizeof(float));
    assert_int_equal(moe_step(c, &next, 1), MOE_OK);
    memcpy(out + n_vocab, moe_logits(c, -1), (size_t)n_vocab * sizeof(float));
    moe_ctx_free(c);
    moe_model_free(m);
    return MOE_OK;
}

static int32_t fixture_vocab(void) {
    moe_load_params lp = {0};
    lp.backend = MOE_BACKEND_CPU;
    moe_model *m = NULL;
    assert_int_equal(moe_load(FIXTURE, &lp, &m), MOE_OK);
    moe_model_info info;
    moe_model_get_info(m, &info);
    moe_model_free(m);
    return info.n_vocab;
}

/* ---- 1 ---- */
static void test_requirements(void **state) {
    (void)state;
    host H;
    NEED_HOST(&H);
    int32_t n = -1;
    char buf[512];
    assert_int_equal(moe_vk_requirements(H.pd, NULL, NULL, 0, &n), MOE_ERR_BUFFER_TOO_SMALL);
    assert_true(n > 0 && n < (int32_t)sizeof buf);
    int32_t need = n;
    memset(buf, 'x', sizeof buf);
    assert_int_equal(moe_vk_requirements(H.pd, NULL, buf, need - 1, &n), MOE_ERR_BUFFER_TOO_SMALL);
    assert_int_equal(n, need);
    for (int i = need - 1; i < (int)sizeof buf; i++) assert_int_equal(buf[i], 'x'); /* nothing beyond cap */
    assert_int_equal(moe_vk_requirements(H.pd, (void *)H.f.GetInstanceProcAddr, buf, need, &n), MOE_OK);
    assert_int_equal(n, need);
    assert_int_equal(buf[need], 'x'); /* no room for the NUL: none written */
    assert_int_equal(moe_vk_requirements(H.pd, NULL, buf, sizeof buf, &n), MOE_OK);
    assert_int_equal((int32_t)strlen(buf), need);
    assert_non_null(strstr(buf, "api 1.2\n"));
    assert_non_null(strstr(buf, "extension VK_KHR_push_descriptor\n"));
    assert_non_null(strstr(buf, "feature shaderStorageBufferArrayDynamicIndexing\n"));
    print_message("moe_vk_requirements:\n%s", buf);
    assert_int_equal(moe_struct_size(MOE_STRUCT_VK_HANDLES), sizeof(moe_vk_handles));
    assert_int_equal(moe_vk_requirements(NULL, NULL, buf, sizeof buf, &n), MOE_ERR_INVALID_ARG);
    assert_int_equal(n, 0);
    assert_int_equal(moe_vk_requirements(H.pd, NULL, NULL, 16, &n), MOE_ERR_INVALID_ARG);
    assert_int_equal(moe_vk_requirements(H.pd, NULL, buf, sizeof buf, NULL), MOE_ERR_INVALID_ARG);
    host_destroy(&H);
}

/* ---- 2 ---- */
static void test_host_device(void **state) {
    (void)state;
    host H;
    NEED_HOST(&H);
    assert_int_equal(host_device(&H, DROP_NONE), VK_SUCCESS);
    int32_t nv = fixture_vocab();
    float *a = malloc(2 * (size_t)nv * sizeof(float)), *b = malloc(2 * (size_t)nv * sizeof(float));
    assert_non_null(a);
    assert_non_null(b);
    VkInstance shared_before = g_vk_instance;
    moe_load_params lp = {0};
    lp.backend = MOE_BACKEND_VULKAN;
    lp.log = test_log;
    lp.vk = &H.h;
    g_log[0] = 0;
    assert_int_equal(run_model(&lp, a, nv, NULL), MOE_OK);
    assert_non_null(strstr(g_log, "the host's device"));
    int coopmat = strstr(g_log, "NV cooperative matrix") != NULL; /* NVIDIA: prefill on tensor cores */
    assert_true(g_vk_instance == shared_before); /* moe's process instance: not made, not touched */
    assert_false(H.lock.bad);
    assert_int_equal(H.lock.depth, 0);
    assert_int_equal(H.lock.n_lock, H.lock.n_unlock);
    assert_true(H.lock.n_lock >= 3); /* uploads, two steps, the wait when freeing */
    print_message("queue lock taken %d times\n", H.lock.n_lock);

    /* the same through libvulkan's vkGetInstanceProcAddr, without a queue lock or create info */
    moe_vk_handles h2 = H.h;
    h2.get_instance_proc_addr = NULL;
    h2.queue_lock = NULL;
    h2.device_create_info = NULL;
    lp.vk = &h2;
    assert_int_equal(run_model(&lp, b, nv, NULL), MOE_OK);
    if (!coopmat) assert_memory_equal(a, b, 2 * (size_t)nv * sizeof(float));
    else { /* without a create info moe takes no optional path: f32 prefill, within test_vulkan's TOL_CM */
        float lo = a[0], hi = a[0], d = 0;
        for (int32_t i = 0; i < 2 * nv; i++) {
            lo = a[i] < lo ? a[i] : lo, hi = a[i] > hi ? a[i] : hi;
            d = fabsf(a[i] - b[i]) > d ? fabsf(a[i] - b[i]) : d;
        }
        assert_true(d <= 3e-3f * (hi - lo));
    }

    /* on moe's own device: bit-identical */
    lp.vk = NULL;
    assert_int_equal(run_model(&lp, b, nv, NULL), MOE_OK);
    assert_memory_equal(a, b, 2 * (size_t)nv * sizeof(float));
    free(a);
    free(b);
    host_destroy(&H);
}

/* ---- 3 ---- */
static void expect_load_fails(host *H, const moe_load_params *lp, moe_status want, const char *needle) {
    moe_model *m = NULL;
    moe_status st = moe_load(FIXTURE, lp, &m);
    if (st != want) fail_msg("expected %s, got %s (%s)", moe_status_str(want), moe_status_str(st), moe_last_error());
    assert_null(m);
    if (!strstr(moe_last_error(), needle)) fail_msg("message '%s' does not name '%s'", moe_last_error(), needle);
    assert_int_equal(H->lock.depth, 0);
}

static void test_less_than_required(void **state) {
    (void)state;
    static const struct { int drop; const char *names; } cases[] = {
        {DROP_PUSH_DESCRIPTOR, "VK_KHR_push_descriptor"},
        {DROP_DYN_INDEXING, "shaderStorageBufferArrayDynamicIndexing"},
        {ADD_VMM_ONLY, "vulkanMemoryModelDeviceScope"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        host H;
        NEED_HOST(&H);
        VkResult r = host_device(&H, cases[i].drop);
        if (r != VK_SUCCESS) { /* a driver without the memory model: nothing to check */
            print_message("device for case %zu not created (%d)\n", i, r);
            host_destroy(&H);
            continue;
        }
        moe_load_params lp = {0};
        lp.backend = MOE_BACKEND_AUTO; /* with handles AUTO does not fall back to the CPU */
        lp.vk = &H.h;
        expect_load_fails(&H, &lp, MOE_ERR_DEVICE, cases[i].names);
        if (cases[i].drop == DROP_PUSH_DESCRIPTOR) { /* without the create info the missing entry point tells */
            moe_vk_handles h2 = H.h;
            h2.device_create_info = NULL;
            lp.vk = &h2;
            expect_load_fails(&H, &lp, MOE_ERR_DEVICE, cases[i].names);
        }
        host_destroy(&H);
    }
}

static void test_bad_handles(void **state) {
    (void)state;
    host H;
    NEED_HOST(&H);
    assert_int_equal(host_device(&H, DROP_NONE), VK_SUCCESS);
    moe_load_params lp = {0};
    lp.backend = MOE_BACKEND_VULKAN;
    moe_vk_handles h = H.h;
    lp.vk = &h;
    h.device = NULL;
    expect_load_fails(&H, &lp, MOE_ERR_INVALID_ARG, "device");
    h = H.h;
    h.queue = NULL;
    expect_load_fails(&H, &lp, MOE_ERR_INVALID_ARG, "queue");
    h = H.h;
    h.queue_family = 77;
    expect_load_fails(&H, &lp, MOE_ERR_INVALID_ARG, "queue_family");
    h = H.h;
    VkDeviceCreateInfo wrong = H.dci;
    wrong.sType = VK_STRUCTURE_TYPE_INSTANCE_CREATE_INFO;
    h.device_create_info = &wrong;
    expect_load_fails(&H, &lp, MOE_ERR_INVALID_ARG, "sType");
    h = H.h;
    lp.backend = MOE_BACKEND_CPU;
    expect_load_fails(&H, &lp, MOE_ERR_INVALID_ARG, "MOE_BACKEND_CPU");
    lp.backend = MOE_BACKEND_VULKAN;
    lp.vk = NULL;
    lp.vk_pipeline_cache_size = 64; /* a size without data */
    expect_load_fails(&H, &lp, MOE_ERR_INVALID_ARG, "vk_pipeline_cache");
    assert_int_equal(H.lock.n_lock, 0);
    host_destroy(&H);
}

/* ---- 4 ---- */
static int log_has(const char *needle) { return strstr(g_log, needle) != NULL; }

static void test_pipeline_cache(void **state) {
    (void)state;
    host H;
    NEED_HOST(&H);
    assert_int_equal(host_device(&H, DROP_NONE), VK_SUCCESS);
    char dir[] = "/tmp/moe_pcache_XXXXXX", path[128];
    assert_non_null(mkdtemp(dir));
    snprintf(path, sizeof path, "%s/pipelines.bin", dir);
    int32_t nv = fixture_vocab();
    size_t lb = 2 * (size_t)nv * sizeof(float);
    float *ref = malloc(lb), *got = malloc(lb);
    assert_non_null(ref);
    assert_non_null(got);
    moe_load_params lp = {0};
    lp.backend = MOE_BACKEND_VULKAN;
    lp.log = test_log;
    lp.vk = &H.h;
    lp.vk_pipeline_cache_path = path;
    double t1, t2;
    g_log[0] = 0;
    assert_int_equal(run_model(&lp, ref, nv, &t1), MOE_OK); /* no file yet: compiles, writes it */
    assert_true(log_has("no pipeline cache at"));
    assert_true(log_has("bytes written to"));
    size_t size = 0;
    uint8_t *file = tu_read_file(path, &size);
    assert_non_null(file);
    assert_true(size >= sizeof(vk_pcache_head) + 32); /* at least Vulkan's header (lavapipe keeps nothing more) */
    char tmp[160];
    snprintf(tmp, sizeof tmp, "%s.tmp.%lu", path, (unsigned long)getpid());
    assert_null(fopen(tmp, "rb")); /* renamed, not left behind */

    g_log[0] = 0;
    assert_int_equal(run_model(&lp, got, nv, &t2), MOE_OK); /* the second load uses it */
    assert_true(log_has("bytes from"));
    assert_false(log_has("ignored"));
    assert_memory_equal(ref, got, lb);
    print_message("load + first step: %.1f ms without a pipeline cache, %.1f ms with it\n", t1 * 1e3, t2 * 1e3);

    /* damaged: a flipped byte inside the driver's data; truncated; a foreign device's UUID (checksum made valid) */
    for (int kind = 0; kind < 3; kind++) {
        uint8_t *bad = malloc(size);
        assert_non_null(bad);
        memcpy(bad, file, size);
        size_t bad_size = size;
        const char *why = "checksum";
        if (kind == 0) bad[size - 5] ^= 0x40;
        else if (kind == 1) bad_size = size / 2, why = "truncated";
        else {
            vk_pcache_head h;
            memcpy(&h, bad, sizeof h);
            bad[sizeof h + 16] ^= 1; /* pipelineCacheUUID[0] */
            h.checksum = moe_fnv1a(0xcbf29ce484222325ull, bad + sizeof h, (size_t)h.bytes);
            memcpy(bad, &h, sizeof h);
            why = "another device";
        }
        assert_true(tu_write_file(path, bad, bad_size));
        g_log[0] = 0;
        assert_int_equal(run_model(&lp, got, nv, NULL), MOE_OK);
        if (!log_has(why)) fail_msg("case %d: no '%s' in the log:\n%s", kind, why, g_log);
        assert_true(log_has("ignored"));
        assert_memory_equal(ref, got, lb);
        free(bad);
    }

    /* the blob form, on moe's own device; a CPU model has none */
    moe_load_params lb2 = {0};
    lb2.backend = MOE_BACKEND_VULKAN;
    lb2.log = test_log;
    moe_model *m = NULL;
    moe_ctx *c = NULL;
    assert_int_equal(moe_load(FIXTURE, &lb2, &m), MOE_OK);
    assert_int_equal(moe_ctx_new(m, NULL, &c), MOE_OK);
    moe_token t[3] = {1, 2, 3};
    assert_int_equal(moe_step(c, t, 3), MOE_OK);
    size_t need = 0, n2 = 0;
    assert_int_equal(moe_vk_pipeline_cache_get(m, NULL, 0, &need), MOE_ERR_BUFFER_TOO_SMALL);
    assert_true(need > sizeof(vk_pcache_head));
    uint8_t *blob = malloc(need);
    assert_non_null(blob);
    assert_int_equal(moe_vk_pipeline_cache_get(m, blob, need - 1, &n2), MOE_ERR_BUFFER_TOO_SMALL);
    assert_int_equal(n2, need);
    assert_int_equal(moe_vk_pipeline_cache_get(m, blob, need, &n2), MOE_OK);
    assert_int_equal(n2, need);
    assert_int_equal(moe_vk_pipeline_cache_get(m, NULL, 8, &n2), MOE_ERR_INVALID_ARG);
    moe_ctx_free(c);
    moe_model_free(m);
    lb2.vk_pipeline_cache_data = blob;
    lb2.vk_pipeline_cache_size = need;
    g_log[0] = 0;
    assert_int_equal(run_model(&lb2, got, nv, NULL), MOE_OK);
    assert_true(log_has("bytes from the blob used"));
    assert_memory_equal(ref, got, lb);
    lb2.backend = MOE_BACKEND_CPU;
    lb2.vk_pipeline_cache_data = NULL;
    lb2.vk_pipeline_cache_size = 0;
    assert_int_equal(moe_load(FIXTURE, &lb2, &m), MOE_OK);
    assert_int_equal(moe_vk_pipeline_cache_get(m, NULL, 0, &n2), MOE_ERR_UNSUPPORTED);
    moe_model_free(m);

    free(blob);
    free(file);
    free(ref);
    free(got);
    remove(path);
    rmdir(dir);
    host_destroy(&H);
}

int main(void) {
    pin_driver();
#define T(f) cmocka_unit_test_teardown(f, teardown_validation)
    const struct CMUnitTest tests[] = {
        T(test_requirements), T(test_host_device), T(test_less_than_required), T(test_bad_handles), T(test_pipeline_cache),
    };
#undef T
    return tu_run_tests("vk_host", tests);
}
