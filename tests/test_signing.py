"""Model signatures (OpenSSF model-signing) and the store's trust policy.

Interoperability is checked against the `model_signing` tool itself (a subprocess): it verifies our
signatures, and we verify its. Keys are fresh P-256 pairs made by each test.
"""
import io
import json
import os
import shutil
import stat
import subprocess
import sys

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

import minilm_edge
from minilm_edge.app.cli import main
from minilm_edge.errors import TrustError
from minilm_edge.formats import trust
from minilm_edge.formats.manifest import provenance, write_manifest
from tinymodel import make_model_dir


def make_key_pair(folder, name):
    """(private.pem mode 0600, public.pub) of a fresh P-256 key."""
    key = ec.generate_private_key(ec.SECP256R1())
    priv, pub = folder / f"{name}.pem", folder / f"{name}.pub"
    priv.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    priv.chmod(0o600)
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo))
    return priv, pub


def model_signing_tool(*args):
    """Run the model_signing command-line tool (of the model-signing package); (exit code, output)."""
    r = subprocess.run([sys.executable, "-m", "model_signing", *map(str, args)], capture_output=True, text=True,
                       timeout=300)
    return r.returncode, r.stdout + r.stderr


def run(argv, capsys, monkeypatch, stdin=""):
    monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def keys(tmp_path):
    d = tmp_path / "keys"
    d.mkdir()
    return {name: make_key_pair(d, name) for name in ("plant-a", "plant-b")}


@pytest.fixture
def home(tmp_path, monkeypatch):
    """An empty store home (0755) that default_home() returns."""
    h = tmp_path / "home"
    trust.make_store_dir(h)
    monkeypatch.setenv("MINILM_EDGE_HOME", str(h))
    return h


@pytest.fixture
def model(tmp_path):
    path, _, _ = make_model_dir(tmp_path / "tiny", seed=3)
    write_manifest(path, {"test": "signing"}, provenance())   # signed after the manifest, as in the store
    return path


def require_signatures(home, *public_keys):
    trust.write_policy(trust.Policy(True, public_keys, trust.policy_path(home)), home)


# ---- interoperability with the model_signing tool ------------------------------------------------

def test_our_signature_verifies_with_the_model_signing_tool(model, keys):
    priv, pub = keys["plant-a"]
    sig = trust.sign_folder(model, priv)
    assert sig == model / "model.sig"
    code, out = model_signing_tool("verify", "key", model, "--public_key", pub, "--signature", sig)
    assert code == 0, out
    assert "Verification succeeded" in out
    # and the tool refuses it with the other key, so the check above can fail
    code, out = model_signing_tool("verify", "key", model, "--public_key", keys["plant-b"][1], "--signature", sig)
    assert code != 0, out


def test_the_model_signing_tools_signature_verifies_with_ours(model, keys):
    priv, pub = keys["plant-b"]
    code, out = model_signing_tool("sign", "key", model, "--private_key", priv, "--signature", model / "model.sig")
    assert code == 0, out
    info = trust.verify_signature(model, [keys["plant-a"][1], pub])
    assert info.key == pub
    with pytest.raises(TrustError, match="does not verify with"):
        trust.verify_signature(model, [keys["plant-a"][1]])


def test_the_signature_covers_every_file_including_the_manifest(model, keys):
    priv, pub = keys["plant-a"]
    trust.sign_folder(model, priv)
    names = {r["name"] for r in trust.signed_statement(model / "model.sig")["predicate"]["resources"]}
    assert names == {p.name for p in model.iterdir()} - {"model.sig"}
    assert "manifest.json" in names and "model.safetensors" in names


# ---- tampering, untrusted keys, partial signatures ------------------------------------------------

@pytest.mark.parametrize("tamper", ["flip a weight byte", "edit the manifest", "add a file", "remove a file"])
def test_tampered_model_is_refused_by_us_and_the_tool(model, keys, tamper):
    priv, pub = keys["plant-a"]
    trust.sign_folder(model, priv)
    trust.verify_signature(model, [pub])                 # fine before
    if tamper == "flip a weight byte":
        w = model / "model.safetensors"
        data = bytearray(w.read_bytes())
        data[-1] ^= 1
        w.write_bytes(bytes(data))
    elif tamper == "edit the manifest":
        (model / "manifest.json").write_text((model / "manifest.json").read_text().replace("signing", "other"))
    elif tamper == "add a file":
        (model / "extra.safetensors").write_bytes(b"\0" * 8)
    else:
        (model / "generation_config.json").unlink()
    with pytest.raises(TrustError, match="files changed since signing") as e:
        trust.verify_signature(model, [pub])
    assert "\n" not in str(e.value)
    code, out = model_signing_tool("verify", "key", model, "--public_key", pub, "--signature", model / "model.sig")
    assert code != 0, out


def test_signature_that_leaves_out_the_weights_is_refused(model, keys):
    priv, pub = keys["plant-a"]
    code, out = model_signing_tool("sign", "key", model, "--private_key", priv, "--signature", model / "model.sig",
                                   "--ignore-paths", model / "model.safetensors")
    assert code == 0, out
    code, out = model_signing_tool("verify", "key", model, "--public_key", pub, "--signature", model / "model.sig")
    assert code == 0, out                               # the tool accepts it: the signer chose to leave it out
    with pytest.raises(TrustError, match="leaves out model.safetensors"):
        trust.verify_signature(model, [pub])


def test_unsigned_and_garbage_signatures_are_refused(model, keys):
    pub = keys["plant-a"][1]
    with pytest.raises(TrustError, match="unsigned model"):
        trust.verify_signature(model, [pub])
    (model / "model.sig").write_text("not a bundle")
    with pytest.raises(TrustError, match="does not verify"):
        trust.verify_signature(model, [pub])


def test_private_key_readable_by_others_is_refused(model, keys):
    priv, _ = keys["plant-a"]
    priv.chmod(0o644)
    with pytest.raises(TrustError, match="chmod 600"):
        trust.sign_folder(model, priv)
    assert not (model / "model.sig").exists()


@pytest.mark.parametrize("folder_mode", [0o755, 0o555])
def test_signing_a_sealed_version_adds_only_the_signature(model, keys, folder_mode):
    priv, pub = keys["plant-a"]
    trust.seal_version(model)
    model.chmod(folder_mode)                              # 0o555: a folder sealed by hand, even against its owner
    before = {p.name: (p.read_bytes(), stat.S_IMODE(p.stat().st_mode)) for p in model.iterdir()}
    assert all(mode & 0o222 == 0 for _, mode in before.values())
    try:
        trust.sign_folder(model, priv)
        assert stat.S_IMODE(model.stat().st_mode) == folder_mode                # restored
        after = {p.name: (p.read_bytes(), stat.S_IMODE(p.stat().st_mode)) for p in model.iterdir()}
        assert after.pop("model.sig")[1] == trust.SIGNATURE_MODE
        assert after == before
        trust.verify_signature(model, [pub])
    finally:
        model.chmod(0o755)                                # let pytest clean up


# ---- the policy: load(), the CLI -----------------------------------------------------------------

def test_no_policy_unsigned_model_loads(model, home):
    assert trust.enforce_policy(model) is None
    assert minilm_edge.load(model).config is not None


def test_policy_refuses_unsigned_model_in_load_and_generate(model, home, keys, capsys, monkeypatch):
    require_signatures(home, keys["plant-a"][1])
    with pytest.raises(TrustError, match="unsigned model"):
        minilm_edge.load(model)
    code, out, err = run(["generate", str(model), "--prompt", "hi", "--max-new-tokens", "2"], capsys, monkeypatch)
    assert code == 1 and out == ""
    assert err.count("\n") == 1 and "unsigned model" in err and str(model) in err


def test_policy_refuses_model_signed_by_an_untrusted_key(model, home, keys):
    require_signatures(home, keys["plant-a"][1])
    trust.sign_folder(model, keys["plant-b"][0])
    with pytest.raises(TrustError, match="does not verify with"):
        minilm_edge.load(model)


def test_policy_loads_model_signed_by_a_trusted_key(model, home, keys, capsys, monkeypatch):
    require_signatures(home, keys["plant-b"][1], keys["plant-a"][1])
    trust.sign_folder(model, keys["plant-a"][0])
    assert trust.enforce_policy(model).key == keys["plant-a"][1]
    assert minilm_edge.load(model).config is not None
    code, out, err = run(["generate", str(model), "--prompt", "hi", "--max-new-tokens", "2"], capsys, monkeypatch)
    assert code == 0, err


def test_policy_with_require_off_lets_unsigned_models_load(model, home, keys):
    trust.write_policy(trust.Policy(False, (keys["plant-a"][1],), trust.policy_path(home)), home)
    assert trust.enforce_policy(model) is None


@pytest.mark.parametrize("target", ["policy file", "home", "trusted key"])
def test_writable_by_others_policy_home_or_key_is_refused(model, home, keys, tmp_path, target):
    require_signatures(home, keys["plant-a"][1])
    trust.sign_folder(model, keys["plant-a"][0])
    trust.enforce_policy(model)                           # fine before
    path = {"policy file": home / "policy.json", "home": home, "trusted key": keys["plant-a"][1]}[target]
    path.chmod(stat.S_IMODE(path.stat().st_mode) | stat.S_IWOTH)
    with pytest.raises(TrustError, match="writable by group or others") as e:
        trust.enforce_policy(model)
    assert str(path) in str(e.value) and "chmod go-w" in str(e.value)


def test_malformed_policy_is_refused(model, home):
    (home / "policy.json").write_text('{"require_signature": "yes"}')
    with pytest.raises(TrustError, match="expected"):
        trust.enforce_policy(model)
    (home / "policy.json").write_text('{not json')
    with pytest.raises(TrustError, match="not a readable JSON policy"):
        trust.enforce_policy(model)


def test_policy_without_the_model_signing_package_refuses_saying_what_to_install(model, home, keys, monkeypatch):
    require_signatures(home, keys["plant-a"][1])
    trust.sign_folder(model, keys["plant-a"][0])
    monkeypatch.setitem(sys.modules, "model_signing", None)     # import model_signing -> ImportError
    with pytest.raises(TrustError, match=r"pip install 'minilm_edge\[signing\]'"):
        trust.enforce_policy(model)


# ---- the command line ----------------------------------------------------------------------------

def test_help_has_examples(capsys):
    for cmd in ("sign", "verify", "trust"):
        with pytest.raises(SystemExit) as e:
            main([cmd, "--help"])
        assert e.value.code == 0
        assert "examples:" in capsys.readouterr().out, cmd


def test_cli_sign_trust_verify_round_trip(model, home, keys, capsys, monkeypatch):
    priv, pub = keys["plant-a"]
    code, out, err = run(["sign", str(model), "--key", str(priv)], capsys, monkeypatch)
    assert code == 0, err
    code, out, err = run(["verify", str(model)], capsys, monkeypatch)          # no key given, none trusted
    assert code == 0 and out.startswith("manifest: OK") and "signature: present, not checked" in out
    code, out, err = run(["trust", "require", "on"], capsys, monkeypatch)      # would lock out every model
    assert code == 2 and "trust add" in err
    assert run(["trust", "add", str(pub)], capsys, monkeypatch)[0] == 0
    stored = home / "keys" / "plant-a.pub"
    assert stat.S_IMODE(stored.stat().st_mode) == trust.STORE_FILE_MODE
    assert run(["trust", "require", "on"], capsys, monkeypatch)[0] == 0
    assert json.loads((home / "policy.json").read_text()) == {"require_signature": True,
                                                               "trusted_keys": ["keys/plant-a.pub"]}
    assert stat.S_IMODE((home / "policy.json").stat().st_mode) == trust.STORE_FILE_MODE
    code, out, err = run(["verify", str(model)], capsys, monkeypatch)
    assert code == 0 and "signature: OK" in out and str(stored) in out
    assert run(["models", "verify", str(model)], capsys, monkeypatch)[1] == out   # one verify, two spellings
    code, out, err = run(["trust", "list"], capsys, monkeypatch)
    assert "signatures required" in out and trust.key_fingerprint(pub)[:16] in out
    code, out, err = run(["verify", str(model), "--key", str(keys["plant-b"][1])], capsys, monkeypatch)
    assert code == 1 and err.count("\n") == 1 and "does not verify" in err
    assert run(["trust", "remove", "plant-a"], capsys, monkeypatch)[0] == 0
    assert not stored.exists() and trust.read_policy(home).trusted_keys == ()


def test_cli_errors_are_one_line(model, home, keys, tmp_path, capsys, monkeypatch):
    priv, pub = keys["plant-a"]
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a key")
    garbage.chmod(0o600)
    cases = [
        (["sign", str(model), "--key", str(tmp_path / "missing.pem")], 1, "cannot read"),
        (["sign", str(model), "--key", str(pub)], 1, "a public key; signing needs the private key"),
        (["sign", str(model), "--key", str(garbage)], 1, "cannot sign"),
        (["trust", "add", str(priv)], 1, "not a readable PEM public key"),          # a private key
        (["trust", "remove", "nobody"], 2, "no trusted key"),
        (["trust", "require", "maybe"], 2, "invalid choice"),
        (["verify", str(model), "--key", str(pub)], 1, "unsigned model"),
    ]
    for argv, want_code, pattern in cases:
        code, out, err = run(argv, capsys, monkeypatch)
        assert (code, err.count("\n")) == (want_code, 1), (argv, err)
        assert pattern in err, (argv, err)
        assert "Traceback" not in err


@pytest.mark.parametrize("umask", [0o000, 0o022, 0o077])
def test_store_folders_and_files_are_created_owner_writable_only(tmp_path, keys, umask):
    old = os.umask(umask)                                 # a loose umask must not make a loose store
    try:
        d = trust.make_store_dir(tmp_path / "a" / "b")
        trust.write_policy(trust.Policy(True, (keys["plant-a"][1],), None), d)
    finally:
        os.umask(old)
    for folder in (tmp_path / "a", d):
        assert stat.S_IMODE(folder.stat().st_mode) == trust.STORE_DIR_MODE & ~umask, folder
    assert stat.S_IMODE((d / "policy.json").stat().st_mode) == trust.STORE_FILE_MODE & ~umask
    assert [p.name for p in d.iterdir()] == ["policy.json"]            # no temporary file left


def test_pulled_version_is_sealed_signable_and_loads_under_policy(tmp_path, home, keys):
    from minilm_edge.app.store import pull
    source, _, _ = make_model_dir(tmp_path / "hub-copy", seed=5)
    fake_hub = lambda repo_id, dest: shutil.copytree(source, dest)   # noqa: E731
    old = os.umask(0)                                      # the loosest umask
    try:
        version = pull("someone/tiny-llama", home=home, progress=False, fetch_hub=fake_hub)
    finally:
        os.umask(old)
    everything = [home, *home.rglob("*")]
    loose = [p for p in everything if stat.S_IMODE(p.stat().st_mode) & 0o022]
    assert loose == [], loose                              # nothing writable by group or others
    assert all(stat.S_IMODE(p.stat().st_mode) & 0o222 == 0 for p in version.rglob("*") if p.is_file())
    require_signatures(home, keys["plant-a"][1])
    with pytest.raises(TrustError, match="unsigned model"):
        minilm_edge.load(version)
    trust.sign_folder(version, keys["plant-a"][0])         # added next to the read-only files
    assert minilm_edge.load(version).config is not None


def test_cli_verify_reports_manifest_and_signature(model, home, keys, tmp_path, capsys, monkeypatch):
    priv, pub = keys["plant-a"]
    code, out, err = run(["verify", str(model)], capsys, monkeypatch)          # unsigned, no policy: reported
    assert code == 0 and out.splitlines()[1].startswith("signature: none")
    require_signatures(home, pub)
    code, out, err = run(["verify", str(model)], capsys, monkeypatch)          # unsigned under a policy: refused
    assert code == 1 and out.startswith("manifest: OK") and "unsigned model" in err
    trust.sign_folder(model, priv)
    code, out, err = run(["verify", str(model)], capsys, monkeypatch)
    assert code == 0 and out.splitlines()[1].startswith("signature: OK"), err
    data = bytearray((model / "config.json").read_bytes())
    data[0] ^= 1
    (model / "config.json").write_bytes(bytes(data))
    code, out, err = run(["verify", str(model)], capsys, monkeypatch)          # the manifest finds it first
    assert code == 1 and err.count("\n") == 1 and "config.json: sha256 differs" in err
    plain = tmp_path / "plain"
    plain.mkdir()
    code, out, err = run(["verify", str(plain)], capsys, monkeypatch)
    assert code == 1 and "nothing to verify against" in err


def test_encrypted_private_key(model, keys, tmp_path, capsys, monkeypatch):
    key = ec.generate_private_key(ec.SECP384R1())
    priv = tmp_path / "locked.pem"
    priv.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.BestAvailableEncryption(b"s3cret")))
    priv.chmod(0o600)
    pub = tmp_path / "locked.pub"
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo))
    code, out, err = run(["sign", str(model), "--key", str(priv)], capsys, monkeypatch)   # stdin is no terminal
    assert code == 2 and "encrypted" in err and not (model / "model.sig").exists()
    with pytest.raises(TrustError, match=str(priv)):
        trust.sign_folder(model, priv, password="wrong")
    trust.sign_folder(model, priv, password="s3cret")
    assert trust.verify_signature(model, [pub]).key == pub


def test_policy_owned_by_another_user_is_refused(model, home, keys, monkeypatch):
    require_signatures(home, keys["plant-a"][1])
    trust.sign_folder(model, keys["plant-a"][0])
    assert trust.enforce_policy(model) is not None
    monkeypatch.setattr(trust, "trusted_owners", lambda: {os.getuid() + 4242})   # as if another user owned it all
    with pytest.raises(TrustError, match="neither you nor root") as e:
        trust.enforce_policy(model)
    assert str(home) in str(e.value)
