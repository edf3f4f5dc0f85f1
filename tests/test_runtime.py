"""Profiles, device/precision choice and seeding."""
import random

import numpy as np
import pytest
import torch

from course_utils import runtime


@pytest.mark.parametrize("profile", ["smoke", "cpu", "gpu"])
def test_by_profile_picks_the_active_one(monkeypatch, profile):
    monkeypatch.setenv("COURSE_PROFILE", profile)
    assert runtime.by_profile(smoke=1, cpu=2, gpu=3) == {"smoke": 1, "cpu": 2, "gpu": 3}[profile]


def test_default_profile_follows_cuda(monkeypatch):
    monkeypatch.delenv("COURSE_PROFILE", raising=False)
    assert runtime.get_profile() == ("gpu" if torch.cuda.is_available() else "cpu")


def test_bad_profile_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("COURSE_PROFILE", "huge")
    with pytest.raises(ValueError, match="smoke, cpu, gpu"):
        runtime.get_profile()


@pytest.mark.parametrize("capability, expected", [((7, 5), "fp16"), ((8, 0), "bf16"), ((9, 0), "bf16")])
def test_precision_by_compute_capability(monkeypatch, capability, expected):
    # A T4 (7.5) claims bf16 support but emulates it: it must get fp16 with a GradScaler.
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert runtime.get_precision(torch.device("cuda")) == expected


def test_cpu_is_fp32_without_autocast():
    assert runtime.get_precision(torch.device("cpu")) == "fp32"
    assert not runtime.grad_scaler(torch.device("cpu")).is_enabled()


def test_seeding_is_reproducible():
    g1 = runtime.seed_everything(3)
    a = (random.random(), np.random.rand(), torch.rand(1).item(), torch.rand(1, generator=g1).item())
    g2 = runtime.seed_everything(3)
    b = (random.random(), np.random.rand(), torch.rand(1).item(), torch.rand(1, generator=g2).item())
    assert a == b


def test_cache_dir_is_overridable(monkeypatch, tmp_path):
    monkeypatch.setenv("COURSE_CACHE", str(tmp_path / "c"))
    assert runtime.cache_dir("models") == tmp_path / "c" / "models"
    assert (tmp_path / "c" / "models").is_dir()


def test_setup_prints_device_and_profile(capsys, monkeypatch):
    monkeypatch.setenv("COURSE_PROFILE", "smoke")
    runtime.setup(seed=0)
    out = capsys.readouterr().out
    assert "profile=smoke" in out and "device=" in out and "torch" in out


def test_one_cpu_thread_restores_the_thread_count():
    before = torch.get_num_threads()
    with runtime.one_cpu_thread("cpu"):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with runtime.one_cpu_thread("cuda"):  # a no-op off the CPU
        assert torch.get_num_threads() == before


def test_alternating_seconds_alternates_the_order_and_skips_the_warm_up():
    from course_utils.runtime import alternating_seconds

    calls = []
    out = alternating_seconds({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, rounds=3)
    assert calls == ["b", "a", "a", "b", "b", "a", "a", "b"]  # round 0 (warm-up) reversed, then alternating
    assert set(out) == {"a", "b"} and all(len(v) == 3 and min(v) >= 0 for v in out.values())
    with pytest.raises(ValueError, match="rounds must be at least 1"):
        alternating_seconds({"a": lambda: None}, rounds=0)
