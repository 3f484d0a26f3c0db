"""Can timm get a model's pretrained weights here? Decided at once, before timm tries.

Offline (HF_HUB_OFFLINE set, or no route to the host) timm waits for the hub's timeouts and
retries before failing; a weight file already in the Hugging Face or torch hub cache needs
no network at all.
"""
from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlparse

import timm
import torch

HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin")
CONNECT_TIMEOUT = 5.0  # seconds


def _cached(cfg) -> bool:
    if getattr(cfg, "file", None) and Path(cfg.file).is_file():
        return True
    if getattr(cfg, "hf_hub_id", None):
        from huggingface_hub import try_to_load_from_cache
        repo = cfg.hf_hub_id.split("@")[0]
        if any(isinstance(try_to_load_from_cache(repo, f), str) for f in HF_WEIGHT_FILES):
            return True
    if getattr(cfg, "url", None):
        name = os.path.basename(urlparse(cfg.url).path)
        return (Path(torch.hub.get_dir()) / "checkpoints" / name).is_file()
    return False


def _offline_env() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def download_problem(name: str) -> str | None:
    """Why timm could not fetch the pretrained weights of `name` now (None: it can, or they
    are cached, or timm knows no weights for the name and will say so itself)."""
    try:
        cfg = timm.models.get_pretrained_cfg(name)
    except Exception:
        return None
    if cfg is None or _cached(cfg):
        return None
    if _offline_env():
        return "HF_HUB_OFFLINE is set and they are not in the local cache"
    if getattr(cfg, "hf_hub_id", None):
        host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    else:
        host = urlparse(cfg.url or "").hostname
    if not host:
        return None
    try:
        socket.create_connection((host, 443), timeout=CONNECT_TIMEOUT).close()
    except OSError as e:
        return f"{host} cannot be reached ({e.strerror or e}) and they are not in the local cache"
    return None
