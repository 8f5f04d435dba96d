"""sampler_ref.py - moe_sample() re-implemented in plain Python from moe.h's description.

This is the executable form of the sampler's specification: Python integers and IEEE doubles
only (float32 rounding through struct), independent of the C code. test_sampler.c's golden
sequences were produced by running this file (`python3 test/sampler_ref.py` prints them), and
test/test_python.sh compares it with the C sampler, through the binding, on random logits and
settings. If the two ever disagree, one of them does not follow moe.h.
"""
import struct

M64 = 2**64 - 1
ONE = 1 << 44
EXP2_16TH = [4294967296, 4485121744, 4683695048, 4891059943, 5107605667, 5333738689, 5569883475, 5816483285,
             6074001000, 6342919999, 6623745059, 6917003306, 7223245206, 7543045592, 7877004752, 8225749546]


def f32(x):
    """round a double to float32 (NaN and infinities pass through)"""
    return struct.unpack("f", struct.pack("f", x))[0]


def rotl(x, k):
    return ((x << k) | (x >> (64 - k))) & M64


class Rng(object):
    """xoshiro256** seeded with four successive splitmix64 outputs"""

    def __init__(self, seed):
        self.s, x = [], seed & M64
        for _ in range(4):
            x = (x + 0x9E3779B97F4A7C15) & M64
            z = x
            z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
            z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
            self.s.append(z ^ (z >> 31))

    def next(self):
        s = self.s
        r = (rotl((s[1] * 5) & M64, 7) * 9) & M64
        t = (s[1] << 17) & M64
        s[2] ^= s[0]
        s[3] ^= s[1]
        s[1] ^= s[2]
        s[0] ^= s[3]
        s[2] ^= t
        s[3] = rotl(s[3], 45)
        return r


def exp2_q44(yq):
    """floor(2^44 * 2^(yq / 2^32)) for yq <= 0, in 32.32 fixed point"""
    if yq >= 0:
        return ONE
    if yq <= -46 * 2**32:
        return 0
    k = -((-yq + 0xFFFFFFFF) >> 32)
    f = yq - k * 2**32
    t = ((f & 0x0FFFFFFF) * 2977044472) >> 32
    h = 35791394
    for c in (178956971, 715827883, 2147483648, 4294967296):
        h = c + ((h * t) >> 32)
    em1 = (h * t) >> 32
    base = EXP2_16TH[f >> 28]
    m = base + ((base * em1) >> 32)
    return (m << 12) >> -k


def weight(logit, lmax, kt):
    if logit == lmax:
        return ONE
    y = (logit - lmax) * kt
    if not (y > -46.0 * 2**32):
        return 0
    return exp2_q44(int(y))


class Sampler(object):
    def __init__(self, temperature=0.0, top_k=0, top_p=0.0, min_p=0.0, repeat_penalty=0.0, repeat_last_n=0,
                 presence_penalty=0.0, frequency_penalty=0.0, seed=0):
        self.T, self.top_k, self.top_p, self.min_p = f32(temperature), top_k, f32(top_p), f32(min_p)
        self.rp, self.window = f32(repeat_penalty), repeat_last_n or 64
        self.pp, self.fp = f32(presence_penalty), f32(frequency_penalty)
        self.seed = seed
        self.reset()

    def reset(self):
        self.rng, self.hist = Rng(self.seed), []

    def accept(self, token):
        if token >= 0:
            self.hist.append(token)

    def sample(self, logits):
        n = len(logits)
        lg = [float("-inf") if x != x else f32(x) for x in logits]
        # 1. penalties
        counts = {}
        for t in self.hist[-self.window:]:
            if t < n:
                counts[t] = counts.get(t, 0) + 1
        use_rp = self.rp != 0.0 and self.rp != 1.0
        for t, c in counts.items():
            x = lg[t]
            if use_rp:
                x = f32(x / self.rp) if x > 0 else f32(x * self.rp)
            lg[t] = f32(x - (c * self.fp + self.pp))
        cand = [(lg[i], i) for i in range(n) if lg[i] > float("-inf")]
        if not cand:
            return -1
        rank = lambda c: (-c[0], c[1])   # best first, ties to the lower id
        best = min(cand, key=rank)
        if not self.T > 0:
            self.accept(best[1])
            return best[1]
        lmax = best[0]
        # 2. top-k
        if 0 < self.top_k < len(cand):
            cut = sorted(cand, key=rank)[self.top_k - 1]
            cand = [c for c in cand if rank(c) <= rank(cut)]
        # 3. temperature: integer weights
        qs = 0
        while len(cand) > 1 << (19 + qs):
            qs += 1
        one = ONE >> qs
        kt = 4294967296.0 * 1.4426950408889634 / self.T
        w = dict((c[1], weight(c[0], lmax, kt) >> qs) for c in cand)
        # 4. top-p
        if 0 < self.top_p < 1 and len(cand) > 1:
            need = self.top_p * float(sum(w[c[1]] for c in cand))
            cum = 0
            for c in sorted(cand, key=rank):
                cum += w[c[1]]
                last = c
                if float(cum) >= need:
                    break
            cand = [c for c in cand if rank(c) <= rank(last)]
        # 5. min-p
        if self.min_p > 0 and len(cand) > 1:
            cand = [c for c in cand if float(w[c[1]]) >= self.min_p * float(one)]
        # 6. draw, in id order
        total = sum(w[c[1]] for c in cand)
        target = ((self.rng.next() >> 40) * total) >> 24
        cum = 0
        for c in cand:
            cum += w[c[1]]
            if cum > target:
                self.accept(c[1])
                return c[1]
        raise AssertionError("unreachable")


if __name__ == "__main__":
    logits = [((i * 37) % 32) / 8.0 - 2.0 for i in range(32)]
    s = Sampler(temperature=0.8, top_k=24, top_p=0.9, min_p=0.05, repeat_penalty=1.1, repeat_last_n=8,
                presence_penalty=0.1, frequency_penalty=0.05, seed=42)
    print("A", [s.sample(logits) for _ in range(48)])
    s = Sampler(temperature=1.0, seed=1234)
    print("B", [s.sample(logits) for _ in range(32)])
    v = [f32(f32(((i * 7919) % 500) / 50.0) - 5.0) for i in range(1000)]
    s = Sampler(temperature=1.3, top_p=0.8, min_p=0.02, repeat_penalty=1.2, repeat_last_n=16, seed=7)
    print("C", [s.sample(v) for _ in range(40)])
    s = Sampler(temperature=0.5, top_k=300, top_p=0.97, seed=8)
    print("D", [s.sample(v) for _ in range(40)])
    h = 1469598103934665603
    for T in (1.0, 0.7, 1.3):
        kt = 4294967296.0 * 1.4426950408889634 / f32(T)
        for i in range(20000):
            h = ((h ^ weight(f32(3.25 - f32(i / 577.0)), 3.25, kt)) * 1099511628211) & M64
    print("weight hash %016x" % h)
    kt = 4294967296.0 * 1.4426950408889634
    print("weights", weight(-1.0, 0.0, kt), weight(-0.5, 0.0, kt), weight(-30.0, 0.0, kt), weight(f32(-1e-9), 0.0, kt),
          exp2_q44(-2**32), exp2_q44(-1))
