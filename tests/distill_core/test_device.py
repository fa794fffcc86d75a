"""Device and precision on a machine without a GPU: the objective makes no tensor off its
inputs' device, bf16 trains (autocast) with fp32 master weights, and gradient checkpointing
leaves the gradients, attention term included, as they were."""

import sys
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode
from safetensors import safe_open

from distill_core.cross_vocab import vocabulary_map
from distill_core.models import load_tokenizer
from distill_core.objective import LossWeights, distillation_loss
from distill_core.training import DistillationRecipe

DISTILL_CORE = str(Path(__file__).resolve().parents[2] / "distill_core")
FACTORIES = {torch.zeros, torch.ones, torch.full, torch.empty, torch.arange, torch.tensor,
             torch.eye, torch.rand, torch.randn, torch.randint, torch.linspace, torch.as_tensor}


class FactoriesWithoutDevice(TorchFunctionMode):
    """Records every tensor factory that distill_core calls without naming a device: on a GPU
    such a tensor lands on the CPU and the op that meets a GPU tensor fails."""

    def __init__(self):
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in FACTORIES and "device" not in kwargs:
            frame = sys._getframe(1)
            while frame and "/torch/" in frame.f_code.co_filename:
                frame = frame.f_back
            if frame and frame.f_code.co_filename.startswith(DISTILL_CORE):
                self.calls.append(f"{func.__name__} in {Path(frame.f_code.co_filename).name}:"
                                  f"{frame.f_lineno} ({frame.f_code.co_name})")
        return func(*args, **kwargs)


@pytest.fixture(scope="module")
def topk_cache(tmp_path_factory, ray_local, tiny_teacher_dir, tiny_data, build_cache):
    out = tmp_path_factory.mktemp("topk") / "cache"
    build_cache(tiny_data["gsm8k"]["train"].head(16), out, tiny_teacher_dir, logits="topk", top_k=8,
                actors=1)
    return str(out)


def _recipe(cfg, caches, teacher_dir, tmp_path, trial_config, group="combined", **distill):
    recipe = DistillationRecipe(trial_config(cfg, caches, teacher_dir, tmp_path / "out", group=group,
                                             **distill))
    recipe.setup()
    return recipe


def test_the_recorder_sees_a_factory_without_a_device(tiny_teacher_dir):
    tokenizer = load_tokenizer(tiny_teacher_dir)
    with FactoriesWithoutDevice() as recorder:  # vocabulary_map builds on the CPU, by design
        vocabulary_map(tokenizer, tokenizer)
    assert any("vocabulary_map" in call for call in recorder.calls)


@pytest.mark.parametrize("kd, topk", [("map", False), ("uld", False), ("map", True)])
def test_every_tensor_the_objective_makes_is_made_on_its_inputs_device(
        tmp_path, tiny_config, tiny_caches, topk_cache, tiny_teacher_dir, trial_config, kd, topk):
    caches = [topk_cache] if topk else tiny_caches
    recipe = _recipe(tiny_config, caches, tiny_teacher_dir, tmp_path, trial_config, kd_across_vocab=kd)
    assert (recipe.teacher_head is None) == topk
    batch = recipe.data.batch(recipe.schedule.batch(0)).to(recipe.device)
    weights = LossWeights(1, 1, 1, 1, temperature=2.0, kd_across_vocab=kd)
    with FactoriesWithoutDevice() as recorder:
        loss, terms = distillation_loss(recipe.student, recipe.teacher_head, batch, weights,
                                        recipe.vocab, measure_all=True)
        loss.backward()
    assert recorder.calls == []
    assert {t.device for t in terms.values()} == {loss.device}


def test_bf16_trains_on_the_cpu_with_fp32_master_weights(tmp_path, tiny_config, tiny_caches,
                                                         tiny_teacher_dir, trial_config):
    bf16 = tiny_config.model_copy(update={"precision": "bf16"})
    recipe = _recipe(bf16, tiny_caches, tiny_teacher_dir, tmp_path, trial_config, steps=40, lr=5e-3)
    losses = []
    for step, batch in recipe.batches():
        assert batch.teacher_hidden.dtype == torch.bfloat16  # the cache's own dtype, no upcast
        values = recipe.train_step(step, batch)
        assert all(torch.isfinite(torch.tensor(v)) for v in values.values()), values
        losses.append(values["loss"])
    assert sum(losses[-8:]) / 8 < 0.8 * sum(losses[:8]) / 8, losses
    assert recipe.teacher_head.weight.dtype == torch.bfloat16
    assert {p.dtype for p in recipe.student.parameters()} == {torch.float32}
    state = recipe.optimizer.state_dict()["state"]
    assert {v.dtype for slots in state.values() for k, v in slots.items() if k != "step"} == {torch.float32}
    out = recipe.finish({})
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}  # evaluated in bf16
    # The same first step in fp32: bf16 changes the numbers by rounding, not by a mistake.
    fp32 = _recipe(tiny_config, tiny_caches, tiny_teacher_dir, tmp_path / "fp32", trial_config,
                   steps=40, lr=5e-3)
    first = next(fp32.batches())
    assert fp32.train_step(*first)["loss"] == pytest.approx(losses[0], rel=0.02)


def test_gradient_checkpointing_keeps_the_gradients_and_the_attention_capture(
        tmp_path, tiny_config, tiny_caches, tiny_teacher_dir, trial_config):
    """Attention alone in the loss: a capture taken without autograd (reentrant checkpointing)
    or from the backward's rerun would give no gradient or another one."""
    grads, calls = {}, {}
    for checkpointing in (False, True):
        recipe = _recipe(tiny_config, tiny_caches, tiny_teacher_dir, tmp_path / str(checkpointing),
                         trial_config, group="attention", gradient_checkpointing=checkpointing)
        recipe.distill_step.weights = LossWeights(0, 0, 0, 1, temperature=2.0)
        count = {0: [], 1: []}
        layers = recipe.student.model.model.layers
        handles = [layers[i].self_attn.register_forward_hook(lambda *_, i=i: count[i].append(1))
                   for i in count]
        step, batch = next(recipe.batches())
        recipe.train_step(step, batch)
        for handle in handles:
            handle.remove()
        calls[checkpointing] = {i: len(c) for i, c in count.items()}
        grads[checkpointing] = {n: p.grad.clone() for n, p in recipe.student.named_parameters()
                                if p.grad is not None}
    # The backward reran the first layer, not the last, where the attention is captured.
    assert calls == {False: {0: 1, 1: 1}, True: {0: 2, 1: 1}}
    assert grads[True].keys() == grads[False].keys()
    assert grads[True]["model.model.layers.1.self_attn.q_proj.weight"].abs().sum() > 0
    for name, grad in grads[False].items():
        torch.testing.assert_close(grads[True][name], grad, rtol=1e-5, atol=1e-7, msg=name)
