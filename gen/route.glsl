/* route.glsl — the MoE router for one token, as moe.c's router_topk: softmax over all experts
   in f32, top-k by probability (lowest index wins ties), optional renormalisation over the k,
   then (Gemma 4) the per-expert scale. Reads the token's router logits (binding 5, qualified by
   ROUTE_LOGITS_QUAL: readonly unless the includer writes them too), writes ids[s] and the
   weights' bits into aux (binding 2); scale[e] is binding 4. */
#define MAX_EXPERTS 512
#define MAX_TOPK 32
#define RT_LANE 16 /* logits per lane of the one-subgroup selection: E <= RT_LANE · subgroup size */
#ifndef ROUTE_LOGITS_QUAL
#define ROUTE_LOGITS_QUAL readonly
#endif
layout(std430, binding = 2) buffer Aux { uint aux[]; };
layout(std430, binding = 4) readonly buffer Scale { float scale[]; };
layout(std430, binding = 5) ROUTE_LOGITS_QUAL buffer Router { float router_l[]; };

shared float rt_l[MAX_EXPERTS];
shared uint rt_id[MAX_TOPK];
shared float rt_w[MAX_TOPK];

/* slot s of the token: expert id and weight w (of probability, renormalised) at aux[ids + s], aux[ws + s] */
void rt_store(uint ids, uint ws, uint s, uint id, float w, uint has_scale) {
    if (has_scale != 0u) w *= scale[id];
    aux[ids + s] = id;
    aux[ws + s] = floatBitsToUint(w);
}

/* the top-k of rt_l by one subgroup, without barriers: every lane holds the logits e ≡ lane
   (mod subgroup size) in registers; a round is a lane-local best, the subgroup's maximum and the
   lowest index holding it. Lane s keeps round s. The weights and their sum come out in the order
   (and with the operations) of the workgroup path below, so both give the same bits. */
void route_subgroup(uint E, uint k, uint norm, float mx, float s, uint ids, uint ws, uint has_scale) {
    uint lane = gl_SubgroupInvocationID, S = gl_SubgroupSize;
    float v[RT_LANE];
    [[unroll]] for (uint i = 0u; i < RT_LANE; i++) {
        uint e = i * S + lane;
        v[i] = e < E ? rt_l[e] : NEG_INF;   /* NEG_INF is never chosen, as a taken expert */
    }
    uint my_id = 0u;
    float my_w = 0.0, tot = 0.0;
    for (uint j = 0u; j < k; j++) {
        float bv = NEG_INF;
        uint bi = 0xffffffffu;
        [[unroll]] for (uint i = 0u; i < RT_LANE; i++)
            if (v[i] > bv) { bv = v[i]; bi = i * S + lane; }
        float m = subgroupMax(bv);
        uint best = subgroupMin(bv == m ? bi : 0xffffffffu);
        [[unroll]] for (uint i = 0u; i < RT_LANE; i++)
            if (i * S + lane == best) v[i] = NEG_INF;   /* taken */
        float w = exp(m - mx) / s;
        tot += w;
        if (lane == j) { my_id = best; my_w = w; }
    }
    if (lane < k) rt_store(ids, ws, lane, my_id, norm != 0u ? my_w / tot : my_w, has_scale);
}

/* routes the token whose logits start at router_l[row]; call from uniform control flow */
void route(uint row, uint E, uint k, uint norm, uint ids, uint ws, uint has_scale) {
    uint tid = gl_LocalInvocationIndex;
    float mx = NEG_INF;
    for (uint e = tid; e < E; e += WG) {
        float l = router_l[row + e];
        rt_l[e] = l;
        mx = max(mx, l);
    }
    mx = wg_max(mx);
    float s = 0.0;
    for (uint e = tid; e < E; e += WG) s += exp(rt_l[e] - mx);
    s = wg_sum(s);
    if (E <= RT_LANE * gl_SubgroupSize && k <= gl_SubgroupSize) {
        if (gl_SubgroupID == 0u) route_subgroup(E, k, norm, mx, s, ids, ws, has_scale);
        return;
    }
    /* more experts than one subgroup holds: k rounds of workgroup reductions */
    for (uint j = 0u; j < k; j++) {
        float bv = NEG_INF;
        uint bi = 0xffffffffu;
        for (uint e = tid; e < E; e += WG) {
            float v = rt_l[e];
            if (v > bv) { bv = v; bi = e; }
        }
        float m = wg_max(bv);
        uint best = wg_min_u(bv == m ? bi : 0xffffffffu);
        if (tid == 0u) {
            rt_id[j] = best;
            rt_w[j] = rt_l[best];            /* the logit for now */
            rt_l[best] = NEG_INF;            /* taken */
        }
        barrier();
    }
    if (tid == 0u) {
        for (uint j = 0u; j < k; j++) rt_w[j] = exp(rt_w[j] - mx) / s;
        if (norm != 0u) {
            float tot = 0.0;
            for (uint j = 0u; j < k; j++) tot += rt_w[j];
            for (uint j = 0u; j < k; j++) rt_w[j] /= tot;
        }
    }
    barrier();
    if (tid < k) rt_store(ids, ws, tid, rt_id[tid], rt_w[tid], has_scale);
}
