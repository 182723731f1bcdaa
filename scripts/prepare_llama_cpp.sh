#!/usr/bin/env bash
# Packs the llama.cpp source that llama-bench needs into .llama-cpp/ (git-ignored), for the llama.cpp peer
# of scripts/bench_peers.py (docs/benchmarks.md). Run once, here; gpu_session.sh's `llamacpp` step builds it
# on the device with scripts/build_llama_bench.sh. The GPU machine has no network, so the source travels:
#   .llama-cpp/llama.cpp.tar.gz  vendor/llama.cpp of the llama-cpp-python sdist, trimmed to the CPU and CUDA
#                                backends, the library, common, the vendored headers it uses and llama-bench
#   .llama-cpp/SOURCE            the sdist's name and sha256 (the llama.cpp commit is not in the sdist)
# The sdist (about 77 MB) is fetched with pip from the package index; nothing else is downloaded.
set -euo pipefail
VERSION=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}
root=$(git rev-parse --show-toplevel); cd "$root"
exclude=$(git rev-parse --git-path info/exclude)  # (in a worktree .git is a file)
mkdir -p "$(dirname "$exclude")"
grep -qxF "/.llama-cpp/" "$exclude" 2>/dev/null || echo "/.llama-cpp/" >> "$exclude"
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
python3 -m pip download -q --no-binary :all: --no-deps -d "$tmp" "llama-cpp-python==$VERSION"
sdist=$(ls "$tmp"/llama_cpp_python-*.tar.gz)
tar -xzf "$sdist" -C "$tmp"
src=$tmp/llama_cpp_python-$VERSION/vendor/llama.cpp
out=$tmp/llama.cpp
mkdir -p "$out/tools" "$out/ggml/src" "$out/vendor"
cp -r "$src"/{CMakeLists.txt,LICENSE,cmake,include,src,common,licenses} "$out/"
cp -r "$src"/tools/llama-bench "$out/tools/"
cp -r "$src"/ggml/{CMakeLists.txt,cmake,include} "$out/ggml/"
# ggml's own sources and two backends: the others are only added when their GGML_<NAME> option is on.
find "$src/ggml/src" -maxdepth 1 -type f -exec cp {} "$out/ggml/src/" \;
cp -r "$src"/ggml/src/{ggml-cpu,ggml-cuda} "$out/ggml/src/"
# common links nlohmann (json), sheredom (subprocess) and cpp-httplib; the rest of vendor/ serves other tools.
cp -r "$src"/vendor/{nlohmann,sheredom,cpp-httplib} "$out/vendor/"
cat > "$out/vendor/CMakeLists.txt" <<'EOF'
# trimmed by rwkv-mlx's scripts/prepare_llama_cpp.sh: what llama-common needs
add_subdirectory(nlohmann)
add_subdirectory(sheredom)
if (LLAMA_BUILD_COMMON)
    add_subdirectory(cpp-httplib)
endif()
EOF
cat > "$out/tools/CMakeLists.txt" <<'EOF'
# trimmed by rwkv-mlx's scripts/prepare_llama_cpp.sh: llama-bench only
find_package(Threads REQUIRED)
llama_add_compile_flags()
add_subdirectory(llama-bench)
EOF
rm -rf .llama-cpp && mkdir .llama-cpp
tar -czf .llama-cpp/llama.cpp.tar.gz -C "$tmp" llama.cpp
echo "llama-cpp-python $VERSION sdist $(basename "$sdist") sha256 $(sha256sum "$sdist" | cut -d' ' -f1)" > .llama-cpp/SOURCE
cat .llama-cpp/SOURCE
du -sh "$out" .llama-cpp/llama.cpp.tar.gz
