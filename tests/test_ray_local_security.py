"""A local Ray started by the pipeline listens on 127.0.0.1 only and has Ray's token authentication
on, with a token made for that cluster that never lands in a file of Ray's session folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

PROBE = r"""
import json, os, pathlib, socket, struct
from pipeline import raykit
os.environ.pop("RAY_AUTH_MODE", None)
assert raykit.connect(log_to_driver=False)
assert sorted(r for _, r in raykit.fan_out(abs, [-1, -2])) == [1, 2]  # workers run
import ray

def children(root):
    kids, parent = {}, {}
    for d in pathlib.Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                parent[int(d.name)] = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except OSError:
                pass
    out, todo = set(), [root]
    while todo:
        p = todo.pop()
        for c, pp in parent.items():
            if pp == p and c not in out:
                out.add(c); todo.append(c)
    return out

def ip_of(hexaddr, v6):
    raw = bytes.fromhex(hexaddr)
    if not v6:
        return socket.inet_ntop(socket.AF_INET, raw[::-1])
    return socket.inet_ntop(socket.AF_INET6, b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4)))

listening = {}
for name, v6 in (("tcp", False), ("tcp6", True)):
    for line in pathlib.Path(f"/proc/net/{name}").read_text().splitlines()[1:]:
        f = line.split()
        if f[3] == "0A":  # LISTEN
            listening[f[9]] = ip_of(f[1].split(":")[0], v6)
listen = set()
for pid in children(os.getpid()):
    try:
        fds = list(pathlib.Path(f"/proc/{pid}/fd").iterdir())
        comm = pathlib.Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        continue
    for fd in fds:
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inode = target[8:-1]
            if inode in listening:
                listen.add((comm, listening[inode]))
token = os.environ["RAY_AUTH_TOKEN"].encode()
session = pathlib.Path(ray._private.worker._global_node.get_session_dir_path())
leaks = [str(f) for f in session.rglob("*") if f.is_file() and not f.is_symlink() and token in f.read_bytes()]
print(json.dumps({"listen": sorted(listen), "leaks": leaks, "mode": os.environ.get("RAY_AUTH_MODE")}))
ray.shutdown()
"""


@pytest.mark.integration
@pytest.mark.slow
def test_local_ray_listens_on_loopback_only_with_token_auth(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(PYTHONPATH=os.getcwd(), OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["listen"], "no Ray process listens at all?"
    assert {ip for _, ip in res["listen"]} <= {"127.0.0.1", "::ffff:127.0.0.1"}, res["listen"]
    assert res["mode"] == "token" and res["leaks"] == []
