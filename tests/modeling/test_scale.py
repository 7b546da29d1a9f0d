"""Thousands of classes: the transfer head computes one 28x28 map per RoI, never one per class,
and in eval mode applies T once to the whole class table."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from pipelines.config import HeadConfig
from pipelines.modeling.maskx_rcnn import build_mask_side, mask_loss

K, E, R = 3000, 40, 7  # classes, embedding width, RoIs (R prime: no shape has R and K by accident)
HEAD = HeadConfig(mask_dim=8, num_convs=1, mlp_hidden=16, mlp_input_size=7, transfer_hidden=16, roi_size=14)


class ShapeLog(TorchDispatchMode):
    """Records the shape of every tensor an aten op returns."""

    def __init__(self):
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.shapes += [tuple(t.shape) for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        return out


def _side(k: int):
    torch.manual_seed(0)
    side = build_mask_side(HEAD, k, 16, torch.randn(k, E))
    calls = []
    side.predictor.transfer.register_forward_hook(lambda mod, inp, out: calls.append((tuple(inp[0].shape), tuple(out.shape))))
    return side, calls


def _inputs(k: int):
    g = torch.Generator().manual_seed(1)
    feats = torch.randn(R, 16, 14, 14, generator=g)
    labels = torch.tensor([1, k, k // 2, 17, k, 3, k - 1])  # spread over the table, one class twice
    return feats, labels


def _no_per_class_maps(shapes: list[tuple[int, ...]], k: int) -> None:
    per_class = [s for s in shapes if k in s and len(s) != 2]
    assert not per_class, f"tensors with a class axis besides the [K, D] table: {per_class[:3]}"
    assert not [s for s in shapes if k in s and R in s]


@pytest.mark.parametrize("k", [80, K])
def test_eval_one_map_per_roi_and_T_once(k):
    side, calls = _side(k)
    side.eval()
    feats, labels = _inputs(k)
    with torch.no_grad(), ShapeLog() as log:
        out1 = side(feats, labels)
        out2 = side(feats[:3], labels[:3])
    assert out1.shape == (R, 28, 28) and out2.shape == (3, 28, 28)
    assert calls == [((k, E), (k, HEAD.mask_dim))]  # T once, on the whole table, for both forwards
    torch.testing.assert_close(out2, out1[:3])
    _no_per_class_maps(log.shapes, k)
    # every RoI's map uses its own class's w_seg = T(w_det[c])
    with torch.no_grad():
        w_seg = side.predictor.transfer(side.predictor.w_det)
        fcn = side.fcn(feats)
        expect = torch.einsum("rdhw,rd->rhw", fcn, w_seg[labels - 1]) + side.predictor.mlp(fcn)
    torch.testing.assert_close(out1, expect, rtol=1e-5, atol=1e-5)
    side.train()
    side.eval()
    with torch.no_grad():
        side(feats, labels)
    assert len(calls) == 3  # (the check above called T once more;) after train() the table is recomputed once


def test_training_at_3000_classes_touches_only_the_batch_classes():
    side, calls = _side(K)
    side.train()
    feats, labels = _inputs(K)
    targets = (torch.rand(R, 28, 28, generator=torch.Generator().manual_seed(2)) > 0.5).to(torch.uint8)
    with ShapeLog() as log:
        logits = side(feats, labels)
        mask_loss(logits, targets).backward()
    assert logits.shape == (R, 28, 28)
    assert calls == [((6, E), (6, HEAD.mask_dim))]  # T on the 6 distinct classes of the batch only
    _no_per_class_maps([s for s in log.shapes if s != (K, E)], K)
    assert side.predictor.transfer.mlp[0].weight.grad is not None


def test_cost_at_3000_classes_is_about_the_cost_at_80():
    """The largest tensor of a training step does not grow with the class count (beyond the [K, E] table)."""
    peaks = {}
    for k in (80, K):
        side, _ = _side(k)
        feats, labels = _inputs(k)
        with ShapeLog() as log:
            mask_loss(side(feats, labels), torch.zeros(R, 28, 28)).backward()
        peaks[k] = max(torch.Size(s).numel() for s in log.shapes if s[:1] != (k,))
    assert peaks[K] == peaks[80]
