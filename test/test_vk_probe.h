/* test_vk_probe.h — is a Vulkan device usable here? For the tests that include moe_vk.c (after it
   and test_util.h). Probed once, by loading the smallest fixture on Vulkan. NEED_VULKAN() skips a
   test without a device, or fails it where MOE_REQUIRE_VULKAN=1 (CI) asks for one; with
   MOE_VK_VALIDATION=1 a device without the validation layer counts as unusable. */
#ifndef MOE_TEST_VK_PROBE_H
#define MOE_TEST_VK_PROBE_H

static char g_vk_why[600];

static int require_vulkan(void) { return vk_env_on("MOE_REQUIRE_VULKAN"); }

static int vulkan_available(void) {
    static int checked, available;
    if (checked) return available;
    checked = 1;
    moe_load_params lp = {0};
    lp.backend = MOE_BACKEND_VULKAN;
    moe_model *m = NULL;
    moe_status st = moe_load("test/fixtures/qwen3moe_f32.gguf", &lp, &m);
    available = st == MOE_OK;
    if (!available) snprintf(g_vk_why, sizeof g_vk_why, "%s (%s)", moe_status_str(st), moe_last_error());
    else if (vk_env_on("MOE_VK_VALIDATION") && !m->vk->validation) {
        snprintf(g_vk_why, sizeof g_vk_why, "MOE_VK_VALIDATION=1 but the validation layer is not active (vulkan-validationlayers)");
        available = !require_vulkan();
    }
    moe_model_free(m);
    return available;
}

#define NEED_VULKAN()                                                                                \
    do {                                                                                             \
        if (!vulkan_available()) {                                                                   \
            if (require_vulkan()) fail_msg("MOE_REQUIRE_VULKAN=1 but Vulkan is unusable: %s", g_vk_why); \
            print_message("Vulkan unusable (%s): skipped\n", g_vk_why);                              \
            skip();                                                                                  \
        }                                                                                            \
    } while (0)

#endif
