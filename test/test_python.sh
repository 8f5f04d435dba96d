#!/bin/sh
# test_python.sh — the ctypes binding (python/moe.py) end to end, with Debian's python3 and no pip
# packages, on the fixture model. Run by `make test-python` (after `make`, which builds
# build/libmoe.so and build/generate).
#   1. ABI: every struct of moe.h has the same size and field offsets in ctypes as in C;
#   2. errors: a missing file gives MoeError ERR_IO, a non-GGUF file ERR_FORMAT, bad sampler
#      settings ERR_INVALID_ARG, a cancelled load ERR_CANCELLED, a full context ERR_CONTEXT_FULL;
#   3. the sampler through the binding draws test_sampler's golden sequence (same seed, same
#      logits, same tokens from another language), and matches test/sampler_ref.py — the
#      pipeline of moe.h written in plain Python — draw for draw on 60 random logit sets and
#      settings (penalties, top-k, top-p, min-p, NaN / inf logits, accepted tokens);
#   4. greedy decoding through the binding equals the C example `generate` on the same prompt ids;
#      save/load and rewind reproduce the logits bit for bit; export round trip;
#   5. python/example.py runs, and its greedy line equals `generate` too.
set -eu
cd "$(dirname "$0")/.."
PY=${PYTHON:-/usr/bin/python3}
MODEL=test/fixtures/qwen3moe_q8_0.gguf
IDS=1,2,3,4,5,6,7,8
if [ ! -x "$PY" ]; then echo "test_python: $PY not found (Debian: apt-get install python3)"; exit 1; fi
for f in build/libmoe.so build/generate; do
  [ -f "$f" ] || { echo "test_python: $f is missing: run make first"; exit 1; }
done
T=$(mktemp -d)
trap 'rm -rf "$T"' EXIT INT TERM

echo "== python binding ($($PY --version 2>&1))"

# ---- 1. ABI: sizes and offsets from the C compiler vs ctypes -------------------------------------
cat > "$T/abi.c" <<'EOF'
#include "moe.h"
#include <stdio.h>
#include <stddef.h>
#define F(S, f) printf(#S "." #f " %zu\n", offsetof(S, f));
#define Z(S) printf(#S " %zu\n", sizeof(S));
int main(void) {
    Z(moe_load_params) F(moe_load_params, backend) F(moe_load_params, device_index) F(moe_load_params, n_threads)
    F(moe_load_params, gpu_budget_bytes) F(moe_load_params, host_budget_bytes) F(moe_load_params, progress)
    F(moe_load_params, log) F(moe_load_params, user)
    Z(moe_model_info) F(moe_model_info, n_vocab) F(moe_model_info, eos) F(moe_model_info, n_params)
    F(moe_model_info, file_bytes) F(moe_model_info, backend)
    Z(moe_ctx_params) F(moe_ctx_params, n_batch) F(moe_ctx_params, abort) F(moe_ctx_params, max_submit_us) F(moe_ctx_params, low_priority)
    Z(moe_sampler_params) F(moe_sampler_params, repeat_last_n) F(moe_sampler_params, frequency_penalty)
    F(moe_sampler_params, seed)
    Z(moe_save_params) F(moe_save_params, progress) F(moe_save_params, user)
    Z(moe_stats) F(moe_stats, n_gen_tokens) F(moe_stats, t_load_s)
    printf("version %d.%d.%d\n", MOE_VERSION_MAJOR, MOE_VERSION_MINOR, MOE_VERSION_PATCH);
    return 0;
}
EOF
${CC:-cc} -std=c11 -Wall -Werror -I. "$T/abi.c" -o "$T/abi"
"$T/abi" > "$T/abi_c.txt"
$PY - > "$T/abi_py.txt" <<'EOF'
import ctypes, sys
sys.path.insert(0, "python")
import moe
rows = [
    ("moe_load_params", moe.LoadParams, ["backend", "device_index", "n_threads", "gpu_budget_bytes",
                                         "host_budget_bytes", "progress", "log", "user"]),
    ("moe_model_info", moe.ModelInfo, ["n_vocab", "eos", "n_params", "file_bytes", "backend"]),
    ("moe_ctx_params", moe.CtxParams, ["n_batch", "abort", "max_submit_us", "low_priority"]),
    ("moe_sampler_params", moe.SamplerParams, ["repeat_last_n", "frequency_penalty", "seed"]),
    ("moe_save_params", moe.SaveParams, ["progress", "user"]),
    ("moe_stats", moe.Stats, ["n_gen_tokens", "t_load_s"]),
]
for cname, cls, fields in rows:
    print("%s %d" % (cname, ctypes.sizeof(cls)))
    for f in fields:
        print("%s.%s %d" % (cname, f, getattr(cls, f).offset))
print("version", moe.version())
EOF
if ! diff "$T/abi_c.txt" "$T/abi_py.txt"; then
  echo "test_python: python/moe.py's structs differ from moe.h (diff above: C <, ctypes >)"; exit 1
fi
echo "   ABI: struct sizes and offsets match moe.h"
# a library of another ABI version (here a stand-in that reports 99) is refused at import
printf 'int moe_abi_version(void) { return 99; }\n' > "$T/fake.c"
${CC:-cc} -shared -fPIC "$T/fake.c" -o "$T/libfake.so"
if MOE_LIB="$T/libfake.so" $PY -c 'import sys; sys.path.insert(0, "python"); import moe' 2> "$T/fake.txt"; then
  echo "test_python: moe.py imported a library of ABI version 99"; exit 1
fi
grep -q "ABI version 99" "$T/fake.txt" || { cat "$T/fake.txt"; echo "test_python: no ABI message"; exit 1; }
echo "   ABI: a library of another ABI version is refused at import"

# ---- 2-4. the binding -------------------------------------------------------------------------------
./build/generate -m "$MODEL" --tokens "$IDS" -n 24 -q -b cpu > "$T/generate.txt" 2>/dev/null
$PY - "$MODEL" "$IDS" "$T" <<'EOF'
import os, sys
sys.path.insert(0, "python")
import moe
model_path, ids, tmp = sys.argv[1], [int(x) for x in sys.argv[2].split(",")], sys.argv[3]

def expect_error(status, fn, *args, **kw):
    try:
        fn(*args, **kw)
    except moe.MoeError as e:
        assert e.status == status, "expected %s, got %s (%s)" % (moe.status_str(status), moe.status_str(e.status), e)
        assert e.message, "no message for %s" % e
        return e
    raise AssertionError("expected MoeError %s from %s" % (moe.status_str(status), fn.__name__))

# errors
e = expect_error(moe.ERR_IO, moe.Model, "test/fixtures/no_such_model.gguf")
assert "no_such_model.gguf" in e.message, e.message
expect_error(moe.ERR_FORMAT, moe.Model, "test/test_util.h")
expect_error(moe.ERR_INVALID_ARG, moe.Sampler, top_p=1.5)
expect_error(moe.ERR_INVALID_ARG, moe.Sampler, top_k=-1)
expect_error(moe.ERR_CANCELLED, moe.Model, model_path, backend=moe.BACKEND_CPU, progress=lambda f: f >= 0.5)
logs = []
model = moe.Model(model_path, backend=moe.BACKEND_CPU, log=lambda level, msg: logs.append((level, msg)))
assert any("qwen3moe" in m for _, m in logs), logs
assert model.info["arch"] == "qwen3moe" and model.n_vocab > 0, model.info

# submit / wait and abort through the binding: same logits as step; a cancel leaves the context as it was
ids = [1, 2, 3, 4, 5, 6, 7, 8]
ref = moe.Context(model, n_ctx=64)
ref.step(ids)
a = moe.Context(model, n_ctx=64, n_batch=4)
a.submit(ids)
expect_error(moe.ERR_BUSY, a.step, [1])
while not a.wait(0):
    pass
assert list(a.logits()) == list(ref.logits()) and a.pos == len(ids)
polls = []
b = moe.Context(model, n_ctx=64, n_batch=4, abort=lambda: polls.append(1) or len(polls) > 3)
expect_error(moe.ERR_CANCELLED, b.step, ids)
assert b.pos == 0 and len(polls) == 4, (b.pos, polls)
b.submit(ids)
expect_error(moe.ERR_CANCELLED, b.wait)
del polls[:]
b = moe.Context(model, n_ctx=64, n_batch=4, abort=lambda: False)
b.submit(ids)
assert b.wait(None) and list(b.logits()) == list(ref.logits())
expect_error(moe.ERR_UNSUPPORTED, b.submit_times)

# the sampler: test_sampler.c's golden sequence B, drawn through the binding from a Python list
logits = [((i * 37) % 32) / 8.0 - 2.0 for i in range(32)]
s = moe.Sampler(temperature=1.0, seed=1234)
got = [s.sample(logits) for _ in range(32)]
want = [4, 25, 23, 29, 5, 30, 17, 6, 19, 19, 18, 7, 6, 19, 12, 25, 19, 31, 31, 25, 25, 10, 12, 4, 19, 5, 12, 30, 5, 2, 15, 11]
assert got == want, got
s.reset()
assert [s.sample(logits) for _ in range(32)] == want
assert moe.Sampler().sample(logits) == max(range(32), key=lambda i: (logits[i], -i))
expect_error(moe.ERR_INVALID_ARG, moe.Sampler().sample, [float("nan")] * 4)
expect_error(moe.ERR_INVALID_ARG, moe.Sampler().sample, [])

# the C sampler == test/sampler_ref.py (moe.h's pipeline in plain Python) on random logits and settings
sys.path.insert(0, "test")
import random, sampler_ref
R = random.Random(2024)
for case in range(60):
    n = R.choice([1, 2, 5, 30, 200, 600])
    style = R.randrange(4)
    logits = [R.gauss(0, R.choice([0.5, 2, 6])) if style < 2 else float(R.randrange(-3, 4)) for _ in range(n)]
    if style == 3:
        for _ in range(R.randrange(1, 4)):
            logits[R.randrange(n)] = R.choice([float("nan"), float("inf"), float("-inf")])
    kw = dict(temperature=R.choice([0.0, 0.01, R.uniform(0.2, 2.0), 1.0]), top_k=R.choice([0, 0, 1, R.randrange(1, 50)]),
              top_p=R.choice([0.0, 1.0, R.uniform(0.05, 0.99)]), min_p=R.choice([0.0, R.uniform(0.0, 0.5)]),
              repeat_penalty=R.choice([0.0, 1.0, R.uniform(0.5, 2.0)]), repeat_last_n=R.choice([0, R.randrange(1, 32)]),
              presence_penalty=R.choice([0.0, R.uniform(-1, 1)]), frequency_penalty=R.choice([0.0, R.uniform(-1, 1)]),
              seed=R.getrandbits(64))
    c, ref = moe.Sampler(**kw), sampler_ref.Sampler(**kw)
    for draw in range(30):
        if R.random() < 0.1:
            t = R.randrange(n + 3)
            c.accept(t)
            ref.accept(t)
        want = ref.sample(logits)
        try:
            got = c.sample(logits)
        except moe.MoeError:
            got = -1
        assert got == want, "case %d draw %d (%r): C %d, reference %d" % (case, draw, kw, got, want)

# greedy through the binding == build/generate (moe_sample with all-zero settings) on the same ids
with moe.Context(model, n_ctx=64) as ctx:
    expect_error(moe.ERR_INVALID_ARG, ctx.logits)          # nothing stepped yet
    ctx.step(ids)
    snap = ctx.save()
    first = list(ctx.logits())
    greedy, sampler = [], moe.Sampler()
    for _ in range(24):
        t = sampler.sample(ctx.logits())
        greedy.append(t)
        ctx.step([t])
    want = [int(x) for x in open(os.path.join(tmp, "generate.txt")).read().split()]
    assert greedy == want, (greedy, want)
    assert ctx.pos == len(ids) + 24
    # a Python argmax over the view agrees with moe's greedy
    ctx.load(snap)
    assert ctx.pos == len(ids) and list(ctx.logits()) == first
    view = ctx.logits()
    assert max(range(len(view)), key=lambda i: (view[i], -i)) == greedy[0]
    ctx.rewind(len(ids) - 1)
    ctx.step(ids[-1:])
    assert list(ctx.logits()) == first                     # bit for bit
    st = ctx.stats()
    assert st["n_prompt_tokens"] >= len(ids), st
expect_error(moe.ERR_INVALID_ARG, ctx.step, [1])            # closed

# a full context
with moe.Context(model, n_ctx=8) as small:
    small.step(ids)
    expect_error(moe.ERR_CONTEXT_FULL, small.step, [1])
    assert small.pos == 8

# lifetimes: the model outlives its contexts (moe.h: reference counted), so a context made inside
# a `with Model(...)` block steps after the block has closed the model
with moe.Model(model_path, backend=moe.BACKEND_CPU) as m2:
    late = moe.Context(m2, n_ctx=64)
expect_error(moe.ERR_INVALID_ARG, m2.get_info)              # the Python handle is closed ...
late.step(ids)                                             # ... the C model lives on in its context
assert list(late.logits()) == first                         # bit for bit what the open model gave
late.step([greedy[0]])
late2 = moe.Context(model, n_ctx=64)                       # and freeing the context last frees the model
model_ref = late2.model
late2.close()
late.close()
expect_error(moe.ERR_INVALID_ARG, late.step, [1])
del m2, late, late2, model_ref
import gc
gc.collect()

# tokenizer calls either work or raise MoeError (the fixture has no vocabulary)
try:
    toks = model.tokenize("hello", add_special=True)
    assert model.detokenize(toks, raw=True).endswith(b"hello")
except moe.MoeError as e:
    assert e.status == moe.ERR_UNSUPPORTED, e
try:
    model.chat_apply([("user", "hi")])
except moe.MoeError as e:
    assert e.status in (moe.ERR_UNSUPPORTED, moe.ERR_INVALID_ARG), e

# the tokenizer on the bundled model (it has a vocabulary): counts through n_out, buffers regrown
# on ERR_BUFFER_TOO_SMALL (the first capacities tried are smaller than the results here)
with moe.Model("examples/models/tiny-moe-kjv-q8_0.gguf", backend=moe.BACKEND_CPU) as kjv:
    text = "And God said, Let there be light: and there was light. " * 8
    toks = kjv.tokenize(text, add_special=True)
    assert len(toks) > 16 + 8, len(toks)                     # more than tokenize's first capacity guess
    assert text in kjv.detokenize(toks)
    assert b"".join(kjv.token_to_piece(t) for t in toks).endswith(text.encode())
    assert kjv.tokenize("") == []
    assert kjv.detokenize([]) == ""
    expect_error(moe.ERR_INVALID_ARG, kjv.token_to_piece, kjv.n_vocab)
    expect_error(moe.ERR_INVALID_ARG, kjv.detokenize, [toks[0], 1 << 30])
    try:
        long_msg = "light " * 2000                           # beyond chat_apply's first 4096 bytes
        rendered = kjv.chat_apply([("user", long_msg)])
        assert long_msg in rendered and len(rendered) > 4096
    except moe.MoeError as e:
        assert e.status == moe.ERR_UNSUPPORTED, e
    # the raw call: a size query gives ERR_BUFFER_TOO_SMALL and the count needed
    import ctypes
    need = ctypes.c_int32(-1)
    data = b"And God said"
    st = moe.lib.moe_tokenize(kjv._handle(), data, len(data), None, 0, 0, ctypes.byref(need))
    assert st == moe.ERR_BUFFER_TOO_SMALL and need.value > 0, (st, need.value)
    buf = (ctypes.c_int32 * need.value)()
    got = ctypes.c_int32(-1)
    assert moe.lib.moe_tokenize(kjv._handle(), data, len(data), buf, need.value, 0, ctypes.byref(got)) == moe.OK
    assert got.value == need.value and list(buf) == kjv.tokenize(data)

# export round trip: f16 copy, same greedy first token
out = os.path.join(tmp, "copy_f16.gguf")
model.save(out, moe.FTYPE_F16)
with moe.Model(out, backend=moe.BACKEND_CPU) as copy, moe.Context(copy, n_ctx=16) as c2:
    assert copy.info["n_vocab"] == model.info["n_vocab"]
    c2.step(ids)
    assert len(c2.logits()) == model.n_vocab
model.close()
expect_error(moe.ERR_INVALID_ARG, model.get_info)
print("   binding: errors, sampler golden sequence, C sampler == Python reference, greedy == generate, "
      "save/load/rewind, model outlives its contexts, tokenizer counts, export: ok")
EOF

# ---- 5. the example -----------------------------------------------------------------------------
$PY python/example.py -m "$MODEL" --tokens "$IDS" -n 24 -b cpu > "$T/example.txt"
grep -q "^greedy: $(cat "$T/generate.txt")\$" "$T/example.txt" || {
  echo "test_python: example.py's greedy line differs from generate:"; cat "$T/example.txt" "$T/generate.txt"; exit 1; }
echo "   example.py: ok"

# ---- 6. generate(), SamplerChain, UTF-8 across pieces, stop strings ---------------------------------
$PY - <<'EOF'
import sys
sys.path.insert(0, "python")
import moe

# the streaming logic on scripted tokens: multi-byte characters split over pieces come out whole,
# text that may begin a stop string is held back, the stop string itself never comes out
class FakeModel:
    pieces = {1: b"caf", 2: b"\xc3", 3: b"\xa9 ", 4: b"\xf0\x9f", 5: b"\x98\x80", 6: b" EN", 7: b"D here", 8: b"\xff", 9: b"!"}
    def is_eog(self, t): return t == 0
    def token_to_piece(self, t): return self.pieces[t]
class FakeCtx:
    def __init__(self): self.model, self.stepped = FakeModel(), []
    def step(self, toks): self.stepped += toks
    def logits(self): return None
class Script:
    def __init__(self, toks): self.toks = list(toks)
    def sample(self, logits): return self.toks.pop(0)
def run(toks, stop=(), max_tokens=50):
    c, out = FakeCtx(), []
    chunks = list(moe._generate(c, [], max_tokens, Script(toks), stop, True, out))
    return chunks, c.finish_reason, out
chunks, why, out = run([1, 2, 3, 4, 5, 0])
assert "".join(chunks) == "caf\u00e9 \U0001F600" and why == "stop" and out == [1, 2, 3, 4, 5], (chunks, why)
assert all("\ufffd" not in c for c in chunks), chunks          # no half characters yielded
assert chunks == ["caf", "\u00e9 ", "\U0001F600"], chunks
chunks, why, out = run([1, 6, 7, 9], stop=["END"])
assert chunks == ["caf", " "] and why == "stop", (chunks, why)   # " EN" + "D here": the "EN" was held back
chunks, why, _ = run([1, 6, 9, 0], stop=["END"])               # "EN" held back, then released
assert chunks == ["caf", " ", "EN!"] and why == "stop", chunks
chunks, why, _ = run([8, 9], max_tokens=2)                      # invalid UTF-8: replaced, not raised
assert "".join(chunks) == "\ufffd!" and why == "length", chunks

with moe.Model("examples/models/tiny-moe-kjv-q8_0.gguf", backend=moe.BACKEND_CPU) as m:
    prompt = "And God said"
    # greedy generate() == the hand-written greedy loop, and the text == detokenize of its tokens
    with moe.Context(m, n_ctx=96) as c:
        text = "".join(c.generate(prompt, max_tokens=32))
        gen = c.generated
        assert c.finish_reason == "length" and len(gen) == 32, (c.finish_reason, len(gen))
    with moe.Context(m, n_ctx=96) as c:
        c.step(m.tokenize(prompt, add_special=True, parse_special=True))
        s, loop = moe.Sampler(), []
        for _ in range(32):
            loop.append(s.sample(c.logits()))
            c.step([loop[-1]])
    assert gen == loop, (gen, loop)
    assert text == m.detokenize(gen), (text, m.detokenize(gen))
    # a stop string taken from the greedy text: generation ends before it
    cut = text.index(" LORD") if " LORD" in text else len(text) // 2
    stop = text[cut:cut + 5]
    with moe.Context(m, n_ctx=96) as c:
        got = "".join(c.generate(prompt, max_tokens=32, stop=[stop]))
        assert got == text[:text.index(stop)] and c.finish_reason == "stop", (got, stop)
    # a full context ends generation with finish_reason "length", the text so far intact
    with moe.Context(m, n_ctx=12) as c:
        got = "".join(c.generate(prompt, max_tokens=32))
        assert c.finish_reason == "length" and text.startswith(got) and c.pos == 12, (got, c.pos)
    # SamplerChain == the equivalent Sampler, draw for draw; order errors; custom stages
    def draws(sampler):
        with moe.Context(m, n_ctx=96) as c:
            list(c.generate(prompt, max_tokens=24, sampler=sampler))
            return c.generated
    chain = moe.SamplerChain().add_penalties(32, 1.1).add_top_k(40).add_temp(0.9).add_top_p(0.95).add_min_p(0.02).add_dist(seed=11)
    plain = moe.Sampler(repeat_last_n=32, repeat_penalty=1.1, top_k=40, temperature=0.9, top_p=0.95, min_p=0.02, seed=11)
    assert draws(chain) == draws(plain)
    assert draws(moe.SamplerChain().add_top_k(40).add_greedy()) == loop[:24]
    assert draws(moe.SamplerChain().add_top_k(40).add_temp(0.9)) == loop[:24]   # no dist stage: greedy
    for bad in (lambda: moe.SamplerChain().add_temp(0.8).add_top_k(40), lambda: moe.SamplerChain().add_top_k(4).add_top_k(4)):
        try:
            bad()
            raise AssertionError("SamplerChain accepted a bad order")
        except ValueError:
            pass
    banned = loop[0]
    def ban(logits, history):
        logits[banned] = float("-inf")
    got = draws(moe.SamplerChain().add_custom(ban).add_greedy())
    assert banned not in got and got[0] != loop[0], got
    seen = []
    biased = moe.SamplerChain().add_custom(lambda l, h: seen.append(list(h)) or [(-1e9 if i != 5 else 0.0) for i in range(len(l))])
    assert draws(biased) == [5] * 24 and seen[3] == [5, 5, 5], seen[:4]
print("   generate(): UTF-8 across pieces, stop strings, greedy == loop, full context; SamplerChain == Sampler, order errors, custom stages: ok")
EOF

# ---- 7. pip install ./python into a fresh venv (no network: the backend needs nothing) -------------
if $PY -c "import ensurepip, venv" 2>/dev/null; then
  $PY -m venv "$T/venv"
  "$T/venv/bin/pip" install -q --no-index --disable-pip-version-check ./python > "$T/pip.log" 2>&1 || {
    echo "test_python: pip install ./python failed:"; cat "$T/pip.log"; exit 1; }
  KJV=examples/models/tiny-moe-kjv-q8_0.gguf
  ./build/generate -m "$KJV" --tokens "$IDS" -n 24 -q -b cpu > "$T/generate_kjv.txt" 2>/dev/null
  (cd "$T" && env -u MOE_LIB "$T/venv/bin/python" - "$OLDPWD/$KJV" "$(cat "$T/generate_kjv.txt")" "$IDS") <<'EOF'
import sys, os
import moe
assert os.path.dirname(moe.__file__).endswith("site-packages"), moe.__file__
assert os.path.join("site-packages", "moe.libs") in moe.lib._name, moe.lib._name      # its own build, not build/
path, want, ids = sys.argv[1], [int(x) for x in sys.argv[2].split()], [int(x) for x in sys.argv[3].split(",")]
with moe.Model(path, backend=moe.BACKEND_CPU) as m, moe.Context(m, n_ctx=64) as c:
    text = "".join(c.generate(ids, max_tokens=24))
    n = len(c.generated)
    assert n >= 1 and c.generated == want[:n] and text == m.detokenize(c.generated), (c.generated, want)
print("   pip install ./python: moe %s from %s: ok" % (moe.version(), moe.lib._name))
EOF
else
  echo "test_python: python3 -m venv is not available (Debian: apt-get install python3-venv)"; exit 1
fi
