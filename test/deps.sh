#!/bin/sh
# Installs what the tests need on a fresh Debian 12 machine (run as root), or says what is missing:
# cmocka, clang, g++ (moe.h is checked as C++), mingw-w64 and wine64 (the Windows cross-compile
# check and a run of its build: ~20 s each to install); for the Vulkan tests the loader (libvulkan1),
# lavapipe (mesa-vulkan-drivers), the Khronos validation layer (vulkan-validationlayers) and
# glslangValidator (glslang-tools, for the shaders_embedded.c staleness check); libFuzzer
# (libclang-rt-14-dev); the aarch64 cross-compiler, qemu-user and arm64 cmocka (make test-aarch64*).
need=""
[ -f /usr/include/cmocka.h ] || need="$need libcmocka-dev"
command -v clang >/dev/null 2>&1 || need="$need clang"
ls /usr/lib/llvm-*/lib/clang/*/lib/linux/libclang_rt.fuzzer-x86_64.a >/dev/null 2>&1 || need="$need libclang-rt-14-dev"  # libFuzzer
command -v aarch64-linux-gnu-gcc >/dev/null 2>&1 || need="$need gcc-aarch64-linux-gnu"   # the aarch64 build,
[ -e /usr/include/aarch64-linux-gnu/bits/libc-header-start.h ] || need="$need libc6-dev:arm64"  # its C library headers,
command -v qemu-aarch64 >/dev/null 2>&1 || need="$need qemu-user"                          # run under qemu-user,
[ -e /usr/lib/aarch64-linux-gnu/libcmocka.so ] || need="$need libcmocka-dev:arm64"         # with arm64 cmocka
command -v g++ >/dev/null 2>&1 || need="$need g++"
command -v x86_64-w64-mingw32-gcc >/dev/null 2>&1 || need="$need gcc-mingw-w64-x86-64-win32"
command -v valgrind >/dev/null 2>&1 || need="$need valgrind"
[ -x /usr/bin/python3 ] || need="$need python3"
/usr/bin/python3 -c "import ensurepip, venv" 2>/dev/null || need="$need python3-venv"   # pip install ./python, in a venv
have() { for f in "$@"; do [ -e "$f" ] && return 0; done; return 1; }
have /usr/lib/wine/wine64 /usr/bin/wine64 || need="$need wine64"
have /usr/lib/*/libvulkan.so.1 /usr/lib/libvulkan.so.1 || need="$need libvulkan1"
have /usr/share/vulkan/icd.d/lvp_icd*.json || need="$need mesa-vulkan-drivers"
[ -f /usr/share/vulkan/explicit_layer.d/VkLayer_khronos_validation.json ] || need="$need vulkan-validationlayers"
command -v glslangValidator >/dev/null 2>&1 || need="$need glslang-tools"
[ -z "$need" ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing:$need"
  export DEBIAN_FRONTEND=noninteractive
  case "$need" in *:arm64*) dpkg --add-architecture arm64;; esac
  apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends $need >/dev/null || {
    echo "deps: apt-get install$need failed"; exit 1; }
else
  echo "deps: missing$need — install them (Debian: apt-get install$need)"; exit 1
fi
