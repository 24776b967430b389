"""Run under ``torchrun --nproc_per_node 2`` on CPU: exercises utils' distributed helpers for real (gloo).

Prints ``RANK<r> OK`` on success; any failed check raises, so torchrun exits non-zero.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import utils  # noqa: E402
import checkpointing
import distributed
from precision import LossScaler, NonFiniteLossError, NonFiniteLossWatch
import metric_logging  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    distributed.add_distributed_args(parser)
    parser.add_argument("--output_dir", required=True)
    args = parser.parse_args()
    args.device = "cpu"

    distributed.init_distributed_mode(args)
    rank = int(os.environ["RANK"])
    assert args.distributed and args.world_size == 2 and args.rank == rank, vars(args)
    assert args.dist_backend == "gloo" and args.local_rank == int(os.environ["LOCAL_RANK"])
    assert distributed.get_rank() == rank and distributed.get_world_size() == 2
    assert distributed.is_main_process() == (rank == 0)

    # all_reduce_mean: numbers and tensors
    assert distributed.all_reduce_mean(float(rank)) == 0.5
    t = distributed.all_reduce_mean(torch.tensor([float(rank), 2.0 * rank]))
    assert isinstance(t, torch.Tensor) and torch.allclose(t, torch.tensor([0.5, 1.0])), t

    # MetricLogger: rank 0 logs 1 and 3, rank 1 logs 5 -> global average over 3 samples is 3
    ml = metric_logging.MetricLogger()
    for v in ([1.0, 3.0] if rank == 0 else [5.0]):
        ml.update(loss=torch.tensor(v))
    ml.synchronize_between_processes()
    assert ml.loss.count == 3 and abs(ml.loss.global_avg - 3.0) < 1e-9, (ml.loss.count, ml.loss.global_avg)

    # seeds differ per rank
    assert utils.setup_seed(0) == rank
    draws = [None, None]
    dist.all_gather_object(draws, torch.rand(2).tolist())
    assert draws[0] != draws[1]

    # checkpoint: every rank calls save_checkpoint, only rank 0 writes
    writes = []
    real_write = utils._atomic_write

    def recording_write(path, fn):
        writes.append(str(path))
        real_write(path, fn)

    utils._atomic_write = recording_write
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = LossScaler("fp32", "cpu")
    norm = scaler(model(torch.randn(3, 4)).sum(), opt)
    assert isinstance(norm, torch.Tensor)
    ck_args = argparse.Namespace(output_dir=args.output_dir, save_ckpt_freq=1, epochs=1, resume="",
                                 auto_resume=True, start_epoch=0)
    rng_before = torch.rand(1)
    written = checkpointing.save_checkpoint(ck_args, 0, model, opt, scaler, global_step=5)
    if rank == 0:
        assert len(written) == 2 and len(writes) == 2, (written, writes)
    else:
        assert written == [] and writes == [], (written, writes)
    distributed.barrier()
    names = sorted(os.listdir(args.output_dir))
    assert names == ["checkpoint-0.pth", "checkpoint-latest.pth"], names

    # resume on every rank restores that rank's own RNG stream
    expected_next = torch.rand(1)
    torch.manual_seed(999)
    model2 = nn.Linear(4, 2)
    info = checkpointing.auto_load_model(ck_args, model2, torch.optim.AdamW(model2.parameters(), lr=1e-3), scaler)
    assert info.global_step == 5 and ck_args.start_epoch == 1
    assert torch.equal(model2.weight, model.weight)
    assert torch.equal(torch.rand(1), expected_next) and not torch.equal(rng_before, expected_next)

    # a loss that is not finite on one rank only stops both ranks at the same check (no rank waits for the other)
    watch = NonFiniteLossWatch(epoch=3, steps_per_epoch=10, start_step=30, device=torch.device("cpu"))
    watch.update(torch.tensor(1.0), step=0)
    watch.check()  # finite on both ranks
    watch.update(torch.tensor(float("nan") if rank == 1 else 1.0), step=4)
    try:
        watch.check()
        raise AssertionError(f"rank {rank} did not stop")
    except NonFiniteLossError as e:
        assert "epoch 3, step 4 of 10" in str(e), e

    # DDP broadcasts buffers only for models whose buffers training changes: the pre-training model's sinusoid
    # tables are constants (7 MB per micro-batch for ViT-B), a BatchNorm's statistics are not
    import training
    from modeling_pretrain import PretrainVisionTransformer

    mae = PretrainVisionTransformer(img_size=32, num_frames=4, encoder_embed_dim=32, encoder_depth=1,
                                    encoder_num_heads=2, decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2,
                                    mask_ratio=0.5)
    assert sum(1 for _ in mae.buffers()) == 2 and training.persistent_buffers(mae) == []
    assert not training.wrap_model(mae, args, torch.device("cpu")).broadcast_buffers
    bn = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    assert training.wrap_model(bn, args, torch.device("cpu")).broadcast_buffers

    # an EMA copy made from per-rank initial weights gets rank 0's, as DDP gives the model it wraps
    torch.manual_seed(100 + rank)
    lin = nn.Linear(3, 2)
    distributed.broadcast_module(lin)
    first, second = distributed.all_gather_objects(lin.weight.detach().clone())
    assert torch.equal(first, second)

    print("this line is silenced on rank 1")
    print(f"RANK{rank} OK", force=True)
    distributed.barrier()
    distributed.cleanup()


if __name__ == "__main__":
    main()
