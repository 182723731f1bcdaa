#!/usr/bin/env bash
# Builds the folders scripts/gpu_session.sh carries to the lent GPU machine (all git-ignored):
#   .mlx-cuda-3/{a,b,c}  MLX's CUDA wheel in three parts of about 31 MB, so that part c, the install
#                        script, gguf and mlx-lm fit in one call beside the oracle subset (64 MiB a call)
#   .oracle-1, -2, ...   every oracle file with its ref64 and llama.cpp logits, in parts of at most 30 MB
#   .gpu-train/          Tiny Shakespeare for scripts/train_demo_model.py
#   .llama-cpp/          llama.cpp's source trimmed to llama-bench (scripts/prepare_llama_cpp.sh, 2.5 MB), for the
#                        `llamacpp` step, which builds the llama.cpp peer of scripts/bench_peers.py
# Then: call 1 carries .mlx-cuda-3/a (`cp .mlx-cuda-3/a/* /tmp/`), call 2 .mlx-cuda-3/b (the same), call 3
# .mlx-cuda-3/c (`bash scripts/gpu_session.sh install`), each within 30 s of the last; later calls carry
# an .oracle-N part or .gpu-train for their step. The checkout itself travels every time (the bundled demo
# model is about 25 MB of it), so one call cannot take part c and the oracle subset together.
set -euo pipefail
root=$(git rev-parse --show-toplevel); cd "$root"
shared=${SHARED:-$root/../shared}
for d in .mlx-cuda-a .mlx-cuda-b .mlx-cuda-3 '.oracle-[0-9]' .gpu-train .whl; do
  grep -qxF "/$d/" .git/info/exclude 2>/dev/null || echo "/$d/" >> .git/info/exclude
done
[ -d .mlx-cuda-a ] || bash "$shared/device/prepare-mlx-cuda.sh"
rm -rf .mlx-cuda-3 && mkdir -p .mlx-cuda-3/a .mlx-cuda-3/b .mlx-cuda-3/c
tmp=$(mktemp -d)
cat .mlx-cuda-a/cuda.part_aa .mlx-cuda-b/cuda.part_ab > "$tmp/cuda.whl"
split -b 31M "$tmp/cuda.whl" "$tmp/cudapart_"
mv "$tmp/cudapart_aa" .mlx-cuda-3/a/; mv "$tmp/cudapart_ab" .mlx-cuda-3/b/; mv "$tmp/cudapart_ac" .mlx-cuda-3/c/
cp .mlx-cuda-b/*.whl .mlx-cuda-b/cuda-wheel-name .mlx-cuda-3/c/
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 -d .mlx-cuda-3/c "mlx-lm==0.32.2"
# rwkv-mlx serve's stack and scripts/bench_serve.py's client (pure Python, about 1 MB): the machine has none
for w in starlette==1.10.0 uvicorn==0.55.0 click==8.5.1 h11==0.16.0 anyio==4.16.0 sniffio==1.3.1 idna==3.21 \
         typing_extensions==4.16.0 httpx==0.29.0 httpcore==1.0.9 certifi==2026.10.19.post1; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 -d .mlx-cuda-3/c "$w"
done
cat > .mlx-cuda-3/c/install.sh <<'INNER'
#!/usr/bin/env bash
# Joins the three parts of MLX's CUDA wheel and installs it (+ gguf, mlx-lm, the serve stack) into /tmp/mlxsite.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
if [ -f /tmp/mlxsite/.done ]; then echo "mlx-cuda already installed"; exit 0; fi
name=$(cat "$here/cuda-wheel-name")
cat /tmp/cudapart_aa /tmp/cudapart_ab "$here/cudapart_ac" > "/tmp/$name"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/mlxsite "/tmp/$name" "$here"/*.whl
touch /tmp/mlxsite/.done
PYTHONPATH=/tmp/mlxsite python3 -c "import mlx.core as mx; print('mlx', mx.__version__, mx.default_device(), 'cuda', mx.cuda.is_available())"
INNER
# Every oracle file, packed into parts of at most 30 MB, so that one fits a call beside the checkout (about
# 31 MB) and .baseline (2.5 MB) within the 64 MiB a call carries: the GPU tests run once per part. The
# files the decode-kernel tests were first run on come first.
rm -rf .oracle-subset .oracle-[0-9]
python3 - "$shared/oracle" <<'PACK'
import shutil, sys
from pathlib import Path
oracle, limit = Path(sys.argv[1]), 30_000_000
first = ["fixa-Q4_K_M", "fixa-Q6_K", "fixa-Q2_K", "fixa-Q3_K_M", "fixa-IQ4_XS", "fixb-f16", "fixb-Q8_0",
         "fixb-Q4_0", "fixb-Q4_K_M", "fixb-Q5_K_M", "fixb-Q6_K"]
def files(name):
    kinds = ("ref64", "batch", "seq") if name.endswith("f32") else ("ref64", "batch")
    return [oracle / "models" / f"{name}.gguf"] + [oracle / "logits" / f"{name}.{k}.npy" for k in kinds]
rest = sorted((p.stem for p in (oracle / "models").glob("*.gguf") if p.stem not in first),
              key=lambda n: -sum(f.stat().st_size for f in files(n)))
parts = []
for name in first + rest:  # first fit: the first list in order, then the rest largest first
    size = sum(f.stat().st_size for f in files(name))
    for part in parts:
        if sum(f.stat().st_size for n in part for f in files(n)) + size <= limit:
            part.append(name)
            break
    else:
        parts.append([name])
for i, part in enumerate(parts, 1):
    out = Path(f".oracle-{i}")
    for sub in ("models", "logits"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    for name in part:
        for f in files(name):
            shutil.copy(f, out / f.parent.name / f.name)
    for f in (oracle / "logits").glob("*.tokens.txt"):
        shutil.copy(f, out / "logits" / f.name)
    print(f".oracle-{i}: {' '.join(part)}")
PACK
mkdir -p .gpu-train && cp "$shared/data/tinyshakespeare.txt" .gpu-train/
[ -f .llama-cpp/llama.cpp.tar.gz ] || bash scripts/prepare_llama_cpp.sh
rm -rf "$tmp"; du -sh .mlx-cuda-3/* .oracle-[0-9] .gpu-train .llama-cpp
