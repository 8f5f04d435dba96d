#version 450
#extension GL_GOOGLE_include_directive : require
/* topk.comp — route every token of a prefill chunk (route.glsl), writing ids[t·k + s] and
   weights[t·k + s] into the MoE aux buffer; with has_scale the weight of expert e is multiplied
   by scale[e] (Gemma 4's per-expert scale). grid: (n). bindings: 2 aux, 4 scale, 5 router logits */
#include "common.glsl"
#include "route.glsl"

layout(push_constant) uniform PC { PC_TOPK(PC_FIELD) } pc;

void main() {
    uint t = gl_WorkGroupID.x;
    route(pc.r_off + t * pc.E, pc.E, pc.k_used, pc.norm, pc.ids_off + t * pc.k_used, pc.w_off + t * pc.k_used, pc.has_scale);
}
