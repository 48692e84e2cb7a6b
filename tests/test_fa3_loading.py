"""How FlashAttention-3 is fetched through the installed `kernels` package, checked on the CPU.

There is no GPU and no hub here, so FA3 never loads; what these tests pin down is why not. The
call must get past the installed kernels' own argument checks (kernels >= 0.15 refuses a hub
kernel without a version or revision, and later versions refuse an untrusted publisher unless
allow-listed) and fail only where a build is missing: the offline cache, or a local path that
holds none. The reason reaches the stage banner in one line."""

import os
import subprocess
import sys

import pytest

pytest.importorskip("kernels")

PROBE = """
import sys, torch
torch.cuda.is_available = lambda: True  # pretend: the loader runs up to the kernels package
torch.cuda.get_device_capability = lambda *a: ({major}, 0)
from rustchat import attention
from rustchat.common import RustchatError
try:
    print("module:", attention._load_fa3())
except RustchatError as e:
    print("refused:", e)
print("reason:", attention._STATE["fa3_error"])
print("banner:", attention.backend_name("cuda"))
"""


def probe(tmp_path, major, **env):
    run_env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_KERNELS", "RUSTCHAT_ATTENTION")}
    run_env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), **env)  # an empty cache, no network
    out = subprocess.run(
        [sys.executable, "-c", PROBE.format(major=major)], capture_output=True, text=True, env=run_env, timeout=120
    )
    assert out.returncode == 0, out.stderr
    lines = dict(line.split(": ", 1) for line in out.stdout.splitlines() if ": " in line)
    return lines


@pytest.mark.parametrize("major, repo", [(9, "varunneal/flash-attention-3"), (8, "kernels-community/flash-attn3")])
def test_fa3_call_passes_the_kernels_api_and_fails_only_on_the_missing_build(tmp_path, major, repo):
    got = probe(tmp_path, major)
    assert got["module"] == "None"
    reason = got["reason"]
    assert repo in reason, reason
    assert "offline" in reason.lower(), reason  # the cache miss, not the call
    assert "must be specified" not in reason and "trust" not in reason.lower(), reason
    assert got["banner"].startswith("sdpa (") and f"FA3 not loaded: {reason}" in got["banner"]


def test_kernels_local_path_is_where_the_build_is_looked_for(tmp_path):
    build = tmp_path / "fa3-build"
    build.mkdir()
    got = probe(tmp_path, 9, LOCAL_KERNELS=f"varunneal/flash-attention-3={build}")
    assert got["module"] == "None"
    assert str(build) in got["reason"], got["reason"]


def test_demanding_fa3_is_refused_in_one_line_with_the_reason(tmp_path):
    got = probe(tmp_path, 9, RUSTCHAT_ATTENTION="fa3")
    refused = got["refused"]
    assert refused.startswith("RUSTCHAT_ATTENTION=fa3 but FlashAttention-3 cannot be loaded: ")
    assert "varunneal/flash-attention-3" in refused and "\n" not in refused


def test_forcing_sdpa_never_reaches_the_kernels_package(tmp_path):
    got = probe(tmp_path, 9, RUSTCHAT_ATTENTION="sdpa")
    assert got["module"] == "None" and got["reason"] == "None"
    assert got["banner"] == "sdpa (windows as masks, flex block masks for packed rows)"
