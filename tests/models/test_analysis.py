"""Analysis networks (models.analysis): shapes, gradients, tiny training, encoder transfer, persistence."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models import build_model, load_model, save_model
from models.analysis import SegmentationClassifier, UNetClassifier, load_encoder

TINY = [4, 8, 16]
SEGMENTERS = {
    "unet3d": {"out_channels": 3, "channels": TINY},
    "unet2d": {"out_channels": 3, "channels": TINY},
    "vnet": {"out_channels": 3},
}
CLASSIFIERS = {
    "densenet3d": {"init_features": 4, "growth_rate": 4, "block_config": [1, 1]},
    "resnet3d": {"widths": [4, 8, 8, 16]},
    "unet_classifier": {"channels": TINY},
    "seg_classifier": {"channels": TINY, "out_channels": 3},
}


@pytest.mark.parametrize("name", list(SEGMENTERS))
def test_a_segmenter_gives_class_logits_per_voxel(name):
    net = build_model(name, SEGMENTERS[name])
    x = torch.randn(2, 1, 32, 32, 32)
    assert net(x).shape == (2, 3, 32, 32, 32)


@pytest.mark.parametrize("name", list(CLASSIFIERS))
@pytest.mark.parametrize("channels", [1, 2])
def test_a_classifier_gives_one_logit_per_volume(name, channels):
    net = build_model(name, {**CLASSIFIERS[name], "in_channels": channels})
    assert net(torch.randn(3, channels, 32, 32, 32)).shape == (3,)


@pytest.mark.parametrize("name", list(SEGMENTERS) + list(CLASSIFIERS))
def test_gradients_reach_every_parameter(name):
    kwargs = SEGMENTERS.get(name) or CLASSIFIERS[name]
    net = build_model(name, kwargs)
    torch.manual_seed(0)
    out = net(torch.randn(2, 1, 32, 32, 32))
    (out.square().mean()).backward()
    missing = [
        n for n, p in net.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.abs().sum())
    ]
    assert not missing, missing[:5]


def _blobs(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Volumes with a bright cube (class 1) and a dark sphere (class 2) at random places."""
    rng = np.random.default_rng(seed)
    x = np.zeros((n, 1, 32, 32, 32), np.float32)
    y = np.zeros((n, 1, 32, 32, 32), np.int64)
    grid = np.indices((32, 32, 32))
    for i in range(n):
        a = rng.integers(4, 20, 3)
        x[i, 0, a[0] : a[0] + 8, a[1] : a[1] + 8, a[2] : a[2] + 8] = 1.0
        y[i, 0, a[0] : a[0] + 8, a[1] : a[1] + 8, a[2] : a[2] + 8] = 1
        c = rng.integers(8, 24, 3)
        ball = ((grid - c[:, None, None, None]) ** 2).sum(0) < 25
        x[i, 0][ball & (y[i, 0] == 0)] = 0.5
        y[i, 0][ball & (y[i, 0] == 0)] = 2
    x += 0.05 * rng.standard_normal(x.shape).astype(np.float32)
    return torch.from_numpy(x), torch.from_numpy(y)


def test_a_tiny_unet3d_learns_to_segment_with_a_dice_loss():
    from monai.losses import DiceCELoss

    from pipelines.scores import dice_per_class

    torch.manual_seed(0)
    net = build_model("unet3d", {"out_channels": 3, "channels": [8, 16, 32]})
    x, y = _blobs(4, seed=0)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    opt = torch.optim.Adam(net.parameters(), 1e-2)
    x_test, y_test = _blobs(2, seed=1)
    with torch.no_grad():
        before = np.nanmean(dice_per_class(net(x_test).argmax(1).numpy(), y_test[:, 0].numpy(), 3))
    for _ in range(80):
        opt.zero_grad()
        loss_fn(net(x), y).backward()
        opt.step()
    net.eval()
    with torch.no_grad():
        after = np.nanmean(dice_per_class(net(x_test).argmax(1).numpy(), y_test[:, 0].numpy(), 3))
    assert after > 0.8 and after > before + 0.3, (before, after)


def _cubes(n: int, size: int, cube: int, margin: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` noisy volumes ``size³``, every second one holding a bright ``cube³`` at least about
    ``margin`` voxels from the border; and their 0/1 labels."""
    rng = np.random.default_rng(seed)
    x = 0.1 * rng.standard_normal((n, 1, size, size, size)).astype(np.float32)
    labels = np.arange(n) % 2
    for i in np.flatnonzero(labels):
        a = rng.integers(margin, size - cube - margin, 3)
        x[i, 0, a[0] : a[0] + cube, a[1] : a[1] + cube, a[2] : a[2] + cube] += 1.0
    return torch.from_numpy(x), torch.from_numpy(labels.astype(np.float32))


def _learns_the_cubes(net: torch.nn.Module, x: torch.Tensor, labels: torch.Tensor, steps: int) -> None:
    """``steps`` of Adam halve the BCE loss and classify every volume right."""
    opt = torch.optim.Adam(net.parameters(), 3e-3)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    first = float(loss_fn(net(x), labels))
    for _ in range(steps):
        opt.zero_grad()
        loss = loss_fn(net(x), labels)
        loss.backward()
        opt.step()
    assert float(loss) < 0.5 * first
    assert ((net(x) > 0) == labels.bool()).all()


def test_a_tiny_classifier_learns_which_volumes_hold_a_bright_cube():
    x, labels = _cubes(16, 32, 6, margin=2, seed=0)
    torch.manual_seed(0)
    _learns_the_cubes(build_model("unet_classifier", {"channels": TINY}), x, labels, steps=30)


def test_freeze_trains_only_the_head_of_a_transferred_encoder():
    segmenter = build_model("unet3d", {"out_channels": 3, "channels": TINY})
    clf = UNetClassifier(channels=TINY, freeze=True)
    assert load_encoder(clf, segmenter.state_dict()) > 0
    state = segmenter.state_dict()
    for prefix, layer in zip(
        clf.prefixes, clf.encoder, strict=True
    ):  # the encoder holds the segmenter's weights
        for k, v in layer.state_dict().items():
            assert torch.equal(state[f"{prefix}.{k}"], v), k
    before = {k: v.clone() for k, v in clf.state_dict().items()}
    opt = torch.optim.SGD([p for p in clf.parameters() if p.requires_grad], lr=0.1)
    clf.train()
    assert not clf.encoder.training  # frozen normalisation too
    clf(torch.randn(2, 1, 32, 32, 32)).sum().backward()
    opt.step()
    after = clf.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("head.") for k in changed), changed


def test_a_seg_classifier_reads_the_largest_log_odds_of_its_class_through_sliding_windows():
    segmenter = build_model("unet3d", {"out_channels": 3, "channels": TINY}).eval()
    clf = SegmentationClassifier(channels=TINY, out_channels=3, target_channel=2, roi=(16, 16, 16))
    assert load_encoder(clf, segmenter.state_dict()) == len(segmenter.state_dict())
    clf.eval()
    x = torch.randn(2, 1, 16, 16, 16)  # one window: the segmenter's own logits
    with torch.no_grad():
        logits = segmenter(x)
        expected = (logits[:, 2] - torch.logsumexp(logits[:, :2], dim=1)).flatten(1).amax(1)
        assert torch.allclose(clf(x), expected, atol=1e-5)
        assert clf(torch.randn(1, 1, 16, 32, 48)).shape == (1,)  # larger volumes slide the window


def test_a_frozen_seg_classifier_trains_only_its_calibration_and_finetuning_trains_all():
    segmenter = build_model("unet3d", {"out_channels": 2, "channels": TINY})
    frozen = SegmentationClassifier(channels=TINY, freeze=True)
    load_encoder(frozen, segmenter.state_dict())
    frozen.train()
    assert not frozen.unet.training
    assert {n for n, p in frozen.named_parameters() if p.requires_grad} == {"scale", "bias"}
    tuned = SegmentationClassifier(channels=TINY)
    tuned(torch.randn(2, 1, 16, 16, 16)).sum().backward()
    assert all(p.grad is not None for p in tuned.unet.parameters())
    with pytest.raises(ValueError, match="target_channel 2 of 2 output channels"):
        SegmentationClassifier(channels=TINY, target_channel=2)
    with pytest.raises(ValueError, match="does not fit this seg_classifier"):
        load_encoder(SegmentationClassifier(channels=[8, 16, 32]), segmenter.state_dict())


def test_a_tiny_seg_classifier_learns_which_volumes_hold_a_bright_cube():
    x, labels = _cubes(12, 16, 4, margin=1, seed=1)
    torch.manual_seed(0)
    _learns_the_cubes(SegmentationClassifier(channels=TINY), x, labels, steps=40)


def test_an_encoder_of_another_shape_is_refused_with_the_reason():
    segmenter = build_model("unet3d", {"out_channels": 3, "channels": [8, 16, 32]})
    with pytest.raises(ValueError, match="same in_channels, channels and num_res_units"):
        load_encoder(UNetClassifier(channels=TINY), segmenter.state_dict())
    with pytest.raises(ValueError, match="no encoder layer 'model.0'"):
        load_encoder(UNetClassifier(channels=TINY), {"weight": torch.zeros(1)})


@pytest.mark.parametrize("name", ["unet3d", "unet_classifier"])
def test_a_saved_analysis_model_loads_back_identically(tmp_path, name):
    kwargs = SEGMENTERS.get(name) or CLASSIFIERS[name]
    net = build_model(name, kwargs).eval()
    save_model(net, name, kwargs, tmp_path)
    loaded, spec = load_model(tmp_path)
    x = torch.randn(1, 1, 32, 32, 32)
    assert spec["name"] == name
    assert torch.equal(net(x), loaded(x))


def test_bad_features_name_what_is_expected():
    from models import ModelError

    with pytest.raises(ModelError, match="at least 2 positive widths"):
        build_model("unet3d", {"channels": [4]})
