#version 450
#extension GL_GOOGLE_include_directive : require
/* moe_combine.comp — y[t] (+)= Σ_s w[t·k + s] · out[pos[t·k + s]] in slot order, over D.
   grid: (ceil(D / WG), n). bindings: 0 expert outputs (sorted pair rows), 1 y, 2 aux */
#include "common.glsl"

layout(std430, binding = 0) readonly buffer P { float po[]; };
layout(std430, binding = 1) buffer Y { float y[]; };
layout(std430, binding = 2) readonly buffer Aux { uint aux[]; };
layout(push_constant) uniform PC { PC_MOE_COMBINE(PC_FIELD) } pc;

void main() {
    uint t = gl_WorkGroupID.y, d = gl_WorkGroupID.x * WG + gl_LocalInvocationIndex;
    if (d >= pc.D) return;
    float s = 0.0;
    for (uint j = 0u; j < pc.k_used; j++) {
        uint p = t * pc.k_used + j;
        s += uintBitsToFloat(aux[pc.w_off + p]) * po[aux[pc.pos_off + p] * pc.D + d];
    }
    if (pc.acc != 0u) y[t * pc.D + d] += s;
    else y[t * pc.D + d] = s;
}
