/* moe_vk.c — the Vulkan backend of moe. Until its issue lands this file only reports that the
   backend is not built, so MOE_BACKEND_AUTO falls back to the CPU. */
#define MOE_INTERNAL
#include "moe.h"

struct moe_vk_backend { int unused; };

moe_status moe_vk_init(const moe_weights *w, int32_t device_index, moe_vk_backend **out) {
    (void)w;
    (void)device_index;
    *out = 0;
    moe_internal_set_error(MOE_ERR_DEVICE, "Vulkan backend not built yet");
    return MOE_ERR_DEVICE;
}

void moe_vk_free(moe_vk_backend *vk) { (void)vk; }

moe_status moe_vk_ctx_new(moe_vk_backend *vk, const moe_ctx_shape *shape, void **be_out) {
    (void)vk;
    (void)shape;
    *be_out = 0;
    moe_internal_set_error(MOE_ERR_DEVICE, "Vulkan backend not built yet");
    return MOE_ERR_DEVICE;
}

void moe_vk_ctx_free(void *be) { (void)be; }

const moe_ops moe_vk_ops = {0};
