#version 450
#extension GL_GOOGLE_include_directive : require
/* attn_tile.comp — causal GQA attention for prefill, tiled flash-attention style: one workgroup
   per (query head h, block of BQ = 16 consecutive query tokens). The block walks the union of
   its tokens' key ranges in tiles of BK = 32 keys; each tile's K and then V rows are staged in
   shared memory once and serve all 16 queries (attn.comp reads every key once per query), with
   an online softmax per query row (running max m, sum l; O rescaled by e^(m_old - m_new)).
   Masking is per query: key p counts for token i iff p0_i <= p <= pos_i (causal, sliding
   window as in attn.comp; key p sits in cache row p mod rows). HD (specialization constant 1)
   is at most 128 here (moe_vk.c picks this kernel only then), so thread t < HD owns output dim t
   of all 16 queries and the tiles fit 26 KiB of shared memory.
   grid: (n_head, ceil(n_tok / BQ)). bindings: 0 q, 1 out, 4 K cache, 5 V cache, 7 step */
#include "common.glsl"

layout(std430, binding = 0) readonly buffer Q { float q[]; };
layout(std430, binding = 1) writeonly buffer O { float o[]; };
#ifdef KV_F32
layout(std430, binding = 4) readonly buffer KC { float kc[]; };
layout(std430, binding = 5) readonly buffer VC { float vc[]; };
#else
layout(std430, binding = 4) readonly buffer KC { uint kc[]; };
layout(std430, binding = 5) readonly buffer VC { uint vc[]; };
#endif
layout(push_constant) uniform PC { PC_ATTN(PC_FIELD) } pc;
layout(constant_id = 1) const uint HD = 128u;

#define BQ 16u
#define BK 32u
const uint KS = HD + 1u; /* tile row stride: keys of consecutive threads fall in different banks */
shared float qs[BQ * HD];
shared float kv[BK * KS]; /* the tile's K rows, then its V rows */
shared float sp[BQ * BK]; /* scores, then probabilities */
shared float m_s[BQ], l_s[BQ], a_s[BQ];
shared uint row_s[BK];

/* elements e, e + 1 (e even) of the K (which 0) or V (1) cache */
vec2 kv_pair(uint which, uint e) {
#ifdef KV_F32
    return which == 0u ? vec2(kc[e], kc[e + 1u]) : vec2(vc[e], vc[e + 1u]);
#else
    return unpackHalf2x16(which == 0u ? kc[e >> 1] : vc[e >> 1]);
#endif
}

/* rows kb .. kb + BK of the K or V cache for kv head kvh into kv[] (zeros past hi) */
void load_tile(uint which, uint kb, uint hi, uint kvh) {
    for (uint idx = gl_LocalInvocationIndex; idx < BK * HD / 2u; idx += WG) {
        uint kk = idx / (HD / 2u), d = 2u * (idx % (HD / 2u));
        vec2 v = kb + kk < hi ? kv_pair(which, row_s[kk] * pc.kvw + kvh * HD + d) : vec2(0.0);
        kv[kk * KS + d] = v.x;
        kv[kk * KS + d + 1u] = v.y;
    }
}

void main() {
    uint h = gl_WorkGroupID.x, i0 = gl_WorkGroupID.y * BQ, tid = gl_LocalInvocationIndex;
    uint kvh = h / (pc.n_head / pc.n_kv);
    uint nq = min(BQ, pc.n_tok - i0);
    uint pos_first = uint(int(STEP_POS0) + pc.pos_delta) + i0, pos_last = pos_first + nq - 1u;
    uint lo = pc.window != 0u && pos_first >= pc.window ? pos_first + 1u - pc.window : 0u, hi = pos_last + 1u;
    for (uint idx = tid; idx < BQ * HD; idx += WG) {
        uint qi = idx / HD, d = idx % HD;
        qs[idx] = qi < nq ? q[((i0 + qi) * pc.n_head + h) * HD + d] : 0.0;
    }
    if (tid < BQ) {
        m_s[tid] = NEG_INF;
        l_s[tid] = 0.0;
    }
    float oa[BQ];
    [[unroll]] for (uint r = 0u; r < BQ; r++) oa[r] = 0.0;
    /* score work: thread t scores key t % 32 against queries t / 32 + 4 j */
    uint sk = tid % BK, sq = tid / BK;
    for (uint kb = lo; kb < hi; kb += BK) {
        if (tid < BK) row_s[tid] = (kb + tid) % pc.rows;
        barrier();
        load_tile(0u, kb, hi, kvh);
        barrier();
        uint p = kb + sk;
        for (uint r = sq; r < BQ; r += WG / BK) {
            float s = 0.0;
            for (uint d = 0u; d < HD; d++) s += qs[r * HD + d] * kv[sk * KS + d];
            uint pos = pos_first + r;
            bool ok = r < nq && p <= pos && (pc.window == 0u || p + pc.window > pos);
            sp[r * BK + sk] = ok ? s * pc.scale : NEG_INF;
        }
        barrier();
        if (tid < BQ) { /* the online softmax of row tid over this tile */
            float bm = m_s[tid];
            for (uint j = 0u; j < BK; j++) bm = max(bm, sp[tid * BK + j]);
            /* a row with no key yet (all masked so far) keeps m = -inf, alpha 1 and weights 0 */
            float alpha = bm == NEG_INF ? 1.0 : exp(m_s[tid] - bm), sum = 0.0;
            for (uint j = 0u; j < BK; j++) {
                float w = bm == NEG_INF ? 0.0 : exp(sp[tid * BK + j] - bm);
                sp[tid * BK + j] = w;
                sum += w;
            }
            m_s[tid] = bm;
            l_s[tid] = l_s[tid] * alpha + sum;
            a_s[tid] = alpha;
        }
        load_tile(1u, kb, hi, kvh); /* the K tile is no longer read: V takes its place */
        barrier();
        if (tid < HD) {
            [[unroll]] for (uint r = 0u; r < BQ; r++) {
                float acc = oa[r] * a_s[r];
                for (uint j = 0u; j < BK; j++) acc += sp[r * BK + j] * kv[j * KS + tid];
                oa[r] = acc;
            }
        }
        barrier();
    }
    if (tid < HD)
        [[unroll]] for (uint r = 0u; r < BQ; r++)
            if (r < nq) o[((i0 + r) * pc.n_head + h) * HD + tid] = oa[r] / l_s[r];
}
