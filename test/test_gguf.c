/* test_gguf — the GGUF reader on valid files of every shape it must accept, and on malformed
   files, each of which must give an exact status (never a crash or an out-of-bounds read: the
   ASan+UBSan build of this test runs the same cases). */
#include "../moe.c"
#include "../moe_vk.c"
#include "../shaders_embedded.c"
#include "test_util.h"

#define TMP_PATH "build/test/tmp_gguf_case.gguf"

/* ---- a tiny valid qwen3moe model, built with the library's own writer ----------------------- */
enum { T_EMBD = 32, T_HEADS = 2, T_KV = 1, T_HD = 16, T_EXP = 4, T_USED = 2, T_FF = 32, T_VOCAB = 64, T_LAYERS = 2 };

typedef struct model_opts {
    const char *skip_key;      /* leave this metadata key out */
    const char *skip_tensor;   /* leave this tensor out */
    const char *arch;          /* general.architecture (default qwen3moe) */
    int32_t q_type;            /* type of the attn_q weights (default f32) */
    int64_t q_rows;            /* override attn_q ne[1] */
    uint32_t alignment;        /* 0 = default 32 */
    int extra_kvs;             /* add one key of every metadata type, nested arrays included */
} model_opts;

static float g_data[1 << 16];

static void add_t(gguf_writer *w, const model_opts *o, const char *name, int32_t type, int nd, int64_t a, int64_t b, int64_t c) {
    if (o->skip_tensor && !strcmp(o->skip_tensor, name)) return;
    int64_t ne[3] = {a, b, c};
    assert_int_equal(gw_tensor(w, name, type, nd, ne, g_data), MOE_OK);
}

/* Builds the model into memory (bytes, size). */
static uint8_t *build_model(const model_opts *o, size_t *size) {
    for (size_t i = 0; i < sizeof g_data / sizeof g_data[0]; i++) g_data[i] = 0.01f * (float)((i * 7919) % 201 - 100);
    gguf_writer w = {0};
    w.alignment = o->alignment;
    const char *keys[] = {"general.architecture", "qwen3moe.embedding_length", "qwen3moe.block_count",
                          "qwen3moe.attention.head_count", "qwen3moe.attention.head_count_kv", "qwen3moe.attention.key_length",
                          "qwen3moe.expert_count", "qwen3moe.expert_used_count", "qwen3moe.expert_feed_forward_length"};
    uint32_t vals[] = {0, T_EMBD, T_LAYERS, T_HEADS, T_KV, T_HD, T_EXP, T_USED, T_FF};
    for (size_t i = 0; i < sizeof keys / sizeof keys[0]; i++) {
        if (o->skip_key && !strcmp(o->skip_key, keys[i])) continue;
        if (i == 0) gw_kv_str(&w, keys[i], o->arch ? o->arch : "qwen3moe");
        else gw_kv_u32(&w, keys[i], vals[i]);
    }
    if (o->alignment) gw_kv_u32(&w, "general.alignment", o->alignment);
    gw_kv_f32(&w, "qwen3moe.attention.layer_norm_rms_epsilon", 1e-6f);
    gw_kv_f32(&w, "qwen3moe.rope.freq_base", 10000.0f);
    if (o->extra_kvs) {
        uint8_t u8 = 200; int8_t i8 = -5; uint16_t u16 = 60000; int16_t i16 = -30000; int64_t i64 = -(1ll << 40);
        uint64_t u64 = 1ull << 50; double f64 = 2.5;
        gw_kv_array(&w, "x.u8", GGUF_U8, &u8, 1);
        gb_str(&w.kv, "x.i8"); gb_u32(&w.kv, GGUF_I8); gb_put(&w.kv, &i8, 1); w.n_kv++;
        gb_str(&w.kv, "x.u16"); gb_u32(&w.kv, GGUF_U16); gb_put(&w.kv, &u16, 2); w.n_kv++;
        gb_str(&w.kv, "x.i16"); gb_u32(&w.kv, GGUF_I16); gb_put(&w.kv, &i16, 2); w.n_kv++;
        gb_str(&w.kv, "x.i64"); gb_u32(&w.kv, GGUF_I64); gb_put(&w.kv, &i64, 8); w.n_kv++;
        gb_str(&w.kv, "x.u64"); gb_u32(&w.kv, GGUF_U64); gb_put(&w.kv, &u64, 8); w.n_kv++;
        gb_str(&w.kv, "x.f64"); gb_u32(&w.kv, GGUF_F64); gb_put(&w.kv, &f64, 8); w.n_kv++;
        gw_kv_bool(&w, "x.bool", 1);
        gw_kv_i32(&w, "x.i32", -7);
        const char *strs[] = {"a", "", "ccc"};
        gw_kv_strings(&w, "x.strings", strs, 3);
        /* an array of 2 arrays: [[1,2,3], ["x"]] */
        gb_str(&w.kv, "x.nested"); gb_u32(&w.kv, GGUF_ARRAY); gb_u32(&w.kv, GGUF_ARRAY); gb_u64(&w.kv, 2);
        gb_u32(&w.kv, GGUF_I32); gb_u64(&w.kv, 3);
        int32_t three[3] = {1, 2, 3};
        gb_put(&w.kv, three, sizeof three);
        gb_u32(&w.kv, GGUF_STRING); gb_u64(&w.kv, 1); gb_str(&w.kv, "x");
        w.n_kv++;
    }
    add_t(&w, o, "token_embd.weight", MOE_TYPE_F32, 2, T_EMBD, T_VOCAB, 1);
    add_t(&w, o, "output_norm.weight", MOE_TYPE_F32, 1, T_EMBD, 1, 1);
    for (int l = 0; l < T_LAYERS; l++) {
        char n[64];
#define N(s) (snprintf(n, sizeof n, "blk.%d.%s.weight", l, s), n)
        add_t(&w, o, N("attn_norm"), MOE_TYPE_F32, 1, T_EMBD, 1, 1);
        add_t(&w, o, N("attn_q"), o->q_type, 2, T_EMBD, o->q_rows ? o->q_rows : T_HEADS * T_HD, 1);
        add_t(&w, o, N("attn_k"), MOE_TYPE_F32, 2, T_EMBD, T_KV * T_HD, 1);
        add_t(&w, o, N("attn_v"), MOE_TYPE_F16, 2, T_EMBD, T_KV * T_HD, 1);
        add_t(&w, o, N("attn_output"), MOE_TYPE_F32, 2, T_HEADS * T_HD, T_EMBD, 1);
        add_t(&w, o, N("attn_q_norm"), MOE_TYPE_F32, 1, T_HD, 1, 1);
        add_t(&w, o, N("attn_k_norm"), MOE_TYPE_F32, 1, T_HD, 1, 1);
        add_t(&w, o, N("ffn_norm"), MOE_TYPE_F32, 1, T_EMBD, 1, 1);
        add_t(&w, o, N("ffn_gate_inp"), MOE_TYPE_F32, 2, T_EMBD, T_EXP, 1);
        add_t(&w, o, N("ffn_gate_exps"), MOE_TYPE_Q8_0, 3, T_EMBD, T_FF, T_EXP);
        add_t(&w, o, N("ffn_up_exps"), MOE_TYPE_Q8_0, 3, T_EMBD, T_FF, T_EXP);
        add_t(&w, o, N("ffn_down_exps"), MOE_TYPE_BF16, 3, T_FF, T_EMBD, T_EXP);
#undef N
    }
    assert_int_equal(gw_write_file(&w, TMP_PATH), MOE_OK);
    gw_free(&w);
    uint8_t *bytes = tu_read_file(TMP_PATH, size);
    assert_non_null(bytes);
    return bytes;
}

static moe_status load_bytes(const uint8_t *bytes, size_t size) {
    assert_true(tu_write_file(TMP_PATH, bytes, size));
    moe_load_params lp = {0};
    lp.backend = MOE_BACKEND_CPU;
    lp.n_threads = 1;
    moe_model *m = (moe_model *)0x1;
    moe_status st = moe_load(TMP_PATH, &lp, &m);
    if (st == MOE_OK) {
        assert_non_null(m);
        moe_model_free(m);
    } else {
        assert_null(m);                      /* a failed load hands back nothing */
        assert_true(strlen(moe_last_error()) > 0);
    }
    return st;
}

static moe_status load_opts(const model_opts *o) {
    size_t size = 0;
    uint8_t *b = build_model(o, &size);
    moe_status st = load_bytes(b, size);
    free(b);
    return st;
}

static void expect_error(moe_status got, moe_status want, const char *needle) {
    if (got != want || (needle && !strstr(moe_last_error(), needle)))
        fail_msg("status %d (%s), wanted %d; message: %s", got, moe_status_str(got), want, moe_last_error());
}

/* ---- valid files ---------------------------------------------------------------------------- */
static void test_valid_model_loads(void **state) {
    (void)state;
    model_opts o = {0};
    assert_int_equal(load_opts(&o), MOE_OK);
    o.alignment = 64;
    assert_int_equal(load_opts(&o), MOE_OK);
    o.alignment = 0;
    o.q_type = MOE_TYPE_Q8_0;
    assert_int_equal(load_opts(&o), MOE_OK);
}

static void test_info(void **state) {
    (void)state;
    model_opts o = {0};
    size_t size = 0;
    free(build_model(&o, &size));
    moe_model *m = NULL;
    moe_load_params lp = {0};
    lp.backend = MOE_BACKEND_CPU;
    assert_int_equal(moe_load(TMP_PATH, &lp, &m), MOE_OK);
    moe_model_info info;
    assert_int_equal(moe_model_get_info(m, &info), MOE_OK);
    assert_string_equal(info.arch, "qwen3moe");
    assert_int_equal(info.n_vocab, T_VOCAB);
    assert_int_equal(info.n_layer, T_LAYERS);
    assert_int_equal(info.n_embd, T_EMBD);
    assert_int_equal(info.n_expert, T_EXP);
    assert_int_equal(info.n_expert_used, T_USED);
    assert_int_equal(info.bos, -1);
    assert_int_equal(info.backend, MOE_BACKEND_CPU);
    assert_int_equal(info.file_bytes, size);
    uint64_t params = T_EMBD * T_VOCAB + T_EMBD +
                      T_LAYERS * (2 * T_EMBD + 2 * T_HD + T_EMBD * T_HEADS * T_HD * 2 + 2 * T_EMBD * T_KV * T_HD +
                                  T_EMBD * T_EXP + 3 * T_EMBD * T_FF * T_EXP);
    assert_int_equal(info.n_params, params);
    moe_model_free(m);
}

/* every metadata type, nested arrays included, read back through the typed getters */
static void test_all_metadata_types(void **state) {
    (void)state;
    model_opts o = {0};
    o.extra_kvs = 1;
    size_t size = 0;
    uint8_t *b = build_model(&o, &size);
    gguf_file g;
    assert_int_equal(gguf_parse(&g, b, size), MOE_OK);
    int64_t v = 0;
    assert_int_equal(gguf_get_int(&g, "x.i8", 1, INT64_MIN, INT64_MAX, &v), MOE_OK); assert_int_equal(v, -5);
    assert_int_equal(gguf_get_int(&g, "x.u16", 1, INT64_MIN, INT64_MAX, &v), MOE_OK); assert_int_equal(v, 60000);
    assert_int_equal(gguf_get_int(&g, "x.i16", 1, INT64_MIN, INT64_MAX, &v), MOE_OK); assert_int_equal(v, -30000);
    assert_int_equal(gguf_get_int(&g, "x.i32", 1, INT64_MIN, INT64_MAX, &v), MOE_OK); assert_int_equal(v, -7);
    assert_int_equal(gguf_get_int(&g, "x.i64", 1, INT64_MIN, INT64_MAX, &v), MOE_OK); assert_true(v == -(1ll << 40));
    assert_int_equal(gguf_get_int(&g, "x.u64", 1, INT64_MIN, INT64_MAX, &v), MOE_OK); assert_true(v == (1ll << 50));
    assert_int_equal(gguf_get_int(&g, "x.bool", 1, 0, 1, &v), MOE_OK); assert_int_equal(v, 1);
    float f = 0;
    assert_int_equal(gguf_get_f32(&g, "x.f64", 1, &f), MOE_OK); assert_true(f == 2.5f);
    expect_error(gguf_get_int(&g, "x.u16", 1, 0, 100, &v), MOE_ERR_FORMAT, "x.u16");        /* out of range */
    expect_error(gguf_get_int(&g, "x.strings", 1, 0, 100, &v), MOE_ERR_FORMAT, "not an integer");
    expect_error(gguf_get_int(&g, "no.such.key", 1, 0, 100, &v), MOE_ERR_FORMAT, "no.such.key");
    v = 42;
    assert_int_equal(gguf_get_int(&g, "no.such.key", 0, 0, 100, &v), MOE_OK);
    assert_int_equal(v, 42);                                                               /* optional: untouched */
    const gguf_kv *kv = gguf_find(&g, "x.strings");
    assert_non_null(kv);
    assert_int_equal(kv->arr_type, GGUF_STRING);
    assert_int_equal(kv->arr_n, 3);
    gguf_str s[3];
    gguf_array_strings(kv, s);
    assert_true(gguf_str_eq(s[0], "a") && gguf_str_eq(s[1], "") && gguf_str_eq(s[2], "ccc"));
    kv = gguf_find(&g, "x.nested");
    assert_non_null(kv);
    assert_int_equal(kv->arr_type, GGUF_ARRAY);
    assert_int_equal(kv->arr_n, 2);
    gguf_str arch;
    assert_int_equal(gguf_get_str(&g, "general.architecture", 1, &arch), MOE_OK);
    assert_true(gguf_str_eq(arch, "qwen3moe"));
    assert_int_equal(g.n_tensors, 2 + 12 * T_LAYERS);
    gguf_free(&g);
    assert_int_equal(load_bytes(b, size), MOE_OK);
    free(b);
}

static void test_version2(void **state) {
    (void)state;
    model_opts o = {0};
    size_t size = 0;
    uint8_t *b = build_model(&o, &size);
    uint32_t v2 = 2;
    memcpy(b + 4, &v2, 4); /* v2 and v3 share the layout */
    assert_int_equal(load_bytes(b, size), MOE_OK);
    free(b);
}

/* ---- malformed files ------------------------------------------------------------------------- */
static void test_missing_and_empty(void **state) {
    (void)state;
    moe_model *m = NULL;
    expect_error(moe_load("build/test/does-not-exist.gguf", NULL, &m), MOE_ERR_IO, "does-not-exist");
    expect_error(moe_load("build/test", NULL, &m), MOE_ERR_UNSUPPORTED, NULL); /* a directory without config.json */
    expect_error(load_bytes((const uint8_t *)"", 0), MOE_ERR_FORMAT, "empty");
    expect_error(load_bytes((const uint8_t *)"GGU", 3), MOE_ERR_FORMAT, "truncated");
    expect_error(load_bytes((const uint8_t *)"NOPEabcdefgh", 12), MOE_ERR_FORMAT, "magic");
}

static void test_bad_version(void **state) {
    (void)state;
    model_opts o = {0};
    size_t size = 0;
    uint8_t *b = build_model(&o, &size);
    uint32_t v = 1;
    memcpy(b + 4, &v, 4);
    expect_error(load_bytes(b, size), MOE_ERR_UNSUPPORTED, "version 1");
    v = 99;
    memcpy(b + 4, &v, 4);
    expect_error(load_bytes(b, size), MOE_ERR_FORMAT, "version");
    v = 0x03000000u;
    memcpy(b + 4, &v, 4);
    expect_error(load_bytes(b, size), MOE_ERR_UNSUPPORTED, "big-endian");
    free(b);
}

/* Every truncation of a valid file fails cleanly with MOE_ERR_FORMAT. */
static void test_every_truncation(void **state) {
    (void)state;
    model_opts o = {0};
    size_t size = 0;
    uint8_t *b = build_model(&o, &size);
    for (size_t n = 0; n < size; n += (n < 4096 ? 1 : 997)) {
        /* each prefix goes through a fresh malloc so ASan sees reads past its end */
        uint8_t *p = malloc(n ? n : 1);
        memcpy(p, b, n);
        moe_status st = load_bytes(p, n);
        if (st != MOE_ERR_FORMAT) fail_msg("truncated to %zu of %zu bytes: status %d (%s)", n, size, st, moe_last_error());
        free(p);
    }
    free(b);
}

/* header offsets of the first key: magic 4, version 4, n_tensors 8, n_kv 8, then key length */
#define FIRST_KEY_LEN_AT 24

static void test_string_length_past_end(void **state) {
    (void)state;
    model_opts o = {0};
    size_t size = 0;
    uint8_t *b = build_model(&o, &size);
    uint64_t huge = (uint64_t)size * 2;
    memcpy(b + FIRST_KEY_LEN_AT, &huge, 8);
    expect_error(load_bytes(b, size), MOE_ERR_FORMAT, "past the end");
    huge = UINT64_MAX;
    memcpy(b + FIRST_KEY_LEN_AT, &huge, 8);
    expect_error(load_bytes(b, size), MOE_ERR_FORMAT, "past the end");
    free(b);
}

static void test_counts_too_large(void **state) {
    (void)state;
    model_opts o = {0};
    size_t size = 0;
    uint8_t *b = build_model(&o, &size);
    uint64_t huge = UINT64_MAX / 2, saved;
    memcpy(&saved, b + 16, 8);
    memcpy(b + 16, &huge, 8);
    expect_error(load_bytes(b, size), MOE_ERR_FORMAT, "key count");
    memcpy(b + 16, &saved, 8);
    memcpy(b + 8, &huge, 8);
    expect_error(load_bytes(b, size), MOE_ERR_FORMAT, "tensor count");
    free(b);
}

/* A file whose first key is an array: its count is patched to run past the end. */
static void test_array_length_past_end(void **state) {
    (void)state;
    gguf_writer w = {0};
    uint32_t one = 1;
    gw_kv_array(&w, "a", GGUF_U32, &one, 1);
    const char *strs[] = {"x", "y"};
    gw_kv_strings(&w, "b", strs, 2);
    assert_int_equal(gw_write_file(&w, TMP_PATH), MOE_OK);
    gw_free(&w);
    size_t size = 0;
    uint8_t *b = tu_read_file(TMP_PATH, &size);
    /* key "a": len(8) + 'a' + type(4) + elem type(4), then the u64 count */
    size_t at = FIRST_KEY_LEN_AT + 8 + 1 + 4 + 4;
    uint64_t huge = 1ull << 61;
    memcpy(b + at, &huge, 8);
    expect_error(load_bytes(b, size), MOE_ERR_FORMAT, "past the end");
    /* the string array's count: after "a"'s 4-byte element */
    memcpy(b + at, &(uint64_t){1}, 8);
    size_t at_b = at + 8 + 4 + 8 + 1 + 4 + 4;
    memcpy(b + at_b, &huge, 8);
    expect_error(load_bytes(b, size), MOE_ERR_FORMAT, "past the end");
    /* an unknown element type */
    memcpy(b + at_b, &(uint64_t){2}, 8);
    memcpy(b + at - 4, &(uint32_t){77}, 4);
    expect_error(load_bytes(b, size), MOE_ERR_FORMAT, "unknown array element type");
    free(b);
}

static void test_nesting_too_deep(void **state) {
    (void)state;
    gguf_writer w = {0};
    gb_str(&w.kv, "deep");
    gb_u32(&w.kv, GGUF_ARRAY);
    for (int i = 0; i < 12; i++) { gb_u32(&w.kv, GGUF_ARRAY); gb_u64(&w.kv, 1); }
    gb_u32(&w.kv, GGUF_U8);
    gb_u64(&w.kv, 0);
    w.n_kv = 1;
    assert_int_equal(gw_write_file(&w, TMP_PATH), MOE_OK);
    gw_free(&w);
    size_t size = 0;
    uint8_t *b = tu_read_file(TMP_PATH, &size);
    expect_error(load_bytes(b, size), MOE_ERR_FORMAT, "nested");
    free(b);
}

static void test_unknown_value_type(void **state) {
    (void)state;
    model_opts o = {0};
    size_t size = 0;
    uint8_t *b = build_model(&o, &size);
    /* first key is general.architecture (20 chars): its type follows the key */
    memcpy(b + FIRST_KEY_LEN_AT + 8 + 20, &(uint32_t){13}, 4);
    expect_error(load_bytes(b, size), MOE_ERR_FORMAT, "unknown value type");
    free(b);
}

/* Finds a tensor's info record in a file: returns the offset just past its name. */
static size_t find_tensor_info(const uint8_t *b, size_t size, const char *name) {
    size_t n = strlen(name);
    for (size_t i = 8; i + n < size; i++)
        if (!memcmp(b + i, name, n)) {
            uint64_t len;
            memcpy(&len, b + i - 8, 8);
            if (len == n) return i + n;
        }
    fail_msg("tensor %s not found", name);
    return 0;
}

static void test_tensor_offset_outside(void **state) {
    (void)state;
    model_opts o = {0};
    size_t size = 0;
    uint8_t *b = build_model(&o, &size);
    size_t at = find_tensor_info(b, size, "output_norm.weight"); /* n_dims 1, ne[0], type, offset */
    uint64_t off = (uint64_t)size;                                /* aligned to 32? make it so */
    off = (off + 31) / 32 * 32;
    memcpy(b + at + 4 + 8 + 4, &off, 8);
    expect_error(load_bytes(b, size), MOE_ERR_FORMAT, "outside the file");
    off = UINT64_MAX - 31;
    memcpy(b + at + 4 + 8 + 4, &off, 8);
    expect_error(load_bytes(b, size), MOE_ERR_FORMAT, "outside the file");
    off = 8; /* misaligned */
    memcpy(b + at + 4 + 8 + 4, &off, 8);
    expect_error(load_bytes(b, size), MOE_ERR_FORMAT, "aligned");
    free(b);
}

static void test_dims_overflow(void **state) {
    (void)state;
    model_opts o = {0};
    size_t size = 0;
    uint8_t *b = build_model(&o, &size);
    size_t at = find_tensor_info(b, size, "token_embd.weight"); /* n_dims 2, ne0, ne1 */
    uint64_t big = 1ull << 40;
    memcpy(b + at + 4, &big, 8);
    memcpy(b + at + 12, &big, 8);
    expect_error(load_bytes(b, size), MOE_ERR_FORMAT, "overflows");
    uint64_t zero = 0;
    memcpy(b + at + 4, &zero, 8);
    expect_error(load_bytes(b, size), MOE_ERR_FORMAT, "zero");
    memcpy(b + at, &(uint32_t){7}, 4); /* 7 dimensions */
    expect_error(load_bytes(b, size), MOE_ERR_FORMAT, "dimensions");
    /* a byte size that overflows although the element count does not (Q8_0 rows of 2^58) */
    free(b);
    b = build_model(&o, &size);
    at = find_tensor_info(b, size, "token_embd.weight");
    uint64_t ne0 = 1ull << 58, ne1 = 32;
    memcpy(b + at + 4, &ne0, 8);
    memcpy(b + at + 12, &ne1, 8);
    memcpy(b + at + 20, &(uint32_t){MOE_TYPE_Q8_0}, 4);
    expect_error(load_bytes(b, size), MOE_ERR_FORMAT, NULL);
    free(b);
}

static void test_unknown_tensor_type(void **state) {
    (void)state;
    model_opts o = {0};
    size_t size = 0;
    uint8_t *b = build_model(&o, &size);
    size_t at = find_tensor_info(b, size, "output_norm.weight");
    memcpy(b + at + 4 + 8, &(uint32_t){200}, 4);
    expect_error(load_bytes(b, size), MOE_ERR_FORMAT, "unknown or unsupported type");
    memcpy(b + at + 4 + 8, &(uint32_t){MOE_TYPE_Q8_0}, 4); /* 32-element row of Q8_0 ok, 32 | 32 */
    at = find_tensor_info(b, size, "blk.0.attn_q_norm.weight");
    memcpy(b + at + 4 + 8, &(uint32_t){MOE_TYPE_Q8_0}, 4); /* 16 elements: not a whole Q8_0 block */
    expect_error(load_bytes(b, size), MOE_ERR_FORMAT, "block size");
    free(b);
}

static void test_missing_key_and_tensor(void **state) {
    (void)state;
    model_opts o = {0};
    o.skip_key = "qwen3moe.block_count";
    expect_error(load_opts(&o), MOE_ERR_FORMAT, "qwen3moe.block_count");
    o.skip_key = "general.architecture";
    expect_error(load_opts(&o), MOE_ERR_FORMAT, "general.architecture");
    o.skip_key = "qwen3moe.expert_count";
    expect_error(load_opts(&o), MOE_ERR_FORMAT, "qwen3moe.expert_count");
    o.skip_key = NULL;
    o.skip_tensor = "blk.1.ffn_down_exps.weight";
    expect_error(load_opts(&o), MOE_ERR_FORMAT, "blk.1.ffn_down_exps.weight");
    o.skip_tensor = "token_embd.weight";
    expect_error(load_opts(&o), MOE_ERR_FORMAT, "token_embd.weight");
    o.skip_tensor = NULL;
    o.q_rows = 48; /* wrong shape */
    expect_error(load_opts(&o), MOE_ERR_FORMAT, "blk.0.attn_q.weight");
    o.q_rows = 0;
    o.arch = "llama-but-not";
    expect_error(load_opts(&o), MOE_ERR_UNSUPPORTED, "llama-but-not");
}

static void test_duplicates_and_alignment(void **state) {
    (void)state;
    gguf_writer w = {0};
    gw_kv_u32(&w, "k", 1);
    gw_kv_u32(&w, "k", 2);
    assert_int_equal(gw_write_file(&w, TMP_PATH), MOE_OK);
    gw_free(&w);
    size_t size = 0;
    uint8_t *b = tu_read_file(TMP_PATH, &size);
    expect_error(load_bytes(b, size), MOE_ERR_FORMAT, "duplicate key");
    free(b);
    memset(&w, 0, sizeof w);
    gw_kv_u32(&w, "general.alignment", 24);
    assert_int_equal(gw_write_file(&w, TMP_PATH), MOE_OK);
    gw_free(&w);
    b = tu_read_file(TMP_PATH, &size);
    expect_error(load_bytes(b, size), MOE_ERR_FORMAT, "power of two");
    free(b);
}

/* Random corruption of the header region: any status is acceptable, a crash is not. */
static void test_fuzz_header(void **state) {
    (void)state;
    model_opts o = {0};
    size_t size = 0;
    uint8_t *b = build_model(&o, &size);
    size_t header = find_tensor_info(b, size, "blk.1.ffn_down_exps.weight") + 64;
    uint8_t *p = malloc(size);
    uint64_t seed = 12345;
    int counts[3] = {0};
    for (int it = 0; it < 600; it++) {
        memcpy(p, b, size);
        int flips = 1 + (int)(seed % 4);
        for (int k = 0; k < flips; k++) {
            seed = seed * 6364136223846793005ull + 1442695040888963407ull;
            p[(seed >> 33) % header] ^= (uint8_t)(1u << ((seed >> 20) % 8));
        }
        moe_status st = load_bytes(p, size);
        assert_true(st == MOE_OK || st == MOE_ERR_FORMAT || st == MOE_ERR_UNSUPPORTED);
        counts[st == MOE_OK ? 0 : st == MOE_ERR_FORMAT ? 1 : 2]++;
    }
    print_message("fuzz: %d ok, %d format errors, %d unsupported\n", counts[0], counts[1], counts[2]);
    free(p);
    free(b);
}

static void test_bad_arguments(void **state) {
    (void)state;
    moe_model *m = NULL;
    assert_int_equal(moe_load(NULL, NULL, &m), MOE_ERR_INVALID_ARG);
    assert_int_equal(moe_load(TMP_PATH, NULL, NULL), MOE_ERR_INVALID_ARG);
    moe_load_params lp = {0};
    lp.backend = 7;
    assert_int_equal(moe_load(TMP_PATH, &lp, &m), MOE_ERR_INVALID_ARG);
    lp.backend = 0;
    lp.n_threads = -2;
    assert_int_equal(moe_load(TMP_PATH, &lp, &m), MOE_ERR_INVALID_ARG);
    moe_model_free(NULL);
    moe_ctx_free(NULL);
    assert_int_equal(moe_model_get_info(NULL, NULL), MOE_ERR_INVALID_ARG);
    assert_string_equal(moe_status_str(MOE_ERR_FORMAT), "bad file format");
}

/* Every allocation the loader makes may fail: each failure gives NO_MEMORY, leaks nothing. */
static void test_load_allocation_failures(void **state) {
    (void)state;
    model_opts o = {0};
    size_t size = 0;
    free(build_model(&o, &size));
    moe_load_params lp = {0};
    lp.backend = MOE_BACKEND_CPU;
    lp.n_threads = 2;
    int n_fail = 0;
    for (long k = 0;; k++) {
        moe_model *m = NULL;
        moe_test_fail_alloc_after(k);
        moe_status st = moe_load(TMP_PATH, &lp, &m);
        moe_test_fail_alloc_after(-1);
        if (st == MOE_OK) {
            moe_model_free(m);
            break;
        }
        expect_error(st, MOE_ERR_NO_MEMORY, NULL);
        n_fail++;
    }
    assert_true(n_fail > 3);
}

/* ---- no NaN or infinity in any weight: scales of quantized blocks, every F32/F16/BF16 element ---- */
/* Loads fixture path with one value of tensor `name` overwritten: block `blk`'s scale field at byte
   `off` (block types) set to the f16 `h`, or element `blk` (dense types) set to a NaN/inf. */
static moe_status load_poked(const char *path, const char *name, uint64_t blk, int off, uint16_t h) {
    size_t size = 0;
    uint8_t *b = tu_read_file(path, &size);
    assert_non_null(b);
    gguf_file g;
    assert_int_equal(gguf_parse(&g, b, size), MOE_OK);
    const gguf_tensor *t = gguf_find_tensor(&g, name);
    assert_non_null(t);
    uint8_t *at = (uint8_t *)t->data;
    const moe_type_traits *tt = type_traits(t->type);
    if (t->type == MOE_TYPE_F32) {
        float v = h == 0x7c00 ? INFINITY : NAN;
        memcpy(at + 4 * blk, &v, 4);
    } else if (t->type == MOE_TYPE_F16) wr16(at + 2 * blk, h);
    else if (t->type == MOE_TYPE_BF16) wr16(at + 2 * blk, h == 0x7c00 ? 0x7f80 : 0x7fc0);
    else wr16(at + blk * (uint64_t)tt->block_bytes + (uint64_t)off, h);
    gguf_free(&g);
    moe_status st = load_bytes(b, size);
    free(b);
    return st;
}

static void test_nonfinite_weights(void **state) {
    (void)state;
    static const struct { const char *path, *tensor; uint64_t blk; int off; uint16_t h; const char *want; } cases[] = {
        {"test/fixtures/qwen3moe_q8_0.gguf", "blk.1.ffn_up_exps.weight", 37, 0, 0x7e00, "block 37 (row 18) has a non-finite scale (NaN)"},
        {"test/fixtures/qwen3moe_q8_0.gguf", "token_embd.weight", 3, 0, 0xfc00, "block 3 (row 1) has a non-finite scale (-inf)"},
        {"test/fixtures/qwen3moe_q8_0.gguf", "blk.0.ffn_gate_inp.weight", 0, 0, 0x7c00, "block 0 (row 0) has a non-finite scale (+inf)"},
        {"test/fixtures/qwen3moe_q4_k.gguf", "blk.0.attn_q.weight", 5, 2, 0x7c00, "'blk.0.attn_q.weight' (q4_K): block 5"},  /* dmin */
        {"test/fixtures/qwen3moe_q4_k.gguf", "output.weight", 1, 0, 0x7e01, "'output.weight' (q4_K): block 1"},           /* d */
        {"test/fixtures/qwen3moe_mixed.gguf", "blk.1.ffn_down_exps.weight", 9, 208, 0x7e00, "(q6_K): block 9"},
        {"test/fixtures/qwen3moe_f32.gguf", "blk.0.ffn_gate_exps.weight", 1000, 0, 0x7c00, "'blk.0.ffn_gate_exps.weight' holds a non-finite value at element 1000"},
        {"test/fixtures/qwen3moe_f16.gguf", "blk.1.attn_k.weight", 77, 0, 0x7e00, "'blk.1.attn_k.weight' holds a non-finite value at element 77"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        moe_status st = load_poked(cases[i].path, cases[i].tensor, cases[i].blk, cases[i].off, cases[i].h);
        print_message("%s %s: %s\n", cases[i].path + 14, cases[i].tensor, moe_last_error());
        expect_error(st, MOE_ERR_FORMAT, cases[i].want);
    }
    /* finite values next to the limits still load: the largest f16 scale */
    assert_int_equal(load_poked("test/fixtures/qwen3moe_q8_0.gguf", "blk.1.ffn_up_exps.weight", 37, 0, 0x7bff), MOE_OK);

    /* every block type through the checker itself: clean blocks pass, each scale field is caught */
    static const struct { int32_t type; int off; } kinds[] = {
        {MOE_TYPE_Q8_0, 0}, {MOE_TYPE_Q4_0, 0}, {MOE_TYPE_Q4_K, 0}, {MOE_TYPE_Q4_K, 2}, {MOE_TYPE_Q5_K, 0},
        {MOE_TYPE_Q5_K, 2}, {MOE_TYPE_Q6_K, 208}, {MOE_TYPE_MXFP4, 0}, {MOE_TYPE_F16, 0}, {MOE_TYPE_BF16, 0},
        {MOE_TYPE_F32, 0},
    };
    enum { K = 512, R = 4 };
    static float src[K * R];
    static uint8_t blocks[K * R * 4];
    for (int j = 0; j < K * R; j++) src[j] = 0.1f * (float)((j * 7919) % 201 - 100);
    for (size_t k = 0; k < sizeof kinds / sizeof kinds[0]; k++) {
        const moe_type_traits *tt = type_traits(kinds[k].type);
        memset(blocks, 0, sizeof blocks);
        tt->quant(src, blocks, K * R);
        gguf_tensor t;
        memset(&t, 0, sizeof t);
        t.name.p = "w";
        t.name.n = 1;
        t.type = kinds[k].type;
        t.n_dims = 2;
        t.ne[0] = K, t.ne[1] = R, t.ne[2] = t.ne[3] = 1;
        t.nbytes = type_row_bytes(t.type, K) * R;
        t.data = blocks;
        gguf_file g;
        memset(&g, 0, sizeof g);
        g.tensors = &t;
        g.n_tensors = 1;
        assert_int_equal(check_tensor_values(&g, CHECK_ALL), MOE_OK);
        uint64_t nb = t.nbytes / (uint64_t)tt->block_bytes, b = nb - 1; /* the last block */
        uint8_t *at = blocks + b * (uint64_t)tt->block_bytes + (uint64_t)kinds[k].off;
        if (t.type == MOE_TYPE_MXFP4) {
            at[0] = 254;             /* 2^126 x code 12 overflows to inf */
            at[1] = 0x77;
        } else if (t.type == MOE_TYPE_F32) {
            float v = -INFINITY;
            memcpy(at, &v, 4);
        } else wr16(at, t.type == MOE_TYPE_BF16 ? 0xffc0 : 0xfe00);
        moe_status st = check_tensor_values(&g, CHECK_ALL);
        print_message("%s: %s\n", tt->name, moe_last_error());
        expect_error(st, MOE_ERR_FORMAT, "'w'");
        char want[64];
        if (tt->block_elems > 1) snprintf(want, sizeof want, "block %llu (row %d)", (unsigned long long)b, R - 1);
        else snprintf(want, sizeof want, "element %llu (row %d)", (unsigned long long)b, R - 1);
        assert_non_null(strstr(moe_last_error(), want));
        if (t.type == MOE_TYPE_MXFP4) { /* the same exponent with small codes stays finite: accepted */
            memset(at + 1, 0x11, 16);
            assert_int_equal(check_tensor_values(&g, CHECK_ALL), MOE_OK);
        }
    }
}

/* ---- export: moe_model_save ---------------------------------------------------------------- */
static void logits_of(const char *path, float *out, int n_vocab) {
    moe_model *m = NULL;
    moe_load_params lp = {0};
    lp.backend = MOE_BACKEND_CPU;
    lp.n_threads = 1;
    lp.cpu_exact = 1; /* f32 activations: a q8_0 file and its f32 export then give the same bits */
    assert_int_equal(moe_load(path, &lp, &m), MOE_OK);
    moe_ctx *c = NULL;
    assert_int_equal(moe_ctx_new(m, NULL, &c), MOE_OK);
    moe_token t[12] = {3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8};
    assert_int_equal(moe_step(c, t, 12), MOE_OK);
    memcpy(out, moe_logits(c, -1), (size_t)n_vocab * sizeof *out);
    moe_ctx_free(c);
    moe_model_free(m);
}

static int32_t cancel_save(float f, void *user) {
    (void)user;
    return f > 0.3f;
}

static void test_export(void **state) {
    (void)state;
    const char *src = "test/fixtures/qwen3moe_q8_0.gguf", *dst = "build/test/tmp_export.gguf";
    moe_model *m = NULL;
    moe_load_params lp = {0};
    lp.backend = MOE_BACKEND_CPU;
    assert_int_equal(moe_load(src, &lp, &m), MOE_OK);
    moe_model_info info;
    moe_model_get_info(m, &info);
    float *a = malloc((size_t)info.n_vocab * sizeof *a), *b = malloc((size_t)info.n_vocab * sizeof *b);
    logits_of(src, a, info.n_vocab);
    /* keep and f32: dequantized values are exact, and the kernels sum in one order: bit-identical */
    moe_save_params sp = {0};
    for (int ftype = MOE_FTYPE_KEEP; ftype <= MOE_FTYPE_F32; ftype++) {
        sp.ftype = ftype;
        assert_int_equal(moe_model_save(m, dst, &sp), MOE_OK);
        logits_of(dst, b, info.n_vocab);
        assert_memory_equal(a, b, (size_t)info.n_vocab * sizeof *a);
    }
    /* every other ftype loads and runs (rows of 64 do not fit K-quant blocks: those fall back) */
    for (int ftype = MOE_FTYPE_F16; ftype <= MOE_FTYPE_Q4_0; ftype++) {
        sp.ftype = ftype;
        assert_int_equal(moe_model_save(m, dst, &sp), MOE_OK);
        logits_of(dst, b, info.n_vocab);
        for (int i = 0; i < info.n_vocab; i++) assert_true(isfinite(b[i]));
    }
    sp.ftype = 99;
    assert_int_equal(moe_model_save(m, dst, &sp), MOE_ERR_INVALID_ARG);
    sp.ftype = MOE_FTYPE_Q8_0;
    sp.progress = cancel_save;
    remove(dst);
    assert_int_equal(moe_model_save(m, dst, &sp), MOE_ERR_CANCELLED);
    FILE *f = fopen(dst, "rb");
    assert_null(f);                                    /* no partial file is left */
    sp.progress = NULL;
    assert_int_equal(moe_model_save(m, "build/no-such-dir/x.gguf", &sp), MOE_ERR_IO);
    for (long k = 0;; k++) {
        moe_test_fail_alloc_after(k);
        moe_status st = moe_model_save(m, dst, &sp);
        moe_test_fail_alloc_after(-1);
        if (st == MOE_OK) break;
        assert_int_equal(st, MOE_ERR_NO_MEMORY);
    }
    free(a);
    free(b);
    moe_model_free(m);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_valid_model_loads),   cmocka_unit_test(test_info),
        cmocka_unit_test(test_all_metadata_types),  cmocka_unit_test(test_version2),
        cmocka_unit_test(test_missing_and_empty),   cmocka_unit_test(test_bad_version),
        cmocka_unit_test(test_every_truncation),    cmocka_unit_test(test_string_length_past_end),
        cmocka_unit_test(test_counts_too_large),    cmocka_unit_test(test_array_length_past_end),
        cmocka_unit_test(test_nesting_too_deep),    cmocka_unit_test(test_unknown_value_type),
        cmocka_unit_test(test_tensor_offset_outside), cmocka_unit_test(test_dims_overflow),
        cmocka_unit_test(test_unknown_tensor_type), cmocka_unit_test(test_missing_key_and_tensor),
        cmocka_unit_test(test_duplicates_and_alignment), cmocka_unit_test(test_fuzz_header),
        cmocka_unit_test(test_bad_arguments),       cmocka_unit_test(test_load_allocation_failures),
        cmocka_unit_test(test_export),              cmocka_unit_test(test_nonfinite_weights),
    };
    return tu_run_tests("gguf", tests);
}
