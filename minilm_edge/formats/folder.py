"""Writing a model folder atomically: everything goes into a hidden temporary folder beside the
target, renamed into place when complete, so an interrupted run leaves no half-written model."""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

from ..errors import CheckpointError, UsageError

# Files copied verbatim so the output is a complete model folder.
COPIED_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json",
                "special_tokens_map.json")


def check_out_dir(out_dir: Path) -> None:
    """Fail now, not after minutes of work, if `out_dir` cannot become the output folder: it exists
    and is not an empty folder, or its nearest existing ancestor is a file or cannot be written."""
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise UsageError(f"{out_dir} exists and is not an empty folder; choose a new output folder")
    parent = _nearest_existing(out_dir.absolute().parent)
    if not parent.is_dir():
        raise UsageError(f"cannot create {out_dir}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"cannot create {out_dir}: {parent} is not writable (read-only disk or no permission)")


def _nearest_existing(path: Path) -> Path:
    """`path` or its nearest ancestor that exists: where a folder to be made would live."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_free_space(out_dir: Path, need_bytes: int) -> None:
    """Fail now, not after minutes of work, if the disk that will hold `out_dir` has less free space
    than the output's estimated size (`need_bytes`, an upper bound the caller computes)."""
    place = _nearest_existing(Path(out_dir).absolute())
    free = shutil.disk_usage(place).free
    if free < need_bytes:
        raise UsageError(f"{out_dir} needs about {need_bytes / 2**20:,.0f} MiB, but {place} has "
                         f"{free / 2**20:,.0f} MiB free; free some space or write elsewhere")


def output_tempdir(out_dir: Path, tag: str) -> Path:
    """A hidden folder beside out_dir to write an output into, renamed to out_dir when complete:
    `.NAME.TAG-PID-random`, so that a later run can tell it from a live one's and remove it if
    its process was killed (`remove_stale_tempdirs`, called here first).
    Its mode is an ordinary new folder's (the umask's), not mkdtemp's private 0700: a model made
    by one account is often served by another."""
    remove_stale_tempdirs(out_dir.parent, out_dir.name)
    tmp = Path(tempfile.mkdtemp(prefix=tempdir_prefix(out_dir.name, tag), dir=out_dir.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    return tmp


def _umask() -> int:
    umask = os.umask(0o022)             # the only way to read it is to set it
    os.umask(umask)
    return umask


def tempdir_prefix(name: str, tag: str) -> str:
    return f".{name}.{tag}-{os.getpid()}-"


STALE_AFTER_S = 600      # a temporary folder untouched this long, whose process is gone, is stale


def remove_stale_tempdirs(parent: Path, name: str | None) -> list:
    """Remove the temporary folders `.NAME.TAG-PID-*` (of any NAME when `name` is None: the
    store's own folder, where only we write) in `parent` whose process PID is gone and in
    which nothing changed for STALE_AFTER_S: what a run killed without a chance to clean up
    (SIGKILL, power loss) left, often hundreds of MB in a hidden folder. A folder whose process
    still runs (another quantize or pull of the same name) is left alone; the quiet time guards a
    live run whose PID this process cannot see (another container sharing the store). Anything
    not named that way is left alone too. Not on Windows, where os.kill cannot merely ask whether
    a process exists.                                                  -> the folders removed"""
    if os.name == "nt" or not Path(parent).is_dir():
        return []
    stem = r"[^/]+" if name is None else re.escape(name)
    pattern = re.compile(rf"\.{stem}\.[a-z]+-(\d+)-[A-Za-z0-9_]+")
    removed = []
    for p in Path(parent).iterdir():
        m = pattern.fullmatch(p.name)
        if (m and p.is_dir() and not p.is_symlink() and not _process_exists(int(m.group(1)))
                and time.time() - _newest_mtime(p) > STALE_AFTER_S):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def _newest_mtime(folder: Path) -> float:
    newest = folder.stat().st_mtime
    for root, dirs, files in os.walk(folder):
        for entry in dirs + files:
            try:
                newest = max(newest, os.stat(os.path.join(root, entry), follow_symlinks=False).st_mtime)
            except OSError:
                pass
    return newest


def _process_exists(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)                    # signal 0: no signal sent, only the existence check
    except ProcessLookupError:
        return False
    except (OverflowError, ValueError):    # not a pid this system can have
        return False
    except OSError:                        # e.g. PermissionError: another user's live process
        return True
    return True


def copied_files(src_dir: Path) -> dict:
    """The files of `src_dir` an output folder gets a copy of (COPIED_FILES that exist), each
    resolved: {name: path}. A link is followed only to a regular file inside the folder or, for
    a Hugging Face cache snapshot (snapshots/REV/NAME -> ../../blobs/HASH), in its repo's blobs/;
    one anywhere else is refused: a folder whose special_tokens_map.json links to /proc/self/environ
    would otherwise put the process environment into a model people share. Cheap: callers check
    it before long work."""
    src_dir = Path(src_dir)
    root = src_dir.resolve()
    roots = [root] + ([root.parent.parent / "blobs"] if root.parent.name == "snapshots" else [])
    found = {}
    for name in COPIED_FILES:
        if not os.path.lexists(src_dir / name):
            continue
        target = (src_dir / name).resolve()
        if not target.is_file() or not any(target.is_relative_to(r) for r in roots):
            raise CheckpointError(f"{src_dir / name} is not a regular file inside the model folder "
                                  f"(it leads to {target}); copy the file itself into the folder")
        found[name] = target
    return found


def write_model_folder(src_dir: Path, out_dir: Path, tensors: dict, config: dict, before_rename=None) -> Path:
    """Write tensors + config + copied tokenizer files into a temp folder, then rename it to out_dir.
    q6 codes in `tensors` must be in the kernels' layout (formats/q4.py pack_q6_rows): the file says so.

    `before_rename(tmp)` may add files (a report) to the complete folder before it appears."""
    from .q4 import Q6_LAYOUT_KEY
    from .safetensors import write_file
    from .tensors import q6_prefixes, storage_rank

    out_dir = Path(out_dir)
    check_out_dir(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = output_tempdir(out_dir, "tmp")
    try:
        # In the order runtime/decode.py stacks int4 and q6 weights, so the stacks map the file in
        # place; q6 codes in the kernels' layout, as every writer of them makes them (quant/quantize.py).
        q6 = q6_prefixes(tensors)
        write_file(tmp / "model.safetensors", tensors, {"format": "pt", Q6_LAYOUT_KEY: "rows"},
                   rank=lambda name: storage_rank(name, q6))
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        for name, path in copied_files(src_dir).items():
            shutil.copyfile(path, tmp / name)
        if before_rename is not None:
            before_rename(tmp)
        if out_dir.exists():
            out_dir.rmdir()               # empty (checked above); rename needs it gone
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
