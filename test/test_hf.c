/* test_hf — Hugging Face model directories (config.json + *.safetensors): a directory written
   from a GGUF fixture loads and gives bit-identical logits to the GGUF (same f32 weights, same
   kernels), for both expert layouts (one tensor per expert, and transformers 5's fused
   gate_up_proj / down_proj), sharded over several files; malformed directories fail cleanly;
   and the converter turns the directory back into a GGUF with the same logits. */
#include "../moe.c"
#include "../moe_vk.c"
#include "../shaders_embedded.c"
#include "test_util.h"

#include <sys/stat.h>

#define SRC "test/fixtures/qwen3moe_f32.gguf"
#define DIR_OUT "build/test/hf_model"

typedef struct st_writer { gguf_buf hdr; gguf_buf data; int first; } st_writer;

static void st_add(st_writer *w, const char *name, const int64_t *shape, int n_dims, const float *v, size_t n) {
    char buf[512];
    int k = snprintf(buf, sizeof buf, "%s\"%s\":{\"dtype\":\"F32\",\"shape\":[", w->first ? "" : ",", name);
    for (int d = 0; d < n_dims; d++) k += snprintf(buf + k, sizeof buf - (size_t)k, "%s%lld", d ? "," : "", (long long)shape[d]);
    k += snprintf(buf + k, sizeof buf - (size_t)k, "],\"data_offsets\":[%zu,%zu]}", w->data.n, w->data.n + n * 4);
    gb_put(&w->hdr, buf, (size_t)k);
    gb_put(&w->data, v, n * 4);
    w->first = 0;
}

static void st_write(st_writer *w, const char *path) {
    gb_put(&w->hdr, "}", 1);
    uint64_t n = w->hdr.n;
    FILE *f = fopen(path, "wb");
    assert_non_null(f);
    fwrite(&n, 8, 1, f);
    fwrite(w->hdr.p, 1, w->hdr.n, f);
    fwrite(w->data.p, 1, w->data.n, f);
    fclose(f);
    moe_free(w->hdr.p);
    moe_free(w->data.p);
    memset(w, 0, sizeof *w);
    gb_put(&w->hdr, "{", 1);
    w->first = 1;
}

/* a weight as f32 [rows][cols] (rows = ne1, cols = ne0) of expert e (or the 2-D matrix) */
static float *weight_f32(const moe_weight *w, int e, size_t *n) {
    int64_t rows = w->ne[1], cols = w->ne[0];
    float *v = malloc((size_t)(rows * cols) * sizeof *v);
    const uint8_t *base = w->n_dims == 3 ? w->expert_data[e] : w->data;
    for (int64_t r = 0; r < rows; r++) type_traits(w->type)->dequant(base + (uint64_t)r * w->row_bytes, v + r * cols, cols);
    *n = (size_t)(rows * cols);
    return v;
}

static void put(st_writer *w, const char *name, const moe_weight *wt, int e) {
    size_t n;
    float *v = weight_f32(wt, e, &n);
    int64_t shape[2] = {wt->ne[1], wt->ne[0]};
    if (wt->n_dims == 1) st_add(w, name, &wt->ne[0], 1, v, n);
    else st_add(w, name, shape, 2, v, n);
    free(v);
}

/* Writes DIR_OUT from the GGUF model: fused = transformers 5 expert layout; shards files */
static void write_hf_dir(const moe_model *m, int fused, int shards) {
    const moe_hparams *hp = &m->w.hp;
    mkdir("build/test", 0755);
    mkdir(DIR_OUT, 0755);
    char path[256];
    /* clear old shards */
    for (int i = 0; i < 8; i++) { snprintf(path, sizeof path, DIR_OUT "/model-%d.safetensors", i); remove(path); }
    FILE *f = fopen(DIR_OUT "/config.json", "w");
    fprintf(f, "{\"model_type\": \"qwen3_moe\", \"architectures\": [\"Qwen3MoeForCausalLM\"], \"hidden_size\": %d,\n"
               " \"num_hidden_layers\": %d, \"num_attention_heads\": %d, \"num_key_value_heads\": %d, \"head_dim\": %d,\n"
               " \"num_experts\": %d, \"num_experts_per_tok\": %d, \"moe_intermediate_size\": %d, \"norm_topk_prob\": true,\n"
               " \"rms_norm_eps\": %.9g, \"rope_theta\": %.9g, \"max_position_embeddings\": %d, \"vocab_size\": %d,\n"
               " \"tie_word_embeddings\": false, \"decoder_sparse_step\": 1, \"mlp_only_layers\": [], \"rope_scaling\": null}\n",
            hp->n_embd, hp->n_layer, hp->n_head, hp->n_head_kv, hp->head_dim, hp->n_expert, hp->n_expert_used, hp->n_ff_exp,
            (double)hp->rms_eps, (double)m->w.layers[0].p.rope.base, hp->n_ctx_train, hp->n_vocab);
    fclose(f);
    st_writer w = {0};
    gb_put(&w.hdr, "{", 1);
    w.first = 1;
    int shard = 0;
    put(&w, "model.embed_tokens.weight", &m->w.g[MOE_TOK_EMBD], 0);
    put(&w, "model.norm.weight", &m->w.g[MOE_OUTPUT_NORM], 0);
    put(&w, "lm_head.weight", &m->w.g[MOE_OUTPUT], 0);
    for (int l = 0; l < hp->n_layer; l++) {
        if (shards > 1 && l > 0) {
            snprintf(path, sizeof path, DIR_OUT "/model-%d.safetensors", shard++);
            st_write(&w, path);
        }
        const moe_layer *L = &m->w.layers[l];
        char n[128];
#define P(suffix, wt) (snprintf(n, sizeof n, "model.layers.%d.%s", l, suffix), put(&w, n, wt, 0))
        P("input_layernorm.weight", &L->t[MOE_ATTN_NORM]);
        P("self_attn.q_proj.weight", &L->t[MOE_WQ]);
        P("self_attn.k_proj.weight", &L->t[MOE_WK]);
        P("self_attn.v_proj.weight", &L->t[MOE_WV]);
        P("self_attn.o_proj.weight", &L->t[MOE_WO]);
        P("self_attn.q_norm.weight", &L->t[MOE_Q_NORM]);
        P("self_attn.k_norm.weight", &L->t[MOE_K_NORM]);
        P("post_attention_layernorm.weight", &L->t[MOE_FFN_NORM]);
        P("mlp.gate.weight", &L->t[MOE_ROUTER]);
#undef P
        int64_t X = hp->n_expert, F = hp->n_ff_exp, E = hp->n_embd;
        if (fused) {
            float *gu = malloc((size_t)(X * 2 * F * E) * sizeof *gu), *dn = malloc((size_t)(X * E * F) * sizeof *dn);
            for (int e = 0; e < X; e++) {
                size_t cnt;
                float *g = weight_f32(&L->t[MOE_GATE_EXPS], e, &cnt), *u = weight_f32(&L->t[MOE_UP_EXPS], e, &cnt), *d = weight_f32(&L->t[MOE_DOWN_EXPS], e, &cnt);
                memcpy(gu + (size_t)e * 2 * F * E, g, (size_t)(F * E) * 4);
                memcpy(gu + (size_t)e * 2 * F * E + F * E, u, (size_t)(F * E) * 4);
                memcpy(dn + (size_t)e * E * F, d, (size_t)(E * F) * 4);
                free(g); free(u); free(d);
            }
            int64_t s1[3] = {X, 2 * F, E}, s2[3] = {X, E, F};
            snprintf(n, sizeof n, "model.layers.%d.mlp.experts.gate_up_proj", l);
            st_add(&w, n, s1, 3, gu, (size_t)(X * 2 * F * E));
            snprintf(n, sizeof n, "model.layers.%d.mlp.experts.down_proj", l);
            st_add(&w, n, s2, 3, dn, (size_t)(X * E * F));
            free(gu);
            free(dn);
        } else {
            for (int e = 0; e < X; e++) {
                snprintf(n, sizeof n, "model.layers.%d.mlp.experts.%d.gate_proj.weight", l, e);
                put(&w, n, &L->t[MOE_GATE_EXPS], e);
                snprintf(n, sizeof n, "model.layers.%d.mlp.experts.%d.up_proj.weight", l, e);
                put(&w, n, &L->t[MOE_UP_EXPS], e);
                snprintf(n, sizeof n, "model.layers.%d.mlp.experts.%d.down_proj.weight", l, e);
                put(&w, n, &L->t[MOE_DOWN_EXPS], e);
            }
        }
    }
    snprintf(path, sizeof path, DIR_OUT "/model-%d.safetensors", shard);
    st_write(&w, path);
    moe_free(w.hdr.p);
}

static void logits_of(const char *path, float *out, int n_vocab) {
    moe_model *m = NULL;
    moe_load_params lp = {0};
    lp.backend = MOE_BACKEND_CPU;
    lp.n_threads = 1;
    moe_status st = moe_load(path, &lp, &m);
    if (st) fail_msg("load %s: %s", path, moe_last_error());
    moe_ctx *c = NULL;
    assert_int_equal(moe_ctx_new(m, NULL, &c), MOE_OK);
    moe_token t[12] = {3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8};
    assert_int_equal(moe_step(c, t, 12), MOE_OK);
    memcpy(out, moe_logits(c, -1), (size_t)n_vocab * sizeof *out);
    moe_ctx_free(c);
    moe_model_free(m);
}

static void test_hf_dirs(void **state) {
    (void)state;
    moe_model *m = NULL;
    moe_load_params lp = {0};
    lp.backend = MOE_BACKEND_CPU;
    assert_int_equal(moe_load(SRC, &lp, &m), MOE_OK);
    int nv = m->w.hp.n_vocab;
    float *want = malloc((size_t)nv * 4), *got = malloc((size_t)nv * 4);
    logits_of(SRC, want, nv);
    for (int fused = 0; fused < 2; fused++)
        for (int shards = 1; shards <= 2; shards++) {
            write_hf_dir(m, fused, shards);
            logits_of(DIR_OUT, got, nv);
            assert_memory_equal(want, got, (size_t)nv * 4);
        }
    /* and back to GGUF with the converter's API */
    moe_model *hf = NULL;
    assert_int_equal(moe_load(DIR_OUT, &lp, &hf), MOE_OK);
    moe_model_info info;
    assert_int_equal(moe_model_get_info(hf, &info), MOE_OK);
    assert_string_equal(info.arch, "qwen3moe");
    assert_int_equal(info.n_vocab, nv);
    assert_int_equal(moe_model_save(hf, "build/test/hf_back.gguf", NULL), MOE_OK);
    moe_model_free(hf);
    logits_of("build/test/hf_back.gguf", got, nv);
    assert_memory_equal(want, got, (size_t)nv * 4);
    free(want);
    free(got);
    moe_model_free(m);
}

static void expect_load(const char *dir, moe_status want, const char *needle) {
    moe_model *m = NULL;
    moe_load_params lp = {0};
    lp.backend = MOE_BACKEND_CPU;
    moe_status st = moe_load(dir, &lp, &m);
    if (st != want || (needle && !strstr(moe_last_error(), needle)))
        fail_msg("%s: status %d, wanted %d: %s", dir, st, want, moe_last_error());
    assert_null(m);
}

static void test_hf_malformed(void **state) {
    (void)state;
    moe_model *m = NULL;
    moe_load_params lp = {0};
    lp.backend = MOE_BACKEND_CPU;
    assert_int_equal(moe_load(SRC, &lp, &m), MOE_OK);
    write_hf_dir(m, 0, 1);
    moe_model_free(m);
    size_t size = 0;
    uint8_t *st = tu_read_file(DIR_OUT "/model-0.safetensors", &size);
    size_t cfg_size = 0;
    uint8_t *cfg = tu_read_file(DIR_OUT "/config.json", &cfg_size);
    /* truncated data, a header length past the end, a truncated header */
    tu_write_file(DIR_OUT "/model-0.safetensors", st, size - 100);
    expect_load(DIR_OUT, MOE_ERR_FORMAT, "data_offsets");
    uint64_t huge = size;
    uint8_t *bad = malloc(size);
    memcpy(bad, st, size);
    memcpy(bad, &huge, 8);
    tu_write_file(DIR_OUT "/model-0.safetensors", bad, size);
    expect_load(DIR_OUT, MOE_ERR_FORMAT, "header length");
    tu_write_file(DIR_OUT "/model-0.safetensors", st, 40);
    expect_load(DIR_OUT, MOE_ERR_FORMAT, NULL);
    /* every truncation of the header fails cleanly */
    uint64_t hlen;
    memcpy(&hlen, st, 8);
    for (uint64_t n = 0; n < 8 + hlen; n += 97) {
        tu_write_file(DIR_OUT "/model-0.safetensors", st, (size_t)n);
        expect_load(DIR_OUT, MOE_ERR_FORMAT, NULL);
    }
    tu_write_file(DIR_OUT "/model-0.safetensors", st, size);
    /* config.json problems */
    FILE *f = fopen(DIR_OUT "/config.json", "w");
    fputs("{\"model_type\": \"llama\", \"hidden_size\": 4}", f);
    fclose(f);
    expect_load(DIR_OUT, MOE_ERR_UNSUPPORTED, "llama");
    f = fopen(DIR_OUT "/config.json", "w");
    fputs("{\"model_type\": \"qwen3_moe\", \"hidden_size\": 64,}", f);
    fclose(f);
    expect_load(DIR_OUT, MOE_ERR_FORMAT, "config.json");
    f = fopen(DIR_OUT "/config.json", "w");
    fputs("{\"model_type\": \"qwen3_moe\", \"hidden_size\": 64}", f);
    fclose(f);
    expect_load(DIR_OUT, MOE_ERR_FORMAT, "num_hidden_layers");
    tu_write_file(DIR_OUT "/config.json", cfg, cfg_size);
    /* a missing tensor */
    char *hdr = (char *)st + 8;
    char *at = strstr(hdr, "model.layers.1.mlp.experts.3.up_proj.weight");
    assert_non_null(at);
    memcpy(bad, st, size);
    bad[at - (char *)st] = 'X';
    tu_write_file(DIR_OUT "/model-0.safetensors", bad, size);
    expect_load(DIR_OUT, MOE_ERR_FORMAT, "model.layers.1.mlp.experts.3.up_proj.weight");
    /* no config.json at all */
    remove(DIR_OUT "/config.json");
    expect_load(DIR_OUT, MOE_ERR_UNSUPPORTED, "config.json");
    tu_write_file(DIR_OUT "/config.json", cfg, cfg_size);
    tu_write_file(DIR_OUT "/model-0.safetensors", st, size);
    free(bad);
    free(st);
    free(cfg);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_hf_dirs),
        cmocka_unit_test(test_hf_malformed),
    };
    return tu_run_tests("hf", tests);
}
