/* check_nfc.c — conformance of moe.c's NFC against the Unicode NormalizationTest.txt (a
   developer check; the tokenizer tests cover NFC through the Qwen3 vocabulary).

       python3 -c "import bz2; open('/tmp/NormalizationTest.txt','wb').write(bz2.open('/usr/share/unicode/NormalizationTest.txt.bz2').read())"
       cc -O2 -I. gen/check_nfc.c -o build/check_nfc -lm -lpthread -ldl && build/check_nfc /tmp/NormalizationTest.txt

   Checks NFC(c1..c3) = c2 and NFC(c4, c5) = c4 on every line, through both nfc() and the
   stretch-wise nfc_spans() the tokenizer uses. */
#include "../moe.c"
#include "../moe_vk.c"
#include "../shaders_embedded.c"

static size_t parse(const char *f, uint8_t *o) {
    size_t n = 0;
    char *e;
    const char *p = f;
    while (*p && *p != ';') {
        unsigned long c = strtoul(p, &e, 16);
        n += (size_t)utf8_put((uint32_t)c, o + n);
        p = e;
        while (*p == ' ') p++;
    }
    return n;
}

int main(int argc, char **argv) {
    if (argc < 2 || !uc_ready()) { fprintf(stderr, "usage: %s NormalizationTest.txt\n", argv[0]); return 2; }
    FILE *f = fopen(argv[1], "r");
    if (!f) { perror(argv[1]); return 2; }
    char line[4096];
    int bad = 0, total = 0;
    while (fgets(line, sizeof line, f)) {
        if (line[0] == '#' || line[0] == '@' || line[0] == '\n') continue;
        char *col[5], *p = line;
        for (int i = 0; i < 5; i++) { col[i] = p; p = strchr(p, ';') + 1; }
        uint8_t src[5][256], out[1024], out2[1024];
        uint32_t cps[2048];
        size_t n[5];
        for (int i = 0; i < 5; i++) n[i] = parse(col[i], src[i]);
        static const int want[5] = {1, 1, 1, 3, 3};
        for (int i = 0; i < 5; i++) {
            size_t m = nfc(src[i], n[i], out, cps), w = n[want[i]];
            int changed;
            size_t m2 = nfc_spans(src[i], n[i], out2, cps, &changed);
            if (!changed) { memcpy(out2, src[i], n[i]); m2 = n[i]; }
            total++;
            if (m != w || memcmp(out, src[want[i]], w) || m2 != w || memcmp(out2, src[want[i]], w)) {
                if (bad++ < 10) printf("column %d wrong: %s", i + 1, line);
            }
        }
    }
    fclose(f);
    printf("%d of %d NFC checks wrong (Unicode %s tables)\n", bad, total, MOE_UNICODE_VERSION);
    return bad != 0;
}
