/* embed_shaders.c — compiles the compute shaders in gen/ to SPIR-V with glslangValidator and
   writes them into shaders_embedded.c as uint32_t arrays with a name table sorted by name.

     embed_shaders GEN_DIR OUT.c            compile every variant below, write OUT.c
     embed_shaders --check GEN_DIR FILE.c   exit 1 if FILE.c was made from other sources
                                            (compares the source hash; needs no glslang)

   The source hash is FNV-1a over the names and bytes of the .comp and .glsl files of gen/ and of
   this file,
   so changing a shader, an include or the variant table makes the committed file stale.
   Variants are one source compiled with different -D defines (one per weight type, ...). */
#define _GNU_SOURCE
#include <dirent.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

typedef struct variant { char name[48], src[32], defs[64]; } variant;

static const char *const k_types[][2] = {
    {"f32", "T_F32"},   {"f16", "T_F16"},   {"bf16", "T_BF16"}, {"q8_0", "T_Q8_0"},  {"q4_0", "T_Q4_0"},
    {"q4_k", "T_Q4_K"}, {"q5_k", "T_Q5_K"}, {"q6_k", "T_Q6_K"}, {"mxfp4", "T_MXFP4"},
};
/* per weight type: name prefix, source, extra define */
static const char *const k_typed[][3] = {
    {"embed", "embed.comp", ""},
    {"mv", "mv.comp", ""},
    {"mm", "mm.comp", ""},
    {"mmg", "mm.comp", "-DGATEUP"},
    {"mmcm", "mm_cm.comp", ""},
    {"mmcmg", "mm_cm.comp", "-DGATEUP"},
};
static const char *const k_plain[][3] = {
    {"add", "add.comp", ""},
    {"attn_f16", "attn.comp", "-DKV_F16"},
    {"attn_f32", "attn.comp", "-DKV_F32"},
    {"headwise_f16", "headwise.comp", "-DKV_F16"},
    {"headwise_f32", "headwise.comp", "-DKV_F32"},
    {"kvstore_f16", "kvstore.comp", "-DKV_F16"},
    {"kvstore_f32", "kvstore.comp", "-DKV_F32"},
    {"moe_combine", "moe_combine.comp", ""},
    {"moe_sort", "moe_sort.comp", ""},
    {"rmsnorm", "rmsnorm.comp", ""},
    {"topk", "topk.comp", ""},
};

static int n_variants;
static variant variants[128];

static void add_variant(const char *name, const char *src, const char *d1, const char *d2) {
    variant *v = &variants[n_variants++];
    snprintf(v->name, sizeof v->name, "%s", name);
    snprintf(v->src, sizeof v->src, "%s", src);
    snprintf(v->defs, sizeof v->defs, "%s%s%s", d1, *d1 && *d2 ? " " : "", d2);
}

static int cmp_variant(const void *a, const void *b) {
    return strcmp(((const variant *)a)->name, ((const variant *)b)->name);
}

static void make_variants(void) {
    for (size_t f = 0; f < sizeof k_typed / sizeof k_typed[0]; f++)
        for (size_t t = 0; t < sizeof k_types / sizeof k_types[0]; t++) {
            char name[48], def[32];
            snprintf(name, sizeof name, "%s_%s", k_typed[f][0], k_types[t][0]);
            snprintf(def, sizeof def, "-D%s", k_types[t][1]);
            add_variant(name, k_typed[f][1], def, k_typed[f][2]);
        }
    for (size_t p = 0; p < sizeof k_plain / sizeof k_plain[0]; p++) add_variant(k_plain[p][0], k_plain[p][1], k_plain[p][2], "");
    qsort(variants, (size_t)n_variants, sizeof variants[0], cmp_variant);
}

static uint8_t *read_all(const char *path, size_t *n) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    size_t cap = 1 << 16, len = 0;
    uint8_t *buf = malloc(cap);
    for (;;) {
        if (len == cap) buf = realloc(buf, cap *= 2);
        size_t r = fread(buf + len, 1, cap - len, f);
        if (!r) break;
        len += r;
    }
    fclose(f);
    *n = len;
    return buf;
}

static uint64_t fnv(uint64_t h, const void *p, size_t n) {
    for (size_t i = 0; i < n; i++) h = (h ^ ((const uint8_t *)p)[i]) * 0x100000001b3ull;
    return h;
}

static int cmp_str(const void *a, const void *b) { return strcmp(*(char *const *)a, *(char *const *)b); }

static int source_hash(const char *dir, uint64_t *out) {
    DIR *d = opendir(dir);
    if (!d) { fprintf(stderr, "embed_shaders: cannot open %s\n", dir); return 0; }
    char *names[256];
    int n = 0;
    struct dirent *e;
    while ((e = readdir(d)) && n < 256) {
        size_t l = strlen(e->d_name);
        if ((l > 5 && !strcmp(e->d_name + l - 5, ".comp")) || (l > 5 && !strcmp(e->d_name + l - 5, ".glsl")) ||
            !strcmp(e->d_name, "embed_shaders.c"))
            names[n++] = strdup(e->d_name);
    }
    closedir(d);
    qsort(names, (size_t)n, sizeof names[0], cmp_str);
    uint64_t h = 0xcbf29ce484222325ull;
    for (int i = 0; i < n; i++) {
        char path[512];
        size_t len;
        snprintf(path, sizeof path, "%s/%s", dir, names[i]);
        uint8_t *b = read_all(path, &len);
        if (!b) { fprintf(stderr, "embed_shaders: cannot read %s\n", path); return 0; }
        h = fnv(h, names[i], strlen(names[i]) + 1);
        h = fnv(h, b, len);
        free(b);
        free(names[i]);
    }
    *out = h;
    return 1;
}

/* runs glslangValidator for variant i into tmp/<name>.spv; returns the child's pid */
static pid_t spawn(const char *gen, const char *tmp, const variant *v) {
    char out[512], src[512], inc[512];
    snprintf(out, sizeof out, "%s/%s.spv", tmp, v->name);
    snprintf(src, sizeof src, "%s/%s", gen, v->src);
    snprintf(inc, sizeof inc, "-I%s", gen);
    char defs[64];
    snprintf(defs, sizeof defs, "%s", v->defs);
    char *argv[16];
    int a = 0;
    argv[a++] = "glslangValidator";
    argv[a++] = "-V";
    argv[a++] = "-g0";
    argv[a++] = "--quiet";
    argv[a++] = "--target-env";
    argv[a++] = "vulkan1.2";
    argv[a++] = inc;
    for (char *tok = strtok(defs, " "); tok && a < 12; tok = strtok(NULL, " ")) argv[a++] = tok;
    argv[a++] = "-o";
    argv[a++] = out;
    argv[a++] = src;
    argv[a] = NULL;
    pid_t pid = fork();
    if (pid == 0) {
        execvp(argv[0], argv);
        perror("embed_shaders: glslangValidator");
        _exit(127);
    }
    return pid;
}

static int glslang_version(char *buf, size_t cap) {
    FILE *p = popen("glslangValidator --version 2>/dev/null", "r");
    if (!p) return 0;
    buf[0] = 0;
    char line[256];
    while (fgets(line, sizeof line, p))
        if (!strncmp(line, "Glslang Version:", 16)) {
            line[strcspn(line, "\n")] = 0;
            snprintf(buf, cap, "%.100s", line + 17);
        }
    return pclose(p) == 0 && buf[0];
}

int main(int argc, char **argv) {
    if (argc == 4 && !strcmp(argv[1], "--check")) {
        uint64_t h;
        if (!source_hash(argv[2], &h)) return 1;
        size_t n;
        uint8_t *b = read_all(argv[3], &n);
        if (!b) { fprintf(stderr, "embed_shaders: cannot read %s\n", argv[3]); return 1; }
        char want[64];
        snprintf(want, sizeof want, "source hash %016llx", (unsigned long long)h);
        int ok = memmem(b, n, want, strlen(want)) != NULL;
        free(b);
        if (!ok) fprintf(stderr, "%s is stale relative to %s/: run `make shaders` (with glslang-tools)\n", argv[3], argv[2]);
        return ok ? 0 : 1;
    }
    if (argc != 3) {
        fprintf(stderr, "usage: embed_shaders GEN_DIR OUT.c | embed_shaders --check GEN_DIR FILE.c\n");
        return 2;
    }
    const char *gen = argv[1], *out_path = argv[2];
    char ver[128];
    if (!glslang_version(ver, sizeof ver)) {
        fprintf(stderr, "embed_shaders: glslangValidator not found (Debian: apt-get install glslang-tools)\n");
        return 1;
    }
    uint64_t h;
    if (!source_hash(gen, &h)) return 1;
    make_variants();
    char tmp[] = "/tmp/moe_spv_XXXXXX";
    if (!mkdtemp(tmp)) { perror("embed_shaders: mkdtemp"); return 1; }
    long ncpu = sysconf(_SC_NPROCESSORS_ONLN);
    int par = ncpu < 1 ? 1 : ncpu > 16 ? 16 : (int)ncpu, running = 0, failed = 0;
    for (int i = 0; i < n_variants || running > 0;) {
        if (i < n_variants && running < par) {
            if (spawn(gen, tmp, &variants[i]) < 0) failed = 1;
            else running++;
            i++;
            continue;
        }
        int status;
        if (wait(&status) < 0) break;
        running--;
        if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) failed = 1;
    }
    if (failed) {
        fprintf(stderr, "embed_shaders: a shader failed to compile\n");
        return 1;
    }
    FILE *o = fopen(out_path, "w");
    if (!o) { perror(out_path); return 1; }
    fprintf(o, "/* shaders_embedded.c — GENERATED by gen/embed_shaders.c (make shaders). Do not edit.\n"
               "   SPIR-V of the compute shaders in gen/, compiled by glslangValidator %s\n"
               "   (-V -g0 --target-env vulkan1.2), with a name table sorted by name.\n"
               "   source hash %016llx */\n"
               "#define MOE_INTERNAL\n#include \"moe.h\"\n",
            ver, (unsigned long long)h);
    for (int i = 0; i < n_variants; i++) {
        char path[600];
        size_t n;
        snprintf(path, sizeof path, "%.400s/%.100s.spv", tmp, variants[i].name);
        uint8_t *b = read_all(path, &n);
        if (!b || n % 4) { fprintf(stderr, "embed_shaders: bad output %s\n", path); return 1; }
        fprintf(o, "\n/* %s: %s %s */\nstatic const uint32_t spv_%s[%zu] = {", variants[i].name, variants[i].src,
                variants[i].defs, variants[i].name, n / 4);
        for (size_t w = 0; w < n / 4; w++) {
            uint32_t x;
            memcpy(&x, b + 4 * w, 4);
            fprintf(o, "%s0x%08x,", w % 8 ? " " : "\n    ", x);
        }
        fprintf(o, "\n};\n");
        free(b);
        unlink(path);
    }
    rmdir(tmp);
    fprintf(o, "\nconst moe_spirv moe_vk_spirv[] = {\n");
    for (int i = 0; i < n_variants; i++)
        fprintf(o, "    {\"%s\", spv_%s, sizeof spv_%s},\n", variants[i].name, variants[i].name, variants[i].name);
    fprintf(o, "};\nconst size_t moe_vk_spirv_count = %d;\n", n_variants);
    if (fclose(o) != 0) { perror(out_path); return 1; }
    return 0;
}
