"""ops.degrade: film damage masks (the real-clips experiment's scratches and dust)."""

import pytest
import torch

from ops import degrade


def test_film_damage_scratches_persist_and_wander_while_dust_moves():
    g = torch.Generator().manual_seed(3)
    m = degrade.film_damage_masks(g, 12, 64, 200, scratches=4, dust=0)  # (F, 1, H, W)
    assert m.shape == (12, 1, 64, 200) and set(m.unique().tolist()) <= {0.0, 1.0}
    cols = m[:, 0].mean(1)  # (F, W): a scratch covers (almost) whole columns
    assert (cols > 0.9).any(1).float().mean() > 0.8  # full-height scratches in most frames
    hit = (cols > 0.5).float()
    overlap = (hit[1:] * hit[:-1]).sum() / hit[:-1].sum().clamp_min(1)
    assert overlap > 0.3  # the same scratches from frame to frame (they wander by ~2 px, not jump)
    assert not torch.equal(m[0], m[5])  # ... but they do move
    assert m.mean() < 0.1  # thin: a few % of the frame
    dusty = degrade.film_damage_masks(torch.Generator().manual_seed(3), 12, 64, 200, scratches=0, dust=8)
    assert dusty.sum() > 0 and len({tuple(d.flatten().nonzero().flatten().tolist()) for d in dusty}) > 6  # fresh dust per frame
    same = degrade.film_damage_masks(torch.Generator().manual_seed(3), 12, 64, 200, scratches=4, dust=0)
    assert torch.equal(m, same)  # determined by the generator
    with pytest.raises(ValueError, match="frames"):
        degrade.film_damage_masks(g, 0, 64, 64)
