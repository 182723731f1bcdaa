"""Registers, spills and stack of every CUDA kernel instantiation a 2.9B-shaped block launches, without a GPU.

    python scripts/cuda_ptxas.py --nvrtc LIB/libnvrtc.so.12 --include INC --ptxas BIN/ptxas [--batches 1 16]
        [--dump DIR [--nvdisasm BIN/nvdisasm]]

A development aid for kernel work (results/kernel_log.md): device time is scarce, and a kernel
that keeps its accumulators in local memory (an array indexed where the compiler cannot resolve
the index) pays a memory access per multiply-add, which no amount of timing explains as clearly
as ptxas does. The launches are recorded as the Metal proof records them (a launch hook; nothing
runs), each instantiation's text is put in a translation unit with the kernel's template
constants as constexpr ints and its inputs as pointers of their dtypes (MLX's own wrapper passes
the same pointers; its shape arrays are plain pointers here), NVRTC compiles it to PTX for sm_90,
and `ptxas -v` reports the registers, the spill bytes and the stack frame per thread.

NVRTC, ptxas and cuda_fp16.h come from the nvidia-cuda-nvrtc-cu12, nvidia-cuda-nvcc-cu12 and
nvidia-cuda-runtime-cu12 wheels (`pip download --no-deps`, then unzip): no CUDA install is needed.
"""

from __future__ import annotations

import argparse
import ctypes
import re
import subprocess
import tempfile
from pathlib import Path

from rwkv_mlx import layers
from rwkv_mlx.kernels import forced_backend
from rwkv_mlx.kernels.dialect import launch_hook
from rwkv_mlx.testing import synthetic as synth
from rwkv_mlx.testing.metal_proof.record import Recorder, model_runs
from rwkv_mlx.testing.metal_proof.shapes import shaped_model

# NVRTC has no standard library headers; MLX's wrapper brings these names with its own includes.
INTS = ("typedef unsigned char uint8_t; typedef signed char int8_t; typedef unsigned short uint16_t;\n"
        "typedef int int32_t; typedef unsigned int uint32_t; typedef unsigned long long uint64_t;\n")
C_TYPES = {"float32": "float", "float16": "__half", "bfloat16": "__nv_bfloat16", "uint8": "uint8_t",
           "int32": "int32_t", "uint32": "uint32_t"}


def translation_unit(inst) -> str:
    r = inst.kernel.rendered
    params = [f"const {C_TYPES[d]}* __restrict__ {n}" for n, d, _ in inst.inputs]
    params += [f"const int32_t* {n}_shape" for n, _, _ in inst.inputs]
    params += [f"{C_TYPES[d]}* {n}" for n, d in zip(r.outputs, inst.output_dtypes)]
    consts = "".join(f"  constexpr int {k} = {v};\n" for k, v in inst.template)
    return (f"{INTS}{r.header}\n"
            f"extern \"C\" __global__ void kernel({', '.join(params)}) {{\n{consts}{r.body}\n}}\n")


class Nvrtc:
    def __init__(self, path: str, include: str):
        self.lib, self.include = ctypes.CDLL(path), include

    def ptx(self, source: str, name: str) -> str:
        lib, prog = self.lib, ctypes.c_void_p()
        rc = lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), f"{name}.cu".encode(), 0, None, None)
        if rc != 0:
            raise RuntimeError(f"{name}: nvrtcCreateProgram returned {rc}")
        try:
            opts = [b"--gpu-architecture=compute_90", b"--std=c++17", b"-default-device", f"-I{self.include}".encode()]
            rc = lib.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
            size = ctypes.c_size_t()
            lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
            log = ctypes.create_string_buffer(size.value)
            lib.nvrtcGetProgramLog(prog, log)
            if rc != 0:
                raise RuntimeError(f"{name}: NVRTC failed:\n{log.value.decode()[:3000]}")
            lib.nvrtcGetPTXSize(prog, ctypes.byref(size))
            out = ctypes.create_string_buffer(size.value)
            lib.nvrtcGetPTX(prog, out)
            return out.value.decode()
        finally:
            lib.nvrtcDestroyProgram(ctypes.byref(prog))


def ptxas_report(ptxas: str, ptx: str, nvdisasm: str | None = None, sass: Path | None = None) -> str:
    """ptxas -v's registers, stack and spills; with ``nvdisasm``, the SASS also written to ``sass``."""
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "k.ptx"
        p.write_text(ptx)
        res = subprocess.run([ptxas, "-v", "-arch=sm_90", str(p), "-o", str(Path(d) / "k.cubin")],
                             capture_output=True, text=True)
        if nvdisasm and sass is not None and res.returncode == 0:
            out = subprocess.run([nvdisasm, "-c", str(Path(d) / "k.cubin")], capture_output=True, text=True)
            sass.write_text(out.stdout + out.stderr)
    text = res.stdout + res.stderr
    regs = re.search(r"Used (\d+) registers", text)
    frame = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", text)
    if not regs or not frame:
        return text.strip()
    return f"{regs.group(1)} registers, stack {frame.group(1)} B, spill stores {frame.group(2)} B, loads {frame.group(3)} B"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--nvrtc", required=True, help="libnvrtc.so.12 (nvidia-cuda-nvrtc-cu12 wheel)")
    ap.add_argument("--include", required=True, help="the folder of cuda_fp16.h (nvidia-cuda-runtime-cu12 wheel)")
    ap.add_argument("--ptxas", required=True, help="ptxas (nvidia-cuda-nvcc-cu12 wheel)")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--types", nargs="+", default=["Q4_K_M", "F16"])
    ap.add_argument("--kernels", default="", help="only kernels whose name contains this")
    ap.add_argument("--form", choices=["affine", "stored"], default="affine",
                    help="Q4_K and Q8_0 as MLX affine codes (CUDA's default) or GGUF blocks as stored (Metal's)")
    ap.add_argument("--dump", help="write each translation unit into this folder")
    ap.add_argument("--nvdisasm", help="nvdisasm (nvidia-cuda-nvdisasm wheel): with --dump, each instantiation's "
                    "SASS beside its translation unit (where its loads are issued, which ptxas -v does not say)")
    args = ap.parse_args()
    nvrtc = Nvrtc(args.nvrtc, args.include)
    # The layers expand quantized weights for many rows only on CUDA (layers._expand_on_cuda asks MLX's
    # backend, which is the CPU here): answer as CUDA would, so the products route's launches are recorded.
    layers.active_backend = lambda: "cuda"
    rec = Recorder()
    for t in args.types:
        scale = None if t == "F16" or args.form == "stored" else "float32"  # affine: CUDA's default
        model = shaped_model(synth.G1B_2_9B, t, scale_dtype=scale)
        for case, run in model_runs(model, prefill_batches=(), decode_batches=tuple(args.batches)):
            rec.case = f"{t} {case}"
            with forced_backend("cuda"), launch_hook(rec):
                run()
    print("| kernel | template | dtypes | cases | ptxas |\n|---|---|---|---|---|")
    for i, inst in enumerate(sorted(rec.instantiations.values(), key=lambda i: i.label)):
        if args.kernels not in inst.kernel.name:
            continue
        tu = translation_unit(inst)
        if args.dump:
            Path(args.dump).mkdir(parents=True, exist_ok=True)
            (Path(args.dump) / f"{i:02d}_{inst.kernel.name}.cu").write_text(tu)
        sass = Path(args.dump) / f"{i:02d}_{inst.kernel.name}.sass" if args.dump else None
        report = ptxas_report(args.ptxas, nvrtc.ptx(tu, inst.kernel.name), args.nvdisasm, sass)
        t = ",".join(f"{k}={v}" for k, v in inst.template)
        dtypes = "/".join(sorted({d for _, d, _ in inst.inputs} - {"uint8", "int32"}))
        print(f"| {inst.kernel.name} | {t} | {dtypes} | {'; '.join(sorted(inst.cases))[:60]} | {report} |")


if __name__ == "__main__":
    main()
