"""Uploading adapters to a Hugging Face hub endpoint (``huggingface_hub``, imported lazily)."""

from __future__ import annotations

import os
import tempfile
from typing import Any

from torch import nn

__all__ = ["push_adapters_to_hub"]


def push_adapters_to_hub(model: nn.Module, repo_id: str, *, private: bool | None = None, token: str | None = None,
                         commit_message: str = "Upload adapter", create_pr: bool = False, **kwargs: Any) -> Any:
    """Saves ``model``'s adapters (``model.save_pretrained``) and uploads the folder to
    ``repo_id``, creating the repository when needed.

    Raises:
        ImportError: ``huggingface_hub`` is not installed.
        ConnectionError: the hub cannot be reached (offline mode or no network).
    """
    try:
        import huggingface_hub
        from huggingface_hub import constants
    except ImportError as exc:
        raise ImportError("push_to_hub needs huggingface_hub: pip install huggingface_hub") from exc
    if constants.HF_HUB_OFFLINE:
        raise ConnectionError(
            f"cannot push to {repo_id!r}: the hub is in offline mode (HF_HUB_OFFLINE=1). Save the adapter with "
            "save_pretrained(folder) and upload it when online, or unset HF_HUB_OFFLINE"
        )
    selected = kwargs.pop("selected_adapters", None)
    api = huggingface_hub.HfApi(endpoint=kwargs.pop("endpoint", None), token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            folder = os.path.join(tmp, "adapter")
            model.save_pretrained(folder, selected_adapters=selected)  # type: ignore[operator]
            return api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message=commit_message,
                                     create_pr=create_pr, **kwargs)
    except (OSError, huggingface_hub.errors.HfHubHTTPError) as exc:
        if isinstance(exc, huggingface_hub.errors.HfHubHTTPError) and getattr(exc, "response", None) is not None:
            raise
        raise ConnectionError(f"cannot push to {repo_id!r}: the hub at {api.endpoint} is not reachable ({exc})") from exc
