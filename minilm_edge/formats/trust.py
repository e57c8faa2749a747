"""Model signatures and the store's trust policy.

A model folder is signed in the OpenSSF model-signing format (https://github.com/sigstore/model-transparency):
`model.sig` in the folder is a Sigstore bundle whose DSSE payload lists the digest of every file of the
folder (`manifest.json` included, `model.sig` itself excluded), signed with an offline elliptic-curve key
(PEM). The `model_signing` command-line tool verifies our signatures and we verify its:

    model_signing sign key   FOLDER --private_key KEY.pem --signature FOLDER/model.sig
    model_signing verify key FOLDER --public_key  KEY.pub --signature FOLDER/model.sig

The store's policy is `<home>/policy.json` (home: formats/home.py), for example

    {"require_signature": true, "trusted_keys": ["keys/plant-a.pub", "keys/plant-b.pub"]}

Key paths are relative to home (absolute ones are allowed). No policy file, or "require_signature": false,
means no policy is in force: every model loads. With a policy in force, `enforce_policy(folder)` (called by
runtime.model.load, hence by every command that loads a model and by the library) refuses a model without
`model.sig` or whose signature verifies with none of the trusted keys.

Permissions (as ssh's StrictModes): the policy decides what runs, so the home folder, the policy file, the
trusted keys and their folders must be owned by the user or root and not writable by group or others;
otherwise every check refuses, naming the file. Who reads and writes the rest of the store: the section
"store permissions" below and README.md.

The signing code itself is the `model-signing` package (extra `signing`), imported only when needed (it
costs about 1.5 s: sigstore and its dependencies).
"""
from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from ..errors import TrustError
from .home import default_home

SIGNATURE_NAME = "model.sig"          # the model_signing tool's default name, inside the model folder
POLICY_NAME = "policy.json"           # <home>/policy.json
KEYS_DIR = "keys"                     # <home>/keys/*.pub: where `trust add` copies public keys
INSTALL_HINT = "pip install 'minilm_edge[signing]' (or: pip install model-signing)"


@dataclass(frozen=True)
class Policy:
    require_signature: bool           # False: no policy in force
    trusted_keys: tuple[Path, ...]    # absolute paths of PEM public keys
    path: Path                        # the policy file it came from


@dataclass(frozen=True)
class SignatureInfo:
    folder: Path
    signature: Path                   # folder/model.sig
    key: Path                         # the public key it verified with


# ---- permissions -----------------------------------------------------------------------------------

def trusted_owners() -> set[int]:
    """Who may own the policy, the trusted keys and the folders holding them: root and the current user."""
    return {0, os.getuid()} if hasattr(os, "getuid") else set()


def check_not_writable_by_others(path: Path) -> None:
    """Refuse (TrustError) a file or folder that group or others may write, or that another user owns
    (who could chmod and write it), as ssh's StrictModes refuses such keys."""
    try:
        st = path.stat()
    except OSError as e:
        raise TrustError(f"{path}: cannot read its permissions ({e.strerror})") from None
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise TrustError(f"{path}: writable by group or others (mode {stat.S_IMODE(st.st_mode):04o}); "
                         f"the trust policy refuses it: run `chmod go-w {path}`")
    owners = trusted_owners()
    if owners and st.st_uid not in owners:
        raise TrustError(f"{path}: owned by user id {st.st_uid}, neither you nor root; the trust policy refuses it")


def write_owner_file(path: Path, text: str) -> None:
    """Write `text` to `path` atomically, writable only by its owner (STORE_FILE_MODE, or stricter by umask)."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, STORE_FILE_MODE)   # the umask may make it stricter
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, stat.S_IMODE(os.stat(tmp).st_mode) & ~0o022)  # a file left by an old crash: never looser
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# ---- the policy ------------------------------------------------------------------------------------

def policy_path(home: Path | None = None) -> Path:
    return (home or default_home()) / POLICY_NAME


def read_policy(home: Path | None = None) -> Policy | None:
    """The store's policy, or None when there is no policy file. Refuses a malformed or unsafe one."""
    home = home or default_home()
    path = home / POLICY_NAME
    if not path.exists():
        return None
    check_not_writable_by_others(home)
    check_not_writable_by_others(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TrustError(f"{path}: not a readable JSON policy ({e})") from None
    require = data.get("require_signature", False) if isinstance(data, dict) else None
    keys = data.get("trusted_keys", []) if isinstance(data, dict) else None
    if not isinstance(require, bool) or not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        raise TrustError(f"{path}: expected {{\"require_signature\": true|false, \"trusted_keys\": [\"keys/NAME.pub\", "
                         f"...]}}")
    return Policy(require, tuple(home / k for k in keys), path)


def write_policy(policy: Policy, home: Path | None = None) -> Path:
    """Write the policy file (0o644, atomically); keys below home are stored relative to it."""
    home = make_store_dir(home or default_home())
    def rel(k: Path) -> str:
        return str(k.relative_to(home)) if k.is_relative_to(home) else str(k)
    data = {"require_signature": policy.require_signature, "trusted_keys": [rel(k) for k in policy.trusted_keys]}
    path = home / POLICY_NAME
    write_owner_file(path, json.dumps(data, indent=2) + "\n")
    return path


def enforce_policy(folder: Path, home: Path | None = None) -> SignatureInfo | None:
    """Refuse to load `folder` unless the store's policy allows it.

    No policy file, or "require_signature": false -> returns None at once (the cost: one stat).
    With a policy in force -> returns the SignatureInfo of the trusted key that verified the folder's
    `model.sig`, or raises TrustError (one line naming the folder and the reason): unsigned, signature
    does not verify with any trusted key (tampered, or signed by someone else), model-signing missing,
    or an unsafe policy/key file.
    """
    policy = read_policy(home)
    if policy is None or not policy.require_signature:
        return None
    folder = Path(folder)
    if not (folder / SIGNATURE_NAME).is_file():
        raise TrustError(f"{folder}: unsigned model (no {SIGNATURE_NAME}); the store policy {policy.path} "
                         f"requires a signature from a trusted key (see `minilm-edge sign --help`)")
    if not policy.trusted_keys:
        raise TrustError(f"{folder}: the store policy {policy.path} requires a signature but trusts no key "
                         f"(add one with `minilm-edge trust add KEY.pub`)")
    for key in policy.trusted_keys:
        check_not_writable_by_others(key.parent)     # or a key could be renamed over
        check_not_writable_by_others(key)
    return verify_signature(folder, policy.trusted_keys)


# ---- signatures (the model-signing package) ----------------------------------------------------------

# The paths a signature may leave out: its own file and the git metadata the model_signing tool skips by
# default. A signature whose recorded ignore_paths leave out anything else (say, the weights) is refused.
SIGNATURE_IGNORES = frozenset({SIGNATURE_NAME, ".git", ".gitattributes", ".github", ".gitignore"})


def _model_signing():
    """The model-signing package, or a TrustError saying what to install."""
    try:
        import model_signing
        import model_signing.hashing
        import model_signing.signing
        import model_signing.verifying
    except ImportError as e:
        raise TrustError(f"signing and verifying models needs the model-signing package ({e}): "
                         f"{INSTALL_HINT}") from None
    return model_signing


def _hashing_config(ms):
    """How a folder is hashed: every file (sha256 each), model.sig and git metadata left out; as the
    model_signing tool's `sign key FOLDER --signature FOLDER/model.sig` does."""
    return ms.hashing.Config().set_ignored_paths(paths=[SIGNATURE_NAME], ignore_git_paths=True)


def _one_line(e: BaseException, limit: int = 300) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


def key_fingerprint(public_key: Path) -> str:
    """sha256 of the key's SubjectPublicKeyInfo PEM: the `hint` a model_signing bundle names its key by."""
    import hashlib

    _model_signing()                          # cryptography comes with it
    from cryptography.hazmat.primitives import serialization
    try:
        key = serialization.load_pem_public_key(Path(public_key).read_bytes())
    except (OSError, ValueError, TypeError) as e:
        raise TrustError(f"{public_key}: not a readable PEM public key ({_one_line(e)})") from None
    pem = key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(pem).hexdigest()


def signed_statement(signature: Path) -> dict:
    """The in-toto statement inside a bundle (not verified: call only after verification, or to describe)."""
    import base64
    try:
        bundle = json.loads(Path(signature).read_text())
        return json.loads(base64.b64decode(bundle["dsseEnvelope"]["payload"]))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise TrustError(f"{signature}: not a model-signing bundle ({_one_line(e)})") from None


def check_private_key(private_key: Path) -> None:
    """Refuse a private key file that group or others may read, as ssh does ("UNPROTECTED PRIVATE KEY")."""
    try:
        mode = Path(private_key).stat().st_mode
        head = Path(private_key).read_bytes()[:64]
    except OSError as e:
        raise TrustError(f"{private_key}: cannot read the private key ({e.strerror})") from None
    if b"PUBLIC KEY" in head:
        raise TrustError(f"{private_key}: a public key; signing needs the private key (PEM) it was made from")
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise TrustError(f"{private_key}: private key readable by group or others (mode {stat.S_IMODE(mode):04o}); "
                         f"run `chmod 600 {private_key}`")


def sign_folder(folder: Path, private_key: Path, password: str | None = None) -> Path:
    """Sign every file of `folder` (manifest.json included) with an EC private key (PEM) into folder/model.sig.

    The signature is written next to the model even in a read-only store version (the folder's owner
    write bit is lifted for the rename only): it does not change any file the model is made of. An
    existing model.sig is replaced atomically. Returns the signature's path."""
    import shutil
    import tempfile

    ms = _model_signing()
    folder, private_key = Path(folder), Path(private_key)
    if not folder.is_dir():
        raise TrustError(f"{folder}: not a model folder")
    check_private_key(private_key)
    with tempfile.TemporaryDirectory(prefix="minilm-sign-") as tmp:
        out = Path(tmp) / SIGNATURE_NAME     # outside the folder: nothing of ours is hashed
        try:
            (ms.signing.Config()
             .use_elliptic_key_signer(private_key=private_key,             # cryptography wants bytes
                                      password=password.encode() if password is not None else None)
             .set_hashing_config(_hashing_config(ms))
             .sign(folder, out))
        except TypeError as e:               # cryptography: encrypted key without password, or the reverse
            raise TrustError(f"{private_key}: {_one_line(e)}") from None
        except (ValueError, OSError) as e:   # not an EC key on a supported curve, a symlink, unreadable file
            raise TrustError(f"{folder}: cannot sign with {private_key}: {_one_line(e)}") from None
        with _owner_writable(folder):
            staged = folder / f".{SIGNATURE_NAME}.tmp{os.getpid()}"
            try:
                shutil.copyfile(out, staged)
                os.chmod(staged, SIGNATURE_MODE)
                os.replace(staged, folder / SIGNATURE_NAME)
            finally:
                staged.unlink(missing_ok=True)
    return folder / SIGNATURE_NAME


def verify_signature(folder: Path, public_keys) -> SignatureInfo:
    """Verify folder/model.sig with each of `public_keys` (PEM files); the first that verifies wins.

    Verified: the bundle's signature with the key, then every file's sha256 against the signed list (a
    file added, removed or changed is refused), then that the signature leaves out nothing but model.sig
    and git metadata. Raises TrustError (one line) when the folder is unsigned or no key verifies it."""
    ms = _model_signing()
    folder = Path(folder)
    signature = folder / SIGNATURE_NAME
    if not signature.is_file():
        raise TrustError(f"{folder}: unsigned model (no {SIGNATURE_NAME}); sign it with `minilm-edge sign`")
    public_keys = [Path(k) for k in public_keys]
    if not public_keys:
        raise TrustError(f"{folder}: no public key to verify its signature with (give --key KEY.pub, "
                         f"or trust one with `minilm-edge trust add KEY.pub`)")
    reasons = []
    for key in public_keys:
        try:
            ms.verifying.Config().use_elliptic_key_verifier(public_key=key).verify(folder, signature)
        except (ValueError, TypeError, KeyError, OSError) as e:   # what model_signing raises on a mismatch
            reasons.append((key, _one_line(e)))
            continue
        _check_ignores(folder, signature)
        return SignatureInfo(folder, signature, key)
    # A "Signature mismatch" comes from a key that did sign the bundle: the files changed since.
    changed = [r for r in reasons if r[1].startswith("Signature mismatch")]
    if changed:
        raise TrustError(f"{folder}: files changed since signing ({changed[0][1]})")
    names = ", ".join(str(k) for k, _ in reasons)
    raise TrustError(f"{folder}: signature does not verify with {names}: {reasons[0][1]}")


def _check_ignores(folder: Path, signature: Path) -> None:
    ignored = signed_statement(signature).get("predicate", {}).get("serialization", {}).get("ignore_paths", [])
    extra = sorted(set(ignored) - SIGNATURE_IGNORES)
    if extra:
        raise TrustError(f"{folder}: the signature leaves out {', '.join(extra)}; re-sign it without --ignore-paths")


# ---- store permissions -------------------------------------------------------------------------------
# Who may do what (README, "Signing and the trust policy"): everyone may read the store and load its models;
# only its owner writes (pull, tag, gc, sign, trust). Modes at creation are at most these; a stricter umask
# wins. A version's files are read-only for everyone, its folders stay owner-writable so that the owner can
# add model.sig next to the files or delete the version.

STORE_DIR_MODE = 0o755     # home, versions/, keys/, ...: everyone reads, only the owner writes
STORE_FILE_MODE = 0o644    # policy.json, keys/*.pub: everyone reads, only the owner writes
SIGNATURE_MODE = 0o444     # model.sig, as the version's files: nobody changes it in place


def make_store_dir(path: Path) -> Path:
    """Create `path` and its missing parents, each with STORE_DIR_MODE (masked by the umask, so never looser).

    Unlike Path.mkdir(parents=True), which makes the parents with the umask's default (0o777 & ~umask: a
    world-writable store under umask 0)."""
    path = Path(path)
    missing = []
    for p in (path, *path.parents):
        if p.exists():
            break
        missing.append(p)
    for p in reversed(missing):
        try:
            os.mkdir(p, STORE_DIR_MODE)
        except FileExistsError:       # made meanwhile by another process
            pass
    return path


def seal_folders(folder: Path) -> None:
    """Take the group and others write bits off `folder` and every folder below it (0o755 at most)."""
    folder = Path(folder)
    for p in (folder, *folder.rglob("*")):
        if p.is_dir() and not p.is_symlink():
            os.chmod(p, stat.S_IMODE(p.stat().st_mode) & ~0o022)


def seal_version(folder: Path) -> None:
    """Make a finished model version read-only: every file loses its write bits (0o444 at most), every
    folder its group and others write bits (0o755 at most)."""
    folder = Path(folder)
    for p in folder.rglob("*"):
        if p.is_file() and not p.is_symlink():
            os.chmod(p, stat.S_IMODE(p.stat().st_mode) & ~0o222)
    seal_folders(folder)


class _owner_writable:
    """Lift the folder's owner write bit for the duration of a `with` block, then restore its mode."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)

    def __enter__(self):
        self.mode = stat.S_IMODE(self.folder.stat().st_mode)
        if not self.mode & stat.S_IWUSR:
            try:
                os.chmod(self.folder, self.mode | stat.S_IWUSR)
            except OSError as e:
                raise TrustError(f"{self.folder}: cannot add {SIGNATURE_NAME} ({e.strerror}); "
                                 f"only the store's owner can sign its models") from None
        return self

    def __exit__(self, *exc):
        os.chmod(self.folder, self.mode)
        return False
