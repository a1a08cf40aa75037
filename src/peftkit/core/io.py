"""Reading and writing adapter folders; every write goes to a temporary name first."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable

import torch

__all__ = ["WEIGHTS_NAME", "atomic_write", "atomic_write_text", "load_tensors", "resolve_adapter_dir", "save_tensors"]

WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Calls ``write(tmp_path)`` then renames ``tmp_path`` to ``path``; a crash leaves any
    previous file at ``path`` intact."""
    path = os.fspath(path)
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    def _write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)

    atomic_write(path, _write)


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Writes a safetensors file atomically (tensors made contiguous, shared storage split)."""
    from safetensors.torch import save_file

    clean = {k: v.detach().contiguous().clone() if _shares_storage(v, tensors) else v.detach().contiguous() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(clean, tmp, metadata=metadata or {"format": "pt"}))


def _shares_storage(t: torch.Tensor, tensors: dict[str, torch.Tensor]) -> bool:
    ptr = t.untyped_storage().data_ptr()
    return sum(1 for o in tensors.values() if o.untyped_storage().data_ptr() == ptr) > 1


def load_tensors(directory: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Reads the adapter weights of a folder (safetensors, or PEFT's older ``.bin``)."""
    directory = os.fspath(directory)
    path = os.path.join(directory, WEIGHTS_NAME)
    if os.path.isfile(path):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(path, device=str(device))
        except (SafetensorError, OSError, ValueError) as exc:
            raise ValueError(f"{path} could not be read ({exc}); the file is truncated or not a safetensors file") from exc
    legacy = os.path.join(directory, LEGACY_WEIGHTS_NAME)
    if os.path.isfile(legacy):
        try:
            return torch.load(legacy, map_location=device, weights_only=True)
        except Exception as exc:
            raise ValueError(f"{legacy} could not be read ({exc}); the file is truncated or corrupt") from exc
    raise FileNotFoundError(f"no {WEIGHTS_NAME} in {directory!r}")


def resolve_adapter_dir(path: str | os.PathLike, subfolder: str | None = None) -> str:
    """A local adapter folder for ``path``: a directory, or a hub id fetched with
    ``huggingface_hub`` when that is installed and reachable."""
    path = os.fspath(path)
    local = os.path.join(path, subfolder) if subfolder else path
    if os.path.isdir(local):
        return local
    if os.path.exists(path) or path.startswith((".", "/")) or os.sep in path.strip("/").replace("/", "", 1):
        raise FileNotFoundError(f"adapter folder {local!r} does not exist")
    try:
        from huggingface_hub import snapshot_download
    except ImportError as exc:
        raise FileNotFoundError(f"adapter folder {local!r} does not exist (and huggingface_hub is not installed)") from exc
    try:
        fetched = snapshot_download(path)
    except Exception as exc:
        raise FileNotFoundError(f"{path!r} is not a local folder and could not be fetched from the hub: {exc}") from exc
    return os.path.join(fetched, subfolder) if subfolder else fetched
