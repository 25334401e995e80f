"""One Ranks for training and cache builds: identities on one rank, the collectives on two gloo
processes against sums written out by hand, and a process group closed only by its creator."""
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from spot_fast.cache.ranks import BuildRanks, ranks_from_env
from spot_fast.ranks import Ranks
from spot_fast.train import ddp


def test_training_and_builds_share_the_one_class():
    assert ddp.Ranks is Ranks and issubclass(BuildRanks, Ranks)
    assert isinstance(ranks_from_env(torch.device("cpu")), Ranks)


def test_one_rank_is_main_and_its_collectives_are_identities():
    ranks = Ranks()
    t = torch.tensor([1.5, -2.0])
    assert ranks.main and not ranks.distributed and not ranks.owns_group
    assert ranks.mean(t) is t and ranks.max(t) is t
    ranks.barrier()
    ranks.close()                               # nothing to close: no error


def _two_ranks(rank: int, port: int, results) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    ranks = Ranks(rank, 2, owns_group=(rank == 0))
    t = torch.tensor([1.0, 10.0]) if rank == 0 else torch.tensor([4.0, -6.0])
    mean, peak = ranks.mean(t), ranks.max(t)
    ranks.barrier()
    results.put((rank, ranks.main, mean.tolist(), peak.tolist(), t.tolist()))
    if rank == 0:
        ranks.close()
        results.put((rank, "closed", dist.is_initialized()))
    else:
        ranks.close()                           # not its group: left alone
        results.put((rank, "closed", dist.is_initialized()))
        dist.destroy_process_group()


def test_two_ranks_average_and_take_the_maximum():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    mp.start_processes(_two_ranks, args=(port, results), nprocs=2, start_method="spawn")
    got = [results.get(timeout=60) for _ in range(4)]
    stats = {r[0]: r[1:] for r in got if r[1] != "closed"}
    closed = {r[0]: r[2] for r in got if r[1] == "closed"}
    assert stats[0][0] and not stats[1][0]                       # rank 0 is main
    for rank, own in ((0, [1.0, 10.0]), (1, [4.0, -6.0])):
        _, mean, peak, after = stats[rank]
        assert mean == [2.5, 2.0] and peak == [4.0, 10.0]        # (1+4)/2, (10-6)/2; max(1,4), max(10,-6)
        assert after == own                                       # the input is not reduced in place
    assert closed == {0: False, 1: True}                          # only the owner destroyed the group
