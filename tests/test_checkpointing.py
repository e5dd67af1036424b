"""Gradient checkpointing: a checkpointed training step equals the plain one, state included."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
import torch.utils.checkpoint
from conftest import shipped_zoo_models
from torch import nn

import ndeconv.layers.grad_checkpoint
from ndeconv import ChannelDeconv, Delinear, FastDeconv, set_fast_mode
from ndeconv.layers.grad_checkpoint import checkpoint, checkpoint_seq


def _tiny_net(freeze: bool = False) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        FastDeconv(3, 8, 3, padding=1, block=3, sampling_stride=1, freeze=freeze, freeze_iter=1),
        nn.BatchNorm2d(8),  # a BatchNorm inside a checkpointed segment, as EfficientNet's blocks keep
        nn.ReLU(inplace=True),  # checkpointed with the BatchNorm: alone it would overwrite that segment's output
        FastDeconv(8, 8, 3, padding=1, groups=2, sampling_stride=1, freeze=freeze, freeze_iter=1),
        nn.ReLU(),
        ChannelDeconv(block=3),  # 8 channels: two whitened blocks of 3, the 2 left over standardised
        nn.Flatten(),
        Delinear(8 * 6 * 6, 5, block=16),
    ).double()


def _state(model: nn.Module) -> dict:
    """Everything a training step may change: parameters, buffers and the layers' plain-attribute state."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for name, m in model.named_modules():
        if isinstance(m, FastDeconv):
            state[f"{name}.counter"] = m.counter
            state[f"{name}._fast_step"] = m._fast_step
            state[f"{name}._fast_deconv"] = None if m._fast_deconv is None else m._fast_deconv.clone()
    return state


def _assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], torch.Tensor):
            torch.testing.assert_close(a[key], b[key], rtol=1e-9, atol=1e-12, msg=key)
        else:
            assert a[key] == b[key], key


def _train(model: nn.Module, run, steps: int = 4) -> dict:
    """``steps`` SGD steps with ``run(model, x)`` as the forward; the state after them."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for step in range(steps):
        x = torch.randn(4, 3, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(step))
        optimizer.zero_grad()
        run(model, x).square().mean().backward()
        optimizer.step()
    return _state(model)


def _plain(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x)


def _checkpointed(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    x = checkpoint_seq(list(model)[:5], x)  # the two convs, the BatchNorm and the ReLUs, one checkpoint each
    return checkpoint(nn.Sequential(*list(model)[5:]), x)  # ChannelDeconv and Delinear in one


@pytest.mark.parametrize("mode", ["exact", "fast", "freeze"])
def test_checkpointed_training_matches_plain_training(mode):
    """Same weights, running statistics, counters and fast-mode state after several steps: each layer updated
    its state once per step, and the recompute rebuilt the forward's activations (fast mode: with the same
    kept or refreshed matrix), so the gradients were the forward's."""
    plain = _tiny_net(freeze=mode == "freeze")
    if mode == "fast":
        set_fast_mode(plain, refresh_every=2)
    ckpt = copy.deepcopy(plain)
    _assert_same_state(_train(plain, _plain), _train(ckpt, _checkpointed))


def test_torch_checkpoint_alone_would_update_the_statistics_twice():
    """What the wrapper is for (and proof the test above can fail): torch's checkpoint runs the layers twice."""
    plain = _tiny_net()
    ckpt = copy.deepcopy(plain)

    def torch_checkpointed(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return torch.utils.checkpoint.checkpoint(model, x, use_reentrant=False)

    a, b = _train(plain, _plain, steps=1), _train(ckpt, torch_checkpointed, steps=1)
    assert not torch.allclose(a["0.running_mean"], b["0.running_mean"])


def test_backward_twice_replays_twice():
    model = _tiny_net()
    set_fast_mode(model, refresh_every=2)
    x = torch.randn(4, 3, 6, 6, dtype=torch.float64)
    out = _checkpointed(model.train(), x).sum()
    out.backward(retain_graph=True)
    first = model[0].weight.grad.clone()
    model.zero_grad()
    out.backward()
    torch.testing.assert_close(model[0].weight.grad, first)


def test_a_recompute_running_other_layers_is_refused():
    layer = FastDeconv(3, 3, 3, padding=1).double().train()
    calls = []

    def changes_between_passes(x: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        y = layer(x)
        return layer(y) if len(calls) > 1 else y  # the recompute calls the layer once more than the forward

    with torch.utils.checkpoint.set_checkpoint_early_stop(False):  # else the recompute stops after the first call
        out = checkpoint(changes_between_passes, torch.randn(2, 3, 5, 5, dtype=torch.float64, requires_grad=True))
    with pytest.raises(RuntimeError, match="recomputed more calls of this layer than its forward made"):
        out.sum().backward()


# One model per way forward_features runs its stages (a layerN loop, one Sequential of blocks with BatchNorms
# inside, a Sequential of single layers); the others (seconds to minutes a step here) use the same run_stage.
CASES = ["resnet18_deconv", "efficientnet_b0_deconv", "vgg16_deconv"]


@pytest.mark.parametrize("name", CASES)
def test_zoo_grad_checkpointing_matches_plain_training(name, monkeypatch):
    """timm's set_grad_checkpointing(True): a checkpoint per block, and the same step as without."""
    torch.manual_seed(0)
    plain = timm.create_model(name, in_chans=1).train()
    ckpt = copy.deepcopy(plain)
    ckpt.set_grad_checkpointing(True)
    tapes = []
    contexts = ndeconv.layers.grad_checkpoint._contexts
    monkeypatch.setattr(ndeconv.layers.grad_checkpoint, "_contexts", lambda f: tapes.append(1) or contexts(f))
    x = torch.randn(2, 1, 32, 32)
    for model in (plain, ckpt):
        torch.manual_seed(1)  # the same dropout masks, if any
        model(x).square().mean().backward()
    assert len(tapes) >= 3  # a checkpoint per block
    grads = {n: p.grad for n, p in ckpt.named_parameters()}
    for n, p in plain.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, rtol=1e-4, atol=1e-6, msg=n)
    _assert_same_state(
        {k: v for k, v in plain.state_dict().items() if "running" in k or "num_batches" in k},
        {k: v for k, v in ckpt.state_dict().items() if "running" in k or "num_batches" in k},
    )
    ckpt.set_grad_checkpointing(False)
    tapes.clear()
    ckpt(x)
    assert not tapes


def test_shipped_weights_fine_tune_with_grad_checkpointing():
    """The everyday use: pretrained weights, checkpointing on, a training step runs and changes the weights."""
    name = "resnet18_deconv"
    assert name in shipped_zoo_models()
    model = timm.create_model(name, pretrained=True).train()
    model.set_grad_checkpointing()
    before = model.get_classifier().weight.detach().clone()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    model(torch.randn(2, *model.pretrained_cfg["input_size"])).logsumexp(1).mean().backward()
    optimizer.step()
    assert not torch.equal(before, model.get_classifier().weight)
