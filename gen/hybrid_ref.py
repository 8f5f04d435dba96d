#!/usr/bin/env python3
"""hybrid_ref.py — an independent float64 reference of the hybrid Gated DeltaNet models in pure
Python (no NumPy, no torch), for machines without transformers.

  python3 gen/hybrid_ref.py make FAMILY DIR [SEED]   random tiny model as a Hugging Face directory
                                                     (the layout transformers saves: qwen3next with
                                                     in_proj_qkvz / in_proj_ba interleaved per key
                                                     head and per-expert weights; qwen35moe / qwen35
                                                     under model.language_model. with fused experts)
  python3 gen/hybrid_ref.py ref DIR OUT.ref [N]      float64 logits of N (default 128) tokens, the
                                                     .ref format of gen/make_fixtures.py (greedy:
                                                     16 tokens after the first N-16)

The math is ARCHITECTURES.md §3 written out token by token (the recurrent form), read from the
HF tensors directly: (1 + w) norms, A_log, grouped value heads, Qwen3-Next's interleaved
projections. It is a second opinion next to transformers (gen/make_hybrid_fixtures.py), not a
replacement: fixtures in test/fixtures/ come from transformers where it was available.
"""
import json
import math
import os
import random
import struct
import sys

FAMILIES = {"qwen3next": "qwen3_next", "qwen35moe": "qwen3_5_moe", "qwen35": "qwen3_5"}
CFG = dict(vocab_size=256, hidden_size=64, num_hidden_layers=5, num_attention_heads=4, num_key_value_heads=2,
           head_dim=32, linear_conv_kernel_dim=4, linear_key_head_dim=16, linear_value_head_dim=16,
           linear_num_key_heads=2, linear_num_value_heads=4, rms_norm_eps=1e-6, max_position_embeddings=4096,
           layer_types=["linear_attention"] * 3 + ["full_attention", "linear_attention"])
MOE = dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=48)


# ---- safetensors (F32 only) ----
def st_write(path, tensors):
    hdr, off, blobs = {}, 0, []
    for name, (shape, vals) in tensors.items():
        b = struct.pack(f"<{len(vals)}f", *vals)
        hdr[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [off, off + len(b)]}
        off += len(b)
        blobs.append(b)
    h = json.dumps(hdr).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for b in blobs:
            f.write(b)


def st_read(path):
    data = open(path, "rb").read()
    (n,) = struct.unpack_from("<Q", data, 0)
    hdr = json.loads(data[8:8 + n])
    out = {}
    for name, v in hdr.items():
        if name == "__metadata__":
            continue
        assert v["dtype"] == "F32", name
        a, b = v["data_offsets"]
        cnt = (b - a) // 4
        out[name] = (v["shape"], list(struct.unpack_from(f"<{cnt}f", data, 8 + n + a)))
    return out


def f32(x):
    return struct.unpack("<f", struct.pack("<f", x))[0]


# ---- make ----
def make(family, d, seed):
    rng = random.Random(seed)
    c = dict(CFG)
    moe = family != "qwen35"
    if moe:
        c.update(MOE)
    else:
        c["intermediate_size"] = 96
    theta = 10000.0 if family == "qwen3next" else 100000.0
    c["rope_parameters"] = {"rope_type": "default", "rope_theta": theta, "partial_rotary_factor": 0.25}
    H, V, L = c["hidden_size"], c["vocab_size"], c["num_hidden_layers"]
    nh, nkv, hd = c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]
    nk, nv, dk, dv, K = c["linear_num_key_heads"], c["linear_num_value_heads"], c["linear_key_head_dim"], c["linear_value_head_dim"], c["linear_conv_kernel_dim"]
    T = {}
    n = lambda cnt, s: [f32(rng.gauss(0, 1) * s) for _ in range(cnt)]  # noqa: E731
    P = "model." if family == "qwen3next" else "model.language_model."

    def mat(name, rows, cols, s=None):
        T[name] = ([rows, cols], n(rows * cols, s if s is not None else 1 / math.sqrt(cols)))

    def norm1p(name, cnt):
        T[name] = ([cnt], n(cnt, 0.3))

    mat(P + "embed_tokens.weight", V, H, 1.0)
    norm1p(P + "norm.weight", H)
    mat("lm_head.weight", V, H, 2 / math.sqrt(H))
    kd, vd = nk * dk, nv * dv
    for i in range(L):
        p = f"{P}layers.{i}."
        norm1p(p + "input_layernorm.weight", H)
        norm1p(p + "post_attention_layernorm.weight", H)
        if c["layer_types"][i] == "full_attention":
            mat(p + "self_attn.q_proj.weight", 2 * nh * hd, H)
            mat(p + "self_attn.k_proj.weight", nkv * hd, H)
            mat(p + "self_attn.v_proj.weight", nkv * hd, H)
            mat(p + "self_attn.o_proj.weight", H, nh * hd)
            norm1p(p + "self_attn.q_norm.weight", hd)
            norm1p(p + "self_attn.k_norm.weight", hd)
        else:
            a = p + "linear_attn."
            if family == "qwen3next":
                mat(a + "in_proj_qkvz.weight", 2 * kd + 2 * vd, H)
                mat(a + "in_proj_ba.weight", 2 * nv, H)
            else:
                mat(a + "in_proj_qkv.weight", 2 * kd + vd, H)
                mat(a + "in_proj_z.weight", vd, H)
                mat(a + "in_proj_b.weight", nv, H)
                mat(a + "in_proj_a.weight", nv, H)
            T[a + "conv1d.weight"] = ([2 * kd + vd, 1, K], n((2 * kd + vd) * K, 0.5))
            T[a + "dt_bias"] = ([nv], n(nv, 0.5))
            T[a + "A_log"] = ([nv], [f32(math.log(rng.uniform(0.3, 4.0))) for _ in range(nv)])
            T[a + "norm.weight"] = ([dv], [f32(1 + 0.3 * rng.gauss(0, 1)) for _ in range(dv)])
            mat(a + "out_proj.weight", H, vd)
        m = p + "mlp."
        if moe:
            E, F, Fs = c["num_experts"], c["moe_intermediate_size"], c["shared_expert_intermediate_size"]
            mat(m + "gate.weight", E, H, 2 / math.sqrt(H))
            if family == "qwen3next":
                for e in range(E):
                    mat(f"{m}experts.{e}.gate_proj.weight", F, H)
                    mat(f"{m}experts.{e}.up_proj.weight", F, H)
                    mat(f"{m}experts.{e}.down_proj.weight", H, F)
            else:
                T[m + "experts.gate_up_proj"] = ([E, 2 * F, H], n(E * 2 * F * H, 1 / math.sqrt(H)))
                T[m + "experts.down_proj"] = ([E, H, F], n(E * H * F, 1 / math.sqrt(F)))
            mat(m + "shared_expert_gate.weight", 1, H)
            mat(m + "shared_expert.gate_proj.weight", Fs, H)
            mat(m + "shared_expert.up_proj.weight", Fs, H)
            mat(m + "shared_expert.down_proj.weight", H, Fs)
        else:
            F = c["intermediate_size"]
            mat(m + "gate_proj.weight", F, H)
            mat(m + "up_proj.weight", F, H)
            mat(m + "down_proj.weight", H, F)
    os.makedirs(d, exist_ok=True)
    if family == "qwen3next":
        cfg = dict(c, model_type="qwen3_next", architectures=["Qwen3NextForCausalLM"], norm_topk_prob=True)
    else:
        cfg = dict(model_type=FAMILIES[family], text_config=dict(c, model_type=FAMILIES[family] + "_text"),
                   vision_config={"depth": 1}, architectures=["X"])
    json.dump(cfg, open(os.path.join(d, "config.json"), "w"), indent=1)
    st_write(os.path.join(d, "model.safetensors"), T)


# ---- reference forward (float64, token by token) ----
def ref(d, out, n_tok):
    cfg = json.load(open(os.path.join(d, "config.json")))
    c = cfg.get("text_config", cfg)
    mt = cfg["model_type"]
    T = st_read(os.path.join(d, "model.safetensors"))
    P = "model." if mt == "qwen3_next" else "model.language_model."
    W = lambda name: T[name][1]  # noqa: E731
    H, V, L = c["hidden_size"], c["vocab_size"], c["num_hidden_layers"]
    nh, nkv, hd = c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]
    nk, nv, dk, dv, K = c["linear_num_key_heads"], c["linear_num_value_heads"], c["linear_key_head_dim"], c["linear_value_head_dim"], c["linear_conv_kernel_dim"]
    r = nv // nk
    eps = c["rms_norm_eps"]
    rp = c.get("rope_parameters", {})
    theta = rp.get("rope_theta", c.get("rope_theta", 10000.0))
    nrot = int(hd * rp.get("partial_rotary_factor", c.get("partial_rotary_factor", 0.25)))
    moe = "num_experts" in c
    kd, vd = nk * dk, nv * dv
    C = 2 * kd + vd

    def mv(w, x, rows, cols, r0=0):
        return [sum(w[(r0 + i) * cols + j] * x[j] for j in range(cols)) for i in range(rows)]

    def rms(x, w, one_plus):
        s = 1 / math.sqrt(sum(v * v for v in x) / len(x) + eps)
        return [x[i] * s * ((1 + w[i]) if one_plus else w[i]) for i in range(len(x))]

    silu = lambda z: z / (1 + math.exp(-z))  # noqa: E731
    sig = lambda z: 1 / (1 + math.exp(-z))  # noqa: E731
    rng = random.Random(4242)
    tokens = [rng.randrange(V) for _ in range(n_tok)]
    kv = [dict(k=[], v=[]) for _ in range(L)]
    st = [dict(conv=[[0.0] * C for _ in range(K - 1)], S=[[[0.0] * dv for _ in range(dk)] for _ in range(nv)]) for _ in range(L)]

    def step(tok, pos):
        x = list(W(P + "embed_tokens.weight")[tok * H:(tok + 1) * H])
        for i in range(L):
            p = f"{P}layers.{i}."
            a = rms(x, W(p + "input_layernorm.weight"), True)
            if c["layer_types"][i] == "full_attention":
                qg = mv(W(p + "self_attn.q_proj.weight"), a, 2 * nh * hd, H)
                q = [qg[h * 2 * hd:h * 2 * hd + hd] for h in range(nh)]
                gate = [qg[h * 2 * hd + hd:(h + 1) * 2 * hd] for h in range(nh)]
                k = mv(W(p + "self_attn.k_proj.weight"), a, nkv * hd, H)
                v = mv(W(p + "self_attn.v_proj.weight"), a, nkv * hd, H)
                k = [k[h * hd:(h + 1) * hd] for h in range(nkv)]
                v = [v[h * hd:(h + 1) * hd] for h in range(nkv)]
                q = [rms(qq, W(p + "self_attn.q_norm.weight"), True) for qq in q]
                k = [rms(kk, W(p + "self_attn.k_norm.weight"), True) for kk in k]

                def rope(u):
                    u = list(u)
                    half = nrot // 2
                    for j in range(half):
                        ang = pos * theta ** (-2 * j / nrot)
                        c0, s0 = math.cos(ang), math.sin(ang)
                        x0, x1 = u[j], u[j + half]
                        u[j], u[j + half] = x0 * c0 - x1 * s0, x1 * c0 + x0 * s0
                    return u
                q = [rope(qq) for qq in q]
                k = [rope(kk) for kk in k]
                kv[i]["k"].append(k)
                kv[i]["v"].append(v)
                o = []
                for h in range(nh):
                    g = h // (nh // nkv)
                    sc = [sum(q[h][j] * kk[g][j] for j in range(hd)) / math.sqrt(hd) for kk in kv[i]["k"]]
                    mx = max(sc)
                    e = [math.exp(s - mx) for s in sc]
                    z = sum(e)
                    oh = [sum(e[t] / z * kv[i]["v"][t][g][j] for t in range(len(e))) for j in range(hd)]
                    o += [oh[j] * sig(gate[h][j]) for j in range(hd)]
                y = mv(W(p + "self_attn.o_proj.weight"), o, H, nh * hd)
            else:
                la = p + "linear_attn."
                if mt == "qwen3_next":
                    qkvz = mv(W(la + "in_proj_qkvz.weight"), a, 2 * kd + 2 * vd, H)
                    ba = mv(W(la + "in_proj_ba.weight"), a, 2 * nv, H)
                    G = 2 * dk + 2 * r * dv
                    qs = sum((qkvz[g * G:g * G + dk] for g in range(nk)), [])
                    ks = sum((qkvz[g * G + dk:g * G + 2 * dk] for g in range(nk)), [])
                    vs = sum((qkvz[g * G + 2 * dk:g * G + 2 * dk + r * dv] for g in range(nk)), [])
                    z = sum((qkvz[g * G + 2 * dk + r * dv:(g + 1) * G] for g in range(nk)), [])
                    b = sum((ba[g * 2 * r:g * 2 * r + r] for g in range(nk)), [])
                    al = sum((ba[g * 2 * r + r:(g + 1) * 2 * r] for g in range(nk)), [])
                    xin = qs + ks + vs
                else:
                    xin = mv(W(la + "in_proj_qkv.weight"), a, C, H)
                    z = mv(W(la + "in_proj_z.weight"), a, vd, H)
                    b = mv(W(la + "in_proj_b.weight"), a, nv, H)
                    al = mv(W(la + "in_proj_a.weight"), a, nv, H)
                cw = W(la + "conv1d.weight")
                hist = st[i]["conv"] + [xin]
                y = [silu(sum(cw[ch * K + j] * hist[j][ch] for j in range(K))) for ch in range(C)]
                st[i]["conv"] = hist[1:]
                q = [y[h * dk:(h + 1) * dk] for h in range(nk)]
                k = [y[kd + h * dk:kd + (h + 1) * dk] for h in range(nk)]
                v = [y[2 * kd + h * dv:2 * kd + (h + 1) * dv] for h in range(nv)]
                q = [[u / math.sqrt(sum(w * w for w in qq) + 1e-6) / math.sqrt(dk) for u in qq] for qq in q]
                k = [[u / math.sqrt(sum(w * w for w in kk) + 1e-6) for u in kk] for kk in k]
                A, dt, nw = W(la + "A_log"), W(la + "dt_bias"), W(la + "norm.weight")
                o = []
                for j in range(nv):
                    kh = j // r
                    beta = sig(b[j])
                    zz = al[j] + dt[j]
                    sp = zz if zz > 20 else math.log1p(math.exp(zz))
                    alpha = math.exp(-math.exp(A[j]) * sp)
                    S = st[i]["S"][j]
                    for ii in range(dk):
                        for dd in range(dv):
                            S[ii][dd] *= alpha
                    mem = [sum(S[ii][dd] * k[kh][ii] for ii in range(dk)) for dd in range(dv)]
                    u = [(v[j][dd] - mem[dd]) * beta for dd in range(dv)]
                    for ii in range(dk):
                        for dd in range(dv):
                            S[ii][dd] += k[kh][ii] * u[dd]
                    oj = [sum(S[ii][dd] * q[kh][ii] for ii in range(dk)) for dd in range(dv)]
                    oj = rms(oj, nw, False)
                    o += [oj[dd] * silu(z[j * dv + dd]) for dd in range(dv)]
                y = mv(W(la + "out_proj.weight"), o, H, vd)
            x = [x[j] + y[j] for j in range(H)]
            m = rms(x, W(p + "post_attention_layernorm.weight"), True)
            mp = p + "mlp."

            if moe:
                E, kk_, F, Fs = c["num_experts"], c["num_experts_per_tok"], c["moe_intermediate_size"], c["shared_expert_intermediate_size"]
                rl = mv(W(mp + "gate.weight"), m, E, H)
                mx = max(rl)
                pr = [math.exp(t - mx) for t in rl]
                zs = sum(pr)
                pr = [t / zs for t in pr]
                sel = sorted(range(E), key=lambda e: -pr[e])[:kk_]
                ws = sum(pr[e] for e in sel)
                yo = [0.0] * H
                for e in sel:
                    if mt == "qwen3_next":
                        g, u, dn = W(f"{mp}experts.{e}.gate_proj.weight"), W(f"{mp}experts.{e}.up_proj.weight"), W(f"{mp}experts.{e}.down_proj.weight")
                        gg, uu = mv(g, m, F, H), mv(u, m, F, H)
                        hdn = [silu(gg[t]) * uu[t] for t in range(F)]
                        out_e = mv(dn, hdn, H, F)
                    else:
                        gu, dn = W(mp + "experts.gate_up_proj"), W(mp + "experts.down_proj")
                        gg = mv(gu, m, F, H, e * 2 * F)
                        uu = mv(gu, m, F, H, e * 2 * F + F)
                        hdn = [silu(gg[t]) * uu[t] for t in range(F)]
                        out_e = mv(dn, hdn, H, F, e * H)
                    for t in range(H):
                        yo[t] += pr[e] / ws * out_e[t]
                gg = mv(W(mp + "shared_expert.gate_proj.weight"), m, Fs, H)
                uu = mv(W(mp + "shared_expert.up_proj.weight"), m, Fs, H)
                sh = mv(W(mp + "shared_expert.down_proj.weight"), [silu(gg[t]) * uu[t] for t in range(Fs)], H, Fs)
                sg = sig(sum(W(mp + "shared_expert_gate.weight")[t] * m[t] for t in range(H)))
                yo = [yo[t] + sg * sh[t] for t in range(H)]
            else:
                F = c["intermediate_size"]
                gg = mv(W(mp + "gate_proj.weight"), m, F, H)
                uu = mv(W(mp + "up_proj.weight"), m, F, H)
                yo = mv(W(mp + "down_proj.weight"), [silu(gg[t]) * uu[t] for t in range(F)], H, F)
            x = [x[j] + yo[j] for j in range(H)]
        xn = rms(x, W(P + "norm.weight"), True)
        return mv(W("lm_head.weight"), xn, V, H)

    logits = [step(t, p) for p, t in enumerate(tokens)]
    n_prompt = n_tok - 16
    greedy, margins = [], []
    # greedy continuation: re-run from scratch (states are per call) on prompt + generated
    kv = [dict(k=[], v=[]) for _ in range(L)]
    st = [dict(conv=[[0.0] * C for _ in range(K - 1)], S=[[[0.0] * dv for _ in range(dk)] for _ in range(nv)]) for _ in range(L)]
    for p, t in enumerate(tokens[:n_prompt]):
        last = step(t, p)
    for g in range(16):
        srt = sorted(range(V), key=lambda j: -last[j])
        margins.append(last[srt[0]] - last[srt[1]])
        greedy.append(srt[0])
        last = step(srt[0], n_prompt + g)
    with open(out, "wb") as f:
        f.write(struct.pack("<IIii", 0x4645524D, 1, V, n_tok))
        f.write(struct.pack(f"<{n_tok}i", *tokens))
        for row in logits:
            f.write(struct.pack(f"<{V}f", *row))
        f.write(struct.pack("<ii", n_prompt, len(greedy)))
        f.write(struct.pack(f"<{len(greedy)}i", *greedy))
        f.write(struct.pack("<f", min(margins)))
    print(f"{out}: {n_tok} tokens, greedy {greedy[:8]}..., min margin {min(margins):.4g}")


if __name__ == "__main__":
    if sys.argv[1] == "make":
        make(sys.argv[2], sys.argv[3], int(sys.argv[4]) if len(sys.argv) > 4 else 1)
    else:
        ref(sys.argv[2], sys.argv[3], int(sys.argv[4]) if len(sys.argv) > 4 else 128)
