"""tests/workers.py, the warm launcher of the multi-process tests, against what it stands for: the variables a
torchrun worker sees, the exit status and output of a failing rank, and the other ranks stopped with it."""

import json
import os

import pytest
from workers import run_ranks, torchrun  # tests/ is on sys.path under pytest

SCRIPT = r"""
import json, os, sys
import torch.distributed as dist
dist.init_process_group("gloo")
keys = ["RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK", "ROLE_WORLD_SIZE",
        "MASTER_ADDR", "OMP_NUM_THREADS", "MARK"]
with open(f"{sys.argv[1]}.rank{dist.get_rank()}.json", "w") as f:  # stdout: torchrun interleaves the ranks' lines
    json.dump({"argv": sys.argv[1:], "name": __name__, "cwd": os.getcwd(), "rank": dist.get_rank(),
               "world": dist.get_world_size(), "env": {k: os.environ.get(k) for k in keys}}, f)
print(f"rank {dist.get_rank()} here")
if sys.argv[2] == "fail":
    if dist.get_rank() == 1:
        sys.exit("rank 1 gives up")
    dist.barrier()  # rank 0 would wait here forever: the launcher stops it
dist.destroy_process_group()
"""


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", MARK="x")


@pytest.mark.slow
def test_ranks_see_what_torchrun_gives_its_workers(tmp_path):
    script = tmp_path / "s.py"
    script.write_text(SCRIPT)
    real = torchrun(2, [str(script), "real", "ok", "--flag"], cwd=str(tmp_path), env=_env(), timeout=120)
    assert real.returncode == 0, real.stderr[-3000:]
    warm = run_ranks(2, [str(script), "warm", "ok", "--flag"], cwd=str(tmp_path), env=_env())
    assert warm.returncode == 0, warm.stderr[-3000:]
    assert "rank 0 here" in warm.stdout and "rank 1 here" in warm.stdout  # every rank's output comes back
    for r in (0, 1):
        a, b = (json.loads((tmp_path / f"{how}.rank{r}.json").read_text()) for how in ("real", "warm"))
        assert b["rank"] == r and b["world"] == 2 and b["argv"] == ["warm", "ok", "--flag"]
        a["argv"][0] = "warm"
        assert a == b  # argv, __main__, working directory, rank, world size and every variable listed


@pytest.mark.slow
def test_a_failing_rank_fails_the_run_and_stops_the_others(tmp_path):
    script = tmp_path / "s.py"
    script.write_text(SCRIPT)
    p = run_ranks(2, [str(script), "out", "fail"], cwd=str(tmp_path), env=_env(), timeout=120)
    assert p.returncode == 1 and "rank 1 gives up" in p.stderr
