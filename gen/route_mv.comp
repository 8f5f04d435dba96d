#version 450
#extension GL_GOOGLE_include_directive : require
/* route_mv.comp — decode routing (a few tokens) in one dispatch: the router matrix-vector product
   (mv_dot.glsl, as mv.comp mode 0, two logits per workgroup, so that enough workgroups stream the
   router weight), then the last workgroup of a token to finish routes it (route.glsl: softmax,
   top-k, weights). "Last" comes from an arrival counter per token in aux (pc.cnt_off + token,
   common.glsl's WG_COUNT_IN): each workgroup stores its logits (a coherent buffer) and counts
   itself in; the one that counts nblk reads all logits back.
   pc.norm is mv.comp's inline RMSNorm of x; pc.rnorm the renormalisation over the top k.
   grid: (nblk, tokens). bindings: 0 x, 1 normalised x, 2 aux, 3 norm weight, 4 expert scale,
   5 router logits [token][E], 6 weights */
#include "common.glsl"
#include "dequant.glsl"

#define RW 2u /* rows per workgroup (the host sizes the grid with it) */
#define ROUTE_LOGITS_QUAL coherent

layout(std430, binding = 0) readonly buffer X4 { vec4 x4[]; };
layout(std430, binding = 1) writeonly buffer XN4 { vec4 xn4[]; };
layout(std430, binding = 3) readonly buffer G4 { vec4 g4[]; };

layout(push_constant) uniform PC { PC_ROUTE(PC_FIELD) } pc;

#include "route.glsl"
#include "mv_dot.glsl"

shared uint last; /* this workgroup counted in last (WG_COUNT_IN) */

void main() {
    uint blk = wg_linear_x();
    if (blk >= pc.nblk) return;
    uint tid = gl_LocalInvocationIndex, col = gl_WorkGroupID.y;
    uint r0 = blk * RW;
    bool ok1 = r0 + 1u < pc.M;
    uint rb0 = r0 * pc.row_bytes, rb1 = ok1 ? rb0 + pc.row_bytes : rb0;
    uint xo = pc.x_off + col * pc.x_stride, row = col * pc.M;
    float ss = 0.0;
    vec2 a = wg_sum2(row_dot2(0u, rb0, rb1, xo, tid, pc.K / RUN, ss));
    a *= norm_scale(ss, xo, blk, true);
    if (tid == 0u) router_l[row + r0] = a.x;
    if (tid == 1u && ok1) router_l[row + r0 + 1u] = a.y;
    WG_COUNT_IN(aux[pc.cnt_off + col], pc.nblk, last);
    if (last == 0u) return;
    route(row, pc.M, pc.k_used, pc.rnorm, pc.ids_off + col * pc.k_used, pc.w_off + col * pc.k_used, pc.has_scale);
}
