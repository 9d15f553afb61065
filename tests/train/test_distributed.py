"""DDP: two CPU processes (gloo) train the real BiMatting for a few steps and stay identical.

SyncBatchNorm is CUDA-only in PyTorch, so on CPU each process keeps its own BatchNorm
statistics (rank 0's are broadcast at every forward); the *parameters* must still agree
bit for bit because DDP all-reduces the gradients before each identical Adam update.
"""
import os
import socket

import torch
import torch.multiprocessing as mp

from bimatting_triton.train.config import get_config
from bimatting_triton.train.loop import Trainer

WORLD = 2


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, out_dir: str, result_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank))
    cfg = get_config("tiny", out_dir=out_dir, max_steps=3, seg_every=2, val_clips=2, threads=1, device="cpu", log_every=1000)
    trainer = Trainer(cfg, log=lambda m: None)
    assert trainer.info.world_size == WORLD and trainer.info.rank == rank
    init = {k: v.detach().clone() for k, v in trainer.model.named_parameters()}
    losses = []
    step = trainer.matting_step

    def recording_step(batch, ratio, tag):
        values = step(batch, ratio, tag)
        losses.append(values[f"{tag}/loss"])
        return values

    trainer.matting_step = recording_step
    shard = list(trainer.streams["train"].sampler)
    result = trainer.fit()
    torch.save(
        {
            "params": {k: v.detach().clone() for k, v in trainer.model.named_parameters()},
            "init": init,
            "losses": losses,
            "shard": shard,
            "final": result.final,
        },
        os.path.join(result_dir, f"rank{rank}.pt"),
    )
    torch.distributed.destroy_process_group()


def test_two_gloo_processes_keep_identical_replicas(tmp_path):
    out_dir, result_dir = tmp_path / "run", tmp_path / "results"
    result_dir.mkdir()
    mp.spawn(_worker, args=(_free_port(), str(out_dir), str(result_dir)), nprocs=WORLD, join=True)
    r0, r1 = (torch.load(result_dir / f"rank{r}.pt", weights_only=True) for r in range(WORLD))
    # Each process trained on its own half of the data ...
    assert set(r0["shard"]).isdisjoint(r1["shard"])
    assert r0["losses"] != r1["losses"]
    # ... yet the replicas are bitwise identical, and they did move.
    assert r0["params"].keys() == r1["params"].keys()
    for k in r0["params"]:
        assert torch.equal(r0["params"][k], r1["params"][k]), k
    moved = [k for k in r0["params"] if not torch.equal(r0["params"][k], r0["init"][k])]
    assert len(moved) > len(r0["params"]) // 2
    # Validation is sharded and all-reduced: both ranks report the same numbers.
    assert r0["final"] == r1["final"]
    assert (out_dir / "last.pt").is_file()  # written once, by rank 0
