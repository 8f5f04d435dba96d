#version 450
#extension GL_GOOGLE_include_directive : require
/* attn_merge.comp — the second half of split-KV decode attention (attn.comp -DSPLIT): merges the
   n_split partial results of one query head (max m_c, sum l_c, unnormalized o_c = Σ w·v over the
   chunk's keys) by log-sum-exp: M = max m_c, out = Σ o_c e^(m_c - M) / Σ l_c e^(m_c - M).
   An empty chunk (m_c = -inf, l_c = 0) weighs 0. grid: (n_head, n); WG = 128 threads over the
   head's dims. bindings: 0 partials [(i·n_head + h)·n_split + c][2 + hd], 1 out [i][n_head·hd] */
#include "common.glsl"

layout(std430, binding = 0) readonly buffer P { float part[]; };
layout(std430, binding = 1) writeonly buffer O { float o[]; };
layout(push_constant) uniform PC { PC_ATTN_MERGE(PC_FIELD) } pc;

#define MAX_SPLIT 64u /* moe_vk.c VK_SPLIT_MAX */
shared float wc[MAX_SPLIT];

void main() {
    uint h = gl_WorkGroupID.x, i = gl_WorkGroupID.y, tid = gl_LocalInvocationIndex;
    uint n_head = gl_NumWorkGroups.x, hd = pc.hd, ns = min(pc.n_split, MAX_SPLIT), st = hd + 2u;
    uint base = (i * n_head + h) * pc.n_split * st;
    float mx = NEG_INF;
    for (uint c = 0u; c < ns; c++) mx = max(mx, part[base + c * st]);
    if (tid < ns) wc[tid] = exp(part[base + tid * st] - mx);
    barrier();
    float l = 0.0;
    for (uint c = 0u; c < ns; c++) l += part[base + c * st + 1u] * wc[c];
    for (uint d = tid; d < hd; d += WG) {
        float acc = 0.0;
        for (uint c = 0u; c < ns; c++) acc += part[base + c * st + 2u + d] * wc[c];
        o[(i * n_head + h) * hd + d] = acc / l;
    }
}
