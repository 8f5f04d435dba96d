#!/usr/bin/env python3
"""example.py - generating with moe from Python (python/moe.py, standard library only).

    python3 python/example.py                                   # the bundled fixture model
    python3 python/example.py -m model.gguf -p "Once upon a time" -n 32
    python3 python/example.py --tokens 1,2,3,4 -n 16           # token ids, no tokenizer needed

Three runs over one prompt, each on the same context (rewound to the prompt in between, so the
prompt is prefilled once):
  1. greedy with moe's sampler;
  2. moe's sampler with temperature / top-p and a seed;
  3. a sampler written in Python over the logits view: top-k, then a temperature draw.
"""
import argparse
import math
import os
import random
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import moe  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def show(model, tokens, text):
    if text:
        return repr(b"".join(model.token_to_piece(t) for t in tokens).decode("utf-8", "replace"))
    return " ".join(str(t) for t in tokens)


def python_sampler(logits, rng, k=8, temperature=0.8):
    """top-k then a softmax draw at the given temperature, in plain Python"""
    best = sorted(range(len(logits)), key=lambda i: -logits[i])[:k]
    m = logits[best[0]]
    weights = [math.exp((logits[i] - m) / temperature) for i in best]
    return rng.choices(best, weights=weights)[0]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", default=os.path.join(ROOT, "test", "fixtures", "qwen3moe_q8_0.gguf"))
    ap.add_argument("-p", "--prompt", default=None, help="prompt text (needs a tokenizer)")
    ap.add_argument("--tokens", default=None, help="prompt token ids, comma-separated")
    ap.add_argument("-n", type=int, default=16, help="tokens to generate per run")
    ap.add_argument("-b", "--backend", choices=["auto", "cpu", "vulkan"], default="auto")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()

    backend = {"auto": moe.BACKEND_AUTO, "cpu": moe.BACKEND_CPU, "vulkan": moe.BACKEND_VULKAN}[args.backend]
    model = moe.Model(args.model, backend=backend)
    info = model.info
    print("moe %s: %s, %d layers, %d experts (top-%d), vocab %d, backend %s" % (
        moe.version(), info["arch"], info["n_layer"], info["n_expert"], info["n_expert_used"], info["n_vocab"],
        "vulkan" if info["backend"] == moe.BACKEND_VULKAN else "cpu"))

    # the prompt: ids, or text through the tokenizer (falls back to ids when the model has none)
    text = False
    if args.tokens:
        prompt = [int(t) for t in args.tokens.split(",") if t.strip()]
    else:
        try:
            prompt = model.tokenize(args.prompt or "Once upon a time", add_special=True)
            text = True
        except moe.MoeError as e:
            if e.status != moe.ERR_UNSUPPORTED:
                raise
            print("(no tokenizer in this model: using token ids 1..8)")
            prompt = list(range(1, 9))
    print("prompt:", show(model, prompt, text))

    ctx = moe.Context(model, n_ctx=len(prompt) + args.n + 1)
    ctx.step(prompt)
    start = ctx.save()   # the state after the prompt (restored below with load(); rewind works too)

    def run(choose):
        out = []
        for _ in range(args.n):
            t = choose(ctx.logits())
            if model.is_eog(t):
                break
            out.append(t)
            ctx.step([t])
        return out

    greedy = run(moe.Sampler().sample)
    print("greedy:", show(model, greedy, text))

    ctx.rewind(len(prompt) - 1)           # rewind + re-feed the last prompt token: same logits again
    ctx.step(prompt[-1:])
    sampler = moe.Sampler(temperature=0.8, top_p=0.95, seed=args.seed)
    print("sampled (T 0.8, top-p 0.95, seed %d):" % args.seed, show(model, run(sampler.sample), text))

    ctx.load(start)
    rng = random.Random(args.seed)
    print("python top-k sampler:", show(model, run(lambda logits: python_sampler(logits, rng)), text))

    st = ctx.stats()
    print("context: %d tokens; %d prompt and %d generated tokens processed" % (
        ctx.pos, st["n_prompt_tokens"], st["n_gen_tokens"]))
    ctx.close()
    model.close()


if __name__ == "__main__":
    main()
