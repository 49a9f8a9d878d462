"""A stand-in for `gcloud compute tpus` on this machine, for the run_tpu.sh tests: a slice is
a folder under $FAKE_GCLOUD_DIR (its state, a one-worker home), `ssh --command` runs the
command locally in that home (with the coordinator variables a TPU runtime would provide), and
`fake-preempt NAME` preempts it: state PREEMPTED, its processes killed. Every call is logged
to calls.log, one line each."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(os.environ["FAKE_GCLOUD_DIR"])


def _slice(name: str) -> Path:
    return ROOT / "slices" / name


def _kill(folder: Path) -> None:
    pids = folder / "pgids"
    for line in pids.read_text().split() if pids.exists() else []:
        try:
            os.killpg(int(line), signal.SIGKILL)
        except ProcessLookupError:
            pass


def _option(args: list[str], name: str) -> str | None:
    for a in args:
        if a.startswith(f"--{name}="):
            return a.split("=", 1)[1]
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def main(argv: list[str]) -> int:
    ROOT.mkdir(parents=True, exist_ok=True)
    with open(ROOT / "calls.log", "a") as log:
        log.write(" ".join(argv) + "\n")
    if argv[:1] == ["fake-preempt"]:
        folder = _slice(argv[1])
        (folder / "state").write_text("PREEMPTED")
        _kill(folder)
        return 0
    if argv[:3] != ["compute", "tpus", "tpu-vm"] and argv[:3] != ["compute", "tpus",
                                                                  "queued-resources"]:
        print(f"fake gcloud: unsupported {' '.join(argv)}", file=sys.stderr)
        return 2
    verb, rest = argv[3], argv[4:]
    name = next((a for a in rest if not a.startswith("-")), "")
    if verb == "scp":
        src, dest = [a for a in rest if not a.startswith("-")][:2]
        name, remote = dest.split(":", 1)
        target = _slice(name) / "home" / remote.removeprefix("~/")
        shutil.copy(src, target)
        return 0
    folder = _slice(name)
    if verb == "create":
        if folder.exists():
            print(f"fake gcloud: {name} already exists", file=sys.stderr)
            return 1
        (folder / "home").mkdir(parents=True)
        (folder / "state").write_text("READY")
        return 0
    if not folder.exists():
        print(f"fake gcloud: {name} not found", file=sys.stderr)
        return 1
    if verb == "describe":
        print((folder / "state").read_text())
        return 0
    if verb == "delete":
        _kill(folder)
        shutil.rmtree(folder)
        return 0
    if verb == "ssh":
        home = folder / "home"
        env = {**os.environ, "HOME": str(home), "JAX_COORDINATOR_ADDRESS":
               f"localhost:{_free_port()}", "JAX_NUM_PROCESSES": "1", "JAX_PROCESS_ID": "0"}
        proc = subprocess.Popen(["bash", "-c", _option(rest, "command") or "true"], cwd=home,
                                env=env, start_new_session=True)
        with open(folder / "pgids", "a") as f:
            f.write(f"{proc.pid}\n")
        return proc.wait()
    print(f"fake gcloud: unsupported verb {verb}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
