/* test_bundled — the bundled model (examples/models/tiny-moe-kjv-q8_0.gguf, trained by
   gen/train_tiny_moe.py and converted by our own examples/convert): its tokenizer reproduces the
   training tokenizer's ids on the reference prompts, greedy continuations equal those of
   transformers on the same Q8_0 weights, and its held-out perplexity computed here with
   logits_all matches the training script's figure within 1% (the procedure is the script's:
   16 windows of 256 tokens from position 0, no BOS, 255 predictions each). */
#include "../moe.c"
#include "../moe_vk.c"
#include "../shaders_embedded.c"
#include "test_util.h"

#define MODEL "examples/models/tiny-moe-kjv-q8_0.gguf"
#define EVAL "gen/tiny_moe/tiny_moe_eval.json"

typedef struct eval_ref { json_file jf; uint32_t greedy, tokens; double ppl; int window; } eval_ref;

static void eval_open(eval_ref *r) {
    assert_int_equal(json_file_open(&r->jf, EVAL, "tiny_moe_eval.json"), MOE_OK);
    const json_doc *d = &r->jf.d;
    r->greedy = json_get(d, 0, "greedy_q8_0");
    r->tokens = json_get(d, json_get(d, 0, "eval"), "token_ids");
    /* the converter keeps the router in F32, as llama.cpp does: that variant's figure */
    assert_true(json_double(d, json_get(d, json_get(d, 0, "ppl"), "q8_0_router_f32"), &r->ppl));
    int64_t w = 0;
    assert_true(json_int(d, json_get(d, json_get(d, 0, "eval"), "window"), 2, 4096, &w));
    r->window = (int)w;
    assert_true(json_is(d, r->greedy, JSON_ARRAY) && json_is(d, r->tokens, JSON_ARRAY));
}

/* int array node → malloc'd ids */
static int32_t *ids_of(const json_doc *d, uint32_t arr, int *n) {
    *n = (int)d->nodes[arr].len;
    int32_t *v = malloc((size_t)(*n ? *n : 1) * sizeof *v);
    int k = 0;
    for (uint32_t i = arr + 1; i < d->nodes[arr].end; i = d->nodes[i].end) {
        int64_t x;
        assert_true(json_int(d, i, 0, 1 << 20, &x));
        v[k++] = (int32_t)x;
    }
    return v;
}

static moe_model *load_model(int exact) {
    moe_load_params lp = {0};
    lp.backend = MOE_BACKEND_CPU;
    lp.n_threads = 2;
    lp.cpu_exact = exact;
    moe_model *m = NULL;
    moe_status st = moe_load(MODEL, &lp, &m);
    if (st) fail_msg("%s: %s", MODEL, moe_last_error());
    return m;
}

static void check_greedy(int exact) {
    eval_ref r;
    eval_open(&r);
    const json_doc *d = &r.jf.d;
    moe_model *m = load_model(exact);
    moe_model_info info;
    moe_model_get_info(m, &info);
    assert_int_equal(info.n_vocab, 4096);
    for (uint32_t g = r.greedy + 1; g < d->nodes[r.greedy].end; g = d->nodes[g].end) {
        char *prompt = json_strdup(d, json_get(d, g, "prompt")), *text = json_strdup(d, json_get(d, g, "text"));
        int n_pid, n_ids;
        int32_t *pid = ids_of(d, json_get(d, g, "prompt_ids"), &n_pid), *want = ids_of(d, json_get(d, g, "ids"), &n_ids);
        moe_token toks[64];
        int32_t n = -1;
        assert_int_equal(moe_tokenize(m, prompt, (int32_t)strlen(prompt), toks, 64, MOE_TOKENIZE_ADD_SPECIAL, &n), MOE_OK);
        assert_int_equal(n, n_pid);
        assert_memory_equal(toks, pid, (size_t)n * sizeof *toks);
        moe_ctx *c = NULL;
        assert_int_equal(moe_ctx_new(m, NULL, &c), MOE_OK);
        assert_int_equal(moe_step(c, toks, n), MOE_OK);
        moe_token got[64];
        for (int i = 0; i < n_ids; i++) {
            const float *l = moe_logits(c, -1);
            moe_token b = 0;
            for (int v = 1; v < info.n_vocab; v++)
                if (l[v] > l[b]) b = v;
            got[i] = b;
            assert_int_equal(moe_step(c, &b, 1), MOE_OK);
        }
        for (int i = 0; i < n_ids; i++)
            if (got[i] != want[i]) fail_msg("'%s': token %d is %d, transformers gave %d", prompt, i, got[i], want[i]);
        char out[1024];
        int32_t k = -1;
        assert_int_equal(moe_detokenize(m, got, n_ids, out, (int32_t)sizeof out - 1, 0, &k), MOE_OK);
        assert_true(k > 0);
        out[k] = 0;
        assert_string_equal(out, text);
        print_message("  %s: greedy '%s' -> %d/%d tokens as transformers\n", exact ? "exact" : "int8", prompt, n_ids, n_ids);
        moe_ctx_free(c);
        free(prompt); free(text); free(pid); free(want);
    }
    moe_model_free(m);
    json_file_close(&r.jf);
}

static void check_perplexity(int exact) {
    eval_ref r;
    eval_open(&r);
    int n;
    int32_t *ids = ids_of(&r.jf.d, r.tokens, &n);
    moe_model *m = load_model(exact);
    moe_ctx_params cp = {0};
    cp.n_ctx = r.window;
    cp.logits_all = 1;
    moe_ctx *c = NULL;
    assert_int_equal(moe_ctx_new(m, &cp, &c), MOE_OK);
    double nll = 0;
    int n_pred = 0, n_vocab = 4096;
    for (int w0 = 0; w0 + r.window <= n; w0 += r.window) {
        assert_int_equal(moe_ctx_rewind(c, 0), MOE_OK);
        assert_int_equal(moe_step(c, ids + w0, r.window), MOE_OK);
        for (int t = 0; t + 1 < r.window; t++) {
            const float *l = moe_logits(c, t);
            double mx = l[0], s = 0;
            for (int v = 1; v < n_vocab; v++) mx = l[v] > mx ? l[v] : mx;
            for (int v = 0; v < n_vocab; v++) s += exp((double)l[v] - mx);
            nll -= (double)l[ids[w0 + t + 1]] - mx - log(s);
            n_pred++;
        }
    }
    double ppl = exp(nll / n_pred);
    print_message("  %s: held-out perplexity: moe %.4f, training script %.4f (%d predictions), diff %.3f%%\n", exact ? "exact" : "int8", ppl, r.ppl, n_pred,
                  100.0 * fabs(ppl - r.ppl) / r.ppl);
    assert_int_equal(n_pred, 16 * 255);
    assert_true(fabs(ppl - r.ppl) <= 0.01 * r.ppl);
    moe_ctx_free(c);
    moe_model_free(m);
    free(ids);
    json_file_close(&r.jf);
}

/* exact mode (f32 activations) is what transformers computes; the default int8-activation mode
   must agree too on this model (its greedy margins are >= 0.028 logits) */
static void test_greedy(void **state) {
    (void)state;
    check_greedy(1);
    check_greedy(0);
}

static void test_perplexity(void **state) {
    (void)state;
    check_perplexity(1);
    check_perplexity(0);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_greedy),
        cmocka_unit_test(test_perplexity),
    };
    return tu_run_tests("bundled", tests);
}
