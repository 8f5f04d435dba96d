/* make_seeds — writes the seed corpora of the fuzz harnesses (test/fuzz/fuzz_*.c) with moe's own
   writers, small on purpose so that every execution stays cheap:

     build/fuzz/make_seeds OUT_DIR

   OUT_DIR/models/       tiny.gguf (the model the state harness steps), tok_bytes.json, tok_spm.json
   OUT_DIR/seeds/gguf/   tiny qwen3moe GGUF files (1 layer, 32 wide, ~300-token vocabularies,
                         Q8_0 / F16 / BF16 / Q4_0 / MXFP4 / Q4_K / Q6_K weights)
   OUT_DIR/seeds/hf/     Hugging Face directories packed as parts (config.json, model.safetensors,
                         tokenizer.json, tokenizer_config.json) joined by FUZZ_SEP
   OUT_DIR/seeds/json/   tokenizer.json, tokenizer_config.json, config.json joined by FUZZ_SEP
   OUT_DIR/seeds/tok/    one selector byte (vocabulary, flags) + text
   OUT_DIR/seeds/state/  one selector byte (context kind) + a moe_ctx_save blob of tiny.gguf

   It includes moe.c to reach the GGUF writer and the vocabulary writer (as gen/synth_model does). */
#include "../../moe.c"
#include "../../moe_vk.c"
#include "../../shaders_embedded.c"
#include "fuzz_common.h"

#include <sys/stat.h>

static const char *g_out;
static int g_failed;

static void die(const char *what) {
    fprintf(stderr, "make_seeds: %s: %s\n", what, moe_last_error());
    exit(1);
}

static void put_file(const char *sub, const char *name, const void *data, size_t n) {
    char path[512];
    snprintf(path, sizeof path, "%s/%s/%s", g_out, sub, name);
    FILE *f = fopen(path, "wb");
    if (!f || fwrite(data, 1, n, f) != n || fclose(f) != 0) {
        fprintf(stderr, "make_seeds: cannot write %s\n", path);
        exit(1);
    }
}

static uint8_t *read_all(const char *path, size_t *n) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    fseek(f, 0, SEEK_END);
    long l = ftell(f);
    fseek(f, 0, SEEK_SET);
    uint8_t *b = malloc((size_t)l + 1);
    if (b && fread(b, 1, (size_t)l, f) != (size_t)l) { free(b); b = NULL; }
    fclose(f);
    *n = (size_t)l;
    return b;
}

/* ---- a growing byte buffer ---- */
typedef struct sbuf2 { char *p; size_t n, cap; } sbuf2;
static void sb2_put(sbuf2 *b, const void *d, size_t n) {
    if (b->n + n + 1 > b->cap) {
        b->cap = (b->n + n + 1) * 2;
        b->p = realloc(b->p, b->cap);
        if (!b->p) exit(1);
    }
    memcpy(b->p + b->n, d, n);
    b->n += n;
    b->p[b->n] = 0;
}
static void sb2_s(sbuf2 *b, const char *s) { sb2_put(b, s, strlen(s)); }
static void sb2_utf8(sbuf2 *b, uint32_t c) {
    char u[4];
    int n = c < 0x80 ? 1 : c < 0x800 ? 2 : c < 0x10000 ? 3 : 4;
    if (n == 1) u[0] = (char)c;
    else if (n == 2) u[0] = (char)(0xC0 | c >> 6), u[1] = (char)(0x80 | (c & 63));
    else if (n == 3) u[0] = (char)(0xE0 | c >> 12), u[1] = (char)(0x80 | (c >> 6 & 63)), u[2] = (char)(0x80 | (c & 63));
    else u[0] = (char)(0xF0 | c >> 18), u[1] = (char)(0x80 | (c >> 12 & 63)), u[2] = (char)(0x80 | (c >> 6 & 63)), u[3] = (char)(0x80 | (c & 63));
    sb2_put(b, u, (size_t)n);
}
/* a JSON string of UTF-8 text s (n bytes) */
static void sb2_json_str(sbuf2 *b, const char *s, size_t n) {
    sb2_s(b, "\"");
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        char e[8];
        if (c == '"' || c == '\\') { e[0] = '\\'; e[1] = (char)c; sb2_put(b, e, 2); }
        else if (c < 0x20) { snprintf(e, sizeof e, "\\u%04x", c); sb2_put(b, e, 6); }
        else sb2_put(b, &s[i], 1);
    }
    sb2_s(b, "\"");
}

/* ---- two small vocabularies, as tokenizer.json ----------------------------------------------- */
/* merges as raw text pairs; each result becomes a token */
static const char *const k_merges[][2] = {
    {"t", "h"}, {"th", "e"}, {" ", "t"}, {" ", "the"}, {"a", "n"}, {"an", "d"}, {" ", "a"}, {" ", "and"},
    {"i", "n"}, {" ", "i"}, {" i", "n"}, {"e", "r"}, {"o", "u"}, {" ", "s"}, {"a", "i"}, {"ai", "d"},
    {" s", "aid"}, {"L", "O"}, {"LO", "R"}, {"LOR", "D"}, {" ", "G"}, {" G", "o"}, {" Go", "d"}, {"\n", "\n"},
    {"u", "n"}, {"un", "t"}, {"unt", "o"}, {" ", "unto"}, {"h", "i"}, {"hi", "m"},
};
#define N_MERGES ((int)(sizeof k_merges / sizeof k_merges[0]))

/* byte-level text of raw bytes (GPT-2 mapping) */
static void bytes_token(sbuf2 *b, const char *s) {
    for (const unsigned char *p = (const unsigned char *)s; *p; p++) sb2_utf8(b, g_byte_to_cp[*p]);
}

/* Byte-level BPE: the Qwen2 split with NFC (nfc = 1), or the Llama-3 split without normalizer. */
static char *tok_bytes_json(int nfc) {
    pthread_once(&g_bytemap_once, bytemap_init);
    sbuf2 b = {0};
    sb2_s(&b, "{\"version\":\"1.0\",\"added_tokens\":[");
    static const char *const added[] = {"<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>"};
    int base = 256 + N_MERGES;
    for (int i = 0; i < 4; i++) {
        char e[160];
        snprintf(e, sizeof e, "%s{\"id\":%d,\"content\":\"%s\",\"single_word\":false,\"lstrip\":false,\"rstrip\":false,"
                 "\"normalized\":false,\"special\":%s}", i ? "," : "", base + i, added[i], i < 3 ? "true" : "false");
        sb2_s(&b, e);
    }
    sb2_s(&b, "],\"normalizer\":");
    sb2_s(&b, nfc ? "{\"type\":\"NFC\"}" : "null");
    sb2_s(&b, ",\"pre_tokenizer\":{\"type\":\"Sequence\",\"pretokenizers\":[{\"type\":\"Split\",\"pattern\":{\"Regex\":");
    sb2_json_str(&b, k_split_regex[nfc ? 0 : 1][1], strlen(k_split_regex[nfc ? 0 : 1][1])); /* Qwen2 (NFC) or Llama-3 */
    sb2_s(&b, "},\"behavior\":\"Isolated\",\"invert\":false},{\"type\":\"ByteLevel\",\"add_prefix_space\":false,"
              "\"trim_offsets\":false,\"use_regex\":false}]},\"post_processor\":null,"
              "\"decoder\":{\"type\":\"ByteLevel\",\"add_prefix_space\":true,\"trim_offsets\":true,\"use_regex\":true},"
              "\"model\":{\"type\":\"BPE\",\"dropout\":null,\"unk_token\":null,\"continuing_subword_prefix\":\"\","
              "\"end_of_word_suffix\":\"\",\"fuse_unk\":false,\"byte_fallback\":false,\"ignore_merges\":false,\"vocab\":{");
    int id = 0;
    for (int c = 0; c < 256; c++, id++) {
        sbuf2 t = {0};
        char s[2] = {(char)c, 0};
        if (c == 0) sb2_utf8(&t, g_byte_to_cp[0]);
        else bytes_token(&t, s);
        if (id) sb2_s(&b, ",");
        sb2_json_str(&b, t.p, t.n);
        char e[24];
        snprintf(e, sizeof e, ":%d", id);
        sb2_s(&b, e);
        free(t.p);
    }
    for (int k = 0; k < N_MERGES; k++, id++) {
        char joined[64];
        snprintf(joined, sizeof joined, "%s%s", k_merges[k][0], k_merges[k][1]);
        sbuf2 t = {0};
        bytes_token(&t, joined);
        sb2_s(&b, ",");
        sb2_json_str(&b, t.p, t.n);
        char e[24];
        snprintf(e, sizeof e, ":%d", id);
        sb2_s(&b, e);
        free(t.p);
    }
    sb2_s(&b, "},\"merges\":[");
    for (int k = 0; k < N_MERGES; k++) {
        sbuf2 t = {0};
        bytes_token(&t, k_merges[k][0]);
        sb2_s(&t, " ");
        bytes_token(&t, k_merges[k][1]);
        if (k) sb2_s(&b, ",");
        sb2_json_str(&b, t.p, t.n);
        free(t.p);
    }
    sb2_s(&b, "]}}");
    return b.p;
}

/* SentencePiece-style BPE (Gemma-like): spaces as U+2581, byte fallback, <bos> added in front. */
static char *tok_spm_json(void) {
    sbuf2 b = {0};
    sb2_s(&b, "{\"version\":\"1.0\",\"added_tokens\":[{\"id\":0,\"content\":\"<pad>\",\"special\":true},"
              "{\"id\":1,\"content\":\"<eos>\",\"special\":true},{\"id\":2,\"content\":\"<bos>\",\"special\":true},"
              "{\"id\":3,\"content\":\"<unk>\",\"special\":true},{\"id\":4,\"content\":\"<end_of_turn>\",\"special\":true}],"
              "\"normalizer\":{\"type\":\"Replace\",\"pattern\":{\"String\":\" \"},\"content\":\"\xE2\x96\x81\"},"
              "\"pre_tokenizer\":{\"type\":\"Split\",\"pattern\":{\"String\":\" \"},\"behavior\":\"MergedWithPrevious\",\"invert\":false},"
              "\"decoder\":{\"type\":\"Sequence\",\"decoders\":[{\"type\":\"Replace\",\"pattern\":{\"String\":\"\xE2\x96\x81\"},"
              "\"content\":\" \"},{\"type\":\"ByteFallback\"},{\"type\":\"Fuse\"}]},"
              "\"model\":{\"type\":\"BPE\",\"dropout\":null,\"unk_token\":\"<unk>\",\"fuse_unk\":true,\"byte_fallback\":true,"
              "\"ignore_merges\":false,\"vocab\":{\"<pad>\":0,\"<eos>\":1,\"<bos>\":2,\"<unk>\":3,\"<end_of_turn>\":4");
    int id = 5;
    for (int c = 0; c < 256; c++, id++) {
        char e[32];
        snprintf(e, sizeof e, ",\"<0x%02X>\":%d", c, id);
        sb2_s(&b, e);
    }
    /* single characters, then the merges (with U+2581 for the space) */
    static const char *const chars = "abcdefghijklmnopqrstuvwxyzGLORD";
    for (const char *c = chars; *c; c++, id++) {
        char e[32];
        snprintf(e, sizeof e, ",\"%c\":%d", *c, id);
        sb2_s(&b, e);
    }
    char e[48];
    snprintf(e, sizeof e, ",\"\xE2\x96\x81\":%d", id++);
    sb2_s(&b, e);
    for (int k = 0; k < N_MERGES; k++) {
        if (strchr(k_merges[k][0], '\n')) continue;
        sbuf2 t = {0};
        for (const char *p = k_merges[k][0]; *p; p++) sb2_s(&t, *p == ' ' ? "\xE2\x96\x81" : (char[2]){*p, 0});
        for (const char *p = k_merges[k][1]; *p; p++) sb2_s(&t, *p == ' ' ? "\xE2\x96\x81" : (char[2]){*p, 0});
        sb2_s(&b, ",");
        sb2_json_str(&b, t.p, t.n);
        snprintf(e, sizeof e, ":%d", id++);
        sb2_s(&b, e);
        free(t.p);
    }
    sb2_s(&b, "},\"merges\":[");
    int first = 1;
    for (int k = 0; k < N_MERGES; k++) {
        if (strchr(k_merges[k][0], '\n')) continue;
        sbuf2 t = {0};
        for (const char *p = k_merges[k][0]; *p; p++) sb2_s(&t, *p == ' ' ? "\xE2\x96\x81" : (char[2]){*p, 0});
        sb2_s(&t, " ");
        for (const char *p = k_merges[k][1]; *p; p++) sb2_s(&t, *p == ' ' ? "\xE2\x96\x81" : (char[2]){*p, 0});
        if (!first) sb2_s(&b, ",");
        first = 0;
        sb2_json_str(&b, t.p, t.n);
        free(t.p);
    }
    sb2_s(&b, "]}}");
    return b.p;
}

static const char k_tc_bytes[] = "{\"add_bos_token\":false,\"eos_token\":\"<|im_end|>\",\"pad_token\":\"<|endoftext|>\","
                                 "\"chat_template\":\"{% for message in messages %}<|im_start|>{{ message.role }}\\n\"}";
static const char k_tc_spm[] = "{\"add_bos_token\":true,\"add_eos_token\":false,\"bos_token\":\"<bos>\",\"eos_token\":\"<eos>\","
                               "\"unk_token\":\"<unk>\",\"pad_token\":\"<pad>\"}";
static const char k_cfg_bytes[] = "{\"model_type\":\"qwen3_moe\",\"eos_token_id\":[288,286],\"bos_token_id\":null}";
static const char k_cfg_spm[] = "{\"model_type\":\"gemma3_text\",\"eos_token_id\":[1,4],\"bos_token_id\":2}";

/* Loads a tokenizer.json (written next to its configs in dir) as a vocabulary-only model. */
static moe_model *vocab_model(const char *dir, const char *json, const char *tc, const char *cfg) {
    char path[512];
    mkdir(dir, 0755);
    snprintf(path, sizeof path, "%s/tokenizer.json", dir);
    FILE *f = fopen(path, "wb");
    fputs(json, f);
    fclose(f);
    snprintf(path, sizeof path, "%s/tokenizer_config.json", dir);
    f = fopen(path, "wb");
    fputs(tc, f);
    fclose(f);
    snprintf(path, sizeof path, "%s/config.json", dir);
    f = fopen(path, "wb");
    fputs(cfg, f);
    fclose(f);
    snprintf(path, sizeof path, "%s/tokenizer.json", dir);
    moe_load_params lp = {0};
    lp.vocab_only = 1;
    moe_model *m = NULL;
    if (moe_load(path, &lp, &m)) die(path);
    return m;
}

/* ---- tiny qwen3moe GGUF files ----------------------------------------------------------------- */
enum { E = 32, HEADS = 2, KVH = 1, HD = 16, X = 4, USED = 2 };
/* n_exp experts of ff rows: the K-quant variants need ff = 256 (their block size), so they keep
   two experts to stay small: every byte of a seed is a byte the fuzzer spends time on */
typedef struct variant { const char *name; const moe_model *vocab; int32_t attn, gate, down, embd; int ff, n_exp; } variant;

static float g_vals[1 << 18];

static uint8_t *make_tensor(int32_t type, int64_t n, float scale, uint64_t *seed) {
    for (int64_t i = 0; i < n; i++) {
        *seed = *seed * 6364136223846793005ull + 1442695040888963407ull;
        g_vals[i] = scale * ((float)((*seed >> 40) % 2001) / 1000.0f - 1.0f);
    }
    const moe_type_traits *tt = type_traits(type);
    uint8_t *p = calloc((size_t)(n / tt->block_elems) * (size_t)tt->block_bytes + 16, 1);
    tt->quant(g_vals, p, n);
    return p;
}

static void write_model(const variant *v, const char *path) {
    gguf_writer w = {0};
    void *keep[64];
    int nk = 0;
    uint64_t seed = 7;
    const moe_vocab *voc = v->vocab->vocab;
    int32_t V = voc->n_tokens;
    gw_kv_str(&w, "general.architecture", "qwen3moe");
    gw_kv_u32(&w, "qwen3moe.context_length", 64);
    gw_kv_u32(&w, "qwen3moe.embedding_length", E);
    gw_kv_u32(&w, "qwen3moe.block_count", 1);
    gw_kv_u32(&w, "qwen3moe.attention.head_count", HEADS);
    gw_kv_u32(&w, "qwen3moe.attention.head_count_kv", KVH);
    gw_kv_u32(&w, "qwen3moe.attention.key_length", HD);
    gw_kv_u32(&w, "qwen3moe.attention.value_length", HD);
    gw_kv_u32(&w, "qwen3moe.expert_count", (uint32_t)v->n_exp);
    gw_kv_u32(&w, "qwen3moe.expert_used_count", USED);
    gw_kv_u32(&w, "qwen3moe.expert_feed_forward_length", (uint32_t)v->ff);
    gw_kv_f32(&w, "qwen3moe.attention.layer_norm_rms_epsilon", 1e-6f);
    gw_kv_f32(&w, "qwen3moe.rope.freq_base", 10000.0f);
    if (vocab_write_gguf(voc, &w)) die("vocab_write_gguf");
#define T(name, type, nd, a, b, c, scale)                                                   \
    do {                                                                                  \
        int64_t ne[3] = {a, b, c};                                                        \
        keep[nk] = make_tensor(type, (int64_t)(a) * (b) * (c), scale, &seed);             \
        if (gw_tensor(&w, name, type, nd, ne, keep[nk++])) die(name);                     \
    } while (0)
    T("token_embd.weight", v->embd, 2, E, V, 1, 1.0f);
    T("output_norm.weight", MOE_TYPE_F32, 1, E, 1, 1, 1.0f);
    T("blk.0.attn_norm.weight", MOE_TYPE_F32, 1, E, 1, 1, 1.0f);
    T("blk.0.attn_q.weight", v->attn, 2, E, HEADS * HD, 1, 0.3f);
    T("blk.0.attn_k.weight", v->attn, 2, E, KVH * HD, 1, 0.3f);
    T("blk.0.attn_v.weight", v->attn, 2, E, KVH * HD, 1, 0.3f);
    T("blk.0.attn_output.weight", v->attn, 2, HEADS * HD, E, 1, 0.3f);
    T("blk.0.attn_q_norm.weight", MOE_TYPE_F32, 1, HD, 1, 1, 1.0f);
    T("blk.0.attn_k_norm.weight", MOE_TYPE_F32, 1, HD, 1, 1, 1.0f);
    T("blk.0.ffn_norm.weight", MOE_TYPE_F32, 1, E, 1, 1, 1.0f);
    T("blk.0.ffn_gate_inp.weight", MOE_TYPE_F32, 2, E, v->n_exp, 1, 0.5f);
    T("blk.0.ffn_gate_exps.weight", v->gate, 3, E, v->ff, v->n_exp, 0.3f);
    T("blk.0.ffn_up_exps.weight", v->gate, 3, E, v->ff, v->n_exp, 0.3f);
    T("blk.0.ffn_down_exps.weight", v->down, 3, v->ff, E, v->n_exp, 0.3f);
#undef T
    if (gw_write_file(&w, path)) die(path);
    gw_free(&w);
    for (int i = 0; i < nk; i++) free(keep[i]);
}

/* ---- a Hugging Face directory (safetensors), packed as fuzz parts ------------------------------ */
typedef struct stw { sbuf2 hdr, data; int first; int32_t dtype; } stw;
static void st_tensor(stw *s, const char *name, int nd, const int64_t *shape, uint64_t *seed) {
    int64_t n = 1;
    for (int d = 0; d < nd; d++) n *= shape[d];
    for (int64_t i = 0; i < n; i++) {
        *seed = *seed * 6364136223846793005ull + 1442695040888963407ull;
        float f = 0.3f * ((float)((*seed >> 40) % 2001) / 1000.0f - 1.0f);
        if (strstr(name, "norm")) f += 1.0f;
        if (s->dtype == MOE_TYPE_F32) sb2_put(&s->data, &f, 4);
        else {
            uint16_t h = s->dtype == MOE_TYPE_F16 ? f32_to_fp16(f) : f32_to_bf16(f);
            sb2_put(&s->data, &h, 2);
        }
    }
    char e[512];
    int k = snprintf(e, sizeof e, "%s\"%s\":{\"dtype\":\"%s\",\"shape\":[", s->first ? "" : ",", name,
                     s->dtype == MOE_TYPE_F32 ? "F32" : s->dtype == MOE_TYPE_F16 ? "F16" : "BF16");
    for (int d = 0; d < nd; d++) k += snprintf(e + k, sizeof e - (size_t)k, "%s%lld", d ? "," : "", (long long)shape[d]);
    size_t eb = s->dtype == MOE_TYPE_F32 ? 4 : 2;
    snprintf(e + k, sizeof e - (size_t)k, "],\"data_offsets\":[%zu,%zu]}", s->data.n - (size_t)n * eb, s->data.n);
    sb2_s(&s->hdr, e);
    s->first = 0;
}

static void hf_seed(const char *name, int32_t dtype, int fused, const char *tok_json, const char *tc, int V) {
    enum { F = 32 };
    stw s = {{0}, {0}, 1, dtype};
    uint64_t seed = 3;
    sb2_s(&s.hdr, "{\"__metadata__\":{\"format\":\"pt\"},");
    s.first = 1;
    int64_t sh[3];
#define ST2(nm, a, b) (sh[0] = (a), sh[1] = (b), st_tensor(&s, nm, 2, sh, &seed))
#define ST1(nm, a) (sh[0] = (a), st_tensor(&s, nm, 1, sh, &seed))
    ST2("model.embed_tokens.weight", V, E);
    ST1("model.norm.weight", E);
    ST1("model.layers.0.input_layernorm.weight", E);
    ST2("model.layers.0.self_attn.q_proj.weight", HEADS * HD, E);
    ST2("model.layers.0.self_attn.k_proj.weight", KVH * HD, E);
    ST2("model.layers.0.self_attn.v_proj.weight", KVH * HD, E);
    ST2("model.layers.0.self_attn.o_proj.weight", E, HEADS * HD);
    ST1("model.layers.0.self_attn.q_norm.weight", HD);
    ST1("model.layers.0.self_attn.k_norm.weight", HD);
    ST1("model.layers.0.post_attention_layernorm.weight", E);
    ST2("model.layers.0.mlp.gate.weight", X, E);
    if (fused) {
        sh[0] = X, sh[1] = 2 * F, sh[2] = E;
        st_tensor(&s, "model.layers.0.mlp.experts.gate_up_proj", 3, sh, &seed);
        sh[0] = X, sh[1] = E, sh[2] = F;
        st_tensor(&s, "model.layers.0.mlp.experts.down_proj", 3, sh, &seed);
    } else {
        char nm[96];
        for (int e = 0; e < X; e++) {
            snprintf(nm, sizeof nm, "model.layers.0.mlp.experts.%d.gate_proj.weight", e);
            ST2(nm, F, E);
            snprintf(nm, sizeof nm, "model.layers.0.mlp.experts.%d.up_proj.weight", e);
            ST2(nm, F, E);
            snprintf(nm, sizeof nm, "model.layers.0.mlp.experts.%d.down_proj.weight", e);
            ST2(nm, E, F);
        }
    }
#undef ST1
#undef ST2
    sb2_s(&s.hdr, "}");
    sbuf2 st = {0};
    uint64_t hn = s.hdr.n;
    sb2_put(&st, &hn, 8);
    sb2_put(&st, s.hdr.p, s.hdr.n);
    sb2_put(&st, s.data.p, s.data.n);
    char cfg[1024];
    snprintf(cfg, sizeof cfg,
             "{\"model_type\": \"qwen3_moe\", \"architectures\": [\"Qwen3MoeForCausalLM\"], \"hidden_size\": %d,\n"
             " \"num_hidden_layers\": 1, \"num_attention_heads\": %d, \"num_key_value_heads\": %d, \"head_dim\": %d,\n"
             " \"num_experts\": %d, \"num_experts_per_tok\": %d, \"moe_intermediate_size\": %d, \"norm_topk_prob\": true,\n"
             " \"rms_norm_eps\": 1e-06, \"rope_theta\": 1000000.0, \"max_position_embeddings\": 64, \"vocab_size\": %d,\n"
             " \"tie_word_embeddings\": true, \"decoder_sparse_step\": 1, \"mlp_only_layers\": [], \"rope_scaling\": null}\n",
             E, HEADS, KVH, HD, X, USED, F, V);
    sbuf2 out = {0};
    sb2_s(&out, cfg);
    sb2_s(&out, FUZZ_SEP);
    sb2_put(&out, st.p, st.n);
    if (tok_json) {
        sb2_s(&out, FUZZ_SEP);
        sb2_s(&out, tok_json);
        sb2_s(&out, FUZZ_SEP);
        sb2_s(&out, tc);
    }
    /* check that the seed loads, through the harness's own unpacking */
    char dir[512];
    snprintf(dir, sizeof dir, "%s/models/hf_check", g_out);
    if (fuzz_write_parts(dir, (const uint8_t *)out.p, out.n, k_hf_parts, 4) < 0) die("write hf parts");
    moe_load_params lp = {0};
    lp.backend = MOE_BACKEND_CPU;
    lp.n_threads = 1;
    moe_model *m = NULL;
    if (moe_load(dir, &lp, &m)) die(name);
    moe_model_free(m);
    put_file("seeds/hf", name, out.p, out.n);
    free(out.p);
    free(st.p);
    free(s.hdr.p);
    free(s.data.p);
}

int main(int argc, char **argv) {
    if (argc != 2) { fprintf(stderr, "usage: make_seeds OUT_DIR\n"); return 2; }
    g_out = argv[1];
    const char *subs[] = {"", "/models", "/seeds", "/seeds/gguf", "/seeds/hf", "/seeds/json", "/seeds/tok", "/seeds/state"};
    char path[512];
    for (size_t i = 0; i < sizeof subs / sizeof subs[0]; i++) {
        snprintf(path, sizeof path, "%s%s", g_out, subs[i]);
        mkdir(path, 0755);
    }
    /* vocabularies: byte-level (with and without NFC) and SentencePiece-style */
    char *jb = tok_bytes_json(1), *jr = tok_bytes_json(0), *js = tok_spm_json();
    snprintf(path, sizeof path, "%s/models/vb", g_out);
    moe_model *vb = vocab_model(path, jb, k_tc_bytes, k_cfg_bytes);
    snprintf(path, sizeof path, "%s/models/vr", g_out);
    moe_model *vr = vocab_model(path, jr, k_tc_bytes, k_cfg_bytes);
    snprintf(path, sizeof path, "%s/models/vs", g_out);
    moe_model *vs = vocab_model(path, js, k_tc_spm, k_cfg_spm);
    put_file("models", "tok_bytes.json", jb, strlen(jb));
    put_file("models", "tok_raw.json", jr, strlen(jr));
    put_file("models", "tok_spm.json", js, strlen(js));

    /* JSON seeds: tokenizer.json + tokenizer_config.json + config.json */
    const char *jsons[3][3] = {{jb, k_tc_bytes, k_cfg_bytes}, {jr, "{}", "{}"}, {js, k_tc_spm, k_cfg_spm}};
    for (int i = 0; i < 3; i++) {
        sbuf2 o = {0};
        sb2_s(&o, jsons[i][0]);
        sb2_s(&o, FUZZ_SEP);
        sb2_s(&o, jsons[i][1]);
        sb2_s(&o, FUZZ_SEP);
        sb2_s(&o, jsons[i][2]);
        snprintf(path, sizeof path, "seed%d.bin", i);
        put_file("seeds/json", path, o.p, o.n);
        free(o.p);
    }
    static const char *const small_json[] = {
        "{\"a\":[1,-2.5e3,true,false,null,\"\\u00e9\\ud83d\\ude00\\n\"],\"b\":{\"c\":{}}}",
        "[[[[[[[[[[]]]]]]]]]]", "\"\\\\\\\"\\/\\b\\f\\r\\t\"", "{\"model\":{\"type\":\"BPE\",\"vocab\":{\"a\":0},\"merges\":[[\"a\",\"a\"]]}}",
    };
    for (size_t i = 0; i < sizeof small_json / sizeof small_json[0]; i++) {
        snprintf(path, sizeof path, "small%zu.bin", i);
        put_file("seeds/json", path, small_json[i], strlen(small_json[i]));
    }

    /* GGUF models */
    const variant vars[] = {
        {"tiny.gguf", vb, MOE_TYPE_Q8_0, MOE_TYPE_Q8_0, MOE_TYPE_Q8_0, MOE_TYPE_Q4_0, 32, 4},
        {"spm_f16.gguf", vs, MOE_TYPE_F16, MOE_TYPE_Q4_0, MOE_TYPE_BF16, MOE_TYPE_Q8_0, 32, 2},
        {"raw_kquant.gguf", vr, MOE_TYPE_Q8_0, MOE_TYPE_MXFP4, MOE_TYPE_Q4_K, MOE_TYPE_Q4_0, 256, 2},
        {"q6k.gguf", vb, MOE_TYPE_F32, MOE_TYPE_Q4_0, MOE_TYPE_Q6_K, MOE_TYPE_Q4_0, 256, 2},
    };
    for (size_t i = 0; i < sizeof vars / sizeof vars[0]; i++) {
        snprintf(path, sizeof path, "%s/seeds/gguf/%s", g_out, vars[i].name);
        write_model(&vars[i], path);
        moe_load_params lp = {0};
        lp.backend = MOE_BACKEND_CPU;
        lp.n_threads = 1;
        moe_model *m = NULL;
        if (moe_load(path, &lp, &m)) die(path);
        moe_model_free(m);
    }
    snprintf(path, sizeof path, "%s/models/tiny.gguf", g_out);
    write_model(&vars[0], path);

    /* Hugging Face directories */
    hf_seed("hf_f32_experts.bin", MOE_TYPE_F32, 0, NULL, NULL, 300);
    hf_seed("hf_bf16_fused_tok.bin", MOE_TYPE_BF16, 1, jb, k_tc_bytes, vb->vocab->n_tokens);
    hf_seed("hf_f16_spm.bin", MOE_TYPE_F16, 0, js, k_tc_spm, vs->vocab->n_tokens);

    /* tokenizer texts: selector byte (vocabulary and flags) + text */
    static const char *const texts[] = {
        "And God said unto him, Thou shalt not go up into the land", "<|im_start|>user\nhello<|im_end|>\n<think>x</think>",
        "caf\xC3\xA9 cafe\xCC\x81 \xE2\x96\x81\xE2\x96\x81 na\xC3\xAFve \xE4\xB8\xAD\xE6\x96\x87 \xF0\x9F\x98\x80 123456",
        "  \t\r\n\n\n  trailing  ", "\xff\xfe\xc3(\xe2\x82 invalid utf-8 \x80", "<bos><eos><end_of_turn>LORD God",
        "I'm you're we'LL DON'T 's 't", "",
    };
    for (size_t i = 0; i < sizeof texts / sizeof texts[0]; i++)
        for (int sel = 0; sel < 4; sel++) {
            uint8_t buf[256];
            buf[0] = (uint8_t)(sel * 5 + (int)i);
            size_t n = strlen(texts[i]);
            memcpy(buf + 1, texts[i], n);
            snprintf(path, sizeof path, "t%zu_%d.bin", i, sel);
            put_file("seeds/tok", path, buf, n + 1);
        }
    size_t cn = 0;
    uint8_t *corpus = read_all("test/fixtures/tokenizer/corpus.txt", &cn);
    if (corpus) { /* a few lines of the multilingual corpus */
        size_t at = 0;
        for (int k = 0; k < 24 && at < cn; k++) {
            size_t e = at;
            while (e < cn && corpus[e] != '\n') e++;
            size_t n = e - at < 200 ? e - at : 200;
            uint8_t buf[256];
            buf[0] = (uint8_t)(k * 3);
            memcpy(buf + 1, corpus + at, n);
            snprintf(path, sizeof path, "c%d.bin", k);
            put_file("seeds/tok", path, buf, n + 1);
            at = e + 1;
            for (int skip = 0; skip < 90 && at < cn; skip++) { /* spread over the languages */
                while (at < cn && corpus[at] != '\n') at++;
                at++;
            }
        }
        free(corpus);
    }

    /* states of tiny.gguf: context kinds as in fuzz_state.c */
    moe_load_params lp = {0};
    lp.backend = MOE_BACKEND_CPU;
    lp.n_threads = 1;
    moe_model *tiny = NULL;
    snprintf(path, sizeof path, "%s/models/tiny.gguf", g_out);
    if (moe_load(path, &lp, &tiny)) die(path);
    for (int kind = 0; kind < FUZZ_STATE_KINDS; kind++) {
        static const int positions[] = {0, 1, 3, 9};
        for (int pi = 0; pi < 4; pi++) {
            moe_ctx *c = NULL;
            moe_ctx_params cp;
            fuzz_state_params(kind, &cp);
            if (moe_ctx_new(tiny, &cp, &c)) die("moe_ctx_new");
            moe_token t[9] = {65, 288, 66, 10, 32, 270, 100, 7, 0};
            if (positions[pi] && moe_step(c, t, positions[pi])) die("moe_step");
            size_t sz = 0;
            moe_ctx_save(c, NULL, 0, &sz);
            uint8_t *b = malloc(sz + 1);
            b[0] = (uint8_t)kind;
            if (moe_ctx_save(c, b + 1, sz, &sz)) die("moe_ctx_save");
            snprintf(path, sizeof path, "k%d_p%d.bin", kind, positions[pi]);
            put_file("seeds/state", path, b, sz + 1);
            free(b);
            moe_ctx_free(c);
        }
    }
    moe_model_free(tiny);
    moe_model_free(vb);
    moe_model_free(vr);
    moe_model_free(vs);
    free(jb);
    free(jr);
    free(js);
    if (g_failed) return 1;
    printf("make_seeds: corpora in %s/seeds (gguf, hf, json, tok, state)\n", g_out);
    return 0;
}
