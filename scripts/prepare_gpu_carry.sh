#!/usr/bin/env bash
# Builds the folders scripts/gpu_session.sh carries to the lent GPU machine (all git-ignored):
#   .mlx-cuda-3/{a,b,c}  MLX's CUDA wheel in three parts of about 31 MB, so that part c, the install
#                        script, gguf and mlx-lm fit in one call beside the oracle subset (64 MiB a call)
#   .oracle-subset/      the oracle files the GPU tests read (models, ref64 and llama.cpp batch logits, token lists: about 31 MB)
#   .gpu-train/          Tiny Shakespeare for scripts/train_demo_model.py
# Then: call 1 carries .mlx-cuda-3/a (`cp .mlx-cuda-3/a/* /tmp/`), call 2 .mlx-cuda-3/b (the same), call 3
# .mlx-cuda-3/c (`bash scripts/gpu_session.sh install`), each within 30 s of the last; later calls carry
# .oracle-subset or .gpu-train for their step. The checkout itself travels every time (the bundled demo
# model is about 25 MB of it), so one call cannot take part c and the oracle subset together.
set -euo pipefail
root=$(git rev-parse --show-toplevel); cd "$root"
shared=${SHARED:-$root/../shared}
for d in .mlx-cuda-a .mlx-cuda-b .mlx-cuda-3 .oracle-subset .gpu-train .whl; do
  grep -qx "/$d/" .git/info/exclude 2>/dev/null || echo "/$d/" >> .git/info/exclude
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
cat > .mlx-cuda-3/c/install.sh <<'INNER'
#!/usr/bin/env bash
# Joins the three parts of MLX's CUDA wheel and installs it (+ gguf, mlx-lm) into /tmp/mlxsite.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
if [ -f /tmp/mlxsite/.done ]; then echo "mlx-cuda already installed"; exit 0; fi
name=$(cat "$here/cuda-wheel-name")
cat /tmp/cudapart_aa /tmp/cudapart_ab "$here/cudapart_ac" > "/tmp/$name"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/mlxsite "/tmp/$name" "$here"/*.whl
touch /tmp/mlxsite/.done
PYTHONPATH=/tmp/mlxsite python3 -c "import mlx.core as mx; print('mlx', mx.__version__, mx.default_device(), 'cuda', mx.cuda.is_available())"
INNER
rm -rf .oracle-subset && mkdir -p .oracle-subset/models .oracle-subset/logits
for n in fixa-Q4_K_M fixa-Q6_K fixa-Q2_K fixa-IQ4_XS fixb-f16 fixb-Q8_0 fixb-Q4_0 fixb-Q4_K_M fixb-Q5_K_M fixb-Q6_K; do
  cp "$shared/oracle/models/$n.gguf" .oracle-subset/models/
  cp "$shared/oracle/logits/$n".{ref64,batch}.npy .oracle-subset/logits/
done
cp "$shared"/oracle/logits/*.tokens.txt .oracle-subset/logits/
mkdir -p .gpu-train && cp "$shared/data/tinyshakespeare.txt" .gpu-train/
rm -rf "$tmp"; du -sh .mlx-cuda-3/* .oracle-subset .gpu-train
