#version 450
#extension GL_GOOGLE_include_directive : require
/* topk.comp — route every token of a prefill chunk (route.glsl), writing ids[t·k + s] and
   weights[t·k + s] into the MoE aux buffer; with has_scale the weight of expert e is multiplied
   by scale[e] (Gemma 4's per-expert scale). grid: (n). bindings: 2 aux, 4 scale, 5 router logits */
#include "common.glsl"
#include "route.glsl"

layout(std430, binding = 2) buffer Aux { uint aux[]; };
layout(std430, binding = 4) readonly buffer Scale { float scale[]; };
layout(push_constant) uniform PC { PC_TOPK(PC_FIELD) } pc;

void main() {
    uint t = gl_WorkGroupID.x, tid = gl_LocalInvocationIndex;
    route(pc.r_off + t * pc.E, pc.E, pc.k_used, pc.norm);
    if (tid < pc.k_used) {
        aux[pc.ids_off + t * pc.k_used + tid] = rt_id[tid];
        float w = rt_w[tid];
        if (pc.has_scale != 0u) w *= scale[rt_id[tid]];
        aux[pc.w_off + t * pc.k_used + tid] = floatBitsToUint(w);
    }
}
