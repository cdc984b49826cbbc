"""``qvec tasks | finetune | demo``: the commands that run experiments (``grid`` and
``report`` are in :mod:`.grid_cmds`)."""

from __future__ import annotations

import argparse
import json

from qvec_jax import config as qconfig
from qvec_jax import data, demo, train
from qvec_jax.cli.common import (
    check_folder,
    positive_int,
    task_names,
    writing,
)

# ----------------------------------------------------------------------------- tasks


def add_tasks(sub) -> None:
    p = sub.add_parser(
        "tasks",
        help="list registered tasks, their sources, and whether they are available here",
        description=(
            "List every registered task with its source, classes, epochs (METHOD.md)\n"
            "and whether its data is available on this machine.\n\n"
            "Wherever a task name is accepted (tasks, finetune --task, eval --task,\n"
            "grid --tasks, demo --tasks), a view of any task can be named:\n\n"
            f"  {data.VIEW_SYNTAX}\n\n"
            "classes keeps those classes, relabelled 0..k-1 in the order given; rot90\n"
            "turns the images N quarter turns counter-clockwise; hflip mirrors them;\n"
            "invert inverts the colours; epochs replaces the task's epoch count. The\n"
            "options go in this order: the name is also the name of the run directory\n"
            "(RUNS/<task>/<mode>), so each view has one spelling."
        ),
        epilog="examples:\n  qvec tasks\n  qvec tasks -v fashion_mnist\n"
        "  qvec tasks fashion_mnist@classes=0,2,4,6,8 digits@rot90=3,invert",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("name", nargs="*", help="only these tasks")
    p.add_argument(
        "--data-dir", default=None, help="data root (default $QVEC_DATA_DIR, ~/tensorflow_datasets)"
    )
    p.add_argument("--paper", action="store_true", help="only the paper's 22 tasks")
    p.add_argument("-v", "--verbose", action="store_true", help="say what each missing task needs")
    p.set_defaults(func=_cmd_tasks)


def _cmd_tasks(args) -> int:
    names = data.list_tasks(paper_only=args.paper)
    if args.name:
        names = [data.get_task(n).name for n in args.name]
    root = data.data_root(args.data_dir)
    print(f"data root: {root}  (--data-dir or $QVEC_DATA_DIR)")
    header = f"{'task':<15} {'source':<40} {'classes':>7} {'epochs':>6}  available"
    print(header)
    print("-" * len(header))
    n_ok = 0
    for name in names:
        t = data.get_task(name)
        ok, src, where = data.availability(t, root)
        n_ok += ok
        view = f" [{t.view.describe()}]" if not t.view.is_identity else ""
        epochs = "-" if t.epochs is None else str(t.epochs)
        status = f"yes  {where}" if ok else "no"
        print(f"{name:<15} {(src + view):<40} {t.num_classes:>7} {epochs:>6}  {status}")
        if not ok and args.verbose:
            print(f"{'':<15} why: {where}")
    print(f"{n_ok} of {len(names)} tasks available on this machine")
    if not args.verbose and n_ok < len(names):
        print("run `qvec tasks -v` to see what each missing task needs")
    return 0


# ----------------------------------------------------------------------------- finetune

#: What ``train.finetune`` writes in its workdir (and removes there under --force).
FINETUNE_WRITES = ("config.json", "ckpt", "params", "metrics.jsonl", "results.json")


def add_finetune(sub) -> None:
    p = sub.add_parser(
        "finetune",
        help="FP or QAT fine-tune of a backbone on a task (resumable)",
        description=(
            "Fine-tune FP or QAT from a config file. Rerunning with the same --workdir "
            "resumes from the latest checkpoint; a finished run is not redone."
        ),
    )
    p.add_argument("--config", required=True, help="Python file with get_config()")
    p.add_argument("--task", help="task name (overrides the config's task)")
    p.add_argument("--mode", choices=train.MODES, help="fp or qat (overrides the config's mode)")
    p.add_argument("--workdir", required=True, help="run directory (created; resumed if present)")
    p.add_argument(
        "--force",
        action="store_true",
        help="start over in a workdir that holds a run with another config",
    )
    p.add_argument(
        "--stop-after",
        type=positive_int,
        default=None,
        help="train at most N steps now, then checkpoint and exit",
    )
    p.add_argument(
        "--distributed", action="store_true", help="call jax.distributed.initialize() (multi-host)"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    p.set_defaults(func=_cmd_finetune)


def _cmd_finetune(args) -> int:
    train.maybe_initialize_distributed(args.distributed)
    extra = []
    if args.task:
        extra.append(("task", task_names(args.task, "--task", one=True)[0]))
    if args.mode:
        extra.append(("mode", args.mode))
    cfg = qconfig.load_config(args.config, args.overrides)
    cfg = qconfig.apply_overrides(cfg, extra)
    inputs = [args.config] + ([cfg.init.path] if cfg.init.kind == "pretrained" else [])
    check_folder(args.workdir, [i for i in inputs if i], "--workdir", FINETUNE_WRITES)
    with writing(args.workdir, "--workdir"):
        res = train.finetune(
            cfg,
            args.workdir,
            force=args.force,
            stop_after=args.stop_after,
            progress=not args.no_progress,
        )
    if "stopped_at" in res:
        print(f"stopped at step {res['stopped_at']}/{res['total_steps']}; rerun to resume")
        return 0
    print(json.dumps(res, indent=2))
    return 0


# ----------------------------------------------------------------------------- demo


def add_demo(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="the whole pipeline offline on the embedded default (tiny ViT)",
        description=(
            "Pretrain a tiny ViT, fine-tune FP and QAT on a task set (--tasks), run the "
            "donor x receiver x lambda transfer grid at 2 bits, and write the report. "
            "Resumes when rerun with the same --workdir."
        ),
        epilog="example: qvec demo --workdir runs/demo\n"
        "         qvec demo --tasks dev --workdir runs/demo-dev   # choices are made here\n"
        "         qvec demo --quick --workdir /tmp/demo   # about a minute",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--workdir", default="runs/demo", help="output folder (default runs/demo)")
    p.add_argument(
        "--quick",
        action="store_true",
        help="digits only, a few steps: checks the pipeline, not the method",
    )
    p.add_argument(
        "--tasks",
        default=None,
        metavar="SET",
        help="test (the default): the test task set of configs/demo_tiny.py, drawn once and "
        "never used for choices; dev: its dev set, where the recipe is chosen (use another "
        "--workdir); or a comma list of task names (labelled custom). The report names it",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument(
        "--runs-dir",
        default=None,
        help="keep the pretext and fine-tunes in this shared folder, keyed by the recipe's "
        "fingerprint, as `qvec study --runs-dir` does (they reuse each other's runs)",
    )
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="key.sub=value",
        help=f"overrides of {demo.CONFIG.name}, e.g. total_steps=600",
    )
    p.set_defaults(func=_cmd_demo)


def _cmd_demo(args) -> int:
    check_folder(args.workdir, [demo.CONFIG], "--workdir")
    with writing(args.workdir, "--workdir"):
        demo.run_demo(
            args.workdir,
            args.overrides,
            quick=args.quick,
            progress=not args.no_progress,
            tasks=args.tasks,
            runs_dir=args.runs_dir,
        )
    return 0
