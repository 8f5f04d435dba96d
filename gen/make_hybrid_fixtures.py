#!/usr/bin/env python3
"""make_hybrid_fixtures.py — tiny random-weight hybrid Gated DeltaNet models (Qwen3-Next,
Qwen3.5-MoE, dense Qwen3.5) + transformers reference outputs.

Writes, for each fixture NAME in {qwen3next, qwen35moe, qwen35}:
    test/fixtures/NAME/            a Hugging Face model directory as transformers' save_pretrained
                                   writes it (config.json + model.safetensors, float32); the
                                   Qwen3.5 ones are the multimodal *ForConditionalGeneration
                                   checkpoints with a tiny vision tower (model.visual.*), the text
                                   model under model.language_model.
    test/fixtures/NAME.ref         reference logits and a greedy continuation (the .ref format of
                                   gen/make_fixtures.py)

Run where PyTorch + transformers (>= 5 with qwen3_next, qwen3_5_moe, qwen3_5) live, on the
CPU in float32:
    PYTHONUNBUFFERED=1 python3 gen/make_hybrid_fixtures.py [--out DIR]

HOW A FIXTURE IS MADE
 1. The transformers model is built from a tiny config (>= 3 Gated DeltaNet layers and >= 1
    gated full-attention layer: 5 layers, full_attention_interval 4 -> layer 3 full), then EVERY
    parameter is overwritten with seeded random values by name: 1+w norms get w = 0.3·N(0,1)
    (so a missing "+1" shows), the plain gated DeltaNet norm 1 + 0.3·N(0,1), A_log = log U(0.3,4),
    dt_bias N(0, 0.5), matrices N(0,1)/sqrt(fan_in), the router ×2 (routing far from uniform).
    nv = 2·nk linear value heads, so the grouped value-head order matters.
 2. The model runs in float32 on a fixed sequence of N_TOKENS random tokens without a cache
    (prefill: HF's chunked delta rule, chunk 64, so 2 chunks) -> logits for every position; then
    greedy decoding with the cache (token-by-token recurrence) of N_GREEDY tokens after the first
    N_PROMPT tokens; the same greedy tokens must come out of one cache-free forward.
 3. Seeds are searched until the greedy continuation is robust (smallest top-1 minus top-2 gap
    >= MIN_MARGIN) and every router decision (k-th vs (k+1)-th logit) is >= MIN_ROUTER_GAP apart.
"""
import argparse
import json
import os
import struct
import sys
import time

import numpy as np
import torch

REF_MAGIC = 0x4645524D
REF_VERSION = 1
N_TOKENS = 128
N_PROMPT = 100
N_GREEDY = 32
MIN_MARGIN = 5e-3
MIN_ROUTER_GAP = 1e-4

TEXT = dict(vocab_size=256, hidden_size=64, num_hidden_layers=5, num_attention_heads=4,
            num_key_value_heads=2, head_dim=32, linear_conv_kernel_dim=4, linear_key_head_dim=16,
            linear_value_head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4,
            rms_norm_eps=1e-6, max_position_embeddings=4096, tie_word_embeddings=False,
            hidden_act="silu", attention_bias=False)
MOE = dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
           shared_expert_intermediate_size=48)
LAYER_TYPES = ["linear_attention", "linear_attention", "linear_attention", "full_attention",
               "linear_attention"]

FIXTURES = [
    dict(name="qwen3next", seed=11000, theta=10000.0),
    dict(name="qwen35moe", seed=12000, theta=100000.0),
    dict(name="qwen35", seed=13000, theta=100000.0),
]


def build(name, theta, text_only=False):
    import transformers as tf
    rope = {"rope_type": "default", "rope_theta": theta, "partial_rotary_factor": 0.25}
    if name == "qwen3next":
        kw = dict(TEXT, **MOE, intermediate_size=96, norm_topk_prob=True, decoder_sparse_step=1,
                  mlp_only_layers=[], layer_types=LAYER_TYPES, rope_parameters=rope)
        cfg = tf.Qwen3NextConfig(**kw)
        return tf.Qwen3NextForCausalLM(cfg), "Qwen3NextForCausalLM"
    rope = dict(rope, mrope_section=[2, 1, 1], mrope_interleaved=True)
    text = dict(TEXT, layer_types=LAYER_TYPES, rope_parameters=rope)
    if name == "qwen35moe":
        text.update(MOE)
        cg, tc, cc, cl = "Qwen3_5MoeConfig", "Qwen3_5MoeTextConfig", "Qwen3_5MoeForConditionalGeneration", "Qwen3_5MoeForCausalLM"
    else:
        text.update(intermediate_size=96)
        cg, tc, cc, cl = "Qwen3_5Config", "Qwen3_5TextConfig", "Qwen3_5ForConditionalGeneration", "Qwen3_5ForCausalLM"
    vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                  patch_size=16, num_position_embeddings=16)
    try:
        if text_only:
            raise RuntimeError("text model asked for")
        cfg = getattr(tf, cg)(text_config=text, vision_config=vision)
        return getattr(tf, cc)(cfg), cc
    except Exception as e:  # keep going with the text model alone
        print(f"  could not build {cc} ({type(e).__name__}: {e}); using {cl}")
        cfg = getattr(tf, tc)(**text)
        return getattr(tf, cl)(cfg), cl


def randomize(model, seed):
    g = torch.Generator().manual_seed(seed)
    n = lambda shape, s: torch.randn(shape, generator=g, dtype=torch.float32) * s  # noqa: E731
    info = []
    with torch.no_grad():
        for name, p in model.named_parameters():
            shp = tuple(p.shape)
            if ".visual." in name or name.startswith("visual") or "model.visual" in name:
                v = n(shp, 0.02)
            elif name.endswith("A_log"):
                v = torch.log(torch.rand(shp, generator=g) * 3.7 + 0.3)
            elif name.endswith("dt_bias"):
                v = n(shp, 0.5)
            elif "conv1d" in name:
                v = n(shp, 0.5)
            elif name.endswith("linear_attn.norm.weight"):
                v = 1.0 + n(shp, 0.3)
            elif "norm" in name and len(shp) == 1:
                v = n(shp, 0.3)                              # (1 + w) norms
            elif "embed_tokens" in name:
                v = n(shp, 1.0)
            elif name.endswith("lm_head.weight"):
                v = n(shp, 2.0 / np.sqrt(shp[-1]))
            elif name.endswith("mlp.gate.weight"):
                v = n(shp, 2.0 / np.sqrt(shp[-1]))
            elif len(shp) >= 2:
                v = n(shp, 1.0 / np.sqrt(shp[-1]))
            else:
                v = n(shp, 0.3)
            p.copy_(v)
            info.append(f"{name} {shp}")
    return info


class RouterGaps:
    """forward hooks on every router (mlp.gate): smallest k-th vs (k+1)-th logit gap"""

    def __init__(self, model, k, n_expert):
        self.k, self.E, self.gap, self.hooks = k, n_expert, float("inf"), []
        for name, mod in model.named_modules():
            if name.endswith("mlp.gate"):
                self.hooks.append(mod.register_forward_hook(self.hook))

    def hook(self, mod, inp, out):
        ts = out if isinstance(out, (tuple, list)) else (out,)
        for t in ts:
            if torch.is_tensor(t) and t.dim() >= 1 and t.shape[-1] == self.E and t.is_floating_point():
                x = t.detach().float().reshape(-1, self.E)
                if (x >= 0).all() and (x <= 1).all() and torch.allclose(x.sum(-1), torch.ones(x.shape[0]), atol=1e-4):
                    x = torch.log(x.clamp_min(1e-30))      # probabilities: compare log-probs
                s = torch.sort(x, dim=-1, descending=True).values
                self.gap = min(self.gap, float((s[:, self.k - 1] - s[:, self.k]).min()))
                return


def hf_run(model, tokens):
    with torch.no_grad():
        ids = torch.tensor([list(tokens)], dtype=torch.long)
        out = model(input_ids=ids, use_cache=False, output_hidden_states=True)
        logits = out.logits[0].float().numpy()
        hs = out.hidden_states
        hidden = np.stack([h[0].float().numpy() for h in hs]) if hs is not None else np.zeros((0,))
        out = model(input_ids=ids[:, :N_PROMPT], use_cache=True)
        past, last = out.past_key_values, out.logits[0, -1].float()
        pre = out.logits[0].float().numpy()
        greedy, margins = [], []
        for _ in range(N_GREEDY):
            top = torch.topk(last, 2)
            margins.append(float(top.values[0] - top.values[1]))
            tok = int(top.indices[0])
            greedy.append(tok)
            out = model(input_ids=torch.tensor([[tok]]), past_key_values=past, use_cache=True)
            past, last = out.past_key_values, out.logits[0, -1].float()
        seq = torch.tensor([list(tokens[:N_PROMPT]) + greedy], dtype=torch.long)
        full = model(input_ids=seq, use_cache=False).logits[0].float()
        nocache = [int(t) for t in torch.argmax(full[N_PROMPT - 1:-1], dim=-1)]
        # decode path (token-by-token recurrence) vs chunked prefill on the same tokens
        rng = logits[:N_PROMPT].max(1) - logits[:N_PROMPT].min(1)
        pre_diff = float((np.abs(pre - logits[:N_PROMPT]).max(1) / rng).max())
    return logits, greedy, min(margins), nocache == greedy, hidden, pre_diff


def write_ref(path, tokens, logits, n_prompt, greedy, min_margin):
    tokens = np.asarray(tokens, dtype="<i4")
    logits = np.asarray(logits, dtype="<f4")
    greedy = np.asarray(greedy, dtype="<i4")
    with open(path, "wb") as f:
        f.write(struct.pack("<IIii", REF_MAGIC, REF_VERSION, logits.shape[1], tokens.size))
        f.write(tokens.tobytes())
        f.write(logits.tobytes())
        f.write(struct.pack("<ii", n_prompt, greedy.size))
        f.write(greedy.tobytes())
        f.write(struct.pack("<f", min_margin))


def make_one(fx, out_dir, dbg_dir, text_only=False, max_tries=10):
    for attempt in range(max_tries):
        seed = fx["seed"] + attempt
        torch.manual_seed(seed)
        model, cls = build(fx["name"], fx["theta"], text_only)
        model = model.float().eval()
        try:
            model.set_attn_implementation("eager")
        except Exception:
            pass
        params = randomize(model, seed)
        rng = np.random.default_rng(seed + 7777)
        tokens = rng.integers(0, TEXT["vocab_size"], N_TOKENS).tolist()
        rg = RouterGaps(model, MOE["num_experts_per_tok"], MOE["num_experts"]) if fx["name"] != "qwen35" else None
        t0 = time.time()
        logits, greedy, margin, cache_ok, hidden, pre_diff = hf_run(model, tokens)
        gap = rg.gap if rg else float("inf")
        print(f"  seed {seed} ({cls}): {time.time() - t0:.1f}s, greedy margin {margin:.4g}, router gap {gap:.3g}, "
              f"cache == no-cache greedy: {cache_ok}, prefill-with-cache vs no-cache logits {pre_diff:.2e}")
        if margin < MIN_MARGIN or gap < MIN_ROUTER_GAP or not cache_ok:
            print("  -> too close to a tie (or cache mismatch), next seed")
            continue
        if not np.all(np.isfinite(logits)):
            raise SystemExit("non-finite logits")
        d = os.path.join(out_dir, fx["name"])
        model.save_pretrained(d, safe_serialization=True)
        write_ref(os.path.join(out_dir, fx["name"] + ".ref"), tokens, logits, N_PROMPT, greedy, margin)
        hidden.astype("<f4").tofile(os.path.join(dbg_dir, fx["name"] + "_hidden.f32"))
        with open(os.path.join(dbg_dir, fx["name"] + "_params.txt"), "w") as f:
            f.write("\n".join(params) + f"\nhidden shape {hidden.shape}\n")
        lr = logits.max(axis=1) - logits.min(axis=1)
        print(f"  wrote {d}/ ({sorted(os.listdir(d))}) and {fx['name']}.ref: seed {seed}, min_margin {margin:.4g}, "
              f"logit row range {lr.min():.2f}..{lr.max():.2f}, greedy {greedy[:8]}...")
        return dict(name=fx["name"], seed=seed, margin=margin, cls=cls)
    raise SystemExit(f"{fx['name']}: no seed gave a robust greedy continuation")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None, help="output directory (default test/fixtures)")
    ap.add_argument("--debug", default=None, help="directory for hidden states (default: --out)")
    ap.add_argument("--only", help="comma-separated fixture names")
    a = ap.parse_args()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out_dir = a.out or os.path.join(root, "test", "fixtures")
    dbg_dir = a.debug or out_dir
    os.makedirs(out_dir, exist_ok=True)
    os.makedirs(dbg_dir, exist_ok=True)
    import transformers
    torch.set_num_threads(min(8, torch.get_num_threads()))
    print(f"numpy {np.__version__}, torch {torch.__version__}, transformers {transformers.__version__}, "
          f"{torch.get_num_threads()} CPU threads (float32 on the CPU)")
    for c in ("Qwen3NextForCausalLM", "Qwen3_5MoeForConditionalGeneration", "Qwen3_5ForConditionalGeneration"):
        print(f"  {c}: {'yes' if hasattr(transformers, c) else 'MISSING'}")
    done = []
    for fx in FIXTURES:
        if a.only and fx["name"] not in a.only.split(","):
            continue
        print(f"== {fx['name']}")
        try:
            done.append(make_one(fx, out_dir, dbg_dir))
        except SystemExit as e:
            print(f"  FAILED: {e}")
        except Exception as e:
            import traceback
            traceback.print_exc()
            print(f"  FAILED: {type(e).__name__}: {e}")
            if fx["name"] != "qwen3next":
                print("  retrying with the text-only model")
                try:
                    done.append(make_one(fx, out_dir, dbg_dir, text_only=True))
                except Exception as e2:
                    traceback.print_exc()
                    print(f"  FAILED again: {type(e2).__name__}: {e2}")
    print("summary:")
    for r in done:
        print(f"  {r['name']:10s} seed {r['seed']}  min_margin {r['margin']:.4g}  {r['cls']}")


if __name__ == "__main__":
    main()
