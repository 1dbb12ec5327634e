#!/usr/bin/env bash
# Build llama-server from the llama.cpp sources vendored in the pinned llama-cpp-python sdist,
# so the server-engine tests run against the same llama.cpp as the local engine.
# The binary is cached outside the checkout (~/.cache/kvchat/llama-server-<version>/) and this
# script does nothing when it is already there. Prints the binary's path on its last line.
set -euo pipefail

version="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
cache_root="${KVCHAT_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/kvchat}"
target_dir="$cache_root/llama-server-$version"
binary="$target_dir/llama-server"
jobs="${KVCHAT_BUILD_JOBS:-2}"

if [ -x "$binary" ]; then
  echo "$binary"
  exit 0
fi

python="${PYTHON:-python3}"
work="$(mktemp -d "${TMPDIR:-/tmp}/kvchat-llama-server.XXXXXX")"
trap 'rm -rf "$work"' EXIT

echo "building llama-server from llama-cpp-python $version (one time, about 10 minutes)" >&2
"$python" -m pip download --quiet --no-binary :all: --no-deps \
  "llama-cpp-python==$version" -d "$work" >&2
tar -xzf "$work"/llama_cpp_python-"$version".tar.gz -C "$work"
src="$work/llama_cpp_python-$version/vendor/llama.cpp"

# Portable x86-64 flags instead of -march=native; AMX stays off (its matmul crashes on some
# CPUs). No curl/OpenSSL (the tests load a local file) and no web UI download.
cmake_flags=(
  -DCMAKE_BUILD_TYPE=Release
  -DBUILD_SHARED_LIBS=OFF
  -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_COMMON=ON
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF
  -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF
  -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF
  -DGGML_NATIVE=OFF
  -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF
)
if [ "$(uname -m)" = "x86_64" ]; then
  cmake_flags+=(-DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON)
fi
generator=()
if command -v ninja >/dev/null 2>&1; then
  generator=(-G Ninja)
fi

cmake -S "$src" -B "$work/build" "${generator[@]}" "${cmake_flags[@]}" >&2
cmake --build "$work/build" --target llama-server -j "$jobs" >&2

mkdir -p "$target_dir"
cp "$work/build/bin/llama-server" "$binary.partial"
mv "$binary.partial" "$binary"  # atomic: a half-copied binary is never found
echo "$binary"
