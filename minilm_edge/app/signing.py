"""`sign`, `verify` and `trust`: model signatures and the store's trust policy, on the command line.

The work is done in formats/trust.py (the model-signing package underneath); this module parses flags,
resolves model names and prints. `verify_lines` is the signature half of `verify`, callable by any
command that also checks a model's manifest.
"""
from __future__ import annotations

import argparse
import getpass
import sys
from pathlib import Path

from ..errors import TrustError, UsageError
from ..formats import trust
from ..formats.home import default_home

SIGN_HELP = """\
Sign a model folder with an elliptic-curve private key (PEM): writes MODEL/model.sig, a bundle in the
OpenSSF model-signing format that covers every file of the folder (manifest.json included). The
`model_signing` tool verifies it, and `minilm-edge verify` verifies bundles the tool made.

A key pair (P-256; the private key must be readable by you only, as ssh requires):
  openssl ecparam -genkey -name prime256v1 -noout -out plant-a.pem && chmod 600 plant-a.pem
  openssl ec -in plant-a.pem -pubout -out plant-a.pub

examples:
  python -m minilm_edge sign ./my-model --key plant-a.pem
  python -m minilm_edge sign smollm2-135m-instruct-awq --key plant-a.pem
  model_signing verify key ./my-model --public_key plant-a.pub --signature ./my-model/model.sig
"""

VERIFY_HELP = """\
Verify a model folder, reading every byte: against its manifest.json (each listed file present, of
its size and sha256, no other file; `minilm-edge models show` prints it), then its signature
MODEL/model.sig (signed by one of the keys, every file as it was signed). Without --key, the keys the
store trusts are used (see `minilm-edge trust`). A missing signature is an error when --key is given
or the store's policy requires signatures; otherwise it is reported. Exit status 0 when everything
checked matches, 1 (one line saying what differs) when not. `models verify` is the same command.

examples:
  python -m minilm_edge verify ./my-model --key plant-a.pub
  python -m minilm_edge verify smollm2-135m-instruct-awq
  python -m minilm_edge verify smollm2-135m-instruct-awq@sha256:3f2a9c
"""

TRUST_HELP = """\
The store's trust policy: which public keys it trusts, and whether models must be signed by one.
While signatures are required, everything that loads a model (chat, generate, eval, bench,
minilm_edge.load()) refuses one that is unsigned or whose signature does not verify with a trusted key.

The policy is $MINILM_EDGE_HOME/policy.json (default ~/.cache/minilm_edge); trusted keys are copied
to its keys/ folder. Both must be writable by their owner only, or every model is refused.

examples:
  python -m minilm_edge trust add plant-a.pub
  python -m minilm_edge trust require on
  python -m minilm_edge trust list
  python -m minilm_edge trust remove plant-a
  python -m minilm_edge trust require off
"""


def _resolve(model_arg) -> Path:
    from .store import resolve_model
    path = resolve_model(model_arg)
    if not path.is_dir():
        raise UsageError(f"{path}: not a model folder")
    return path


# ---- sign

def _password(key: Path) -> str | None:
    """None for a plain key; for an encrypted one (PKCS#8 or OpenSSL's Proc-Type), ask on the terminal."""
    try:
        head = key.read_bytes()[:200]
    except OSError as e:
        raise TrustError(f"{key}: cannot read the private key ({e.strerror})") from None
    if b"ENCRYPTED" not in head:
        return None
    if not sys.stdin.isatty():
        raise UsageError(f"{key} is encrypted: run sign on a terminal to type its password")
    return getpass.getpass(f"password for {key}: ")


def cmd_sign(args) -> int:
    folder = _resolve(args.model)
    key = Path(args.key).expanduser()
    sig = trust.sign_folder(folder, key, password=_password(key))
    print(f"signed {folder} -> {sig}")
    return 0


# ---- verify

def verify_lines(folder: Path, keys=None, home: Path | None = None) -> list[str]:
    """Verify folder's signature with `keys` (default: the store's trusted keys); the lines to print.

    Raises TrustError when it does not verify."""
    if not keys:
        policy = trust.read_policy(home)
        keys = policy.trusted_keys if policy else ()
        if not keys:
            raise UsageError("no key to verify with: give --key KEY.pub, or trust one with "
                             "`minilm-edge trust add KEY.pub`")
    info = trust.verify_signature(folder, keys)
    fp = trust.key_fingerprint(info.key)
    return [f"signature: OK, {info.signature} signed by {info.key} (sha256:{fp[:16]})"]


def signature_lines(folder: Path, keys=(), home: Path | None = None) -> list[str]:
    """The signature half of `verify` (the manifest half is models_cmd.py's): what to print about
    folder/model.sig. A missing or bad signature raises TrustError when keys are given or the store's
    policy requires signatures (as load() would refuse); otherwise a missing one is only reported."""
    policy = trust.read_policy(home)
    signed = (Path(folder) / trust.SIGNATURE_NAME).is_file()
    if keys or (policy and policy.require_signature):
        return verify_lines(folder, keys, home)
    if signed and policy and policy.trusted_keys:
        return verify_lines(folder, (), home)
    if signed:
        return ["signature: present, not checked (no --key and the store trusts no key)"]
    return ["signature: none (unsigned; `minilm-edge sign` adds one)"]


# ---- trust

def _policy(home: Path) -> trust.Policy:
    return trust.read_policy(home) or trust.Policy(False, (), trust.policy_path(home))


def _key_name(arg: str) -> str:
    name = Path(arg).name.removesuffix(".pub").removesuffix(".pem")
    if not name or name.startswith(".") or "/" in name:
        raise UsageError(f"bad key name {arg!r}: use letters, digits, '-', '_' or '.'")
    return name


def trust_add(public_key: Path, name: str | None = None, home: Path | None = None) -> Path:
    """Copy a public key into <home>/keys/NAME.pub and list it in the policy; returns its store path."""
    home = home or default_home()
    fp = trust.key_fingerprint(public_key)            # refuses what is not a PEM public key
    policy = _policy(home)
    keys_dir = trust.make_store_dir(home / trust.KEYS_DIR)
    dest = keys_dir / f"{_key_name(name or public_key.name)}.pub"
    if dest.exists() and trust.key_fingerprint(dest) != fp:
        raise UsageError(f"{dest} exists and holds another key: choose another --name, or `trust remove` it")
    for other in policy.trusted_keys:
        if other != dest and other.is_file() and trust.key_fingerprint(other) == fp:
            raise UsageError(f"{public_key} is already trusted as {other}")
    if not dest.exists():
        trust.write_owner_file(dest, public_key.read_text())
    keys = policy.trusted_keys if dest in policy.trusted_keys else (*policy.trusted_keys, dest)
    trust.write_policy(trust.Policy(policy.require_signature, keys, policy.path), home)
    return dest


def trust_remove(name: str, home: Path | None = None) -> Path:
    """Stop trusting a key (by NAME or by a sha256 prefix of its fingerprint) and delete the store's copy."""
    home = home or default_home()
    policy = _policy(home)
    hits = [k for k in policy.trusted_keys
            if k.name.removesuffix(".pub") == name or (len(name) >= 8 and k.is_file()
                                                       and trust.key_fingerprint(k).startswith(name))]
    if len(hits) != 1:
        raise UsageError(f"{name}: {'no' if not hits else 'more than one'} trusted key of that name or "
                         f"fingerprint (see `minilm-edge trust list`)")
    keys = tuple(k for k in policy.trusted_keys if k != hits[0])
    trust.write_policy(trust.Policy(policy.require_signature, keys, policy.path), home)
    if hits[0].parent == home / trust.KEYS_DIR:
        hits[0].unlink(missing_ok=True)
    return hits[0]


def trust_require(on: bool, home: Path | None = None) -> Path:
    home = home or default_home()
    policy = _policy(home)
    if on and not policy.trusted_keys:
        raise UsageError("trusting no key yet: requiring signatures would refuse every model; "
                         "run `minilm-edge trust add KEY.pub` first")
    return trust.write_policy(trust.Policy(on, policy.trusted_keys, policy.path), home)


def cmd_trust(args) -> int:
    home = default_home()
    if args.action == "add":
        dest = trust_add(Path(args.key).expanduser(), args.name, home)
        print(f"trusted {args.key} as {dest}")
    elif args.action == "remove":
        print(f"no longer trusted: {trust_remove(args.name, home)}")
    elif args.action == "require":
        trust_require(args.state == "on", home)
        print(f"signatures {'required' if args.state == 'on' else 'not required'} ({trust.policy_path(home)})")
    else:
        policy = _policy(home)
        print(f"policy: {trust.policy_path(home)}: signatures "
              f"{'required' if policy.require_signature else 'not required'}")
        for k in policy.trusted_keys:
            fp = trust.key_fingerprint(k) if k.is_file() else "(missing)"
            print(f"{k.name.removesuffix('.pub'):<20} sha256:{fp[:16]}  {k}")
    return 0


def add_parsers(sub, verify) -> None:
    """sign, verify and trust; `verify` is the command's function (models_cmd.cmd_verify: the manifest
    part, then signature_lines), passed in because models_cmd already imports this module."""
    raw = argparse.RawDescriptionHelpFormatter
    s = sub.add_parser("sign", help="sign a model folder (model.sig, OpenSSF model-signing)", description=SIGN_HELP,
                       formatter_class=raw)
    s.add_argument("model", metavar="MODEL", help="model folder or known name")
    s.add_argument("--key", required=True, metavar="PRIVATE.pem", help="elliptic-curve private key, PEM")
    s.set_defaults(func=cmd_sign)

    v = sub.add_parser("verify", help="verify a model folder's signature", description=VERIFY_HELP,
                       formatter_class=raw)
    v.add_argument("model", metavar="MODEL", help="model folder or known name")
    v.add_argument("--key", action="append", metavar="PUBLIC.pem",
                   help="public key to verify with (repeatable; default: the store's trusted keys)")
    v.set_defaults(func=verify)

    t = sub.add_parser("trust", help="the store's trusted keys and signature policy", description=TRUST_HELP,
                       formatter_class=raw)
    ta = t.add_subparsers(dest="action", metavar="ACTION", parser_class=type(t))   # one-line usage errors
    ta.required = True
    a = ta.add_parser("add", help="trust a public key (copied into the store)")
    a.add_argument("key", metavar="KEY.pub", help="PEM public key")
    a.add_argument("--name", help="name in the store (default: the file name without .pub)")
    r = ta.add_parser("remove", help="stop trusting a key")
    r.add_argument("name", metavar="NAME", help="its name (see `trust list`) or a fingerprint prefix")
    q = ta.add_parser("require", help="require signatures from trusted keys (on) or not (off)")
    q.add_argument("state", choices=["on", "off"])
    ta.add_parser("list", help="show the policy and the trusted keys")
    t.set_defaults(func=cmd_trust)
