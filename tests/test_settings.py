"""The tuning settings (rwkv_mlx/settings.py): a bad value is one clear error naming the variable, and
the README's table lists exactly the settings the package reads."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from rwkv_mlx import layers, settings
from rwkv_mlx.errors import InvalidArgumentError
from rwkv_mlx.kernels import matvec

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.mark.parametrize("value", ["abc", "-1", "1.5"])
def test_bad_integer_names_the_variable(monkeypatch, value):
    monkeypatch.setenv("RWKV_MLX_KERNEL_MAX_BATCH", value)
    with pytest.raises(InvalidArgumentError) as e:
        matvec.max_batch("cuda")
    assert str(e.value).startswith(f"$RWKV_MLX_KERNEL_MAX_BATCH={value!r}: expected an integer >= 0")
    assert "\n" not in str(e.value) and e.value.exit_code == 2


def test_defaults_and_overrides(monkeypatch):
    for name in settings.SETTINGS:
        monkeypatch.delenv(name, raising=False)
    assert matvec.max_batch("cuda") == matvec.MAX_BATCH_DEFAULT["cuda", "quantized"] == 0
    assert matvec.max_batch("cuda", dense=True) == matvec.MAX_BATCH_DEFAULT["cuda", "dense"] == 0
    assert matvec.max_batch("metal") == matvec.max_batch("metal", dense=True) == 0
    assert layers.cuda_dequant_min_rows() == 16
    monkeypatch.setenv("RWKV_MLX_KERNEL_MAX_BATCH", "4")
    monkeypatch.setenv("RWKV_MLX_CUDA_DEQUANT_MIN_ROWS", "0")
    assert matvec.max_batch("metal") == 4 and not matvec.kernel_rows(5, "metal") and matvec.kernel_rows(4, "metal")
    assert not matvec.kernel_rows(5, "cuda") and not matvec.kernel_rows(5, "cuda", dense=True)  # (both forms)
    assert layers.cuda_dequant_min_rows() == 0
    monkeypatch.setattr(matvec, "MAX_BATCH", 0)  # a script's or test's own setting wins
    assert matvec.kernel_rows(1000, "cuda")


def test_expand_dtype_is_checked(monkeypatch):
    monkeypatch.setattr(layers, "active_backend", lambda: "cuda")
    monkeypatch.setenv("RWKV_MLX_CUDA_EXPAND_DTYPE", "uint8")
    with pytest.raises(InvalidArgumentError, match=r"expected one of float16, float32"):
        layers._expand_on_cuda(64)
    monkeypatch.setenv("RWKV_MLX_CUDA_EXPAND_DTYPE", "float32")
    assert layers._expand_on_cuda(64) == layers.mx.float32 and layers._expand_on_cuda(1) is None
    monkeypatch.delenv("RWKV_MLX_CUDA_EXPAND_DTYPE")
    assert layers._expand_on_cuda(64) == layers.mx.float16  # the default: the tensor cores
    with layers.exact_products():  # references (the quality gate) stay float32 math
        assert layers._expand_on_cuda(64) == layers.mx.float32
    assert layers._expand_on_cuda(64) == layers.mx.float16


def test_readme_lists_every_setting():
    section = README.read_text().split("### Environment settings", 1)[1].split("\n#", 1)[0]
    listed = set(re.findall(r"`(RWKV_MLX_[A-Z_]+)`", section))
    assert listed == set(settings.SETTINGS)
