#!/usr/bin/env python3
"""Reference token ids from the Hugging Face `tokenizers` library, for test/test_tokenizer.c.

Runs where `tokenizers` is installed (the GPU machine):
    python3 gen/tokenizer_refs.py CORPUS VOCAB_DIR OUT_DIR
VOCAB_DIR holds NAME/tokenizer.json(.gz) for NAME in qwen3, gemma3, gptoss. Writes to OUT_DIR:
  refs_NAME.bin   ids per case (format below), splits.bin  pre-tokenizer pieces per regex,
  stats.json      library version, machine, and HF encode speed (MB/s, one thread).

Cases (test_tokenizer.c builds the same list): every corpus line (split on b"\\n"); then
blocks of 7 consecutive lines joined with SEPS[i % 6] before line i (skipped when a line of
the block is not valid UTF-8); then the whole corpus (valid lines joined with "\\n", plus "\\n").

refs_NAME.bin: b"MOEREF1\\0", then unsigned LEB128 varints:
  n_prefix, prefix ids, n_suffix, suffix ids   (what add_special_tokens=True adds)
  n_cases, then per case: flags (bit0 invalid UTF-8: nothing follows; bit1 the ids without
  special-token parsing differ), n, ids (special tokens parsed: HF's default), [m, ids (HF
  with encode_special_tokens=True) when bit1].
splits.bin: b"MOESPL1\\0", n_regex, then per regex: name length, name bytes, n_cases, per
  case: n_pieces, byte length of each piece (0 pieces for invalid cases)."""
import gzip, json, os, platform, sys, time

os.environ.setdefault("RAYON_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
import tokenizers
from tokenizers import Tokenizer, Regex, pre_tokenizers

SEPS = ["\n", "\n\n", "\r\n", "\n\n\n\n", " \n", "\n\t"]
REGEXES = {
    "gpt2": r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+",
    "llama3": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    "qwen2": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    "o200k": r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+",
}


def varint(x, out):
    assert x >= 0
    while True:
        b = x & 0x7F
        x >>= 7
        if x:
            out.append(b | 0x80)
        else:
            out.append(b)
            return


def build_cases(corpus):
    lines = corpus.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    def text(b):
        try:
            return b.decode("utf-8")
        except UnicodeDecodeError:
            return None
    cases = [text(l) for l in lines]
    n = len(lines)
    for start in range(0, n, 7):
        block = cases[start:min(start + 7, n)]
        if any(t is None for t in block):
            continue
        s = block[0]
        for i in range(start + 1, start + len(block)):
            s += SEPS[i % 6] + cases[i]
        cases.append(s)
    cases.append("".join(t + "\n" for t in cases[:n] if t is not None))
    return cases, n


def load(vdir, name):
    p = os.path.join(vdir, name, "tokenizer.json")
    if os.path.exists(p + ".gz"):
        return Tokenizer.from_str(gzip.open(p + ".gz", "rt", encoding="utf-8").read())
    return Tokenizer.from_file(p)


def main():
    corpus_path, vdir, outdir = sys.argv[1:4]
    corpus = open(corpus_path, "rb").read()
    cases, n_lines = build_cases(corpus)
    valid = [c for c in cases[:n_lines] if c is not None]
    whole = cases[-1]
    stats = {"tokenizers": tokenizers.__version__, "python": platform.python_version(), "n_cases": len(cases),
             "n_lines": n_lines, "corpus_bytes": len(whole.encode()), "vocabs": {}}
    try:
        stats["cpu"] = [l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")][0]
    except Exception:
        pass
    for name in ["qwen3", "gemma3", "gptoss"]:
        tok = load(vdir, name)
        out = bytearray(b"MOEREF1\0")
        a = tok.encode("hello", add_special_tokens=False).ids
        b = tok.encode("hello", add_special_tokens=True).ids
        k = next(k for k in range(len(b) - len(a) + 1) if b[k:k + len(a)] == a)
        prefix, suffix = b[:k], b[k + len(a):]
        varint(len(prefix), out); [varint(i, out) for i in prefix]
        varint(len(suffix), out); [varint(i, out) for i in suffix]
        varint(len(cases), out)
        n_diff = n_tok = 0
        for c in cases:
            if c is None:
                varint(1, out)
                continue
            tok.encode_special_tokens = False
            ids = tok.encode(c, add_special_tokens=False).ids
            tok.encode_special_tokens = True
            ids2 = tok.encode(c, add_special_tokens=False).ids
            tok.encode_special_tokens = False
            n_tok += len(ids)
            diff = ids2 != ids
            n_diff += diff
            varint(2 if diff else 0, out)
            varint(len(ids), out); [varint(i, out) for i in ids]
            if diff:
                varint(len(ids2), out); [varint(i, out) for i in ids2]
        open(os.path.join(outdir, "refs_%s.bin" % name), "wb").write(out)
        # speed, one thread: every valid line on its own, and the whole corpus in one call
        nbytes = sum(len(c.encode()) for c in valid)
        best_lines = best_whole = 1e9
        for _ in range(3):
            t0 = time.perf_counter()
            for c in valid:
                tok.encode(c, add_special_tokens=False)
            best_lines = min(best_lines, time.perf_counter() - t0)
            t0 = time.perf_counter()
            tok.encode(whole, add_special_tokens=False)
            best_whole = min(best_whole, time.perf_counter() - t0)
        stats["vocabs"][name] = {"tokens_total": n_tok, "cases_special_differs": n_diff, "prefix": prefix, "suffix": suffix,
                                 "mb_s_lines": nbytes / best_lines / 1e6, "mb_s_whole": len(whole.encode()) / best_whole / 1e6}
        print(name, stats["vocabs"][name], flush=True)
    out = bytearray(b"MOESPL1\0")
    varint(len(REGEXES), out)
    for rname, pat in REGEXES.items():
        pt = pre_tokenizers.Split(Regex(pat), behavior="isolated")
        varint(len(rname), out); out += rname.encode()
        varint(len(cases), out)
        for c in cases:
            if c is None:
                varint(0, out)
                continue
            pieces = pt.pre_tokenize_str(c)
            varint(len(pieces), out)
            tot = 0
            for p, _ in pieces:
                varint(len(p.encode()), out)
                tot += len(p.encode())
            assert tot == len(c.encode()), (rname, c)
    open(os.path.join(outdir, "splits.bin"), "wb").write(out)
    json.dump(stats, open(os.path.join(outdir, "stats.json"), "w"), indent=1)
    print(json.dumps(stats), flush=True)


if __name__ == "__main__":
    main()
