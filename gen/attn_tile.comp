#version 450
#extension GL_GOOGLE_include_directive : require
/* attn_tile.comp — causal GQA attention for prefill, tiled flash-attention style: one workgroup
   per (query head h, block of BQ = 16 consecutive query tokens). The block walks the union of
   its tokens' key ranges in tiles of BK = 32 keys; each tile's K and then V rows are staged in
   shared memory once and serve all 16 queries (attn.comp reads every key once per query), with
   an online softmax per query row (running max m, sum l; O rescaled by e^(m_old - m_new)).
   Masking is per query: key p counts for token i iff p0_i <= p <= pos_i (causal, sliding
   window as in attn.comp; key p sits in cache row p mod rows).
   HD (specialization constant 1) is 32, 64 or 128 (moe_vk.c picks this kernel only then): rows
   are HD/4 vec4s, scores take 4 queries x 1 key per thread, and O takes HD/4 threads per query
   row, each 4 dims of BQ·HD/(4·WG) rows; the tiles fit 27 KiB of shared memory.
   grid: (n_head, ceil(n_tok / BQ)). bindings: 0 q, 1 out, 4 K cache, 5 V cache, 7 step */
#include "common.glsl"

layout(std430, binding = 0) readonly buffer Q { vec4 q4[]; };
layout(std430, binding = 1) writeonly buffer O { vec4 o4[]; };
#ifdef KV_F32
layout(std430, binding = 4) readonly buffer KC { vec4 kc[]; };
layout(std430, binding = 5) readonly buffer VC { vec4 vc[]; };
#else
layout(std430, binding = 4) readonly buffer KC { uvec2 kc[]; };
layout(std430, binding = 5) readonly buffer VC { uvec2 vc[]; };
#endif
layout(push_constant) uniform PC { PC_ATTN(PC_FIELD) } pc;
layout(constant_id = 1) const uint HD = 128u;

#define BQ 16u
#define BK 32u
const uint H4 = HD / 4u;      /* vec4s per head row */
const uint KS4 = H4 + 1u;     /* tile row stride: the keys of neighbouring threads start 4 banks apart */
const uint SQ = WG / BK;      /* score work: thread t takes key t % BK and queries t / BK + SQ·j */
const uint NS = BQ / SQ;
const uint RP = WG / H4;      /* O work: thread t takes dims 4·(t % H4) of rows t / H4 + RP·j */
const uint NR = BQ / RP;
shared vec4 qs[BQ * H4];
shared vec4 kv[BK * KS4];     /* the tile's K rows, then its V rows */
shared float sp[BQ * BK];     /* scores, then probabilities */
shared float m_s[BQ], l_s[BQ], a_s[BQ];
shared uint row_s[BK];

/* elements e .. e + 3 (e % 4 == 0) of the K (which 0) or V (1) cache */
vec4 kv_quad(uint which, uint e) {
#ifdef KV_F32
    return which == 0u ? kc[e >> 2] : vc[e >> 2];
#else
    uvec2 w = which == 0u ? kc[e >> 2] : vc[e >> 2];
    return vec4(unpackHalf2x16(w.x), unpackHalf2x16(w.y));
#endif
}

/* rows kb .. kb + BK of the K or V cache for kv head kvh into kv[] (zeros from hi on) */
void load_tile(uint which, uint kb, uint hi, uint kvh) {
    for (uint idx = gl_LocalInvocationIndex; idx < BK * H4; idx += WG) {
        uint kk = idx / H4, c = idx % H4;
        kv[kk * KS4 + c] = kb + kk < hi ? kv_quad(which, row_s[kk] * pc.kvw + kvh * HD + 4u * c) : vec4(0.0);
    }
}

void main() {
    uint h = gl_WorkGroupID.x, i0 = gl_WorkGroupID.y * BQ, tid = gl_LocalInvocationIndex;
    uint kvh = h / (pc.n_head / pc.n_kv);
    uint nq = min(BQ, pc.n_tok - i0);
    uint pos_first = uint(int(STEP_POS0) + pc.pos_delta) + i0, pos_last = pos_first + nq - 1u;
    uint lo = pc.window != 0u && pos_first >= pc.window ? pos_first + 1u - pc.window : 0u, hi = pos_last + 1u;
    for (uint idx = tid; idx < BQ * H4; idx += WG) {
        uint r = idx / H4;
        qs[idx] = r < nq ? q4[((i0 + r) * pc.n_head + h) * H4 + idx % H4] : vec4(0.0);
    }
    if (tid < BQ) {
        m_s[tid] = NEG_INF;
        l_s[tid] = 0.0;
    }
    uint sk = tid % BK, sq = tid / BK, oc = tid % H4, orow = tid / H4;
    vec4 oa[NR];
    [[unroll]] for (uint j = 0u; j < NR; j++) oa[j] = vec4(0.0);
    for (uint kb = lo; kb < hi; kb += BK) {
        if (tid < BK) row_s[tid] = (kb + tid) % pc.rows;
        barrier();
        load_tile(0u, kb, hi, kvh);
        barrier();
        float s[NS];
        [[unroll]] for (uint j = 0u; j < NS; j++) s[j] = 0.0;
        for (uint c = 0u; c < H4; c++) {
            vec4 k = kv[sk * KS4 + c];
            [[unroll]] for (uint j = 0u; j < NS; j++) s[j] += dot(qs[(sq + SQ * j) * H4 + c], k);
        }
        uint p = kb + sk;
        [[unroll]] for (uint j = 0u; j < NS; j++) {
            uint r = sq + SQ * j, pos = pos_first + r;
            bool ok = r < nq && p <= pos && (pc.window == 0u || p + pc.window > pos);
            sp[r * BK + sk] = ok ? s[j] * pc.scale : NEG_INF;
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
        [[unroll]] for (uint j = 0u; j < NR; j++) oa[j] *= a_s[orow + RP * j];
        for (uint k = 0u; k < BK; k++) {
            vec4 v = kv[k * KS4 + oc];
            [[unroll]] for (uint j = 0u; j < NR; j++) oa[j] += sp[(orow + RP * j) * BK + k] * v;
        }
        barrier();
    }
    [[unroll]] for (uint j = 0u; j < NR; j++) {
        uint r = orow + RP * j;
        if (r < nq) o4[((i0 + r) * pc.n_head + h) * H4 + oc] = oa[j] / l_s[r];
    }
}
