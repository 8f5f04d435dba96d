#!/usr/bin/env python3
"""Generates the Unicode tables of moe.c's tokenizer and rewrites them in place, between the
lines `/* BEGIN GENERATED UNICODE TABLES` and `/* END GENERATED UNICODE TABLES */`.

    python3 gen/gen_unicode_tables.py [moe.c] [UCD directory, default /usr/share/unicode]

Reads UnicodeData.txt (general categories, canonical combining classes, decompositions),
PropList.txt (White_Space) and DerivedNormalizationProps.txt (NFC_QC, Full_Composition_Exclusion)
from Debian's unicode-data package.

Each table is a string (emitted as rows of 96 characters, see emit()) of unsigned varints, 5 bits per character, least significant group first:
a character of K_DIGITS at index d < 32 ends a number, d >= 32 carries (d - 32) and continues.
  k_ucat     ranges: (start - previous start) << 4 | class; a class holds until the next start.
             Classes (UCAT_*): 0 other, 1 upper (Lu, Lt), 2 lower (Ll), 3 other letter (Lm, Lo),
             4 mark (M*), 5 number (N*), 6 White_Space, 7 Lu at even / Ll at odd code points,
             8 Ll at even / Lu at odd. Lu/Lt and Lm/Lo are merged: no supported split regex
             tells them apart.
  k_unorm    ranges: (start - previous start) << 10 | NFC_QC << 8 | ccc (NFC_QC 0 yes, 1 no, 2 maybe)
  k_udecomp  canonical decompositions, three numbers each: (code point - previous) << 1 |
             excluded-from-composition, first, second (0 for singletons). Hangul is algorithmic."""
import os, re, sys

moe_c = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "..", "moe.c")
ucd = sys.argv[2] if len(sys.argv) > 2 else "/usr/share/unicode"
MAXCP = 0x110000


def read_ranges(path, want):
    """{prop: [(lo, hi)]} for lines 'lo..hi ; prop' whose prop is in want."""
    out = {}
    for line in open(path, encoding="utf-8"):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        fields = [f.strip() for f in line.split(";")]
        key = ";".join(fields[1:])
        if key not in want:
            continue
        r = fields[0].split("..")
        lo = int(r[0], 16)
        hi = int(r[1], 16) if len(r) > 1 else lo
        out.setdefault(key, []).append((lo, hi))
    return out


version = "?"
for line in open(os.path.join(ucd, "ReadMe.txt"), encoding="utf-8", errors="replace"):
    m = re.search(r"Version (\d+\.\d+\.\d+)", line) or re.search(r"(\d+\.\d+\.\d+)", line)
    if m and "Unicode" in line:
        version = m.group(1)
        break

gc = bytearray(MAXCP)       # class per code point
ccc = bytearray(MAXCP)
decomp = {}
CLS = {"Lu": 1, "Ll": 2, "Lt": 3, "Lm": 4, "Lo": 5, "Mn": 6, "Mc": 6, "Me": 6, "Nd": 7, "Nl": 7, "No": 7}
first = None
for line in open(os.path.join(ucd, "UnicodeData.txt"), encoding="utf-8"):
    f = line.rstrip("\n").split(";")
    cp = int(f[0], 16)
    name, cat = f[1], f[2]
    if name.endswith(", First>"):
        first = cp
        continue
    lo = first if name.endswith(", Last>") else cp
    first = None
    for c in range(lo, cp + 1):
        gc[c] = CLS.get(cat, 0)
        ccc[c] = int(f[3])
    if f[5] and not f[5].startswith("<"):
        parts = [int(x, 16) for x in f[5].split()]
        assert len(parts) in (1, 2)
        decomp[cp] = parts
for lo, hi in read_ranges(os.path.join(ucd, "PropList.txt"), {"White_Space"})["White_Space"]:
    for c in range(lo, hi + 1):
        gc[c] = 8
norm = read_ranges(os.path.join(ucd, "DerivedNormalizationProps.txt"), {"NFC_QC;N", "NFC_QC;M", "Full_Composition_Exclusion"})
qc = bytearray(MAXCP)
for lo, hi in norm["NFC_QC;N"]:
    for c in range(lo, hi + 1):
        qc[c] = 1
for lo, hi in norm["NFC_QC;M"]:
    for c in range(lo, hi + 1):
        qc[c] = 2
excl = set()
for lo, hi in norm["Full_Composition_Exclusion"]:
    excl.update(range(lo, hi + 1))


def runs(values):
    out, prev = [], None
    for c in range(MAXCP):
        if values[c] != prev:
            out.append((c, values[c]))
            prev = values[c]
    return out


DIGITS = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz+-"


def varint(x):
    out = ""
    while True:
        if x < 32:
            return out + DIGITS[x]
        out += DIGITS[32 + (x & 31)]
        x >>= 5


def alternate(rs):
    """Merges runs of single code points that alternate upper/lower into classes 7 and 8."""
    out, i = [], 0
    while i < len(rs):
        j = i
        while j + 1 < len(rs) and rs[j + 1][0] - rs[j][0] == 1 and rs[j][1] in (1, 2) and (j == i or rs[j][1] != rs[j - 1][1]):
            j += 1
        if j - i >= 3:
            start = rs[i][0]
            out.append((start, 7 if (start % 2 == 0) == (rs[i][1] == 1) else 8))
            i = j
        else:
            out.append(rs[i])
            i += 1
    return out


ROW = 96


def emit(name, values):
    """A table as rows of ROW characters without terminating NULs (char rows[][ROW]), read through
    one pointer to the whole array: ISO C only promises string literals of 4095 characters, so one
    concatenated literal per table would not build with -pedantic."""
    s = "".join(varint(v) for v in values)
    lines = ["static const char %s_rows[][%d] = { /* %d values */" % (name, ROW, len(values))]
    for i in range(0, len(s), ROW):
        lines.append('    "%s",' % s[i:i + ROW])
    lines.append("};")
    lines.append("static const char *const %s = (const char *)&%s_rows;" % (name, name))
    return "\n".join(lines)


MERGE = [0, 1, 2, 1, 3, 3, 4, 5, 6]     # UnicodeData class above -> table class
ucat = alternate(runs([MERGE[x] for x in gc]))
unorm = runs([qc[c] << 8 | ccc[c] for c in range(MAXCP)])
dec = sorted(decomp.items())


def deltas(rs, shift):
    out, prev = [], 0
    for s, v in rs:
        out.append((s - prev) << shift | v)
        prev = s
    return out


dvals, prev = [], 0
for cp, d in dec:
    dvals += [(cp - prev) << 1 | (1 if (cp in excl or len(d) == 1) else 0), d[0], d[1] if len(d) > 1 else 0]
    prev = cp
body = [
    "/* BEGIN GENERATED UNICODE TABLES: gen/gen_unicode_tables.py from the Unicode %s character database" % version,
    "   (%d category ranges, %d normalization ranges, %d canonical decompositions); do not edit. */" % (
        len(ucat), len(unorm), len(dec)),
    "#define MOE_UNICODE_VERSION \"%s\"" % version,
    "#define K_DIGITS \"%s\"" % DIGITS,
    "enum { K_UCAT_N = %d, K_UNORM_N = %d, K_UDECOMP_N = %d };" % (len(ucat), len(unorm), len(dec)),
    emit("k_ucat", deltas(ucat, 4)),
    emit("k_unorm", deltas(unorm, 10)),
    emit("k_udecomp", dvals),
    "/* END GENERATED UNICODE TABLES */",
]
text = open(moe_c, encoding="utf-8").read()
a = text.index("/* BEGIN GENERATED UNICODE TABLES")
b = text.index("/* END GENERATED UNICODE TABLES */") + len("/* END GENERATED UNICODE TABLES */")
new = text[:a] + "\n".join(body) + text[b:]
if new != text:
    open(moe_c, "w", encoding="utf-8").write(new)
print("unicode %s: %d category ranges, %d norm ranges, %d decompositions" % (version, len(ucat), len(unorm), len(dec)))
