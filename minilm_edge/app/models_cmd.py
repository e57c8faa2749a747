"""`models list | show | history | tag | rm | gc | verify`: the store's versions and tags on the command line.

The store (app/store.py) keeps every model it makes or receives as an immutable version named by the
sha256 of its manifest (formats/manifest.py), with tags NAME:TAG as in container registries (docker,
ollama): `latest` moves when a pull or prepare makes a new version, and a rollback is a re-tag.
This module parses flags, resolves references and prints; the work is in store.py and manifest.py.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from ..errors import IntegrityError, ModelNotFoundError, UsageError
from ..formats.manifest import MANIFEST, SIGNATURE, check_folder, manifest_digest, read_manifest
from . import store

MODELS_HELP = """\
The model store's versions and tags. Every model the store pulls or prepares is an immutable version
named by the sha256 of its manifest.json (every file's sha256 and size, the recipe, the provenance);
NAME:TAG points at one, and NAME alone means NAME:latest. `latest` moves when a pull or a changed
recipe makes a new version; re-tagging an older version rolls back. A version stays until `gc` finds
no tag pointing at it. References: NAME, NAME:TAG, NAME@DIGEST or sha256:DIGEST (a unique prefix of
6 or more hex characters will do); chat, generate, eval, bench and inspect accept them too.

examples:
  python -m minilm_edge models list
  python -m minilm_edge models show smollm2-135m-instruct-awq
  python -m minilm_edge models history smollm2-135m-instruct-awq
  python -m minilm_edge models tag smollm2-135m-instruct-awq@3f2a9c1b7d0e smollm2-135m-instruct-awq:latest
  python -m minilm_edge models tag smollm2-135m-instruct-awq smollm2-135m-instruct-awq:good
  python -m minilm_edge models rm smollm2-135m-instruct-awq:good
  python -m minilm_edge models gc --dry-run
  python -m minilm_edge models verify smollm2-135m-instruct-awq
"""

VERIFY_HELP = """\
Check a model folder against its manifest.json, reading every byte: each listed file present, of its
size and sha256, and no other file (a signature, model.sig, aside). When the folder has a model.sig
and the store trusts keys (or --key is given), the signature is verified too. Loading checks the
file list and sizes always and sha256 of files changed since the store's last check; this reads all.
Exit status 0 when everything matches, 1 (one line naming the file) when not.

examples:
  python -m minilm_edge models verify smollm2-135m-instruct-awq
  python -m minilm_edge models verify ./my-model --key plant-a.pub
"""


def _short(digest: str | None) -> str:
    return digest[:12] if digest else "-"


def _size(m: dict) -> int:
    return sum(f["size"] for f in m["files"])


def _human(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000


def _folder_of(ref_text: str) -> tuple[Path, str | None]:
    """(version folder, digest) of a store reference or an existing folder (digest None without a manifest)."""
    path = Path(ref_text).expanduser()
    if path.is_dir():
        return path, manifest_digest(path)
    ref = store.parse_ref(ref_text)
    if ref.digest is not None:
        digest = store.find_version(ref.digest)
    else:
        t = store.read_tag(ref.name, ref.tag)
        if t is None:
            raise ModelNotFoundError(f"there is no {ref.name}:{ref.tag} in the store (see `models list`)")
        digest = t["digest"]
    folder = store.version_path(digest)
    if not folder.is_dir():
        raise ModelNotFoundError(f"{ref_text} points at version {_short(digest)}, which is gone; re-tag or pull")
    return folder, digest


def _tags_by_digest() -> dict:
    out: dict = {}
    for name_tag, t in store.list_tags():
        out.setdefault(t["digest"], []).append(name_tag)
    return out


# ---- list
def cmd_list(args) -> int:
    rows = []
    tags = store.list_tags()
    for name_tag, t in tags:
        rows.append((name_tag, t["digest"]))
    tagged = {d for _, d in rows}
    rows += [("<none>", d) for d in store.list_versions() if d not in tagged]
    out = []
    for name_tag, digest in rows:
        folder = store.version_path(digest)
        try:
            m = read_manifest(folder) if folder.is_dir() else None
        except IntegrityError:
            m = None
        prov = (m or {}).get("provenance") or {}
        out.append({"name": name_tag, "digest": digest, "size": _size(m) if m else None,
                    "created": prov.get("date"), "exists": folder.is_dir()})
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    print(f"{'NAME:TAG':48s} {'DIGEST':12s} {'SIZE':>9s}  CREATED")
    for r in out:
        size = _human(r["size"]) if r["size"] is not None else ("missing" if not r["exists"] else "?")
        print(f"{r['name']:48s} {_short(r['digest']):12s} {size:>9s}  {r['created'] or '-'}")
    return 0


# ---- show
def cmd_show(args) -> int:
    folder, digest = _folder_of(args.ref)
    m = read_manifest(folder)
    if m is None:
        raise ModelNotFoundError(f"{folder} has no {MANIFEST} (a plain Hugging Face folder): nothing to show")
    info = {"digest": digest, "path": str(folder), "tags": sorted(_tags_by_digest().get(digest, [])),
            "size": _size(m), "signed": (folder / SIGNATURE).is_file(), "recipe": m.get("recipe"),
            "provenance": m.get("provenance"), "files": m["files"]}
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"digest       sha256:{digest}")
    print(f"path         {folder}")
    print(f"tags         {', '.join(info['tags']) or 'none (untagged: `models gc` removes it)'}")
    signed = "yes (model.sig)" if info["signed"] else "no"
    print(f"size         {_human(info['size'])} in {len(m['files'])} files; signed: {signed}")
    for title in ("recipe", "provenance"):
        print(title)
        for k, v in (info[title] or {}).items():
            print(f"  {k:22s} {json.dumps(v) if isinstance(v, (dict, list)) else v}")
    print("files")
    for f in m["files"]:
        print(f"  {f['path']:32s} {f['size']:>12,d}  {f['sha256'][:16]}")
    return 0


# ---- history
def cmd_history(args) -> int:
    ref = store.parse_ref(args.name)
    events = store.history(ref.name)
    if not events:
        raise ModelNotFoundError(f"{ref.name} has no history in the store (see `models list`)")
    if args.json:
        print(json.dumps(events, indent=2))
        return 0
    for e in events:
        move = f"{_short(e.get('old'))} -> {_short(e.get('new'))}"
        print(f"{e.get('time', '-'):25s} {ref.name}:{e.get('tag', '?'):12s} {move:30s} {e.get('by', '-'):5s} "
              f"{e.get('user', '-')}")
    return 0


# ---- tag / rm / gc
def cmd_tag(args) -> int:
    _, digest = _folder_of(args.src)
    if digest is None or not store.version_path(digest).is_dir():
        raise UsageError(f"{args.src} is not a version of the store; only stored versions can be tagged")
    dst = store.parse_ref(args.dst)
    if dst.digest is not None:
        raise UsageError(f"{args.dst}: the target is NAME[:TAG], not a digest")
    store.set_tag(dst.name, dst.tag, digest, by="tag")
    print(f"{dst.name}:{dst.tag} -> {_short(digest)}")
    return 0


def cmd_rm(args) -> int:
    ref = store.parse_ref(args.ref)
    if ref.digest is not None:
        raise UsageError(f"{args.ref}: rm removes a tag NAME[:TAG]; a version without tags goes with `models gc`")
    digest = store.remove_tag(ref.name, ref.tag)
    left = _tags_by_digest().get(digest, [])
    note = f"still tagged {', '.join(left)}" if left else "now untagged: `models gc` removes it"
    print(f"untagged {ref.name}:{ref.tag} (version {_short(digest)}, {note})")
    return 0


def cmd_gc(args) -> int:
    gone = store.collect_garbage(dry_run=args.dry_run)
    verb = "would remove" if args.dry_run else "removed"
    for d in gone:
        print(f"{verb} {_short(d)}")
    print(f"{verb} {len(gone)} untagged version{'s' if len(gone) != 1 else ''}", file=sys.stderr)
    return 0


# ---- verify
def manifest_lines(folder: Path) -> list[str]:
    """Check every byte of `folder` against its manifest (IntegrityError when it differs); the lines to print."""
    t0 = time.perf_counter()
    m = check_folder(folder, full=True)
    if m is None:
        raise IntegrityError(f"{folder}: no {MANIFEST} (a plain Hugging Face folder); nothing to verify against")
    return [f"manifest: OK, {len(m['files'])} files, {_human(_size(m))}, every sha256 as recorded "
            f"(sha256:{_short(manifest_digest(folder))}, {time.perf_counter() - t0:.2f} s)"]


def cmd_verify(args) -> int:
    """The one `verify` (also spelled `models verify`): the manifest here, the signature in signing.py."""
    from .signing import signature_lines
    folder = store.resolve_model(args.model)
    keys = [Path(k).expanduser() for k in args.key or ()]
    if (folder / MANIFEST).is_file():
        lines = manifest_lines(folder)
    elif (folder / SIGNATURE).is_file() or keys:
        lines = [f"manifest: none ({folder} has no {MANIFEST})"]
    else:
        raise IntegrityError(f"{folder}: no {MANIFEST} and no {SIGNATURE}; nothing to verify against")
    for line in lines:
        print(line, flush=True)
    for line in signature_lines(folder, keys):
        print(line)
    return 0


# ---- parser
def add_parser(sub) -> None:
    raw = argparse.RawDescriptionHelpFormatter
    p = sub.add_parser("models", help="the store's versions and tags: list, show, history, tag, rm, gc, verify",
                       description=MODELS_HELP, formatter_class=raw)
    a = p.add_subparsers(dest="action", metavar="ACTION", parser_class=type(p))
    a.required = True
    ls = a.add_parser("list", help="every tag and untagged version, with digest, size and date")
    ls.add_argument("--json", action="store_true", help="print JSON")
    ls.set_defaults(func=cmd_list)
    sh = a.add_parser("show", help="a version's digest, tags, recipe, provenance and files")
    sh.add_argument("ref", metavar="REF", help="NAME[:TAG], NAME@DIGEST, sha256:DIGEST or a folder")
    sh.add_argument("--json", action="store_true", help="print JSON")
    sh.set_defaults(func=cmd_show)
    hi = a.add_parser("history", help="every move of NAME's tags")
    hi.add_argument("name", metavar="NAME")
    hi.add_argument("--json", action="store_true", help="print JSON")
    hi.set_defaults(func=cmd_history)
    tg = a.add_parser("tag", help="point DST (NAME[:TAG], default tag latest) at the version SRC is")
    tg.add_argument("src", metavar="SRC", help="NAME[:TAG], NAME@DIGEST or sha256:DIGEST")
    tg.add_argument("dst", metavar="DST", help="NAME[:TAG]")
    tg.set_defaults(func=cmd_tag)
    rm = a.add_parser("rm", help="remove a tag (the version stays until gc)")
    rm.add_argument("ref", metavar="NAME[:TAG]")
    rm.set_defaults(func=cmd_rm)
    gc = a.add_parser("gc", help="remove every version no tag points at")
    gc.add_argument("--dry-run", action="store_true", help="only list what would be removed")
    gc.set_defaults(func=cmd_gc)
    ve = a.add_parser("verify", help="check every byte against the manifest (and the signature)",
                      description=VERIFY_HELP, formatter_class=raw)
    ve.add_argument("model", metavar="MODEL", help="model folder, known name or store reference")
    ve.add_argument("--key", action="append", metavar="PUBLIC.pem", help="public key for the signature (repeatable)")
    ve.set_defaults(func=cmd_verify)
