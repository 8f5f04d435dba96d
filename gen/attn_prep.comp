#version 450
#extension GL_GOOGLE_include_directive : require
/* attn_prep.comp — prepares one token's attention inputs in one grid: workgroup x < n_head
   takes q head x (RMSNorm if flags & 1, NeoX RoPE, in place on binding 0); the n_kv workgroups
   after them take k head x - n_head (RMSNorm if flags & 2, RoPE, in place on binding 1), store
   it into K cache row pos mod rows and copy the same head of V into the V cache. This replaces
   a headwise.comp dispatch for q and one for k + store with the same per-element arithmetic
   (head_prep.glsl), so the results are those of the two dispatches bit for bit.
   pos = step pos0 + pos_delta + token. The norm gains sit in weight windows:
   gain d of q is window gq_win's float gq_off + d (k: gk_win, gk_off).
   grid: (n_head + n_kv, n). bindings: 0 q, 1 k, 2 V rows, 3 rope table, 4 K cache, 5 V cache
   (this layer's windows), 6 weight windows win .. win+7, 7 step */
#include "common.glsl"

layout(std430, binding = 0) buffer Qa { float qa[]; };
layout(std430, binding = 1) buffer Ka { float ka[]; };
layout(std430, binding = 2) readonly buffer VA { float va[]; };
layout(std430, binding = 6) readonly buffer Gw { float g[]; } gw[XBUFS];
layout(push_constant) uniform PC { PC_ATTN_PREP(PC_FIELD) } pc;

bool is_k;          /* this workgroup's head is a k head (uniform) */
uint g_win, g_off;  /* where its norm gain starts */
#define HEAD_X(o, d) (is_k ? ka[(o) + (d)] : qa[(o) + (d)])
#define HEAD_G(d) gw[g_win].g[g_off + (d)]
#define HEAD_V(i) va[i]
#include "head_prep.glsl"

void main() {
    uint x = gl_WorkGroupID.x, i = gl_WorkGroupID.y, tid = gl_LocalInvocationIndex;
    is_k = x >= pc.n_head;
    uint h = is_k ? x - pc.n_head : x, nh = is_k ? pc.n_kv : pc.n_head;
    g_win = is_k ? pc.gk_win : pc.gq_win;
    g_off = is_k ? pc.gk_off : pc.gq_off;
    uint o = (i * nh + h) * pc.hd;
    uint pos = uint(int(STEP_POS0) + pc.pos_delta) + i;
    head_norm_rope(o, pc.hd, pc.n_rot, (pc.flags & (is_k ? 2u : 1u)) != 0u, true, pc.eps, pos);
    if (!is_k) {
        for (uint d = tid; d < pc.hd; d += WG) qa[o + d] = hs[d];
        return;
    }
    for (uint d = tid; d < pc.hd; d += WG) ka[o + d] = hs[d];
    uint c = (pos % pc.rows) * pc.kvw + h * pc.hd;
    head_store_k(c, pc.hd);
    head_store_v(c, o, pc.hd);
}
