/* synth_model — writes a random but well-formed Qwen3-MoE or Gemma 4 GGUF for speed runs.

   Every quant block is valid (finite scales sized so that weights come out near N(0, 0.02)),
   norms are 1 ± noise and the router is F32, so the file exercises exactly the kernels of a real
   checkpoint of that shape. Tensor names, shapes and metadata keys are those of llama.cpp's
   converter (general.architecture = "qwen3moe"), plus a placeholder byte-level vocabulary, so
   llama.cpp loads the same bytes for a side-by-side run.

     build/synth_model -o /tmp/q30b.gguf                      # Qwen3-30B-A3B shape, Q4_K / Q6_K
     build/synth_model -o /tmp/mid.gguf --layers 6            # the 6-layer cut used for CPU runs
     build/synth_model -o /tmp/g26b.gguf --arch gemma4        # Gemma 4 26B-A4B shape

   Options (defaults = Qwen3-30B-A3B): --layers 48 --embd 2048 --heads 32 --kv-heads 4
   --head-dim 128 --experts 128 --used 8 --ff 768 --vocab 151936 --type q4_k --out-type q6_k
   --seed 1. Built by `make` (gen/ tools include moe.c to reach its GGUF writer and codecs).
   --arch gemma4 writes the Gemma 4 26B-A4B shape (ARCHITECTURES.md §2.1-2.2, llama.cpp's gemma4
   keys and names): 30 layers of 2816, five sliding layers (16 heads of 256, 8 KV heads, window
   1024) then one full layer (16 heads of 512, 2 KV heads, K = V: no attn_v, proportional rope
   through rope_freqs), a dense GeGLU MLP of 2112 beside 128 experts (top 8) of 704, router and
   expert scales, layer scalars, softcap 30, tied embeddings of 262,144 tokens. --layers, --used
   and --type apply; the token embedding (also the output) is --out-type; matrices whose rows
   are not a whole number of K-quant blocks (the 2112 / 704 down projections) are Q8_0, as
   llama.cpp's quantizer falls back to a 32-wide type there. */
#include "../moe.c"
#include "../moe_vk.c"
#include "../shaders_embedded.c"

typedef struct rng64 { uint64_t s; } rng64;
static uint64_t rng_next(rng64 *r) { /* splitmix64 */
    uint64_t z = (r->s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}
static float rng_normal(rng64 *r) { /* Box-Muller */
    double u1 = ((double)(rng_next(r) >> 11) + 1.0) / 9007199254740993.0, u2 = (double)(rng_next(r) >> 11) / 9007199254740992.0;
    return (float)(sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2));
}

/* Fills n_blocks blocks with random bytes, then overwrites each block's scale fields with
   values that put the weights near N(0, 0.02). */
static void random_blocks(int32_t type, uint8_t *p, uint64_t n_blocks, rng64 *r) {
    const moe_type_traits *tt = type_traits(type);
    uint64_t nbytes = n_blocks * (uint64_t)tt->block_bytes;
    for (uint64_t i = 0; i < nbytes; i += 8) {
        uint64_t v = rng_next(r);
        memcpy(p + i, &v, nbytes - i < 8 ? nbytes - i : 8);
    }
    for (uint64_t b = 0; b < n_blocks; b++, p += tt->block_bytes) {
        switch (type) {
        case MOE_TYPE_Q4_0: wr16(p, f32_to_fp16(0.0045f)); break;
        case MOE_TYPE_Q8_0: wr16(p, f32_to_fp16(0.00027f)); break;
        case MOE_TYPE_Q4_K: case MOE_TYPE_Q5_K:
            wr16(p, f32_to_fp16(type == MOE_TYPE_Q4_K ? 1.4e-4f : 0.7e-4f));
            wr16(p + 2, f32_to_fp16(2e-4f));
            break;
        case MOE_TYPE_Q6_K: wr16(p + 208, f32_to_fp16(1.5e-5f)); break;
        case MOE_TYPE_MXFP4: p[0] = 120; break;
        default: break;
        }
    }
}

static float *random_f32(uint64_t n, float mean, float std, rng64 *r) {
    float *v = malloc(n * sizeof *v);
    if (!v) return NULL;
    for (uint64_t i = 0; i < n; i++) v[i] = mean + std * rng_normal(r);
    return v;
}

static int32_t type_by_name(const char *s) {
    static const struct { const char *name; int32_t type; } k[] = {
        {"f32", MOE_TYPE_F32}, {"f16", MOE_TYPE_F16}, {"bf16", MOE_TYPE_BF16}, {"q8_0", MOE_TYPE_Q8_0},
        {"q4_0", MOE_TYPE_Q4_0}, {"q4_k", MOE_TYPE_Q4_K}, {"q5_k", MOE_TYPE_Q5_K}, {"q6_k", MOE_TYPE_Q6_K},
        {"mxfp4", MOE_TYPE_MXFP4}};
    for (size_t i = 0; i < sizeof k / sizeof k[0]; i++)
        if (!strcmp(s, k[i].name) && type_traits(k[i].type)) return k[i].type;
    return -1;
}

/* All tensor payloads stay alive until the file is written. */
typedef struct synth { gguf_writer w; void **owned; int n_owned, cap_owned; rng64 rng; int failed; } synth;

static void *keep(synth *s, void *p) {
    if (!p) { s->failed = 1; return NULL; }
    if (s->n_owned == s->cap_owned) {
        s->cap_owned = s->cap_owned ? 2 * s->cap_owned : 256;
        void **n = realloc(s->owned, (size_t)s->cap_owned * sizeof *n);
        if (!n) { s->failed = 1; return p; }
        s->owned = n;
    }
    return s->owned[s->n_owned++] = p;
}

static void add_quant(synth *s, const char *name, int32_t type, int n_dims, int64_t ne0, int64_t ne1, int64_t ne2) {
    int64_t ne[3] = {ne0, ne1, ne2};
    const moe_type_traits *tt = type_traits(type);
    uint64_t n_blocks = (uint64_t)(ne0 / tt->block_elems) * (uint64_t)ne1 * (uint64_t)ne2;
    uint8_t *p = keep(s, malloc(n_blocks * (uint64_t)tt->block_bytes));
    if (!p) return;
    if (type == MOE_TYPE_F32) { /* router / f32 matrices: real normals */
        float *f = (float *)p;
        for (uint64_t i = 0; i < n_blocks; i++) f[i] = 0.02f * rng_normal(&s->rng);
    } else random_blocks(type, p, n_blocks, &s->rng);
    if (gw_tensor(&s->w, name, type, n_dims, ne, p)) s->failed = 1;
}

static void add_norm(synth *s, const char *name, int64_t n) {
    float *v = keep(s, random_f32((uint64_t)n, 1.0f, 0.1f, &s->rng));
    if (v && gw_tensor(&s->w, name, MOE_TYPE_F32, 1, &n, v)) s->failed = 1;
}

/* a K-quant type where the rows allow it, else Q8_0 */
static int32_t fit_type(int32_t type, int64_t ne0) { return type_row_bytes(type, ne0) ? type : MOE_TYPE_Q8_0; }

/* The Gemma 4 26B-A4B shape (see the header). */
static void write_gemma4(synth *s, int layers, int used, int32_t type, int32_t emb_type) {
    gguf_writer *w = &s->w;
    const int embd = 2816, heads = 16, hd_swa = 256, hd_full = 512, kv_swa = 8, kv_full = 2, ff = 2112, experts = 128, ff_exp = 704;
    gw_kv_str(w, "general.architecture", "gemma4");
    gw_kv_str(w, "general.name", "moe synthetic gemma4 26B-A4B");
    gw_kv_u32(w, "general.alignment", 32);
    gw_kv_u32(w, "gemma4.context_length", 262144);
    gw_kv_u32(w, "gemma4.embedding_length", embd);
    gw_kv_u32(w, "gemma4.block_count", (uint32_t)layers);
    gw_kv_u32(w, "gemma4.attention.head_count", heads);
    gw_kv_u32(w, "gemma4.attention.key_length", hd_full);
    gw_kv_u32(w, "gemma4.attention.value_length", hd_full);
    gw_kv_u32(w, "gemma4.attention.key_length_swa", hd_swa);
    gw_kv_u32(w, "gemma4.attention.value_length_swa", hd_swa);
    gw_kv_u32(w, "gemma4.attention.sliding_window", 1024);
    gw_kv_u32(w, "gemma4.rope.dimension_count", hd_full);
    gw_kv_u32(w, "gemma4.rope.dimension_count_swa", hd_swa);
    gw_kv_f32(w, "gemma4.rope.freq_base", 1e6f);
    gw_kv_f32(w, "gemma4.rope.freq_base_swa", 1e4f);
    gw_kv_f32(w, "gemma4.attention.layer_norm_rms_epsilon", 1e-6f);
    gw_kv_f32(w, "gemma4.final_logit_softcapping", 30.0f);
    gw_kv_u32(w, "gemma4.expert_count", experts);
    gw_kv_u32(w, "gemma4.expert_used_count", (uint32_t)used);
    gw_kv_u32(w, "gemma4.expert_feed_forward_length", ff_exp);
    gw_kv_u32(w, "gemma4.attention.shared_kv_layers", 0);
    uint8_t *pattern = keep(s, malloc((size_t)layers));
    int32_t *kv = keep(s, malloc((size_t)layers * sizeof *kv)), *ffs = keep(s, malloc((size_t)layers * sizeof *ffs));
    if (s->failed) return;
    for (int l = 0; l < layers; l++) { /* five sliding, one full; the last layer full */
        pattern[l] = l % 6 != 5 && l != layers - 1;
        kv[l] = pattern[l] ? kv_swa : kv_full;
        ffs[l] = ff;
    }
    gw_kv_array(w, "gemma4.attention.sliding_window_pattern", GGUF_BOOL, pattern, (uint64_t)layers);
    gw_kv_array(w, "gemma4.attention.head_count_kv", GGUF_I32, kv, (uint64_t)layers);
    gw_kv_array(w, "gemma4.feed_forward_length", GGUF_I32, ffs, (uint64_t)layers);
    add_quant(s, "token_embd.weight", emb_type, 2, embd, 262144, 1);
    add_norm(s, "output_norm.weight", embd);
    float *rf = keep(s, malloc(hd_full / 2 * sizeof *rf));
    int64_t n_rf = hd_full / 2;
    if (!rf) return;
    for (int i = 0; i < hd_full / 2; i++) rf[i] = i < 64 ? 1.0f : 1e30f; /* 25 % of the pairs rotate */
    if (gw_tensor(w, "rope_freqs.weight", MOE_TYPE_F32, 1, &n_rf, rf)) s->failed = 1;
    for (int l = 0; l < layers && !s->failed; l++) {
        char name[96];
        int hd = pattern[l] ? hd_swa : hd_full;
        int64_t q = (int64_t)heads * hd, kvw = (int64_t)kv[l] * hd, one = 1;
#define T(suffix) (snprintf(name, sizeof name, "blk.%d.%s", l, suffix), name)
        add_norm(s, T("attn_norm.weight"), embd);
        add_quant(s, T("attn_q.weight"), type, 2, embd, q, 1);
        add_quant(s, T("attn_k.weight"), type, 2, embd, kvw, 1);
        if (pattern[l]) add_quant(s, T("attn_v.weight"), type, 2, embd, kvw, 1);
        add_quant(s, T("attn_output.weight"), fit_type(type, q), 2, q, embd, 1);
        add_norm(s, T("attn_q_norm.weight"), hd);
        add_norm(s, T("attn_k_norm.weight"), hd);
        add_norm(s, T("post_attention_norm.weight"), embd);
        add_norm(s, T("ffn_norm.weight"), embd);
        add_quant(s, T("ffn_gate.weight"), type, 2, embd, ff, 1);
        add_quant(s, T("ffn_up.weight"), type, 2, embd, ff, 1);
        add_quant(s, T("ffn_down.weight"), fit_type(type, ff), 2, ff, embd, 1);
        add_norm(s, T("post_ffw_norm.weight"), embd);
        add_norm(s, T("post_ffw_norm_1.weight"), embd);
        add_quant(s, T("ffn_gate_inp.weight"), MOE_TYPE_F32, 2, embd, experts, 1);
        add_norm(s, T("ffn_gate_inp.scale"), embd);
        add_norm(s, T("ffn_down_exps.scale"), experts);
        add_norm(s, T("pre_ffw_norm_2.weight"), embd);
        add_quant(s, T("ffn_gate_exps.weight"), type, 3, embd, ff_exp, experts);
        add_quant(s, T("ffn_up_exps.weight"), type, 3, embd, ff_exp, experts);
        add_quant(s, T("ffn_down_exps.weight"), fit_type(type, ff_exp), 3, ff_exp, embd, experts);
        add_norm(s, T("post_ffw_norm_2.weight"), embd);
        float *ls = keep(s, random_f32(1, 0.8f, 0.1f, &s->rng));
        if (ls && gw_tensor(w, T("layer_output_scale.weight"), MOE_TYPE_F32, 1, &one, ls)) s->failed = 1;
#undef T
    }
}

/* The Qwen3-MoE shape of the options. */
static void write_qwen3moe(synth *s, int layers, int embd, int heads, int kv_heads, int head_dim, int experts, int used, int ff,
                           int vocab, int32_t type, int32_t out_type) {
    gguf_writer *w = &s->w;
    char key[128];
    gw_kv_str(w, "general.architecture", "qwen3moe");
    gw_kv_str(w, "general.name", "moe synthetic qwen3moe");
    gw_kv_u32(w, "general.alignment", 32);
#define KV_U32(k, v) (snprintf(key, sizeof key, "qwen3moe.%s", k), gw_kv_u32(w, key, (uint32_t)(v)))
    KV_U32("context_length", 40960);
    KV_U32("embedding_length", embd);
    KV_U32("block_count", layers);
    KV_U32("feed_forward_length", 6144);
    KV_U32("attention.head_count", heads);
    KV_U32("attention.head_count_kv", kv_heads);
    KV_U32("attention.key_length", head_dim);
    KV_U32("attention.value_length", head_dim);
    KV_U32("expert_count", experts);
    KV_U32("expert_used_count", used);
    KV_U32("expert_feed_forward_length", ff);
#undef KV_U32
    gw_kv_f32(w, "qwen3moe.attention.layer_norm_rms_epsilon", 1e-6f);
    gw_kv_f32(w, "qwen3moe.rope.freq_base", 1e6f);
    int64_t q = (int64_t)heads * head_dim, kv = (int64_t)kv_heads * head_dim;
    add_quant(s, "token_embd.weight", type, 2, embd, vocab, 1);
    add_norm(s, "output_norm.weight", embd);
    add_quant(s, "output.weight", out_type, 2, embd, vocab, 1);
    for (int l = 0; l < layers && !s->failed; l++) {
        char name[96];
#define T(suffix) (snprintf(name, sizeof name, "blk.%d.%s.weight", l, suffix), name)
        add_norm(s, T("attn_norm"), embd);
        add_quant(s, T("attn_q"), type, 2, embd, q, 1);
        add_quant(s, T("attn_k"), type, 2, embd, kv, 1);
        add_quant(s, T("attn_v"), type, 2, embd, kv, 1);
        add_quant(s, T("attn_output"), type, 2, q, embd, 1);
        add_norm(s, T("attn_q_norm"), head_dim);
        add_norm(s, T("attn_k_norm"), head_dim);
        add_norm(s, T("ffn_norm"), embd);
        add_quant(s, T("ffn_gate_inp"), MOE_TYPE_F32, 2, embd, experts, 1);
        add_quant(s, T("ffn_gate_exps"), type, 3, embd, ff, experts);
        add_quant(s, T("ffn_up_exps"), type, 3, embd, ff, experts);
        add_quant(s, T("ffn_down_exps"), type, 3, ff, embd, experts);
#undef T
    }
}

int main(int argc, char **argv) {
    const char *out = NULL;
    int layers = 48, embd = 2048, heads = 32, kv_heads = 4, head_dim = 128, experts = 128, used = 8, ff = 768, vocab = 151936;
    int32_t type = MOE_TYPE_Q4_K, out_type = MOE_TYPE_Q6_K;
    uint64_t seed = 1;
    const char *arch = "qwen3moe";
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!v) { fprintf(stderr, "synth_model: %s needs a value\n", a); return 2; }
        i++;
        if (!strcmp(a, "-o")) out = v;
        else if (!strcmp(a, "--layers")) layers = atoi(v);
        else if (!strcmp(a, "--embd")) embd = atoi(v);
        else if (!strcmp(a, "--heads")) heads = atoi(v);
        else if (!strcmp(a, "--kv-heads")) kv_heads = atoi(v);
        else if (!strcmp(a, "--head-dim")) head_dim = atoi(v);
        else if (!strcmp(a, "--experts")) experts = atoi(v);
        else if (!strcmp(a, "--used")) used = atoi(v);
        else if (!strcmp(a, "--ff")) ff = atoi(v);
        else if (!strcmp(a, "--vocab")) vocab = atoi(v);
        else if (!strcmp(a, "--seed")) seed = strtoull(v, NULL, 10);
        else if (!strcmp(a, "--type")) type = type_by_name(v);
        else if (!strcmp(a, "--out-type")) out_type = type_by_name(v);
        else if (!strcmp(a, "--arch")) arch = v;
        else { fprintf(stderr, "synth_model: unknown option %s\n", a); return 2; }
    }
    if (!out || type < 0 || out_type < 0 || layers < 1 || embd < 1 || heads < 1 || kv_heads < 1 || head_dim < 2 ||
        experts < 1 || used < 1 || used > experts || ff < 1 || vocab < 256) {
        fprintf(stderr, "usage: synth_model -o out.gguf [--layers N --embd N --heads N --kv-heads N --head-dim N --experts N "
                        "--used N --ff N --vocab N --type q4_k --out-type q6_k --seed N]\n");
        return 2;
    }
    synth s = {0};
    s.rng.s = seed;
    gguf_writer *w = &s.w;
    int gemma = !strcmp(arch, "gemma4");
    if (gemma) {
        vocab = 262144;
        if (layers == 48) layers = 30;
    } else if (strcmp(arch, "qwen3moe")) {
        fprintf(stderr, "synth_model: --arch is qwen3moe or gemma4\n");
        return 2;
    }
    if (gemma) write_gemma4(&s, layers, used, type, out_type);
    else write_qwen3moe(&s, layers, embd, heads, kv_heads, head_dim, experts, used, ff, vocab, type, out_type);
    /* placeholder vocabulary: 256 byte tokens then unique fillers, no merges */
    char **tokens = malloc((size_t)vocab * sizeof *tokens);
    int32_t *ttypes = malloc((size_t)vocab * sizeof *ttypes);
    if (!tokens || !ttypes) return 1;
    for (int i = 0; i < vocab; i++) {
        tokens[i] = malloc(24);
        if (!tokens[i]) return 1;
        if (i < 256) snprintf(tokens[i], 24, "<0x%02X>", i);
        else snprintf(tokens[i], 24, "<t%d>", i);
        ttypes[i] = i < 256 ? 6 : 1;
    }
    /* "none": a vocabulary without merges is no usable BPE (moe's tokenizer rejects it since the
       tokenizer landed); llama.cpp reads "none" as a model without a vocabulary too */
    gw_kv_str(w, "tokenizer.ggml.model", "none");
    gw_kv_str(w, "tokenizer.ggml.pre", "qwen2");
    gw_kv_strings(w, "tokenizer.ggml.tokens", (const char *const *)tokens, (uint64_t)vocab);
    gw_kv_array(w, "tokenizer.ggml.token_type", GGUF_I32, ttypes, (uint64_t)vocab);
    gw_kv_strings(w, "tokenizer.ggml.merges", NULL, 0);
    gw_kv_u32(w, "tokenizer.ggml.bos_token_id", 256);
    gw_kv_u32(w, "tokenizer.ggml.eos_token_id", 257);

    moe_status st = s.failed ? set_error(MOE_ERR_NO_MEMORY, "out of memory or bad shape") : gw_write_file(w, out);
    if (st) fprintf(stderr, "synth_model: %s\n", moe_last_error());
    else fprintf(stderr, "synth_model: wrote %s (%.2f GiB)\n", out, (double)(w->data_size + w->kv.n + w->info.n) / (1 << 30));
    for (int i = 0; i < s.n_owned; i++) free(s.owned[i]);
    free(s.owned);
    for (int i = 0; i < vocab; i++) free(tokens[i]);
    free(tokens);
    free(ttypes);
    gw_free(w);
    return st ? 1 : 0;
}
