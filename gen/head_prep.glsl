/* head_prep.glsl — one attention head of one token through its per-head RMSNorm and NeoX RoPE,
   and its K/V cache stores: what headwise.comp (one buffer of heads) and attn_prep.comp (the q
   and k heads of a layer in one grid) share, so both round exactly alike.
   The includer declares HEAD_X(o, d) (element d of the head at float offset o of its source),
   HEAD_G(d) (gain d of the norm) and HEAD_V(i) (V row element i), and binds 3 rope table,
   4 K cache, 5 V cache. The rope table holds, per position p and pair j, (cos, sin) of
   f32(p · inv_freq_j), computed as the CPU backend does. */
layout(std430, binding = 3) readonly buffer Rope { vec2 rope_cs[]; };
#ifdef KV_F32
layout(std430, binding = 4) writeonly buffer KC { float kc[]; };
layout(std430, binding = 5) writeonly buffer VC { float vc[]; };
#else
layout(std430, binding = 4) writeonly buffer KC { uint kc[]; };
layout(std430, binding = 5) writeonly buffer VC { uint vc[]; };
#endif

shared float hs[512];

/* hs[0, hd) = the head at o, RMS-normed (x / rms(x) · g) if norm, then its first n_rot dims
   rotated at position pos (pairs d, d + n_rot/2) if rope. Uniform control flow. */
void head_norm_rope(uint o, uint hd, uint n_rot, bool norm, bool rope, float eps, uint pos) {
    uint tid = gl_LocalInvocationIndex;
    float ss = 0.0;
    for (uint d = tid; d < hd; d += WG) {
        float v = HEAD_X(o, d);
        hs[d] = v;
        ss += v * v;
    }
    if (norm) {
        ss = wg_sum(ss);
        float scale = 1.0 / sqrt(ss / float(hd) + eps);
        for (uint d = tid; d < hd; d += WG) hs[d] = hs[d] * scale * HEAD_G(d);
    }
    barrier();
    if (rope) {
        uint half_ = n_rot / 2u;
        float a[4], b[4];
        uint cnt = 0u;
        for (uint p = tid; p < half_; p += WG, cnt++) {
            vec2 cs = rope_cs[pos * half_ + p];
            float u = hs[p], w = hs[p + half_];
            a[cnt] = u * cs.x - w * cs.y;
            b[cnt] = w * cs.x + u * cs.y;
        }
        barrier();
        cnt = 0u;
        for (uint p = tid; p < half_; p += WG, cnt++) {
            hs[p] = a[cnt];
            hs[p + half_] = b[cnt];
        }
        barrier();
    }
}

/* K cache elements [c, c + hd) = hs (f16: round to nearest) */
void head_store_k(uint c, uint hd) {
    uint tid = gl_LocalInvocationIndex;
#ifdef KV_F32
    for (uint d = tid; d < hd; d += WG) kc[c + d] = hs[d];
#else
    for (uint d = 2u * tid; d < hd; d += 2u * WG) kc[(c + d) >> 1] = packHalf2x16(vec2(hs[d], hs[d + 1u]));
#endif
}

/* V cache elements [c, c + hd) = V rows [o, o + hd) */
void head_store_v(uint c, uint o, uint hd) {
    uint tid = gl_LocalInvocationIndex;
#ifdef KV_F32
    for (uint d = tid; d < hd; d += WG) vc[c + d] = HEAD_V(o + d);
#else
    for (uint d = 2u * tid; d < hd; d += 2u * WG) vc[(c + d) >> 1] = packHalf2x16(vec2(HEAD_V(o + d), HEAD_V(o + d + 1u)));
#endif
}
