#!/usr/bin/env python3
"""make_fixtures_gemma4.py — tiny random-weight Gemma 4 models + Hugging Face reference outputs.

Writes, for each fixture NAME in {moe, e2b, dense31b}:
    test/fixtures/gemma4/NAME/config.json        the multimodal wrapper config the real checkpoints
                                                 ship (model_type gemma4, text tower in text_config)
    test/fixtures/gemma4/NAME/model.safetensors  bf16 weights under the real checkpoint names
                                                 (model.language_model.…, ARCHITECTURES.md §2.6)
    test/fixtures/gemma4/NAME.ref                reference logits + greedy continuation (the MREF
                                                 format of gen/make_fixtures.py, unchanged)
    test/fixtures/gemma4/NAME.json               what the C side needs to know (layer plan, KV
                                                 sharing, embedding scales, extra tensors, numbers)

Run where PyTorch + transformers live (the GPU machine; the models run on its CPU in float32):
    PYTHONUNBUFFERED=1 python3 gen/make_fixtures_gemma4.py
Without torch (here): `--numpy-only` writes the same files with .ref computed by the float64
NumPy reference below (local debugging only); `--search N` scans N seeds per fixture with the
NumPy reference and prints the robust ones (that is how the SEEDs below were chosen).

THE FIXTURES (all: vocab 512, sliding_window 8, 64 evaluated tokens = 8 windows, greedy prompt
40 tokens = 5 windows, 32 greedy tokens; norm weights 1 + 0.3·N(0,1) except q_norm / k_norm,
which are c·(1 + 0.3·N(0,1)) with c²·sqrt(head_dim) = QK_SCORE_STD (see qk_scale); layer_scalar
random in [0.5, 1.5]; final_logit_softcapping small enough to be active, i.e. the largest |logit|
before the cap is well above the cap):
  moe       26B-A4B-like: enable_moe_block, 6 layers (s s s f s f), head_dim 32 / global 64,
            4 heads, 2 KV heads (sliding) / 1 global KV head, attention_k_eq_v (full layers have
            no v_proj), proportional RoPE 25 % on full layers (theta 1e6) vs default RoPE (1e4) on
            sliding layers, 8 experts top-2 beside the dense GeGLU MLP, router.scale and
            per_expert_scale random, softcap 3; its final norm weights are 2·(1 + 0.3·N(0,1)) with a
            smaller embedding (std 0.06), which keeps the tied-embedding model from predicting its
            own input token over and over. Its safetensors also hold three vision-tower /
            embed_vision tensors that a text-only loader must skip (listed in moe.json), and its
            config.json a (tiny) vision_config, as the real checkpoint has.
  e2b       E2B-like dense: PLE (hidden_size_per_layer_input 32, vocab_size_per_layer_input 512),
            8 layers (s s f s | s f s f), num_kv_shared_layers 4 (shared layers 4..7 take K/V from
            layer 3 (sliding) and layer 2 (full)), use_double_wide_mlp (shared layers have 2× FFN),
            no k_eq_v (full layers have v_proj, 1 KV head like E2B), hidden 80, softcap 3.5. Like
            Google's original E2B release, the shared layers still carry (unused) k_proj / v_proj /
            k_norm tensors.
  dense31b  31B-like dense: no MoE, no PLE, k_eq_v with 1 global KV head vs 2 sliding, 6 layers
            (s s f s s f), hidden 96, other RoPE thetas (5e3 sliding, 2e5 full), softcap 4.
  hidden 80 and 96 make the bf16-rounded sqrt(hidden) differ from the exact one (8.9375 vs 8.944,
  9.8125 vs 9.798); moe's hidden 64 gives exactly 8.

HOW A FIXTURE IS MADE
 1. Random float32 weights under the checkpoint's tensor names, rounded to bf16 (round to nearest
    even) — the file holds those bf16 values, every reference uses exactly them (in f32 / f64).
 2. transformers' Gemma4ForConditionalGeneration is built from the same text config (vision and
    audio towers left out: with no image/audio tokens they do not touch the text path), our
    weights are loaded from the written model.safetensors (strict: every parameter and persistent
    buffer must come from the file; tied LM head checked), run in float32 with eager attention.
    The two embedding scales are the bf16-rounded sqrt(hidden) / sqrt(ple_dim): transformers
    casts them to the checkpoint dtype (the config says bfloat16), and the script sets them
    explicitly as well (the .json records the exact values, the ones used, and what HF's f32
    models held before). Logits for every position of the 64 tokens; then greedy decoding with
    HF's KV cache from the first 40 tokens; greedy again without a cache as a check; and a second
    load through transformers' own from_pretrained() of the fixture directory must give the same
    logits.
 3. Cross-check: an independent float64 NumPy implementation of ARCHITECTURES.md §2.3–2.5 runs
    the same bf16 weights; its logits must agree with transformers' (this checks the document's
    math and the weight mapping at once). Per-layer hidden-state differences are printed when
    they disagree.
 4. Seeds were searched (--search) so greedy decoding is robust: the smallest top-1 minus top-2
    logit gap over the greedy steps (min_margin >= MIN_MARGIN) and every router decision (k-th vs
    (k+1)-th expert logit, over all evaluated and greedy positions, >= MIN_ROUTER_GAP) are far
    from ties, the continuation is not a degenerate loop (>= MIN_DISTINCT distinct tokens), the
    softcap is active, and the same NumPy forward run in float32 (f32 KV cache), and in float32
    with K/V rounded to binary16 (f16 KV cache), stays within MAX_ERR_F32 / MAX_ERR_F16KV of the
    reference (max |logit diff| / row range): what an engine should expect (recorded in NAME.json).

.ref FILE FORMAT: identical to gen/make_fixtures.py (magic "MREF", version 1): n_vocab, n_tokens,
tokens, f32 logits [n_tokens][n_vocab] (after the final softcap), n_prompt, n_greedy, greedy
tokens, f32 min_margin.
"""
import argparse
import json
import os
import struct
import sys
import time

import numpy as np

REF_MAGIC = 0x4645524D
REF_VERSION = 1
N_TOKENS = 64
N_PROMPT = 40
N_GREEDY = 32
MIN_MARGIN = 0.01          # logits (after softcap)
MIN_ROUTER_GAP = 5e-3      # router logits, k-th minus (k+1)-th (dense fixtures: inf)
MIN_DISTINCT = 8           # distinct tokens in the greedy continuation (no degenerate loop)
QK_SCORE_STD = 1.5         # spread of the attention scores q·k (see qk_scale)
MAX_ERR_F32 = 2e-5         # predicted engine error, f32 KV (max |diff| / row range, see engine_errors)
MAX_ERR_F16KV = 2.5e-3       # the same with an f16 KV cache
PFX = "model.language_model."

SLIDING, FULL = "sliding_attention", "full_attention"
S, F = SLIDING, FULL

FIXTURES = {
    "moe": dict(
        seed=5090, vocab=512, hidden=64, layers=6, layer_types=[S, S, S, F, S, F],
        heads=4, kv_heads=2, global_kv_heads=1, head_dim=32, global_head_dim=64,
        k_eq_v=True, intermediate=96, moe=True, experts=8, top_k=2, moe_intermediate=32,
        ple=0, kv_shared=0, double_wide=False, sliding_window=8,
        theta_sliding=10000.0, theta_full=1000000.0, partial_rotary=0.25,
        softcap=3.0, eps=1e-6, embed_std=0.06, final_norm_scale=2.0, router_std=6.0, bidir="vision",
        extra_tensors={  # skipped by a text-only loader (ARCHITECTURES.md §2.6)
            "model.vision_tower.encoder.layers.0.self_attn.q_proj.linear.weight": (32, 32),
            "model.vision_tower.patch_embedder.input_proj.weight": (32, 48),
            "model.embed_vision.embedding_projection.weight": (64, 32),
        }),
    "e2b": dict(
        seed=2109, vocab=512, hidden=80, layers=8, layer_types=[S, S, F, S, S, F, S, F],
        heads=4, kv_heads=1, global_kv_heads=None, head_dim=32, global_head_dim=64,
        k_eq_v=False, intermediate=64, moe=False, ple=32, kv_shared=4, double_wide=True,
        redundant_shared_kv=True, sliding_window=8,
        theta_sliding=10000.0, theta_full=1000000.0, partial_rotary=0.25,
        softcap=3.5, eps=1e-6, embed_std=0.12, ple_std=0.3, bidir=None, extra_tensors={}),
    "dense31b": dict(
        seed=2004, vocab=512, hidden=96, layers=6, layer_types=[S, S, F, S, S, F],
        heads=4, kv_heads=2, global_kv_heads=1, head_dim=32, global_head_dim=64,
        k_eq_v=True, intermediate=192, moe=False, ple=0, kv_shared=0, double_wide=False,
        sliding_window=8, theta_sliding=5000.0, theta_full=200000.0, partial_rotary=0.25,
        softcap=4.0, eps=1e-6, embed_std=0.12, bidir=None, extra_tensors={}),
}


# ---------------------------------------------------------------------------------------------
# bf16
# ---------------------------------------------------------------------------------------------
def bf16_bits(a):
    """float32 array -> uint16 bf16 bit patterns, round to nearest even (as torch does)."""
    u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32).astype(np.uint64)
    u = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    return u.astype(np.uint16)


def bf16_to_f32(bits):
    return (bits.astype(np.uint32) << 16).view(np.float32)


def bf16_round(a):
    return bf16_to_f32(bf16_bits(a)).reshape(np.shape(a))


# ---------------------------------------------------------------------------------------------
# the layer plan (what the C side needs; also what the NumPy reference walks)
# ---------------------------------------------------------------------------------------------
def layer_plan(hp):
    L = hp["layers"]
    first_shared = L - hp["kv_shared"]
    plan = []
    for i, t in enumerate(hp["layer_types"]):
        full = t == FULL
        hd = hp["global_head_dim"] if full else hp["head_dim"]
        alt = full and hp["k_eq_v"]
        nkv = hp["global_kv_heads"] if alt else hp["kv_heads"]
        shared = hp["kv_shared"] > 0 and i >= first_shared
        src = None
        if shared:
            src = max(j for j in range(first_shared) if hp["layer_types"][j] == t)
        ff = hp["intermediate"] * (2 if (hp["double_wide"] and shared) else 1)
        plan.append(dict(layer=i, type=t, head_dim=hd, n_heads=hp["heads"], n_kv_heads=nkv,
                         v_is_k=alt, kv_shared=shared, kv_source_layer=src,
                         window=hp["sliding_window"] if not full else None, ffn=ff,
                         rope_theta=hp["theta_full"] if full else hp["theta_sliding"],
                         rope_type="proportional" if full else "default",
                         rope_rotated_pairs=(int(hp["partial_rotary"] * hd // 2) if full else hd // 2)))
    return plan


def embed_scales(hp):
    e = float(np.float32(hp["hidden"] ** 0.5))
    d = dict(embed_scale_exact=e, embed_scale_bf16=float(bf16_round(np.float32(e))))
    if hp["ple"]:
        p = float(np.float32(hp["ple"] ** 0.5))
        d.update(ple_embed_scale_exact=p, ple_embed_scale_bf16=float(bf16_round(np.float32(p))))
    return d


# ---------------------------------------------------------------------------------------------
# weights (checkpoint names, bf16-rounded float32 values)
# ---------------------------------------------------------------------------------------------
def qk_scale(hp, hd):
    """q_norm / k_norm weights are c·(1 + 0.3·N(0,1)): with the attention scale 1.0 the scores
    q·k then spread with a std of about c²·sqrt(hd) = QK_SCORE_STD instead of sqrt(hd), which keeps
    the softmax (and so the whole model) well conditioned for f32 / f16-KV comparisons."""
    return float(np.sqrt(QK_SCORE_STD / np.sqrt(hd)))


def random_weights(hp, seed):
    rng = np.random.default_rng(seed)
    H, V, L, nh = hp["hidden"], hp["vocab"], hp["layers"], hp["heads"]
    W = {}

    def mat(name, *shape, s=None):
        s = 1.0 / np.sqrt(shape[-1]) if s is None else s
        W[name] = (rng.standard_normal(shape) * s).astype(np.float32)

    def norm(name, n, c=1.0):
        W[name] = (c * (1.0 + 0.3 * rng.standard_normal(n))).astype(np.float32)

    mat(PFX + "embed_tokens.weight", V, H, s=hp["embed_std"])
    norm(PFX + "norm.weight", H, hp.get("final_norm_scale", 1.0))
    P = hp["ple"]
    if P:
        mat(PFX + "embed_tokens_per_layer.weight", V, L * P, s=hp["ple_std"])
        mat(PFX + "per_layer_model_projection.weight", L * P, H)
        norm(PFX + "per_layer_projection_norm.weight", P)
    for lp in layer_plan(hp):
        p = f"{PFX}layers.{lp['layer']}."
        hd, nkv = lp["head_dim"], lp["n_kv_heads"]
        norm(p + "input_layernorm.weight", H)
        mat(p + "self_attn.q_proj.weight", nh * hd, H)
        norm(p + "self_attn.q_norm.weight", hd, qk_scale(hp, hd))
        if not lp["kv_shared"] or hp.get("redundant_shared_kv"):
            mat(p + "self_attn.k_proj.weight", nkv * hd, H)
            if not lp["v_is_k"]:
                mat(p + "self_attn.v_proj.weight", nkv * hd, H)
            norm(p + "self_attn.k_norm.weight", hd, qk_scale(hp, hd))
        mat(p + "self_attn.o_proj.weight", H, nh * hd)
        norm(p + "post_attention_layernorm.weight", H)
        norm(p + "pre_feedforward_layernorm.weight", H)
        mat(p + "mlp.gate_proj.weight", lp["ffn"], H)
        mat(p + "mlp.up_proj.weight", lp["ffn"], H)
        mat(p + "mlp.down_proj.weight", H, lp["ffn"])
        norm(p + "post_feedforward_layernorm.weight", H)
        if hp["moe"]:
            E, Fm = hp["experts"], hp["moe_intermediate"]
            norm(p + "post_feedforward_layernorm_1.weight", H)
            mat(p + "router.proj.weight", E, H, s=hp["router_std"])
            norm(p + "router.scale", H)
            W[p + "router.per_expert_scale"] = rng.uniform(0.5, 1.5, E).astype(np.float32)
            norm(p + "pre_feedforward_layernorm_2.weight", H)
            mat(p + "experts.gate_up_proj", E, 2 * Fm, H)   # rows 0..Fm-1 gate, Fm..2Fm-1 up
            mat(p + "experts.down_proj", E, H, Fm)
            norm(p + "post_feedforward_layernorm_2.weight", H)
        if P:
            mat(p + "per_layer_input_gate.weight", P, H)
            mat(p + "per_layer_projection.weight", H, P)
            norm(p + "post_per_layer_input_norm.weight", H)
        W[p + "layer_scalar"] = rng.uniform(0.5, 1.5, 1).astype(np.float32)
    for name, shape in hp["extra_tensors"].items():
        mat(name, *shape)
    return {k: bf16_round(v) for k, v in W.items()}


def unused_tensor_names(hp):
    """Tensors in the file that the text model does not use (a loader must skip them)."""
    names = list(hp["extra_tensors"])
    if hp.get("redundant_shared_kv"):
        for lp in layer_plan(hp):
            if lp["kv_shared"]:
                p = f"{PFX}layers.{lp['layer']}.self_attn."
                names += [p + "k_proj.weight", p + "k_norm.weight"]
                if not lp["v_is_k"]:
                    names.append(p + "v_proj.weight")
    return names


# ---------------------------------------------------------------------------------------------
# files
# ---------------------------------------------------------------------------------------------
def write_safetensors(path, W):
    """bf16 safetensors, tensors in insertion order, header padded to 8 bytes like the library."""
    header, blobs, off = {"__metadata__": {"format": "pt"}}, [], 0
    for name, arr in W.items():
        b = bf16_bits(arr).tobytes()
        header[name] = {"dtype": "BF16", "shape": list(arr.shape), "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for b in blobs:
            f.write(b)


def read_safetensors_bf16(path):
    b = open(path, "rb").read()
    (n,) = struct.unpack_from("<Q", b, 0)
    header = json.loads(b[8:8 + n])
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        assert meta["dtype"] == "BF16"
        s, e = meta["data_offsets"]
        bits = np.frombuffer(b, np.uint16, (e - s) // 2, 8 + n + s)
        out[name] = bf16_to_f32(bits).reshape(meta["shape"])
    return out


def text_config(hp):
    """text_config as the real checkpoints' config.json has it (shrunk)."""
    c = {
        "model_type": "gemma4_text",
        "architectures": None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "attention_k_eq_v": hp["k_eq_v"],
        "bos_token_id": 2,
        "dtype": "bfloat16",
        "enable_moe_block": hp["moe"],
        "eos_token_id": 1,
        "final_logit_softcapping": hp["softcap"],
        "global_head_dim": hp["global_head_dim"],
        "head_dim": hp["head_dim"],
        "hidden_activation": "gelu_pytorch_tanh",
        "hidden_size": hp["hidden"],
        "hidden_size_per_layer_input": hp["ple"],
        "initializer_range": 0.02,
        "intermediate_size": hp["intermediate"],
        "layer_types": list(hp["layer_types"]),
        "max_position_embeddings": 4096,
        "moe_intermediate_size": hp.get("moe_intermediate") if hp["moe"] else None,
        "num_attention_heads": hp["heads"],
        "num_experts": hp.get("experts") if hp["moe"] else None,
        "num_global_key_value_heads": hp["global_kv_heads"],
        "num_hidden_layers": hp["layers"],
        "num_key_value_heads": hp["kv_heads"],
        "num_kv_shared_layers": hp["kv_shared"],
        "pad_token_id": 0,
        "rms_norm_eps": hp["eps"],
        "rope_parameters": {
            "full_attention": {"partial_rotary_factor": hp["partial_rotary"],
                               "rope_theta": hp["theta_full"], "rope_type": "proportional"},
            "sliding_attention": {"rope_theta": hp["theta_sliding"], "rope_type": "default"},
        },
        "sliding_window": hp["sliding_window"],
        "tie_word_embeddings": True,
        "top_k_experts": hp.get("top_k") if hp["moe"] else None,
        "use_bidirectional_attention": hp["bidir"],
        "use_cache": True,
        "use_double_wide_mlp": hp["double_wide"],
        "vocab_size": hp["vocab"],
        "vocab_size_per_layer_input": hp["vocab"],
    }
    del c["architectures"]
    return c


def full_config(hp, with_towers):
    """The wrapper config.json (Gemma4ForConditionalGeneration). with_towers: a small
    vision_config as the real file has one (the HF reference model is built without it)."""
    c = {
        "architectures": ["Gemma4ForConditionalGeneration"],
        "model_type": "gemma4",
        "audio_token_id": 258881,
        "boa_token_id": 256000,
        "boi_token_id": 255999,
        "dtype": "bfloat16",
        "eoa_token_index": 258883,
        "eoi_token_id": 258882,
        "eos_token_id": [1, 106],
        "image_token_id": 258880,
        "initializer_range": 0.02,
        "text_config": text_config(hp),
        "tie_word_embeddings": True,
        "video_token_id": 258884,
        "vision_soft_tokens_per_image": 280,
        "audio_config": None,
        "vision_config": None,
    }
    if with_towers:
        c["vision_config"] = {
            "model_type": "gemma4_vision", "hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2,
            "head_dim": 16, "hidden_activation": "gelu_pytorch_tanh", "rms_norm_eps": 1e-6,
            "patch_size": 4, "pooling_kernel_size": 3, "position_embedding_size": 64,
            "rope_parameters": {"rope_theta": 100.0, "rope_type": "default"},
            "dtype": "bfloat16"}
    return c


def compact_json(obj):
    """indented JSON with lists of scalars and flat objects on one line each"""
    import re
    s = json.dumps(obj, indent=1)
    one = lambda m: m.group(1) + " ".join(m.group(2).split()) + m.group(3)  # noqa: E731
    s = re.sub(r"(\[)\s+([^\[\]{}]*?)\s+(\])", one, s)
    return re.sub(r"(\{)\s+([^\[\]{}]*?)\s+(\})", one, s)


def write_ref(path, tokens, logits, n_prompt, greedy, min_margin):
    tokens = np.asarray(tokens, dtype="<i4")
    logits = np.asarray(logits, dtype="<f4")
    greedy = np.asarray(greedy, dtype="<i4")
    assert logits.shape == (tokens.size, logits.shape[1])
    with open(path, "wb") as f:
        f.write(struct.pack("<IIii", REF_MAGIC, REF_VERSION, logits.shape[1], tokens.size))
        f.write(tokens.tobytes())
        f.write(logits.tobytes())
        f.write(struct.pack("<ii", n_prompt, greedy.size))
        f.write(greedy.tobytes())
        f.write(struct.pack("<f", min_margin))


def read_ref(path):
    b = open(path, "rb").read()
    magic, ver, nv, nt = struct.unpack_from("<IIii", b, 0)
    assert magic == REF_MAGIC and ver == REF_VERSION
    o = 16
    tokens = np.frombuffer(b, "<i4", nt, o); o += 4 * nt
    logits = np.frombuffer(b, "<f4", nt * nv, o).reshape(nt, nv); o += 4 * nt * nv
    n_prompt, ng = struct.unpack_from("<ii", b, o); o += 8
    greedy = np.frombuffer(b, "<i4", ng, o); o += 4 * ng
    (mm,) = struct.unpack_from("<f", b, o); o += 4
    assert o == len(b)
    return dict(tokens=tokens, logits=logits, n_prompt=n_prompt, greedy=greedy, min_margin=mm)


# ---------------------------------------------------------------------------------------------
# float64 NumPy reference forward: ARCHITECTURES.md §2.3–2.5, written from the document
# ---------------------------------------------------------------------------------------------
def gelu_tanh(z):
    return 0.5 * z * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (z + 0.044715 * z ** 3)))


def np_forward(W, hp, tokens, scales, dt=np.float64, kv16=False):
    """-> dict(logits [T][V] after softcap, pre [T][V] before it, hidden [L+1][T][H] (embedding,
    then the stream after each layer), router_gap (smallest k-th minus (k+1)-th expert logit)).
    dt=np.float32 and kv16 (K and V rounded to binary16 as a cache stores them) only serve the
    seed search: they predict how far an f32 engine with an f16 KV cache lands from the reference."""
    g = lambda n: np.asarray(W[PFX + n], dtype=dt)  # noqa: E731
    tok = np.asarray(tokens)
    T, H, L, nh, eps = len(tok), hp["hidden"], hp["layers"], hp["heads"], hp["eps"]

    def rms(x, w=None):
        y = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)
        return y if w is None else y * w

    pos = np.arange(T, dtype=np.float64)

    def rope(x, lp):  # x [T][heads][hd]; rotate-half pairs (i, i + hd/2); §2.4
        hd = x.shape[-1]
        half = hd // 2
        inv = np.zeros(half)
        n = lp["rope_rotated_pairs"]            # proportional: floor(0.25·hd/2) pairs rotate
        inv[:n] = lp["rope_theta"] ** (-2.0 * np.arange(n) / hd)   # denominator: FULL head dim
        ang = pos[:, None] * inv[None, :]
        c, s = np.cos(ang)[:, None, :].astype(dt), np.sin(ang)[:, None, :].astype(dt)
        a, b = x[..., :half], x[..., half:]
        return np.concatenate([a * c - b * s, b * c + a * s], axis=-1)

    jj, ii = np.meshgrid(np.arange(T), np.arange(T))
    causal = jj <= ii
    masks = {FULL: causal, SLIDING: causal & (jj > ii - hp["sliding_window"])}

    emb = g("embed_tokens.weight")
    h = emb[tok] * scales["embed_scale"]
    P = hp["ple"]
    if P:
        Tp = (g("embed_tokens_per_layer.weight")[tok] * scales["ple_embed_scale"]).reshape(T, L, P)
        Cp = (h @ g("per_layer_model_projection.weight").T) * H ** -0.5
        Cp = rms(Cp.reshape(T, L, P), g("per_layer_projection_norm.weight"))
        pli = (Cp + Tp) * 2.0 ** -0.5
    hidden = [h]
    kv = {}
    router_gap = np.inf
    for lp in layer_plan(hp):
        p = f"layers.{lp['layer']}."
        hd, nkv, t = lp["head_dim"], lp["n_kv_heads"], lp["type"]
        a = rms(h, g(p + "input_layernorm.weight"))
        q = (a @ g(p + "self_attn.q_proj.weight").T).reshape(T, nh, hd)
        q = rope(rms(q, g(p + "self_attn.q_norm.weight")), lp)
        if lp["kv_shared"]:
            k, v = kv[lp["kv_source_layer"]]
        else:
            kraw = (a @ g(p + "self_attn.k_proj.weight").T).reshape(T, nkv, hd)
            vraw = kraw if lp["v_is_k"] else (a @ g(p + "self_attn.v_proj.weight").T).reshape(T, nkv, hd)
            k = rope(rms(kraw, g(p + "self_attn.k_norm.weight")), lp)
            v = rms(vraw)
            if kv16:
                k, v = k.astype(np.float16).astype(dt), v.astype(np.float16).astype(dt)
            kv[lp["layer"]] = (k, v)
        o = np.empty((T, nh, hd), dtype=dt)
        mask = masks[t]
        for head in range(nh):
            kh = head // (nh // nkv)
            sc = q[:, head, :] @ k[:, kh, :].T          # scale 1.0
            sc = np.where(mask, sc, -np.inf)
            pr = np.exp(sc - sc.max(axis=1, keepdims=True))
            pr /= pr.sum(axis=1, keepdims=True)
            o[:, head, :] = pr @ v[:, kh, :]
        h = h + rms(o.reshape(T, nh * hd) @ g(p + "self_attn.o_proj.weight").T,
                    g(p + "post_attention_layernorm.weight"))
        res = h
        x = rms(h, g(p + "pre_feedforward_layernorm.weight"))
        d = (gelu_tanh(x @ g(p + "mlp.gate_proj.weight").T) * (x @ g(p + "mlp.up_proj.weight").T)) \
            @ g(p + "mlp.down_proj.weight").T
        if hp["moe"]:
            d = rms(d, g(p + "post_feedforward_layernorm_1.weight"))
            E, K, Fm = hp["experts"], hp["top_k"], hp["moe_intermediate"]
            z = rms(h) * g(p + "router.scale") * H ** -0.5
            rl = z @ g(p + "router.proj.weight").T                    # [T][E]
            order = np.argsort(-rl, axis=1, kind="stable")
            srt = np.take_along_axis(rl, order, axis=1)
            router_gap = min(router_gap, float((srt[:, K - 1] - srt[:, K]).min()))
            sel = order[:, :K]
            ls = np.take_along_axis(rl, sel, axis=1)
            wsel = np.exp(ls - ls.max(axis=1, keepdims=True))
            wsel /= wsel.sum(axis=1, keepdims=True)
            wsel *= g(p + "router.per_expert_scale")[sel]
            x2 = rms(h, g(p + "pre_feedforward_layernorm_2.weight"))
            gu, dn = g(p + "experts.gate_up_proj"), g(p + "experts.down_proj")
            m = np.zeros_like(h)
            for e in range(E):
                rows, slot = np.nonzero(sel == e)
                if rows.size == 0:
                    continue
                y = x2[rows] @ gu[e].T
                y = (gelu_tanh(y[:, :Fm]) * y[:, Fm:]) @ dn[e].T
                m[rows] += wsel[rows, slot][:, None] * y
            m = rms(m, g(p + "post_feedforward_layernorm_2.weight"))
            d = d + m
        h = res + rms(d, g(p + "post_feedforward_layernorm.weight"))
        if P:
            y = gelu_tanh(h @ g(p + "per_layer_input_gate.weight").T) * pli[:, lp["layer"], :]
            h = h + rms(y @ g(p + "per_layer_projection.weight").T, g(p + "post_per_layer_input_norm.weight"))
        h = h * g(p + "layer_scalar")[0]
        hidden.append(h)
    pre = rms(h, g("norm.weight")) @ emb.T
    cap = hp["softcap"]
    logits = cap * np.tanh(pre / cap) if cap else pre
    return dict(logits=logits, pre=pre, hidden=np.stack(hidden), router_gap=router_gap)


def np_greedy(W, hp, prompt, n, scales, abort_below=None):
    """-> (greedy tokens, min margin, router gap over prompt + greedy); with abort_below, stops
    early (returning what it has) once a margin falls below it (seed search)."""
    seq = list(prompt)
    margins = []
    for _ in range(n):
        last = np_forward(W, hp, seq, scales)["logits"][-1]
        top = np.argsort(-last, kind="stable")[:2]
        margins.append(float(last[top[0]] - last[top[1]]))
        seq.append(int(top[0]))
        if abort_below is not None and margins[-1] < abort_below:
            return seq[len(prompt):], min(margins), 0.0
    fin = np_forward(W, hp, seq, scales)
    return seq[len(prompt):], min(margins), fin["router_gap"]


def scales_used(hp):
    s = embed_scales(hp)
    return dict(embed_scale=s["embed_scale_bf16"], ple_embed_scale=s.get("ple_embed_scale_bf16"))


def tokens_for(hp, seed):
    return np.random.default_rng(seed + 7777).integers(0, hp["vocab"], N_TOKENS).tolist()


def engine_errors(W, hp, tokens, sc, ref):
    """Predicted logit errors of an engine against the reference, as max over rows of
    max |diff| / (row max - row min): float32 math (f32 KV cache), and float32 math with K and V
    rounded to binary16 (f16 KV cache)."""
    rr = ref["logits"].max(axis=1) - ref["logits"].min(axis=1)
    out = {}
    for key, kv16 in (("f32", False), ("f16kv", True)):
        x = np_forward(W, hp, tokens, sc, dt=np.float32, kv16=kv16)["logits"]
        out[key] = float((np.abs(x - ref["logits"]).max(axis=1) / rr).max())
    return out


def evaluate_seed(hp, seed, screen=False):
    """screen: stop at the first failed criterion (seed search)."""
    W = random_weights(hp, seed)
    sc = scales_used(hp)
    tokens = tokens_for(hp, seed)
    full = np_forward(W, hp, tokens, sc)
    r = dict(W=W, tokens=tokens, full=full, greedy=[], margin=0.0, router_gap=full["router_gap"],
             max_pre=float(np.abs(full["pre"]).max()), distinct=0, err=dict(f32=-1.0, f16kv=-1.0))
    if screen and (full["router_gap"] < MIN_ROUTER_GAP or r["max_pre"] < 1.2 * hp["softcap"]):
        return r
    r["err"] = engine_errors(W, hp, tokens, sc, full)
    if screen and (r["err"]["f32"] > MAX_ERR_F32 or r["err"]["f16kv"] > MAX_ERR_F16KV):
        return r
    greedy, margin, gap2 = np_greedy(W, hp, tokens[:N_PROMPT], N_GREEDY, sc,
                                     abort_below=MIN_MARGIN if screen else None)
    r.update(greedy=greedy, margin=margin, router_gap=min(full["router_gap"], gap2), distinct=len(set(greedy)))
    return r


def robust(hp, r):
    return (r["margin"] >= MIN_MARGIN and r["router_gap"] >= MIN_ROUTER_GAP and r["distinct"] >= MIN_DISTINCT
            and r["max_pre"] >= 1.2 * hp["softcap"] and 0 <= r["err"]["f32"] <= MAX_ERR_F32
            and 0 <= r["err"]["f16kv"] <= MAX_ERR_F16KV)


def search(names, n, start=None):
    for name in names:
        hp = FIXTURES[name]
        first = hp["seed"] if start is None else start
        print(f"== {name}: scanning seeds {first}..{first + n - 1}")
        rows = []
        for seed in range(first, first + n):
            r = evaluate_seed(hp, seed, screen=True)
            ok = robust(hp, r)
            rows.append((ok, min(r["margin"] / MIN_MARGIN, r["router_gap"] / MIN_ROUTER_GAP,
                                 MAX_ERR_F16KV / max(r["err"]["f16kv"], 1e-9)), seed))
            print(f"  seed {seed}: router gap {r['router_gap']:.2e} max|pre-cap| {r['max_pre']:.2f} "
                  f"(cap {hp['softcap']}) err f32 {r['err']['f32']:.1e} f16kv {r['err']['f16kv']:.1e} "
                  f"margin {r['margin']:.4f} distinct {r['distinct']} {'OK' if ok else ''}", flush=True)
        good = sorted([x for x in rows if x[0]], key=lambda x: -x[1])
        print(f"  robust seeds (best worst-criterion ratio first): {[(s, round(q, 2)) for _, q, s in good][:8]}")


# ---------------------------------------------------------------------------------------------
# transformers
# ---------------------------------------------------------------------------------------------
def hf_model(hp, st_path, scales):
    import torch
    import transformers
    from transformers import Gemma4Config, Gemma4ForConditionalGeneration

    cfg_dict = full_config(hp, with_towers=False)
    cfg = Gemma4Config.from_dict(json.loads(json.dumps(cfg_dict)))
    for c in (cfg, cfg.text_config):
        for attr, val in (("_attn_implementation", "eager"), ("_experts_implementation", "eager")):
            try:
                if attr == "_attn_implementation" or hasattr(c, attr):
                    setattr(c, attr, val)
            except Exception as e:  # noqa: BLE001
                print(f"  (could not set {attr}: {e})")
    torch.manual_seed(0)
    model = Gemma4ForConditionalGeneration(cfg).float().eval()
    try:
        model.set_attn_implementation("eager")
    except Exception:  # noqa: BLE001
        pass
    tc = model.config.get_text_config()
    print(f"  attention implementation: {getattr(tc, '_attn_implementation', '?')}, experts "
          f"implementation: {getattr(tc, '_experts_implementation', 'n/a')}")

    # our weights: read back from the written file with the safetensors library
    from safetensors.torch import load_file
    file_sd = {k: v.float() for k, v in load_file(st_path).items()}
    ours = read_safetensors_bf16(st_path)
    for k, v in file_sd.items():  # the library reads what we wrote
        assert np.array_equal(v.numpy(), ours[k]), k
    unused = set(unused_tensor_names(hp))
    sd = model.state_dict()
    lm = model.model.language_model
    want = set(sd) - {"lm_head.weight"}
    have = {k for k in file_sd if k in sd or k not in unused}   # unused ones HF has (if any) load too
    if unused & set(sd):
        print(f"  note: HF's model has {len(unused & set(sd))} of the file's unused tensors as parameters")
    if want != have:
        for k in sorted(sd):
            print(f"    model state {k} {tuple(sd[k].shape)}")
        raise SystemExit(f"name mismatch: model-only {sorted(want - have)[:12]} file-only {sorted(have - want)[:12]}")
    new = {k: file_sd[k] for k in want}
    for k, v in new.items():
        if tuple(sd[k].shape) != tuple(v.shape):
            raise SystemExit(f"{k}: model shape {tuple(sd[k].shape)}, file {tuple(v.shape)}")
    res = model.load_state_dict(new, strict=False)
    if res.unexpected_keys or set(res.missing_keys) - {"lm_head.weight"}:
        raise SystemExit(f"load_state_dict: unexpected {res.unexpected_keys}, missing {res.missing_keys}")
    sd2 = model.state_dict()
    for k, v in new.items():
        if not torch.equal(sd2[k].detach().cpu(), v):
            raise SystemExit(f"{k} did not take our values")
    if not torch.equal(model.lm_head.weight.detach(), file_sd[PFX + "embed_tokens.weight"]):
        print("  WARNING: lm_head not tied after loading; calling tie_weights()")
        model.tie_weights()
        if not torch.equal(model.lm_head.weight.detach(), file_sd[PFX + "embed_tokens.weight"]):
            raise SystemExit("lm_head is not tied to embed_tokens")

    # embedding scales: HF casts sqrt(hidden) to the weight dtype; for bf16 checkpoints that is
    # the bf16-rounded value (our model is f32, so set it explicitly)
    def set_scale(mod, val, what):
        before = mod.embed_scale
        before = float(before) if not torch.is_tensor(before) else float(before.item())
        if torch.is_tensor(mod.embed_scale):
            mod.embed_scale.fill_(val)
        else:
            mod.embed_scale = val
        print(f"  {what}: HF f32 model had {before!r}; set to bf16-rounded {val!r}")
        return before
    hf_scales = dict(embed_scale=set_scale(lm.embed_tokens, scales["embed_scale"], "embed_scale"))
    if hp["ple"]:
        hf_scales["ple_embed_scale"] = set_scale(lm.embed_tokens_per_layer, scales["ple_embed_scale"],
                                                 "PLE embed_scale")

    # RoPE: compare HF's inverse frequencies with ARCHITECTURES.md §2.4 (report only)
    rot = lm.rotary_emb
    for t in sorted(set(hp["layer_types"])):
        lp = next(x for x in layer_plan(hp) if x["type"] == t)
        hd, n = lp["head_dim"], lp["rope_rotated_pairs"]
        want_inv = np.zeros(hd // 2)
        want_inv[:n] = lp["rope_theta"] ** (-2.0 * np.arange(n) / hd)
        got = getattr(rot, f"{t}_inv_freq", None)
        if got is None:
            print(f"  WARNING: no {t}_inv_freq buffer; RoPE unchecked")
            continue
        got = got.double().cpu().numpy()
        ok = got.shape == want_inv.shape and np.allclose(got, want_inv, rtol=1e-6, atol=0)
        print(f"  RoPE {t}: HF inv_freq {got.shape[0]} entries, {int((got != 0).sum())} nonzero; "
              f"matches ARCHITECTURES.md §2.4: {ok}")
        if not ok:
            print(f"    HF   {np.array2string(got[:12], precision=5)}")
            print(f"    doc  {np.array2string(want_inv[:12], precision=5)}")
    # per-layer geometry as built
    for i, layer in enumerate(lm.layers):
        at = layer.self_attn
        lp = layer_plan(hp)[i]
        geo = (at.head_dim, getattr(at, "is_kv_shared_layer", None), getattr(at, "v_proj", None) is None
               if not lp["kv_shared"] else None, layer.mlp.gate_proj.weight.shape[0])
        exp = (lp["head_dim"], lp["kv_shared"], lp["v_is_k"] if not lp["kv_shared"] else None, lp["ffn"])
        if geo != exp:
            raise SystemExit(f"layer {i}: HF geometry {geo}, plan {exp}")
    info = dict(transformers=transformers.__version__, torch=torch.__version__, hf_scales=hf_scales)
    return model, info


def hf_run(model, hp, tokens, n_prompt, n_greedy):
    import torch
    with torch.no_grad():
        ids = torch.tensor([list(tokens)], dtype=torch.long)
        logits = model(input_ids=ids, use_cache=False).logits[0].float().numpy()
        try:
            hs = model(input_ids=ids, use_cache=False, output_hidden_states=True).hidden_states
            hidden = np.stack([x[0].float().numpy() for x in hs])
        except Exception as e:  # noqa: BLE001  (diagnostics only)
            print(f"  (no hidden states: {type(e).__name__}: {e})")
            hidden = np.zeros((0,))
        base = model.model(input_ids=ids, use_cache=False)
        pre = model.lm_head(base.last_hidden_state)[0].float().numpy()
        out = model(input_ids=ids[:, :n_prompt], use_cache=True)
        past, last = out.past_key_values, out.logits[0, -1].float()
        greedy, margins, steps = [], [], [last.numpy().copy()]
        for i in range(n_greedy):
            top = torch.topk(last, 2)
            margins.append(float(top.values[0] - top.values[1]))
            tok = int(torch.argmax(last))
            assert tok == int(top.indices[0])
            greedy.append(tok)
            if i == n_greedy - 1:
                break
            out = model(input_ids=torch.tensor([[tok]]), past_key_values=past, use_cache=True)
            past, last = out.past_key_values, out.logits[0, -1].float()
            steps.append(last.numpy().copy())
        seq = torch.tensor([list(tokens[:n_prompt]) + greedy], dtype=torch.long)
        full = model(input_ids=seq, use_cache=False).logits[0].float()
        nocache = [int(t) for t in torch.argmax(full[n_prompt - 1:-1], dim=-1)]
        # logits of the cached decode steps vs the no-cache pass at the same positions
        cache_diff = float(np.abs(np.stack(steps) - full[n_prompt - 1:-1].numpy()).max())
    print(f"  HF KV-cache decode vs no-cache logits: max |diff| {cache_diff:.3g}")
    return dict(logits=logits, pre=pre, greedy=greedy, margin=min(margins), cache_ok=nocache == greedy,
                cache_diff=cache_diff, hidden=hidden)


def hf_from_pretrained_check(hp, fx_dir, tokens, ref_logits, scales):
    """Secondary check: transformers' own loader on the fixture directory (config.json as
    written, vision tower included where the config has one) gives the same logits."""
    import torch
    from transformers import Gemma4ForConditionalGeneration
    try:
        model, info = Gemma4ForConditionalGeneration.from_pretrained(
            fx_dir, dtype=torch.float32, attn_implementation="eager", output_loading_info=True)
    except TypeError:
        model, info = Gemma4ForConditionalGeneration.from_pretrained(
            fx_dir, torch_dtype=torch.float32, attn_implementation="eager", output_loading_info=True)
    model.eval()
    lm = model.model.language_model
    missing = [k for k in info.get("missing_keys", []) if "vision" not in k and "audio" not in k]
    unexpected = sorted(info.get("unexpected_keys", []))
    held = {}
    for mod, key in ((lm.embed_tokens, "embed_scale"), (getattr(lm, "embed_tokens_per_layer", None), "ple_embed_scale")):
        if mod is not None and torch.is_tensor(getattr(mod, "embed_scale", None)):
            held[key] = float(mod.embed_scale.item())
            mod.embed_scale.fill_(scales[key])
    with torch.no_grad():
        lg = model(input_ids=torch.tensor([list(tokens)]), use_cache=False).logits[0].float().numpy()
    d = float(np.abs(lg - ref_logits).max())
    print(f"  from_pretrained({os.path.basename(fx_dir)}, dtype=float32): embedding scales held {held}; "
          f"missing (text) {missing}, unexpected {len(unexpected)} {unexpected[:6]}, max |logit diff| "
          f"vs reference {d:.3g}")
    return dict(missing_text_keys=missing, unexpected_keys=unexpected, max_abs_logit_diff=d,
                embed_scales_held_by_f32_from_pretrained=held)


# ---------------------------------------------------------------------------------------------
def make_one(name, out_root, numpy_only):
    hp = FIXTURES[name]
    seed = hp["seed"]
    t0 = time.time()
    r = evaluate_seed(hp, seed)
    W, tokens, npf = r["W"], r["tokens"], r["full"]
    sc = scales_used(hp)
    print(f"  seed {seed}: NumPy f64 {time.time() - t0:.1f}s: greedy margin {r['margin']:.4g}, router gap "
          f"{r['router_gap']:.3g}, max |pre-cap logit| {r['max_pre']:.2f} (cap {hp['softcap']}), "
          f"{r['distinct']} distinct greedy tokens")
    print(f"  predicted engine error vs the f64 reference (max|diff|/row range): f32 {r['err']['f32']:.2e}, "
          f"f16 KV cache {r['err']['f16kv']:.2e}")
    if not robust(hp, r):
        print("  WARNING: this seed is not robust (see --search)")
    fx_dir = os.path.join(out_root, name)
    os.makedirs(fx_dir, exist_ok=True)
    st_path = os.path.join(fx_dir, "model.safetensors")
    write_safetensors(st_path, W)
    back = read_safetensors_bf16(st_path)
    assert list(back) == list(W) and all(np.array_equal(back[k], W[k]) for k in W)
    with open(os.path.join(fx_dir, "config.json"), "w") as f:
        json.dump(full_config(hp, with_towers=bool(hp["extra_tensors"])), f, indent=2)
        f.write("\n")

    meta = dict(name=name, seed=seed, n_tokens=N_TOKENS, n_prompt=N_PROMPT, n_greedy=N_GREEDY)
    if numpy_only:
        logits, greedy, margin, cache_ok = npf["logits"], r["greedy"], r["margin"], True
        meta["reference"] = "NumPy float64 (--numpy-only; NOT transformers)"
        agree = None
    else:
        model, info = hf_model(hp, st_path, sc)
        hr = hf_run(model, hp, tokens, N_PROMPT, N_GREEDY)
        logits, greedy, margin, cache_ok = hr["logits"], hr["greedy"], hr["margin"], hr["cache_ok"]
        meta["reference"] = (f"transformers {info['transformers']} (torch {info['torch']}) "
                             "Gemma4ForConditionalGeneration, float32 on the CPU, eager attention")
        meta["transformers"], meta["torch"] = info["transformers"], info["torch"]
        meta["embed_scales_held_by_hf_model_built_from_config"] = info["hf_scales"]
        rng_row = npf["logits"].max(axis=1) - npf["logits"].min(axis=1)
        rel = float((np.abs(logits - npf["logits"]).max(axis=1) / rng_row).max())
        absd = float(np.abs(logits - npf["logits"]).max())
        pre_rel = float(np.abs(hr["pre"] - npf["pre"]).max() / np.abs(npf["pre"]).max())
        agree = rel <= 1e-4 and greedy == r["greedy"]
        print(f"  HF f32 vs NumPy f64: logits max|diff| {absd:.3g}, / row range {rel:.3e}; pre-cap rel "
              f"{pre_rel:.3e}; greedy equal {greedy == r['greedy']}; HF cache == no-cache greedy {cache_ok}")
        meta["numpy_vs_hf"] = dict(max_abs_logit_diff=absd, max_diff_over_row_range=rel,
                                   pre_softcap_max_rel=pre_rel, greedy_equal=greedy == r["greedy"])
        meta["hf_cache_vs_nocache_max_abs_logit_diff"] = hr["cache_diff"]
        if hr["hidden"].ndim == 3:
            nh_ = min(len(hr["hidden"]), len(npf["hidden"]))
            per = [float(np.abs(hr["hidden"][i] - npf["hidden"][i]).max() / (np.abs(npf["hidden"][i]).max() + 1e-30))
                   for i in range(nh_)]
            print(f"  hidden states ({len(hr['hidden'])} from HF, {len(npf['hidden'])} NumPy) rel diff per "
                  f"layer: {' '.join(f'{x:.1e}' for x in per)}")
            meta["numpy_vs_hf"]["hidden_rel_diff_per_layer"] = per
        if not agree:
            print("  WARNING: transformers and the NumPy reference DISAGREE")
            np.savez_compressed(os.path.join(out_root, f"{name}_debug.npz"), hf_hidden=hr["hidden"],
                                np_hidden=npf["hidden"], hf_logits=logits, np_logits=npf["logits"],
                                hf_pre=hr["pre"], np_pre=npf["pre"])
        try:
            meta["from_pretrained"] = hf_from_pretrained_check(hp, fx_dir, tokens, logits, sc)
        except Exception as e:  # noqa: BLE001  (secondary check only)
            print(f"  from_pretrained check failed: {type(e).__name__}: {e}")
            meta["from_pretrained"] = f"failed: {type(e).__name__}: {e}"
        if margin < MIN_MARGIN:
            print(f"  WARNING: HF greedy margin {margin:.4g} < {MIN_MARGIN}")
    if not cache_ok:
        print("  WARNING: greedy with and without the KV cache differ")
    if not np.all(np.isfinite(logits)):
        raise SystemExit("non-finite logits")
    pre = npf["pre"]
    cap = hp["softcap"]
    ref_path = os.path.join(out_root, f"{name}.ref")
    write_ref(ref_path, tokens, logits, N_PROMPT, greedy, margin)
    rr = read_ref(ref_path)
    assert list(rr["greedy"]) == list(greedy) and rr["logits"].shape == (N_TOKENS, hp["vocab"])

    plan = layer_plan(hp)
    es = embed_scales(hp)
    meta.update(
        seed=seed, tokens=list(map(int, tokens)), greedy=list(map(int, greedy)), min_margin=margin,
        min_router_gap=(r["router_gap"] if hp["moe"] else None),
        predicted_engine_error=dict(
            f32_kv=r["err"]["f32"], f16_kv=r["err"]["f16kv"],
            note=("max over rows of max|logit diff| / row range between the float64 NumPy reference and "
                  "the same NumPy forward in float32 (f32_kv) and in float32 with K and V rounded to "
                  "binary16 (f16_kv): what an engine should expect against this .ref")),
        qk_norm_weights=(f"q_norm / k_norm weights are c·(1 + 0.3·N(0,1)) with c = sqrt({QK_SCORE_STD}/sqrt(head_dim)) "
                         "(attention scale is 1.0, so this keeps the scores q·k at a std of about "
                         f"{QK_SCORE_STD}); the final norm's are {hp.get('final_norm_scale', 1.0)}·(1 + 0.3·N(0,1)); "
                         "every other norm weight is 1 + 0.3·N(0,1)"),
        distinct_greedy_tokens=len(set(greedy)),
        weights_dtype="bf16 (reference math in float32 on exactly these values)",
        layer_types=hp["layer_types"], sliding_window=hp["sliding_window"],
        kv_shared_layers=[lp["layer"] for lp in plan if lp["kv_shared"]],
        kv_source_layer={str(lp["layer"]): lp["kv_source_layer"] for lp in plan if lp["kv_shared"]},
        layers=plan,
        embed_scale_used=sc["embed_scale"], embed_scale_exact_f32=es["embed_scale_exact"],
        ple_embed_scale_used=sc["ple_embed_scale"], ple_embed_scale_exact_f32=es.get("ple_embed_scale_exact"),
        embed_scale_note=("the reference multiplies the embedding row by sqrt(hidden) rounded to bf16 "
                          "(what HF does running the bf16 checkpoint: it casts the scale to the weight "
                          "dtype); likewise sqrt(hidden_size_per_layer_input) for the PLE table. The other "
                          "constants (hidden^-0.5 in the router and the PLE projection, 2^-0.5) stay f32."),
        final_logit_softcapping=cap,
        max_abs_logit_before_softcap=float(np.abs(pre).max()),
        fraction_of_logits_beyond_half_cap=float((np.abs(pre) > cap / 2).mean()),
        unused_tensors_in_file=unused_tensor_names(hp),
        config_note=("config.json is the multimodal wrapper (model_type gemma4, text tower under "
                     "text_config). The HF reference model is built from it without vision/audio "
                     "towers (no image/audio tokens are used)."),
        generator="gen/make_fixtures_gemma4.py",
    )
    if hp["moe"]:
        meta.update(experts=hp["experts"], top_k=hp["top_k"], moe_intermediate=hp["moe_intermediate"])
    with open(os.path.join(out_root, f"{name}.json"), "w") as f:
        f.write(compact_json(meta) + "\n")
    sz = os.path.getsize(st_path)
    print(f"  wrote {fx_dir}/ (model.safetensors {sz} B), {name}.ref ({os.path.getsize(ref_path)} B), "
          f"{name}.json: min_margin {margin:.4g}, max|pre-cap| {np.abs(pre).max():.2f} vs cap {cap}, "
          f"greedy {list(greedy)[:10]}...")
    return dict(name=name, seed=seed, margin=margin, agree=agree, size=sz)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--numpy-only", action="store_true", help="reference from the NumPy forward (no torch)")
    ap.add_argument("--search", type=int, default=0, help="scan this many seeds per fixture (NumPy) and exit")
    ap.add_argument("--start", type=int, default=None, help="first seed for --search (default: the fixture's)")
    ap.add_argument("--only", help="comma-separated fixture names")
    ap.add_argument("--out", default=None, help="output directory (default test/fixtures/gemma4)")
    a = ap.parse_args()
    names = [n for n in FIXTURES if not a.only or n in a.only.split(",")]
    if a.search:
        search(names, a.search, a.start)
        return
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = a.out or os.path.join(root, "test", "fixtures", "gemma4")
    os.makedirs(out, exist_ok=True)
    print(f"numpy {np.__version__}")
    if not a.numpy_only:
        import torch
        import transformers
        print(f"torch {torch.__version__}, transformers {transformers.__version__}, "
              f"{torch.get_num_threads()} CPU threads (models run on the CPU in float32)")
        # our bf16 rounding is torch's
        x = np.random.default_rng(5).standard_normal(100000).astype(np.float32) * 3
        x[:4] = [1.00390625, 1.01171875, -1.00390625, 3.0078125]      # exact ties
        tb = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
        assert np.array_equal(tb, bf16_bits(x)), "bf16 rounding differs from torch"
        print("bf16 rounding: identical to torch's")
    done = []
    for name in names:
        print(f"== {name}")
        try:
            done.append(make_one(name, out, a.numpy_only))
        except BaseException as e:  # noqa: BLE001  (one device run: keep going with the others)
            import traceback
            traceback.print_exc()
            done.append(dict(name=name, error=f"{type(e).__name__}: {e}"))
    print("summary:")
    for r in done:
        if "error" in r:
            print(f"  {r['name']:9s} FAILED: {r['error']}")
            continue
        st = "n/a" if r["agree"] is None else ("HF == NumPy" if r["agree"] else "HF != NumPy (see WARNING)")
        print(f"  {r['name']:9s} seed {r['seed']}  min_margin {r['margin']:.4g}  {r['size']} B  {st}")


if __name__ == "__main__":
    sys.exit(main())
