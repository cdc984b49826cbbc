"""The task registry: the paper's 22 tasks plus small offline tasks for the embedded demo.

A :class:`Task` names its source (first available of ``source`` then ``alt_sources``),
its classes, the paper's epoch count, and an optional :class:`View` that derives it from
the source: a class subset (relabelled ``0..k-1`` in the listed order), a fixed rotation
by multiples of 90 degrees (counter-clockwise, ``np.rot90``), a horizontal flip, and
colour inversion. Views are applied to the raw images, before resizing.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field, replace

from qvec_jax.data.sources import DigitsSource, FolderSource, IdxSource
from qvec_jax.data.tfds_source import TfdsSource

#: Every kind of image source a task can name.
Source = DigitsSource | IdxSource | FolderSource | TfdsSource

DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"


@dataclass(frozen=True)
class View:
    """A derived view: ``classes`` subset, ``rot90`` quarter turns, ``hflip``, ``invert``."""

    classes: tuple[int, ...] | None = None
    rot90: int = 0
    hflip: bool = False
    invert: bool = False

    def __post_init__(self):
        if self.classes is not None and len(set(self.classes)) != len(self.classes):
            raise ValueError(f"View.classes has duplicates: {self.classes}")
        if self.rot90 not in (0, 1, 2, 3):
            raise ValueError(f"View.rot90 must be 0, 1, 2 or 3 quarter turns, got {self.rot90}")

    @property
    def is_identity(self) -> bool:
        return self == View()

    def describe(self) -> str:
        parts = []
        if self.classes is not None:
            c = self.classes
            contiguous = len(c) > 2 and list(c) == list(range(c[0], c[0] + len(c)))
            parts.append(f"classes {c[0]}-{c[-1]}" if contiguous else f"classes {list(c)}")
        if self.rot90:
            parts.append(f"rot{90 * self.rot90}")
        if self.hflip:
            parts.append("hflip")
        if self.invert:
            parts.append("invert")
        return ", ".join(parts)


@dataclass(frozen=True)
class Task:
    """One classification task. ``num_classes``/``class_names`` are after the view."""

    name: str
    source: Source
    num_classes: int
    class_names: tuple[str, ...] = ()
    epochs: int | None = None
    view: View = field(default_factory=View)
    alt_sources: tuple[Source, ...] = ()
    base_num_classes: int | None = None  # classes of the source before the view
    paper: bool = False
    description: str = ""

    def __post_init__(self):
        base = self.base_num_classes or self.num_classes
        if self.view.classes is not None:
            bad = [c for c in self.view.classes if not 0 <= c < base]
            if bad:
                raise ValueError(f"task {self.name!r}: view classes {bad} outside 0..{base - 1}")
            if len(self.view.classes) != self.num_classes:
                raise ValueError(
                    f"task {self.name!r}: num_classes={self.num_classes} but the view keeps "
                    f"{len(self.view.classes)} classes"
                )
        if self.class_names and len(self.class_names) != self.num_classes:
            raise ValueError(
                f"task {self.name!r}: {len(self.class_names)} class names for "
                f"{self.num_classes} classes"
            )

    @property
    def sources(self) -> tuple[Source, ...]:
        return (self.source, *self.alt_sources)

    @property
    def source_num_classes(self) -> int:
        return self.base_num_classes or self.num_classes


TASKS: dict[str, Task] = {}


class UnknownTaskError(KeyError, ValueError):
    """An unknown task name (a KeyError, and a ValueError so the CLI prints it plainly)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def register_task(task: Task, *, overwrite: bool = False) -> Task:
    """Add ``task`` to :data:`TASKS` (refuses to replace an existing name unless ``overwrite``)."""
    if task.name in TASKS and not overwrite:
        raise ValueError(f"task {task.name!r} is already registered; pass overwrite=True")
    TASKS[task.name] = task
    return task


def derive(
    base: Task | str,
    name: str,
    *,
    classes=None,
    rot90: int = 0,
    hflip: bool = False,
    invert: bool = False,
    epochs: int | None = None,
    description: str = "",
) -> Task:
    """A view of ``base`` (composed with its own view) under a new name; not registered."""
    base = get_task(base) if isinstance(base, str) else base
    bv = base.view
    names = base.class_names
    if classes is not None:
        local = tuple(int(c) for c in classes)
        bad = [c for c in local if not 0 <= c < base.num_classes]
        if bad:
            raise ValueError(f"derive {name!r}: classes {bad} outside 0..{base.num_classes - 1}")
        names = tuple(names[c] for c in local) if names else ()
        classes = tuple(bv.classes[c] for c in local) if bv.classes is not None else local
    else:
        classes = bv.classes
    # Views apply rot90 then hflip; a flip then a quarter turn r equals a turn -r then a flip.
    rot = (bv.rot90 - rot90) if bv.hflip else (bv.rot90 + rot90)
    view = View(classes=classes, rot90=rot % 4, hflip=bv.hflip ^ hflip, invert=bv.invert ^ invert)
    return replace(
        base,
        name=name,
        view=view,
        num_classes=len(classes) if classes is not None else base.num_classes,
        class_names=names,
        epochs=epochs if epochs is not None else base.epochs,
        base_num_classes=base.source_num_classes,
        paper=False,
        description=description or f"{base.name} ({view.describe()})",
    )


def get_task(name: str) -> Task:
    """The task ``name``: a registered one, or a view of one (``digits@rot90=3,invert``,
    see :func:`parse_view`). An unknown name raises KeyError listing close matches."""
    if isinstance(name, Task):
        return name
    if isinstance(name, str) and VIEW_SEP in name:
        return parse_view(name)
    try:
        return TASKS[name]
    except KeyError:
        close = difflib.get_close_matches(str(name), list(TASKS), n=5, cutoff=0.5)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise UnknownTaskError(
            f"unknown task {name!r}.{hint} "
            f"Run `qvec tasks` to list the {len(TASKS)} registered tasks."
        ) from None


# ----------------------------------------------------------------------------- named views

VIEW_SEP = "@"
#: ``BASE@OPTIONS``, options comma-separated in this order (one spelling per view, so one
#: directory per view): ``classes=3,1,4`` (relabelled 0..k-1 in this order), ``rot90=N``
#: (N quarter turns), ``hflip``, ``invert``, ``epochs=N``.
VIEW_SYNTAX = "BASE@[classes=I,J,...][,rot90=1|2|3][,hflip][,invert][,epochs=N]"
_VIEW_KEYS = ("classes", "rot90", "epochs")
_VIEW_FLAGS = ("hflip", "invert")
_VIEW_ORDER = ("classes", "rot90", "hflip", "invert", "epochs")


def _view_error(name: str, why: str) -> UnknownTaskError:
    return UnknownTaskError(f"task view {name!r}: {why}; the syntax is {VIEW_SYNTAX}")


def _view_word(word: str, name: str) -> str:
    if word in _VIEW_KEYS + _VIEW_FLAGS:
        return word
    close = difflib.get_close_matches(word, _VIEW_ORDER, n=2, cutoff=0.5)
    hint = f" (did you mean {' or '.join(close)}?)" if close else ""
    raise _view_error(name, f"unknown option {word!r}{hint}")


def _view_int(text: str, name: str, key: str) -> int:
    if not text.isdigit() or str(int(text)) != text:
        raise _view_error(name, f"{key} takes non-negative integers without leading zeros, "
                          f"got {text!r}")  # fmt: skip
    return int(text)


def _view_options(spec: str, name: str) -> dict:
    """``"classes=0,2,rot90=1,invert"`` -> ``{"classes": [0, 2], "rot90": 1, "invert": True}``."""
    opts: dict = {}
    for tok in spec.split(","):
        key, eq, value = tok.partition("=")
        if not eq and key.isdigit() and list(opts)[-1:] == ["classes"]:
            opts["classes"].append(_view_int(key, name, "classes"))
            continue
        key = _view_word(key, name)
        if key in opts:
            raise _view_error(name, f"{key} is given twice")
        if (key in _VIEW_FLAGS) == bool(eq):
            form = f"{key} is a flag: write it bare" if eq else f"{key} needs a value: {key}=..."
            raise _view_error(name, form)
        opts[key] = True if key in _VIEW_FLAGS else _view_int(value, name, key)
        if key == "classes":
            opts[key] = [opts[key]]
    if opts.get("rot90") not in (None, 1, 2, 3) or opts.get("epochs") == 0:
        raise _view_error(name, "rot90 must be 1, 2 or 3 and epochs positive")
    if list(opts) != [k for k in _VIEW_ORDER if k in opts]:
        canonical = ",".join(k for k in _VIEW_ORDER if k in opts)
        raise _view_error(name, f"write the options in the order {canonical} (one name per view)")
    return opts


def parse_view(name: str) -> Task:
    """The task named ``BASE@OPTIONS``: :func:`derive` of the registered task ``BASE``.

    ``fashion_mnist@classes=0,2,4,6,8`` keeps the even classes (relabelled 0..4);
    ``digits@rot90=3,invert`` turns the images three quarter turns and inverts them.
    The name itself is the task's name (and its run directory's name): it holds no ``/``
    and has one spelling per view, so the same name always finds the same runs.
    """
    base, _, spec = name.partition(VIEW_SEP)
    if not spec or VIEW_SEP in spec or "/" in name or any(c.isspace() for c in name):
        raise _view_error(name, "expected one BASE@OPTIONS without '/' or spaces")
    opts = _view_options(spec, name)
    try:
        return derive(get_task(base), name, **opts)
    except UnknownTaskError:
        raise
    except ValueError as e:
        raise _view_error(name, str(e)) from None


def split_task_names(text: str) -> list[str]:
    """Split a comma-separated task list whose views hold commas themselves:
    ``"digits,fmnist_a@classes=0,2,rot90=1,digits@invert"`` -> three names."""
    names: list[str] = []
    for tok in (t.strip() for t in str(text).split(",")):
        word = tok.partition("=")[0]
        continues = tok.isdigit() or word in _VIEW_KEYS + _VIEW_FLAGS
        if names and VIEW_SEP in names[-1] and continues:
            names[-1] += "," + tok
        elif tok:
            names.append(tok)
    return names


def list_tasks(*, paper_only: bool = False) -> list[str]:
    """Registered task names (the paper's 22 first, in METHOD.md order)."""
    return [n for n, t in TASKS.items() if t.paper or not paper_only]


# ----------------------------------------------------------------------------- the paper's tasks

_DIGIT_NAMES = tuple(str(i) for i in range(10))
_FASHION = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
_CIFAR10 = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"
)  # fmt: skip
_STL10 = ("airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck")
_EUROSAT = (
    "AnnualCrop", "Forest", "HerbaceousVegetation", "Highway", "Industrial",
    "Pasture", "PermanentCrop", "Residential", "River", "SeaLake",
)  # fmt: skip
_FER = ("angry", "disgust", "fear", "happy", "neutral", "sad", "surprise")
_KMNIST = ("o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo")

# name, primary source, alternatives, num_classes, class names, epochs (METHOD.md), notes
_PAPER = [
    ("cars", TfdsSource("cars196"), (), 196, (), 35, ""),
    ("dtd", TfdsSource("dtd", train="train+validation"), (), 47, (), 76, "train = train+val"),
    ("eurosat", TfdsSource("eurosat/rgb", train="train[:80%]", test="train[80%:]"), (),
     10, _EUROSAT, 12, "TFDS has one split: first 80% train, last 20% test"),
    ("gtsrb", FolderSource("gtsrb"), (), 43, (), 11, "folder gtsrb/{train,test}/00000..00042"),
    ("mnist", IdxSource("mnist"), (TfdsSource("mnist"),), 10, _DIGIT_NAMES, 5, ""),
    ("resisc45", TfdsSource("resisc45", train="train[:80%]", test="train[80%:]",
     manual=("NWPU-RESISC45.rar",)), (), 45, (), 15, "manual download; 80/20 split"),
    ("sun397", TfdsSource("sun397/standard-part1-120k"), (), 397, (), 14, ""),
    ("svhn", TfdsSource("svhn_cropped"), (), 10, _DIGIT_NAMES, 4, "extra split unused"),
    ("cifar10", TfdsSource("cifar10"), (), 10, _CIFAR10, 6, ""),
    ("cifar100", TfdsSource("cifar100"), (), 100, (), 6, ""),
    ("stl10", TfdsSource("stl10"), (), 10, _STL10, 60, ""),
    ("food101", TfdsSource("food101", test="validation"), (), 101, (), 4, "test = validation"),
    ("flowers102", TfdsSource("oxford_flowers102", train="train+validation"), (), 102, (), 147,
     "train = train+val"),
    ("fer2013", FolderSource("fer2013"), (), 7, _FER, 10, "folder fer2013/{train,test}/<emotion>"),
    ("pcam", TfdsSource("patch_camelyon"), (), 2, ("no tumor", "tumor"), 1, ""),
    ("pets", TfdsSource("oxford_iiit_pet"), (), 37, (), 82, ""),
    ("renderedsst2", FolderSource("renderedsst2"), (), 2, ("negative", "positive"), 39,
     "folder renderedsst2/{train,test}/{negative,positive}"),
    ("emnist", IdxSource("emnist", prefix="emnist-digits-", transpose=True),
     (TfdsSource("emnist/digits"),), 10, _DIGIT_NAMES, 2, "EMNIST digits split (assumed)"),
    ("fashion_mnist", IdxSource("fashion-mnist", fallbacks=(DEBIAN_FASHION_MNIST,)),
     (TfdsSource("fashion_mnist"),), 10, _FASHION, 5, "IDX first (Debian dataset-fashion-mnist)"),
    ("kmnist", IdxSource("kmnist"), (TfdsSource("kmnist"),), 10, _KMNIST, 5, ""),
    ("tiny_imagenet", FolderSource("tiny_imagenet"), (), 200, (), 4,
     "folder tiny_imagenet/{train,test}/<wnid>; test = official val"),
    ("imagenet", TfdsSource("imagenet2012", test="validation",
     manual=("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar")), (), 1000, (), 1,
     "manual download; test = validation"),
]  # fmt: skip

for _name, _src, _alt, _k, _names, _ep, _note in _PAPER:
    register_task(
        Task(_name, _src, _k, _names, _ep, alt_sources=_alt, paper=True, description=_note)
    )

# ----------------------------------------------------------------------------- offline demo tasks

register_task(
    Task(
        "digits",
        DigitsSource(),
        10,
        _DIGIT_NAMES,
        15,
        description="scikit-learn digits, 8x8 (embedded default; fixed 80/20 test split)",
    )
)
for _t in [
    derive("digits", "digits_rot90", rot90=1),
    derive("digits", "digits_inv", invert=True),
    derive("digits", "digits_flip", hflip=True),
    derive("digits", "digits_a", classes=range(5)),
    derive("digits", "digits_b", classes=range(5, 10)),
    derive("fashion_mnist", "fmnist_a", classes=range(5), epochs=3),
    derive("fashion_mnist", "fmnist_b", classes=range(5, 10), epochs=3),
    derive("fashion_mnist", "fmnist_rot90", rot90=1, epochs=3),
    derive("fashion_mnist", "fmnist_inv", invert=True, epochs=3),
    derive("fashion_mnist", "fmnist_flip", hflip=True, epochs=3),
]:
    register_task(_t)
