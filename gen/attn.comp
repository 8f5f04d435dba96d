#version 450
#extension GL_GOOGLE_include_directive : require
/* attn.comp — causal GQA attention of one query head of one token over the KV cache
   (flash-style: keys in blocks of 32 with a running max and sum, so any context length fits).
   Query token i sits at position pos = pos0 + i (pos0 = step pos0 + pos_delta) and sees keys
   p0 ..= pos, p0 = pos - window + 1 with a sliding window (else 0); key p sits in cache row
   p mod rows (a ring of rows for sliding layers; rows = n_ctx otherwise).
   out = Σ_p softmax_p(q·k_p · scale) v_p.  WG = 128; the head size HD is specialization
   constant 1 (<= 512, a multiple of 8), so every inner loop has a fixed trip count.
   Scores: 4 threads per key, each a quarter of the head (16-byte loads when HD % 32 == 0);
   values: each thread owns output dims tid + 128·j (j < ND) and reads all 32 keys of a block with
   no branch (past the last key it re-reads that key with weight 0), so the loads overlap.
   grid: (n_head, n). bindings: 0 q, 1 out, 4 K cache, 5 V cache (layer windows), 7 step.
   -DSPLIT (long-context decode, "flash decoding"): grid (n_head, n, n_split); workgroup z walks
   only keys [z·chunk, (z+1)·chunk) of the query's range, so a long KV length is spread over many
   workgroups instead of one per head, and writes its partial (max m, sum l, unnormalized Σ w·v)
   to binding 1 as [(i·n_head + h)·n_split + z][2 + HD]; attn_merge.comp combines the chunks.
   Without SPLIT the range is the whole [0, n_keys) and the arithmetic is what it always was. */
#include "common.glsl"

layout(std430, binding = 0) readonly buffer Q { float q[]; };
layout(std430, binding = 1) writeonly buffer O { float o[]; };
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

#define KB 32u
const uint ND = (HD + 127u) / 128u;                           /* output dims per thread */
shared float qs[HD];
shared float part[128];
shared float ps[KB];

float v_at(uint i) {
#ifdef KV_F32
    return vc[i];
#else
    return unpackHalf2x16(vc[i >> 1])[i & 1u];
#endif
}

void main() {
    uint h = gl_WorkGroupID.x, i = gl_WorkGroupID.y, tid = gl_LocalInvocationIndex;
    const uint hd = HD;
    uint kvh = h / (pc.n_head / pc.n_kv);
    uint pos = uint(int(STEP_POS0) + pc.pos_delta) + i;
    uint p0 = pc.window != 0u && pos >= pc.window ? pos + 1u - pc.window : 0u;
    uint n_keys = pos + 1u - p0;
    uint k_lo = 0u, k_hi = n_keys;                           /* this workgroup's keys */
#ifdef SPLIT
    k_lo = min(gl_WorkGroupID.z * pc.chunk, n_keys);
    k_hi = min(k_lo + pc.chunk, n_keys);
#endif
    uint r0 = p0 % pc.rows;                                  /* ring row of key 0; key j at r0 + j, wrapped once at most */
    uint qo = (i * pc.n_head + h) * hd;
    for (uint d = tid; d < HD; d += 128u) qs[d] = q[qo + d];
    barrier();

    const uint dq = HD >> 2;                                 /* score work: 4 threads per key */
    const bool vec = (HD & 31u) == 0u;
    uint key = tid >> 2, quarter = tid & 3u;
    float m = NEG_INF, l = 0.0, oa[ND];
    [[unroll]] for (uint j = 0u; j < ND; j++) oa[j] = 0.0;
    for (uint kb = k_lo; kb < k_hi; kb += KB) {
        uint p = kb + key;
        float s = 0.0;
        if (p < k_hi) {
            uint row = r0 + p;
            if (row >= pc.rows) row -= pc.rows;
            uint base = row * pc.kvw + kvh * hd + quarter * dq, qb = quarter * dq;
            if (vec) {
#ifdef KV_F32
                [[unroll]] for (uint c = 0u; c < dq; c += 4u) {
                    vec4 kv = kc4[(base + c) >> 2];
                    s += dot(kv, vec4(qs[qb + c], qs[qb + c + 1u], qs[qb + c + 2u], qs[qb + c + 3u]));
                }
#else
                [[unroll]] for (uint c = 0u; c < dq; c += 8u) {
                    uvec4 w = kc4[(base + c) >> 3];
                    vec2 k0 = unpackHalf2x16(w.x), k1 = unpackHalf2x16(w.y), k2 = unpackHalf2x16(w.z), k3 = unpackHalf2x16(w.w);
                    s += dot(vec4(k0, k1), vec4(qs[qb + c], qs[qb + c + 1u], qs[qb + c + 2u], qs[qb + c + 3u])) +
                         dot(vec4(k2, k3), vec4(qs[qb + c + 4u], qs[qb + c + 5u], qs[qb + c + 6u], qs[qb + c + 7u]));
                }
#endif
            } else {
#ifdef KV_F32
                [[unroll]] for (uint d = 0u; d < dq; d++) s += qs[qb + d] * kc[base + d];
#else
                [[unroll]] for (uint d = 0u; d < dq; d += 2u) {
                    vec2 kv = unpackHalf2x16(kc[(base + d) >> 1]);
                    s += qs[qb + d] * kv.x + qs[qb + d + 1u] * kv.y;
                }
#endif
            }
        }
        part[tid] = s;
        barrier();
        if (tid < KB) {
            float t = (part[4u * tid] + part[4u * tid + 1u]) + (part[4u * tid + 2u] + part[4u * tid + 3u]);
            ps[tid] = kb + tid < k_hi ? t * pc.scale : NEG_INF;
        }
        barrier();
        float bm = m;
        [[unroll]] for (uint j = 0u; j < KB; j++) bm = max(bm, ps[j]);
        float alpha = exp(m - bm);
        barrier();
        if (tid < KB) ps[tid] = exp(ps[tid] - bm);
        barrier();
        m = bm;
        float sum = 0.0;
        [[unroll]] for (uint j = 0u; j < ND; j++) oa[j] *= alpha;
        uint last = k_hi - 1u;
        [[unroll]] for (uint j = 0u; j < KB; j++) {
            float w = ps[j]; /* 0 past the last key */
            uint row = r0 + min(kb + j, last);
            if (row >= pc.rows) row -= pc.rows;
            uint vb = row * pc.kvw + kvh * HD;
            sum += w;
            [[unroll]] for (uint e = 0u; e < ND; e++)
                if (tid + 128u * e < HD) oa[e] += w * v_at(vb + tid + 128u * e);
        }
        l = l * alpha + sum;
        barrier();
    }
#ifdef SPLIT
    /* an empty chunk (none is recorded, but a replayed one may be) leaves m = -inf, l = 0, o = 0:
       weight 0 in the merge */
    uint so = ((i * pc.n_head + h) * gl_NumWorkGroups.z + gl_WorkGroupID.z) * (HD + 2u);
    if (tid == 0u) {
        o[so] = m;
        o[so + 1u] = l;
    }
    [[unroll]] for (uint e = 0u; e < ND; e++)
        if (tid + 128u * e < HD) o[so + 2u + tid + 128u * e] = oa[e];
#else
    uint oo = (i * pc.n_head + h) * hd;
    [[unroll]] for (uint e = 0u; e < ND; e++)
        if (tid + 128u * e < HD) o[oo + tid + 128u * e] = oa[e] / l;
#endif
}
