"""``qvec tune | study``: choose on a dev grid or dev-half study; measure every approach on
hundreds of pairs of one half of the view pool."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from qvec_jax import demo, report
from qvec_jax.cli.common import (
    QvecError,
    add_parser,
    check_folder,
    finite_floats,
    positive_int,
    writing,
)
from qvec_jax.cli.grid_cmds import grid_inputs, shard_spec
from qvec_jax.config import load_config
from qvec_jax.report import strategies
from qvec_jax.report import study_analysis as evidence
from qvec_jax.study import StudyError, StudySpec, run_study
from qvec_jax.study.run import REQUEST_FILE


def _count_or_all(text: str) -> int | None:
    return None if text == "all" else positive_int(text)


def add_study(sub) -> None:
    p = add_parser(
        sub,
        "study",
        "every approach on hundreds of task pairs of one half of the view pool, with intervals",
        "qvec study --half dev --views 16 --workdir runs/study-dev\n"
        "  qvec tune runs/study-dev          # choose the strategies' constants on dev\n"
        "  qvec study --half test --views 16 --workdir runs/study-test "
        "--tuned runs/study-dev/tune.json",
        "Fine-tune FP and QAT on K views of one half (dev: where choices are made; test: "
        "never used for choices) from one pretext backbone, run the transfer grid with every "
        "approach (RTN + QV at a lambda screen, the lambda strategies, leave-one-out merges, "
        "GPTQ per calibration source, GPTQ + QV), then write study.md, study.json and three "
        "plots with 95%% intervals from a bootstrap over tasks. Fine-tunes go to "
        "RUNS/<recipe fingerprint>/, shared by every study and demo with the same recipe. "
        "Resumes when rerun; --shard I/N splits it over N jobs sharing one workdir.",
    )
    _study_options(p)
    _choice_and_run_options(p)
    p.set_defaults(func=_cmd_study)


def _study_options(p) -> None:
    p.add_argument("--half", required=True, choices=("dev", "test"), help="which half of the pool")
    p.add_argument(
        "--views",
        type=_count_or_all,
        default=16,
        metavar="K|all",
        help="views sampled from the half (default 16: 240 pairs)",
    )
    p.add_argument("--seeds", type=positive_int, default=1, help="fine-tune seeds (default 1)")
    p.add_argument("--sample-seed", type=int, default=0, help="seed of the view sample")
    p.add_argument("--workdir", required=True, help="the study's folder (grids, report)")
    p.add_argument(
        "--runs-dir", default=None, help="shared fine-tune folder (default WORKDIR/runs)"
    )
    p.add_argument(
        "--eval-n",
        type=_count_or_all,
        default=2000,
        metavar="N|all",
        help="images per val/test split evaluated (a fixed sample; default 2000)",
    )
    p.add_argument(
        "--lambdas",
        type=finite_floats,
        default=None,
        help="RTN lambda screen, must hold 0 and 1 (default 0,0.25,...,1.5)",
    )
    p.add_argument(
        "--gptq-qv-donors",
        type=_count_or_all,
        default=3,
        metavar="K|all",
        help="GPTQ + QV for the K donors after each receiver (default 3)",
    )
    p.add_argument(
        "--bank-lambdas",
        type=finite_floats,
        default=None,
        help="lambdas of GPTQ on the leave-one-out bank (default 0.25,0.5,1)",
    )


def _choice_and_run_options(p) -> None:
    p.add_argument(
        "--strategy",
        default=None,
        help="the lambda strategy reported as the choice (default the recipe's)",
    )
    p.add_argument(
        "--tuned",
        default=None,
        metavar="TUNE_JSON",
        help="take the choice from `qvec tune`'s tune.json of a dev study",
    )
    p.add_argument(
        "--shard",
        type=shard_spec,
        default=None,
        metavar="I/N",
        help="compute only shard I of N (fine-tunes and cells); one lock per shard",
    )
    p.add_argument(
        "--no-wait",
        action="store_true",
        help="with --shard: exit instead of waiting for other shards' fine-tunes",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="key.sub=value",
        help=f"overrides of {demo.CONFIG.name} (the recipe)",
    )


def _choice(args) -> tuple[str | None, str]:
    """The reported strategy and where it came from."""
    if args.tuned and args.strategy:
        raise QvecError("--tuned and --strategy: give one")
    if args.tuned:
        path = Path(args.tuned)
        try:
            tuned = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise QvecError(f"--tuned {path}: cannot read tune.json ({e})") from None
        if not tuned.get("winner"):
            raise QvecError(f"--tuned {path}: holds no winner; rerun `qvec tune` on a dev study")
        return tuned["winner"], f"`qvec tune` on the dev half ({path})"
    if args.strategy:
        return args.strategy, "given with --strategy"
    return None, "the recipe's default (configs/demo_tiny.py demo.select_strategy)"


def _spec(args) -> StudySpec:
    kw = {} if args.lambdas is None else {"lambdas": tuple(args.lambdas)}
    if args.bank_lambdas is not None:
        kw["bank_lambdas"] = tuple(args.bank_lambdas)
    try:
        return StudySpec(
            args.half,
            views=args.views,
            seeds=args.seeds,
            sample_seed=args.sample_seed,
            eval_n=args.eval_n,
            gptq_qv_donors=args.gptq_qv_donors,
            **kw,
        )
    except StudyError as e:
        raise QvecError(str(e)) from None


def _cmd_study(args) -> int:
    spec, (strategy, source) = _spec(args), _choice(args)
    cfg = load_config(demo.CONFIG, args.overrides)
    check_folder(args.workdir, [demo.CONFIG], "--workdir")
    t0 = time.perf_counter()
    with writing(args.workdir, "--workdir"):
        try:
            res = run_study(
                cfg,
                spec,
                args.workdir,
                runs_dir=args.runs_dir,
                shard=args.shard,
                wait=not args.no_wait,
                progress=not args.no_progress,
            )
        except StudyError as e:
            raise QvecError(str(e)) from None
        if args.shard is not None:
            print(
                f"shard {args.shard[0]}/{args.shard[1]} done; once every shard is, rerun "
                "`qvec study` without --shard (same options) for the report"
            )
            return 0
        out = evidence.study_report(
            res["workdir"], strategy=strategy, strategy_source=source, seconds=res["seconds"]
        )
    for line in out["analysis"]["warnings"]:
        print(f"qvec study: WARNING: {line}", file=sys.stderr)
    print(evidence.headline(out["analysis"]))
    for name, p in out["paths"].items():
        print(f"  {name}: {p}")
    print(f"[study] {time.perf_counter() - t0:.0f} s")
    return 0


def add_tune(sub) -> None:
    p = add_parser(
        sub,
        "tune",
        "choose the lambda strategies' constants on a DEV grid (never on the test set)",
        "qvec tune runs/demo-dev/grid   # then: qvec demo demo.select_strategy=<winner>",
        "Re-decide every lambda strategy the grid measured (its --extras scores cells) at "
        "each value of its constant (report.tune.SEARCH), score them on the grid's "
        "cross-task pairs, and rank them by a rule fixed in advance: zero-shot only; at "
        "least lam=1's wins and no larger worst regret first; then the highest mean delta. "
        "Writes tune.md and tune.json and prints the winner. A grid whose tasks include a "
        "view of the test task set or of the study pool's test half (by view key, whatever "
        "its label) is refused, and so is an incomplete grid (fewer cells than its tasks x "
        "lambdas imply).",
    )
    p.add_argument(
        "run_dir",
        metavar="RUN_DIR",
        help="DEV grid workdir (with --extras cells), or a dev-half study's workdir",
    )  # fmt: skip
    p.add_argument("--out", default=None, help="folder for tune.md/tune.json (default: RUN_DIR)")
    p.set_defaults(func=_cmd_tune)


def _study_grid(run_dir: str) -> str:
    """A study workdir's grid (its first seed's), or ``run_dir`` itself."""
    spec = Path(run_dir) / REQUEST_FILE
    if not spec.is_file():
        return run_dir
    try:
        seeds = json.loads(spec.read_text()).get("seeds") or []
    except json.JSONDecodeError as e:
        raise QvecError(f"{spec}: corrupt JSON ({e}); rerun `qvec study`") from None
    grid_dir = Path(run_dir) / f"seed-{seeds[0]}" / "grid" if seeds else Path(run_dir)
    print(f"study {run_dir}: tuning on its grid {grid_dir}")
    return str(grid_dir)


def _cmd_tune(args) -> int:
    args.out = args.out or args.run_dir
    args.run_dir = _study_grid(args.run_dir)
    out = args.out
    check_folder(out, grid_inputs(args.run_dir), "--out")
    with writing(out, "--out"):
        try:
            res = report.tune_grid(args.run_dir, args.out)
        except report.TuneError as e:
            raise QvecError(f"{args.run_dir}: {e}") from None
    one = res["lam1"]["stats"]
    print(f"{res['n_pairs']} cross-task pairs of the {res['task_set'] or 'unlabelled'} task set; "
          f"lam=1: {one['wins']} wins, mean delta {100 * one['mean_delta']:+.1f} pts")  # fmt: skip
    if res["winner"]:
        row = next(r for r in res["rows"] if r["name"] == res["winner"])
        w = row["stats"]
        regret = "n/a" if w["worst_regret"] is None else f"{100 * w['worst_regret']:.1f} pts"
        print(f"winner: {res['winner']} ({'safe' if res['safe'] else 'NOT safe'} vs lam=1): "
              f"{w['wins']} wins, mean delta {100 * w['mean_delta']:+.1f} pts, worst regret "
              f"{regret} (optimistic: chosen on these pairs)")  # fmt: skip
        shared = row.get("overlap") or {}
        if shared.get("hit") or shared.get("unknown"):
            print(f"note: the winner's data: {strategies.data_label(row)}")
    print(f"wrote {res['paths']['tune_md']} and {res['paths']['tune_json']}")
    return 0


__all__ = ["add_study", "add_tune"]
