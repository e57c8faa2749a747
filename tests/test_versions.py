"""Store versions and integrity (issue 16): manifests, tags, history, gc, and load() refusing a
folder that differs from its manifest. Tiny random models; the store lives in a temporary
MINILM_EDGE_HOME, never in ~/.cache/minilm_edge."""
import io
import json
import os
import shutil
from pathlib import Path

import pytest

import minilm_edge
from minilm_edge.app import store
from minilm_edge.app.cli import main
from minilm_edge.errors import IntegrityError
from minilm_edge.formats import manifest
from tinymodel import make_model_dir

QUANTIZABLE = dict(hidden_size=64, intermediate_size=96)


@pytest.fixture
def home(tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("MINILM_EDGE_HOME", str(home))
    return home


def run(argv, capsys, monkeypatch, stdin=""):
    monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def flip_byte(path, offset=-100):
    """Change one byte in place (same size): what a bit rot or a crafty edit does."""
    os.chmod(path, 0o644)
    with open(path, "r+b") as f:
        f.seek(offset, os.SEEK_END)
        b = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([b[0] ^ 0x01]))


@pytest.fixture
def with_manifest(tmp_path):
    folder, _, _ = make_model_dir(tmp_path / "m")
    digest = manifest.write_manifest(folder, {"kind": "test"}, manifest.provenance(source="tinymodel"))
    return folder, digest


# --- the manifest ------------------------------------------------------------------------------
def test_manifest_lists_every_file_with_size_and_sha256(with_manifest):
    folder, digest = with_manifest
    m = manifest.read_manifest(folder)
    assert [f["path"] for f in m["files"]] == sorted(p.name for p in folder.iterdir() if p.name != "manifest.json")
    for f in m["files"]:
        assert f["size"] == (folder / f["path"]).stat().st_size
        assert f["sha256"] == manifest.file_sha256(folder / f["path"])
    assert manifest.manifest_digest(folder) == digest
    prov = m["provenance"]
    assert {"tool", "date", "user", "host", "source"} <= set(prov) and prov["tool"].endswith(minilm_edge.__version__)
    assert manifest.check_folder(folder, full=True) == m


@pytest.mark.parametrize("damage, words", [
    (lambda f: flip_byte(f / "model.safetensors"), "model.safetensors: sha256 differs"),
    (lambda f: os.truncate(f / "model.safetensors", 1000), "model.safetensors: 1000 bytes"),
    (lambda f: (f / "tokenizer.json").unlink(), "tokenizer.json: missing"),
    (lambda f: (f / "extra.safetensors").write_bytes(b"x"), "extra.safetensors: a foreign file"),
    (lambda f: (f / "manifest.json").write_text("{"), "manifest.json: not a readable manifest"),
])
def test_a_damaged_folder_is_refused_naming_the_file(with_manifest, damage, words):
    folder, _ = with_manifest
    minilm_edge.load(folder)
    damage(folder)
    with pytest.raises(IntegrityError, match=words) as e:
        minilm_edge.load(folder)
    assert "\n" not in str(e.value)


def test_a_folder_without_manifest_loads_and_inspect_says_so(tiny_model_dir, capsys, monkeypatch):
    assert minilm_edge.load(tiny_model_dir).config.num_hidden_layers > 0
    code, out, _ = run(["inspect", str(tiny_model_dir)], capsys, monkeypatch)
    assert code == 0 and "no manifest (plain Hugging Face folder)" in out


def test_inspect_shows_the_manifest_digest(with_manifest, capsys, monkeypatch):
    folder, digest = with_manifest
    code, out, _ = run(["inspect", str(folder)], capsys, monkeypatch)
    files = len(manifest.read_manifest(folder)["files"])
    assert code == 0 and f"manifest       sha256:{digest[:12]}, {files} files; made by minilm_edge" in out


def test_in_the_store_a_changed_byte_is_found_after_a_cached_check(home, tmp_path):
    # In the store, a check records what it saw, and the next load hashes only what changed since:
    # flipping a byte in place changes the file's ctime, so the file is hashed again and refused.
    src, _, _ = make_model_dir(tmp_path / "src")
    folder = home / "versions" / "x"
    shutil.copytree(src, folder)
    manifest.write_manifest(folder, {"kind": "test"}, {})
    minilm_edge.load(folder)
    stamp = manifest.stamp_path(folder)
    assert stamp is not None and stamp.is_file() and stamp.parent == home.resolve() / "verified"
    minilm_edge.load(folder)                              # from the stamp: nothing hashed
    flip_byte(folder / "model.safetensors")
    with pytest.raises(IntegrityError, match="sha256 differs"):
        minilm_edge.load(folder)
    assert manifest.stamp_path(src) is None               # outside the store: hashed every time


def test_quantize_and_import_write_a_manifest(tmp_path):
    src, _, _ = make_model_dir(tmp_path / "src", **QUANTIZABLE)
    out = minilm_edge.quantize(src, tmp_path / "q", method="rtn", group_size=64, progress=False)
    m = manifest.check_folder(out, full=True)
    assert m["recipe"]["kind"] == "quantize" and m["recipe"]["settings"]["group_size"] == 64
    assert m["recipe"]["source_weights_sha256"] == m["provenance"]["source"]["weights_sha256"]


# --- chat refuses a tampered model: exit 1, one line --------------------------------------------
def test_chat_refuses_a_tampered_model_with_one_line(with_manifest, capsys, monkeypatch):
    folder, _ = with_manifest
    flip_byte(folder / "model.safetensors")
    code, out, err = run(["chat", str(folder)], capsys, monkeypatch, "hello\n")
    assert code == 1 and out == ""
    assert len(err.strip().splitlines()) == 1 and "model.safetensors" in err and "sha256 differs" in err


# --- versions, tags, history, gc ---------------------------------------------------------------
class FakeHub:
    def __init__(self, source):
        self.source, self.calls = source, []

    def __call__(self, repo_id, dest):
        self.calls.append(repo_id)
        shutil.copytree(self.source, dest)


@pytest.fixture
def prepared(home, tmp_path, monkeypatch):
    """A known tiny base (from a fake Hub) and a prepared RTN model of it; returns (hub, set recipe)."""
    src, _, _ = make_model_dir(tmp_path / "tiny", **QUANTIZABLE)
    hub = FakeHub(src)
    monkeypatch.setitem(store.KNOWN_MODELS, "tiny-base", store.KnownModel(repo="test/tiny-base"))
    monkeypatch.setattr(store, "fetch_from_hub", lambda repo, dest, progress=True: hub(repo, dest))

    def set_recipe(group_size):
        monkeypatch.setitem(store.PREPARED_MODELS, "tiny-q", store.PreparedModel(
            base="tiny-base", quantize={"method": "rtn", "bits": 4, "group_size": group_size}))

    set_recipe(64)
    return hub, set_recipe


def latest(name="tiny-q"):
    return store.read_tag(name, "latest")["digest"]


def test_two_recipes_two_versions_latest_moves_rollback_and_gc(prepared, home, capsys, monkeypatch):
    hub, set_recipe = prepared
    first = store.resolve_model("tiny-q", progress=False)
    assert first.parent == home / "versions" and first.name == latest()
    assert store.resolve_model("tiny-q", progress=False) == first and hub.calls == ["test/tiny-base"]  # reused
    assert (os.stat(first / "model.safetensors").st_mode & 0o222) == 0          # read-only files

    set_recipe(32)                                                   # the recipe changed: a new version
    second = store.resolve_model("tiny-q", progress=False)
    assert second != first and second.name == latest() and first.is_dir()
    assert manifest.read_manifest(second)["recipe"]["quantize"]["group_size"] == 32
    moves = [(e["old"], e["new"], e["by"]) for e in store.history("tiny-q")]
    assert moves == [(None, first.name, "pull"), (first.name, second.name, "pull")]

    # rollback: re-tag the first version; chat (resolve) keeps the hand-made tag
    code, out, _ = run(["models", "tag", f"tiny-q@{first.name[:12]}", "tiny-q:latest"], capsys, monkeypatch)
    assert code == 0 and latest() == first.name
    assert store.resolve_model("tiny-q", progress=False) == first
    code, out, _ = run(["models", "history", "tiny-q"], capsys, monkeypatch)
    assert code == 0 and len(out.strip().splitlines()) == 3 and f"{second.name[:12]} -> {first.name[:12]}" in out
    # an explicit pull wants today's recipe: back to the second version, without quantizing again
    assert store.pull("tiny-q", progress=False) == second and latest() == second.name

    # gc removes only untagged versions: tag the first, then untag it
    run(["models", "tag", f"sha256:{first.name}", "tiny-q:old"], capsys, monkeypatch)
    code, out, _ = run(["models", "gc"], capsys, monkeypatch)
    assert code == 0 and out == "" and first.is_dir() and second.is_dir()
    code, out, _ = run(["models", "rm", "tiny-q:old"], capsys, monkeypatch)
    assert code == 0 and "now untagged" in out
    code, out, _ = run(["models", "gc"], capsys, monkeypatch)
    assert code == 0 and out.split() == ["removed", first.name[:12]]
    assert not first.is_dir() and second.is_dir() and store.tagged_path("tiny-base") is not None


def test_a_new_package_version_is_a_new_recipe(prepared, monkeypatch):
    first = store.resolve_model("tiny-q", progress=False)
    monkeypatch.setattr(store, "__version__", "9.9.9")
    second = store.resolve_model("tiny-q", progress=False)
    assert second != first and manifest.read_manifest(second)["recipe"]["tool"] == "minilm_edge 9.9.9"


def test_a_changed_quantizer_is_a_new_recipe_under_the_same_version(prepared, monkeypatch):
    first = store.resolve_model("tiny-q", progress=False)
    assert store.resolve_model("tiny-q", progress=False) == first              # same code: reused
    monkeypatch.setattr("minilm_edge.quant.quantize.quantizer_code_digest", lambda root=None: "sha256:changed")
    second = store.resolve_model("tiny-q", progress=False)
    assert second != first and manifest.read_manifest(second)["recipe"]["code"] == "sha256:changed"
    assert json.loads((second / "config.json").read_text())["quantization_config"]["code"] == "sha256:changed"


def test_the_quantizer_digest_follows_its_source_files(tmp_path):
    from minilm_edge.quant.quantize import quantizer_code_digest
    pkg = Path(minilm_edge.__file__).parent
    copy = tmp_path / "minilm_edge"
    shutil.copytree(pkg, copy, ignore=shutil.ignore_patterns("__pycache__"))
    assert quantizer_code_digest(copy) == quantizer_code_digest()
    (copy / "runtime" / "model.py").write_text("# not the quantizer\n", encoding="utf-8")
    assert quantizer_code_digest(copy) == quantizer_code_digest()
    awq = copy / "quant" / "awq.py"
    awq.write_text(awq.read_text(encoding="utf-8") + "\n# changed\n", encoding="utf-8")
    assert quantizer_code_digest(copy) != quantizer_code_digest()


def test_a_plain_prepared_folder_made_by_todays_recipe_is_adopted(prepared, home, monkeypatch):
    # A store from before versions: models/<base> and models/<prepared> as plain folders.
    hub, _ = prepared
    base = home / "models" / "tiny-base"
    shutil.copytree(hub.source, base)
    spec = store.PREPARED_MODELS["tiny-q"]
    minilm_edge.quantize(base, home / "models" / "tiny-q", progress=False, **spec.quantize)
    (home / "models" / "tiny-q" / "manifest.json").unlink()           # as old code wrote it

    def no_quantize(*a, **k):
        raise AssertionError("quantized again although the plain folder has today's recipe")

    monkeypatch.setattr("minilm_edge.quant.quantize.quantize", no_quantize)
    path = store.resolve_model("tiny-q", progress=False)
    assert path.parent == home / "versions" and hub.calls == []
    prov = manifest.read_manifest(path)["provenance"]
    assert prov["adopted_from"] == str(home / "models" / "tiny-q") and prov["source"]["weights_sha256"]
    assert prov["source"]["manifest_sha256"] == store.tagged_path("tiny-base").name
    assert manifest.check_folder(path, full=True)["recipe"] == store.prepared_recipe(
        spec, manifest.read_manifest(store.tagged_path("tiny-base")))


def test_models_cli_list_show_verify(prepared, capsys, monkeypatch):
    path = store.resolve_model("tiny-q", progress=False)
    code, out, _ = run(["models", "list"], capsys, monkeypatch)
    assert code == 0 and "tiny-q:latest" in out and "tiny-base:latest" in out and path.name[:12] in out
    code, out, _ = run(["models", "show", "tiny-q", "--json"], capsys, monkeypatch)
    info = json.loads(out)
    assert code == 0 and info["digest"] == path.name and info["tags"] == ["tiny-q:latest"]
    assert info["provenance"]["calibration"] == "none (rtn)" and info["recipe"]["base"] == "tiny-base"
    code, out, _ = run(["models", "verify", "tiny-q:latest"], capsys, monkeypatch)
    assert code == 0 and out.startswith("manifest: OK")
    flip_byte(path / "model.safetensors")
    code, out, err = run(["models", "verify", "tiny-q"], capsys, monkeypatch)
    assert code == 1 and len(err.strip().splitlines()) == 1 and "model.safetensors: sha256 differs" in err


@pytest.mark.parametrize("argv, code, words", [
    (["models", "tag", "nothing-here", "x:y"], 1, "no nothing-here:latest"),
    (["models", "tag", "sha256:abcdef", "x:y"], 1, "no stored version"),
    (["models", "rm", "nothing:here"], 1, "no tag nothing:here"),
    (["models", "show", "bad name!"], 2, "not a model reference"),
    (["models", "history", "nothing"], 1, "no history"),
    (["chat", "tiny-q:nosuchtag"], 1, "not an existing folder"),
])
def test_models_cli_errors_are_one_line(home, capsys, monkeypatch, argv, code, words):
    got, out, err = run(argv, capsys, monkeypatch)
    assert got == code and len(err.strip().splitlines()) == 1 and words in err, err


def test_without_its_base_the_prepared_model_is_used_not_pulled_again(prepared):
    # An edge box may keep only the quantized model: `models rm` of the base, then `gc`.
    hub, _ = prepared
    path = store.resolve_model("tiny-q", progress=False)
    base = store.remove_tag("tiny-base", "latest")
    assert store.collect_garbage() == [base] and hub.calls == ["test/tiny-base"]
    assert store.resolve_model("tiny-q", progress=False) == path and hub.calls == ["test/tiny-base"]


def test_an_untagged_version_is_tagged_again_instead_of_fetched(prepared):
    hub, _ = prepared
    first = store.pull("tiny-base", progress=False)
    store.remove_tag("tiny-base", "latest")
    assert store.pull("tiny-base", progress=False) == first and hub.calls == ["test/tiny-base"]
    assert [e["by"] for e in store.history("tiny-base")] == ["pull", "rm", "pull"]


def test_a_hub_pull_records_the_commit_it_came_from(home, tmp_path, monkeypatch):
    import socket

    from huggingface_hub import constants
    src, _, _ = make_model_dir(tmp_path / "tiny")
    commit = "0123456789abcdef0123456789abcdef01234567"

    def snapshot_download(repo_id, local_dir, **kwargs):    # what huggingface_hub leaves in local_dir
        shutil.copytree(src, local_dir)
        meta = os.path.join(local_dir, ".cache", "huggingface", "download")
        os.makedirs(meta)
        for name in os.listdir(src):
            with open(os.path.join(meta, name + ".metadata"), "w") as f:
                f.write(f"{commit}\n\"etag\"\n1.0\n")

    for var in ("https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr("huggingface_hub.snapshot_download", snapshot_download)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{s.getsockname()[1]}")
        path = store.pull("someone/tiny", progress=False)
    prov = manifest.check_folder(path, full=True)["provenance"]
    assert prov["source"] == {"hub": "someone/tiny", "revision": commit} and not (path / ".cache").exists()
