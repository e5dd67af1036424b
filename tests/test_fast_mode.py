"""Opt-in fast mode: the whitening matrix refreshed every k training steps and reused in between."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ndeconv import Delinear, FastDeconv
from ndeconv.layers.fast_deconv import set_fast_mode


def _batch(step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(step)
    x = torch.randn(4, 8, 10, 10, generator=g, dtype=torch.float64)
    return x + 0.7 * x.roll(1, dims=3) + 0.5 * x.roll(1, dims=1) + 0.2 * step


def _step(layer: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    layer.train()
    x = x.clone().requires_grad_(True)
    y = layer(x)
    (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum().backward()
    return y.detach(), x.grad


@pytest.mark.parametrize("groups", [1, 4])
def test_fast_mode_refreshes_every_k_steps_and_reuses_in_between(groups, monkeypatch):
    torch.manual_seed(0)
    exact = FastDeconv(8, 8, 3, padding=1, groups=groups).double()
    fast = copy.deepcopy(exact)
    assert set_fast_mode(nn.Sequential(fast), 3) == 1
    calls = []
    original = FastDeconv._batch_statistics
    monkeypatch.setattr(FastDeconv, "_batch_statistics",
                        lambda self, x, *args, **kwargs: calls.append(1) or original(self, x, *args, **kwargs))

    for step in range(6):
        x = _batch(step)
        kept = None if fast._fast_deconv is None else fast._fast_deconv.clone()
        mean_before = fast.running_mean.clone()
        deconv_before = fast.running_deconv.clone()
        y, grad_x = _step(fast, x)
        if step % 3 == 0:  # a refresh step is exactly the exact mode's step
            y_ref, grad_ref = _step(exact, x)
            torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(grad_x, grad_ref, rtol=1e-12, atol=1e-12)
        else:  # this batch's patch mean, the last refresh's matrix as a constant
            assert kept is not None
            # 8 channels, block 8: one block, so the patch vector is unfold's (grouped: per group, in order)
            mean = F.unfold(x, 3, padding=1, stride=fast.sampling_stride).transpose(1, 2).reshape(-1, 72).mean(0)
            w, b = fast.folded_weight_bias(mean, kept)
            expected = F.conv2d(x, w, b, fast.stride, fast.padding, fast.dilation, fast.groups)
            torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(fast.running_mean, 0.9 * mean_before + 0.1 * mean, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(fast.running_deconv, 0.9 * deconv_before + 0.1 * kept, rtol=1e-12, atol=1e-12)
            exact.load_state_dict(fast.state_dict())  # keep the exact twin at the same weights
    assert len(calls) == 2 + 2, "covariance computed on a reuse step"  # fast: steps 0 and 3; exact: same steps


def test_fast_mode_off_is_exact_and_state_dict_unchanged():
    torch.manual_seed(0)
    model = nn.Sequential(FastDeconv(8, 16, 3, padding=1), nn.ReLU(), FastDeconv(16, 8, 1)).double()
    twin = copy.deepcopy(model)
    keys = list(model.state_dict())
    set_fast_mode(model, 4)
    assert list(model.state_dict()) == keys
    assert "refresh_every=4" in repr(model[0])
    set_fast_mode(model, 1)
    for step in range(2):
        y, g = _step(model, _batch(step))
        y_ref, g_ref = _step(twin, _batch(step))
        assert torch.equal(y, y_ref) and torch.equal(g, g_ref)


def test_fast_mode_rejects_bad_k_and_non_finite_batches():
    layer = FastDeconv(8, 8, 3, padding=1).double()
    with pytest.raises(ValueError, match="refresh_every"):
        set_fast_mode(layer, 0)
    set_fast_mode(layer, 2)
    _step(layer, _batch(0))
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    bad = _batch(1)
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(FloatingPointError):
        _step(layer, bad)  # a reuse step: only the mean is computed, and it is checked
    assert all(torch.equal(v, before[k]) for k, v in layer.state_dict().items())


def test_fast_mode_trains_a_small_network():
    """Reusing the matrix must still learn: a few SGD steps reduce the loss as exact mode does."""
    torch.manual_seed(0)
    net = nn.Sequential(FastDeconv(3, 16, 3, padding=1), nn.ReLU(), FastDeconv(16, 16, 3, stride=2, padding=1),
                        nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), Delinear(16, 4))
    set_fast_mode(net, 4)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 3, 12, 12, generator=g), torch.randint(0, 4, (32,), generator=g)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(12):
        opt.zero_grad()
        loss = F.cross_entropy(net(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


def test_fast_mode_resumes_mid_cycle_from_a_checkpoint(tmp_path):
    """A checkpoint between refreshes keeps the cycle and the reused matrix: the resumed step is the step the
    uninterrupted run takes (a fresh set_fast_mode would refresh there instead)."""
    from ndeconv.training.checkpoint import TrainState, load_checkpoint, restore_checkpoint, save_checkpoint

    def build() -> tuple[nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
        torch.manual_seed(0)
        model = nn.Sequential(FastDeconv(8, 8, 3, padding=1), FastDeconv(8, 4, 3, padding=1)).double()
        set_fast_mode(model, 4)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        return model, optimizer, torch.optim.lr_scheduler.StepLR(optimizer, 10)

    def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> torch.Tensor:
        optimizer.zero_grad()
        y = model.train()(_batch(step))
        (y * y).mean().backward()
        optimizer.step()
        return y.detach()

    model, optimizer, scheduler = build()
    for step in range(3):  # refresh at step 0, reuse at 1 and 2: step 3 reuses too
        train_step(model, optimizer, step)
    save_checkpoint(tmp_path, model, optimizer, scheduler, None, TrainState(), {})
    uninterrupted = train_step(model, optimizer, 3)

    resumed_model, resumed_optimizer, resumed_scheduler = build()
    restore_checkpoint(load_checkpoint(tmp_path), resumed_model, resumed_optimizer, resumed_scheduler, None)
    assert torch.equal(train_step(resumed_model, resumed_optimizer, 3), uninterrupted)
