"""Per-GPU tuning: the search space, the cache (keys, corruption, overrides) and `hetmm tune`.

The Triton kernels run under the interpreter here, so the spaces are tiny and the timer is
a stand-in that makes the choice deterministic; on a GPU the same code uses do_bench.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

import hetmm_kernels as hk
from hetmm.cli import main
from hetmm_kernels import autotune, reference
from hetmm_kernels.triton_ops import atm

from helpers import BACKENDS, assert_matches, device_for, features

pytestmark = pytest.mark.skipif("triton" not in BACKENDS, reason="needs CUDA or the Triton interpreter")


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    path = tmp_path / "cache" / "tuning.json"
    monkeypatch.setenv("HETMM_TUNE_CACHE", str(path))
    autotune.forget()
    yield path
    autotune.forget()


def _problem(batch=2, size=8, channels=16, templates=3):
    device = device_for("triton")
    q = atm.pixel_major(features(batch, channels, size, size, seed=1, device=device))
    t = atm.pixel_major(features(templates, channels, size, size, seed=2, device=device))
    return q, t


# A deterministic stand-in for the GPU timer: smaller tiles are "faster".
def _fake_timer(config_of):
    def timer(fn):
        fn()
        return float(config_of["current"]["TILE_H"] * config_of["current"]["TILE_W"])
    return timer


def _tune(q, t, space, fore=2, back=1):
    seen = {"current": None}
    original = atm.mutual_max

    def spy(*args, config=None, **kwargs):
        seen["current"] = config
        return original(*args, config=config, **kwargs)

    atm.mutual_max, restore = spy, atm.mutual_max
    try:
        return atm.tune_mutual(q, t, fore, back, space=space, timer=_fake_timer(seen))
    finally:
        atm.mutual_max = restore


SMALL = dict(TILE_H=2, TILE_W=2, BLOCK=4, BLOCK_C=16, num_warps=4, num_stages=2)


def test_space_is_valid_and_ordered():
    space = atm.config_space(64, 64, 2, 32, 256)
    assert len(space) > 50 and all(atm.valid_config(c, 64, 64, 2, False, 256) for c in space)
    assert {c.get("KERNEL", "stream") for c in space} == {"stream", "resident"}
    assert atm.tile_config(64, 64, 2, 32, 256) == dict(TILE_H=4, TILE_W=4, BLOCK=4, BLOCK_C=64, num_warps=4,
                                                       num_stages=3)
    # 16-bit at layer 1, batch 32: the space's first (the traffic model's fastest), the resident kernel with
    # 128 rows a program; float32 streams (IEEE, no tensor cores)
    default = atm.mutual_default(64, 64, 6, 32, 256, torch.float16)
    assert default == atm.config_space(64, 64, 6, 32, 256, dtype=torch.float16)[0]
    assert default["KERNEL"] == "resident" and default["BLOCK"] * default["TILE_H"] * default["TILE_W"] >= 128
    assert "KERNEL" not in atm.mutual_default(64, 64, 6, 32, 256, torch.float32)
    assert not any(c.get("KERNEL") for c in atm.config_space(64, 64, 2, 32, 256, dtype=torch.float32))
    assert all(c["BLOCK"] == 1 for c in atm.config_space(64, 64, 2, 8, 256, one_map=True))
    assert not atm.valid_config(dict(SMALL, TILE_H=3), 8, 8, 2)  # not a power of two
    assert not atm.valid_config(dict(SMALL, BLOCK=1), 8, 8, 2)  # 4 rows: tl.dot needs 16
    assert not atm.valid_config(dict(SMALL, KERNEL="other"), 8, 8, 2)
    # registers: a float32 product tile of 64 x 256 at 4 warps spills; shared memory: the resident query
    # tile and three template parts must fit the GPU's
    assert not atm.valid_config(dict(TILE_H=4, TILE_W=4, BLOCK=4, BLOCK_C=16, num_warps=4, num_stages=2), 64, 64, 6,
                                False, 256, torch.float32)
    resident = dict(KERNEL="resident", TILE_H=4, TILE_W=4, BLOCK=8, BLOCK_U=32, num_warps=8, num_stages=3)
    assert atm.valid_config(resident, 64, 64, 6, False, 256, torch.float16, atm.SHARED_BYTES[(9, 0)])
    assert not atm.valid_config(resident, 64, 64, 6, False, 512, torch.float16, atm.SHARED_BYTES[(8, 0)])


def test_tuned_config_is_recorded_and_used(private_cache):
    q, t = _problem()
    default = atm.tile_config(8, 8, 2, 2, 16)
    result = _tune(q, t, [SMALL])
    assert result.best.config == SMALL  # 2x2 tiles "time" 4 against the default's 16
    data = json.loads(private_cache.read_text())
    entry = data["devices"][autotune.device_key(q.device)]["mutual"]
    assert list(entry) == [atm.mutual_problem(q.shape, 3, 2, 1, q.dtype, False)] and entry[next(iter(entry))]["config"] == SMALL

    autotune.forget()  # a new process: reads the file
    assert atm.mutual_config(q, 3, 2, 1, False) == SMALL
    assert atm.mutual_config(q, 3, 3, 1, False) == atm.mutual_default(8, 8, 3, 2, 16, q.dtype)  # other windows: not tuned
    assert default != SMALL
    # the tuned launch still matches the reference
    fore, back = hk.mutual_match(atm_to_nchw(q), atm_to_nchw(t), 5, 3, backend="triton")
    ref_fore, ref_back = reference.mutual_match(atm_to_nchw(q).cpu(), atm_to_nchw(t).cpu(), 5, 3)
    assert_matches(fore.cpu(), ref_fore, 16)
    assert_matches(back.cpu(), ref_back, 16)


def atm_to_nchw(x):
    return x.permute(0, 3, 1, 2).contiguous()


def test_nearby_sizes_share_an_entry():
    q, t = _problem(batch=3, templates=5)
    assert atm.mutual_problem(q.shape, 5, 2, 1, q.dtype, False) == atm.mutual_problem((4, 8, 8, 16), 8, 2, 1, q.dtype, False)


def test_a_config_with_a_wrong_result_is_never_chosen(private_cache):
    calls = {"n": 0}

    def run(config):
        calls["n"] += 1
        return (torch.zeros(3) if config["name"] != "broken" else torch.ones(3),)

    def timer(fn):
        fn()
        return 0.1 if calls["n"] % 2 else 5.0

    result = autotune.tune("demo", "p", torch.device("cpu"), [{"name": "broken"}, {"name": "crash"}],
                           {"name": "default"}, lambda c: (_ for _ in ()).throw(RuntimeError("out of resources"))
                           if c["name"] == "crash" else run(c), lambda a, b: torch.equal(a[0], b[0]), timer=timer)
    assert [t.error for t in result.trials] == ["result differs from the default config's",
                                                "RuntimeError: out of resources"]
    assert result.best.config == {"name": "default"}


def test_corrupt_cache_warns_and_falls_back(private_cache):
    q, t = _problem()
    private_cache.parent.mkdir(parents=True)
    private_cache.write_text("{ half a json")
    with pytest.warns(RuntimeWarning, match="ignoring the tuning cache"):
        assert atm.mutual_config(q, 3, 2, 1, False) == atm.mutual_default(8, 8, 2, 2, 16, q.dtype)
    fore, _ = hk.mutual_match(atm_to_nchw(q), atm_to_nchw(t), 5, 3, backend="triton")  # still runs
    assert fore.shape == (2, 8, 8)
    with pytest.warns(RuntimeWarning, match="ignoring the tuning cache"):
        _tune(q, t, [SMALL])  # tuning replaces the corrupt file with a valid one
    assert json.loads(private_cache.read_text())["format"] == autotune.FORMAT


@pytest.mark.parametrize("content", [
    {"format": "something-else/9", "devices": {}},
    ["not", "a", "dict"],
])
def test_foreign_cache_file_is_ignored(private_cache, content):
    q, _ = _problem()
    private_cache.parent.mkdir(parents=True)
    private_cache.write_text(json.dumps(content))
    with pytest.warns(RuntimeWarning, match="ignoring the tuning cache"):
        assert atm.mutual_config(q, 3, 2, 1, False) == atm.mutual_default(8, 8, 2, 2, 16, q.dtype)


def test_other_gpus_and_invalid_entries_are_not_used(private_cache):
    q, _ = _problem()
    problem = atm.mutual_problem(q.shape, 3, 2, 1, q.dtype, False)
    devices = {
        "NVIDIA H200|sm_90|triton-3.6.0": {"mutual": {problem: {"config": SMALL, "ms": 0.1}}},  # another GPU
        autotune.device_key(q.device): {"mutual": {problem: {"config": dict(SMALL, TILE_H=3), "ms": 0.1}}},
    }
    private_cache.parent.mkdir(parents=True)
    private_cache.write_text(json.dumps({"format": autotune.FORMAT, "devices": devices}))
    with pytest.warns(RuntimeWarning, match="not a valid config"):
        assert atm.mutual_config(q, 3, 2, 1, False) == atm.mutual_default(8, 8, 2, 2, 16, q.dtype)
    _tune(q, t=_problem()[1], space=[SMALL])  # tuning here keeps the other GPU's entries
    kept = json.loads(private_cache.read_text())["devices"]
    assert kept["NVIDIA H200|sm_90|triton-3.6.0"]["mutual"][problem]["config"] == SMALL


def test_lookups_can_be_switched_off(private_cache, monkeypatch):
    q, t = _problem()
    _tune(q, t, [SMALL])
    autotune.forget()
    monkeypatch.setenv("HETMM_AUTOTUNE", "0")
    assert atm.mutual_config(q, 3, 2, 1, False) == atm.mutual_default(8, 8, 2, 2, 16, q.dtype)


def test_default_cache_path_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.delenv("HETMM_TUNE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert autotune.cache_path() == tmp_path / "hetmm" / "triton-tuning.json"


def test_window_max_tuning_round_trip(private_cache):
    x, y = _problem()
    result = atm.tune_window(x, y, 2, space=[SMALL], timer=lambda fn: (fn(), 1.0)[1])
    assert result.default.ms == 1.0 and result.best.config == result.default.config  # ties keep the default
    autotune.forget()
    assert atm.window_config(x, 3, 2) == result.default.config


def test_cli_dry_run_prints_the_space(capsys):
    assert main(["tune", "--dry-run", "--backbone", "resnet18", "--image-size", "32", "--batch-sizes", "1", "4",
                 "--max-configs", "5", "--params", "L1:5x3_a=0.5_l=1|L2:0x0_a=0.5_l=1|L3:3x3_a=0.5_l=1"]) == 0
    out = capsys.readouterr().out
    assert out.count("configs to try (fastest predicted first):") == 4  # two layers (layer2 skipped) x two batches
    assert out.count("aggregate batch") == 2
    assert "mutual layer1 batch 4: [8x8x64], windows 5x3" in out and "default BLOCK_C=" in out
    # the traffic model's prediction for the default and for every config of the space
    assert out.count("    model: ") == 4 and out.count("ms predicted") >= 4
    assert not os.path.exists(os.environ["HETMM_TUNE_CACHE"])  # a dry run writes nothing


def test_cli_tune_writes_the_cache(private_cache, capsys):
    assert main(["tune", "--backbone", "resnet18", "--image-size", "32", "--out-size", "16", "--batch-sizes", "2",
                 "--templates", "2", "--max-configs", "1", "--params", "L1:5x3_a=0.5_l=1|L2:0x0_a=0.5_l=1|L3:0x0_a=0.5_l=1"]) == 0
    out = capsys.readouterr().out
    assert "best" in out and "default" in out
    stored = json.loads(private_cache.read_text())["devices"][autotune.device_key(device_for("triton"))]
    assert len(stored["mutual"]) == 1 and len(stored["aggregate"]) == 1


def _constant_timer(fn):
    fn()
    return 1.0


def test_the_other_kernels_tune_and_keep_their_results(private_cache):
    from hetmm_kernels.triton_ops import aggregate, global_match, pts, retrieval

    device = device_for("triton")
    g = torch.Generator().manual_seed(0)
    fores = [torch.rand(2, s, s, generator=g).to(device) for s in (8, 4)]
    backs = [torch.rand(2, s, s, generator=g).to(device) for s in (8, 4)]
    result = aggregate.tune(fores, backs, [0.5, 0.5], [1.0, 0.5], (16, 16), space=[dict(
        BLOCK_H=16, BLOCK_W=16, num_warps=2, num_stages=2)], timer=_constant_timer)
    assert not [t.error for t in result.trials if t.error]

    hist = torch.rand(3, 25, 13, generator=g).softmax(-1).to(device)
    counts = torch.randint(0, 10, (40, 25, 13), generator=g, dtype=torch.uint8).to(device)
    result = retrieval.tune_topk(hist, counts, 9, 4, space=[dict(BLOCK_Q=2, BLOCK_R=16, num_warps=2)],
                                 timer=_constant_timer)
    assert not [t.error for t in result.trials if t.error]

    feats = features(1, 16, 10, 10, device=device)
    centers = torch.randn(4, 16, generator=g).to(device)
    result = retrieval.tune_histograms(feats, centers, space=[dict(BLOCK_C=16, num_warps=2)], timer=_constant_timer)
    assert not [t.error for t in result.trials if t.error]

    temp = features(5, 8, 2, 2, device=device)
    clus = torch.tensor([0, 0, 1, 1, -1]).view(5, 1, 1).expand(5, 2, 2).contiguous().to(device)
    result = pts.tune(temp, clus, 3, timer=_constant_timer)
    assert len(result.trials) == 3 and not [t.error for t in result.trials if t.error]

    query, rows = features(2, 16, 4, 4, device=device), features(40, 16, 1, 1, device=device)[:, :, 0, 0].contiguous()
    result = global_match.tune(query, rows, space=[dict(BLOCK_M=32, BLOCK_N=16, BLOCK_K=16, num_warps=2, num_stages=2)],
                               timer=_constant_timer)
    assert len(result.trials) == 1 and not [t.error for t in result.trials if t.error]

    stored = json.loads(private_cache.read_text())["devices"][autotune.device_key(device)]
    assert set(stored) == {"aggregate", "retrieve_topk", "block_histograms", "pts", "global_match"}


def test_cli_tune_with_a_coreset(private_cache, capsys):
    assert main(["tune", "--backbone", "resnet18", "--image-size", "32", "--out-size", "16", "--batch-sizes", "2",
                 "--templates", "4", "--max-configs", "1",
                 "--params", "L1:5x3_a=0.5_l=1_c=25|L2:0x0_a=0.5_l=1|L3:0x0_a=0.5_l=1"]) == 0
    assert "global_match layer1 batch 2: 64 coreset pixels (25%)" in capsys.readouterr().out
    stored = json.loads(private_cache.read_text())["devices"][autotune.device_key(device_for("triton"))]
    assert len(stored["global_match"]) == 1


def test_cli_tune_with_retrieval(private_cache, capsys):
    assert main(["tune", "--backbone", "resnet18", "--image-size", "32", "--out-size", "16", "--batch-sizes", "2",
                 "--templates", "5", "--retrieval-k", "2", "--max-configs", "1",
                 "--params", "L1:5x3_a=0.5_l=1|L2:0x0_a=0.5_l=1|L3:0x0_a=0.5_l=1"]) == 0
    assert "retrieve_topk batch 2: top 2 of 5" in capsys.readouterr().out
    stored = json.loads(private_cache.read_text())["devices"][autotune.device_key(device_for("triton"))]
    assert next(iter(stored["mutual"])).endswith("indexed=1") and len(stored["retrieve_topk"]) == 1


def test_misshapen_entries_are_ignored(private_cache):
    q, _ = _problem()
    problem = atm.mutual_problem(q.shape, 3, 2, 1, q.dtype, False)
    device = autotune.device_key(q.device)
    default = atm.mutual_default(8, 8, 2, 2, 16, q.dtype)
    for devices in ({device: "oops"}, {device: {"mutual": ["x"]}}, {device: {"mutual": {problem: 3}}}):
        private_cache.parent.mkdir(parents=True, exist_ok=True)
        private_cache.write_text(json.dumps({"format": autotune.FORMAT, "devices": devices}))
        autotune.forget()
        assert atm.mutual_config(q, 3, 2, 1, False) == default
