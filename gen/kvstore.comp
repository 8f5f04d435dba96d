#version 450
#extension GL_GOOGLE_include_directive : require
/* kvstore.comp — stores n rows of K and V (f32 activations, kvw wide) as KV cache rows
   (pos0 + i) mod rows, pos0 = step pos0 + pos_delta, in the cache's element type (f16: round to
   nearest); rows = n_ctx, or the ring size of a sliding-window cache.
   grid: (ceil(kvw / (2·WG)), n, 2), z = 0 for K, 1 for V.
   bindings: 0 K rows, 1 V rows, 4 K cache, 5 V cache (this layer's windows), 7 step */
#include "common.glsl"

layout(std430, binding = 0) readonly buffer KA { float ka[]; };
layout(std430, binding = 1) readonly buffer VA { float va[]; };
#ifdef KV_F32
layout(std430, binding = 4) writeonly buffer KC { float kc[]; };
layout(std430, binding = 5) writeonly buffer VC { float vc[]; };
#else
layout(std430, binding = 4) writeonly buffer KC { uint kc[]; };
layout(std430, binding = 5) writeonly buffer VC { uint vc[]; };
#endif
layout(push_constant) uniform PC { PC_KVSTORE(PC_FIELD) } pc;

void main() {
    uint i = gl_WorkGroupID.y, d = 2u * (gl_WorkGroupID.x * WG + gl_LocalInvocationIndex);
    if (d >= pc.kvw) return;
    uint pos = uint(int(STEP_POS0) + pc.pos_delta) + i;
    uint s = i * pc.kvw + d, c = (pos % pc.rows) * pc.kvw + d;
    bool is_v = gl_WorkGroupID.z != 0u;
    vec2 v = is_v ? vec2(va[s], va[s + 1u]) : vec2(ka[s], ka[s + 1u]);
#ifdef KV_F32
    if (is_v) { vc[c] = v.x; vc[c + 1u] = v.y; }
    else { kc[c] = v.x; kc[c + 1u] = v.y; }
#else
    if (is_v) vc[c >> 1] = packHalf2x16(v);
    else kc[c >> 1] = packHalf2x16(v);
#endif
}
