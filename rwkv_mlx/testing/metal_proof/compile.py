"""Compile MLX-generated Metal sources with a real clang: syntax under Metal's rules, or for the CPU emulator.

The clang is the one in the ``ziglang`` wheel (the ``test`` extra installs it).
``prepare`` turns a generated source into the translation unit a Mac would
compile (``metal::utils()`` -> include/metal_stdlib) with three changes, none of
which alters what the kernel computes:

* Metal's ``[[attribute]]`` lists are read (buffer indices, thread attributes) and removed:
  clang does not know them;
* each ``threadgroup`` array declared at the kernel function's own scope becomes ``static``
  (storage of the group, not of a thread). A ``threadgroup`` variable anywhere else (a helper,
  a nested block) is left alone, and clang rejects it: an automatic variable may not live in
  an address space. That is Metal's rule that threadgroup memory is declared at kernel scope;
* after the last of them, ``RWKV_THREADGROUP_BYTES(sizeof(a) + ...)``: the compiler sums the
  group's threadgroup memory itself, fails the check build above 32 KB, and the emulator
  build reports it per launch.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

INCLUDE = Path(__file__).resolve().parent / "include"
APPLE_THREADGROUP_BYTES = 32 * 1024
APPLE_THREADS_PER_GROUP = 1024
_FLAGS = ["-x", "c++", "-std=c++17", "-ffreestanding", "-fno-exceptions", "-fno-rtti", "-Wno-unknown-attributes",
          "-ferror-limit=5", "-I", str(INCLUDE)]


class ProofError(RuntimeError):
    """The harness cannot make sense of a generated source (not a kernel compile error)."""


def zig() -> str:
    """The zig driver of the ziglang wheel (its clang is ``zig clang``), or ProofError saying how to install it."""
    try:
        import ziglang
    except ImportError as e:
        raise ProofError("the Metal proof needs clang from the 'ziglang' wheel: pip install -e '.[test]'") from e
    return os.path.join(os.path.dirname(ziglang.__file__), "zig.exe" if os.name == "nt" else "zig")


def clang() -> list[str]:
    return [zig(), "clang"]


@dataclass
class Param:
    type: str
    name: str
    buffer: int | None  # [[buffer(i)]]
    attribute: str | None  # a thread attribute such as thread_position_in_grid


@dataclass
class Prepared:
    """A generated source made into a translation unit, and what the emulator needs to call it."""

    source: str  # as MLX generated it
    text: str  # the translation unit
    function: str  # the kernel template's name
    template_args: str | None  # of its explicit instantiation (None: not a template)
    params: list[Param] = field(default_factory=list)
    threadgroup_arrays: list[str] = field(default_factory=list)

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()[:20]


def _match_close(text: str, start: int, open_ch: str, close_ch: str) -> int:
    """Index of the bracket closing text[start] (comments skipped)."""
    depth, i = 0, start
    while i < len(text):
        if text.startswith("//", i):
            i = text.find("\n", i)
            if i < 0:
                break
            continue
        c = text[i]
        if c == open_ch:
            depth += 1
        elif c == close_ch:
            depth -= 1
            if depth == 0:
                return i
        i += 1
    raise ProofError(f"unbalanced {open_ch}{close_ch} in generated source")


_KERNEL = re.compile(r"\[\[kernel\]\]\s*void\s+(\w+)\s*\(")
_PARAM = re.compile(r"^(.*?)\b(\w+)\s*\[\[\s*(\w+)(?:\((\d+)\))?\s*\]\]$", re.S)
_TG_DECL = re.compile(r"^([ \t]*)threadgroup(\s+[\w:]+\s+(\w+)\s*\[[^\]]+\]\s*;)", re.M)
_INSTANCE = re.compile(r"^template\s+(?:\[\[[^\]]*\]\]\s*)*decltype\((\w+)<(.*)>\)", re.M)
_ATTRIBUTES = re.compile(r"\[\[[^\[\]]*\]\]")


def _depth_zero_spans(body: str) -> list[tuple[int, int]]:
    """(start, end) of the body's text outside nested braces: the kernel function's own scope."""
    spans, depth, start, i = [], 0, 0, 0
    while i < len(body):
        if body.startswith("//", i):
            j = body.find("\n", i)
            i = len(body) if j < 0 else j
            continue
        if body[i] == "{":
            if depth == 0:
                spans.append((start, i))
            depth += 1
        elif body[i] == "}":
            depth -= 1
            if depth == 0:
                start = i + 1
        i += 1
    spans.append((start, len(body)))
    return spans


def prepare(source: str) -> Prepared:
    m = _KERNEL.search(source)
    if not m:
        raise ProofError("no [[kernel]] function in the generated source")
    function = m.group(1)
    open_paren = m.end() - 1
    close_paren = _match_close(source, open_paren, "(", ")")
    params = []
    for raw in re.split(r",\s*\n", source[open_paren + 1:close_paren].strip()):
        pm = _PARAM.match(raw.strip())
        if not pm:
            raise ProofError(f"unreadable kernel parameter {raw.strip()!r}")
        typ, name, attr, index = pm.group(1).strip(), pm.group(2), pm.group(3), pm.group(4)
        params.append(Param(typ, name, int(index) if attr == "buffer" else None, None if attr == "buffer" else attr))
    body_open = source.index("{", close_paren)
    body_close = _match_close(source, body_open, "{", "}")
    body = source[body_open + 1:body_close]

    # threadgroup arrays of the kernel's own scope -> static; the compiler sums their sizes
    spans = _depth_zero_spans(body)
    arrays, last_end, out, pos = [], None, [], 0
    for dm in _TG_DECL.finditer(body):
        if not any(a <= dm.start() and dm.end() <= b for a, b in spans):
            continue  # nested: left for clang to reject
        out.append(body[pos:dm.start()] + f"{dm.group(1)}static threadgroup{dm.group(2)}")
        pos = dm.end()
        arrays.append(dm.group(3))
        last_end = len("".join(out))
    out.append(body[pos:])
    new_body = "".join(out)
    if arrays:
        report = " RWKV_THREADGROUP_BYTES(" + " + ".join(f"sizeof({a})" for a in arrays) + ");"
        new_body = new_body[:last_end] + report + new_body[last_end:]

    im = _INSTANCE.search(source)  # MLX instantiates a kernel with template arguments explicitly
    if im and im.group(1) != function:
        raise ProofError(f"the explicit instantiation is not of {function}")
    text = source[:body_open + 1] + new_body + source[body_close:]
    text = "#include <metal_stdlib>\n#include <rwkv_proof.h>\n" + _ATTRIBUTES.sub("", text)
    return Prepared(source, text, function, im.group(2) if im else None, params, arrays)


@dataclass
class CompileResult:
    ok: bool
    errors: list[str]  # clang's error lines, first first

    @property
    def first_error(self) -> str:
        return self.errors[0] if self.errors else ""


_check_cache: dict[str, CompileResult] = {}


def _syntax(texts: list[str]) -> tuple[int, list[str]]:
    """clang -fsyntax-only over these translation units: (return code, error lines, temporary paths cut)."""
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for n, text in enumerate(texts):
            paths.append(os.path.join(tmp, f"kernel{n}.cpp"))
            with open(paths[-1], "w") as f:
                f.write(text)
        proc = subprocess.run(clang() + _FLAGS + ["-fsyntax-only"] + paths, capture_output=True, text=True)
        lines = (proc.stdout + proc.stderr).replace(tmp + os.sep, "").replace(str(INCLUDE) + os.sep, "").splitlines()
    return proc.returncode, [ln for ln in lines if "error: " in ln]


def _check_batch(batch: list[Prepared]) -> None:
    """One clang run over several units (starting clang costs more than a unit); on failure, one run each."""
    rc, errors = _syntax([p.text for p in batch])
    if rc != 0 and len(batch) > 1:
        for p in batch:
            _check_batch([p])
        return
    if rc != 0 and not errors:
        errors = [f"clang exited with {rc}"]
    for p in batch:
        _check_cache[p.digest] = CompileResult(rc == 0, errors)


def check_all(prepared: list[Prepared], jobs: int = 2, batch: int = 16) -> list[CompileResult]:
    """Compile each under Metal's rules (syntax and semantics, no code generated); cached by text."""
    todo = list({p.digest: p for p in prepared if p.digest not in _check_cache}.values())
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        list(pool.map(_check_batch, [todo[i:i + batch] for i in range(0, len(todo), batch)]))
    return [_check_cache[p.digest] for p in prepared]


def check(prepared: Prepared) -> CompileResult:
    return check_all([prepared])[0]


# ---- the emulator build ----------------------------------------------------------------------

_THREAD_VALUES = {  # Metal thread attribute -> expression of the launch state (uint3 or uint)
    "thread_position_in_grid": "group * tg + tid",
    "thread_position_in_threadgroup": "tid",
    "threadgroup_position_in_grid": "group",
    "threads_per_threadgroup": "tg",
    "threadgroups_per_grid": "groups",
    "threads_per_grid": "groups * tg",
    "grid_size": "groups * tg",
    "thread_index_in_threadgroup": "(uint)lane",
    "thread_index_in_simdgroup": "(uint)(lane % 32)",
    "simdgroup_index_in_threadgroup": "(uint)(lane / 32)",
    "threads_per_simdgroup": "32u",
    "simdgroups_per_threadgroup": "(uint)((tg.x * tg.y * tg.z + 31) / 32)",
}


def emulator_unit(prepared: Prepared) -> str:
    """The translation unit plus ``rwkv_emu_launch(buffers, dims, stacks, stack_bytes, tg_bytes)``."""
    args = []
    for p in prepared.params:
        if p.buffer is not None:
            base = p.type.replace("const", "").replace("&", "").replace("*", "").strip()
            if p.type.endswith("&"):
                args.append(f"*reinterpret_cast<const {base}*>(g_buffers[{p.buffer}])")
            else:
                args.append(f"reinterpret_cast<{p.type}>(g_buffers[{p.buffer}])")
        elif p.attribute in _THREAD_VALUES:
            expr = _THREAD_VALUES[p.attribute]
            args.append(f"static_cast<{p.type}>({expr})" if p.type.endswith("3") else f"({p.type})({expr})")
        else:
            raise ProofError(f"thread attribute {p.attribute!r} is not emulated")
    targs = f"<{prepared.template_args}>" if prepared.template_args is not None else ""
    call = f"{prepared.function}{targs}(\n      " + ",\n      ".join(args) + ")"
    return prepared.text + f"""

// ---- emulator entry (metal_proof/compile.py) ----
static void** g_buffers;
static uint3 g_groups, g_tg;
static thread_local uint3 g_group;  // each OS thread its own (all fibers share the scheduler's)

static uint3 u3(uint x, uint y, uint z) {{
  uint3 v;
  v.x = x;
  v.y = y;
  v.z = z;
  return v;
}}

static void rwkv_set_group(unsigned long g) {{
  g_group = u3((uint)(g % g_groups.x), (uint)(g / g_groups.x % g_groups.y), (uint)(g / g_groups.x / g_groups.y));
}}

static void rwkv_lane(int lane) {{
  const uint3 group = g_group, groups = g_groups, tg = g_tg;
  const uint3 tid = u3((uint)lane % tg.x, ((uint)lane / tg.x) % tg.y, (uint)lane / (tg.x * tg.y));
  {call};
}}

// dims: grid x y z, threadgroup x y z; os_threads 0 runs fibers, 1 an OS thread per Metal thread
extern "C" __attribute__((visibility("default"))) int rwkv_emu_launch(
    void** buffers, const unsigned* dims, char* stacks, unsigned long stack_bytes, unsigned long* tg_bytes,
    int os_threads) {{
  g_buffers = buffers;
  g_tg = u3(dims[3], dims[4], dims[5]);
  g_groups = u3(dims[0] / dims[3], dims[1] / dims[4], dims[2] / dims[5]);
  rwkv_emu::n_lanes = (int)(dims[3] * dims[4] * dims[5]);
  rwkv_emu::lane_body = rwkv_lane;
  rwkv_emu::set_group = rwkv_set_group;
  rwkv_emu::threadgroup_bytes = 0;
  const unsigned long groups = (unsigned long)g_groups.x * g_groups.y * g_groups.z;
  const int rc = os_threads ? rwkv_emu::run_threads(groups) : rwkv_emu::run_fibers(groups, stacks, stack_bytes);
  *tg_bytes = rwkv_emu::threadgroup_bytes;
  return rc;
}}
"""


CACHE_DAYS = 14  # an emulator library unused this long goes: every change to a kernel's text adds new ones
_pruned: set[Path] = set()


def build_directory() -> Path:
    """The emulator libraries' cache (kept across runs); once a process, those unused for CACHE_DAYS go."""
    d = Path(os.environ.get("RWKV_MLX_METAL_PROOF_CACHE") or Path(tempfile.gettempdir()) / f"rwkv-metal-proof-{os.getuid()}")
    d.mkdir(parents=True, exist_ok=True)
    if d not in _pruned:
        _pruned.add(d)
        old = time.time() - CACHE_DAYS * 86400
        for lib in d.glob("k*.so"):
            try:
                if lib.stat().st_mtime < old:
                    lib.unlink()
            except OSError:  # another process's run took it first
                pass
    return d


def _toolchain_digest() -> str:
    """What else a build depends on: the compiler, the headers and the flags."""
    h = hashlib.sha256((zig() + str(os.path.getmtime(zig())) + " ".join(_FLAGS)).encode())
    for f in sorted(INCLUDE.iterdir()):
        h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()


def build_emulator(prepared: Prepared) -> Path:
    """A shared library running the kernel on the CPU; cached by a hash of text, headers and flags."""
    unit = emulator_unit(prepared)
    digest = hashlib.sha256((_toolchain_digest() + unit).encode()).hexdigest()[:24]
    out = build_directory() / f"k{digest}.so"
    try:
        os.utime(out)  # built before: mark it used, as the pruning counts from its time
        return out
    except FileNotFoundError:
        pass
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "kernel.cpp")
        with open(src, "w") as f:
            f.write(unit)
        obj, lib = os.path.join(tmp, "kernel.o"), os.path.join(tmp, "kernel.so")
        compile_cmd = clang() + _FLAGS + ["-DRWKV_METAL_EMULATE", "-O1", "-mf16c", "-fPIC", "-fvisibility=hidden",
                                          "-c", "-o", obj, src]
        # no libc linked: expf & co. resolve against the Python process's libm when loaded
        link_cmd = [zig(), "ld.lld", "-shared", "-o", lib, obj]
        for cmd in (compile_cmd, link_cmd):
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise ProofError(f"emulator build of {prepared.function} failed: "
                                 + " | ".join((proc.stderr or proc.stdout).splitlines()[:3]))
        os.replace(lib, out)
    return out
