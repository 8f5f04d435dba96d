#version 450
#extension GL_GOOGLE_include_directive : require
/* moe_sort.comp — group the (token, slot) pairs of a prefill chunk by expert, one workgroup:
     list[j]   pair index p = t·k + s at sorted position j (pairs of an expert are contiguous)
     pos[p]    sorted position of pair p
     items     header [n_items, 0, 0, 0], then (expert, first position, count <= 64, 0) per
               work item: the y grid of the MoE matmuls.
   The order of pairs inside an expert does not change any result.
   bindings: 2 aux */
#include "common.glsl"
#define MAX_E_SORT 1024

layout(std430, binding = 2) buffer Aux { uint aux[]; };
layout(push_constant) uniform PC { PC_MOE_SORT(PC_FIELD) } pc;

shared uint cnt[MAX_E_SORT];
shared uint start[MAX_E_SORT];

void main() {
    uint tid = gl_LocalInvocationIndex;
    for (uint e = tid; e < pc.E; e += WG) cnt[e] = 0u;
    barrier();
    for (uint p = tid; p < pc.n_pairs; p += WG) atomicAdd(cnt[aux[pc.ids_off + p]], 1u);
    barrier();
    if (tid == 0u) {
        uint s = 0u, ni = 0u;
        for (uint e = 0u; e < pc.E; e++) {
            start[e] = s;
            for (uint c = 0u; c < cnt[e]; c += 64u) {
                uint b = pc.items_off + 4u + 4u * ni;
                aux[b] = e;
                aux[b + 1u] = s + c;
                aux[b + 2u] = min(64u, cnt[e] - c);
                aux[b + 3u] = 0u;
                ni++;
            }
            s += cnt[e];
            cnt[e] = 0u;
        }
        aux[pc.items_off] = ni;
    }
    barrier();
    for (uint p = tid; p < pc.n_pairs; p += WG) {
        uint e = aux[pc.ids_off + p];
        uint j = start[e] + atomicAdd(cnt[e], 1u);
        aux[pc.list_off + j] = p;
        aux[pc.pos_off + p] = j;
    }
}
