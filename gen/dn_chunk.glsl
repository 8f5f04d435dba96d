/* dn_chunk.glsl — the chunked (WY) delta rule's scratch layout, shared by dn_chunk_gates.comp,
   dn_chunk_prep.comp and dn_chunk_state.comp. The op's n tokens are cut into chunks of DN_CT
   counted from its first token (the last one may be short); NP = the tokens rounded up to whole
   chunks. In the float buffer scr (declared by the including shader):
     [NP][nv] (β, g, G, H) β_t, g_t, G_t = Σ_{s<=t} g_s and H_t = Σ_{s>t} g_s over its chunk (the
                          log decays, each summed directly: e^{G_t - G_s} from a difference of
                          prefix sums would lose the small exponents' bits in f32)
     [NP][nv][dk] W       the WY factor (I - A)⁻¹ diag(β e^G) K̂
     [NP][nv][dv] U       (I - A)⁻¹ diag(β) V, V' = U - W S0 comes from it in the state pass
     [chunk][nv][DN_CT][DN_CT] M   e^{G_t - G_s} q̂_t·k̂_s for s <= t (the rest never read)
   with A_ts = -β_t e^{G_t - G_s} k̂_t·k̂_s (s < t). The including shader has pc with
   PC_DELTA_RULE's fields. */
#define DN_CT 64u

uint dn_np() { return (pc.n + DN_CT - 1u) / DN_CT * DN_CT; }
uint dn_gb(uint t, uint j) { return (t * pc.nv + j) * 4u; }
uint dn_w(uint t, uint j) { return dn_np() * pc.nv * 4u + (t * pc.nv + j) * pc.dk; }
uint dn_u(uint t, uint j) { return dn_np() * pc.nv * (4u + pc.dk) + (t * pc.nv + j) * pc.dv; }
uint dn_m(uint c, uint j) { return dn_np() * pc.nv * (4u + pc.dk + pc.dv) + (c * pc.nv + j) * DN_CT * DN_CT; }

/* where the rows of token t start in the conv rows [n][C] = [q̂ all | k̂ all | v all] */
uint dn_key_head(uint j) { return pc.v_tiled != 0u ? j % pc.nk : j / (pc.nv / pc.nk); }
uint dn_q(uint t, uint j) { return t * pc.C + dn_key_head(j) * pc.dk; }
uint dn_k(uint t, uint j) { return t * pc.C + (pc.nk + dn_key_head(j)) * pc.dk; }
uint dn_v(uint t, uint j) { return t * pc.C + 2u * pc.nk * pc.dk + j * pc.dv; }

