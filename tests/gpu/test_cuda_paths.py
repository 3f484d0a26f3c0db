"""CUDA paths that cannot run on the project's CPU machines; skipped cleanly without CUDA.

    python -m pytest tests/gpu
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_checkpoint_written_from_gpu_loads_on_cpu(tmp_path):
    import checkpoints
    model = torch.nn.Linear(4, 2).cuda()
    path = tmp_path / "c.pth"
    checkpoints._save({"model": model.state_dict()}, path)
    state = torch.load(path, weights_only=True)  # no map_location: must not need a GPU
    assert all(t.device.type == "cpu" for t in state["model"].values())


def test_nccl_reduces_on_the_current_gpu(tmp_path):
    import utils
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)
    try:
        assert utils.collective_device().type == "cuda"
        assert utils.all_reduce_sum([1.0, 2.0]) == [1.0, 2.0]
    finally:
        dist.destroy_process_group()
