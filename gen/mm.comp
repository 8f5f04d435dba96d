#version 450
#extension GL_GOOGLE_include_directive : require
/* mm.comp — matrix-matrix products for prefill (portable path: f32 shared-memory tiles).
   A workgroup of 256 computes a BM×BN tile (64 weight rows × 64 columns), each thread 4×4,
   stepping through K 32 at a time: 128 threads dequantize the weight tile, all 256 load the
   activation tile.

   Columns are tokens (dense) or expert pairs grouped by expert (MoE): the MoE grid's y is a
   work-item list made by moe_sort.comp, item = (expert, first sorted pair, count <= 64).
   modes as mv.comp: 0 dense, 1 gate+up (act(G·x)·(U·x)), 2 down (x = sorted pair rows),
   3 gate only, 4 up finish. MoE outputs are rows of sorted pairs.
   bindings: 0 x, 1 y, 2 aux (pair list, items), 3 expert table, 6 weights, 7 step */
#include "common.glsl"
#include "dequant.glsl"

#define BM 64u
#define BN 64u
#define BK 32u

layout(std430, binding = 0) readonly buffer X4 { vec4 x4[]; };
layout(std430, binding = 1) buffer Y { float y[]; };
layout(std430, binding = 2) readonly buffer Aux { uint aux[]; };
layout(std430, binding = 3) readonly buffer Tbl { uvec2 tbl[]; };

layout(push_constant) uniform PC { PC_MM(PC_FIELD) } pc;

shared float As[BK][BM + 1u];
#ifdef GATEUP
shared float As2[BK][BM + 1u];
#endif
shared float Bs[BK][BN + 1u];
shared uint col_x[BN];   /* x offset (floats) of each column, or ~0 past the count */
shared uint col_y[BN];   /* y row of each column */

void load_w(uint buf, uint base, uint row0, uint k0, uint tid, bool second) {
    if (tid >= 2u * BM) return;
    uint m = tid >> 1, h = tid & 1u, k = k0 + 16u * h;
    float v[16];
    if (row0 + m < pc.M && k < pc.K) dq16(buf, base + (row0 + m) * pc.row_bytes, k, v);
    else [[unroll]] for (uint t = 0u; t < 16u; t++) v[t] = 0.0;
#ifdef GATEUP
    if (second) { [[unroll]] for (uint t = 0u; t < 16u; t++) As2[16u * h + t][m] = v[t]; return; }
#endif
    [[unroll]] for (uint t = 0u; t < 16u; t++) As[16u * h + t][m] = v[t];
}

void main() {
    uint blk = wg_linear_x();
    if (blk >= pc.nblk) return;
    uint tid = gl_LocalInvocationIndex;
    uint row0 = blk * BM;

    /* which columns, which weights */
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
        uvec4 it = uvec4(aux[pc.items_off + 4u + 4u * item], aux[pc.items_off + 5u + 4u * item],
                         aux[pc.items_off + 6u + 4u * item], 0u);
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

    float acc[16];
    [[unroll]] for (uint i = 0u; i < 16u; i++) acc[i] = 0.0;
#ifdef GATEUP
    float acc2[16];
    [[unroll]] for (uint i = 0u; i < 16u; i++) acc2[i] = 0.0;
#endif
    uint tr = tid & 15u, tc = tid >> 4;
    uint lc = tid >> 2, lk = (tid & 3u) * 8u;

    for (uint k0 = 0u; k0 < pc.K; k0 += BK) {
        load_w(wbuf, wbase, row0, k0, tid, false);
#ifdef GATEUP
        load_w(ubuf, ubase, row0, k0, tid, true);
#endif
        {
            vec4 a = vec4(0.0), b = vec4(0.0);
            if (lc < cnt && k0 + lk < pc.K) {
                uint xi = (col_x[lc] + k0 + lk) >> 2;
                a = x4[xi];
                b = x4[xi + 1u];
            }
            Bs[lk][lc] = a.x; Bs[lk + 1u][lc] = a.y; Bs[lk + 2u][lc] = a.z; Bs[lk + 3u][lc] = a.w;
            Bs[lk + 4u][lc] = b.x; Bs[lk + 5u][lc] = b.y; Bs[lk + 6u][lc] = b.z; Bs[lk + 7u][lc] = b.w;
        }
        barrier();
        [[unroll]] for (uint kk = 0u; kk < BK; kk++) {
            float a[4], b[4];
            [[unroll]] for (uint i = 0u; i < 4u; i++) a[i] = As[kk][tr + 16u * i];
            [[unroll]] for (uint j = 0u; j < 4u; j++) b[j] = Bs[kk][tc + 16u * j];
            [[unroll]] for (uint i = 0u; i < 4u; i++)
                [[unroll]] for (uint j = 0u; j < 4u; j++) acc[4u * i + j] += a[i] * b[j];
#ifdef GATEUP
            [[unroll]] for (uint i = 0u; i < 4u; i++) a[i] = As2[kk][tr + 16u * i];
            [[unroll]] for (uint i = 0u; i < 4u; i++)
                [[unroll]] for (uint j = 0u; j < 4u; j++) acc2[4u * i + j] += a[i] * b[j];
#endif
        }
        barrier();
    }

    [[unroll]] for (uint j = 0u; j < 4u; j++) {
        uint c = tc + 16u * j;
        if (c >= cnt) continue;
        uint yo = pc.y_off + col_y[c] * pc.y_stride + row0;
        [[unroll]] for (uint i = 0u; i < 4u; i++) {
            uint m = tr + 16u * i;
            if (row0 + m >= pc.M) continue;
            float v = acc[4u * i + j];
#ifdef GATEUP
            y[yo + m] = act_fn(v, pc.act) * acc2[4u * i + j];
#else
            if (pc.mode == 4u) y[yo + m] = act_fn(y[yo + m], pc.act) * v;
            else if (pc.acc != 0u) y[yo + m] += v;
            else y[yo + m] = v;
#endif
        }
    }
}
