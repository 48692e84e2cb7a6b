"""Training across machines, on one machine: two "nodes" of two gloo processes each on
127.0.0.1, started as a user starts them on two machines (`rustchat sft --nnodes 2 --node-rank R
--master-addr HOST --nproc 2`). The run equals one process, and its checkpoint, written by
rank 0 with every rank's optimizer shard, resumes on another layout (one process)."""

import os
import socket
import subprocess
import sys

import pytest
from test_stages import _assert_same_weights, _copy, _run_cli, _weights, base_dir  # noqa: F401 (fixture)

from rustchat.checkpoint import find_last_step, stage_dir
from rustchat.cli import build_parser, torchrun_command
from rustchat.common import RustchatError
from rustchat.config import from_args

COMMON = [
    "sft",
    "--depth",
    "1",
    "--seq-len",
    "64",
    "--device",
    "cpu",
    "--tasks",
    "tiny",
    "--max-steps",
    "2",
    "--total-batch-conversations",
    "4",
    "--eval-every",
    "0",
    "--quiet",
]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cfg(argv):
    args = build_parser().parse_args(argv)
    return from_args(args.config_class, args)


def test_torchrun_command_of_the_launch_flags():
    argv = [
        "sft",
        "--nnodes",
        "2",
        "--node-rank=1",
        "--master-addr",
        "10.0.0.7",
        "--master-port",
        "29400",
        "--nproc",
        "8",
        "--depth",
        "4",
    ]
    cmd = torchrun_command(_cfg(argv), argv)
    i = cmd.index("torch.distributed.run")
    assert cmd[i + 1 :] == [
        "--nnodes=2",
        "--node-rank=1",
        "--master-addr=10.0.0.7",
        "--master-port=29400",
        "--nproc-per-node=8",
        "-m",
        "rustchat.cli",
        "sft",
        "--depth",
        "4",
    ]
    one = torchrun_command(_cfg(["base", "--nproc", "2"]), ["base", "--nproc", "2"])
    assert one[one.index("torch.distributed.run") + 1 :] == [
        "--standalone",
        "--nproc-per-node=2",
        "-m",
        "rustchat.cli",
        "base",
    ]
    for bad, msg in (
        (["sft", "--nnodes", "2"], "needs --master-addr"),
        (["sft", "--nnodes", "2", "--node-rank", "2", "--master-addr", "h"], "--node-rank 2 must be below"),
        (["sft", "--master-port", "70000"], "--master-port must be in"),
    ):
        with pytest.raises(RustchatError, match=msg):
            torchrun_command(_cfg(bad), bad)


@pytest.mark.e2e
@pytest.mark.slow
def test_two_nodes_of_two_processes_match_one_and_resume_on_one(base_dir, tmp_path):  # noqa: F811
    one = _copy(base_dir, tmp_path, "one")
    nodes = _copy(base_dir, tmp_path, "nodes")
    r1 = _run_cli(COMMON + ["--device-batch-size", "2"], {"RUSTCHAT_BASE_DIR": str(one)})
    assert r1.returncode == 0, r1.stderr[-2000:]

    env = {**os.environ, "RUSTCHAT_BASE_DIR": str(nodes), "OMP_NUM_THREADS": "1"}
    port = str(_free_port())
    launch = [
        sys.executable,
        "-m",
        "rustchat.cli",
        *COMMON,
        "--device-batch-size",
        "1",
        "--stop-at-step",
        "1",
        "--nnodes",
        "2",
        "--nproc",
        "2",
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        port,
    ]
    procs = [
        subprocess.Popen(
            launch + ["--node-rank", str(r)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for r in (1, 0)
    ]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=600))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    assert "of 4" in outs[1][0]  # node 0's banner: rank 0 of a world of 4
    ckpt = stage_dir("sft", 1, nodes)
    assert find_last_step(ckpt) == 1
    assert sorted(f.name for f in ckpt.glob("optim_000001_rank*.pt")) == [f"optim_000001_rank{r}.pt" for r in range(4)]

    # the 4-rank checkpoint continues on one process (keeping the run's device batch of 1:
    # one process accumulates the four rows the four ranks took)
    r2 = _run_cli(COMMON + ["--resume"], {"RUSTCHAT_BASE_DIR": str(nodes)})
    assert r2.returncode == 0, r2.stderr[-2000:]
    w1, m1 = _weights(one, "sft")
    w2, m2 = _weights(nodes, "sft")
    _assert_same_weights(w1, w2, 2e-4)
    assert [h["loss"] for h in m1["history"]] == pytest.approx([h["loss"] for h in m2["history"]], rel=1e-4)
