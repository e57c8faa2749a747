"""A model folder's manifest: what it holds, how it was made, and a check that it still holds that.

    <folder>/manifest.json   {"format": "minilm_edge.manifest/1",
                              "files": [{"path": "config.json", "size": 500, "sha256": "<hex>"}, ...],
                              "recipe": {...},       what decides the result: method, settings, inputs
                              "provenance": {...}}   who made it, when, where, from what

Every regular file of the folder is listed (relative paths, "/" separated, sorted) except
manifest.json itself and the signature bundle model.sig (written after the manifest, by
`python -m minilm_edge sign`; it signs every file, manifest.json included). The JSON is
written canonically (sorted keys, two-space indent, UTF-8), so the manifest's digest, the sha256 of
its bytes, identifies the folder's content and recipe: the store names versions by it (as a
container registry names images by their manifest digest).

`check_folder(folder, full)` compares a folder with its manifest and raises IntegrityError naming
the first file that differs: listed but missing, present but not listed (foreign), another size
(truncated or grown), another sha256 (changed). Sizes and the file list cost a stat per file and are
always checked; sha256 costs a read of every byte (about 0.1 s for the 147 MB AWQ SmolLM2-135M on
this machine, BENCHMARKS.md). `full=False` hashes every file of a folder outside the store too, but
in the store (below formats/home.py's home) only the files whose (size, mtime, ctime, inode) differ
from the stamp the last check left in `<home>/verified/`: a byte changed in place changes the
file's ctime, which no user-level tool can set back, so it is hashed and found. The stamp lives
outside the folder, whose every file a signature covers.
A folder without manifest.json is a plain Hugging Face folder: nothing to check, `check_folder`
returns None.
"""
from __future__ import annotations

import getpass
import hashlib
import json
import os
import platform
import re
import tempfile
from datetime import datetime, timezone
from pathlib import Path

from ..errors import IntegrityError
from ..version import __version__
from .home import default_home

MANIFEST = "manifest.json"
SIGNATURE = "model.sig"                  # an OpenSSF model-signing bundle, signs the manifest's files
NOT_LISTED = {MANIFEST, SIGNATURE}
FORMAT = "minilm_edge.manifest/1"
_TEMP = re.compile(r"\.manifest-[A-Za-z0-9_]{8}")   # mkstemp's, while a manifest is being replaced
_CHUNK = 1 << 20


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------
def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def listed_files(folder: Path) -> list[str]:
    """Relative paths ("/" separated, sorted) of the regular files a manifest of `folder` lists."""
    folder = Path(folder)
    out = []
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for name in files:
            rel = (Path(root) / name).relative_to(folder).as_posix()
            if rel not in NOT_LISTED and not _TEMP.fullmatch(rel):
                out.append(rel)
    return sorted(out)


def canonical_json(obj) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8")


def recipe_digest(recipe: dict) -> str:
    """sha256 of the recipe's canonical JSON: equal recipes, equal digests."""
    return hashlib.sha256(canonical_json(recipe)).hexdigest()


def provenance(**fields) -> dict:
    """Who made a folder, when and where, plus the caller's `fields` (source, method, calibration)."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):           # no passwd entry and no $USER (some containers)
        user = str(os.getuid()) if hasattr(os, "getuid") else "unknown"
    return {"tool": f"minilm_edge {__version__}", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "user": user, "host": platform.node(), **fields}


def write_manifest(folder, recipe: dict, provenance: dict) -> str:
    """Hash every file of `folder` and write its manifest.json (atomically); return the manifest digest."""
    folder = Path(folder)
    files = [{"path": rel, "size": (folder / rel).stat().st_size, "sha256": file_sha256(folder / rel)}
             for rel in listed_files(folder)]
    data = canonical_json({"format": FORMAT, "files": files, "recipe": recipe, "provenance": provenance})
    fd, tmp = tempfile.mkstemp(prefix=".manifest-", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, folder / MANIFEST)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------------------------------------
# Reading and checking
# ---------------------------------------------------------------------------------------------
def manifest_digest(folder) -> str | None:
    """sha256 of the folder's manifest.json bytes, or None without one."""
    path = Path(folder) / MANIFEST
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def read_manifest(folder) -> dict | None:
    """The folder's manifest, or None when it has none; IntegrityError when it is not one."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    try:
        m = json.loads(path.read_bytes())
    except (ValueError, UnicodeDecodeError) as e:
        raise IntegrityError(f"{path}: not a readable manifest ({e}); the folder cannot be checked") from None
    ok = (isinstance(m, dict) and m.get("format") == FORMAT and isinstance(m.get("files"), list)
          and all(isinstance(f, dict) and isinstance(f.get("path"), str) and type(f.get("size")) is int
                  and isinstance(f.get("sha256"), str) for f in m["files"]))
    if not ok:
        raise IntegrityError(f"{path}: not a {FORMAT} manifest (wrong format field or file list)")
    for f in m["files"]:
        rel = f["path"]
        if rel.startswith("/") or ".." in rel.split("/") or rel in NOT_LISTED:
            raise IntegrityError(f"{path}: lists {rel!r}, which no manifest may list")
    return m


def check_folder(folder, full: bool = False) -> dict | None:
    """Compare `folder` with its manifest (module docstring); return the manifest, None without one.

    full=True hashes every file; full=False, in the store, only files changed since the last check.
    """
    folder = Path(folder)
    m = read_manifest(folder)
    if m is None:
        return None
    listed = {f["path"]: f for f in m["files"]}
    for rel in listed_files(folder):
        if rel not in listed:
            raise IntegrityError(f"{folder / rel}: a foreign file, not in {MANIFEST}; "
                                 f"the folder was changed after it was made; remove the file, or make the model again")
    stats = {}
    for rel, f in listed.items():
        path = folder / rel
        try:
            st = path.stat()
        except FileNotFoundError:
            raise IntegrityError(f"{path}: missing, but listed in {MANIFEST}; the model is incomplete, "
                                 f"make or pull it again") from None
        if st.st_size != f["size"]:
            how = "truncated" if st.st_size < f["size"] else "grown"
            raise IntegrityError(f"{path}: {st.st_size} bytes, {MANIFEST} says {f['size']} ({how}); "
                                 f"the model is damaged, make or pull it again")
        stats[rel] = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
    digest = manifest_digest(folder)
    stamp_file = stamp_path(folder)
    stamp = {} if full or stamp_file is None else _read_stamp(stamp_file, digest)
    for rel, f in listed.items():
        if stamp.get(rel) != stats[rel] and file_sha256(folder / rel) != f["sha256"]:
            raise IntegrityError(f"{folder / rel}: sha256 differs from {MANIFEST} (changed or corrupted); "
                                 f"the model was tampered with or damaged, make or pull it again")
    if stamp_file is not None and stamp != stats:
        _write_stamp(stamp_file, digest, stats)
    return m


def stamp_path(folder) -> Path | None:
    """Where the last check of a store folder is recorded; None for a folder outside the store."""
    home = default_home().resolve()
    real = Path(folder).resolve()
    if not real.is_relative_to(home):
        return None
    return home / "verified" / (hashlib.sha256(str(real).encode()).hexdigest()[:32] + ".json")


def _read_stamp(path: Path, digest: str) -> dict:
    try:
        s = json.loads(path.read_text(encoding="utf-8"))
        return s["files"] if s.get("manifest") == digest and isinstance(s.get("files"), dict) else {}
    except (OSError, ValueError, AttributeError, KeyError):
        return {}


def _write_stamp(path: Path, digest: str, stats: dict) -> None:
    """Best effort: when it cannot be written, the folder is simply hashed again next time."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".stamp-", dir=path.parent)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump({"manifest": digest, "files": stats}, f)
        os.replace(tmp, path)
    except OSError:
        pass
