#!/usr/bin/env bash
# Builds llama.cpp's llama-bench from .llama-cpp/llama.cpp.tar.gz (scripts/prepare_llama_cpp.sh) and prints
# the binary's path last. CUDA for sm_90 (H100/H200) by default; `--cpu` builds the CPU backend only.
#   bash scripts/build_llama_bench.sh [--cpu] [DIR]     DIR defaults to /tmp/llama.cpp ($LLAMA_CPP_DIR)
# A DIR that already holds the binary is reused: later calls on a warm GPU machine skip the build.
# Static libraries, so the binary runs from anywhere without LD_LIBRARY_PATH.
set -euo pipefail
cuda=ON; arch=(-DCMAKE_CUDA_ARCHITECTURES=90); jobs=${JOBS:-16}
if [ "${1:-}" = --cpu ]; then cuda=OFF; arch=(); jobs=${JOBS:-2}; shift; fi
dir=${1:-${LLAMA_CPP_DIR:-/tmp/llama.cpp}}
here=$(cd "$(dirname "$0")/.." && pwd)
archive=$here/.llama-cpp/llama.cpp.tar.gz
bin=$dir/build/bin/llama-bench
# reused only if built for the same backend (a --cpu build in DIR must not stand in for the CUDA one)
if [ -x "$bin" ] && [ "$(cat "$dir/BACKEND" 2>/dev/null)" = "cuda=$cuda" ]; then
  echo "llama-bench already built (GGML_CUDA=$cuda)"; echo "$bin"; exit 0
fi
[ -x "$bin" ] && { echo "build_llama_bench: error: $dir holds a llama-bench of another backend; use another DIR" >&2; exit 2; }
[ -f "$archive" ] || { echo "build_llama_bench: error: $archive missing: run scripts/prepare_llama_cpp.sh" >&2; exit 3; }
if [ $cuda = ON ] && ! command -v nvcc > /dev/null; then export PATH=/usr/local/cuda/bin:$PATH; fi
generator=Ninja; command -v ninja > /dev/null || generator="Unix Makefiles"
mkdir -p "$dir"
tar -xzf "$archive" -C "$dir" --strip-components=1
# the sdist has no git history: llama-bench's build_commit names the sdist instead ("unknown" otherwise)
origin=$(awk '{print $1 "-" $2}' "$here/.llama-cpp/SOURCE" 2>/dev/null || echo unknown)
tic=$(date +%s)
cmake -S "$dir" -B "$dir/build" -G "$generator" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF \
  -DGGML_CUDA=$cuda "${arch[@]}" -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_COMMIT="$origin" -DLLAMA_BUILD_APP=OFF \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF > "$dir/configure.log" 2>&1 \
  || { tail -30 "$dir/configure.log" >&2; echo "build_llama_bench: error: cmake configure failed ($dir/configure.log)" >&2; exit 1; }
cmake --build "$dir/build" --target llama-bench -j "$jobs" > "$dir/build.log" 2>&1 \
  || { tail -30 "$dir/build.log" >&2; echo "build_llama_bench: error: build failed ($dir/build.log)" >&2; exit 1; }
echo "cuda=$cuda" > "$dir/BACKEND"
echo "built llama-bench (GGML_CUDA=$cuda, -j$jobs) in $(( $(date +%s) - tic )) s"
echo "$bin"
