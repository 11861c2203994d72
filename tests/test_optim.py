"""Optimizers step every parameter group; schedules warm up, peak and decay as promised."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

from pipeline.config import Train
from pipeline.training.optim import ema_average

from pipeline.training.optim import (OPTIMIZERS, SCHEDULERS, build_optimizer, build_schedule, check_groups, param_groups,
                                     use_slow_weights)


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU())
        self.decoder = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.decoder(self.encoder(x))


@pytest.mark.parametrize("lookahead", [False, True])
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_optimizer_updates_every_parameter(name, lookahead):
    torch.manual_seed(0)
    model = Tiny()
    opt = build_optimizer(model, model.encoder, Train(optimizer=name, lr=0.1, encoder_lr=0.01, weight_decay=0.01,
                                                      lookahead=lookahead))
    before = [p.detach().clone() for p in model.parameters()]
    for _ in range(2):  # Lookahead syncs slow weights every k steps; fast weights move at once
        model(torch.randn(2, 3, 8, 8)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
    lrs = {g["name"]: g["lr"] for g in opt.param_groups}
    assert lrs["encoder"] == 0.01 and lrs["decoder"] == 0.1
    assert {g["name"]: g["weight_decay"] for g in opt.param_groups}["encoder_no_decay"] == 0.0


def test_lookahead_model_is_the_slow_weights_after_an_epoch():
    """Mid-cycle (7 steps, k = 6) the fast weights have run ahead; what is validated and saved must
    be the slow weights: after use_slow_weights every parameter equals its slow buffer."""
    torch.manual_seed(0)
    model = Tiny()
    opt = build_optimizer(model, model.encoder, Train(optimizer="adamw", lr=0.1, encoder_lr=0.1, weight_decay=0.0,
                                                      lookahead=True))
    for _ in range(7):
        model(torch.randn(2, 3, 8, 8)).square().mean().backward()
        opt.step()
    slow = lambda p: opt._base_optimizer.state[p]["lookahead_slow_buff"]
    assert not all(torch.equal(p, slow(p)) for p in model.parameters())       # fast ran ahead
    use_slow_weights(opt)
    assert all(torch.equal(p, slow(p)) for p in model.parameters())
    plain = build_optimizer(model, model.encoder, Train(optimizer="adamw", lr=0.1, encoder_lr=0.1, weight_decay=0.0))
    before = [p.detach().clone() for p in model.parameters()]
    use_slow_weights(plain)                                                    # no Lookahead: nothing moves
    assert all(torch.equal(b, p) for b, p in zip(before, model.parameters()))


def test_forgetting_the_decoder_fails_loudly():
    model = Tiny()
    with pytest.raises(ValueError, match="2 trainable parameters in no group"):
        check_groups(model, [{"params": list(model.encoder.parameters())}])   # the team notes' bug
    with pytest.raises(ValueError, match="in several"):
        check_groups(model, [{"params": list(model.parameters())}, {"params": list(model.decoder.parameters())}])
    groups = param_groups(model, model.encoder, 1.0, 0.1, 0.0)
    assert sorted(len(g["params"]) for g in groups) == [1, 1, 1, 2]


def _lrs(name, total=100, warmup=10, metric=lambda step: 0.5):
    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    s = build_schedule(opt, name, total, warmup)
    out = []
    for step in range(total):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        s.step_batch()
        if (step + 1) % 10 == 0:
            s.step_epoch(metric(step))
    return out


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_schedule_warms_up_to_the_peak(name):
    lrs = _lrs(name)
    assert lrs[0] < 0.05                           # starts low
    assert max(lrs) == pytest.approx(1.0, rel=1e-3)  # reaches the configured lr
    assert max(lrs[:9]) < 1.0                      # and climbs, not jumps
    if name != "plateau":
        assert lrs[-1] < 0.05                      # and anneals to ~0


def test_plateau_halves_on_a_flat_metric_and_not_while_improving():
    assert _lrs("plateau")[-1] < 0.1
    assert _lrs("plateau", metric=lambda step: step)[-1] == pytest.approx(1.0)


# ----------------------------------------------------------------------------------------------- EMA
def test_ema_average_known_answer():
    """AveragedModel copies the first weights; update n then moves by 1 - decay_n towards the model,
    decay_n = min(decay, (1 + n) / (10 + n)) with warmup (TensorFlow's num_updates ramp), else decay."""
    for warmup, decay_1 in ((True, 2 / 11), (False, 0.9)):
        net = torch.nn.Sequential(torch.nn.Linear(2, 2, bias=False), torch.nn.BatchNorm1d(2))
        ema = AveragedModel(net, multi_avg_fn=ema_average(0.9, warmup), use_buffers=True)
        w0, m0 = torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.tensor([1.0, -1.0])
        w1, m1 = torch.zeros(2, 2), torch.zeros(2)
        with torch.no_grad():
            net[0].weight.copy_(w0)
            net[1].running_mean.copy_(m0)
            net[1].num_batches_tracked.fill_(3)
            ema.update_parameters(net)
            net[0].weight.copy_(w1)
            net[1].running_mean.copy_(m1)
            net[1].num_batches_tracked.fill_(7)
            ema.update_parameters(net)
        torch.testing.assert_close(ema.module[0].weight, decay_1 * w0 + (1 - decay_1) * w1)
        torch.testing.assert_close(ema.module[1].running_mean, decay_1 * m0 + (1 - decay_1) * m1)   # BN buffers too
        assert int(ema.module[1].num_batches_tracked) == 7   # integer buffers follow the model
