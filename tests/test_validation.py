"""Bad input gets a clear error naming the argument, on every public op."""

from __future__ import annotations

import pytest
import torch

import hetmm_kernels as hk
from helpers import features

OPS = {
    "forward_ATM": lambda q, t, k=3: hk.forward_ATM(q, t, k),
    "backward_ATM": lambda q, t, k=3: hk.backward_ATM(q, t, k),
    "mutual_match": lambda q, t, k=3: hk.mutual_match(q, t, k, 3),
}


def _good():
    return features(2, 4, 5, 6), features(3, 4, 5, 6, seed=1)


def _with_nan(x):
    x = x.clone()
    x[0, 0, 0, 0] = float("nan")
    return x


def _with_inf(x):
    x = x.clone()
    x[-1, -1, -1, -1] = float("inf")
    return x


BAD = [
    # (query, temp, window, error type, words the message must contain)
    pytest.param(lambda q, t: (q.numpy(), t, 3), TypeError, "query must be a torch.Tensor", id="query-not-tensor"),
    pytest.param(lambda q, t: (q, [t], 3), TypeError, "temp must be a torch.Tensor", id="temp-not-tensor"),
    pytest.param(lambda q, t: (q.to(torch.int64), t, 3), TypeError, "query must be float32", id="integer-query"),
    pytest.param(lambda q, t: (q, (t * 10).to(torch.int32), 3), TypeError, "temp must be float32", id="integer-temp"),
    pytest.param(lambda q, t: (q.to(torch.complex64), t.to(torch.complex64), 3), TypeError,
                 "float32, float16, bfloat16 or float64", id="complex"),
    pytest.param(lambda q, t: (q[0], t, 3), ValueError, "query must have 4 dimensions", id="query-rank-3"),
    pytest.param(lambda q, t: (q, t[None], 3), ValueError, "temp must have 4 dimensions", id="temp-rank-5"),
    pytest.param(lambda q, t: (q, t[:, :3], 3), ValueError, "same channels C", id="channel-mismatch"),
    pytest.param(lambda q, t: (q, t[:, :, :4], 3), ValueError, "same height H", id="height-mismatch"),
    pytest.param(lambda q, t: (q, t[..., :5], 3), ValueError, "same width W", id="width-mismatch"),
    pytest.param(lambda q, t: (q, t[:0], 3), ValueError, "temp is empty", id="empty-template-set"),
    pytest.param(lambda q, t: (q[:, :, :0], t[:, :, :0], 3), ValueError, "H and W of at least 1", id="zero-height"),
    pytest.param(lambda q, t: (q, t, -1), ValueError, "non-negative window", id="negative-window"),
    pytest.param(lambda q, t: (q, t, 2.5), TypeError, "int window", id="float-window"),
    pytest.param(lambda q, t: (q, t, True), TypeError, "int window", id="bool-window"),
    pytest.param(lambda q, t: (q.half(), t, 3), TypeError, "same dtype", id="dtype-mismatch"),
    pytest.param(lambda q, t: (_with_nan(q), t, 3), ValueError, "query contains NaN or inf", id="nan-query"),
    pytest.param(lambda q, t: (q, _with_inf(t), 3), ValueError, "temp contains NaN or inf", id="inf-temp"),
    pytest.param(lambda q, t: (q, t.to("meta"), 3), ValueError, "same device", id="different-devices"),
]


@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("make,error,words", BAD)
def test_bad_input(op, make, error, words):
    query, temp, window = make(*_good())
    with pytest.raises(error, match=words):
        OPS[op](query, temp, window)


def test_back_window_is_checked_by_name():
    query, temp = _good()
    with pytest.raises(ValueError, match="back_patch must be a non-negative"):
        hk.mutual_match(query, temp, 3, -3)
    with pytest.raises(TypeError, match="fore_patch must be an int"):
        hk.mutual_match(query, temp, "5", 3)


def test_numpy_integer_window_is_accepted():
    np = pytest.importorskip("numpy")
    query, temp = _good()
    assert torch.equal(hk.forward_ATM(query, temp, np.int64(3)), hk.forward_ATM(query, temp, 3))


def test_prepared_templates_are_checked_once():
    with pytest.raises(ValueError, match="temp contains NaN"):
        hk.prepare_templates(_with_nan(features(2, 4, 3, 3)))
    bank = hk.prepare_templates(features(2, 4, 3, 3))
    with pytest.raises(ValueError, match="same channels C"):
        hk.mutual_match(features(1, 5, 3, 3), bank, 3, 3)


def test_trusted_values_skips_only_the_value_checks():
    bad = torch.ones(1, 4, 3, 3)
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        hk.mutual_match(bad, torch.ones(2, 4, 3, 3), 3, 3, backend="torch")
    with hk.trusted_values():  # what a CUDA graph capture needs: no host read of a value
        hk.mutual_match(bad, torch.ones(2, 4, 3, 3), 3, 3, backend="torch")
        with pytest.raises(ValueError, match="same channels"):  # shapes are still checked
            hk.mutual_match(bad, torch.ones(2, 5, 3, 3), 3, 3, backend="torch")
    with pytest.raises(ValueError, match="NaN"):  # and the checks are back after the block
        hk.mutual_match(bad, torch.ones(2, 4, 3, 3), 3, 3, backend="torch")
