"""``qvec demo``: the whole pipeline, offline, on the embedded default.

1. **Pretext.** Train a tiny ViT from scratch on a pretext task (Fashion-MNIST, all
   10 classes, when its IDX files are present; else scikit-learn digits). This is the
   shared "pretrained backbone", like the paper's ImageNet-21k ViT-B/16.
2. **Fine-tune.** FP and QAT fine-tunes of that backbone on each downstream task, with
   the same seed, head init and data order; small steps on the backbone (lr 1e-5, as
   the paper) so fine-tuning moves it only a little.
3. **Grid.** ``acc(PTQ(FP_R + lam * QV_D))`` for every donor, receiver and lambda.
4. **Report.** ``summary.md``, ``grid.csv`` and the heatmaps, printed and written.

Every stage resumes: a rerun with the same ``--workdir`` skips what is finished.
The recipe lives in ``configs/demo_tiny.py`` (``demo`` sub-config for this driver).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from qvec_jax import data as qdata
from qvec_jax import grid, report, study, train
from qvec_jax.config import apply_overrides, load_config, pretext_config
from qvec_jax.files import atomic_write_text
from qvec_jax.grid.store import GridStore

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo_tiny.py"

#: ``--quick``: digits only, a few steps; exercises every stage in about a minute.
QUICK = (
    "demo.pretext_task=digits",
    "demo.fallback_pretext_task=digits",
    "demo.fallback_pretext_epochs=3.0",
    "demo.pretext_epochs=3.0",
    "demo.pretext_warmup_steps=5",
    "demo.lambdas=(0.5, 1.0)",
    "demo.merge_methods=ties",
    "total_steps=12",
    "optim.warmup_steps=2",
    "checkpoint_every=6",
    "log_every=6",  # chunks cut at records and checkpoints: one scan length, one compile
)


#: ``--quick``'s tasks (digits views, none of them in a test set).
QUICK_TASKS = "digits_rot90,digits_inv,digits_flip"
#: The task sets named in the config (``demo.<name>_tasks``, ``demo.fallback_<name>_tasks``;
#: issue 12, ``data/task_sets.py``) and what the report says of each.
TASK_SETS = {
    "test": "never used for choices",
    "dev": "where the recipe and its constants are chosen",
}


@dataclass(frozen=True)
class DemoTasks:
    """What the demo runs on: the pretext task, its epochs, the downstream tasks, the task
    set (``{"name", "about"}``: grid.json's ``task_set``, the report's intro line) and a
    note to print (why it fell back to digits), if any."""

    pretext: str
    pretext_epochs: float
    tasks: list[str]
    task_set: dict
    note: str = ""


def choose_tasks(cfg, which: str = "test") -> DemoTasks:
    """The demo's tasks for ``which``: a set of the config (``test``, ``dev``), ``quick``,
    or a comma list of task names (``custom``). Without the pretext's or a named set's
    files, the digits-only fallback (pretext and set), said out loud in the note."""
    d, data_dir = cfg.demo, cfg.data.data_dir or None
    named = {"quick": QUICK_TASKS, **{k: d[f"{k}_tasks"] for k in TASK_SETS}}
    tasks = qdata.split_task_names(named.get(which, which))
    missing = [t for t in [d.pretext_task, *tasks] if not qdata.availability(t, data_dir)[0]]
    if not missing:
        label = task_set_label(cfg, which, fallback=False)
        return DemoTasks(d.pretext_task, float(d.pretext_epochs), tasks, label)
    if which in TASK_SETS:
        tasks = qdata.split_task_names(d[f"fallback_{which}_tasks"])
    fell_back = f" and its digits-only {which} set" if which in TASK_SETS else ""
    note = (
        f"{', '.join(missing)} not available on this machine, so the demo falls back to "
        f"the digits pretext{fell_back}. For the Fashion-MNIST demo: `apt-get install "
        f"dataset-fashion-mnist`, or put its IDX files in $QVEC_DATA_DIR/fashion-mnist."
    )
    for t in [d.fallback_pretext_task, *tasks]:
        ok, _, why = qdata.availability(t, data_dir)
        if not ok:
            raise FileNotFoundError(f"demo task {t!r} is not available: {why}")
    label = task_set_label(cfg, which, fallback=True)
    return DemoTasks(d.fallback_pretext_task, float(d.fallback_pretext_epochs), tasks, label, note)


def task_set_label(cfg, which: str, *, fallback: bool) -> dict:
    """``{"name", "about"}`` of the tasks ``which`` names; a config set overridden on the
    command line is ``custom``, not the fixed set."""
    if which == "quick":
        return {"name": "quick", "about": "digits only, a few steps: checks the pipeline"}
    if which not in TASK_SETS:
        return {"name": "custom", "about": "tasks named with --tasks, not a fixed set"}
    key = f"{'fallback_' if fallback else ''}{which}_tasks"
    if cfg.demo[key] != load_config(CONFIG).demo[key]:
        return {"name": "custom", "about": f"demo.{key} overridden, not the fixed {which} set"}
    where = "digits-only fallback, " if fallback else ""
    return {"name": which, "about": f"{where}fixed in configs/{CONFIG.name}, {TASK_SETS[which]}"}


def set_line(task_set: dict) -> str:
    """``task set: NAME (ABOUT)``: how the output and the report name the task set."""
    return f"task set: {task_set['name']} ({task_set['about']})"


def label_grid(grid_dir: Path, task_set: dict) -> None:
    """Record the task set in the grid's ``grid.json`` (``qvec grid`` rewrites that file
    without it, so a grid recomputed by hand is not labelled with a set it may not be)."""
    store = GridStore(grid_dir)
    store.write_meta(store.meta() | {"task_set": task_set})


def _load(overrides, quick: bool):
    if not CONFIG.is_file():
        raise FileNotFoundError(
            f"{CONFIG} not found: the demo reads configs/ from the repository, so install "
            "from a clone: git clone <repo> && pip install -e <repo>"
        )
    return load_config(CONFIG, [*(QUICK if quick else ()), *overrides])


def _finetune_all(cfg, workdir: Path, tasks: list[str], progress: bool) -> Path:
    """Stage 2: FP and QAT fine-tunes of the pretext backbone on every task; their dir."""
    ft = apply_overrides(
        cfg, [("init.kind", "pretrained"), ("init.path", str(workdir / "pretext" / "params"))]
    )
    runs = workdir / "runs"
    print(f"[demo] 2/4 fine-tune FP and QAT on {', '.join(tasks)}")
    for t in tasks:
        for mode in ("fp", "qat"):
            r = train.finetune(
                apply_overrides(ft, [("task", t), ("mode", mode)]),
                str(runs / t / mode),
                progress=progress,
            )
            print(
                f"[demo]     {t:>14s} {mode:3s}: test FP {r['test']['fp']:.3f}, "
                f"after {cfg.quant.bits}-bit PTQ {r['test']['ptq']:.3f}"
            )
    return runs


def _pretext_and_finetunes(cfg, chosen: DemoTasks, workdir: Path, runs_dir, progress, stage):
    """Stages 1-2 (``stage("pretext")`` after the first, in the workdir); their runs dir."""
    if runs_dir is not None:
        return _shared_finetunes(cfg, chosen, runs_dir, progress)  # one stage for both
    pre = train.finetune(
        pretext_config(cfg, chosen.pretext, chosen.pretext_epochs),
        str(workdir / "pretext"),
        progress=progress,
    )
    stage("pretext")
    print(f"[demo]     pretext test accuracy {pre['test']['fp']:.3f}")
    return _finetune_all(cfg, workdir, chosen.tasks, progress)


def _shared_finetunes(cfg, chosen: DemoTasks, runs_dir, progress: bool) -> Path:
    """Stages 1-2 in a shared runs dir (``--runs-dir``): the pretext and fine-tunes of the
    recipe ``RUNS/<fingerprint>/`` that studies use too; the seed's runs dir."""
    rcfg = apply_overrides(
        cfg, [("demo.pretext_task", chosen.pretext), ("demo.pretext_epochs", chosen.pretext_epochs)]
    )
    root = study.run.runs_root(runs_dir, rcfg)
    print(f"[demo] 2/4 fine-tune FP and QAT in the shared {root}")
    study.run.finetune_views(rcfg, root, chosen.tasks, [int(cfg.seed)], progress=progress)
    return root / f"seed-{int(cfg.seed)}"


def extras_of(cfg, pretext: str) -> grid.extras.Extras | None:
    """The grid's extras of the demo config (None when ``demo.extras`` is off)."""
    d = cfg.demo
    if not d.extras:
        return None
    return grid.extras.Extras(
        strategy=d.select_strategy,
        methods=tuple(m for m in d.merge_methods.split(",") if m),
        pretext=pretext,
        proxy_n=int(d.proxy_size),
    )


def gptq_of(cfg, pretext: str, extras: grid.extras.Extras | None) -> grid.gptq.GptqCells | None:
    """The grid's GPTQ rows of the demo config (None when ``demo.gptq`` is off); with
    ``extras``, their strategy (sized to ``demo.proxy_size``), as ``qvec grid`` does."""
    d = cfg.demo
    if not d.gptq:
        return None
    strategy = extras.strategy if extras is not None else d.select_strategy
    return grid.gptq.GptqCells(
        calib_size=int(d.gptq_calib_size), strategy=strategy, pretext=pretext
    )


def _grid(cfg, workdir: Path, runs: Path, tasks: list[str], progress: bool, extras):
    """Stage 3: the donor x receiver x lambda grid (and its extras); its cells."""
    lambdas = [float(x) for x in cfg.demo.lambdas]
    print(
        f"[demo] 3/4 grid: {len(tasks)} donors x {len(tasks)} receivers x "
        f"{len(lambdas)} lambdas at {cfg.quant.bits} bits"
    )
    return grid.run_grid(
        tasks,
        runs,
        workdir / "grid",
        bits=cfg.quant.bits,
        granularity=cfg.quant.granularity,
        lambdas=lambdas,
        batch_size=int(cfg.demo.grid_batch_size),
        data_dir=cfg.data.data_dir or None,
        progress=progress,
        extras=extras,
    )


def run_demo(
    workdir: str | os.PathLike,
    overrides=(),
    *,
    quick: bool = False,
    progress: bool = True,
    tasks: str | None = None,
    runs_dir: str | os.PathLike | None = None,
) -> dict:
    """Run (or resume) the demo in ``workdir``; returns the report's paths and summary.
    ``tasks``: ``"test"`` (the default; ``"quick"`` with ``quick``), ``"dev"`` or a comma
    list of task names (see :func:`choose_tasks`). ``runs_dir``: keep the pretext and the
    fine-tunes there, keyed by the recipe's fingerprint, shared with ``qvec study``
    (:mod:`qvec_jax.study.run`); default: in ``workdir``."""
    cfg = _load(overrides, quick)
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    chosen = choose_tasks(cfg, tasks or ("quick" if quick else "test"))
    pretext, tasks, note = chosen.pretext, chosen.tasks, chosen.note
    if note:
        print(f"note: {note}")
    print(f"[demo] {set_line(chosen.task_set)}: {', '.join(tasks)}")
    # the extras' and GPTQ rows' settings are checked before any training
    ex = extras_of(cfg, pretext)
    extras = [s for s in (ex, gptq_of(cfg, pretext, ex)) if s is not None]
    t0, times = time.perf_counter(), {}

    def stage(name):
        times[name] = round(time.perf_counter() - t0 - sum(times.values()), 1)
        print(f"[demo] {name} done ({times[name]:.0f} s; total {sum(times.values()):.0f} s)")

    print(f"[demo] 1/4 pretext: {cfg.model.variant} from scratch on {pretext}")
    runs = _pretext_and_finetunes(cfg, chosen, workdir, runs_dir, progress, stage)
    stage("finetune")
    cells = _grid(cfg, workdir, runs, tasks, progress, extras)
    label_grid(workdir / "grid", chosen.task_set)
    stage("grid")
    out = report.write_report(workdir / "grid", cells=cells, extras=bool(cfg.demo.extras))
    stage("report")
    info = {
        "pretext": pretext,
        "tasks": tasks,
        "task_set": chosen.task_set,
        "note": note,
        "seconds": times,
        "report": {k: str(v) for k, v in out["paths"].items()},
    }
    atomic_write_text(workdir / "demo.json", json.dumps(info, indent=1) + "\n")
    print("\n" + out["summary"])
    print(f"[demo] report: {workdir / 'grid'}  (summary.md, grid.csv, *.png)")
    print(f"[demo] {set_line(chosen.task_set)}")
    print(f"[demo] total {sum(times.values()):.0f} s")
    return {**out, **info}
