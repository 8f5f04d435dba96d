#version 450
#extension GL_GOOGLE_include_directive : require
#extension GL_NV_cooperative_matrix : require
#extension GL_KHR_memory_scope_semantics : require
#extension GL_EXT_shader_explicit_arithmetic_types_float16 : require
/* mm_cm.comp — mm.comp on tensor cores (GL_NV_cooperative_matrix, 16×8×16 f16 → f32).
   Same tiles, modes, grid and bindings as mm.comp, but K steps of 64: the weight and activation
   tiles are rounded to f16 in shared memory, products accumulate in f32. WG = 128: four
   subgroups of 32, each owning a 32×32 quarter of the 64×64 output tile as 2×4 16×8
   accumulators. Shared memory: 46.6 KiB with GATEUP (NVIDIA offers 48). */
#include "common.glsl"
#include "dequant.glsl"

#define BM 64u
#define BN 64u
#define BK 64u
#define AS 72u          /* row stride of the f16 tiles (a 16-byte multiple, not a power of two) */
#define CS 68u          /* row stride of the f32 output tile */

layout(std430, binding = 0) readonly buffer X4 { vec4 x4[]; };
layout(std430, binding = 1) buffer Y { float y[]; };
layout(std430, binding = 2) readonly buffer Aux { uint aux[]; };
layout(std430, binding = 3) readonly buffer Tbl { uvec2 tbl[]; };

layout(push_constant) uniform PC { PC_MM(PC_FIELD) } pc;

shared float16_t As[BM * AS];
#ifdef GATEUP
shared float16_t As2[BM * AS];
#endif
shared float16_t Bs[BN * AS];
shared float Cs[BN * CS];
shared uint col_x[BN];
shared uint col_y[BN];

void load_w(uint buf, uint base, uint row0, uint k0, uint tid, bool second) {
    /* 64 rows × 4 runs of 16 = 256 runs: two per thread */
    [[unroll]] for (uint j = 0u; j < 2u; j++) {
        uint r = tid + 128u * j, m = r >> 2, h = r & 3u, k = k0 + 16u * h;
        float v[16];
        if (row0 + m < pc.M && k < pc.K) dq16(buf, base + (row0 + m) * pc.row_bytes, k, v);
        else [[unroll]] for (uint t = 0u; t < 16u; t++) v[t] = 0.0;
#ifdef GATEUP
        if (second) {
            [[unroll]] for (uint t = 0u; t < 16u; t++) As2[m * AS + 16u * h + t] = float16_t(v[t]);
            continue;
        }
#endif
        [[unroll]] for (uint t = 0u; t < 16u; t++) As[m * AS + 16u * h + t] = float16_t(v[t]);
    }
}

void main() {
    uint blk = wg_linear_x();
    if (blk >= pc.nblk) return;
    uint tid = gl_LocalInvocationIndex;
    uint row0 = blk * BM;

    uint cnt, wbuf = 0u, wbase = 0u, ubuf = 0u, ubase = 0u;
    if (pc.mode == 0u) {
        uint c0 = gl_WorkGroupID.y * BN;
        cnt = min(BN, pc.ncols - c0);
        if (tid < BN) {
            col_x[tid] = pc.x_off + (c0 + tid) * pc.x_stride;
            col_y[tid] = c0 + tid;
        }
    } else {
        uint item = gl_WorkGroupID.y;
        if (item >= aux[pc.items_off]) return;
        uvec3 it = uvec3(aux[pc.items_off + 4u + 4u * item], aux[pc.items_off + 5u + 4u * item],
                         aux[pc.items_off + 6u + 4u * item]);
        cnt = it.z;
        uvec2 ent = tbl[(pc.mode == 4u ? pc.tbl1 : pc.tbl0) + it.x];
        wbuf = ent.x;
        wbase = ent.y;
        uvec2 ent2 = tbl[pc.tbl1 + it.x];
        ubuf = ent2.x;
        ubase = ent2.y;
        if (tid < BN) {
            uint j = it.y + tid;
            uint xr = pc.mode == 2u ? j : aux[pc.list_off + min(j, it.y + cnt - 1u)] / pc.k_used;
            col_x[tid] = pc.x_off + xr * pc.x_stride;
            col_y[tid] = j;
        }
    }
    barrier();

    uint sg = gl_SubgroupID, wm = (sg & 1u) * 32u, wn = (sg >> 1) * 32u;
    fcoopmatNV<32, gl_ScopeSubgroup, 16, 8> acc[2][4];
#ifdef GATEUP
    fcoopmatNV<32, gl_ScopeSubgroup, 16, 8> acc2[2][4];
#endif
    [[unroll]] for (uint i = 0u; i < 2u; i++)
        [[unroll]] for (uint j = 0u; j < 4u; j++) {
            acc[i][j] = fcoopmatNV<32, gl_ScopeSubgroup, 16, 8>(0.0);
#ifdef GATEUP
            acc2[i][j] = fcoopmatNV<32, gl_ScopeSubgroup, 16, 8>(0.0);
#endif
        }
    /* activation loads: 64 columns × 64 k = 4096 floats, 32 per thread */
    uint lc = tid >> 1, lk = (tid & 1u) * 32u;

    for (uint k0 = 0u; k0 < pc.K; k0 += BK) {
        load_w(wbuf, wbase, row0, k0, tid, false);
#ifdef GATEUP
        load_w(ubuf, ubase, row0, k0, tid, true);
#endif
        [[unroll]] for (uint q = 0u; q < 8u; q++) {
            vec4 a = vec4(0.0);
            if (lc < cnt && k0 + lk + 4u * q < pc.K) a = x4[(col_x[lc] + k0 + lk + 4u * q) >> 2];
            uint o = lc * AS + lk + 4u * q;
            Bs[o] = float16_t(a.x); Bs[o + 1u] = float16_t(a.y); Bs[o + 2u] = float16_t(a.z); Bs[o + 3u] = float16_t(a.w);
        }
        barrier();
        [[unroll]] for (uint kk = 0u; kk < BK; kk += 16u) {
            fcoopmatNV<16, gl_ScopeSubgroup, 16, 16> a[2];
            fcoopmatNV<16, gl_ScopeSubgroup, 16, 8> b[4];
            [[unroll]] for (uint i = 0u; i < 2u; i++) coopMatLoadNV(a[i], As, (wm + 16u * i) * AS + kk, AS, false);
            [[unroll]] for (uint j = 0u; j < 4u; j++) coopMatLoadNV(b[j], Bs, (wn + 8u * j) * AS + kk, AS, true);
            [[unroll]] for (uint i = 0u; i < 2u; i++)
                [[unroll]] for (uint j = 0u; j < 4u; j++) acc[i][j] = coopMatMulAddNV(a[i], b[j], acc[i][j]);
#ifdef GATEUP
            [[unroll]] for (uint i = 0u; i < 2u; i++) coopMatLoadNV(a[i], As2, (wm + 16u * i) * AS + kk, AS, false);
            [[unroll]] for (uint i = 0u; i < 2u; i++)
                [[unroll]] for (uint j = 0u; j < 4u; j++) acc2[i][j] = coopMatMulAddNV(a[i], b[j], acc2[i][j]);
#endif
        }
        barrier();
    }

    /* C (rows × columns) → Cs[column][row] */
    [[unroll]] for (uint i = 0u; i < 2u; i++)
        [[unroll]] for (uint j = 0u; j < 4u; j++) {
#ifdef GATEUP
            for (int e = 0; e < acc[i][j].length(); e++) acc[i][j][e] = act_fn(acc[i][j][e], pc.act) * acc2[i][j][e];
#endif
            coopMatStoreNV(acc[i][j], Cs, (wn + 8u * j) * CS + wm + 16u * i, CS, true);
        }
    barrier();
    for (uint q = tid; q < BM * BN; q += WG) {
        uint c = q / BM, m = q % BM;
        if (c >= cnt || row0 + m >= pc.M) continue;
        uint yi = pc.y_off + col_y[c] * pc.y_stride + row0 + m;
        float v = Cs[c * CS + m];
#ifdef GATEUP
        y[yi] = v;
#else
        if (pc.mode == 4u) y[yi] = act_fn(y[yi], pc.act) * v;
        else if (pc.acc != 0u) y[yi] += v;
        else y[yi] = v;
#endif
    }
}
