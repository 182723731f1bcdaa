"""Every kernel renders for CUDA and Metal from one source, and the texts are well-formed.

No GPU runs here, so these are the checks that need none: each input and output
is used, no backend identifier leaks into the shared source, no dialect word
survives rendering, every template constant is bound by the Python wrapper,
brackets balance -- and, where nvcc is installed, the CUDA text compiles, inside
a translation unit shaped like the one MLX generates (its signature rules are in
mlx/backend/cuda/custom_kernel.cpp: `const T* name` inputs, `T* name` outputs,
`constexpr int` template constants, `name_shape` when the body mentions it).
"""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from rwkv_mlx.kernels import dialect
from rwkv_mlx.kernels.instances import KERNEL_INSTANCES

KERNEL_FILES = sorted(p.stem for p in dialect.kernel_dir().glob("*.kern"))
KERNELS = [n for n in KERNEL_FILES if dialect.load_kern(n).body.strip()]

_CUDA_TYPES = {"float32": "float", "float16": "__half", "bfloat16": "__nv_bfloat16", "uint8": "uint8_t",
               "uint32": "uint32_t", "int32": "int32_t", "uint16": "uint16_t", "int8": "int8_t"}


def _strip_comments(text: str) -> str:
    return re.sub(r"//[^\n]*", "", text)


@pytest.mark.parametrize("name", KERNEL_FILES)
def test_shared_source_has_no_backend_identifiers(name):
    src = dialect.load_kern(name)
    code = _strip_comments(src.header + "\n" + src.body)
    for backend, words in dialect.BACKEND_ONLY.items():
        for word in words:
            assert word not in code, f"{name}.kern uses the {backend}-only identifier {word!r}"


# every kernel plain, and each of its variants (own ones drop inputs from the signature; its included files'
# READ_ variants keep one format's readers)
RENDERINGS = [(n, ()) for n in KERNELS] + [(n, (d,)) for n in KERNELS for d in dialect.all_variants(dialect.load_kern(n))]


@pytest.mark.parametrize("backend", dialect.BACKENDS)
@pytest.mark.parametrize("name,defines", RENDERINGS, ids=lambda v: "-".join(v) if isinstance(v, tuple) else v)
def test_rendered_text_is_well_formed(name, defines, backend):
    r = dialect.render(name, backend, defines)
    body = _strip_comments(r.body)
    for arg in (*r.inputs, *r.outputs):
        assert re.search(rf"\b{arg}\b", body), f"{name}: {arg} is never used"
    text = _strip_comments(r.header + r.body)
    leftovers = [w for w in ("THREAD_ID", "GROUP_ID", "LANE_ID", "WARP_ID", "DEVICE", "SHARED ")
                 if re.search(rf"\b{w.strip()}\b", _strip_comments(r.body))]
    assert not leftovers, f"{name}/{backend}: dialect words left after rendering: {leftovers}"
    other = "metal" if backend == "cuda" else "cuda"
    for word in ("threadIdx", "__syncthreads", "__shared__") if other == "cuda" else ("simd_sum", "threadgroup_barrier", "thread_position_in"):
        assert word not in _strip_comments(r.body), f"{name}/{backend}: {word} leaked from {other}"
    for open_, close in ("()", "[]", "{}"):
        assert text.count(open_) == text.count(close), f"{name}/{backend}: unbalanced {open_}{close}"
    if backend == "metal":
        # MLX builds Metal signatures from attribute names it finds in the body.
        assert "thread_position_in_threadgroup" in r.body or "thread_index_in_simdgroup" in r.body


@pytest.mark.parametrize("name", KERNELS)
def test_every_template_constant_is_bound(name):
    src = dialect.load_kern(name)
    instances = [i for i in KERNEL_INSTANCES if i.kernel == name]
    assert instances, f"no example instance of {name} in rwkv_mlx/kernels/instances.py"
    for inst in instances:
        assert sorted(inst.template) == sorted(src.template), f"{name}: template {inst.template} vs {src.template}"
        r = dialect.render(name, "cuda", inst.defines)
        assert len(inst.input_dtypes) == len(r.inputs) and len(inst.output_dtypes) == len(r.outputs)


_STAND_IN_HEADER = ("#include <cstdint>\n#include <cstddef>\n#include <cooperative_groups.h>\n"
                    "struct Shape { int32_t d[8]; __device__ int32_t operator[](int i) const { return d[i]; } };\n")


def cuda_kernel_text(inst, index: int) -> str:
    """One instance as MLX would generate it, in its own namespace so many share a file."""
    r = dialect.render(inst.kernel, "cuda", inst.defines)
    params = []
    for name, dtype in zip(r.inputs, inst.input_dtypes):
        params.append(f"    const {_CUDA_TYPES[dtype]}* {name}")
        if f"{name}_shape" in r.body:
            params.append(f"    const __grid_constant__ Shape {name}_shape")
    params += [f"    {_CUDA_TYPES[d]}* {n}" for n, d in zip(r.outputs, inst.output_dtypes)]
    consts = "".join(f"  constexpr int {k} = {v};\n" for k, v in inst.template.items())
    return (f"namespace instance_{index} {{\n" + r.header + "\nnamespace mlx::core::cu {\n"
            "namespace cg = cooperative_groups;\n"
            f"__global__ void custom_kernel_{r.name}(\n" + ",\n".join(params) + ") {\n" + consts
            + r.body + "\n}\n}\n}\n")


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed: CUDA text not compiled here")
@pytest.mark.parametrize("arch", ["sm_90", "sm_75"])
def test_cuda_text_compiles_with_nvcc(tmp_path, arch):
    """All instances in one translation unit: one nvcc run instead of one per kernel. sm_75: the matrix-unit
    instances only, whose helpers take two m16n8k8 products there (m16n8k16 needs sm_80)."""
    parts = []
    for i, inst in enumerate(KERNEL_INSTANCES):
        if arch == "sm_75" and "MMA" not in inst.defines:
            continue
        text = cuda_kernel_text(inst, i)
        # includes stay at file scope; each instance's macros end with it
        text = text.replace("#include <cuda_fp16.h>", "").replace("#include <cuda_bf16.h>", "")
        macros = re.findall(r"^#define (\w+)", text, re.M)
        parts.append(text + "".join(f"#undef {m}\n" for m in macros))
    source = _STAND_IN_HEADER + "#include <cuda_fp16.h>\n#include <cuda_bf16.h>\n" + "".join(parts)
    src = tmp_path / "kernels.cu"
    src.write_text(source)
    result = subprocess.run(["nvcc", f"-arch={arch}", "-std=c++17", "-c", str(src), "-o", str(tmp_path / "k.o")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-4000:]


# ---- the text MLX keeps: compacted, each variant's conditionals decided (dialect.compact, resolve_variants)

def _preprocessed(text: str) -> list[str]:
    """``text`` through clang's C preprocessor (the ziglang wheel's, as the Metal proof uses): its tokens."""
    from rwkv_mlx.testing.metal_proof.compile import ProofError, zig

    try:
        cmd = [zig(), "clang", "-E", "-P", "-x", "c", "-"]
    except ProofError as e:
        pytest.skip(str(e))
    result = subprocess.run(cmd, input=text, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout.split()


def _variant_sets(name: str) -> list[tuple[str, ...]]:
    """Every combination of a kernel's variants that shape the launch, in declaration order, each with every
    format's READ_ variant; and each READ_ variant alone (a launch reads one to three formats: every
    combination of fourteen would be 16,384 texts)."""
    names = list(dialect.all_variants(dialect.load_kern(name)))
    readers = tuple(v for v in names if v.startswith("READ_"))
    shape = [v for v in names if v not in readers]
    combos = [tuple(v for i, v in enumerate(shape) if mask >> i & 1) for mask in range(1 << len(shape))]
    return [c + readers for c in combos] + [(r,) for r in readers] + [()]


@pytest.mark.parametrize("name", KERNELS)
def test_compacted_text_preprocesses_as_written(name):
    """The text MLX gets (no comments, no indentation, variant conditionals decided), before pruning, reads
    to the same tokens as the text as written, through a real C preprocessor, for every combination of
    variants."""
    for defines in _variant_sets(name):
        short = dialect.render(name, "metal", defines, pruned=False)  # (the Metal prelude includes no system header)
        full = dialect.render(name, "metal", defines, compacted=False)
        assert len(short.header) + len(short.body) < 0.8 * (len(full.header) + len(full.body))
        assert "//" not in short.header + short.body
        got = _preprocessed(short.header + short.body)
        assert got == _preprocessed(full.header + full.body), f"{name} {defines}"


def test_resolve_variants_decides_only_variant_conditionals():
    text = "\n".join([
        "a", "#ifdef V", "b", "#ifndef W", "c", "#else", "d", "#endif", "#else", "e", "#endif",
        "#if defined(OTHER)", "f", "#if !defined(V)", "g", "#elif defined(W)", "h", "#else", "i", "#endif", "#endif",
        "#ifndef V", "j", "#endif"])
    got = dialect.resolve_variants(text, {"V", "W"}, {"V"}).split("\n")
    # V defined, W not: b and c; OTHER is no variant, so its #if stays (and what it guards is decided inside)
    assert got == ["a", "b", "c", "#if defined(OTHER)", "f", "i", "#endif"]
    got = dialect.resolve_variants(text, {"V", "W"}, {"W"}).split("\n")
    assert got == ["a", "e", "#if defined(OTHER)", "f", "g", "#endif", "j"]
    # a remark after the condition is no part of it (matvec_formats.kern's "#ifndef MMA  // ..." lines)
    assert dialect.resolve_variants("#ifndef V  // why\nx\n#endif  // V\ny", {"V"}, {"V"}) == "y"
    with pytest.raises(ValueError, match="without #endif"):
        dialect.resolve_variants("#ifdef V\nx", {"V"}, set())
    with pytest.raises(ValueError, match="not a variant"):
        dialect.resolve_variants("#ifdef V\nx\n#elif defined(OTHER)\ny\n#endif", {"V"}, set())


def test_a_define_that_is_no_variant_is_refused():
    with pytest.raises(ValueError, match="no variant"):
        dialect.render("matvec", "cuda", ("ONE_SEGMNET",))


def test_compact_keeps_string_literals_as_written():
    """CUDA's inline PTX is a string: compact() strips comments and spaces around it, never inside it."""
    text = 'asm volatile("mma.sync  {%0,%1}, {%2};"  // a comment\n   : "+f"(c));\n'
    assert dialect.compact(text) == 'asm volatile("mma.sync  {%0,%1}, {%2};"\n: "+f"(c));\n'
    with pytest.raises(ValueError, match="character literal"):
        dialect.compact('x = "a // b";\n')
    with pytest.raises(ValueError, match="character literal"):
        dialect.compact("c = 'x';\n")


def test_prune_drops_what_nothing_uses():
    header = "\n".join([
        "#define USED(x) helper(x)", "#define UNUSED 3", "#include <metal_stdlib>",
        "template <int N>", "__device__ IN(u8) pick(IN(u8) p) { return p + N; }",  # (IN(u8): a macro's parentheses)
        "__device__ float helper(float x) { return x; }", "__device__ float helper(int x) { return chain(x); }",
        "__device__ float chain(int x) {", "return x;", "}",
        "__device__ float dead(float x) {", "return helper(x);", "}",
        "struct Kept { int a; };", "struct Dropped { int b; };", "constexpr int TABLE[2] = {1, 2};",
        "#define LONG(x) \\", "(x) + helper(1.0f)", "#define GONE(x) \\", "(x)", ""])
    body = "USED(1.0f); pick<2>(q); Kept k; out[0] = TABLE[0] + LONG(2);\n"
    kept = dialect.prune(header, body).splitlines()
    assert kept == ["#define USED(x) helper(x)", "#include <metal_stdlib>", "template <int N>",
                    "__device__ IN(u8) pick(IN(u8) p) { return p + N; }", "__device__ float helper(float x) { return x; }",
                    "__device__ float helper(int x) { return chain(x); }", "__device__ float chain(int x) {",
                    "return x;", "}", "struct Kept { int a; };", "constexpr int TABLE[2] = {1, 2};",
                    "#define LONG(x) \\", "(x) + helper(1.0f)"]


@pytest.mark.parametrize("backend", dialect.BACKENDS)
def test_a_launch_text_holds_its_own_readers_only(backend):
    """A Q4_K launch's text has the Q4_K reader and none of the others (MLX hashes all of it at every launch)."""
    def words(defines):
        r = dialect.render("matvec", backend, defines)
        return set(re.findall(r"\w+", r.header + r.body)), len(r.header) + len(r.body)

    q4_k, q4_k_size = words(("ONE_SEGMENT", "NO_SCALES", "READ_Q4_K"))
    assert {"k_rows", "k_dm", "stage_tile", "dot_tile"} <= q4_k
    assert not {"decode_q6_k", "decode_q8_0", "q8_pair_rows", "chunk_rows", "group_rows", "decode_affine"} & q4_k
    q6_k, _ = words(("ONE_SEGMENT", "NO_SCALES", "READ_GROUPS", "READ_Q6_K"))
    assert {"decode_q6_k", "group_rows"} <= q6_k and not {"k_rows", "decode_q4_k"} & q6_k
    every = tuple(v for v in dialect.all_variants(dialect.load_kern("matvec")) if v.startswith("READ_"))
    _, every_size = words(("ONE_SEGMENT", "NO_SCALES", *every))
    assert q4_k_size < 0.5 * every_size
