"""``rwkv-mlx doctor`` prints what a bug report needs; on a GPU it checks every kernel."""

from __future__ import annotations

import mlx.core as mx
import pytest

from rwkv_mlx.cli import run
from rwkv_mlx.kernels import kernel_backend


def test_doctor_reports_versions_and_backend(capsys):
    assert run(["doctor"]) == 0
    out = capsys.readouterr().out
    assert f"| mlx            | {mx.__version__}" in out
    if kernel_backend() is None:
        assert "none on this backend: the pure-MLX path runs" in out


@pytest.mark.gpu
@pytest.mark.skipif(kernel_backend() is None, reason="no MLX GPU backend: the kernel checks need one")
def test_doctor_checks_every_kernel_on_a_gpu(capsys):
    assert run(["doctor", "--repeats", "3"]) == 0
    out = capsys.readouterr().out
    assert "7 of 7 kernel checks pass" in out, out
