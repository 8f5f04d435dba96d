/* common.glsl — what every moe compute shader shares.

   Descriptor interface (one push-descriptor set for all kernels, see moe_vk.c "descriptors"):
     binding 0..5  storage buffers whose meaning each kernel documents (src, dst, aux, ...)
     binding 6     weights: an array of XBUFS windows; a weight row is (window index, byte offset)
     binding 7     the step buffer: [0] pos0, [1] n, [4 + i] token i
   Workgroup size is specialization constant 0 (WG). Subgroup arithmetic is required.
   Push constants: each kernel declares layout(push_constant) uniform PC { PC_<KERNEL>(PC_FIELD) } pc;
   with the fields of moe_vk.c's host-shader contract (contract.glsl is generated from it). */
#extension GL_KHR_shader_subgroup_basic : require
#extension GL_KHR_shader_subgroup_arithmetic : require
#extension GL_EXT_control_flow_attributes : require
#include "contract.glsl"

layout(constant_id = 0) const uint WG = 64;
layout(local_size_x_id = 0, local_size_y = 1, local_size_z = 1) in;

#define XBUFS 8
#define NEG_INF uintBitsToFloat(0xff800000u)

layout(std430, binding = 7) readonly buffer Step { uint step_u[]; };
#define STEP_POS0 (step_u[0])

/* a workgroup index folded over x and z (grids larger than maxComputeWorkGroupCount[0]) */
uint wg_linear_x() { return gl_WorkGroupID.x + gl_WorkGroupID.z * gl_NumWorkGroups.x; }

/* The "last block" hand-off between the workgroups of one dispatch: every invocation's earlier
   writes (to coherent buffers) are made visible device-wide, then invocation 0 counts the
   workgroup in at counter (a uint in a buffer, 0 before the dispatch). flag, a shared uint of the
   caller, becomes 1 in the workgroup that counts in as the total-th: it alone may read what the
   others wrote, and it sets the counter back to 0 (all the others have counted in), so a replayed
   command buffer starts from zero again. A statement; call from uniform control flow. */
#define WG_COUNT_IN(counter, total, flag)                                                       \
    memoryBarrierBuffer();                                                                      \
    barrier();                                                                                  \
    if (gl_LocalInvocationIndex == 0u) flag = atomicAdd(counter, 1u) == (total) - 1u ? 1u : 0u; \
    barrier();                                                                                  \
    if (flag != 0u) {                                                                           \
        memoryBarrierBuffer();                                                                  \
        if (gl_LocalInvocationIndex == 0u) counter = 0u;                                        \
    }

/* ---- workgroup reductions: subgroup first, then across subgroups through shared memory.
   Call from uniform control flow; every invocation gets the result. ---- */
shared vec4 red_v[64];

float wg_sum(float v) {
    v = subgroupAdd(v);
    barrier();
    if (subgroupElect()) red_v[gl_SubgroupID].x = v;
    barrier();
    float t = 0.0;
    for (uint i = 0u; i < gl_NumSubgroups; i++) t += red_v[i].x;
    return t;
}

vec2 wg_sum2(vec2 v) {
    v = subgroupAdd(v);
    barrier();
    if (subgroupElect()) red_v[gl_SubgroupID].xy = v;
    barrier();
    vec2 t = vec2(0.0);
    for (uint i = 0u; i < gl_NumSubgroups; i++) t += red_v[i].xy;
    return t;
}

vec4 wg_sum4(vec4 v) {
    v = subgroupAdd(v);
    barrier();
    if (subgroupElect()) red_v[gl_SubgroupID] = v;
    barrier();
    vec4 t = vec4(0.0);
    for (uint i = 0u; i < gl_NumSubgroups; i++) t += red_v[i];
    return t;
}

float wg_max(float v) {
    v = subgroupMax(v);
    barrier();
    if (subgroupElect()) red_v[gl_SubgroupID].x = v;
    barrier();
    float t = NEG_INF;
    for (uint i = 0u; i < gl_NumSubgroups; i++) t = max(t, red_v[i].x);
    return t;
}

uint wg_min_u(uint v) {
    v = subgroupMin(v);
    barrier();
    if (subgroupElect()) red_v[gl_SubgroupID].x = uintBitsToFloat(v);
    barrier();
    uint t = 0xffffffffu;
    for (uint i = 0u; i < gl_NumSubgroups; i++) t = min(t, floatBitsToUint(red_v[i].x));
    return t;
}

float silu(float g) { return g / (1.0 + exp(-g)); }

/* tanh without the inf/inf of exp-based forms: |x| > 15 is ±1 in f32 anyway */
float tanh_safe(float x) { return tanh(clamp(x, -15.0, 15.0)); }

/* GELU, tanh approximation (gelu_pytorch_tanh) */
float gelu_tanh(float g) { return 0.5 * g * (1.0 + tanh_safe(0.7978845608028654 * (g + 0.044715 * g * g * g))); }

/* the activation of a gated GLU: act 0 SiLU (MOE_ACT_SILU), 1 GELU-tanh (MOE_ACT_GELU_TANH) */
float act_fn(float g, uint act) { return act == 1u ? gelu_tanh(g) : silu(g); }
