"""The fast per-pixel OPTICS gives scikit-learn's labels; PTS templates in the detector."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.cluster import OPTICS

import hetmm
from hetmm.clustering import compress, min_samples_for, optics_graph, optics_labels


def _clustered(n, c, h, w, groups, spread, seed):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(groups, c, h, w, generator=g)
    pick = torch.randint(0, groups, (n,), generator=g)
    return F.normalize(centres[pick] + spread * torch.randn(n, c, h, w, generator=g), dim=1)


def _agreement(temp, tsize):
    labels = optics_labels(temp, tsize)
    min_samples = min_samples_for(temp.shape[0], tsize)
    same, graphs = 0, 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn warns about all-inf reachability on some pixels
        for i in range(temp.shape[2]):
            for j in range(temp.shape[3]):
                x = temp[:, :, i, j].double().numpy()
                sk = OPTICS(min_samples=min_samples, metric="cosine").fit(x)
                same += np.array_equal(sk.labels_, labels[:, i, j].numpy())
                ordering, core, reach, _ = optics_graph(torch.from_numpy(x)[None], min_samples)
                graphs += np.allclose(sk.core_distances_, core[0].numpy(), rtol=0, atol=1e-14)
    return same / (temp.shape[2] * temp.shape[3]), graphs / (temp.shape[2] * temp.shape[3])


@pytest.mark.parametrize("n,tsize,spread,seed", [(40, 8, 0.6, 0), (30, 10, 1.0, 1), (25, 12, 0.3, 2)])
def test_labels_agree_with_sklearn_on_random_features(n, tsize, spread, seed):
    labels_rate, core_rate = _agreement(_clustered(n, 16, 4, 4, 4, spread, seed), tsize)
    assert core_rate == 1.0
    # identical except where float64 distances tie after rounding: measured 16/16 pixels here
    assert labels_rate >= 0.9, labels_rate


def test_labels_agree_with_sklearn_on_real_features():
    from hetmm.demo import _crop, _texture

    rng = np.random.default_rng(0)
    image = _texture("gravel")
    crops = torch.stack([torch.from_numpy(_crop(image, rng, (0, 512))).expand(3, -1, -1) for _ in range(24)])
    feats = hetmm.Backbone("tf_efficientnet_lite0")(F.interpolate(crops, size=128))["layer2"]  # [24, 40, 16, 16]
    labels_rate, core_rate = _agreement(feats, 6)
    # measured 249/256: the other pixels differ by one step of scikit-learn's 1e-15 rounding grid
    # (its BLAS and ours sum in different orders) or by an ordering tie
    assert labels_rate >= 0.9, labels_rate
    assert core_rate >= 0.9, core_rate


def test_too_few_templates_rule():
    assert min_samples_for(1, 60) is None
    assert min_samples_for(10, 60) == 2  # N // K < 2: scikit-learn's minimum
    assert min_samples_for(200, 60) == 3
    lone = _clustered(1, 4, 2, 2, 1, 0.1, 0)
    assert (optics_labels(lone, 60) == -1).all()


def test_compress_keeps_templates_and_shrinks_the_set():
    temp = _clustered(30, 8, 3, 3, 3, 0.5, 3)
    small = compress(temp, 5)
    assert small.shape == (5, 8, 3, 3)
    # every selected feature is one of the templates at that pixel
    for i in range(3):
        for j in range(3):
            chosen = small[:, :, i, j]
            gaps = (chosen[:, None, :] - temp[None, :, :, i, j]).abs().amax(dim=-1)  # [5, 30]
            assert (gaps.min(dim=1).values == 0).all()
    assert compress(temp, 30) is temp


def test_detector_with_pts_templates(tmp_path):
    images = torch.rand(12, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    det = hetmm.HETMM(backbone="resnet18", weights=None, image_size=64, out_size=64, templates="pts", tsize=4)
    det.fit(images)
    assert len(det.bank) == 4
    loaded = hetmm.HETMM.load(det.save(tmp_path / "pts.safetensors"))
    assert loaded.templates == "pts" and loaded.tsize == 4
    query = torch.rand(2, 3, 64, 64)
    assert torch.equal(loaded.predict(query).anomaly_map, det.predict(query).anomaly_map)
