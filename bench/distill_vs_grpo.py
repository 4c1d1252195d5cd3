"""On-policy distillation against GRPO at equal rollout steps (issue 20, part 2).

    OMP_NUM_THREADS=1 .venv/bin/python bench/distill_vs_grpo.py \
        --teacher-adapter runs/default/train/adapter [--out runs/distill-vs-grpo]
    # a smoke run (minutes): --steps 2 --at 1,2 --items 20

Teacher: the base model plus `--teacher-adapter` (the default recipe's trained adapter); student:
the base. Trains recipes/distill.yaml (that teacher, in the trainer's process) and
recipes/grpo.yaml for `--steps` steps each at one `--lr`, otherwise with the recipes' own
settings (the two differ only in what their methods imply; the JSON lists every difference),
keeping a checkpoint at each
step of `--at`. Then evaluates, on the recipes' held-out items (the same for all), the base,
the teacher and both students at each step of `--at`, greedily, with the recipes' eval settings,
and compares them paired on the same items (evaluation.compare: exact McNemar and a paired
bootstrap 95 % interval of the difference). The share of the teacher's gain a student reaches
is (student - base) / (teacher - base), with a paired bootstrap interval over items.

`--compare-to OTHER_OUT` (another run of this bench, e.g. at another lr) also pairs every model
with the same-named one of that run on the same items (this run minus that one), and lists every
setting in which the two runs' trainings differ (their config.yaml files). `--eval-dir NAME`
with `--set eval.problems=SPEC` evaluates the same trained models on other items, into
--out/NAME (measured: the lr 1e-4 run's models on test items 200-399, which chose nothing).

Writes bench/results/distill_vs_grpo.json (`--results` to write elsewhere) and prints a table.
Everything lands under --out; a rerun skips the trainings and evaluations already done (a killed
training resumes from its last checkpoint).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "distill_vs_grpo.json"
METHODS = {"distill": ROOT / "recipes" / "distill.yaml", "grpo": ROOT / "recipes" / "grpo.yaml"}


def recipes(args):
    """The two recipes with the bench's step count, one lr (--lr, else recipes/distill.yaml's),
    checkpoints at every step of --at (kept), the teacher's adapter, and --items / --set
    applied to both."""
    from posttrain.pipeline.recipe import load_recipe

    every = math.gcd(*args.at)
    common = [
        f"train.config.max_steps={args.steps}",
        f"train.config.checkpoint_every={every}",
        f"train.config.keep_checkpoints={args.steps // every + 1}",
        *args.set,
    ]
    if args.lr is not None:
        common.append(f"train.config.lr={args.lr}")
    if args.items:
        common.append(f"eval.problems=builtin:arith:{args.items}?split=test")
    teacher = f"train.config.distill.teacher_adapter={Path(args.teacher_adapter).resolve()}"
    distill = load_recipe(str(METHODS["distill"]), [*common, teacher])
    lr = f"train.config.lr={distill.train.resolved.lr}"
    return {"distill": distill, "grpo": load_recipe(str(METHODS["grpo"]), [*common, lr])}


def differences(a, b, prefix="") -> dict:
    """{setting: [a, b]} for every setting that differs between two configs (dataclasses)."""
    da, db = dataclasses.asdict(a), dataclasses.asdict(b)
    out = {}
    for k in sorted(set(da) | set(db)):
        if da.get(k) != db.get(k):
            out[prefix + k] = [da.get(k), db.get(k)]
    return out


def train(recipe, folder: Path) -> dict:
    from posttrain.pipeline.recipe import train_config
    from posttrain.train.stage import train_stage

    cfg = train_config(recipe, data="")
    if not (folder / "adapter").exists():
        t0 = time.time()
        train_stage(cfg, folder)
        (folder / "bench_wall_s.txt").write_text(f"{time.time() - t0:.1f}\n")
    rows = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines() if x]
    parts = ("time/generate", "time/grade", "time/train", "time/sync")
    step_s = [sum(r[p] for p in parts) for r in rows]
    wall = folder / "bench_wall_s.txt"
    return {
        "steps": len(rows),
        "seconds_per_step": sum(step_s) / len(step_s),
        "train_seconds_per_step": sum(r["time/train"] for r in rows) / len(rows),
        "generate_seconds_per_step": sum(r["time/generate"] for r in rows) / len(rows),
        "wall_s": float(wall.read_text()) if wall.exists() else None,
        "reward_first_last": [rows[0]["reward/mean"], rows[-1]["reward/mean"]],
    }


def evaluate(recipe, adapter, folder: Path) -> dict:
    from posttrain.pipeline.steps import eval_set_stage

    if not (folder / "summary.json").exists():
        t0 = time.time()
        adapter = None if adapter is None else str(adapter)
        eval_set_stage(recipe, recipe.eval[0], adapter, folder, progress=False)
        (folder / "bench_wall_s.txt").write_text(f"{time.time() - t0:.1f}\n")
    summary = json.loads((folder / "summary.json").read_text())
    wall = folder / "bench_wall_s.txt"
    return {
        "accuracy": summary["accuracy"],
        "n": summary["n"],
        "interval_95": summary["interval_95"],
        "wilson_95": summary.get("wilson_95"),
        "wall_s": float(wall.read_text()) if wall.exists() else None,
        "adapter": None if adapter is None else str(adapter),
    }


def gain_share(base: dict, teacher: dict, student: dict, n_boot=10000, seed=0) -> dict:
    """(student - base) / (teacher - base) on the shared items, with a paired bootstrap 95 %
    interval (items resampled; resamples where the teacher gains nothing are dropped and
    counted)."""
    ids = sorted(set(base) & set(teacher) & set(student))
    b, t, s = (np.array([d[i] for i in ids], dtype=float) for d in (base, teacher, student))
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(ids), size=(n_boot, len(ids)))
    den = t[idx].mean(1) - b[idx].mean(1)
    num = s[idx].mean(1) - b[idx].mean(1)
    ok = den > 0
    gain = t.mean() - b.mean()
    point = float((s.mean() - b.mean()) / gain) if gain > 0 else None
    shares = num[ok] / den[ok]
    return {
        "share": point,
        "interval_95": [float(np.quantile(shares, 0.025)), float(np.quantile(shares, 0.975))]
        if ok.any()
        else None,
        "resamples_without_teacher_gain": int((~ok).sum()),
    }


def correct_by_item(folder: Path) -> dict[str, float]:
    from posttrain.evaluation.compare import load_items, per_item_scores

    return {k: v[0] for k, v in per_item_scores(load_items(folder)).items()}


def run_differences(this: Path, other: Path) -> dict:
    """{method: {setting: [this run's, the other run's]}} from the trainings' config.yaml."""
    import yaml

    out = {}
    for method in METHODS:
        a, b = (yaml.safe_load((d / method / "config.yaml").read_text()) for d in (this, other))
        out[method] = {
            k: [a.get(k), b.get(k)] for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--teacher-adapter", required=True, help="the teacher's LoRA adapter folder")
    ap.add_argument("--out", default="runs/distill-vs-grpo")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument(
        "--lr",
        type=float,
        default=None,
        help="both methods' lr (default recipes/distill.yaml's; the first figures used 5e-5)",
    )
    ap.add_argument("--at", default="10,20,40", help="steps at which the students are evaluated")
    ap.add_argument("--items", type=int, default=0, help="held-out items (0: the recipes' 200)")
    ap.add_argument("--results", default=str(RESULTS))
    ap.add_argument(
        "--eval-dir",
        default="eval",
        help="folder under --out for the evaluations (another one to evaluate the same trained "
        "models on other items, given with --set eval.problems=...)",
    )
    ap.add_argument("--set", action="append", default=[], help="a recipe override for both")
    ap.add_argument(
        "--compare-to", default="", help="another run's --out: pair each model with its namesake"
    )
    args = ap.parse_args()
    args.at = sorted({int(x) for x in args.at.split(",")})
    if args.at[-1] != args.steps or args.at[0] < 1:
        ap.error(f"--at {args.at}: steps between 1 and --steps {args.steps}, ending at it")
    if not (Path(args.teacher_adapter) / "adapter_config.json").is_file():
        ap.error(f"--teacher-adapter {args.teacher_adapter}: no adapter_config.json there")
    if args.compare_to:
        missing = [
            m for m in METHODS if not (Path(args.compare_to) / m / "config.yaml").is_file()
        ] + [
            f"{args.eval_dir}/{name}"
            for name in ["base", "teacher"] + [f"{m}@{s}" for m in METHODS for s in args.at]
            if not (Path(args.compare_to) / args.eval_dir / name / "items.jsonl").is_file()
        ]
        if missing:
            ap.error(
                f"--compare-to {args.compare_to}: not a finished run of this bench, lacks "
                + ", ".join(missing)
            )

    from posttrain.evaluation.compare import compare_items, load_items
    from posttrain.train.parallel.checkpoint import PREFIX

    out = Path(args.out)
    start = time.time()
    rec = recipes(args)
    if rec["distill"].eval != rec["grpo"].eval or rec["distill"].model != rec["grpo"].model:
        raise SystemExit("recipes/distill.yaml and recipes/grpo.yaml evaluate differently")
    result = {
        "teacher_adapter": str(Path(args.teacher_adapter).resolve()),
        "steps": args.steps,
        "at": args.at,
        "eval": dataclasses.asdict(rec["grpo"].eval[0]),
        "config_differences (distill, grpo)": differences(
            rec["distill"].train.resolved, rec["grpo"].train.resolved
        ),
        "train": {},
        "eval_runs": {},
    }
    for method, recipe in rec.items():
        print(f"== train {method} ({args.steps} steps)", flush=True)
        result["train"][method] = train(recipe, out / method)

    models = {"base": None, "teacher": Path(args.teacher_adapter).resolve()}
    for method in METHODS:
        for s in args.at:
            models[f"{method}@{s}"] = out / method / "checkpoints" / f"{PREFIX}{s:08d}" / "adapter"
    for name, adapter in models.items():
        print(f"== eval {name}", flush=True)
        result["eval_runs"][name] = evaluate(rec["grpo"], adapter, out / args.eval_dir / name)

    items = {name: load_items(out / args.eval_dir / name) for name in models}
    correct = {name: correct_by_item(out / args.eval_dir / name) for name in models}

    def paired(a, b):
        c = compare_items(items[a], items[b])
        return {k: c[k] for k in ("n", "difference", "interval_95", "p_value", "discordant")}

    table = []
    for name in models:
        row = {"model": name, "accuracy": result["eval_runs"][name]["accuracy"]}
        if name != "base":
            row["vs_base"] = paired("base", name)
        if name not in ("base", "teacher"):
            row["vs_teacher"] = paired("teacher", name)
            row["teacher_gain_share"] = gain_share(
                correct["base"], correct["teacher"], correct[name]
            )
        if name.startswith("distill@"):
            row["vs_grpo_same_step"] = paired("grpo@" + name.split("@")[1], name)
        table.append(row)
    result["table"] = table
    if args.compare_to:
        other = Path(args.compare_to)
        result["compare_to"] = {
            "out": str(other.resolve()),
            "training_differences (this, other)": run_differences(out, other),
            "this_minus_other": {
                name: {
                    k: c[k]
                    for k in (
                        "n",
                        "accuracy_a",
                        "accuracy_b",
                        "difference",
                        "interval_95",
                        "p_value",
                        "discordant",
                    )
                }
                for name in models
                for c in [compare_items(load_items(other / args.eval_dir / name), items[name])]
            },
        }
    result["wall_s_this_invocation"] = time.time() - start
    result["load_average_1min_at_end"] = os.getloadavg()[0]
    result["machine"] = machine()
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    Path(args.results).write_text(json.dumps(result, indent=1) + "\n")
    print_table(result)
    print(f"wrote {args.results}")


def machine() -> dict:
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    return {
        "cpus": os.cpu_count(),
        "avx2": " avx2" in flags,
        "avx512_bf16": "avx512_bf16" in flags,
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
    }


def print_table(result: dict) -> None:
    def pct(x):
        return f"{100 * x:5.1f}"

    def diff(c):
        lo, hi = c["interval_95"]
        return (
            f"{100 * c['difference']:+5.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}] p {c['p_value']:.2g}"
        )

    n = result["table"][0].get("vs_base", {}).get("n") or result["eval_runs"]["base"]["n"]
    print(f"\n{n} held-out items, greedy; differences in points, paired 95 % interval, McNemar p")
    print(f"{'model':12} {'acc %':>6}  {'vs base':34} {'vs GRPO same step':34} teacher's gain")
    for row in result["table"]:
        share = row.get("teacher_gain_share")
        share_s = ""
        if share and share["share"] is not None:
            lo, hi = share["interval_95"] or (math.nan, math.nan)
            share_s = f"{100 * share['share']:.0f} % [{100 * lo:.0f}, {100 * hi:.0f}]"
        print(
            f"{row['model']:12} {pct(row['accuracy']):>6}  "
            f"{diff(row['vs_base']) if 'vs_base' in row else '':34} "
            f"{diff(row['vs_grpo_same_step']) if 'vs_grpo_same_step' in row else '':34} "
            f"{share_s}"
        )
    if "compare_to" in result:
        cmp = result["compare_to"]
        print(f"\nthis run minus {cmp['out']} (same items, paired):")
        for method, d in cmp["training_differences (this, other)"].items():
            print(f"  {method} trainings differ in: {d or 'nothing'}")
        for name, c in cmp["this_minus_other"].items():
            print(f"  {name:12} {pct(c['accuracy_a'])} -> {pct(c['accuracy_b'])}  {diff(c)}")
    for method, t in result["train"].items():
        print(
            f"train {method}: {t['steps']} steps, {t['seconds_per_step']:.1f} s a step "
            f"(generate {t['generate_seconds_per_step']:.1f}, train {t['train_seconds_per_step']:.1f})"
        )


if __name__ == "__main__":
    main()
