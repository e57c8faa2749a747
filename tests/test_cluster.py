"""--cluster (app/cluster.py): eval, check and a quantize sweep as independent jobs on a local Dask
cluster give what the same commands give one at a time; nothing of Dask is imported without it."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

import minilm_edge
from minilm_edge.app import check, cluster
from minilm_edge.app.cli import main
from minilm_edge.runtime import evaluate
from tinymodel import make_model_dir

TEXT = "The capital of France is Paris, and the capital of Italy is Rome. " * 6


@pytest.fixture(scope="module")
def local_cluster():
    distributed = pytest.importorskip("distributed", reason="the cluster extra (dask[distributed]) is not installed")
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                                  dashboard_address=None) as c:
        yield c.scheduler_address


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    base = tmp_path_factory.mktemp("cluster")
    shape = dict(hidden_size=64, intermediate_size=96)          # group size 32 divides every input
    paths = {k: make_model_dir(base / k, seed=s, **shape)[0] for k, s in (("ref", 0), ("same", 0), ("other", 1))}
    for i in (1, 2):
        (base / f"d{i}.txt").write_text(TEXT * i, encoding="utf-8")
    return {**paths, "d1": base / "d1.txt", "d2": base / "d2.txt", "base": base}


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("MINILM_EDGE_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MINILM_EDGE_LOG", raising=False)
    return tmp_path / "home"


def test_eval_jobs_equal_local_perplexity(local_cluster, tiny, home, capsys):
    code = main(["eval", str(tiny["ref"]), str(tiny["other"]), "--data", str(tiny["d1"]), "--data", str(tiny["d2"]),
                 "--ctx", "64", "--cluster", local_cluster, "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    res = json.loads(out)
    assert [(r["model"], r["data"]) for r in res] == [
        (str(m), str(d)) for m in (tiny["ref"], tiny["other"]) for d in (tiny["d1"], tiny["d2"])]
    for r in res:
        local = evaluate.perplexity(minilm_edge.load(r["model"]), evaluate.read_text(r["data"]), ctx=64,
                                    progress=False)
        assert r["ppl"] == pytest.approx(local["ppl"], rel=1e-9) and r["tokens_scored"] == local["tokens_scored"]


def test_check_jobs_record_every_run(local_cluster, tiny, home, tmp_path, capsys):
    th = tmp_path / "th.json"
    th.write_text('{"kl_mean_max": 0.01}')
    code = main(["check", str(tiny["same"]), str(tiny["other"]), "--baseline", str(tiny["ref"]),
                 "--data", str(tiny["d1"]), "--data", str(tiny["d2"]), "--thresholds", str(th),
                 "--cluster", local_cluster])
    out, err = capsys.readouterr()
    assert code == check.REGRESSION_EXIT, err                  # "other" regressed (1: a job could not run)
    rows = check.history(home=home)
    assert [(r["model"], r["passed"]) for r in rows] == [("same", True), ("same", True), ("other", False),
                                                         ("other", False)]
    assert len({r["data_sha256"] for r in rows}) == 2 and out.count("REGRESSION") == 2


def test_quantize_sweep_on_the_cluster(local_cluster, tiny, tmp_path, capsys):
    out_root = tmp_path / "sweep"
    code = main(["quantize", str(tiny["ref"]), str(out_root), "--method", "rtn", "--group-size", "32",
                 "--sweep", "bits=3,4", "--sweep", "quantize-head=int8", "--cluster", local_cluster])
    out, err = capsys.readouterr()
    assert code == 0, err
    folders = out.split()
    assert [p.rsplit("/", 1)[1] for p in folders] == ["bits=3,quantize_head=int8", "bits=4,quantize_head=int8"]
    for path, bits in zip(folders, (3, 4)):
        cfg = json.loads((tmp_path / "sweep" / path.rsplit("/", 1)[1] / "config.json").read_text())
        assert cfg["quantization_config"]["bits"] == bits
        assert minilm_edge.load(path).forward([1, 2, 3]).shape[0] == 3


def test_a_sweep_keeps_the_other_flags(tiny, tmp_path, capsys):
    # Without --cluster the sweep runs here; every folder is made with the command's other flags
    # (they were dropped once: --embed, --int8, --max-size and --target-bpw fell back to the library's
    # defaults, so a sweep's folders differed from what the same command makes without --sweep).
    out_root = tmp_path / "sweep"
    code = main(["quantize", str(tiny["ref"]), str(out_root), "--method", "rtn", "--group-size", "32",
                 "--int8", "v@all", "--sweep", "bits=3,4"])
    out, err = capsys.readouterr()
    assert code == 0, err
    for path, bits in zip(out.split(), (3, 4)):
        qc = json.loads((Path(path) / "config.json").read_text())["quantization_config"]
        assert (qc["bits"], qc["embed"], qc["int8_linears"]) == (bits, "q6", "v@all"), qc   # the default embedding


@pytest.mark.parametrize("argv, code, pattern", [
    (["eval", "REF", "OTHER", "--data", "D1"], 2, "need --cluster"),
    (["check", "REF", "OTHER", "--baseline", "REF", "--data", "D1"], 2, "need --cluster"),
    (["quantize", "REF", "OUT", "--cluster", "tcp://127.0.0.1:9"], 2, "runs a --sweep"),
    (["quantize", "REF", "OUT", "--sweep", "colour=red"], 2, "KEY=V1,V2"),
    (["quantize", "REF", "OUT", "--sweep", "bits=three"], 2, "bits takes int values"),
    (["eval", "REF", "--data", "D1", "--cluster", "tcp://127.0.0.1:9"], 1, "cannot reach the Dask scheduler"),
])
def test_bad_cluster_use_is_one_line(tiny, home, tmp_path, capsys, monkeypatch, argv, code, pattern):
    pytest.importorskip("distributed", reason="the cluster extra (dask[distributed]) is not installed")
    monkeypatch.setattr(cluster, "CONNECT_TIMEOUT", "1s")
    subst = {"REF": str(tiny["ref"]), "OTHER": str(tiny["other"]), "D1": str(tiny["d1"]), "OUT": str(tmp_path / "o")}
    assert main([subst.get(a, a) for a in argv]) == code
    err = capsys.readouterr().err
    assert pattern in err and err.strip().splitlines()[-1].startswith("minilm-edge: error")
    assert not (tmp_path / "o").exists()


def test_no_dask_without_cluster(tiny, tmp_path):
    """A normal CLI run (check, eval) imports nothing of Dask (a fresh interpreter)."""
    code = (f"import sys; from minilm_edge.app.cli import main\n"
            f"assert main(['check', {str(tiny['same'])!r}, '--baseline', {str(tiny['ref'])!r}, "
            f"'--data', {str(tiny['d1'])!r}]) == 0\n"
            f"assert main(['eval', {str(tiny['same'])!r}, '--data', {str(tiny['d1'])!r}, '--ctx', '64']) == 0\n"
            "loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('dask', 'distributed'))\n"
            "assert not loaded, loaded\n")
    env = {**__import__("os").environ, "MINILM_EDGE_HOME": str(tmp_path / "home")}
    env.pop("MINILM_EDGE_LOG", None)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr[-2000:]
