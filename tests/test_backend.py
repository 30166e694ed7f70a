"""The backend switch: default by device, forced by call, by set_backend and by HETMM_BACKEND."""

from __future__ import annotations

import pytest
import torch

import hetmm_kernels as hk
from hetmm_kernels import backend as backend_mod
from helpers import INTERPRETED, features


@pytest.fixture(autouse=True)
def _restore_backend(monkeypatch):
    monkeypatch.delenv("HETMM_BACKEND", raising=False)
    hk.set_backend(None)
    yield
    hk.set_backend(None)


def test_auto_picks_by_device():
    assert hk.get_backend() == "auto"
    assert backend_mod.resolve(torch.device("cpu")) == "torch"
    assert backend_mod.resolve(torch.device("cuda", 0)) == "triton"


def test_environment_variable_and_set_backend(monkeypatch):
    monkeypatch.setenv("HETMM_BACKEND", "reference")
    assert hk.get_backend() == "reference"
    hk.set_backend("torch")  # an explicit choice beats the environment
    assert hk.get_backend() == "torch"
    hk.set_backend("auto")
    assert hk.get_backend() == "auto"


def test_use_backend_restores(monkeypatch):
    hk.set_backend("torch")
    with hk.use_backend("reference"):
        assert hk.get_backend() == "reference"
    assert hk.get_backend() == "torch"


@pytest.mark.parametrize("name", ["cuda", "", "Triton2"])
def test_unknown_backend_names(monkeypatch, name):
    with pytest.raises(ValueError, match="backend must be one of"):
        hk.set_backend(name)
    monkeypatch.setenv("HETMM_BACKEND", name or "x")
    with pytest.raises(ValueError, match="HETMM_BACKEND must be one of"):
        hk.get_backend()


def test_forced_backend_is_the_one_that_runs(monkeypatch):
    calls = []
    real = hk.reference.mutual_match
    monkeypatch.setattr(hk.reference, "mutual_match", lambda *a: calls.append(a) or real(*a))
    query, temp = features(1, 4, 3, 3), features(2, 4, 3, 3, seed=1)
    hk.mutual_match(query, temp, 3, 3)
    assert not calls
    monkeypatch.setenv("HETMM_BACKEND", "reference")
    hk.mutual_match(query, temp, 3, 3)
    assert len(calls) == 1


def test_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="triton backend needs CUDA tensors"):
        backend_mod.resolve(torch.device("cpu"), "triton")


@pytest.mark.skipif(not INTERPRETED, reason="checks the interpreter path")
def test_triton_runs_on_cpu_in_the_interpreter():
    query, temp = features(1, 4, 3, 3), features(2, 4, 3, 3, seed=1)
    with hk.use_backend("triton"):
        fore, _ = hk.mutual_match(query, temp, 3, 3)
    assert fore.device.type == "cpu"


def test_float64_runs_on_the_torch_path():
    assert backend_mod.resolve(torch.device("cuda", 0), None, torch.float64) == "torch"
    with pytest.raises(TypeError, match="use the torch backend for float64"):
        backend_mod.resolve(torch.device("cpu"), "triton", torch.float64)
    query, temp = features(1, 4, 3, 3).double(), features(2, 4, 3, 3, seed=1).double()
    fore, back = hk.mutual_match(query, temp, 3, 3)
    assert fore.dtype == torch.float64
    assert torch.allclose(fore, hk.mutual_match(query, temp, 3, 3, backend="reference")[0], atol=1e-12)
