"""Safe readers of foreign checkpoint files: arrays out, never code executed.

numpy with ``allow_pickle=False`` for ``.npz``, safetensors' numpy API for
``.safetensors`` (no torch needed). Pickle-based files (``.pt``, ``.bin``, ...) are
refused with the one-line command that converts them to safetensors.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from qvec_jax.checkpoints import CheckpointError

PICKLE_SUFFIXES = {".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt", ".tar"}


def _pickle_refusal(path: Path) -> CheckpointError:
    dst = path.with_suffix(".safetensors")
    return CheckpointError(
        f"{path}: refusing to load a pickle-based checkpoint (loading it could execute "
        "arbitrary code). Convert it to safetensors once, in an environment you trust:\n"
        '  python -c "import torch; from safetensors.torch import save_file; '
        f"sd = torch.load('{path}', map_location='cpu', weights_only=True); "
        "sd = sd.get('state_dict', sd.get('model', sd)); "
        f"save_file({{k: v.contiguous() for k, v in sd.items()}}, '{dst}')\"\n"
        "then pass the .safetensors file."
    )


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    with open(path, "rb") as f:
        magic = f.read(2)
    if magic[:1] == b"\x80":
        raise _pickle_refusal(path)
    if magic != b"PK":
        raise CheckpointError(
            f"{path}: corrupt or truncated .npz (not a zip archive); download it again"
        )
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: np.asarray(z[k]) for k in z.files}
    except ValueError as e:
        if "pickle" in str(e):
            raise CheckpointError(f"{path}: contains pickled objects, refusing to load") from e
        raise CheckpointError(f"{path}: not a readable .npz ({e}); download it again") from e
    except Exception as e:  # BadZipFile, EOFError, zlib.error, OSError...
        raise CheckpointError(
            f"{path}: corrupt or truncated .npz ({type(e).__name__}: {e}); download it again"
        ) from e


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises SafetensorError / OSError
        raise CheckpointError(
            f"{path}: corrupt or truncated .safetensors ({type(e).__name__}: {e}); "
            "download or convert it again"
        ) from e


def read_file(path: Path) -> dict[str, np.ndarray]:
    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        raise _pickle_refusal(path)
    if suffix == ".npz":
        return _read_npz(path)
    if suffix == ".safetensors":
        return _read_safetensors(path)
    with open(path, "rb") as f:
        head = f.read(16)
    if head[:1] == b"\x80" or (head[:2] == b"PK" and _zip_has_pickle(path)):
        raise _pickle_refusal(path)
    if head[:2] == b"PK":
        return _read_npz(path)
    if len(head) >= 9 and head[8:9] == b"{":
        return _read_safetensors(path)
    raise CheckpointError(
        f"{path}: unknown checkpoint format; expected a Google .npz, a timm/Hugging Face "
        ".safetensors file, or a qvec checkpoint directory"
    )


def _zip_has_pickle(path: Path) -> bool:
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            return any(n.endswith(".pkl") for n in z.namelist())
    except zipfile.BadZipFile:
        return False


def read_dir(path: Path) -> tuple[dict[str, np.ndarray], dict]:
    """A Hugging Face model directory: all ``*.safetensors`` shards (+ config.json if any)."""
    files = sorted(path.glob("*.safetensors"))
    if not files:
        found = sorted(p.name for p in path.iterdir())[:10]
        raise CheckpointError(
            f"{path}: directory holds no *.safetensors and is no qvec checkpoint (found {found}); "
            "pass the checkpoint file itself"
        )
    flat: dict[str, np.ndarray] = {}
    for f in files:
        flat.update(_read_safetensors(f))
    cfg = path / "config.json"
    return flat, json.loads(cfg.read_text()) if cfg.exists() else {}
