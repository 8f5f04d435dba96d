#version 450
#extension GL_GOOGLE_include_directive : require
/* split_heads.comp — rows of heads [a (hd) | b (hd)] (gated attention's q with its gate) into
   a[r][h·hd + e] and b[r][h·hd + e]; `count` = rows · heads · hd outputs.
   bindings: 0 src, 1 a, 3 b */
#include "common.glsl"

layout(std430, binding = 0) readonly buffer S { float s[]; };
layout(std430, binding = 1) writeonly buffer A { float a[]; };
layout(std430, binding = 3) writeonly buffer B { float b[]; };
layout(push_constant) uniform PC { PC_SPLIT_HEADS(PC_FIELD) } pc;

void main() {
    uint i = wg_linear_x() * WG + gl_LocalInvocationIndex;
    if (i >= pc.count) return;
    uint h = i / pc.hd, e = i - h * pc.hd, src = 2u * h * pc.hd + e;
    a[i] = s[src];
    b[i] = s[src + pc.hd];
}
