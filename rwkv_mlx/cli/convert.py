"""``rwkv-mlx convert`` and ``rwkv-mlx info``: checkpoints to MLX directories, and what a model file holds."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import numpy as np
import typer

from . import app
from ..errors import ModelFileError
from ..progress import Progress
from .common import FILE_OPTION, print_table


@app.command(help="Convert a GGUF file, a BlinkDL .pth checkpoint or a Hugging Face RWKV-7 directory into an MLX "
                  "model directory (load it with rwkv_mlx.load(DST) or --model DST). --quantize keep (the default) "
                  "is lossless: a kept GGUF computes exactly what the GGUF computes.")
def convert(
    src: Path = typer.Argument(..., help="GGUF file, .pth file, Hugging Face directory (config.json + safetensors), "
                                         "or a Hub repo: ORG/REPO, ORG/REPO:QUANT."),
    dst: Path = typer.Argument(..., help="Output directory (must not exist unless --force)."),
    quantize: str = typer.Option("keep", "--quantize", "-q", help="keep (exact), or 8, 6, 5, 4 bits (mx.quantize, affine)."),
    group_size: int = typer.Option(64, "--group-size", help="Group size for --quantize N: 32, 64 or 128."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="float16, bfloat16 or float32 for dense matrices, LoRAs "
                                                             "and new scales (default: as stored; new scales float16)."),
    quantize_embeddings: str = typer.Option("auto", "--quantize-embeddings",
                                            help="Embedding and head: auto (8 bits when --quantize N, else keep), keep, 8, 6, 5, 4."),
    fmt: str = typer.Option("rwkv-mlx", "--format", help="rwkv-mlx (this package's directory) or mlx-lm (mlx_lm.load)."),
    force: bool = typer.Option(False, "--force", help="Replace DST if it exists (only once the new one is complete)."),
    shard_size: int = typer.Option(1024, "--shard-size", help="Largest safetensors file in MB (memory holds one shard)."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar or tables."),
    file: Optional[str] = FILE_OPTION,
) -> None:
    from ..loader.convert import convert as run_convert
    from ..loader.hub import resolve_model

    src = resolve_model(src, file)
    bar = Progress(f"converting {src.name}", 1, " tensors", enabled=not quiet)

    def progress(done: int, total: int, name: str) -> None:
        bar.total = total
        bar.update(done, name)

    report = run_convert(src, dst, quantize=quantize, group_size=group_size, dtype=dtype,
                         quantize_embeddings=quantize_embeddings, fmt=fmt, force=force,
                         shard_bytes=shard_size << 20, progress=progress)
    bar.close(f"{len(report.rows)} tensors, {report.weight_bytes / 1e6:.1f} MB")
    if quiet:
        return
    lossy = report.lossy()
    if lossy or report.policy.bits is not None:
        rows = [(r.name, f"{r.note}, rel. RMS error {r.rel_error:.4f}" if r.rel_error is not None else r.note)
                for r in report.rows if r.fmt is not None]
        print_table(rows, header=("tensor", "stored as, quantization error (relative RMS)"))
    forms: dict[str, int] = {}
    for r in report.rows:
        label = r.note.split(" (")[0]
        forms[label] = forms.get(label, 0) + 1
    print_table([
        ("source", f"{report.source.path} ({report.source.kind})"),
        ("output", f"{report.dst} ({fmt})"),
        ("quantization", "keep (exact)" if report.policy.bits is None else
         f"{report.policy.bits}-bit, group {report.policy.group_size}, embeddings "
         f"{report.policy.embedding_bits or 'kept'}"),
        *[(f"tensors: {k}", str(v)) for k, v in sorted(forms.items())],
        ("weights", f"{report.weight_bytes / 1e6:.1f} MB"),
        ("worst tensor error", f"{max(r.rel_error for r in lossy):.4f} (relative RMS)" if lossy else "none (exact)"),
        ("time", f"{report.seconds:.1f} s"),
    ])


def _world_status(tokens) -> str:
    from ..formats.mlx_dir import TokenList

    n = len(tokens.tokens)
    if tokens.is_full_world_vocab():
        return f"the full RWKV world vocabulary ({n} ids)"
    if n < 65536 and tokens.tokens == TokenList.world(n).tokens:
        return f"the RWKV world vocabulary truncated to {n} ids"
    return f"a custom token list of {n} ids"


def _args_rows(args) -> list[tuple[str, str]]:
    from ..arch import parameter_shapes

    n_params = sum(int(np.prod(s)) for s in parameter_shapes(args).values())
    return [
        ("architecture", "rwkv7 (RWKV-7 x070)"),
        ("layers", str(args.n_layer)),
        ("n_embd / heads x head size", f"{args.n_embd} / {args.n_head} x {args.head_size}"),
        ("ffn", str(args.ffn_dim)),
        ("LoRA ranks decay/iclr/value/gate", f"{args.decay_rank}/{args.iclr_rank}/{args.value_rank}/{args.gate_rank}"),
        ("vocab size", str(args.vocab_size)),
        ("norm eps", f"{args.norm_eps:g}"),
        ("parameters", f"{n_params / 1e9:.3f} B" if n_params >= 1e8 else f"{n_params / 1e6:.2f} M"),
    ]


def _type_rows(types: dict[str, tuple[int, int]]) -> list[tuple[str, str]]:
    return [(k, f"{n} tensors, {b / 1e6:.2f} MB") for k, (n, b) in sorted(types.items(), key=lambda kv: -kv[1][1])]


def _info_converted(path: Path) -> None:
    from ..layers import WeightFormat
    from ..formats.mlx_dir import format_label, iter_stored_tensors, read_config
    from ..arch import ModelArgs

    config = read_config(path)
    args = ModelArgs.from_dict(config["model_args"])
    tok = config["tokenizer"]
    src = config.get("source", {})
    q = config.get("quantization", {})
    print_table([
        ("path", str(path)),
        ("format", f"rwkv-mlx directory, format version {config.get('format_version')} "
                   f"(written by rwkv-mlx {config.get('rwkv_mlx_version')})"),
        *_args_rows(args),
        ("quantization", "keep (exact)" if q.get("method") == "keep" else
         f"{q.get('bits')}-bit g{q.get('group_size')}, embeddings {q.get('embedding_bits') or 'kept'}"),
        ("tokenizer", f"{'the full RWKV world vocabulary' if tok.get('full_world_vocab') else 'token list'} "
                      f"({tok.get('vocab_size')} ids, {tok.get('file')}), eot {tok.get('eot_token_id')}"),
        ("source", f"{src.get('path')} ({src.get('format')})"),
        ("source sha256", str(src.get("sha256"))),
        ("fingerprint", str(config.get("fingerprint"))),
    ])
    forms = {m: format_label(WeightFormat.from_dict(f)) for m, f in config["weight_formats"].items()}
    types: dict[str, tuple[int, int]] = {}
    for name, dtype, _, n_bytes in iter_stored_tensors(path, config):
        module = name.rsplit(".", 1)[0]
        label = forms.get(module, f"{dtype} (small)")
        count, size = types.get(label, (0, 0))
        types[label] = (count + (0 if name.endswith((".scales", ".biases")) else 1), size + n_bytes)
    print_table(_type_rows(types), header=("stored as", "count, size"))


def _is_mlx_lm_dir(path: Path) -> bool:
    import json

    try:
        return "rwkv_mlx" in json.loads((path / "config.json").read_text())
    except (OSError, ValueError, TypeError):
        return False


def _info_mlx_lm(path: Path) -> None:
    import json

    from ..formats.hf import read_safetensors

    config = json.loads((path / "config.json").read_text())
    src = config.get("rwkv_mlx", {}).get("source", {})
    q = config.get("quantization")
    print_table([
        ("path", str(path)),
        ("format", f"mlx-lm directory (model_type {config.get('model_type')}), written by rwkv-mlx "
                   f"{config.get('rwkv_mlx', {}).get('version')}"),
        ("layers / n_embd / head size", f"{config.get('num_hidden_layers')} / {config.get('hidden_size')} / "
                                        f"{config.get('head_dim')}"),
        ("vocab size", str(config.get("vocab_size"))),
        ("quantization (mlx-lm default)", f"{q['bits']}-bit g{q['group_size']}" if q else "none"),
        ("tokenizer", "tokenizer.json (HF tokenizers, RWKV world greedy match)"),
        ("source", f"{src.get('path')} ({src.get('format')})"),
        ("source sha256", str(src.get("sha256"))),
    ])
    types: dict[str, tuple[int, int]] = {}
    for f in sorted(path.glob("model*.safetensors")):
        for t in read_safetensors(f)[0].values():
            count, size = types.get(t.dtype, (0, 0))
            types[t.dtype] = (count + 1, size + t.nbytes)
    print_table(_type_rows(types), header=("stored dtype", "count, size"))


@app.command(help="Describe a model: GGUF file, converted directory, .pth checkpoint or Hugging Face directory.")
def info(
    path: Path = typer.Argument(..., help="Model file or directory, or a Hub repo: ORG/REPO, ORG/REPO:QUANT."),
    sha256: bool = typer.Option(False, "--sha256", help="Also hash the whole source (seconds per GB)."),
    file: Optional[str] = FILE_OPTION,
) -> None:
    from ..loader.convert import open_source, sha256_files
    from ..formats.hf import is_hf_dir
    from ..loader.hub import resolve_model

    path = resolve_model(path, file)
    if path.is_dir() and not is_hf_dir(path):
        _info_converted(path)
        return
    if path.is_dir() and _is_mlx_lm_dir(path):
        _info_mlx_lm(path)
        return
    if not path.exists():
        raise ModelFileError(path, "no such file or directory")
    source = open_source(path)
    kind = {"gguf": "GGUF file", "pth": "PyTorch checkpoint (torch.save zip)",
            "hf": f"Hugging Face directory ({source.details.get('layout')} layout)"}[source.kind]
    tokens = source.tokens
    rows = [
        ("path", str(path)),
        ("format", kind),
        *_args_rows(source.args),
        ("tokenizer", f"{_world_status(tokens)}, eot {tokens.eot_token_id}"
                      f"{'' if source.kind == 'gguf' else ' (assumed: checkpoints carry no vocabulary)'}"),
        ("fingerprint", source.fingerprint()),
    ]
    if sha256:
        rows.append(("sha256", sha256_files(source.files)))
    print_table(rows)
    print_table(_type_rows(source.stored_types), header=("stored type", "count, size"))
    sys.stdout.flush()
