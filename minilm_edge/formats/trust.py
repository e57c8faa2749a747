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
runtime.model.load, hence by chat, generate, serve and the library) refuses a model without `model.sig` or
whose signature verifies with none of the trusted keys.

Permissions (as ssh's StrictModes): the policy decides what runs, so the policy file, the trusted keys and
the home folder must not be writable by group or others; otherwise every check refuses, naming the file.
The signing code itself is the `model-signing` package (extra `signing`), imported only when needed.
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

def check_not_writable_by_others(path: Path) -> None:
    """Refuse (TrustError) a file or folder that group or others may write, as ssh refuses such keys."""
    try:
        mode = path.stat().st_mode
    except OSError as e:
        raise TrustError(f"{path}: cannot read its permissions ({e.strerror})") from None
    if mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise TrustError(f"{path}: writable by group or others (mode {stat.S_IMODE(mode):04o}); "
                         f"the trust policy refuses it: run `chmod go-w {path}`")


def write_private_file(path: Path, text: str) -> None:
    """Write `text` to `path` atomically, readable by all and writable only by the owner (0o644)."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o644)          # the umask may have been looser or stricter; this is the policy
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
    home = home or default_home()
    home.mkdir(parents=True, exist_ok=True)
    def rel(k: Path) -> str:
        return str(k.relative_to(home)) if k.is_relative_to(home) else str(k)
    data = {"require_signature": policy.require_signature, "trusted_keys": [rel(k) for k in policy.trusted_keys]}
    path = home / POLICY_NAME
    write_private_file(path, json.dumps(data, indent=2) + "\n")
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
        check_not_writable_by_others(key)
    return verify_signature(folder, policy.trusted_keys)


def verify_signature(folder: Path, public_keys) -> SignatureInfo:
    """Verify folder/model.sig with each of `public_keys` (PEM files) in turn; the first that verifies wins.

    Raises TrustError when the folder is unsigned or no key verifies it."""
    raise TrustError(f"{folder}: signature verification is not implemented yet")
