/* dn_gate.glsl — the Gated DeltaNet gates of value head j at token t (ARCHITECTURES.md §3.4):
   β = sigmoid(b), g = a_coef[j] · softplus(a + dt[j]) (the log of the decay α = e^g).
   b and a come separate (bindings 2, 3: [n][nv]) or grouped per key head (binding 2:
   [n][nk][b (r) | a (r)], Qwen3-Next's ssm_ba). The including shader declares bt, al, a_coef
   and dtw (bindings 2, 3, 5 and window 6) and pc with PC_DELTA_RULE's fields. */
vec2 dn_gate(uint t, uint j) {
    uint r = pc.nv / pc.nk;
    float b, a;
    if (pc.grouped != 0u) {
        uint row = t * 2u * pc.nv + (j / r) * 2u * r;
        b = bt[row + j % r];
        a = bt[row + r + j % r];
    } else {
        b = bt[t * pc.nv + j];
        a = al[t * pc.nv + j];
    }
    float z = a + dtw[0].dt[j], sp = z > 20.0 ? z : log(1.0 + exp(z));
    return vec2(1.0 / (1.0 + exp(-b)), a_coef[j] * sp);
}
