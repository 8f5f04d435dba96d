// Hugging Face `tokenizers` ids through its official Node binding (npm package `tokenizers`, the
// same Rust library as the Python package), for machines without the Python one:
//     NODE_PATH=DIR/node_modules node gen/hf_tokenize.mjs TOKENIZER_JSON < texts.json > ids.json
// stdin: a JSON array of strings; stdout: {"version", "n_vocab", "prefix", "ids": [[...]],
// "ids_plain": [[...]], "token_to_id": {...}}. "ids" is encode(text, add_special_tokens=False);
// "ids_plain" is what Python's `encode_special_tokens = True` gives (the binding has no such switch:
// a second tokenizer from the same file without the special added tokens matches it, since those
// are then neither split out nor made by BPE; that holds where every other added token keeps its
// id, as in SentencePiece-style vocabularies whose model vocabulary holds the added tokens too:
// checked below, and refs_gemma3.bin came out byte for byte). "prefix" is what add_special_tokens=True adds in
// front of "hello". "token_to_id" maps the texts that are single tokens.
import { createRequire } from "node:module";
import { readFileSync } from "node:fs";

const require = createRequire(import.meta.url);
const { Tokenizer } = require("tokenizers");
const version = require("tokenizers/package.json").version;

const raw = readFileSync(process.argv[2], "utf8");
const tok = Tokenizer.fromString(raw);
const j = JSON.parse(raw);
j.added_tokens = j.added_tokens.filter((a) => !a.special);
const plain = Tokenizer.fromString(JSON.stringify(j));
for (const a of j.added_tokens)
  if (plain.tokenToId(a.content) !== a.id) throw new Error(`without the special tokens, ${a.content} moves from id ${a.id}: no plain mode`);
const texts = JSON.parse(readFileSync(0, "utf8"));

const enc = async (t, s, special) => Array.from((await t.encode(s, null, { addSpecialTokens: special })).getIds());
const out = { version, n_vocab: tok.getVocabSize(true), ids: [], ids_plain: [], token_to_id: {} };
const a = await enc(tok, "hello", false), b = await enc(tok, "hello", true);
out.prefix = b.slice(0, b.length - a.length);
for (const s of texts) {
  out.ids.push(await enc(tok, s, false));
  out.ids_plain.push(await enc(plain, s, false));
  const id = tok.tokenToId(s);
  if (id !== null && id !== undefined) out.token_to_id[s] = id;
}
process.stdout.write(JSON.stringify(out));
