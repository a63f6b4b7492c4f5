"""`pip install clipmesh` is a coordinator and the clients without torch: a fresh venv gets the
package alone (no extras); its coordinator serves a job that a worker from the full venv renders,
submitted, watched and fetched with its CLI. `clipmesh[worker]` is what renders."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import imageio.v3 as iio
import pytest

from conftest import TOKEN, WORKER_TOKEN, wait_until

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_a_coordinator_and_a_client_without_torch(tmp_path):
    venv, source = tmp_path / "venv", tmp_path / "src"
    # from a copy of the tree: setuptools builds in the source's build/, which must not be the checkout's
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".*", "build", "out", "*.egg-info", "__pycache__"))
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    subprocess.run([venv / "bin" / "pip", "install", "-q", str(source)], check=True, timeout=600,
                   capture_output=True)
    light = venv / "bin" / "clipmesh"
    probe = "import importlib.util as u, sys; sys.exit(any(u.find_spec(m) for m in ('torch', 'diffusers', 'transformers')))"
    assert subprocess.run([venv / "bin" / "python", "-c", probe]).returncode == 0, "the light install has torch"
    # the package data came whole: the trained preset's every file
    shipped = venv / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages" / \
        "clipmesh" / "models" / "toy-wan"
    assert sorted(p.relative_to(shipped) for p in shipped.rglob("*") if p.is_file()) == sorted(
        p.relative_to(ROOT / "shared" / "models" / "toy-wan") for p in (ROOT / "shared" / "models" / "toy-wan").rglob("*")
        if p.is_file())

    refused = subprocess.run([light, "worker", "--coordinator", "127.0.0.1:1", "--model", "tiny-wan"],
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode != 0 and "clipmesh[worker]" in refused.stderr and "Traceback" not in refused.stderr

    env = {k: v for k, v in os.environ.items() if k != "CLIPMESH_TOKEN"}
    env.update(CLIPMESH_CLIENT_TOKEN=TOKEN, CLIPMESH_WORKER_TOKEN=WORKER_TOKEN)
    port_file, procs = tmp_path / "port", []
    log = open(tmp_path / "daemons.log", "ab")
    try:
        procs.append(subprocess.Popen([light, "coordinator", "--listen", "127.0.0.1:0", "--data", str(tmp_path / "data"),
                                       "--port-file", str(port_file)], env=env, stdout=log, stderr=log))
        wait_until(port_file.exists, 60, "the coordinator's port file")
        address = f"127.0.0.1:{port_file.read_text()}"
        procs.append(subprocess.Popen([sys.executable, "-m", "clipmesh.cli", "worker", "--coordinator", address,
                                       "--model", "tiny-wan", "--name", "w0", "--threads", "1", "--speed", "1"],
                                      env=env, stdout=log, stderr=log))
        client = {**env, "CLIPMESH_TOKEN": TOKEN}
        submit = subprocess.run([light, "submit", "a cat", "--address", address, "--frames", "17", "--height", "64",
                                 "--width", "64", "--steps", "2", "--num-workers", "1", "--watch"],
                                env=client, capture_output=True, text=True, timeout=300)
        assert submit.returncode == 0, submit.stderr + (tmp_path / "daemons.log").read_text()
        job_id = submit.stdout.split()[0]
        fetch = subprocess.run([light, "fetch", job_id, "--address", address, "--output", str(tmp_path / "v.mp4")],
                               env=client, capture_output=True, text=True, timeout=120)
        assert fetch.returncode == 0, fetch.stderr
        assert iio.imread(tmp_path / "v.mp4", index=None).shape[0] == 17
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
