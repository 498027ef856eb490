"""Leaving the process group after FSDP2 ends its worker threads before Python shuts down.

FSDP2's DTensors keep the device mesh, and with it the gloo group, alive past
``destroy_process_group``; a gloo worker thread still releasing its last collective while Python
shuts down then aborts the process at exit (SIGABRT, "terminate called without an active
exception"), at random, a few runs in a hundred. The abort is a race; the threads still alive after
leaving are its deterministic cause, so that is what these tests count (Linux: ``/proc/self/task``).
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from tolaria.distributed import DistributedContext, fsdp_wrap, release_process_groups

pytestmark = [pytest.mark.slow]

WORLD_SIZE = 2
TASKS = Path("/proc/self/task")


def gloo_threads() -> list[str]:
    """The names of this process's gloo threads (torch names them ``pt_gloo_runloop``, ``gloo_tcp_loop``)."""
    names = ((task / "comm").read_text().strip() for task in TASKS.iterdir())
    return sorted(name for name in names if "gloo" in name)


def _launch_environment(rank: int, port: int) -> None:
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(WORLD_SIZE), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )


def _library_rank(rank: int, port: int, out: str) -> None:
    """The caller joins the group (after importing torch.optim: ``group.WORLD`` defaults are taken),
    trains one FSDP2 step, releases the groups while the model is alive (named: held), then again
    after dropping it (freed, threads ended)."""
    torch.set_num_threads(1)
    _launch_environment(rank, port)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE)
    ctx = DistributedContext.from_process_group()
    torch.manual_seed(0)
    net = fsdp_wrap(nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2)), ctx)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    net(torch.randn(3, 4)).square().mean().backward()
    optimizer.step()
    result = {"while_joined": gloo_threads(), "held_by_the_model": release_process_groups()}
    result["threads_while_held"] = gloo_threads()
    del net, optimizer
    result["held_after_dropping_it"] = release_process_groups()
    result["after_release"] = gloo_threads()
    (Path(out) / f"library-rank{rank}.json").write_text(json.dumps(result))


def _command_rank(rank: int, port: int, out: str) -> None:
    """``tolaria train --sharding fsdp`` on a launched rank: the command joins, trains, leaves."""
    from tolaria.cli import main

    torch.set_num_threads(1)
    _launch_environment(rank, port)
    code = main(["train", "--sharding", "fsdp", "--max-steps", "2", "--out", str(Path(out) / "run")])
    result = {"exit_code": code, "after_command": gloo_threads()}
    (Path(out) / f"command-rank{rank}.json").write_text(json.dumps(result))


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _run(entry, name: str, out: Path) -> list[dict]:
    if not TASKS.is_dir():
        pytest.skip("counting a process's threads by name needs Linux's /proc/self/task")
    mp.spawn(entry, args=(_free_port(), str(out)), nprocs=WORLD_SIZE, join=True)
    return [json.loads((out / f"{name}-rank{r}.json").read_text()) for r in range(WORLD_SIZE)]


@pytest.mark.timeout(120)
def test_release_process_groups_ends_the_gloo_threads_an_fsdp_model_kept(tmp_path):
    for rank in _run(_library_rank, "library", tmp_path):
        assert rank["while_joined"], "the probe must see the group's threads while it is joined"
        assert rank["held_by_the_model"], "a group the live model holds is named, not reported freed"
        assert rank["threads_while_held"], "the model still holds the group: its threads live"
        assert rank["held_after_dropping_it"] == []
        assert rank["after_release"] == [], f"gloo threads outlived the released group: {rank['after_release']}"


@pytest.mark.timeout(180)
def test_tolaria_train_with_fsdp_leaves_no_gloo_thread_behind(tmp_path):
    for rank in _run(_command_rank, "command", tmp_path):
        assert rank["exit_code"] == 0
        assert rank["after_command"] == [], f"gloo threads outlived the command: {rank['after_command']}"
