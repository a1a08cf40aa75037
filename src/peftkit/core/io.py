"""Reading and writing adapter folders; every write goes to a temporary name first.

Files are created with the permissions the umask gives (as ``open`` does), not the 0600
of ``tempfile``, so that a server running as another user can read them.
"""

from __future__ import annotations

import functools
import os
import re
import secrets
import shutil
import stat
import sys
from collections.abc import Callable

import torch

__all__ = [
    "WEIGHTS_NAME",
    "atomic_write",
    "atomic_write_folder",
    "atomic_write_text",
    "load_tensors",
    "make_temp_dir",
    "resolve_adapter_dir",
    "save_tensors",
]

WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Calls ``write(tmp_path)`` then renames ``tmp_path`` to ``path``; a crash leaves any
    previous file at ``path`` intact."""
    path = os.fspath(path)
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    tmp = _new_temp_file(directory, "." + os.path.basename(path) + ".")
    try:
        mode = stat.S_IMODE(os.stat(tmp).st_mode)
        write(tmp)
        if stat.S_IMODE(os.stat(tmp).st_mode) != mode:  # a writer that made its own file (safetensors: 0600)
            os.chmod(tmp, mode)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _new_temp_file(directory: str, prefix: str) -> str:
    """An empty new file ``<prefix><random>.tmp``, created with mode 0666 less the umask."""
    while True:
        path = os.path.join(directory, f"{prefix}{secrets.token_hex(4)}.tmp")
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return path


def make_temp_dir(parent: str | os.PathLike, prefix: str) -> str:
    """A new empty folder ``<prefix><random>`` in ``parent``, with mode 0777 less the umask
    (``tempfile.mkdtemp`` makes it 0700, which other users cannot read once it is renamed)."""
    parent = os.fspath(parent)
    os.makedirs(parent, exist_ok=True)
    while True:
        path = os.path.join(parent, prefix + secrets.token_hex(4))
        try:
            os.mkdir(path, 0o777)
        except FileExistsError:
            continue
        return path


# -- whole folders ---------------------------------------------------------------------------
# A folder write works in ``.<name>.peftkit-tmp-<pid>-<random>`` beside the target; the
# fallback swap parks the old folder at ``.<name>.peftkit-old-<pid>-<random>``. Only names of
# this form, of a process no longer running, are ever removed by a later write.
_TEMP_KINDS = re.compile(r"(tmp|old)-([0-9]+)-[0-9a-f]+")


def atomic_write_folder(target: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Calls ``write(tmp_dir)`` on a new folder next to ``target``, then swaps it in for
    ``target``, so that a reader finds the old complete folder or the new complete one and a
    crash leaves the old one in place.

    Entries of an existing ``target`` that ``write`` did not write (a tokenizer saved beside
    the adapter, another adapter's subfolder) are carried over as hard links (copies where
    the file system has none). Temporary folders that a killed write left for the same
    target are removed first. A symlinked ``target`` keeps its link: the folder it points to
    is replaced.
    """
    target = os.path.realpath(os.fspath(target))
    parent, name = os.path.split(target)
    if os.path.lexists(target) and not os.path.isdir(target):
        raise ValueError(f"{target!r} exists and is not a folder")
    _clear_leftovers(parent, name)
    tmp = make_temp_dir(parent, f".{name}.peftkit-tmp-{os.getpid()}-")
    try:
        write(tmp)
        if os.path.isdir(target):
            shutil.copymode(target, tmp)
            _carry_over(target, tmp)
        _fsync_dir(tmp)
        _swap_in(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(parent)


def _clear_leftovers(parent: str, name: str) -> None:
    """Removes the temporary folders of killed writes to ``parent/name``. A killed fallback
    swap may have parked the old folder aside with ``name`` still missing: it is put back."""
    if not os.path.isdir(parent):
        return
    stem = f".{name}.peftkit-"
    for entry in os.scandir(parent):
        match = _TEMP_KINDS.fullmatch(entry.name[len(stem):]) if entry.name.startswith(stem) else None
        if match is None or not entry.is_dir(follow_symlinks=False) or _is_running(int(match.group(2))):
            continue
        target = os.path.join(parent, name)
        if match.group(1) == "old" and not os.path.lexists(target):
            os.rename(entry.path, target)
        else:
            shutil.rmtree(entry.path, ignore_errors=True)


def _is_running(pid: int) -> bool:
    """Whether process ``pid`` runs on this machine (a write in progress keeps its folder)."""
    if pid == os.getpid():
        return True
    if os.name != "posix":  # os.kill(pid, 0) would send CTRL_C_EVENT on Windows
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: it runs, as another user
        return True
    return True


def _carry_over(old: str, new: str) -> None:
    """Links into ``new`` every entry of ``old`` that ``new`` lacks, folder by folder."""
    for entry in os.scandir(old):
        dest = os.path.join(new, entry.name)
        if entry.is_dir(follow_symlinks=False):
            if not os.path.lexists(dest):
                os.mkdir(dest)
                shutil.copymode(entry.path, dest)
            if os.path.isdir(dest) and not os.path.islink(dest):
                _carry_over(entry.path, dest)
        elif os.path.lexists(dest):
            continue
        elif entry.is_symlink():
            os.symlink(os.readlink(entry.path), dest)
        elif entry.is_file(follow_symlinks=False):
            try:
                os.link(entry.path, dest)
            except OSError:
                shutil.copy2(entry.path, dest)


def _swap_in(new: str, target: str) -> None:
    """Puts folder ``new`` at ``target`` and deletes the folder that was there."""
    cwd = _cwd_inside(target)
    if not os.path.lexists(target):
        os.rename(new, target)
    elif _exchange(new, target):  # one atomic step: ``new`` now names the old folder
        shutil.rmtree(new, ignore_errors=True)
    else:
        parent, name = os.path.split(target)
        aside = os.path.join(parent, f".{name}.peftkit-old-{os.getpid()}-{secrets.token_hex(4)}")
        os.rename(target, aside)
        try:
            os.rename(new, target)
        except BaseException:
            os.rename(aside, target)
            raise
        shutil.rmtree(aside, ignore_errors=True)
    if cwd is not None:  # the process was inside the old folder: follow it to the new one
        os.chdir(cwd)


def _cwd_inside(folder: str) -> str | None:
    try:
        cwd = os.getcwd()
    except FileNotFoundError:
        return None
    return cwd if cwd == folder or cwd.startswith(folder.rstrip(os.sep) + os.sep) else None


def _exchange(a: str, b: str) -> bool:
    """Swaps two paths atomically (Linux ``renameat2(RENAME_EXCHANGE)``); False where the
    system or the file system cannot."""
    renameat2 = _renameat2()
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


@functools.cache
def _renameat2() -> Callable[..., int] | None:
    if sys.platform != "linux":
        return None
    import ctypes

    try:
        func = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # a C library older than glibc 2.28
        return None
    func.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    func.restype = ctypes.c_int
    return func


def _fsync_dir(path: str) -> None:
    """Makes a folder's entries durable (POSIX; elsewhere a no-op)."""
    if os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


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
