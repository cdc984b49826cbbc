"""``qvec study``'s runs: the pretext backbone, the FP and QAT fine-tunes of the sampled
views, and one transfer grid (with its extras and GPTQ rows) per fine-tune seed.

Layout. Fine-tunes live in a runs directory keyed by the recipe's fingerprint
(:func:`recipe_fingerprint`), so two studies, or a study and a demo run with
``--runs-dir``, that share a recipe share their checkpoints::

    RUNS/<fingerprint>/pretext/                  the backbone (demo's recipe)
    RUNS/<fingerprint>/seed-<seed>/<task>/fp     FP fine-tune of one view
    RUNS/<fingerprint>/seed-<seed>/<task>/qat    QAT fine-tune, same seed and data order

The study's own results live in its workdir: ``request.json`` (what was asked),
``seed-<seed>/grid/`` (one ``grid.run_grid`` workdir per seed) and the report.
Every stage resumes (``train.finetune`` and ``run_grid`` skip what is done); a shard
(``--shard i/n``) fine-tunes the views ``i, i+n, ...``, waits for the other shards'
checkpoints, then computes its shard of each grid under its own lock.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from pathlib import Path

from qvec_jax import config as qconfig
from qvec_jax import data as qdata
from qvec_jax import grid, train
from qvec_jax.data import task_sets
from qvec_jax.files import WorkdirLocked, atomic_write_text

__all__ = [
    "DEFAULT_BANK_LAMBDAS",
    "DEFAULT_LAMBDAS",
    "REQUEST_FILE",
    "StudyError",
    "StudySpec",
    "finetune_views",
    "recipe_fingerprint",
    "run_study",
    "runs_root",
    "seed_values",
]

#: The lambda screen: 0 (so lambda_best never does worse than PTQ(FP_R) on val) and 1.
DEFAULT_LAMBDAS = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5)
#: The bank's lambdas under GPTQ (``grid.BankCells``): 1 (zero-shot) and two smaller ones,
#: since GPTQ already corrects part of what the QV corrects for RTN.
DEFAULT_BANK_LAMBDAS = (0.25, 0.5, 1.0)
#: What a study workdir was asked for (``study.json`` is the analysis, the report's).
REQUEST_FILE = "request.json"


class StudyError(ValueError):
    """A study request that cannot run (bad option, another study in the workdir)."""


@dataclasses.dataclass(frozen=True)
class StudySpec:
    """What a study measures. ``views``: how many views of ``half`` (None: all), sampled
    by ``sample_seed`` (:func:`task_sets.study_views`: a smaller sample is a prefix of a
    larger one); ``seeds``: fine-tune seeds (the recipe's seed, then +1, +2, ...);
    ``lambdas``: the RTN screen; ``eval_n``: a fixed sample of at most this many images
    per val and test split (None: whole splits); ``methods``: leave-one-out merges;
    ``gptq_calib``: images per GPTQ calibration set; ``gptq_qv_donors``: GPTQ+QV for the
    donors that follow each receiver (None: every pair); ``bank_lambdas``: GPTQ of the
    receiver patched with the leave-one-out bank of each method, at these lambdas."""

    half: str
    views: int | None = 16
    seeds: int = 1
    sample_seed: int = 0
    lambdas: tuple[float, ...] = DEFAULT_LAMBDAS
    eval_n: int | None = 2000
    methods: tuple[str, ...] = ("mean", "ties")
    gptq_calib: int = 128
    gptq_qv_donors: int | None = 3
    bank_lambdas: tuple[float, ...] = DEFAULT_BANK_LAMBDAS

    def __post_init__(self):
        if self.half not in task_sets.HALF_NAMES:
            raise StudyError(f"--half {self.half!r}: use one of {task_sets.HALF_NAMES}")
        if isinstance(self.seeds, bool) or not 1 <= int(self.seeds) <= 100:
            raise StudyError(f"--seeds {self.seeds!r}: a whole number 1..100")
        if 0.0 not in self.lambdas or 1.0 not in self.lambdas:
            raise StudyError(f"--lambdas {list(self.lambdas)}: the screen must hold 0 and 1")
        try:
            self.tasks()
        except ValueError as e:
            raise StudyError(f"--views: {e}") from None
        object.__setattr__(self, "lambdas", tuple(float(x) for x in self.lambdas))
        object.__setattr__(self, "methods", tuple(self.methods))
        bank = tuple(float(x) for x in self.bank_lambdas)
        if not bank or len(set(bank)) != len(bank) or not all(math.isfinite(x) for x in bank):
            raise StudyError(f"--bank-lambdas {list(self.bank_lambdas)}: distinct finite numbers")
        object.__setattr__(self, "bank_lambdas", bank)

    def tasks(self) -> list[str]:
        return task_sets.study_views(self.half, self.views, self.sample_seed)

    def to_dict(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def defaults(cls) -> dict:
        """The JSON of every field's default (``half`` excepted: it has none)."""
        fields = {f.name: f.default for f in dataclasses.fields(cls) if f.name != "half"}
        return json.loads(json.dumps(fields))


def recipe_fingerprint(cfg) -> str:
    """12 hex digits of the recipe: the pretext run and the fine-tune config with its
    task, mode, seed and backbone path blanked (what every fine-tune of a study shares);
    the ``demo`` settings that are not training (``config.NOT_TRAINING``) and the input
    settings that change only the speed (``config.SPEED_ONLY``) do not count."""
    ft = qconfig.apply_overrides(
        cfg, [("task", "digits"), ("mode", "fp"), ("seed", 0), ("init.path", "")]
    )
    pre = qconfig.pretext_config(cfg, cfg.demo.pretext_task, float(cfg.demo.pretext_epochs))

    text = json.dumps([qconfig.training_json(pre), qconfig.training_json(ft)], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def runs_root(runs_dir, cfg) -> Path:
    """``RUNS/<fingerprint>``: where this recipe's pretext and fine-tunes live, links
    resolved: when the fingerprint's definition changes but not the training (as when
    issue 22 made ``config.SPEED_ONLY`` keys stop counting), ``RUNS/<new>`` may link to
    ``RUNS/<old>``; each fine-tune's own config check (``config.training_diff``) still
    refuses a run trained otherwise."""
    return (Path(runs_dir) / recipe_fingerprint(cfg)).resolve()


def seed_values(cfg, seeds: int) -> list[int]:
    """The fine-tune seeds of a study: the recipe's seed, then +1, +2, ..."""
    return [int(cfg.seed) + i for i in range(int(seeds))]


def _pretext(cfg, root: Path, progress: bool) -> Path:
    """Train (or reuse) the pretext backbone; its params' path."""
    d = cfg.demo
    pre = qconfig.pretext_config(cfg, d.pretext_task, float(d.pretext_epochs))
    said = False
    while True:  # shards started together: one trains the backbone, the others wait
        try:
            r = train.finetune(pre, str(root / "pretext"), progress=progress)
            break
        except WorkdirLocked:
            if not said:
                print(f"[study] waiting: another process is training {root / 'pretext'}")
                said = True
            time.sleep(10)
    print(f"[study] pretext {d.pretext_task}: test accuracy {r['test']['fp']:.3f}")
    return root / "pretext" / "params"


def finetune_views(cfg, root: Path, tasks, seeds: list[int], *, shard=None, progress=True):
    """FP and QAT fine-tunes of ``tasks`` for each seed, under ``root`` (the pretext
    first); a shard ``(i, n)`` trains the views ``i, i+n, ...`` only."""
    backbone = _pretext(cfg, root, progress)
    ft = qconfig.apply_overrides(cfg, [("init.kind", "pretrained"), ("init.path", str(backbone))])
    mine = [t for k, t in enumerate(tasks) if shard is None or k % shard[1] == shard[0]]
    jobs = [(s, t, m) for s in seeds for t in mine for m in ("fp", "qat")]
    spent, trained = 0.0, 0
    for j, (seed, task, mode) in enumerate(jobs):
        run = qconfig.apply_overrides(ft, [("task", task), ("mode", mode), ("seed", seed)])
        workdir = root / f"seed-{seed}" / task / mode
        done, t0 = (workdir / "results.json").exists(), time.perf_counter()
        r = train.finetune(run, str(workdir), progress=progress)
        if not done:  # the ETA counts the runs trained here, not those reused
            spent, trained = spent + time.perf_counter() - t0, trained + 1
        todo = sum(
            not (root / f"seed-{s}" / t / m / "results.json").exists() for s, t, m in jobs[j + 1 :]
        )
        left = spent / max(trained, 1) * todo
        print(
            f"[study] fine-tune {j + 1}/{len(jobs)} seed {seed} {task} {mode}: test "
            f"{r['test']['fp']:.3f}, PTQ {r['test']['ptq']:.3f} (ETA {left / 60:.0f} min)"
        )


def _wait_for(root: Path, tasks, seeds, wait: bool) -> None:
    """Block until every fine-tune of the study is finished (other shards train them)."""

    def missing():
        return [
            f"seed-{s}/{t}/{m}"
            for s in seeds
            for t in tasks
            for m in ("fp", "qat")
            if not (root / f"seed-{s}" / t / m / "results.json").exists()
        ]

    last = 0.0
    while todo := missing():
        if not wait:
            raise StudyError(
                f"{len(todo)} fine-tunes are not finished (first: {root / todo[0]}); run the "
                "other shards, then rerun this one"
            )
        if time.monotonic() - last > 300:
            print(f"[study] waiting for {len(todo)} fine-tunes of other shards ({todo[0]}, ...)")
            last = time.monotonic()
        time.sleep(10)


def _check_workdir(workdir: Path, spec: StudySpec, fingerprint: str, seeds: list[int]) -> None:
    """Refuse a workdir that holds another study; write ``request.json`` otherwise."""
    path = workdir / REQUEST_FILE
    want = {"spec": spec.to_dict(), "recipe": fingerprint, "tasks": spec.tasks(), "seeds": seeds}
    if path.exists():
        try:
            old = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            msg = f"{path}: corrupt JSON ({e}); delete it or use another --workdir"
            raise StudyError(msg) from None
        # a spec key added since the study was asked for takes its default there
        old["spec"] = spec.defaults() | (old.get("spec") or {})
        if {k: old.get(k) for k in want} != want:
            differ = [k for k in want if old.get(k) != want[k]]
            raise StudyError(
                f"{workdir} holds another study (differs in: {', '.join(differ)}); use "
                "another --workdir"
            )
        return
    workdir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(want, indent=1) + "\n")


def _stages(cfg, spec: StudySpec) -> list:
    """The grid's extras, GPTQ rows and GPTQ of the leave-one-out banks (``qvec
    quantize``'s candidates) of a study (no strategy cells: strategies are scored from
    the extras' measurements, and the choice is ``qvec tune``'s)."""
    pretext = cfg.demo.pretext_task
    ex = grid.Extras(
        strategy=cfg.demo.select_strategy,
        methods=spec.methods,
        pretext=pretext,
        proxy_n=int(cfg.demo.proxy_size),
    )
    gq = grid.GptqCells(
        calib_size=spec.gptq_calib,
        strategy=None,
        pretext=pretext,
        qv_donors=spec.gptq_qv_donors,
    )
    bank = grid.BankCells(
        methods=spec.methods, lams=spec.bank_lambdas, calib_size=spec.gptq_calib, pretext=pretext
    )
    return [ex, gq, bank]


def _task_set(spec: StudySpec) -> dict:
    """``grid.json``'s ``task_set`` of a study grid."""
    about = "where choices are made" if spec.half == "dev" else "never used for choices"
    return {
        "name": f"{spec.half} half",
        "about": f"qvec study, {len(spec.tasks())} views of "
        f"the pool's {spec.half} half (data.task_sets.halves), {about}",
    }


def run_study(
    cfg, spec: StudySpec, workdir, *, runs_dir=None, shard=None, wait=True, progress=True
) -> dict:
    """Run (or resume) a study: fine-tunes, then one grid per seed. Returns
    ``{"workdir", "root", "tasks", "seeds", "grids": {seed: grid workdir}, "seconds"}``
    (``seconds``: this call's wall time per stage; resumed stages are quick)."""
    workdir = Path(workdir).resolve()
    tasks = spec.tasks()
    missing = [t for t in [cfg.demo.pretext_task, *tasks] if not qdata.availability(t)[0]]
    if missing:
        raise StudyError(
            f"{missing[0]} is not available: a study needs Fashion-MNIST and digits "
            "(`apt-get install dataset-fashion-mnist`, or set $QVEC_DATA_DIR)"
        )
    root = runs_root(runs_dir or workdir / "runs", cfg)
    seeds = seed_values(cfg, spec.seeds)
    _check_workdir(workdir, spec, root.name, seeds)
    print(
        f"[study] {spec.half} half: {len(tasks)} views, {len(tasks) * (len(tasks) - 1)} "
        f"pairs, seeds {seeds}; runs in {root}"
    )
    t0 = time.perf_counter()
    finetune_views(cfg, root, tasks, seeds, shard=shard, progress=progress)
    _wait_for(root, tasks, seeds, wait)
    seconds = {"fine-tunes": round(time.perf_counter() - t0, 1)}
    grids = {}
    for seed in seeds:
        gdir = workdir / f"seed-{seed}" / "grid"
        print(f"[study] grid of seed {seed}: {gdir}")
        grid.run_grid(
            tasks,
            root / f"seed-{seed}",
            gdir,
            bits=cfg.quant.bits,
            granularity=cfg.quant.granularity,
            lambdas=spec.lambdas,
            batch_size=int(cfg.demo.grid_batch_size),
            progress=progress,
            shard=shard,
            extras=_stages(cfg, spec),
            eval_n=spec.eval_n,
        )
        if shard is None:  # the whole grid's run names its task set (tune and report say it)
            store = grid.GridStore(gdir)
            store.write_meta(store.meta() | {"task_set": _task_set(spec)})
        grids[seed] = gdir
        seconds[f"grid, seed {seed}"] = round(time.perf_counter() - t0 - sum(seconds.values()), 1)
    return {
        "workdir": workdir,
        "root": root,
        "tasks": tasks,
        "seeds": seeds,
        "grids": grids,
        "seconds": seconds,
    }
