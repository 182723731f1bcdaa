"""The decode runtime (rwkv_mlx/model/runtime.py) drops its kernel plans and compiled steps when weights change.

On the CPU the kernels never run, so the CPU tests stand in a recording plan
builder for the kernels' (plans that report ``ok = False``, so the pure path
computes every result) and check which plans exist after each weight change.
The GPU test changes real weights between decodes and holds the fused path
to the pure one.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from conftest import tiny_model, tiny_model_path

import rwkv_mlx
from rwkv_mlx.kernels import kernels_disabled
from rwkv_mlx.model import runtime as runtime_module
from rwkv_mlx.model.weights import LoadOptions
from rwkv_mlx.arch import ModelArgs
from rwkv_mlx.train import TrainConfig, apply_lora, init_model, merge_lora
from rwkv_mlx.train.loop import make_optimizer, make_step


SMALL = ModelArgs(vocab_size=64, n_embd=32, n_layer=2, ffn_dim=64, decay_rank=8, iclr_rank=8, value_rank=8,
                  gate_rank=8, head_size=16)


def fresh_model():
    """A small model of its own (tests here change its weights), RWKV-LM's initial values."""
    return init_model(SMALL, seed=1)


class RecordingPlan:
    """Stands in for a kernel plan: remembers the weights it saw, declines to run (``ok = False``)."""

    built: list = []

    def __init__(self, *args, **kwargs):
        self.weights = args[0]
        self.ok = False
        RecordingPlan.built.append(self)


@pytest.fixture
def recording(monkeypatch):
    """Pretend a kernel backend exists; every plan the runtime builds is a RecordingPlan."""
    RecordingPlan.built = []
    monkeypatch.setattr(runtime_module, "kernel_backend", lambda: "metal")
    monkeypatch.setattr(runtime_module, "BlockPlan", RecordingPlan)
    monkeypatch.setattr(runtime_module, "head_plan", lambda ln, head, batch, backend: RecordingPlan(head))
    return RecordingPlan


def decode_one(model, token: int = 7):
    logits, _ = model(mx.array([[token]]), logits="last")
    mx.eval(logits)
    return np.array(logits)


def test_plans_are_built_once_and_rebuilt_after_update(recording):
    model = fresh_model()
    n_layer = model.args.n_layer
    first = decode_one(model)
    assert len(recording.built) == n_layer + 1  # one plan per block and one for the head
    assert model.runtime.cached() == n_layer + 1
    decode_one(model)
    assert len(recording.built) == n_layer + 1  # reused, not rebuilt

    new_head = model.head.weight * 2
    model.update({"head": {"weight": new_head}})
    assert model.runtime.cached() == 0  # the stale plans are gone
    second = decode_one(model)
    assert len(recording.built) == 2 * (n_layer + 1)
    assert recording.built[-1].weights.weight is new_head  # the new head plan sees the new weights
    assert not np.allclose(first, second)


def test_compiled_step_is_dropped_after_load_weights(recording):
    model = fresh_model()
    state = model.initial_state(1)
    logits, _ = model.step(mx.array([3]), state)  # the runtime compiles a one-token step (pure path inside)
    assert len(model.runtime._steps) == 1
    before = np.array(logits)
    weights = [("head.weight", model.head.weight * 0.5)]
    model.load_weights(weights, strict=False)
    assert model.runtime.cached() == 0
    after, _ = model.step(mx.array([3]), state)
    assert np.allclose(np.array(after), before * 0.5, rtol=1e-5, atol=1e-6)  # the head is linear: no stale graph


def test_modules_replaced_by_assignment_get_new_plans(recording):
    """Assignment is seen by no method of the model: the runtime checks which module a plan was built from."""
    model = fresh_model()
    state = model.initial_state(1)
    first, _ = model.step(mx.array([3]), state)
    built = len(recording.built)
    model.blocks[1] = init_model(SMALL, seed=2).blocks[1]
    model.head = nn.Linear(model.args.n_embd, model.args.vocab_size, bias=False)
    second, _ = model.step(mx.array([3]), state)
    rebuilt = recording.built[built:]
    assert {id(p.weights) for p in rebuilt} == {id(model.blocks[1]), id(model.head)}  # only those two
    with kernels_disabled():
        want, _ = model(mx.array([[3]]), state, logits="last")
    assert np.allclose(np.array(second), np.array(want)[:, -1], rtol=1e-5, atol=1e-6)  # no stale graph either
    assert not np.allclose(np.array(first), np.array(second))


def weight_changes():
    """Every way rwkv-mlx changes a model's weights, each as fn(model)."""

    def update(model):
        model.update({"ln_out": {"bias": model.ln_out.bias + 1}})

    def update_modules(model):
        model.update_modules({"head": nn.Linear(model.args.n_embd, model.args.vocab_size, bias=False)})

    def load_weights(model):
        model.load_weights([("ln0.weight", model.ln0.weight * 2)], strict=False)

    def lora(model):
        apply_lora(model, rank=2, targets=("att.key",))

    def lora_then_merge(model):
        apply_lora(model, rank=2, targets=("att.key",))
        for block in model.blocks:  # a trained adapter (B starts at zero: merging it would change nothing)
            block.att.key.lora_b = mx.full(block.att.key.lora_b.shape, 0.1)
        model.runtime.invalidations = 0
        merge_lora(model)

    def training_step(model, compile_step=False):
        cfg = TrainConfig(data="unused", out="unused", mode="full", compile=compile_step, batch_size=1, seq_len=4,
                          warmup=0, lr=1e-2, init_from="unused")
        optimizer = make_optimizer(cfg)
        step = make_step(model, model, optimizer, cfg)
        x = mx.array([[1, 2, 3, 4]])
        model.train(True)
        for _ in range(2):  # a compiled step runs the Python code only while tracing: the first call, and
            step(x, x)      # the second (the optimizer's state has just been created)
        model.train(False)
        decode_one(model)  # plans built with the weights after one step
        model.runtime.invalidations = 0
        model.train(True)
        step(x, x)  # replays the graph: only the trainer can tell the runtime
        model.train(False)

    return {"update": update, "update_modules": update_modules, "load_weights": load_weights,
            "apply_lora": lora, "merge_lora": lora_then_merge, "training step": training_step,
            "compiled training step": lambda m: training_step(m, compile_step=True)}


@pytest.mark.parametrize("name,change", list(weight_changes().items()), ids=list(weight_changes()))
def test_every_weight_change_invalidates(name, change, recording):
    model = fresh_model()
    decode_one(model)
    assert model.runtime.cached() > 0
    model.runtime.invalidations = 0
    before = {k: np.array(v) for k, v in tree_flatten(model.parameters())}
    change(model)
    after = {k: np.array(v) for k, v in tree_flatten(model.parameters())}
    assert before.keys() != after.keys() or any(not np.array_equal(before[k], after[k]) for k in before), \
        f"{name} changed no weight: the test would prove nothing"
    assert model.runtime.invalidations >= 1, f"{name} did not invalidate the decode runtime"
    assert model.runtime.cached() == 0


def test_cpu_builds_nothing():
    model, _ = tiny_model()
    decode_one(model)
    assert model.runtime.cached() == 0 and model.runtime.step(1) is None


def test_compiled_prompt_chunks_equal_op_by_op_and_follow_weights(monkeypatch):
    """prefill's full chunks through one compiled graph a block: the op-by-op result, dropped on weight change."""
    from rwkv_mlx.text.generate import prefill

    model = fresh_model()
    tokens = [int(t) for t in np.random.default_rng(3).integers(0, SMALL.vocab_size, 11)]

    def run(setting: str):
        monkeypatch.setenv("RWKV_MLX_COMPILED_PROMPT", setting)
        logits, state = prefill(model, tokens, chunk_size=4)  # chunks of 4, 4 and 3 tokens
        mx.eval(logits, *state.arrays())
        return np.array(logits), [np.array(a) for a in state.arrays()]

    eager_logits, eager_state = run("0")
    assert model.runtime.cached() == 0  # op by op: nothing compiled
    logits, state = run("1")
    assert len(model.runtime._chunks) == SMALL.n_layer  # one graph a block, for the full chunks only
    assert np.abs(logits - eager_logits).max() <= 1e-5 * max(1.0, np.abs(eager_logits).max())
    for a, b in zip(state, eager_state):
        assert np.abs(a - b).max() <= 1e-5 * max(1.0, np.abs(b).max())

    model.update({"head": {"weight": model.head.weight * 2}, "blocks": [{"ffn": {"x_k": model.blocks[0].ffn.x_k + 0.5}}]})
    assert model.runtime.cached() == 0
    changed_eager, _ = run("0")
    changed, _ = run("1")
    assert not np.allclose(changed_eager, eager_logits)  # the change reaches the logits
    assert np.abs(changed - changed_eager).max() <= 1e-5 * max(1.0, np.abs(changed_eager).max())


def test_compiled_prompt_setting_is_checked(monkeypatch):
    monkeypatch.setenv("RWKV_MLX_COMPILED_PROMPT", "yes")
    model = fresh_model()
    with pytest.raises(rwkv_mlx.errors.InvalidArgumentError, match="RWKV_MLX_COMPILED_PROMPT"):
        model(mx.array([[1, 2, 3]]), compiled_blocks=True)


@pytest.mark.gpu
def test_decode_after_weight_change_matches_pure_path():
    """Decode through the fused kernels, change weights, decode again: the pure path's logits, not stale ones."""
    model, _ = rwkv_mlx.load(tiny_model_path(), LoadOptions.for_backend())
    tokens = [5, 17, 300, 42]

    def decode(fused: bool) -> np.ndarray:
        state, out = model.initial_state(1), []
        for t in tokens:
            if fused:
                logits, state = model.step(mx.array([t]), state)
            else:
                with kernels_disabled():
                    logits, state = model.step(mx.array([t]), state)
            out.append(np.array(logits))
        return np.stack(out)

    decode(True)  # builds plans and a compiled step with the first weights
    assert model.runtime.cached() > 0
    # the tiny model is float32 (dense layers): change a block matrix, a block vector and the head
    rng = np.random.default_rng(0)
    noise = lambda a: a + mx.array(rng.standard_normal(a.shape).astype(np.float32)) * 0.05  # noqa: E731
    changed = {"blocks.0.att.key.weight": noise(model.blocks[0].att.key.weight),
               "blocks.1.att.w0": noise(model.blocks[1].att.w0), "head.weight": model.head.weight * 1.5}
    model.load_weights(list(changed.items()), strict=False)
    fused, pure = decode(True), decode(False)
    assert np.abs(fused - pure).max() <= 1e-4 * max(1.0, np.abs(pure).max())
    # and the fused path really ran: every block's plan and the head's were taken, a step was compiled
    assert model.runtime._steps and all(p.ok for _, p in model.runtime._blocks.values())
    assert all(p.ok for _, p in model.runtime._heads.values())
