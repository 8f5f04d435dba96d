#version 450
#extension GL_GOOGLE_include_directive : require
/* attn.comp — causal GQA attention of the GW query heads h0 .. h0+GW-1 of one token that share
   one KV head, over the KV cache (flash-style: keys in blocks of 32 with a running max and sum per
   head, so any context length fits). With grouped-query attention (Qwen3-30B: 32 query heads on
   4 KV heads) a workgroup per query head would read every K/V row once per head of its group;
   here each thread loads its share of a K row / V column once and applies it to all GW heads.
   Query token i sits at position pos = pos0 + i (pos0 = step pos0 + pos_delta) and sees keys
   p0 ..= pos, p0 = pos - window + 1 with a sliding window (else 0); key p sits in cache row
   p mod rows (a ring of rows for sliding layers; rows = n_ctx otherwise).
   out = Σ_p softmax_p(q·k_p · scale) v_p.  WG = 128; the head size HD is specialization
   constant 1 (<= 512, a multiple of 8) and the heads per workgroup GW constant 2 (a divisor of
   n_head / n_kv), so every inner loop has a fixed trip count.
   Scores: 4 threads per key, each a quarter of the head (16-byte loads when HD % 32 == 0);
   values: each thread owns output dims tid + 128·j (j < ND) and reads all 32 keys of a block with
   no branch (past the last key it re-reads that key with weight 0), so the loads overlap.
   Per head, every sum runs in the order of the one-head-per-workgroup kernel this replaced
   (GW = 1 is that kernel), so the results do not depend on GW.
   grid: (n_head / GW, n). bindings: 0 q, 1 out, 4 K cache, 5 V cache (layer windows), 7 step.
   -DSPLIT (decode over many keys, "flash decoding"): grid (n_head / GW, n, n_split); workgroup z
   walks only keys [z·chunk, (z+1)·chunk) of the query's range, so the KV length is spread over
   many workgroups, and writes each head's partial to binding 1: the unnormalized Σ w·v of partial
   row r = (i·n_head + h)·n_split + z at [r·HD, +HD) (16-byte aligned, so the merge reads vec4s),
   its max m and sum l at [R·HD + 2r, +2) (R: all partial rows). The last workgroup of a (token, KV group) to finish
   (an arrival counter per group in binding 3) merges all chunks into binding 2, in chunk order,
   so the result does not depend on which one arrives last; a separate merge dispatch and its
   barrier cost more than the merge itself. It sets the counter back to 0 for the next replay.
   Without SPLIT the range is the whole [0, n_keys). */
#include "common.glsl"

layout(std430, binding = 0) readonly buffer Q { float q[]; };
#ifdef SPLIT
layout(std430, binding = 1) coherent buffer P { float pg[]; };     /* partials, read back by the merging workgroup */
layout(std430, binding = 1) coherent buffer P4 { vec4 pg4[]; };
layout(std430, binding = 2) writeonly buffer O { float o[]; };
layout(std430, binding = 3) coherent buffer A { uint arrivals[]; }; /* [i·n_groups + group], 0 between dispatches */
#define MAX_SPLIT 64u /* moe_vk.c VK_SPLIT_MAX */
#else
layout(std430, binding = 1) writeonly buffer O { float o[]; };
#endif
#ifdef KV_F32
layout(std430, binding = 4) readonly buffer KC { float kc[]; };
layout(std430, binding = 4) readonly buffer KC4 { vec4 kc4[]; };
layout(std430, binding = 5) readonly buffer VC { float vc[]; };
#else
layout(std430, binding = 4) readonly buffer KC { uint kc[]; };
layout(std430, binding = 4) readonly buffer KC4 { uvec4 kc4[]; };
layout(std430, binding = 5) readonly buffer VC { uint vc[]; };
#endif
layout(push_constant) uniform PC { PC_ATTN(PC_FIELD) } pc;
layout(constant_id = 1) const uint HD = 128u;
layout(constant_id = 2) const uint GW = 1u;

#define KB 32u
const uint ND = (HD + 127u) / 128u;                           /* output dims per thread */
shared vec4 qs[GW * HD / 4u];                                 /* head g's query at [g·HD/4, (g+1)·HD/4) */
shared float part[GW * 128u];                                 /* [g][tid]: quarter scores */
shared float ps[GW * KB];                                     /* [g][key]: scores, then weights */
shared uint bmk[GW];                                          /* [g]: the running max as an order key (max_key) */
/* a float's order key: key(a) < key(b) exactly when a < b, so a shared atomicMax over keys finds
   the exact max of the block's scores in the pass that writes them (no serial pass, no barrier) */
uint max_key(float f) {
    uint u = floatBitsToUint(f);
    return (u & 0x80000000u) != 0u ? ~u : u | 0x80000000u;
}
float key_value(uint k) { return uintBitsToFloat((k & 0x80000000u) != 0u ? k & 0x7fffffffu : ~k); }

#ifdef SPLIT
shared float cmax[GW];                                        /* [g]: the max over the chunks */
shared uint merger;                                           /* this workgroup arrived last */

/* out = Σ_c o_c e^(m_c - M) / Σ_c l_c e^(m_c - M), M = max_c m_c, over the nz chunks of heads
   h0 .. h0+GW-1 of token i, each sum in chunk order. part (free once the walk is done) holds
   head g's chunk weights at [g·128, +nz) and sums l_c at [g·128 + 64, +nz). An empty chunk
   (m = -inf, l = 0) weighs 0. The partials are read as vec4s, MU chunks per trip: one workgroup
   reads them all (GW·nz·HD floats), so its time is the loads in flight. */
#define MU 8u
void merge_chunks(uint i, uint h0, uint nz, uint tid) {
    const uint H4 = HD / 4u;
    uint row0 = (i * pc.n_head + h0) * nz;                  /* head g's chunk c: row row0 + g·nz + c */
    uint mlo = gl_NumWorkGroups.y * pc.n_head * nz * HD;    /* the (m, l) pairs after all rows */
    for (uint t = tid; t < GW * nz; t += 128u) {
        uint g = t / nz, c = t % nz;
        part[g * 128u + c] = pg[mlo + 2u * (row0 + t)];
        part[g * 128u + 64u + c] = pg[mlo + 2u * (row0 + t) + 1u];
    }
    barrier();
    if (tid < GW) { /* max is exact in any order */
        float mx = NEG_INF;
        for (uint c = 0u; c < nz; c++) mx = max(mx, part[tid * 128u + c]);
        cmax[tid] = mx;
    }
    barrier();
    for (uint t = tid; t < GW * nz; t += 128u) {
        uint g = t / nz, c = t % nz;
        part[g * 128u + c] = exp(part[g * 128u + c] - cmax[g]);
    }
    barrier();
    for (uint t = tid; t < GW * H4; t += 128u) {
        uint g = t / H4, d4 = t % H4, w = g * 128u, b = (row0 + g * nz) * H4 + d4;
        float l = 0.0;
        for (uint c = 0u; c < nz; c++) l += part[w + 64u + c] * part[w + c];
        vec4 acc = vec4(0.0);
        uint c = 0u;
        for (; c + MU <= nz; c += MU) {
            vec4 v[MU];
            [[unroll]] for (uint u = 0u; u < MU; u++) v[u] = pg4[b + (c + u) * H4];
            [[unroll]] for (uint u = 0u; u < MU; u++) acc += v[u] * part[w + c + u];
        }
        for (; c < nz; c++) acc += pg4[b + c * H4] * part[w + c];
        acc /= l;
        uint oo = (i * pc.n_head + h0 + g) * HD + 4u * d4;
        o[oo] = acc.x;
        o[oo + 1u] = acc.y;
        o[oo + 2u] = acc.z;
        o[oo + 3u] = acc.w;
    }
}
#endif

float v_at(uint i) {
#ifdef KV_F32
    return vc[i];
#else
    return unpackHalf2x16(vc[i >> 1])[i & 1u];
#endif
}

float q_at(uint g, uint d) { return qs[g * (HD / 4u) + (d >> 2)][d & 3u]; }

void main() {
    uint h0 = gl_WorkGroupID.x * GW, i = gl_WorkGroupID.y, tid = gl_LocalInvocationIndex;
    const uint hd = HD;
    uint kvh = h0 / (pc.n_head / pc.n_kv);
    uint pos = uint(int(STEP_POS0) + pc.pos_delta) + i;
    uint p0 = pc.window != 0u && pos >= pc.window ? pos + 1u - pc.window : 0u;
    uint n_keys = pos + 1u - p0;
    uint k_lo = 0u, k_hi = n_keys;                           /* this workgroup's keys */
#ifdef SPLIT
    k_lo = min(gl_WorkGroupID.z * pc.chunk, n_keys);
    k_hi = min(k_lo + pc.chunk, n_keys);
#endif
    uint r0 = p0 % pc.rows;                                  /* ring row of key 0; key j at r0 + j, wrapped once at most */
    uint qo = (i * pc.n_head + h0) * hd;                     /* the GW heads are adjacent */
    for (uint d = tid; d < GW * HD / 4u; d += 128u)
        qs[d] = vec4(q[qo + 4u * d], q[qo + 4u * d + 1u], q[qo + 4u * d + 2u], q[qo + 4u * d + 3u]);
    if (tid < GW) bmk[tid] = max_key(NEG_INF);
    barrier();

    const uint dq = HD >> 2;                                 /* score work: 4 threads per key */
    const bool vec = (HD & 31u) == 0u;
    uint key = tid >> 2, quarter = tid & 3u;
    float m[GW], l[GW], oa[GW * ND];
    [[unroll]] for (uint g = 0u; g < GW; g++) {
        m[g] = NEG_INF;
        l[g] = 0.0;
    }
    [[unroll]] for (uint j = 0u; j < GW * ND; j++) oa[j] = 0.0;
    for (uint kb = k_lo; kb < k_hi; kb += KB) {
        uint p = kb + key;
        float s[GW];
        [[unroll]] for (uint g = 0u; g < GW; g++) s[g] = 0.0;
        if (p < k_hi) {
            uint row = r0 + p;
            if (row >= pc.rows) row -= pc.rows;
            uint base = row * pc.kvw + kvh * hd + quarter * dq, qb = quarter * dq;
            if (vec) {
#ifdef KV_F32
                [[unroll]] for (uint c = 0u; c < dq; c += 4u) {
                    vec4 kv = kc4[(base + c) >> 2];
                    [[unroll]] for (uint g = 0u; g < GW; g++) s[g] += dot(kv, qs[g * (HD / 4u) + ((qb + c) >> 2)]);
                }
#else
                [[unroll]] for (uint c = 0u; c < dq; c += 8u) {
                    uvec4 w = kc4[(base + c) >> 3];
                    vec4 ka = vec4(unpackHalf2x16(w.x), unpackHalf2x16(w.y)), kz = vec4(unpackHalf2x16(w.z), unpackHalf2x16(w.w));
                    [[unroll]] for (uint g = 0u; g < GW; g++) {
                        uint qi = g * (HD / 4u) + ((qb + c) >> 2);
                        s[g] += dot(ka, qs[qi]) + dot(kz, qs[qi + 1u]);
                    }
                }
#endif
            } else {
#ifdef KV_F32
                [[unroll]] for (uint d = 0u; d < dq; d++) {
                    float kv = kc[base + d];
                    [[unroll]] for (uint g = 0u; g < GW; g++) s[g] += q_at(g, qb + d) * kv;
                }
#else
                [[unroll]] for (uint d = 0u; d < dq; d += 2u) {
                    vec2 kv = unpackHalf2x16(kc[(base + d) >> 1]);
                    [[unroll]] for (uint g = 0u; g < GW; g++) s[g] += q_at(g, qb + d) * kv.x + q_at(g, qb + d + 1u) * kv.y;
                }
#endif
            }
        }
        [[unroll]] for (uint g = 0u; g < GW; g++) part[g * 128u + tid] = s[g];
        barrier();
        for (uint t = tid; t < GW * KB; t += 128u) {
            uint g = t / KB, j = t % KB, pp = g * 128u + 4u * j;
            float sc = (part[pp] + part[pp + 1u]) + (part[pp + 2u] + part[pp + 3u]);
            bool live = kb + j < k_hi;
            ps[t] = live ? sc * pc.scale : NEG_INF;
            if (live) atomicMax(bmk[g], max_key(ps[t])); /* bmk[g] already holds the running max m[g] */
        }
        barrier();
        float alpha[GW];
        [[unroll]] for (uint g = 0u; g < GW; g++) {
            float bm = key_value(bmk[g]);
            alpha[g] = exp(m[g] - bm);
            m[g] = bm;
        }
        /* (each thread rescales the entries it wrote) */
        for (uint t = tid; t < GW * KB; t += 128u) ps[t] = exp(ps[t] - key_value(bmk[t / KB]));
        barrier();
        float sum[GW];
        [[unroll]] for (uint g = 0u; g < GW; g++) {
            sum[g] = 0.0;
            [[unroll]] for (uint e = 0u; e < ND; e++) oa[g * ND + e] *= alpha[g];
        }
        uint last = k_hi - 1u;
        [[unroll]] for (uint j = 0u; j < KB; j++) {
            uint row = r0 + min(kb + j, last);
            if (row >= pc.rows) row -= pc.rows;
            uint vb = row * pc.kvw + kvh * HD;
            float vv[ND];
            [[unroll]] for (uint e = 0u; e < ND; e++) vv[e] = tid + 128u * e < HD ? v_at(vb + tid + 128u * e) : 0.0;
            [[unroll]] for (uint g = 0u; g < GW; g++) {
                float w = ps[g * KB + j]; /* 0 past the last key */
                sum[g] += w;
                [[unroll]] for (uint e = 0u; e < ND; e++) oa[g * ND + e] += w * vv[e];
            }
        }
        [[unroll]] for (uint g = 0u; g < GW; g++) l[g] = l[g] * alpha[g] + sum[g];
        /* no barrier here: the next block writes part (read before the second barrier above),
           then ps and bmk only after its first barrier, which every thread reaches after this
           block's reads of ps */
    }
#ifdef SPLIT
    uint nz = min(gl_NumWorkGroups.z, MAX_SPLIT);
    [[unroll]] for (uint g = 0u; g < GW; g++) {
        /* an empty chunk (none is recorded, but a replayed one may be) leaves m = -inf, l = 0,
           o = 0: weight 0 in the merge */
        uint row = (i * pc.n_head + h0 + g) * nz + gl_WorkGroupID.z;
        if (tid == 0u) {
            uint ml = gl_NumWorkGroups.y * pc.n_head * nz * HD + 2u * row;
            pg[ml] = m[g];
            pg[ml + 1u] = l[g];
        }
        [[unroll]] for (uint e = 0u; e < ND; e++)
            if (tid + 128u * e < HD) pg[row * HD + tid + 128u * e] = oa[g * ND + e];
    }
    /* the last chunk of the group to count in (common.glsl) reads them all */
    WG_COUNT_IN(arrivals[i * gl_NumWorkGroups.x + gl_WorkGroupID.x], nz, merger);
    if (merger == 0u) return;
    merge_chunks(i, h0, nz, tid);
#else
    [[unroll]] for (uint g = 0u; g < GW; g++) {
        uint oo = (i * pc.n_head + h0 + g) * hd;
        [[unroll]] for (uint e = 0u; e < ND; e++)
            if (tid + 128u * e < HD) o[oo + tid + 128u * e] = oa[g * ND + e] / l[g];
    }
#endif
}
