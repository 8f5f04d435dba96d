#!/bin/sh
# prepare_corpus.sh — the King James Bible as plain English text, with a fixed train/valid/test split,
# for gen/train_tiny_moe.py (the small bundled MoE model).
#
# Source: Debian 12's `bible-kjv` package (it pulls `bible-kjv-text`, the compressed text in
# /usr/lib/bible.data). The `bible` program prints it; `-f` turns pretty-printing off, which gives one
# verse per line preceded by its reference ("Ge1:1 In the beginning ..."), and the range
# Gen1:1-Rev22:21 is the whole book: 31,102 verses in 1,189 chapters, 66 books, pure ASCII.
# Needs root (apt-get) on Debian 12; run from anywhere: `sh gen/prepare_corpus.sh`.
#
# Normalisation (decided here, read by the training script):
#   * verse references are DROPPED: "Ge1:1"-style prefixes are ~10% of the characters, carry no
#     English, and a 4k-vocabulary model would spend capacity learning to count verses;
#   * one verse per line, text exactly as `bible` prints it, except runs of spaces collapse to one and
#     leading/trailing spaces go (two verses have a double space); every line ends with "\n";
#   * the text is otherwise untouched (case, punctuation, KJV spelling, the italics are not marked).
#
# Split, by the chapter's running index c = 0..1188 in canonical order (Genesis 1 is 0):
#   c % 50 == 49  -> test  (held-out: 23 chapters, Genesis 50, ..., about 2%)   kjv_test.txt
#   c % 50 == 24  -> valid (24 chapters, for early stopping, about 2%)          kjv_valid.txt
#   otherwise     -> train                                                       kjv_train.txt
# Spreading the held-out chapters over the whole book keeps its style mix the same as the training
# text's (the last books alone would be all epistles and Revelation).
# kjv_train.txt separates BOOKS with one empty line (the trainer puts <|endoftext|> there); valid and
# test have no empty lines. kjv.txt is the whole text, one verse a line, with no empty lines.
# kjv_refs.tsv lists "split<TAB>reference" for every verse, in order.
#
# Outputs go to $REPO/.cache/corpus/ (git-ignored), with SHA256SUMS; rerunning gives the same bytes.
set -eu

repo=$(cd "$(dirname "$0")/.." && pwd)
out="$repo/.cache/corpus"
mkdir -p "$out"
export LC_ALL=C

if ! command -v bible >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y bible-kjv || { apt-get update && apt-get install -y bible-kjv; }
fi

raw="$out/kjv_raw.txt"
bible -f 'Gen1:1-Rev22:21' >"$raw"

n=$(wc -l <"$raw")
if [ "$n" -ne 31102 ]; then
    echo "prepare_corpus: expected 31102 verses from bible, got $n" >&2
    exit 1
fi

awk -v out="$out" '
BEGIN {
    all = out "/kjv.txt"; tr = out "/kjv_train.txt"; va = out "/kjv_valid.txt"
    te = out "/kjv_test.txt"; refs = out "/kjv_refs.tsv"
    printf "" > all; printf "" > tr; printf "" > va; printf "" > te; printf "" > refs
    c = -1; prev_book = ""; prev_chap = ""; nbooks = 0; ntrain_books = 0
}
{
    ref = $1
    if (match(ref, /[0-9]+:[0-9]+$/) == 0) { print "bad reference: " ref > "/dev/stderr"; exit 1 }
    book = substr(ref, 1, RSTART - 1)
    split(substr(ref, RSTART), cv, ":")
    chap = cv[1]
    if (book != prev_book || chap != prev_chap) c++
    new_book = (book != prev_book)
    if (new_book) nbooks++
    prev_book = book; prev_chap = chap

    text = substr($0, length(ref) + 1)
    gsub(/ +/, " ", text); sub(/^ /, "", text); sub(/ $/, "", text)
    if (text == "") { print "empty verse: " ref > "/dev/stderr"; exit 1 }

    if (c % 50 == 49) split_name = "test"
    else if (c % 50 == 24) split_name = "valid"
    else split_name = "train"

    print text > all
    print split_name "\t" ref > refs
    if (split_name == "test") { print text > te; ntest++ }
    else if (split_name == "valid") { print text > va; nvalid++ }
    else {
        # one empty line between books in the training text (not before the first)
        if (train_book != book) { if (train_book != "") print "" > tr; train_book = book }
        print text > tr; ntrain++
    }
}
END {
    printf "prepare_corpus: %d books, %d chapters, verses train %d / valid %d / test %d\n",
        nbooks, c + 1, ntrain, nvalid, ntest > "/dev/stderr"
    if (nbooks != 66 || c + 1 != 1189) exit 1
}' "$raw"

rm -f "$raw"
(cd "$out" && sha256sum kjv.txt kjv_train.txt kjv_valid.txt kjv_test.txt kjv_refs.tsv >SHA256SUMS)
wc -c "$out"/kjv*.txt
cat "$out/SHA256SUMS"
