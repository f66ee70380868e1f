"""ESSA against GRPO at equal training time, from one SFT adapter trained to convergence.

The task is one neither method was built for: two-digit + and − questions answered in ``\\boxed{}``,
scored by a reward plugin (bench/vs_grpo_task.py: 1 right, 0.1 boxed but wrong, 0 unboxed) over JSONL
files the script writes (2,000 training questions, 400 held-out ones, disjoint). Both methods start
from the same LoRA SFT adapter (rank 8, q/k/v/o), trained once for several epochs on 800 worked answers
and cached; its held-out accuracy is every run's first validation.

Then, for every seed, each ESSA variant (``--essa``, presets in ESSA_VARIANTS) and GRPO at each learning
rate (``--grpo-lrs``) gets the same training-time budget: ``run.train_budget_s`` / ``grpo.time_budget_s``,
the one rule both loops implement (since the first generation or step, validation excluded). Every
run validates on the 400 held-out questions (greedy, the run loop's validation path for both) at a
fixed period; neither method uses those scores for anything (no best-adapter pick, no early stop),
so they are a measurement only. Runs go ``--parallel`` at a time, each pinned to its own core with one
torch thread, ESSA and GRPO interleaved so that runs sharing the machine are of different methods.

    python bench/bench_vs_grpo.py                                   # 20 min, seeds 1234 and 1, defaults vs GRPO 1e-4 / 3e-4
    python bench/bench_vs_grpo.py --budget-min 10 --seeds 1234 --essa default,crn --grpo-lrs 1e-4

Writes bench/results/vs_grpo.json (settings, the SFT adapter's accuracy, every run's curve, the
accuracy at each checkpoint minute, gains, the targets) and vs_grpo_accuracy_vs_{train_time,tokens}.png.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"
DATA_SEED = 1234
TRAIN, HELD_OUT = 2000, 400
SYSTEM_PROMPT = "Please reason step by step and place your final answer in \\boxed{}."

# ESSA settings compared (each a list of --set overrides on top of the project's defaults). Every variant
# pins the settings it was measured under where the defaults have moved since, so that its name still
# reproduces the figures in bench/results/. There, "default" means the defaults of the file's date:
# cmean1 here before 2026-12-04, cmean025 from 2026-12-04 to 2026-12-07, full_l8_b64_c025 since.
C1 = "search.cmean=1.0"
SEP16 = ["search.diagonal=true", "search.popsize=16", "task.batch_size=16"]  # sep-CMA, λ 16 × 16 prompts (to 2026-12-07)
L16B16 = ["search.popsize=16", "task.batch_size=16"]  # es's λ and prompts per candidate as measured
FULL8 = ["search.diagonal=false", "search.popsize=8", "task.batch_size=64"]  # full CMA, λ 8 × 64 prompts (since 2026-12-07)
ESSA_VARIANTS: dict[str, list[str]] = {
    "default": [],
    # the first release's CMA mean step, the "default" of the earlier result files
    "cmean1": [C1, *SEP16],
    # common random numbers at T > 0: every candidate samples with the same seeds per prompt
    "crn": ["backend.temperature=0.7", "search.common_random_numbers=true", C1, *SEP16],
    "crn_b32": [
        "backend.temperature=0.7",
        "search.common_random_numbers=true",
        "task.batch_size=32",
        "search.popsize=12",
        "search.diagonal=true",
        C1,
    ],
    "full_b48": ["search.diagonal=false", "task.batch_size=48", "search.popsize=16", C1],
    "alpha1": ["lora.alpha_fraction=1.0", C1, *SEP16],
    "sigma03": ["search.sigma0=0.3", C1, *SEP16],
    "crn_s03": ["backend.temperature=0.7", "search.common_random_numbers=true", "search.sigma0=0.3", C1, *SEP16],
    "ranks": ["search.fitness_shaping=centered_ranks", C1, *SEP16],
    # fewer candidates, each scored on 4x the prompts (reward SE halves), full-covariance CMA as the paper
    "full_l8_b64": [*FULL8, C1],
    # the mean takes a quarter of each selected step; candidates keep σ0 1.0 (answers change, rewards differ)
    "cmean025": ["search.cmean=0.25", *SEP16],
    # full_l8_b64 at the mean step of cmean025: less noisy rankings and a damped mean together (the
    # defaults since 2026-12-07)
    "full_l8_b64_c025": [*FULL8, "search.cmean=0.25"],
    # the default with mirrored sampling: 4 pairs m ± σy, each pair scored on the same 64 prompts
    "full_mirr4": [*FULL8, "search.cmean=0.25", "search.mirrors=4"],
    # the default at T 0.7 with common random numbers: every candidate samples a prompt with the same seed,
    # so a small step changes the expected reward smoothly where greedy answers do not move
    "full_crn": [*FULL8, "search.cmean=0.25", "backend.temperature=0.7", "search.common_random_numbers=true"],
    # the default without active CMA (search.active=false): C learns from the μ best only, no negative
    # weights for the worst candidates, whose low rewards at 64 prompts may be noise more than direction
    "full_passive": [*FULL8, "search.cmean=0.25", "search.active=false"],
    # the default with two-point step-size adaptation (TPA) in place of CSA at d 240: σ grows or shrinks by
    # which of two line samples m ± σ·(last mean step) scores better, not by the length of an evolution path
    "full_tpa": [*FULL8, "search.cmean=0.25", "search.step_size=tpa"],
    # the paper's offsets σ = σ_sft + x (one absolute σ0 for all factors: here A's mean σ is ~0.6, B's ~0.07),
    # with the mean learning rate of cmean025
    "offset_cmean": ["lora.parametrization=offset", "search.sigma0=0.2", "search.cmean=0.25", *SEP16],
    # OpenAI-ES on the singular values: antithetic pairs on the same prompts, centred ranks, α decoupled from σ
    "es_a1": ["search.optimizer=es", "search.learning_rate=1.0", "search.fitness_shaping=centered_ranks", *L16B16],
    # EGGROLL-style rank-1 perturbations of every linear layer of the merged SFT model, with es-at-scale's
    # σ 0.001 and z-scored rewards; its α 5e-4 multiplies (1/n) Σ R_i ε_i, ours α/(nσ) Σ F_i ε_i, so α·σ
    "lowrank_es": [
        "search.space=lowrank",
        "search.optimizer=es",
        "search.sigma0=0.001",
        "search.learning_rate=5e-7",
        "search.fitness_shaping=zscore",
        *L16B16,
    ],
    # lowrank_es at the σ that bench_signal calibrated (σ 0.003 changes ~12 % of greedy answers, σ 0.001 few),
    # with α·σ kept at es-at-scale's α 5e-4
    "lowrank_es_s003": [
        "search.space=lowrank",
        "search.optimizer=es",
        "search.sigma0=0.003",
        "search.learning_rate=1.5e-6",
        "search.fitness_shaping=zscore",
        *L16B16,
    ],
    # es-at-scale's own scheme: full-shape Gaussian noise on every selected weight, one candidate at a time
    "full_es": [
        "search.space=full",
        "search.optimizer=es",
        "search.sigma0=0.001",
        "search.learning_rate=5e-7",
        "search.fitness_shaping=zscore",
        *L16B16,
    ],
    # ESSA on an int8 base (torchao weight-only, quantized in-process) from the same SFT adapter: QES's rival
    "int8_svd": ["model.quantization=int8", *FULL8],
    # QES on the merged SFT quantized to int8: integer noise of σ code units, error feedback, seed replay
    "qes_int8": [
        "model.quantization=int8",
        "search.space=qes",
        "search.optimizer=es",
        "search.sigma0=0.5",
        "search.learning_rate=0.3",
        "search.fitness_shaping=zscore",
        *L16B16,
    ],
}


def write_data(work: Path, held_out: int) -> tuple[Path, Path]:
    """train.jsonl and heldout.jsonl: distinct questions of the arithmetic generator, disjoint splits
    (with held_out = 400 the split of the built-in arithmetic task at run.seed 1234, eval.size 400)."""
    from essa_hpc.tasks import arithmetic

    train, held = arithmetic.generate(DATA_SEED, 2, ["+", "-"], TRAIN, HELD_OUT)
    held = held[:held_out]
    paths = []
    for name, qs in (("train", train), ("heldout", held)):
        p = work / f"{name}.jsonl"
        rows = [arithmetic.make_example(*q) for q in qs]
        p.write_text("".join(json.dumps({"prompt": e.prompt, "answer": e.answer, "response": e.response}) + "\n" for e in rows))
        paths.append(p)
    return paths[0], paths[1]


def common_overrides(train: Path, held: Path, args: argparse.Namespace) -> list[str]:
    return [
        "task.name=vs_grpo_task:reward",
        f"task.path={train}",
        f"task.val_path={held}",
        f"task.system_prompt={json.dumps(SYSTEM_PROMPT)}",
        f"eval.size={args.held_out}",
        f"backend.max_new_tokens={args.max_new_tokens}",
        "model.threads=1",
    ]


def env() -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "OMPI_", "PMIX_", "HYDRA_"))}
    e["PYTHONPATH"] = os.pathsep.join([str(REPO), str(BENCH), e.get("PYTHONPATH", "")])
    e["OMP_NUM_THREADS"] = "1"
    return e


def sets(overrides: list[str]) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


def sft_adapter(work: Path, common: list[str], args: argparse.Namespace) -> tuple[Path, dict[str, Any]]:
    """The converged SFT adapter, trained once per setting (cached under --cache)."""
    over = [
        *common,
        "sft.steps=0",
        f"sft.epochs={args.sft_epochs}",
        f"sft.examples={args.sft_examples}",
        f"sft.learning_rate={args.sft_lr}",
        "sft.batch_size=16",
        f"run.seed={DATA_SEED}",
        "model.threads=0",
    ]
    key = hashlib.sha256(json.dumps([o for o in over if not o.startswith(("task.path", "task.val_path"))]).encode()).hexdigest()[:12]
    out = Path(args.cache) / f"sft-{key}"
    if not (out / "adapter_model.safetensors").is_file():
        cmd = [sys.executable, "-m", "essa_hpc.sft", *sets(over), "--out", str(out)]
        print("training the SFT adapter:", " ".join(cmd[2:]), flush=True)
        r = subprocess.run(cmd, cwd=REPO, env={**env(), "OMP_NUM_THREADS": str(os.cpu_count() or 1)}, capture_output=True, text=True)
        if r.returncode != 0:
            raise SystemExit(f"SFT failed ({r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    stats = json.loads((out / "sft_stats.json").read_text())
    return out, {
        "path": str(out),
        "overrides": over,
        **{k: stats[k] for k in ("steps", "examples", "loss_first", "loss_tail_mean", "seconds")},
    }


def merged_model(adapter: Path) -> Path:
    """The SFT adapter merged into the base weights (essa-merge), cached beside it: the start of the
    weight spaces (lowrank, full), which search the base weights and refuse lora.adapter."""
    out = adapter.with_name(adapter.name + "-merged")
    if not (out / "config.json").is_file():
        cmd = [sys.executable, "-m", "essa_hpc.export", "--merge", str(adapter), "--out", str(out)]
        r = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True)
        if r.returncode != 0:
            raise SystemExit(f"essa-merge failed ({r.returncode}):\n{r.stderr[-2000:]}")
    return out


def start_of(variant: list[str], adapter: Path) -> str:
    """Where an ESSA variant starts from the SFT: its adapter (svd_lora), or the merged model (weight spaces)."""
    space = next((o.split("=", 1)[1] for o in variant if o.startswith("search.space=")), "svd_lora")
    return f"lora.adapter={adapter}" if space == "svd_lora" else f"model.path={merged_model(adapter)}"


def jobs(args: argparse.Namespace, common: list[str], adapter: Path, work: Path) -> list[dict[str, Any]]:
    budget = 60.0 * args.budget_min
    out: list[dict[str, Any]] = []
    for seed in args.seeds:
        essa = [
            {
                "label": f"essa-{v}",
                "method": "essa",
                "seed": seed,
                "module": "essa_hpc.run",
                "overrides": [
                    *common,
                    start_of(ESSA_VARIANTS[v], adapter),
                    f"run.seed={seed}",
                    f"run.train_budget_s={budget}",
                    "run.generations=100000",
                    f"eval.every={args.essa_eval_every}",
                    "log.checkpoint_every=1000",
                    *ESSA_VARIANTS[v],
                ],
            }
            for v in args.essa
        ]
        grpo = [
            {
                "label": f"grpo-lr{lr:g}" + (f"-g{group}" if group != 8 else ""),
                "method": "grpo",
                "seed": seed,
                "module": "essa_hpc.grpo",
                "overrides": [
                    *common,
                    f"lora.adapter={adapter}",
                    f"run.seed={seed}",
                    f"grpo.learning_rate={lr}",
                    f"grpo.time_budget_s={budget}",
                    "grpo.max_steps=100000",
                    f"grpo.group_size={group}",
                    f"grpo.prompts_per_step={args.grpo_prompts}",
                    f"eval.every={args.grpo_eval_every}",
                ],
            }
            for lr in args.grpo_lrs
            for group in args.grpo_groups
        ]
        for i in range(max(len(essa), len(grpo))):  # interleave: concurrent runs are of different methods
            out += [j[i] for j in (essa, grpo) if i < len(j)]
    for j in out:
        j["name"] = f"{j['label']}-s{j['seed']}"
        j["overrides"] += [f"run.dir={work / 'runs'}", f"run.name={j['name']}", "run.overwrite=true"]
    return out


def run_all(todo: list[dict[str, Any]], parallel: int, work: Path) -> None:
    """Each job in its own process, pinned to a free core, ``parallel`` at a time."""
    cores = list(range(parallel))
    running: list[tuple[subprocess.Popen[str], dict[str, Any], int, float]] = []
    queue = list(todo)
    while queue or running:
        while queue and cores:
            job, core = queue.pop(0), cores.pop(0)
            logf = (work / f"{job['name']}.out").open("w")
            cmd = ["taskset", "-c", str(core), sys.executable, "-m", job["module"], *sets(job["overrides"])]
            job["command"] = " ".join(["python", "-m", job["module"], *sets(job["overrides"])])
            p = subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=logf, stderr=subprocess.STDOUT, text=True)
            running.append((p, job, core, time.perf_counter()))
            print(f"[{time.strftime('%H:%M:%S')}] start {job['name']} on core {core}", flush=True)
        time.sleep(2.0)
        for item in list(running):
            p, job, core, t0 = item
            if p.poll() is None:
                continue
            running.remove(item)
            cores.append(core)
            job["returncode"], job["wall_s"] = p.returncode, time.perf_counter() - t0
            print(f"[{time.strftime('%H:%M:%S')}] done  {job['name']} rc={p.returncode} in {job['wall_s']:.0f} s", flush=True)
            done = [j for j in todo if "returncode" in j]  # kept after every job: an interrupted call still summarises
            (work / "jobs.json").write_text(json.dumps(done, indent=1))
            if p.returncode != 0:
                print((work / f"{job['name']}.out").read_text()[-3000:], flush=True)


def summarise(todo: list[dict[str, Any]], work: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Every run's record (its validation curve read from its log) and the table over them."""
    sys.path.insert(0, str(REPO))
    from essa_hpc.analysis import methods

    budget = 60.0 * args.budget_min
    marks = [60.0 * m for m in range(args.mark_every_min, int(args.budget_min) + 1, args.mark_every_min)]
    runs = []
    for job in todo:
        log = work / "runs" / job["name"] / "log.h5"
        if job.get("returncode") != 0 or not log.is_file():
            runs.append({k: job.get(k) for k in ("name", "label", "method", "seed", "returncode", "command")})
            continue
        c = methods.eval_curve(log, job["name"])
        start = float(c["accuracy"].iloc[0])
        at_budget = methods.value_at(c, "accuracy", budget)
        runs.append(
            {
                **{k: job[k] for k in ("name", "label", "method", "seed", "returncode", "wall_s", "command")},
                "start_accuracy": start,
                "accuracy_at_budget": at_budget,
                "gain_points": 100 * (at_budget - start),
                "accuracy_at_minutes": {f"{t / 60:g}": methods.value_at(c, "accuracy", t) for t in marks},
                "steps_or_generations": int(c["step"].iloc[-1]),
                "curve": c[["step", "train_time", "tokens", "accuracy", "mean_reward"]].round(6).to_dict(orient="list"),
            }
        )
    return {"runs": runs, **aggregate(runs, Path(args.out))}


def aggregate(runs: list[dict[str, Any]], out: Path) -> dict[str, Any]:
    """Per setting: gains over seeds; the targets (best ESSA against the best GRPO learning rate, both
    chosen by their mean gain over seeds); the overlay plot of every curve, beside ``out`` and named after
    it. Works on run records alone,
    so that results of separate calls (other seeds, other variants) combine (``--combine``)."""
    import numpy as np
    import pandas as pd

    sys.path.insert(0, str(REPO))
    from essa_hpc.analysis import methods, plots

    ok = [r for r in runs if "gain_points" in r]
    curves = {r["name"]: pd.DataFrame({"run": r["name"], "method": r["method"], **r["curve"]}) for r in ok}
    by_label: dict[str, list[dict[str, Any]]] = {}
    for r in ok:
        by_label.setdefault(r["label"], []).append(r)
    labels = {
        lab: {
            "method": rs[0]["method"],
            "seeds": [r["seed"] for r in rs],
            "gain_points_mean": float(np.mean([r["gain_points"] for r in rs])),
            "gain_points": [r["gain_points"] for r in rs],
            "accuracy_at_budget_mean": float(np.mean([r["accuracy_at_budget"] for r in rs])),
        }
        for lab, rs in by_label.items()
    }
    grpo = {k: v for k, v in labels.items() if v["method"] == "grpo"}
    essa = {k: v for k, v in labels.items() if v["method"] == "essa"}
    targets: dict[str, Any] = {}
    if grpo and essa:
        best_grpo = max(grpo, key=lambda k: grpo[k]["gain_points_mean"])
        best_essa = max(essa, key=lambda k: essa[k]["gain_points_mean"])
        g_gain, e_gain = grpo[best_grpo]["gain_points_mean"], essa[best_essa]["gain_points_mean"]
        # minutes the best ESSA setting needs, per seed both ran, to reach the best GRPO's accuracy at the budget
        reach = []
        for g in by_label[best_grpo]:
            e = [r for r in by_label[best_essa] if r["seed"] == g["seed"]]
            if e:
                reach.append(methods.time_to(curves[e[0]["name"]], "accuracy", g["accuracy_at_budget"]) / 60.0)
        targets = {
            "best_grpo": best_grpo,
            "best_grpo_gain_points": g_gain,
            "best_essa": best_essa,
            "best_essa_gain_points": e_gain,
            "essa_gain_at_least_2x_grpo": bool(e_gain >= 2 * g_gain and e_gain > 0),
            # the rule above holds trivially when GRPO's best loses: read it together with this
            "grpo_best_gained": bool(g_gain > 0),
            "essa_minutes_to_grpo_budget_accuracy": reach,
            # only a gain is a level to reach: below the SFT start, ESSA "reaches" it at minute 0
            "essa_reaches_it_within_7_min": bool(g_gain > 0 and reach and all(m <= 7.0 for m in reach)),
        }
    if curves:
        plots.method_overlay(pd.concat(curves.values(), ignore_index=True), "accuracy", out.parent, formats=("png",), stem=out.stem)
    return {"by_setting": labels, "targets": targets}


def combine(files: list[Path], out: Path) -> None:
    """One table over the runs of several result files (each run keeps its curve), for the same budget."""
    results = [json.loads(f.read_text()) for f in files]
    budgets = {r["settings"]["budget_min"] for r in results}
    if len(budgets) != 1:
        raise SystemExit(f"--combine: the files have different budgets {sorted(budgets)} (minutes); expected one")
    runs = [run | {"from": str(f)} for f, r in zip(files, results) for run in r["runs"]]
    combined = {
        "benchmark": results[0]["benchmark"],
        "command": "python bench/bench_vs_grpo.py " + " ".join(sys.argv[1:]),
        "combined_from": {str(f): {"command": r["command"], "sft": r["sft"], "date": r["date"]} for f, r in zip(files, results)},
        "settings": {"budget_min": budgets.pop()},
        "runs": runs,
        **aggregate(runs, out),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    out.write_text(json.dumps(combined, indent=1) + "\n")
    print(json.dumps({"by_setting": combined["by_setting"], "targets": combined["targets"]}, indent=1))
    print(f"wrote {out}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--budget-min", type=float, default=20.0, help="training minutes per run (validation excluded)")
    ap.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[1234, 1])
    ap.add_argument("--essa", type=lambda s: s.split(","), default=["default"], help=f"ESSA variants from {sorted(ESSA_VARIANTS)}")
    ap.add_argument("--grpo-lrs", type=lambda s: [float(x) for x in s.split(",") if x], default=[1e-4, 3e-4])
    ap.add_argument(
        "--grpo-groups",
        type=lambda s: [int(x) for x in s.split(",") if x],
        default=[8],
        help="GRPO group sizes (completions per prompt), each run at every --grpo-lrs; labels gain -g<G> when G is not 8",
    )
    ap.add_argument("--grpo-prompts", type=int, default=4)
    ap.add_argument("--essa-eval-every", type=int, default=4, help="generations between validations")
    ap.add_argument("--grpo-eval-every", type=int, default=4, help="optimizer steps between validations")
    ap.add_argument("--mark-every-min", type=int, default=5, help="report the accuracy every this many training minutes")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--held-out", type=int, default=HELD_OUT, help="held-out questions scored at every validation (smoke tests: fewer)")
    ap.add_argument("--sft-epochs", type=float, default=2.0)
    ap.add_argument("--sft-examples", type=int, default=800)
    ap.add_argument("--sft-lr", type=float, default=5e-4)
    ap.add_argument("--sft-adapter", help="use this PEFT adapter as the SFT start instead of training one")
    ap.add_argument("--parallel", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--cache", default=str(Path.home() / ".cache" / "essa_hpc" / "bench"))
    ap.add_argument("--workdir", default=str(Path.home() / ".cache" / "essa_hpc" / "bench" / "vs_grpo"))
    ap.add_argument("--summarise-only", action="store_true", help="re-read the run directories of an earlier call")
    ap.add_argument("--combine", type=lambda s: [Path(x) for x in s.split(",")], help="earlier result files: one table over their runs")
    ap.add_argument("--out", default=str(BENCH / "results" / "vs_grpo.json"))
    args = ap.parse_args()
    if args.combine:
        combine(args.combine, Path(args.out))
        return
    unknown = [v for v in args.essa if v not in ESSA_VARIANTS]
    if unknown:
        raise SystemExit(f"--essa: unknown variant(s) {unknown}; expected some of {sorted(ESSA_VARIANTS)}")

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    train, held = write_data(work, args.held_out)
    common = common_overrides(train, held, args)
    if args.sft_adapter:
        adapter, sft_info = Path(args.sft_adapter), {"path": args.sft_adapter, "given": True}
    else:
        adapter, sft_info = sft_adapter(work, common, args)
    todo = jobs(args, common, adapter, work)
    state = work / "jobs.json"
    t0 = time.perf_counter()
    if args.summarise_only:
        if not state.is_file():
            raise SystemExit(f"--summarise-only: {state} does not exist; no job of an earlier call in {work} has finished")
        todo = json.loads(state.read_text())
    else:
        run_all(todo, args.parallel, work)
        state.write_text(json.dumps(todo, indent=1))
    result = summarise(todo, work, args)
    out = {
        "benchmark": "ESSA vs GRPO (TRL) at equal training time (validation excluded), same SFT start, same reward and held-out set",
        "command": "python bench/bench_vs_grpo.py " + " ".join(sys.argv[1:]),
        "settings": {
            "budget_min": args.budget_min,
            "seeds": args.seeds,
            "essa_variants": {v: ESSA_VARIANTS[v] for v in args.essa},
            "grpo_learning_rates": args.grpo_lrs,
            "grpo_group_sizes": args.grpo_groups,
            "grpo_prompts_per_step": args.grpo_prompts,
            "held_out_questions": args.held_out,
            "train_questions": TRAIN,
            "max_new_tokens": args.max_new_tokens,
            "parallel_runs": args.parallel,
            "threads_per_run": 1,
        },
        "sft": sft_info,
        **result,
        "total_wall_s": time.perf_counter() - t0,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps({"by_setting": result["by_setting"], "targets": result["targets"]}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
