#!/usr/bin/env python3
"""train_tiny_moe.py — train the small Qwen3-MoE model that moe bundles as its default model.

Runs on the GPU machine (PyTorch 2.11, transformers 5.17, tokenizers 0.23, safetensors, numpy):
    sh gen/prepare_corpus.sh                       # here, once: writes .cache/corpus/ (git-ignored)
    device run, carry [".cache/corpus"]:
    PYTHONUNBUFFERED=1 python3 gen/train_tiny_moe.py --out /tmp/tiny_moe [--smoke]
--smoke runs every stage with a few dozen training steps (to test the script, not for use).

WHAT IT DOES
 1. Tokenizer: a byte-level BPE trained with HF `tokenizers` on the training split only.
    Its tokenizer.json has the same structure as Qwen2/Qwen3's, so the engine that reads those reads
    this one: normalizer NFC; pre_tokenizer Sequence[Split(Qwen's regex, Isolated),
    ByteLevel(add_prefix_space=false, use_regex=false)]; BPE model (no unk, no byte fallback, no
    continuing-subword prefix, merges as pairs); post_processor and decoder ByteLevel.
    Vocabulary 4096: ids 0..4094 are BPE tokens (the 256 byte symbols are all in it, so any input
    encodes), id 4095 is the special token <|endoftext|> (BOS = EOS = PAD).  Nothing is added on
    encode (no BOS): the model never saw a BOS at the start of a window.
 2. Data: the King James Bible from gen/prepare_corpus.sh (one verse a line, no references;
    chapters c % 50 == 49 are the held-out test split, c % 50 == 24 the validation split).
    Training stream: each book of kjv_train.txt encoded on its own (verses joined by "\\n", a
    trailing "\\n"), <|endoftext|> after each book.  Batches are 64 windows of 256 tokens at
    uniformly random offsets.
 3. Model: Qwen3MoeForCausalLM from scratch, CONFIG below: 4 layers, hidden 256, 4 heads x 64
    (q dim 256), 2 KV heads, 8 experts top-2 with norm_topk_prob, moe_intermediate 256, untied
    LM head, rope theta 10000, RMSNorm eps 1e-6.  9,186,048 parameters (4,467,456 active per token).
    Training: bf16 autocast, fp32 master weights, AdamW (0.9, 0.95), weight decay 0.1 on matrices,
    linear warm-up then cosine to 10% of the peak LR, gradient clip 1.0, router auxiliary
    (load-balancing) loss with coefficient 0.01 from the router logits (output_router_logits=True),
    dropout added with forward hooks on the embedding, attention and MoE outputs (training only:
    it changes nothing in the saved model, which is a plain Qwen3-MoE).
    The aux loss is transformers' load_balancing_loss_func (Switch style: E * sum_e f_e * P_e, f
    summed over the top-k slots, so 2.0 when balanced) applied to EACH LAYER and averaged over the
    layers: transformers' own concatenates all layers' router logits first, which only balances
    the experts summed over layers (a first run with it left single experts in some layers at
    0.04% of the load).  So the model is called without labels and the loss is
    CE(next token) + 0.01 * mean_layers(aux).
    The corpus is small (~1 M tokens), so the limit is over-fitting, not compute (a first run
    reached its best validation loss after ~12 epochs, then got worse): a short sweep over
    (epochs, dropout) (SWEEP, each run a full cosine schedule, all within TRAIN_SECONDS of wall
    time) is trained, and the state with the lowest validation loss wins.
    The shipped weights (gen/tiny_moe/) come from run 0 of SWEEP = [(20, 0.3), (28, 0.4)]: that
    run was cut from 1178 to 973 steps (16.5 epochs; its cosine completed) because the script then
    timed the first 20 steps, CUDA warm-up included; it now times steps 10..30.
 4. Evaluation and the files a C test checks (tiny_moe_eval.json), see PERPLEXITY below.
 5. Saved: a Hugging Face directory (config.json, model.safetensors float32, tokenizer.json,
    tokenizer_config.json, generation_config.json), the loss curve (tiny_moe_loss.csv), the eval
    JSON and this script's log.

PERPLEXITY (the exact procedure; the C test replicates it with logits_all)
    ids  = tokenizer.encode(kjv_test.txt as one string, add_special_tokens=False)[:4096]
           (the file's bytes exactly, every line ending in "\\n"; the ids are in the JSON)
    the 4096 ids are cut into 16 non-overlapping windows of 256: window w = ids[256w : 256w+256]
    each window is run alone from position 0 (positions 0..255, empty KV cache, no BOS)
    NLL_w = - sum_{t=0..254} log softmax(logits_w[t])[ window_w[t+1] ]   (255 predictions)
    ppl   = exp( sum_w NLL_w / (16 * 255) )
    computed in float32 (no autocast, TF32 off) for (a) the trained float32 weights and (b) the
    weights as shipped: every 2-D/3-D weight (embedding, LM head, q/k/v/o, router, experts) is
    quantized to Q8_0 with gen/quants.py and dequantized (1-D norm weights stay float32), then run
    in float32.  Also reported: the same with the router (mlp.gate) kept float32, with every
    matrix Q4_K, and the float32/Q8_0 figures over all full windows of the test split.

HF DIRECTORY LAYOUT (what our converter reads)
    In memory, transformers 5.17 holds the experts FUSED (seen on the GPU machine, torch 2.11):
        model.layers.N.mlp.experts.gate_up_proj   [E, 2*I, H] = [8, 512, 256]   rows 0..I-1 = gate_proj
                                                   of expert e, rows I..2I-1 = up_proj (y = x @ W[e].T)
        model.layers.N.mlp.experts.down_proj      [E, H, I]   = [8, 256, 256]   (not transposed)
        model.layers.N.mlp.gate.weight            [E, H]       the router (a Parameter named weight)
    (detect_layout() proves this numerically against the experts module on every run and the eval
    JSON records it under layout.fused_in_transformers.)  transformers 5.17's own save_pretrained
    un-fuses on save: it writes the original per-expert names below (recorded under
    layout.transformers_save_pretrained_keys).  This script does not rely on that: it writes
    model.safetensors itself (safetensors save_file, metadata {"format": "pt"}, one file) in the
    ORIGINAL Qwen3-MoE checkpoint layout (the Qwen3-30B-A3B format, ARCHITECTURES.md §1.3), one
    2-D tensor per expert (135 tensors):
        model.embed_tokens.weight                       [4096, 256]
        model.layers.N.input_layernorm.weight           [256]
        model.layers.N.self_attn.q_proj.weight          [256, 256]
        model.layers.N.self_attn.k_proj.weight          [128, 256]
        model.layers.N.self_attn.v_proj.weight          [128, 256]
        model.layers.N.self_attn.o_proj.weight          [256, 256]
        model.layers.N.self_attn.q_norm.weight          [64]
        model.layers.N.self_attn.k_norm.weight          [64]
        model.layers.N.post_attention_layernorm.weight  [256]
        model.layers.N.mlp.gate.weight                  [8, 256]      router
        model.layers.N.mlp.experts.E.gate_proj.weight   [256, 256]    E = 0..7
        model.layers.N.mlp.experts.E.up_proj.weight     [256, 256]
        model.layers.N.mlp.experts.E.down_proj.weight   [256, 256]
        model.norm.weight                               [256]
        lm_head.weight                                  [4096, 256]
    all float32, [out, in]; N = 0..3.  transformers loads this directory with from_pretrained
    (it fuses the experts itself); the script proves it by reloading the directory and checking
    that the logits equal the trained model's bit for bit (max |diff| 0.0).  config.json: what
    transformers 5 writes (rope_parameters {rope_type default, rope_theta}, num_local_experts, dtype)
    plus, for readers of the original Qwen3 configs, rope_theta and num_experts at the top level
    and torch_dtype; no "_"-private keys.
"""
import argparse
import copy
import csv
import hashlib
import json
import math
import os
import re
import shutil
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import quants  # noqa: E402  (gen/quants.py: ggml-exact Q8_0/Q4_K codecs)

# ---------------------------------------------------------------------------------------------
# settings
# ---------------------------------------------------------------------------------------------
VOCAB = 4096                      # 4095 BPE tokens + <|endoftext|>
EOT = "<|endoftext|>"
QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+")

CONFIG = dict(
    vocab_size=VOCAB, hidden_size=256, num_hidden_layers=4,
    num_attention_heads=4, num_key_value_heads=2, head_dim=64,
    num_experts=8, num_experts_per_tok=2, norm_topk_prob=True, moe_intermediate_size=256,
    intermediate_size=1024,        # the dense-MLP size; unused (every layer is MoE)
    decoder_sparse_step=1, mlp_only_layers=[], hidden_act="silu",
    rms_norm_eps=1e-6, max_position_embeddings=512, tie_word_embeddings=False,
    attention_bias=False, attention_dropout=0.0, use_sliding_window=False,
    initializer_range=0.02, bos_token_id=VOCAB - 1, eos_token_id=VOCAB - 1,
    router_aux_loss_coef=0.01, use_cache=True,
)
ROPE_THETA = 10000.0

SEQ = 256                 # training window and eval window
BATCH = 64
PEAK_LR = 1.5e-3
MIN_LR_FRAC = 0.1
WARMUP = 100
WEIGHT_DECAY = 0.1
GRAD_CLIP = 1.0
AUX_COEF = 0.01
SWEEP = [(20, 0.3), (28, 0.4)]              # (epochs, dropout) per run; a run that would not fit
TRAIN_SECONDS = 240                         # the time left is shortened (its cosine still completes)
LOG_EVERY = 25
EVAL_TOKENS = 4096                # the C-reproducible held-out slice
GREEDY_TOKENS = 48
# greedy prompts: the first 3 of these whose 48-token greedy continuation is the same for the float32
# and the Q8_0 weights and never has a top-1 vs top-2 logit gap under GREEDY_MIN_MARGIN (so another
# implementation's rounding cannot flip a token) are recorded; the others are listed as rejected.
# (If fewer than 3 pass, the best of the rest with identical f32/Q8_0 ids fill up, marked.)
PROMPTS = ["In the beginning God", "And it came to pass, when the king", "Blessed are the",
           "And God said,", "The LORD is my shepherd;", "And Jesus answered and said unto them,",
           "Now the serpent was", "For God so loved the world,", "And the children of Israel",
           "Then said Jesus unto", "Thus saith the LORD,", "And he said unto", "Praise ye the LORD.",
           "And the king said", "My son, hear", "Then Peter said unto"]
N_PROMPTS = 3
GREEDY_MIN_MARGIN = 0.02
SEED = 1234


def log(*a):
    print(*a, flush=True)


def dumps_compact(o, ind=0):
    """JSON with one key per line but lists of numbers/strings on one line (keeps the file small)."""
    sp = " " * ind
    if isinstance(o, dict) and o:
        return "{\n" + ",\n".join(f"{sp} {json.dumps(k)}: {dumps_compact(v, ind + 1)}" for k, v in o.items()) \
            + "\n" + sp + "}"
    if isinstance(o, list) and any(isinstance(x, (dict, list)) for x in o):
        return "[\n" + ",\n".join(sp + " " + dumps_compact(x, ind + 1) for x in o) + "\n" + sp + "]"
    return json.dumps(o)


def sha256_bytes(b):
    return hashlib.sha256(b).hexdigest()


# ---------------------------------------------------------------------------------------------
# corpus + tokenizer
# ---------------------------------------------------------------------------------------------
def read_corpus(d):
    def rd(name):
        with open(os.path.join(d, name), "rb") as f:
            return f.read().decode("ascii")
    train = rd("kjv_train.txt")
    books = [b if b.endswith("\n") else b + "\n" for b in train.split("\n\n")]
    return books, rd("kjv_valid.txt"), rd("kjv_test.txt")


def train_tokenizer(books):
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from tokenizers import processors, trainers
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    try:
        tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    except TypeError:
        tok.decoder = decoders.ByteLevel()
    try:
        tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False,
                                                  use_regex=False)
    except TypeError:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=VOCAB - 1, min_frequency=2, special_tokens=[],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(books, trainer=trainer)
    tok.add_special_tokens([AddedToken(EOT, special=True, normalized=False)])
    assert tok.get_vocab_size() == VOCAB, tok.get_vocab_size()
    assert tok.token_to_id(EOT) == VOCAB - 1
    return tok


def write_tokenizer_files(tok, d):
    tok.save(os.path.join(d, "tokenizer.json"))
    # normalise the JSON the way Qwen's file has it (pretty, stable key order from the library)
    cfg = {
        "add_bos_token": False, "add_prefix_space": False,
        "added_tokens_decoder": {str(VOCAB - 1): {"content": EOT, "lstrip": False, "normalized": False,
                                                  "rstrip": False, "single_word": False, "special": True}},
        "bos_token": EOT, "eos_token": EOT, "pad_token": EOT, "unk_token": None,
        "clean_up_tokenization_spaces": False, "errors": "replace", "model_max_length": 512,
        "split_special_tokens": False, "tokenizer_class": "PreTrainedTokenizerFast",
    }
    with open(os.path.join(d, "tokenizer_config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
        f.write("\n")


# ---------------------------------------------------------------------------------------------
# model
# ---------------------------------------------------------------------------------------------
def make_config(output_router_logits):
    import inspect
    from transformers import Qwen3MoeConfig
    kw = dict(CONFIG, output_router_logits=output_router_logits)
    if "rope_parameters" in inspect.signature(Qwen3MoeConfig.__init__).parameters:
        kw["rope_parameters"] = {"rope_type": "default", "rope_theta": ROPE_THETA}
    else:
        kw["rope_theta"] = ROPE_THETA
    cfg = Qwen3MoeConfig(**kw)
    set_impl(cfg)
    return cfg


def set_impl(cfg):
    """Eager experts (exact, any dtype) and SDPA attention."""
    for attr, val in (("_experts_implementation", "eager"), ("_attn_implementation", "sdpa")):
        try:
            setattr(cfg, attr, val)
        except Exception as e:  # noqa: BLE001
            log(f"  (could not set {attr}: {e})")


def check_rope(model):
    import torch
    hd = CONFIG["head_dim"]
    want = 1.0 / ROPE_THETA ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    n = 0
    for name, buf in model.named_buffers():
        if name.endswith("inv_freq"):
            n += 1
            assert torch.allclose(buf.double().cpu(), want, rtol=1e-6), f"{name}: rope theta is not {ROPE_THETA}"
    assert n > 0, "no inv_freq buffer"


def init_weights(model, seed):
    """Our own init (does not depend on transformers' _init_weights): N(0, 0.02) for matrices,
    residual-output matrices scaled by 1/sqrt(2L), norms 1."""
    import torch
    g = torch.Generator().manual_seed(seed)
    L = CONFIG["num_hidden_layers"]
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                std = 0.02 / math.sqrt(2 * L) if ("o_proj" in name or "down_proj" in name) else 0.02
                p.copy_(torch.randn(p.shape, generator=g) * std)
            else:
                p.fill_(1.0)


def add_dropout_hooks(model, p):
    import torch.nn.functional as F

    def hook(mod, inp, out):
        if not mod.training:
            return out
        if isinstance(out, tuple):
            return (F.dropout(out[0], p, True),) + tuple(out[1:])
        return F.dropout(out, p, True)
    hs = [model.model.embed_tokens.register_forward_hook(hook)]
    for layer in model.model.layers:
        hs.append(layer.self_attn.register_forward_hook(hook))
        hs.append(layer.mlp.register_forward_hook(hook))
    return hs


# ---------------------------------------------------------------------------------------------
# expert layout: transformers' fused parameters <-> the original per-expert checkpoint names
# ---------------------------------------------------------------------------------------------
EXP_RE = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(gate_up_proj|down_proj)$")


def detect_layout(model):
    """Find, numerically, how the experts module stores expert e's gate/up/down [out, in] matrices.
    Returns a dict (None if the experts are per-expert nn.Linear modules already)."""
    import torch
    import torch.nn.functional as F
    ex = model.model.layers[0].mlp.experts
    if not hasattr(ex, "gate_up_proj"):
        return None
    H, I = CONFIG["hidden_size"], CONFIG["moe_intermediate_size"]
    gu, dn = ex.gate_up_proj.detach().float(), ex.down_proj.detach().float()
    E = gu.shape[0]
    dev = gu.device
    x = torch.randn(5, H, generator=torch.Generator().manual_seed(7)).to(dev)
    cands = []
    for gu_t in (False, True):
        for order in ("gate_first", "up_first", "interleaved"):
            for dn_t in (False, True):
                cands.append(dict(gate_up_transposed=gu_t, gate_up_order=order, down_transposed=dn_t))
    found = None
    with torch.no_grad():
        for e in (0, E - 1):
            idx = torch.full((5, 1), e, dtype=torch.long, device=dev)
            w = torch.ones(5, 1, dtype=torch.float32, device=dev)
            try:
                ref = ex(x, idx, w).float()
            except Exception as err:  # noqa: BLE001
                log(f"  experts(x, index, weight) failed ({err!r}); trying experts(x, weight, index)")
                ref = ex(x, w, idx).float()
            ok = []
            for c in cands:
                try:
                    g, u, d = split_expert(gu[e], dn[e], c, H, I)
                except AssertionError:
                    continue
                y = F.linear(F.silu(F.linear(x, g)) * F.linear(x, u), d)
                if torch.allclose(y, ref, rtol=1e-4, atol=1e-6):
                    ok.append(c)
            found = ok if found is None else [c for c in found if c in ok]
    if not found:
        raise SystemExit("could not identify the fused expert layout")
    c = found[0]
    c["gate_up_proj_shape"] = list(gu.shape)
    c["down_proj_shape"] = list(dn.shape)
    c["is_transposed_attr"] = getattr(ex, "is_transposed", None)
    c["candidates_matching"] = len(found)
    return c


def split_expert(gu, dn, c, H, I):
    """One expert's fused slices -> (gate [I,H], up [I,H], down [H,I])."""
    w = gu.t() if c["gate_up_transposed"] else gu
    assert tuple(w.shape) == (2 * I, H)
    if c["gate_up_order"] == "gate_first":
        g, u = w[:I], w[I:]
    elif c["gate_up_order"] == "up_first":
        u, g = w[:I], w[I:]
    else:
        g, u = w[0::2], w[1::2]
    d = dn.t() if c["down_transposed"] else dn
    assert tuple(d.shape) == (H, I)
    return g.contiguous(), u.contiguous(), d.contiguous()


def join_experts(gs, us, ds, c):
    import torch
    out_gu, out_d = [], []
    for g, u, d in zip(gs, us, ds):
        if c["gate_up_order"] == "gate_first":
            w = torch.cat([g, u], 0)
        elif c["gate_up_order"] == "up_first":
            w = torch.cat([u, g], 0)
        else:
            w = torch.stack([g, u], 1).reshape(-1, g.shape[1])
        out_gu.append(w.t() if c["gate_up_transposed"] else w)
        out_d.append(d.t() if c["down_transposed"] else d)
    return torch.stack(out_gu).contiguous(), torch.stack(out_d).contiguous()


def to_canonical(model_sd, layout):
    """transformers state dict -> original Qwen3-MoE names (float32, CPU, contiguous)."""
    I = CONFIG["moe_intermediate_size"]
    out = {}
    for k, v in model_sd.items():
        v = v.detach().float().cpu()
        m = EXP_RE.match(k)
        if m and layout is not None:
            prefix, kind = m.groups()
            for e in range(v.shape[0]):
                if kind == "gate_up_proj":
                    w = v[e].t() if layout["gate_up_transposed"] else v[e]
                    if layout["gate_up_order"] == "gate_first":
                        g, u = w[:I], w[I:]
                    elif layout["gate_up_order"] == "up_first":
                        u, g = w[:I], w[I:]
                    else:
                        g, u = w[0::2], w[1::2]
                    out[f"{prefix}.{e}.gate_proj.weight"] = g.contiguous()
                    out[f"{prefix}.{e}.up_proj.weight"] = u.contiguous()
                else:
                    d = v[e].t() if layout["down_transposed"] else v[e]
                    out[f"{prefix}.{e}.down_proj.weight"] = d.contiguous()
        else:
            out[k] = v.contiguous()
    return dict(sorted(out.items(), key=lambda kv: canonical_order(kv[0])))


def canonical_order(k):
    m = re.match(r"model\.layers\.(\d+)\.(.*)", k)
    if k.startswith("model.embed_tokens"):
        return (0, 0, k)
    if m:
        rest = m.group(2)
        e = re.match(r"mlp\.experts\.(\d+)\.(.*)", rest)
        if e:
            return (1, int(m.group(1)), f"mlp.experts.{int(e.group(1)):04d}.{e.group(2)}")
        return (1, int(m.group(1)), rest)
    return (2, 0, k)


def from_canonical(csd, model_sd_keys, layout):
    """original names -> the transformers state dict (inverse of to_canonical)."""
    out = {}
    for k in model_sd_keys:
        m = EXP_RE.match(k)
        if m and layout is not None:
            prefix, kind = m.groups()
            E = CONFIG["num_experts"]
            gs = [csd[f"{prefix}.{e}.gate_proj.weight"] for e in range(E)]
            us = [csd[f"{prefix}.{e}.up_proj.weight"] for e in range(E)]
            ds = [csd[f"{prefix}.{e}.down_proj.weight"] for e in range(E)]
            gu, dn = join_experts(gs, us, ds, layout)
            out[k] = gu if kind == "gate_up_proj" else dn
        else:
            out[k] = csd[k]
    return out


# ---------------------------------------------------------------------------------------------
# quantization as shipped (gen/quants.py, ggml-exact)
# ---------------------------------------------------------------------------------------------
def quantize_canonical(csd, qtype, keep_f32=()):
    """Every 2-D tensor (all matrices are 2-D in the canonical layout; rows along the input dim,
    which is the GGUF row) -> quantize + dequantize; 1-D stays float32."""
    import torch
    out, names = {}, []
    for k, v in csd.items():
        if v.dim() >= 2 and not any(s in k for s in keep_f32):
            a = v.numpy().astype(np.float32)
            deq = quants.roundtrip(a, qtype)
            out[k] = torch.from_numpy(np.ascontiguousarray(deq))
            names.append(k)
        else:
            out[k] = v.clone()
    return out, names


# ---------------------------------------------------------------------------------------------
# evaluation
# ---------------------------------------------------------------------------------------------
def window_nll(model, ids, T=SEQ, bs=32, dev="cuda", autocast=False):
    """The PERPLEXITY procedure above on `ids` (all full windows). Returns (ppl, per-window NLL sums)."""
    import torch
    import torch.nn.functional as F
    n = len(ids) // T
    x = torch.tensor(ids[: n * T], dtype=torch.long, device=dev).view(n, T)
    sums = []
    model.eval()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        for i in range(0, n, bs):
            xb = x[i:i + bs]
            logits = model(input_ids=xb, use_cache=False).logits.float()
            lp = F.log_softmax(logits[:, :-1], dim=-1)
            nll = -lp.gather(-1, xb[:, 1:, None]).squeeze(-1)
            sums.append(nll.double().sum(1))
    s = torch.cat(sums)
    return math.exp(float(s.sum()) / (n * (T - 1))), [float(v) for v in s.cpu()]


def greedy(model, tok, prompt, n, dev="cuda"):
    import torch
    ids = tok.encode(prompt, add_special_tokens=False).ids
    seq = list(ids)
    gen, margins = [], []
    model.eval()
    with torch.no_grad():
        for _ in range(n):
            logits = model(input_ids=torch.tensor([seq], device=dev), use_cache=False).logits[0, -1].float()
            top = torch.topk(logits, 2)
            t = int(top.indices[0])
            margins.append(round(float(top.values[0] - top.values[1]), 5))
            gen.append(t)
            seq.append(t)
    return {"prompt": prompt, "prompt_ids": ids, "ids": gen,
            "text": tok.decode(gen, skip_special_tokens=False),
            "full_text": tok.decode(ids + gen, skip_special_tokens=False),
            "min_margin": min(margins), "margins": margins}


def expert_load(model, ids, dev="cuda"):
    """Fraction of top-k slots each expert gets per layer on the given windows."""
    import torch
    n = len(ids) // SEQ
    x = torch.tensor(ids[: n * SEQ], dtype=torch.long, device=dev).view(n, SEQ)
    E, k = CONFIG["num_experts"], CONFIG["num_experts_per_tok"]
    model.eval()
    with torch.no_grad():
        out = model(input_ids=x, use_cache=False, output_router_logits=True)
    loads = []
    for rl in out.router_logits:
        sel = torch.topk(rl.float().view(-1, E), k, dim=-1).indices
        cnt = torch.bincount(sel.reshape(-1), minlength=E).double()
        loads.append([round(float(c), 4) for c in cnt / cnt.sum()])
    return loads


# ---------------------------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------------------------
def lr_at(step, total):
    if step < WARMUP:
        return PEAK_LR * (step + 1) / WARMUP
    p = min(1.0, (step - WARMUP) / max(1, total - WARMUP))
    return PEAK_LR * (MIN_LR_FRAC + (1 - MIN_LR_FRAC) * 0.5 * (1 + math.cos(math.pi * p)))


def balance_loss(router_logits, E, k):
    """transformers' load_balancing_loss_func, per layer, averaged over layers."""
    import torch
    import torch.nn.functional as F
    tot = 0.0
    for rl in router_logits:
        p = F.softmax(rl.float().view(-1, E), dim=-1)
        sel = torch.topk(p, k, dim=-1).indices
        f = F.one_hot(sel, E).float().mean(0)          # [k, E]: fraction of tokens per slot/expert
        tot = tot + E * (f * p.mean(0)[None]).sum()
    return tot / len(router_logits)


def train_one(run, epochs, dropout, train_ids, valid_ids, deadline, writer, smoke):
    import torch
    import torch.nn.functional as F
    from transformers import Qwen3MoeForCausalLM
    torch.manual_seed(SEED + run)
    cfg = make_config(output_router_logits=True)
    model = Qwen3MoeForCausalLM(cfg).to("cuda").float()
    init_weights(model, SEED + run)
    check_rope(model)
    hooks = add_dropout_hooks(model, dropout)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": WEIGHT_DECAY},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=PEAK_LR, betas=(0.9, 0.95), eps=1e-8, fused=True)
    N = train_ids.numel()
    steps_per_epoch = N / (BATCH * SEQ)
    total = max(WARMUP + 10, int(round(epochs * steps_per_epoch)))
    if smoke:
        total = 30
    eval_every = max(20, int(steps_per_epoch)) if not smoke else 15
    g = torch.Generator(device="cuda").manual_seed(SEED + 100 + run)
    offs = torch.arange(SEQ, device="cuda")
    t0 = time.time()
    best = (float("inf"), None, -1)
    log(f"run {run}: {epochs} epochs, dropout {dropout} = {total} steps ({steps_per_epoch:.1f} steps/epoch), "
        f"time left {deadline - t0:.0f} s")
    step = 0
    last_val = None
    truncated = False
    while step < total:
        if step == 10:
            t10 = time.time()
        if step == 30 and not smoke:                        # fit the schedule into the time left
            per = (time.time() - t10) / 20 * 1.08           # (+8% for the validation passes)
            fit = step + int((deadline - time.time()) / per)
            if fit < total:
                log(f"  run {run}: {per * 1000:.1f} ms/step; shortening {total} -> {fit} steps to fit")
                total = max(fit, step + 1)
                truncated = True
        model.train()
        lr = lr_at(step, total)
        for grp in opt.param_groups:
            grp["lr"] = lr
        starts = torch.randint(0, N - SEQ, (BATCH,), device="cuda", generator=g)
        x = train_ids[starts[:, None] + offs]
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(input_ids=x, output_router_logits=True, use_cache=False)
        V = out.logits.shape[-1]
        ce_t = F.cross_entropy(out.logits[:, :-1].float().reshape(-1, V), x[:, 1:].reshape(-1))
        aux_t = balance_loss(out.router_logits, CONFIG["num_experts"], CONFIG["num_experts_per_tok"])
        loss = ce_t + AUX_COEF * aux_t
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        opt.step()
        step += 1
        is_eval = step % eval_every == 0 or step == total
        if step % LOG_EVERY == 0 or step == 1 or is_eval:
            aux, ce = float(aux_t.detach()), float(ce_t.detach())
            row = dict(run=run, run_epochs=epochs, dropout=dropout, step=step, epoch=round(step / steps_per_epoch, 3),
                       lr=f"{lr:.3e}", loss=round(float(loss.detach()), 5), ce=round(ce, 5), aux=round(aux, 5),
                       grad_norm=round(float(gn), 4), val_ce="", elapsed_s=round(time.time() - t0, 2))
            if is_eval:
                ppl, sums = window_nll(model, valid_ids, autocast=True)
                last_val = math.log(ppl)
                row["val_ce"] = round(last_val, 5)
                if last_val < best[0]:
                    best = (last_val, {k: v.detach().clone() for k, v in model.state_dict().items()}, step)
            writer.writerow(row)
            log("  " + " ".join(f"{k}={v}" for k, v in row.items() if k not in ("run_epochs", "dropout")))
        if time.time() > deadline + 30 and not smoke:
            log(f"  run {run}: past the deadline at step {step}; stopping")
            truncated = True
            break
    for h in hooks:
        h.remove()
    dt = time.time() - t0
    log(f"run {run} done: {step} steps in {dt:.1f} s ({dt / max(1, step) * 1000:.1f} ms/step, "
        f"{step * BATCH * SEQ / dt / 1e3:.0f} k tok/s); best val ce {best[0]:.4f} at step {best[2]}, "
        f"final {last_val:.4f}")
    return dict(run=run, epochs=epochs, dropout=dropout, steps=step, planned_steps=total, truncated=truncated,
                seconds=round(dt, 1), best_val_ce=best[0], best_step=best[2], final_val_ce=last_val,
                ms_per_step=round(dt / max(1, step) * 1000, 2)), best[1]


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------
def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--corpus", default=".cache/corpus")
    ap.add_argument("--out", required=True, help="output folder (HF dir goes to OUT/tiny-moe-kjv)")
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()

    import safetensors
    import tokenizers
    import torch
    import transformers
    from safetensors import safe_open
    from safetensors.torch import save_file
    from transformers import Qwen3MoeForCausalLM

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    T0 = time.time()
    versions = dict(torch=torch.__version__, transformers=transformers.__version__,
                    tokenizers=tokenizers.__version__, safetensors=safetensors.__version__,
                    numpy=np.__version__, gpu=torch.cuda.get_device_name(0))
    log("versions:", versions)
    os.makedirs(args.out, exist_ok=True)
    hf_dir = os.path.join(args.out, "tiny-moe-kjv")
    os.makedirs(hf_dir, exist_ok=True)

    # ---- data + tokenizer
    books, valid_text, test_text = read_corpus(args.corpus)
    corpus_sha = {n: sha256_bytes(open(os.path.join(args.corpus, n), "rb").read())
                  for n in ("kjv_train.txt", "kjv_valid.txt", "kjv_test.txt")}
    t = time.time()
    tok = train_tokenizer(books)
    write_tokenizer_files(tok, hf_dir)
    log(f"tokenizer: {tok.get_vocab_size()} tokens, trained in {time.time() - t:.1f} s")
    eot = tok.token_to_id(EOT)
    train_list = []
    for enc in tok.encode_batch(books, add_special_tokens=False):
        train_list.extend(enc.ids)
        train_list.append(eot)
    valid_ids = tok.encode(valid_text, add_special_tokens=False).ids
    test_ids = tok.encode(test_text, add_special_tokens=False).ids
    # the whole-file encoding must equal what the library gives for the same bytes decoded back
    assert tok.decode(test_ids) == test_text, "byte-level round trip failed"
    eval_ids = test_ids[:EVAL_TOKENS]
    assert len(eval_ids) == EVAL_TOKENS
    n_words = sum(len(b.split()) for b in books)
    log(f"tokens: train {len(train_list)} ({len(train_list) / n_words:.3f} per word), "
        f"valid {len(valid_ids)}, test {len(test_ids)}")
    train_ids = torch.tensor(train_list, dtype=torch.long, device="cuda")

    # ---- train (sweep over lengths, keep the best validation state)
    csv_path = os.path.join(args.out, "tiny_moe_loss.csv")
    fcsv = open(csv_path, "w", newline="")
    writer = csv.DictWriter(fcsv, fieldnames=["run", "run_epochs", "dropout", "step", "epoch", "lr", "loss", "ce", "aux",
                                              "grad_norm", "val_ce", "elapsed_s"])
    writer.writeheader()
    budget = 20 if args.smoke else TRAIN_SECONDS
    t_train = time.time()
    deadline = t_train + budget
    runs, best_sd, best = [], None, None
    sweep = [(0.2, 0.1), (0.2, 0.3)] if args.smoke else SWEEP
    for r, (ep, dr) in enumerate(sweep):
        left = deadline - time.time()
        if runs and not args.smoke:
            per = runs[-1]["ms_per_step"] / 1000 * 1.05
            if left / per < WARMUP + 150:
                log(f"skipping the {ep}-epoch run: {left:.0f} s left")
                break
        info, sd = train_one(r, ep, dr, train_ids, valid_ids, deadline, writer, args.smoke)
        fcsv.flush()
        runs.append(info)
        if sd is not None and (best is None or info["best_val_ce"] < best["best_val_ce"]):
            best, best_sd = info, sd
    fcsv.close()
    train_seconds = time.time() - t_train
    log(f"training: {train_seconds:.1f} s in {len(runs)} runs; chosen run {best['run']} "
        f"({best['epochs']} epochs, dropout {best['dropout']}) step {best['best_step']}, val ce {best['best_val_ce']:.4f}")

    # ---- the chosen model, float32, inference config
    cfg = make_config(output_router_logits=False)
    model = Qwen3MoeForCausalLM(cfg).to("cuda").float()
    model.load_state_dict(best_sd, strict=True)
    model.eval()
    check_rope(model)
    n_params = sum(p.numel() for p in model.parameters())
    H, I, E, K = (CONFIG[k] for k in ("hidden_size", "moe_intermediate_size", "num_experts", "num_experts_per_tok"))
    n_expert_params = CONFIG["num_hidden_layers"] * E * 3 * H * I
    n_active = n_params - n_expert_params * (E - K) // E
    log(f"parameters: {n_params} total, {n_active} active per token, {n_expert_params} in experts")
    msd = model.state_dict()
    log("model state dict (layer 0 and globals):")
    for k, v in msd.items():
        if ".layers." not in k or ".layers.0." in k:
            log(f"    {k} {list(v.shape)} {v.dtype}")

    # ---- layout facts
    layout = detect_layout(model)
    log(f"fused expert layout: {layout}")
    native_dir = os.path.join(args.out, "_native_save")
    native = {}
    try:
        model.save_pretrained(native_dir, safe_serialization=True)
        for fn in sorted(os.listdir(native_dir)):
            if fn.endswith(".safetensors"):
                with safe_open(os.path.join(native_dir, fn), "pt") as f:
                    for k in f.keys():
                        if ".layers." not in k or ".layers.0." in k:
                            native[k] = list(f.get_slice(k).get_shape())
        log("transformers save_pretrained writes (layer 0 and globals):")
        for k, s in native.items():
            log(f"    {k} {s}")
    except Exception as e:  # noqa: BLE001
        log(f"save_pretrained failed: {e!r}")
        native = {"error": repr(e)}
    native_per_expert = any(".experts.0.gate_proj" in k for k in native)

    # ---- write the HF directory in the original per-expert layout
    csd = to_canonical(msd, layout)
    save_file(csd, os.path.join(hf_dir, "model.safetensors"), metadata={"format": "pt"})
    model.config.save_pretrained(hf_dir)
    cpath = os.path.join(hf_dir, "config.json")
    with open(cpath) as f:
        cj = json.load(f)
    cj["architectures"] = ["Qwen3MoeForCausalLM"]
    cj["rope_theta"] = ROPE_THETA
    cj["num_experts"] = CONFIG["num_experts"]      # transformers 5 writes only num_local_experts
    cj["output_router_logits"] = False
    for k in list(cj):
        if k.startswith("_"):
            del cj[k]
    cj["torch_dtype"] = "float32"
    cj["dtype"] = "float32"
    with open(cpath, "w") as f:
        json.dump(dict(sorted(cj.items())), f, indent=2)
        f.write("\n")
    with open(os.path.join(hf_dir, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": VOCAB - 1, "eos_token_id": VOCAB - 1, "pad_token_id": VOCAB - 1,
                   "do_sample": False, "max_new_tokens": 128,
                   "transformers_version": transformers.__version__}, f, indent=2)
        f.write("\n")

    # ---- reload the directory with transformers: must give the same logits
    x16 = torch.tensor(eval_ids, device="cuda").view(-1, SEQ)
    with torch.no_grad():
        ref_logits = model(input_ids=x16, use_cache=False).logits.float()
    reload_info = {}
    try:
        m2, info = Qwen3MoeForCausalLM.from_pretrained(hf_dir, output_loading_info=True, dtype=torch.float32)
        set_impl(m2.config)
        m2 = m2.to("cuda").eval()
        with torch.no_grad():
            l2 = m2(input_ids=x16, use_cache=False).logits.float()
        reload_info = {k: [str(x) for x in v] if isinstance(v, (list, set)) else str(v) for k, v in info.items()}
        reload_info["max_abs_logit_diff"] = float((l2 - ref_logits).abs().max())
        log(f"reload of the per-expert directory: {reload_info}")
        assert not info.get("missing_keys") and not info.get("unexpected_keys"), "reload: key mismatch"
        assert reload_info["max_abs_logit_diff"] < 1e-4, "reload: logits differ"
        del m2
    except Exception as e:  # noqa: BLE001
        log(f"WARNING: transformers could not reload the per-expert directory ({e!r}); "
            f"shipping transformers' own save_pretrained output instead")
        reload_info["error"] = repr(e)
        for fn in os.listdir(native_dir):
            if fn.endswith(".safetensors") or fn.endswith(".json") and "config" not in fn:
                shutil.copy(os.path.join(native_dir, fn), os.path.join(hf_dir, fn))
    try:
        from transformers import AutoTokenizer
        at = AutoTokenizer.from_pretrained(hf_dir)
        same = at.encode(test_text[:2000], add_special_tokens=False) == tok.encode(test_text[:2000]).ids
        log(f"AutoTokenizer: {type(at).__name__}, same ids as tokenizers: {same}")
    except Exception as e:  # noqa: BLE001
        log(f"AutoTokenizer failed: {e!r}")
    with safe_open(os.path.join(hf_dir, "model.safetensors"), "pt") as f:
        shipped = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}

    # ---- perplexity: float32, Q8_0 as shipped, variants
    results, per_window, variants = {}, {}, {}
    ppl, nll = window_nll(model, eval_ids)
    results["f32"], per_window["f32"] = ppl, nll
    results["f32_full_test"] = window_nll(model, test_ids)[0]
    results["f32_valid"] = window_nll(model, valid_ids)[0]
    log(f"held-out ppl (first {EVAL_TOKENS} test tokens) float32: {ppl:.4f}")
    loads = expert_load(model, test_ids[: 16 * SEQ])
    keys = list(msd.keys())
    mq = None
    for name, qtype, keep in (("q8_0", "Q8_0", ()), ("q8_0_router_f32", "Q8_0", ("mlp.gate.",)),
                              ("q4_k", "Q4_K", ())):
        t = time.time()
        qsd, qnames = quantize_canonical(csd, qtype, keep)
        mqv = copy.deepcopy(model)
        mqv.load_state_dict({k: v.to("cuda") for k, v in from_canonical(qsd, keys, layout).items()}, strict=True)
        mqv.eval()
        p, nl = window_nll(mqv, eval_ids)
        results[name], per_window[name] = p, nl
        variants[name] = {"type": qtype, "f32_kept": ["1-D norms"] + list(keep), "n_quantized": len(qnames)}
        if name == "q8_0":
            results["q8_0_full_test"] = window_nll(mqv, test_ids)[0]
            mq = mqv
        else:
            del mqv
        log(f"held-out ppl {name}: {p:.4f}  ({len(qnames)} matrices, {time.time() - t:.1f} s)")
    greedy_q8, greedy_f32, rejected, spare = [], [], [], []
    for p in PROMPTS:
        gq, gf = greedy(mq, tok, p, GREEDY_TOKENS), greedy(model, tok, p, GREEDY_TOKENS)
        same = gq["ids"] == gf["ids"]
        m = min(gq["min_margin"], gf["min_margin"])
        ok = same and m >= GREEDY_MIN_MARGIN
        log(f"prompt {p!r}: margins q8_0 {gq['min_margin']} f32 {gf['min_margin']}, same {same}"
            f" -> {'use' if ok else 'reject'}")
        gq["below_min_margin"] = not ok
        if ok:
            greedy_q8.append(gq)
            greedy_f32.append(gf)
        else:
            rejected.append({"prompt": p, "min_margin_q8_0": gq["min_margin"], "min_margin_f32": gf["min_margin"],
                             "same_ids": same})
            if same:
                spare.append((m, gq, gf))
        if len(greedy_q8) == N_PROMPTS:
            break
    for m, gq, gf in sorted(spare, key=lambda t: -t[0])[: N_PROMPTS - len(greedy_q8)]:
        log(f"prompt {gq['prompt']!r} used although its margin {m} < {GREEDY_MIN_MARGIN}")
        greedy_q8.append(gq)
        greedy_f32.append(gf)
    for gq in greedy_q8:
        log(f"greedy q8_0 | {gq['prompt']!r} -> {gq['text']!r} (min margin {gq['min_margin']})")
    for gf in greedy_f32:
        log(f"greedy f32  | {gf['prompt']!r} -> {gf['text']!r} (min margin {gf['min_margin']})")

    # ---- the JSON a C test checks
    tok_sha = sha256_bytes(open(os.path.join(hf_dir, "tokenizer.json"), "rb").read())
    doc = {
        "what": "gen/train_tiny_moe.py: the bundled tiny Qwen3-MoE (KJV); reference figures for the C tests",
        "versions": versions,
        "config": dict(CONFIG, rope_theta=ROPE_THETA),
        "n_params": n_params, "n_params_active": n_active,
        "tokenizer": {"vocab_size": VOCAB, "eot": EOT, "eot_id": eot, "sha256": tok_sha,
                      "add_bos": False},
        "corpus": {"files": corpus_sha, "train_tokens": len(train_list), "valid_tokens": len(valid_ids),
                   "test_tokens": len(test_ids)},
        "training": {"seq": SEQ, "batch": BATCH, "peak_lr": PEAK_LR, "warmup": WARMUP,
                     "min_lr_frac": MIN_LR_FRAC, "weight_decay": WEIGHT_DECAY,
                     "grad_clip": GRAD_CLIP, "aux_coef": AUX_COEF, "aux": "per-layer, averaged",
                     "seconds": round(train_seconds, 1), "runs": runs, "chosen_run": best["run"],
                     "chosen_step": best["best_step"], "smoke": args.smoke},
        "ppl_procedure": ("ids = encode(kjv_test.txt, no special tokens)[:4096]; 16 windows of 256; each window "
                          "alone from position 0 (no BOS, empty cache); NLL over the 255 next-token "
                          "predictions of each window; ppl = exp(sum NLL / (16*255)); float32"),
        "eval": {"file": "kjv_test.txt", "n_tokens": EVAL_TOKENS, "window": SEQ,
                 "predictions_per_window": SEQ - 1, "token_ids": eval_ids},
        "ppl": {k: round(v, 6) for k, v in results.items()},
        "nll_sum_per_window": {k: [round(x, 5) for x in v] for k, v in per_window.items()},
        "quant_variants": variants,
        "greedy_min_margin": GREEDY_MIN_MARGIN, "greedy_tokens": GREEDY_TOKENS,
        "greedy_q8_0": greedy_q8, "greedy_f32": greedy_f32, "greedy_rejected_prompts": rejected,
        "expert_load_test_slice": loads,
        "layout": {"fused_in_transformers": layout, "transformers_save_pretrained_keys": native,
                   "transformers_save_pretrained_is_per_expert": native_per_expert,
                   "shipped_safetensors": shipped, "reload": reload_info},
    }
    with open(os.path.join(args.out, "tiny_moe_eval.json"), "w") as f:
        f.write(dumps_compact(doc) + "\n")
    shutil.rmtree(native_dir, ignore_errors=True)
    log(f"expert load (test slice): {loads}")
    log(f"ppl: {json.dumps(doc['ppl'])}")
    log(f"total {time.time() - T0:.1f} s")


if __name__ == "__main__":
    main()
