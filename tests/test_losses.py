"""Every loss honours ignore index 255, backpropagates, and prefers the right answer."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pipeline.models.losses import LOSSES, NO_CLASS_WEIGHTS, BoundaryCE, build_loss, class_weights_from_pixels

pytestmark = pytest.mark.quick   # `make test-quick`: config, data, metrics, the model zoo in about a minute


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(0, 4, (2, 16, 16), generator=g)
    target[:, :4] = 255
    return torch.randn(2, 4, 16, 16, generator=g), target


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_ignored_pixels_do_not_count(name):
    logits, target = batch()
    logits.requires_grad_(True)
    loss_fn = build_loss({name: 1.0})
    loss = loss_fn(logits, target)
    loss.backward()
    assert torch.isfinite(loss) and logits.grad[:, :, :4].abs().max() == 0
    changed = logits.detach().clone()
    changed[:, :, :4] = torch.randn_like(changed[:, :, :4]) * 10
    assert torch.allclose(loss_fn(changed, target), loss.detach(), atol=1e-6)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_right_answer_scores_lower(name):
    logits, target = batch()
    perfect = F.one_hot(target.clamp(max=3), 4).permute(0, 3, 1, 2).float() * 20
    loss_fn = build_loss({name: 1.0})
    assert loss_fn(perfect, target) < loss_fn(logits, target)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_class_weights_apply_except_where_config_says_not(name):
    """losses.NO_CLASS_WEIGHTS (what the start-up check trusts) is exactly the losses class weights
    do not change."""
    logits, target = batch()
    plain = build_loss({name: 1.0})(logits, target)
    weighted = build_loss({name: 1.0}, torch.tensor([0.1, 3.0, 0.5, 2.0]))(logits, target)
    assert torch.isclose(plain, weighted) == (name in NO_CLASS_WEIGHTS)


def test_weighted_sum_and_terms():
    logits, target = batch()
    both = build_loss({"ce": 1.0, "dice": 0.5})
    total = both(logits, target)
    expected = build_loss({"ce": 1.0})(logits, target) + 0.5 * build_loss({"dice": 1.0})(logits, target)
    assert torch.allclose(total, expected) and set(both.last) == {"ce", "dice"}
    with pytest.raises(ValueError, match="unknown loss"):
        build_loss({"hinge": 1.0})


def test_boundary_weights_known_answer():
    target = torch.ones(1, 6, 8, dtype=torch.long)
    target[:, :, 4:] = 2
    w = BoundaryCE(width=1, weight=2.0).boundary_weights(target)[0]
    assert torch.equal(w[:, 3:5], torch.full((6, 2), 3.0)) and (w[:, :3] == 1).all() and (w[:, 5:] == 1).all()


def test_class_weights_from_pixels():
    w = class_weights_from_pixels(torch.tensor([90, 10, 0]), "inverse")
    assert torch.allclose(w, torch.tensor([0.2, 1.8, 0.0]), atol=1e-6)
    assert class_weights_from_pixels(torch.tensor([90, 10]), "none") is None
    s = class_weights_from_pixels(torch.tensor([90, 10]), "sqrt_inverse")
    assert s[1] / s[0] == pytest.approx(3.0)
