"""`posttrain sweep`: Holm's correction and the table worked by hand, the grid file, and two real
worker processes on one tiny sweep (every run and every shared stage done exactly once, and a
run whose worker was killed with -9 finished by a rerun)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from conftest import REPO
from posttrain.config import ConfigError
from posttrain.pipeline.sweep import load_grid, parse_shard, shard_runs
from posttrain.pipeline.sweeptable import holm, set_table, to_csv, to_markdown


def test_holm_hand_worked():
    """p = [0.01, 0.04, 0.03, 0.005], m = 4. Sorted: 0.005, 0.01, 0.03, 0.04 ->
    4 * 0.005 = 0.02; 3 * 0.01 = 0.03; 2 * 0.03 = 0.06; 1 * 0.04 = 0.04, raised to the
    running maximum 0.06. Back in input order: [0.03, 0.06, 0.06, 0.02]."""
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])  # 2 * 0.5 = 1.0; 0.9 -> max(1.0, 0.9)
    assert holm([]) == []


def _items(correct_ids, n=10):
    return [
        {"problem_id": f"q{i}", "verdict": "correct" if i in correct_ids else "incorrect"}
        for i in range(n)
    ]


def _summary(k, n=10):
    from posttrain.stats import accuracy_summary

    return accuracy_summary(["correct"] * k + ["incorrect"] * (n - k))


def test_table_marks_runs_within_noise_of_best():
    """10 items. a right on q0-q7 (80 %), b on q0-q6 (70 %), c on q0-q1 (20 %).
    Best: a. b vs a: 1 discordant item -> p = 1. c vs a: 6 discordant, all for a ->
    p = 2 / 2^6 = 0.03125, below 0.05 on its own, but Holm over the 2 comparisons makes it
    2 * 0.03125 = 0.0625: c is within noise of best too (and b: max(0.0625, 1) = 1)."""
    base_items = _items(range(5))
    runs = {}
    for rid, right in (("a", range(8)), ("b", range(7)), ("c", range(2))):
        from posttrain.evaluation.compare import compare_items

        items = _items(right)
        runs[rid] = {
            "summary": _summary(len(right)),
            "items": items,
            "guard": rid == "c",
            "compare": compare_items(base_items, items),
        }
    t = set_table("arith", _summary(5), runs)
    assert t["best"] == "a"
    a, b, c = (t["runs"][x] for x in "abc")
    assert a["best"] and a["p_best_holm"] is None
    assert b["diff_best"] == pytest.approx(-0.1) and b["p_best"] == 1.0
    assert c["diff_best"] == pytest.approx(-0.6) and c["p_best"] == pytest.approx(0.03125)
    assert c["p_best_holm"] == pytest.approx(0.0625) and c["within_noise_of_best"]
    assert b["p_best_holm"] == pytest.approx(1.0)
    # c vs base: base right on q0-q4, c on q0-q1 -> 3 discordant for base: p = 0.25, no regression
    assert c["diff_base"] == pytest.approx(-0.3) and c["p_base"] == pytest.approx(0.25)
    assert not c["regression"]
    table = {
        "axes": ["train.config.lr"],
        "sets": [t],
        "runs": [
            {"id": x, "settings": {"train.config.lr": lr}, "status": "done"}
            for x, lr in (("a", 1e-4), ("b", 5e-5), ("c", 2e-5))
        ],
    }
    md = to_markdown(table)
    assert "| c | 2e-05 | 20.0 [" in md and "within noise of best" in md
    assert md.count("\n|") == 5  # header, rule, base, 3 runs -> 5 lines after the first
    assert to_csv(table).splitlines()[0].startswith("run,train.config.lr,arith % [95% CI]")
    assert md.startswith("| run | lr | arith % [95% CI] |")  # short setting names for people
    from posttrain.report.html import sweep_table

    c["within_noise_of_best"] = False  # as if c's Holm p were below 0.05
    page = sweep_table(table)  # only the best row is marked best, not "worse than best" ones
    assert page.count('class="best"') == 1 and "worse than best" in page
    assert page.count('class="noise"') == 1  # b, within noise of best


def test_short_names_cut_keys_to_their_shortest_unique_suffix():
    from posttrain.pipeline.sweeptable import short_names

    keys = ["train.config.lr", "train.method", "train.config.lora.r", "sample.r"]
    assert short_names(keys) == ["lr", "method", "lora.r", "sample.r"]
    assert short_names(["train.config.beta", "beta"]) == ["config.beta", "beta"]


def test_one_base_row_per_distinct_base():
    """A dtype axis: runs a (bf16) and b (fp32) are each compared with their own base, bf16
    base right on 5 of 10 items, fp32 base on 3. a right on 8: +30 points vs its base; b right
    on 6: +30 points vs its base too. The table has two base rows, each naming its dtype.
    Wald intervals, 1.96 sqrt(p (1 - p) / 10): 50 +- 31.0, 30 +- 28.4, 80 +- 24.8 (capped at
    100), 60 +- 30.4."""
    from posttrain.evaluation.compare import compare_items
    from posttrain.pipeline.sweeptable import flat_rows

    runs = {
        "a": {
            "summary": _summary(8),
            "items": _items(range(8)),
            "base": "b16",
            "compare": compare_items(_items(range(5)), _items(range(8))),
        },
        "b": {
            "summary": _summary(6),
            "items": _items(range(6)),
            "base": "f32",
            "compare": compare_items(_items(range(3)), _items(range(6))),
        },
    }
    t = set_table("arith", _summary(5), runs, {"b16": _summary(5), "f32": _summary(3)})
    assert t["runs"]["a"]["diff_base"] == pytest.approx(0.3)
    assert t["runs"]["b"]["diff_base"] == pytest.approx(0.3)
    assert t["bases"]["f32"]["runs"] == ["b"] and t["bases"]["f32"]["score"] == 0.3
    table = {
        "axes": ["dtype"],
        "sets": [t],
        "runs": [
            {"id": "a", "settings": {"dtype": "bf16"}, "status": "done"},
            {"id": "b", "settings": {"dtype": "fp32"}, "status": "done"},
        ],
    }
    head, rows = flat_rows(table)
    assert [r[:3] for r in rows] == [
        ["base", "bf16", "50.0 [19.0, 81.0]"],
        ["base", "fp32", "30.0 [1.6, 58.4]"],
        ["a", "bf16", "80.0 [55.2, 100.0]"],
        ["b", "fp32", "60.0 [29.6, 90.4]"],
    ]


def test_grid_product_and_named_runs(tmp_path):
    (tmp_path / "base.yaml").write_text((REPO / "recipes" / "default.yaml").read_text())
    grid = tmp_path / "grid.yaml"
    grid.write_text(
        yaml.safe_dump(
            {
                "recipe": "base.yaml",
                "set": {"sample.n": 2},
                "axes": {"train.config.lr": [1e-4, 5e-5], "train.config.beta": [0.1, 0.3]},
                "runs": [{"id": "59", "set": {"train.config.lora.r": 8}}],
            },
            sort_keys=False,
        )
    )
    keys, runs = load_grid(grid)
    assert [r.id for r in runs] == ["g01", "g02", "g03", "g04", "59"]
    assert keys == ["train.config.lr", "train.config.beta", "train.config.lora.r"]
    assert runs[1].settings == {"train.config.lr": 1e-4, "train.config.beta": 0.3}
    assert runs[1].recipe.train.config["beta"] == 0.3 and runs[1].recipe.sample.n == 2
    assert runs[4].recipe.train.config["lora"] == {"r": 8, "alpha": 32}
    # the table shows every swept key for every run, the base recipe's value where unchanged
    assert runs[4].values == {
        "train.config.lr": 1e-4,
        "train.config.beta": 0.1,
        "train.config.lora.r": 8,
    }
    assert runs[0].values["train.config.lora.r"] == 16
    grid.write_text(yaml.safe_dump({"recipe": "base.yaml", "axis": {}}))
    with pytest.raises(ConfigError, match="unknown key.*axis"):
        load_grid(grid)
    assert parse_shard("1/3") == (1, 3)
    # 5 runs in 2 shards: positions 0, 2, 4 and 1, 3; together each run once
    assert [r.id for r in shard_runs(runs, (0, 2))] == ["g01", "g03", "59"]
    assert [r.id for r in shard_runs(runs, (1, 2))] == ["g02", "g04"]
    with pytest.raises(ConfigError):
        parse_shard("3/3")


# ---------------------------------------------------------------------------- real workers


def _grid(tmp_path, model):
    """3 runs of SFT on terse demonstrations with a tiny random model: 2 learning rates
    (product) and one named run with another LoRA rank; one eval set of 4 items."""
    recipe = {
        "model": model,
        "dtype": "fp32",
        "seed": 0,
        "sample": {"problems": "builtin:arith:4?split=train"},
        "train": {
            "method": "sft",
            "data": "demonstrations",
            "config": {
                "dtype": "fp32",
                "max_steps": 2,
                "batch_size": 2,
                "num_threads": 1,
                "lora": {"r": 2, "alpha": 4},
            },
        },
        "eval": [
            {
                "name": "arith",
                "problems": "builtin:arith:4?split=test",
                "max_new_tokens": 4,
                "batch_size": 4,
            }
        ],
    }
    grid = tmp_path / "grid.yaml"
    grid.write_text(
        yaml.safe_dump(
            {
                "recipe": recipe,
                "axes": {"train.config.lr": [1e-3, 2e-3]},
                "runs": [{"id": "59", "set": {"train.config.lora.r": 4}}],
            }
        )
    )
    return grid


def _worker(grid, out, log):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "posttrain.cli",
            "sweep",
            str(grid),
            "--out",
            str(out),
            "--poll",
            "0.5",
            "--stale-after",
            "60",
            "--no-progress",
        ],
        cwd=REPO,
        env=env,
        stdout=open(log, "w"),
        stderr=subprocess.STDOUT,
    )


def _wait(proc, log, timeout=600):
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError(f"worker timed out:\n{open(log).read()[-3000:]}")
    assert rc == 0, open(log).read()[-3000:]
    return open(log).read()


@pytest.mark.slow
def test_workers_share_a_sweep_and_finish_the_run_of_a_killed_one(tmp_path, tiny_model_dir):
    """Worker A is killed with -9 while it trains run g01 (its run lock and the train stage
    lock stay behind). Then workers B and C start on the same folder together: between them
    every run is done exactly once, g01's training included, and every shared stage once."""
    grid, out = _grid(tmp_path, tiny_model_dir), tmp_path / "sweep"
    log = tmp_path / "killed.log"
    proc = _worker(grid, out, log)
    deadline = time.time() + 300
    while "[train] running" not in open(log).read():
        assert proc.poll() is None and time.time() < deadline, open(log).read()[-3000:]
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (out / "locks" / "run-g01.lock").exists()
    assert not (out / "runs" / "g01" / "done.json").exists()

    procs = [_worker(grid, out, tmp_path / f"w{i}.log") for i in range(2)]
    both = "".join(_wait(p, tmp_path / f"w{i}.log") for i, p in enumerate(procs))
    # a run may be set aside while the other worker computes a stage it needs (then taken up
    # again); each run is carried through once: starts minus set-asides is 1 per run
    starts = [
        line.split(":")[0].split()[2]
        for line in both.splitlines()
        if line.startswith("== run ") and "set aside" not in line
    ]
    aside = [line.split()[2] for line in both.splitlines() if "set aside" in line]
    assert {rid: starts.count(rid) - aside.count(rid) for rid in set(starts)} == {
        "59": 1,
        "g01": 1,
        "g02": 1,
    }
    assert both.count("[train] running") == 3  # g01's again (A never finished it), g02, 59
    assert both.count("[demos] running") == 0  # A finished it before it was killed
    assert both.count("[eval/arith/base] running") == 1  # shared by all 3 runs
    for rid in ("g01", "g02", "59"):
        assert (out / "runs" / rid / "done.json").exists()
        assert (out / "runs" / rid / "eval" / "arith" / "base").is_symlink()
    assert len(list((out / "stages").glob("eval-arith-base-*/done.json"))) == 1
    assert len(list((out / "stages").glob("train-*/done.json"))) == 3
    table = json.loads((out / "results.json").read_text())
    assert [r["id"] for r in table["runs"]] == ["g01", "g02", "59"]
    assert set(table["sets"][0]["runs"]) == {"g01", "g02", "59"}
    assert (out / "results.md").read_text().count("\n|") == 5
    assert (out / "results.csv").read_text().count("\n") == 5  # header, base, 3 runs
    # the report reads the real sweep folder: the results table, one section per run
    from posttrain.report.html import render
    from posttrain.report.data import load_folder

    data = load_folder(out)
    assert data["kind"] == "sweep" and [r.name for r in data["runs"]] == [
        "runs/59",
        "runs/g01",
        "runs/g02",
    ]
    assert all(r.comparisons and r.comparisons[0]["set"] == "arith" for r in data["runs"])
    page = render(data)
    assert "arith vs best (Holm p)" in page and page.count("<h2>Run runs/") == 3


def test_lock_taken_over_only_when_its_holder_is_gone(tmp_path):
    """A lock held by a live process is respected; one whose pid is dead on this host, or whose
    heartbeat is older than stale_after (a holder on another machine), is taken over."""
    from posttrain.locks import HOST, FileLock

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    path = tmp_path / "run.lock"
    for holder, age, free in (
        ({"pid": os.getppid(), "host": HOST}, 0, False),
        ({"pid": dead.pid, "host": HOST}, 0, True),
        ({"pid": 1, "host": "elsewhere"}, 0, False),
        ({"pid": 1, "host": "elsewhere"}, 600, True),
    ):
        path.write_text(json.dumps({**holder, "since": 0}))
        os.utime(path, (time.time() - age, time.time() - age))
        lock = FileLock(path, stale_after=60)
        assert lock.try_acquire() == free, holder
        if free:
            assert json.loads(path.read_text())["pid"] == os.getpid()
            lock.release()
            assert not path.exists()
    second = FileLock(path, stale_after=60)
    assert second.try_acquire() and not FileLock(path, stale_after=60).try_acquire()
    second.release()


def test_a_busy_stage_is_set_aside_without_waiting(tmp_path):
    """A runner with wait=False raises StageBusy for a stage another live worker holds (a sweep
    worker then takes another run), skips it once the other worker has finished it, and
    computes it itself when the holder is dead."""
    from posttrain.locks import HOST
    from posttrain.pipeline.store import StageBusy, StageRunner, digest_of

    settings = {"seed": 1}
    runner = StageRunner(tmp_path / "run", tmp_path / "store", wait=False)
    folder = runner.folder("sample", digest_of(settings))
    lock = folder.with_name(folder.name + ".lock")
    lock.parent.mkdir(parents=True)
    lock.write_text(json.dumps({"pid": os.getppid(), "host": HOST, "since": 0}))  # alive
    calls = []
    with pytest.raises(StageBusy, match="stage 'sample'"):
        runner("sample", settings, calls.append)
    assert calls == []
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock.write_text(json.dumps({"pid": dead.pid, "host": HOST, "since": 0}))
    assert runner("sample", settings, calls.append) == (folder, digest_of(settings))
    assert calls == [folder] and (folder / "done.json").exists() and not lock.exists()
    lock.write_text(json.dumps({"pid": os.getppid(), "host": HOST, "since": 0}))
    runner("sample", settings, calls.append)  # done: skipped even while someone holds the lock
    assert calls == [folder]
