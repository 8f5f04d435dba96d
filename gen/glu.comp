#version 450
#extension GL_GOOGLE_include_directive : require
/* glu.comp — y[i][j] = act(g[i][j]) · u[i][up_col0 + j] over `count` = rows · width floats; the up
   rows are up_stride wide (a slice of a wider buffer). y may be g (in place).
   bindings: 0 g, 1 y, 2 u */
#include "common.glsl"

layout(std430, binding = 0) readonly buffer G { float g[]; };
layout(std430, binding = 1) buffer Y { float y[]; };
layout(std430, binding = 2) readonly buffer U { float u[]; };
layout(push_constant) uniform PC { PC_GLU(PC_FIELD) } pc;

void main() {
    uint i = wg_linear_x() * WG + gl_LocalInvocationIndex;
    if (i >= pc.count) return;
    uint r = i / pc.width, j = i - r * pc.width;
    y[i] = act_fn(g[i], pc.act) * u[r * pc.up_stride + pc.up_col0 + j];
}
