/* dequant.glsl — quant block decoding, exactly as moe.c's dequant functions (ggml block layouts).

   One function per type, chosen by a -DT_<TYPE> define:
     dq16(buf, rb, k0, v)  the 16 consecutive elements k0 .. k0+15 (k0 a multiple of 16) of the
                           weight row whose first byte is rb in weight window buf.
   Rows start 16-byte aligned for F32/F16/BF16/Q4_K/Q5_K; the other types' blocks (18, 34, 17,
   210 bytes) are read through unaligned word helpers. Windows are padded by 16 bytes, so reading
   a word past a row's last block stays inside the binding. */
layout(std430, binding = 6) readonly buffer WB  { uint  d[]; } wb[XBUFS];
layout(std430, binding = 6) readonly buffer WB4 { uvec4 d[]; } wb4[XBUFS];

uint wbyte(uint buf, uint o) { return (wb[buf].d[o >> 2] >> ((o & 3u) * 8u)) & 0xffu; }
uint wu16(uint buf, uint o) { return (wb[buf].d[o >> 2] >> ((o & 2u) * 8u)) & 0xffffu; }  /* o even */
/* 16 bytes at any byte offset */
uvec4 w16bytes(uint buf, uint o) {
    uint i = o >> 2, s = (o & 3u) * 8u;
    uvec4 a = uvec4(wb[buf].d[i], wb[buf].d[i + 1u], wb[buf].d[i + 2u], wb[buf].d[i + 3u]);
    if (s == 0u) return a;
    uint e = wb[buf].d[i + 4u], r = 32u - s;
    return uvec4((a.x >> s) | (a.y << r), (a.y >> s) | (a.z << r), (a.z >> s) | (a.w << r), (a.w >> s) | (e << r));
}
uint byte_of(uvec4 q, uint t) { return (q[t >> 2] >> ((t & 3u) * 8u)) & 0xffu; }
int sbyte(uint b) { return int(b << 24) >> 24; }
float half_at(uint buf, uint o) { return unpackHalf2x16(wu16(buf, o)).x; }

#if defined(T_F32)
#define TYPE_BLOCK 1u
void dq16(uint buf, uint rb, uint k0, out float v[16]) {
    uint i = (rb >> 4) + (k0 >> 2);
    [[unroll]] for (uint j = 0u; j < 4u; j++) {
        vec4 f = uintBitsToFloat(wb4[buf].d[i + j]);
        v[4u * j] = f.x; v[4u * j + 1u] = f.y; v[4u * j + 2u] = f.z; v[4u * j + 3u] = f.w;
    }
}
#elif defined(T_F16)
#define TYPE_BLOCK 1u
void dq16(uint buf, uint rb, uint k0, out float v[16]) {
    uint i = (rb >> 4) + (k0 >> 3);
    [[unroll]] for (uint j = 0u; j < 2u; j++) {
        uvec4 q = wb4[buf].d[i + j];
        [[unroll]] for (uint c = 0u; c < 4u; c++) {
            vec2 f = unpackHalf2x16(q[c]);
            v[8u * j + 2u * c] = f.x; v[8u * j + 2u * c + 1u] = f.y;
        }
    }
}
#elif defined(T_BF16)
#define TYPE_BLOCK 1u
void dq16(uint buf, uint rb, uint k0, out float v[16]) {
    uint i = (rb >> 4) + (k0 >> 3);
    [[unroll]] for (uint j = 0u; j < 2u; j++) {
        uvec4 q = wb4[buf].d[i + j];
        [[unroll]] for (uint c = 0u; c < 4u; c++) {
            v[8u * j + 2u * c] = uintBitsToFloat(q[c] << 16);
            v[8u * j + 2u * c + 1u] = uintBitsToFloat(q[c] & 0xffff0000u);
        }
    }
}
#elif defined(T_Q8_0)
/* 34 bytes: fp16 d, int8 q[32]; x = d·q */
#define TYPE_BLOCK 32u
void dq16(uint buf, uint rb, uint k0, out float v[16]) {
    uint bo = rb + (k0 >> 5) * 34u;
    float d = half_at(buf, bo);
    uvec4 q = w16bytes(buf, bo + 2u + (k0 & 16u));
    [[unroll]] for (uint t = 0u; t < 16u; t++) v[t] = d * float(sbyte(byte_of(q, t)));
}
#elif defined(T_Q4_0)
/* 18 bytes: fp16 d, 16 bytes of nibbles: element j low nibble, j+16 high; x = (q - 8)·d */
#define TYPE_BLOCK 32u
void dq16(uint buf, uint rb, uint k0, out float v[16]) {
    uint bo = rb + (k0 >> 5) * 18u;
    float d = half_at(buf, bo);
    uvec4 q = w16bytes(buf, bo + 2u);
    uint sh = (k0 & 16u) >> 2;  /* 0: low nibbles, 4: high */
    [[unroll]] for (uint t = 0u; t < 16u; t++) v[t] = float(int((byte_of(q, t) >> sh) & 15u) - 8) * d;
}
#elif defined(T_MXFP4)
/* 17 bytes: E8M0 exponent e, 16 bytes of FP4 (E2M1) nibbles laid out like Q4_0;
   x = kvalue[q] · 2^(e-128) (the table holds doubled values) */
#define TYPE_BLOCK 32u
const float kv_mxfp4[16] = float[16](0., 1., 2., 3., 4., 6., 8., 12., 0., -1., -2., -3., -4., -6., -8., -12.);
float e8m0_half(uint e) { return e < 2u ? uintBitsToFloat(0x00200000u << e) : uintBitsToFloat((e - 1u) << 23); }
void dq16(uint buf, uint rb, uint k0, out float v[16]) {
    uint bo = rb + (k0 >> 5) * 17u;
    float d = e8m0_half(wbyte(buf, bo));
    uvec4 q = w16bytes(buf, bo + 1u);
    uint sh = (k0 & 16u) >> 2;
    [[unroll]] for (uint t = 0u; t < 16u; t++) v[t] = kv_mxfp4[(byte_of(q, t) >> sh) & 15u] * d;
}
#elif defined(T_Q4_K) || defined(T_Q5_K)
/* Q4_K, 144 bytes: fp16 d, fp16 dmin, 12 bytes of 6-bit (scale, min) pairs for 8 sub-blocks of
   32, qs[128]. 64-element group j uses qs[32j..32j+31]: low nibbles are sub-block 2j, high
   nibbles 2j+1; x = d·sc·q - dmin·m.
   Q5_K, 176 bytes: the same head, then qh[32] (bit 2j / 2j+1 of qh[l] is the fifth bit of
   element l of sub-block 2j / 2j+1), then qs[128]. */
#define TYPE_BLOCK 256u
uint scale_byte(uvec3 s, uint i) { return (s[i >> 2] >> ((i & 3u) * 8u)) & 0xffu; }
void scale_min_k4(uint j, uvec3 s, out uint sc, out uint m) {
    if (j < 4u) {
        sc = scale_byte(s, j) & 63u;
        m = scale_byte(s, j + 4u) & 63u;
    } else {
        sc = (scale_byte(s, j + 4u) & 15u) | ((scale_byte(s, j - 4u) >> 6) << 4);
        m = (scale_byte(s, j + 4u) >> 4) | ((scale_byte(s, j) >> 6) << 4);
    }
}
void dq16(uint buf, uint rb, uint k0, out float v[16]) {
#if defined(T_Q4_K)
    const uint BB = 144u, QS = 16u;
#else
    const uint BB = 176u, QS = 48u;
#endif
    uint bo = rb + (k0 >> 8) * BB;
    uint w0 = bo >> 2;
    vec2 dm = unpackHalf2x16(wb[buf].d[w0]);
    uvec3 s = uvec3(wb[buf].d[w0 + 1u], wb[buf].d[w0 + 2u], wb[buf].d[w0 + 3u]);
    uint o = k0 & 255u, j = o >> 6, hi = (o >> 5) & 1u, h = (o >> 4) & 1u;
    uint sc, m;
    scale_min_k4(2u * j + hi, s, sc, m);
    float d1 = dm.x * float(sc), m1 = dm.y * float(m);
    uvec4 q = wb4[buf].d[(bo + QS + 32u * j + 16u * h) >> 4];
    uint sh = hi * 4u;
#if defined(T_Q4_K)
    [[unroll]] for (uint t = 0u; t < 16u; t++) v[t] = d1 * float((byte_of(q, t) >> sh) & 15u) - m1;
#else
    uvec4 qh = wb4[buf].d[(bo + 16u + 16u * h) >> 4];
    uint bit = 2u * j + hi;
    [[unroll]] for (uint t = 0u; t < 16u; t++)
        v[t] = d1 * float(((byte_of(q, t) >> sh) & 15u) + (((byte_of(qh, t) >> bit) & 1u) << 4)) - m1;
#endif
}
#elif defined(T_Q6_K)
/* Q6_K, 210 bytes: ql[128] low 4 bits, qh[64] high 2 bits, int8 scales[16], fp16 d. Per half n
   of 128 elements, element l (0..31) of quarter c (0..3) is at 128n + 32c + l and uses
   ql[64n + 32(c&1) + l] (low nibble for c < 2, high for c >= 2), bits 2c..2c+1 of qh[32n + l]
   and scale[8n + l/16 + 2c]; x = d·scale·(q - 32). */
#define TYPE_BLOCK 256u
void dq16(uint buf, uint rb, uint k0, out float v[16]) {
    uint bo = rb + (k0 >> 8) * 210u;
    float d = half_at(buf, bo + 208u);
    uint o = k0 & 255u, n = o >> 7, c = (o >> 5) & 3u, l0 = o & 16u;
    uvec4 ql = w16bytes(buf, bo + 64u * n + 32u * (c & 1u) + l0);
    uvec4 qh = w16bytes(buf, bo + 128u + 32u * n + l0);
    float ds = d * float(sbyte(wbyte(buf, bo + 192u + 8u * n + (l0 >> 4) + 2u * c)));
    uint shl = (c >> 1) * 4u, shh = 2u * c;
    [[unroll]] for (uint t = 0u; t < 16u; t++) {
        uint q = ((byte_of(ql, t) >> shl) & 15u) | (((byte_of(qh, t) >> shh) & 3u) << 4);
        v[t] = ds * float(int(q) - 32);
    }
}
#else
#error "dequant.glsl: define one T_<TYPE>"
#endif
