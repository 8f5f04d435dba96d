/* route.glsl — the MoE router for one token, as moe.c's router_topk: softmax over all experts
   in f32, top-k by probability (lowest index wins ties), optional renormalisation over the k.
   Reads the token's router logits (binding 5), leaves ids / weights in rt_id / rt_w (shared). */
#define MAX_EXPERTS 512
#define MAX_TOPK 32
layout(std430, binding = 5) readonly buffer Router { float router_l[]; };

shared float rt_l[MAX_EXPERTS];
shared uint rt_id[MAX_TOPK];
shared float rt_w[MAX_TOPK];

void route(uint row, uint E, uint k, uint norm) {
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
}
