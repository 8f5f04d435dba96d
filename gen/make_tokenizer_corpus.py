#!/usr/bin/env python3
"""Builds test/fixtures/tokenizer/corpus.txt: the tokenizer test corpus (one case per line).

Run once on a Debian machine (it reads translations from /usr/share/locale, licence texts,
C headers and Python/JS sources that ship with the system); the output is committed, so the
tests never run this. Deterministic: the same system files give the same corpus.

Lines are split on b"\\n" only: a line may hold \\r, \\v, \\f, U+0085, U+2028 and friends.
A few lines are deliberately invalid UTF-8. See test/test_tokenizer.c for how multi-line
cases are built from these lines."""
import gettext, glob, os, random, re, sys, unicodedata

rng = random.Random(20251121)
out = []           # list of bytes (one per line, no b"\n")

def add(s):
    b = s.encode("utf-8") if isinstance(s, str) else s
    assert b"\n" not in b, repr(b)
    out.append(b)

def take_lines(path, n, minlen=1, maxlen=400, enc="utf-8"):
    try:
        with open(path, encoding=enc, errors="strict") as f:
            lines = [l.rstrip("\n") for l in f]
    except (OSError, UnicodeDecodeError):
        return []
    lines = [l for l in lines if minlen <= len(l) <= maxlen]
    if len(lines) <= n:
        return lines
    start = rng.randrange(0, len(lines) - n)
    return lines[start:start + n]

# ---- 1. English prose -----------------------------------------------------------------------
for lic, n in [("GPL-3", 160), ("Apache-2.0", 90), ("GFDL-1.3", 80), ("MPL-2.0", 70), ("Artistic", 40)]:
    for l in take_lines("/usr/share/common-licenses/" + lic, n, minlen=2):
        add(l)
prose = [
    "The quick brown fox jumps over the lazy dog.",
    "It's a truth universally acknowledged, that a single man in possession of a good fortune, must be in want of a wife.",
    "I'm sure you'll agree: we'd've done it differently if they'd asked. Don't you think so? She's right, isn't she?",
    "SHOUTING WORDS LIKE DON'T AND WON'T AND I'LL AND THEY'RE AND WE'VE AND HE'D.",
    "Mixed CaSe: McDonald's iPhone eBay YouTube JavaScript HTTPServer XMLHttpRequest camelCaseWords snake_case_words.",
    "Typographic quotes: “double”, ‘single’, it’s, don’t, «guillemets», „low-high“ — em dash – en dash … ellipsis.",
    "Mr. Smith paid $1,234.56 for 3.5 kg of apples on 2024-03-15 at 10:45:30 a.m. (that's 12% more than last year).",
    "e.g. i.e. etc. vs. Dr. St. Jr. U.S.A. Ph.D. A.M. p.m.",
    "'s 't 're 've 'm 'll 'd 'S 'T 'RE 'VE 'M 'LL 'D 'x 'abc ''s '''",
    "rock'n'roll o'clock ma'am y'all 'tis '90s the '80s' best",
    "a b c d e f g h i j k l m n o p q r s t u v w x y z A B C D E F G H I J K L M N O P Q R S T U V W X Y Z",
    "Supercalifragilisticexpialidocious antidisestablishmentarianism pneumonoultramicroscopicsilicovolcanoconiosis",
    "The naïve café owner’s résumé mentioned his façade, coöperation and piñata business in São Paulo.",
    "Straße, Größe, Übermäßig, ÄÖÜ äöü ß ẞ; Ærøskøbing; Łódź; Dvořák; İstanbul ılık; Ørsted; Þingvellir",
    "Long s in old print: ſ, ſo, Congreſs, it'ſ, IT'ſ — and the Kelvin sign K, Ångström sign Å, Ohm sign Ω.",
]
for p in prose:
    add(p)

# ---- 2. source code -------------------------------------------------------------------------
pyroot = os.path.dirname(os.__file__)
for name, n in [("json/encoder.py", 40), ("textwrap.py", 40), ("heapq.py", 40), ("argparse.py", 50), ("string.py", 30)]:
    for l in take_lines(os.path.join(pyroot, name), n):
        add(l)
for name, n in [("stdio.h", 40), ("stdlib.h", 30), ("string.h", 25), ("math.h", 25), ("pthread.h", 30)]:
    for l in take_lines("/usr/include/" + name, n):
        add(l)
js = sorted(glob.glob("/usr/lib/node_modules/npm/lib/**/*.js", recursive=True))
for path in js[:: max(1, len(js) // 6)][:6]:
    for l in take_lines(path, 25):
        add(l)
for path in ["/etc/profile", "/etc/bash.bashrc", "/usr/bin/ldd", "/usr/bin/zdiff"]:
    for l in take_lines(path, 20):
        add(l)
code = [
    'fn main() { let v: Vec<u32> = (0..10).map(|x| x * x).collect(); println!("{:?}", v); }',
    "impl<'a, T: Clone + Send + 'static> Iterator for Foo<'a, T> { type Item = &'a T; }",
    'package main; import "fmt"; func main() { ch := make(chan int, 3); go func() { ch <- 42 }(); fmt.Println(<-ch) }',
    "SELECT u.id, COUNT(*) AS n FROM users u LEFT JOIN orders o ON o.user_id = u.id WHERE u.created_at >= '2024-01-01' GROUP BY u.id HAVING n > 3;",
    "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>Test &amp; &lt;ok&gt;</title></head><body><p class='x'>Hi</p></body></html>",
    '{"name": "moe", "version": [0, 1, 0], "nested": {"a": null, "b": true, "c": -1.5e-10, "d": "\\u00e9\\n"}}',
    "public static <T extends Comparable<? super T>> void sort(List<T> list) { Collections.sort(list); }",
    "template <typename T> constexpr auto square(T x) -> decltype(x * x) { return x * x; } // C++14",
    "$ git log --oneline | head -n 5 && echo \"done\" > /dev/null 2>&1 || exit 1",
    "x = [i**2 for i in range(10) if i % 2 == 0]; y = {k: v for k, v in zip('abc', (1, 2, 3))}; print(f'{x=} {y!r:>20}')",
    "#define MAX(a, b) ((a) > (b) ? (a) : (b))\t/* classic */",
    "    if (ptr != NULL && *ptr != '\\0') { ptr++; } else { return -EINVAL; }",
    "\t\tfor (int i = 0; i < n; ++i) {\t// tabs then code",
    "let re = /^(?:[a-z0-9!#$%&'*+/=?^_`{|}~-]+)@(?:[a-z0-9-]+\\.)+[a-z]{2,}$/i;",
    "https://example.com/path/to/page?query=value&other=123#fragment mailto:someone@example.org ftp://ftp.example.net/pub/",
    "C:\\Users\\Public\\Documents\\file (1).txt and /usr/local/lib/python3.11/site-packages/",
    "\\begin{equation} \\int_0^\\infty e^{-x^2} \\, dx = \\frac{\\sqrt{\\pi}}{2} \\end{equation}",
    "| col1 | col2 |\\n|------|------| **bold** _italic_ `code` ~~strike~~ [link](http://x.y)",
    "0x7fffffff 0b1010 0o755 1e10 1E-5 .5 5. 1_000_000 0xDEAD_BEEF 3.14159265358979323846264338327950288",
    "#!/usr/bin/env python3",
    "    ",
    "==== ---- **** //// \\\\\\\\ ____ ++++ ~~~~ ^^^^ !!!! ???? .... ,,,, ;;;; :::: ((((  ))))",
]
for c in code:
    add(c)

# ---- 3. translations: CJK, Arabic, Hindi and more --------------------------------------------
def mo_strings(lang, n):
    res = []
    for path in sorted(glob.glob("/usr/share/locale/%s/LC_MESSAGES/*.mo" % lang)):
        try:
            t = gettext.GNUTranslations(open(path, "rb"))
        except Exception:
            continue
        for k, v in t._catalog.items():
            if not k or not isinstance(v, str):
                continue
            for line in v.split("\n"):
                if 3 <= len(line) <= 300 and not line.isascii():
                    res.append(line)
    res = sorted(set(res))
    rng.shuffle(res)
    return res[:n]

for lang, n in [("zh_CN", 110), ("zh_TW", 60), ("ja", 110), ("ko", 90), ("ar", 80), ("hi", 80), ("ru", 40),
                ("el", 25), ("he", 25), ("th", 25), ("vi", 30), ("fa", 20), ("bn", 20), ("ta", 20), ("uk", 15),
                ("tr", 15), ("pl", 15), ("fr", 15), ("de", 15), ("es", 15), ("ka", 10), ("am", 10), ("my", 10),
                ("si", 10), ("km", 10)]:
    for s in mo_strings(lang, n):
        add(s)
native = [
    "我们今天去公园散步，天气非常好。人工智能正在改变世界。",
    "東京は日本の首都です。ひらがな、カタカナ、漢字を混ぜて書きます。ｶﾀｶﾅ（半角）もあります。",
    "안녕하세요! 저는 한국어를 공부하고 있어요. 대한민국 서울특별시",
    "مرحبا بالعالم! هذه جملة باللغة العربية مع أرقام ١٢٣٤٥ و 12345.",
    "नमस्ते दुनिया! यह हिंदी में एक वाक्य है। क्षत्रिय, ज्ञान, श्री, द्वितीय।",
    "Привет, мир! Съешь же ещё этих мягких французских булок, да выпей чаю.",
    "Γειά σου Κόσμε! Ξεσκεπάζω την ψυχοφθόρα βδελυγμία.",
    "שלום עולם! עברית נכתבת מימין לשמאל.",
    "สวัสดีชาวโลก ภาษาไทยไม่มีการเว้นวรรคระหว่างคำ",
    "Tiếng Việt có rất nhiều dấu: ầ ẩ ẫ ấ ậ ề ể ễ ế ệ ồ ổ ỗ ố ộ ừ ử ữ ứ ự",
    "中文English混合text123数字４５６全角ＡＢＣ",
]
for s in native:
    add(s)

# ---- 4. emoji -------------------------------------------------------------------------------
ZWJ, VS16 = "\u200d", "\ufe0f"
tones = ["\U0001F3FB", "\U0001F3FC", "\U0001F3FD", "\U0001F3FE", "\U0001F3FF"]
emoji = [
    "😀😃😄😁😆😅😂🤣☺️😊", "👍👍🏻👍🏼👍🏽👍🏾👍🏿", "👨‍👩‍👧‍👦 family, 👩‍❤️‍💋‍👨 kiss, 🏳️‍🌈 flag, 🏴‍☠️ pirate",
    "🇺🇸🇬🇧🇯🇵🇨🇳🇩🇪🇫🇷🇮🇳🇧🇷 flags", "#️⃣ *️⃣ 0️⃣ 1️⃣ 2️⃣ keycaps", "❤️ ♥ ❤ ♡ 💔 💕 💖",
    "🧑🏽‍💻 coding, 👩🏿‍🚀 astronaut, 🧔🏻‍♂️ beard, 🤷‍♀️ shrug, 🙋🏾‍♂️",
    "Hello 👋 world 🌍! Good job 👏👏👏 #blessed 🙏",
    "🏴󠁧󠁢󠁳󠁣󠁴󠁿 Scotland tag sequence, 🏴󠁧󠁢󠁷󠁬󠁳󠁿 Wales",
    "☕️🍕🍔🍟🌭🍿🥓🥚🍳🧇🥞🧈🍞🥐🥨🥯🥖🧀🥗🥙🥪🌮🌯", "↔️ ↕️ ©️ ®️ ™️ ℹ️ Ⓜ️ ㊗️ ㊙️",
]
for e in emoji:
    add(e)
bases = ["👋", "👍", "🧑", "👩", "👨", "🙌", "🤝", "💪", "🦶", "👂"]
for i in range(40):
    s = []
    for _ in range(rng.randrange(1, 8)):
        k = rng.randrange(4)
        b = rng.choice(bases)
        if k == 0:
            s.append(b + rng.choice(tones))
        elif k == 1:
            s.append(b + ZWJ + rng.choice(["💻", "🚀", "🔬", "🎨", "🍳"]))
        elif k == 2:
            s.append(b + rng.choice(tones) + ZWJ + rng.choice(["♂", "♀"]) + VS16)
        else:
            s.append(b)
        s.append(rng.choice(["", " ", "  ", ", ", "!", "x"]))
    add("".join(s))

# ---- 5. accents, combining marks, normalization corner cases ---------------------------------
words = ["café", "naïve", "résumé", "Åström", "Zoë", "coöperate", "piñata", "élève", "Ñandú", "Ελληνικά", "Việt Nam",
         "한국어", "ぱぴぷぺぽ", "ガギグゲゴ", "Ǆemal", "ǅ", "ﬁnance ﬂow", "ﬀ ﬃ ﬄ ﬅ ﬆ"]
for w in words:
    add(w)
    add(unicodedata.normalize("NFD", w))
    add(unicodedata.normalize("NFKC", w) + " | " + unicodedata.normalize("NFKD", w))
norm = [
    "a\u0323\u0307 a\u0307\u0323 q\u0307\u0323 q\u0323\u0307 (non-canonical order of marks)",
    "e\u0301\u0301\u0301 o\u0308\u0304 u\u0308\u0301 A\u030a \u212b \u2126 \u212a",
    "\u1100\u1161\u11a8 \u1100\u1161 \u110b\u1173\u11af (conjoining jamo) 각 가 읅",
    "\uf900\uf901\uf902 \ufa10 \U0002f800\U0002f801 (CJK compatibility ideographs)",
    "Z̸̢̛̪͍̠̰̦̫͙̈́̀̐̈́͊̓͒a̷̡̧̛̮̤͔̙̣͊̿̆̑͂̓l̴̢̛̲̠̗̠͋̿͊̆̌͘g̶̢̛̪̝͎̤̿̋̀͌͝o̵̡̢̜̮̗̺͑̆̅̓̽̚ text",
    "\u0301 leading combining mark, then \u0301\u0301abc and 1\u0301 and \u0301 \u0301",
    "\u0915\u093c \u0958 \u09a1\u09bc \u0b21\u0b3c (nukta forms, composition exclusions)",
    "\u0344 \u0340\u0341 \u0343 \u0f73 \u0f75 \u0f81 (singletons and non-starter decompositions)",
    "\u00c5\u030a A\u030a\u030a \u1e0b\u0323 \u1e0d\u0307 \u0045\u0327\u0306",
    "\u2000\u2001 \u2126\u212a\u212b \u2329\u232a \u1fee\u1fef \u0374\u037e\u0387",
    "\u0c48 \u0c46\u0c56 \u0dda \u0dd9\u0dca \u0b48 \u0b47\u0b56 \u1025\u102e",
    "\U0001d15e\U0001d15f \U0001d1bb \U000110ab \U000110a5\U000110ba",
    "x\u034f\u0301y x\u200d\u0301y x\u200c\u0301y (CGJ, ZWJ, ZWNJ)",
    "\u3099\u309a \u304b\u3099 \u30cf\u309a \uff76\uff9e (kana voicing marks)",
    "Å (U+00C5) vs Å (A + U+030A) vs Å (U+212B); é vs é; ñ vs ñ",
]
for s in norm:
    add(s)
for i in range(40):   # random base + random marks, some out of canonical order
    marks = [0x300, 0x301, 0x302, 0x303, 0x308, 0x30a, 0x323, 0x327, 0x328, 0x331, 0x345, 0x5b0, 0x5b4, 0x64b, 0x650,
             0x651, 0x93c, 0x94d, 0x1dc0, 0x20d0, 0x302a, 0xfe20]
    s = []
    for _ in range(rng.randrange(3, 12)):
        s.append(rng.choice("aeiouAEIOUnNcCsSzZwy ΑΩαωиИ가ㄱ"))
        for _ in range(rng.randrange(0, 4)):
            s.append(chr(rng.choice(marks)))
    add("".join(s))

# ---- 6. numbers -----------------------------------------------------------------------------
for n in range(1, 41):
    add("".join(str(rng.randrange(10)) for _ in range(n)))
for n in range(1, 31):
    x = rng.randrange(10 ** n)
    add("%d %s -%d +%d.%d %d%%" % (x, "{:,}".format(x), x, x, rng.randrange(1000), x % 997))
nums = [
    "3.14159 2.71828 1.41421 6.02214076e23 -273.15 1/3 0.000001 1,000,000.00 1.000.000,00 1 000 000",
    "Phone: +1 (555) 123-4567, ISBN 978-3-16-148410-0, IPv4 192.168.001.010, IPv6 fe80::1ff:fe23:4567:890a",
    "Dates 2024-01-31 31/01/2024 01.31.2024 12:00:00Z 23:59:59.999+05:30",
    "٠١٢٣٤٥٦٧٨٩ ۰۱۲۳۴۵۶۷۸۹ ०१२३४५६७८९ ০১২৩৪৫৬৭৮৯ ０１２３４５６７８９ ๐๑๒๓๔๕๖๗๘๙",
    "x² y³ 10⁻⁹ H₂O ½ ¼ ¾ ⅓ ⅞ Ⅻ ⅻ ① ② ⑳ ㉑ 🄀 🄁 𝟘𝟙𝟚 𝟎𝟏𝟐",
    "123abc abc123 a1b2c3 1a2b3c 12.34.56 1..2 1,,2 v1.2.3-rc.4+build.567",
    "ten thousand 10000 10 000 10'000 10_000 1e4 0x2710",
    "9999999999999999999999999999999999999999999999999999999999999999999999999999999999",
    "1234567890" * 20,
]
for s in nums:
    add(s)

# ---- 7. whitespace --------------------------------------------------------------------------
ws = [" ", "  ", "   ", "    ", "\t", "\t\t", " \t", "\t ", "\r", "\r\r", " \r", "\u00a0", "\u3000", "\u2003", "\u200b",
      "\u0085", "\u2028", "\u2029", "\u000b", "\u000c", "\u001c", "\u001f", "\u180e", "\u202f", "\u205f", "\ufeff"]
for i in range(70):
    parts = []
    for _ in range(rng.randrange(2, 7)):
        parts.append(rng.choice(["word", "x", "Hello", "123", "!", "é", "中文", "'s", "<tag>", ""]))
        parts.append("".join(rng.choice(ws) for _ in range(rng.randrange(1, 6))))
    add("".join(parts))
for w in [" ", "\t", "  ", " \t "]:
    for n in [1, 2, 3, 7, 16, 33]:
        add(w * n)
        add(w * n + "x")
        add("x" + w * n)
        add("x" + w * n + "y")
add("trailing spaces   ")
add("   leading spaces")
add("\t\tleading tabs and trailing tabs\t\t")
add("a" * 300)
add(" a" * 200)
add("ab" * 250 + "!")
add("\u4e00" * 400)
add("🙂" * 100)

# ---- 8. special-token text ------------------------------------------------------------------
specials = ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<think>", "</think>", "<tool_call>", "<|fim_prefix|>",
            "<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>", "<unused0>", "<unused123>", "<pad>", "<mask>",
            "[multimodal]", "<start_of_image>", "<|start|>", "<|end|>", "<|message|>", "<|channel|>", "<|return|>",
            "<|call|>", "<|constrain|>", "<|startoftext|>", "<|reserved_200000|>", "<|endofprompt|>", "<0x41>", "<unk>"]
for s in specials:
    add(s)
    add("text " + s + " more" + s + s + "end")
add("<|im_start|>user hello<|im_end|><|im_start|>assistant hi<|im_end|>")
add("<start_of_turn>user What is 2+2?<end_of_turn><start_of_turn>model 4<end_of_turn>")
add("<|start|>user<|message|>Hi<|end|><|start|>assistant<|channel|>final<|message|>Hello!<|return|>")
add("<|im_start <|im_start| <|im_start|x <im_start|> <<|im_end|>> |im_end|> <|IM_END|> < |im_end| >")
add("<think>reasoning</think>answer <think></think> <thinking> </think >")
add("<|endoftext|><|endoftext|><|endoftext|>x<|endoftext|>")
add("prefix<|fim_prefix|>def f():<|fim_suffix|>    return 1<|fim_middle|>")
add("<start_of_turn><end_of_turn><start_of_turn>")
add("<unused99><unused6241><unused6242><unused-1><unused>")
add("\t\t\t<start_of_turn>\t\t  <end_of_turn>  ▁▁▁ ▁ ▁▁")

# ---- 9. invalid UTF-8 (bytes) ----------------------------------------------------------------
bad = [
    b"lone continuation \x80 byte", b"\xff\xfe\xfd bytes that never occur", b"truncated \xe4\xb8 CJK",
    b"overlong slash \xc0\xaf and NUL \xc0\x80", b"surrogate \xed\xa0\x80\xed\xbf\xbf half", b"too big \xf4\x90\x80\x80",
    b"\xf0\x9f\x98 truncated emoji at start", b"ends with lead byte \xe2", b"\xc3\x28 invalid 2-byte", b"\xa0\xa1",
    b"valid \xc3\xa9 then invalid \xc3 and valid \xe2\x82\xac", b"\x80\x80\x80\x80\x80\x80\x80\x80",
    b"<|im_end\xff|> <|im_end|>\xfe", b"  \xe3\x81 spaces \xe3\x81\x82 ok", b"\xf8\x88\x80\x80\x80 5-byte",
    b"\xed\x9f\xbf\xee\x80\x80 edge of surrogates is valid, \xef\xbf\xbf too", b"a\x00b NUL inside",
]
for b in bad:
    add(b)

# ---- pad with more prose/code/translations to a healthy size ---------------------------------
for l in take_lines("/usr/share/common-licenses/GPL-2", 120, minlen=2):
    add(l)
for s in mo_strings("zh_CN", 220)[110:]:
    add(s)

sys.stdout.buffer.write(b"".join(l + b"\n" for l in out))
print("lines:", len(out), file=sys.stderr)
