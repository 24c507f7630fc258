"""Runs N JAX processes of one program on this machine: a multi-host run, rehearsed on CPU.

    python -m idat_jax.launch --num_processes 2 --devices_per_process 4 -- \
      --config configs/idat_vtab.py:task=dtd --workdir runs/dtd2

(``scripts/launch_local.sh N ARGS...`` is the short form.) Every process runs
``python -m idat_jax.main ARGS`` (or ``--module``) with ``D`` fake CPU devices and the
standard variables of a multi-process JAX run (coordinator on a free local port, process count
and id), so it goes through exactly the code a Cloud TPU slice or a multi-node GPU job runs:
``jax.distributed.initialize``, per-process data shares, cross-process collectives (gloo),
Orbax saves from every process, metrics from process 0.

Each output line is prefixed with ``[p<i>]``. The launcher waits for all processes and exits
0 only if all exit 0. When one fails (or is killed), the others get SIGTERM, then SIGKILL
after ``--grace_s``; the launcher names the failed process and exits with its code
(128 + signal number for a signal). With ``--survivor_wait_s`` it first waits that long for the
others to end by themselves, as they do on a real cluster: the JAX coordination service ends
every process within ``config.distributed.heartbeat_timeout_s`` of a peer's death.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from typing import IO

from idat_jax import sharding

DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"
# Failures this close together are taken as one event, whose cause is chosen by _first_failure.
FAILURE_WINDOW_S = 1.0


def free_port() -> int:
  """A TCP port that is free now on 127.0.0.1 (the coordinator binds it a moment later)."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def process_env(base: dict[str, str], *, process_id: int, num_processes: int, port: int,
                devices_per_process: int) -> dict[str, str]:
  """The environment of process ``process_id``: CPU platform, D devices, distributed vars."""
  env = dict(base)
  flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith(DEVICE_COUNT_FLAG)]
  env["XLA_FLAGS"] = " ".join(flags + [f"{DEVICE_COUNT_FLAG}={devices_per_process}"])
  env.setdefault("JAX_PLATFORMS", "cpu")
  env[sharding.ENV_COORDINATOR] = f"127.0.0.1:{port}"
  env[sharding.ENV_NUM_PROCESSES] = str(num_processes)
  env[sharding.ENV_PROCESS_ID] = str(process_id)
  env["PYTHONUNBUFFERED"] = "1"
  return env


@dataclasses.dataclass
class Result:
  """How the launch ended: per-process exit codes and the first process that failed."""
  returncodes: list[int | None]
  failed: int | None = None  # process id of the first failure
  message: str = ""

  @property
  def ok(self) -> bool:
    return self.failed is None and all(rc == 0 for rc in self.returncodes)

  @property
  def exit_code(self) -> int:
    if self.ok:
      return 0
    rc = self.returncodes[self.failed] if self.failed is not None else 1
    if rc is None or rc == 0:
      return 1
    return 128 - rc if rc < 0 else rc


def describe_exit(returncode: int) -> str:
  if returncode < 0:
    try:
      return f"killed by {signal.Signals(-returncode).name}"
    except ValueError:
      return f"killed by signal {-returncode}"
  return f"exited with code {returncode}"


def _pump(stream: IO[bytes], prefix: str, out: IO[str], lock: threading.Lock) -> None:
  for raw in iter(stream.readline, b""):
    line = raw.decode("utf-8", errors="replace").rstrip("\n")
    with lock:
      out.write(f"{prefix}{line}\n")
      out.flush()
  stream.close()


def launch(args: Sequence[str], *, num_processes: int, devices_per_process: int,
           module: str = "idat_jax.main", python: str = sys.executable, grace_s: float = 10.0,
           timeout_s: float | None = None, out: IO[str] | None = None,
           env: dict[str, str] | None = None, poll_s: float = 0.2,
           survivor_wait_s: float = 0.0) -> Result:
  """Starts the processes, streams their prefixed output, and stops all when one fails."""
  if num_processes < 1 or devices_per_process < 1:
    raise ValueError(f"need at least 1 process and 1 device per process, got "
                     f"{num_processes} x {devices_per_process}")
  out = out or sys.stdout
  lock = threading.Lock()
  port = free_port()
  base = dict(os.environ if env is None else env)
  procs: list[subprocess.Popen] = []
  pumps: list[threading.Thread] = []

  def say(message: str) -> None:
    with lock:
      out.write(f"[launch] {message}\n")
      out.flush()

  for i in range(num_processes):
    p = subprocess.Popen(
        [python, "-m", module, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        env=process_env(base, process_id=i, num_processes=num_processes, port=port,
                        devices_per_process=devices_per_process))
    procs.append(p)
    t = threading.Thread(target=_pump, args=(p.stdout, f"[p{i}] ", out, lock), daemon=True)
    t.start()
    pumps.append(t)
    say(f"process {i}/{num_processes} pid {p.pid}, {devices_per_process} CPU devices, "
        f"coordinator 127.0.0.1:{port}")

  result = Result(returncodes=[None] * num_processes)
  ended: list[tuple[float, int, int]] = []  # (time, process, exit code), in order of death
  changed = threading.Event()

  def waiter(i: int, p: subprocess.Popen) -> None:
    rc = p.wait()
    with lock:
      ended.append((time.monotonic(), i, rc))
    changed.set()

  for i, p in enumerate(procs):
    threading.Thread(target=waiter, args=(i, p), daemon=True).start()
  deadline = None if timeout_s is None else time.monotonic() + timeout_s
  try:
    while True:
      changed.wait(timeout=min(poll_s, FAILURE_WINDOW_S / 4))
      changed.clear()
      with lock:
        deaths = list(ended)
      for _, i, rc in deaths:
        result.returncodes[i] = rc
      first_failure = min((t for t, _, rc in deaths if rc != 0), default=None)
      settled = (len(deaths) == num_processes or first_failure is not None
                 and time.monotonic() - first_failure >= FAILURE_WINDOW_S)
      culprit = _first_failure(deaths) if settled else None
      if culprit is not None:
        i = culprit
        result.failed = i
        result.message = f"process {i} (pid {procs[i].pid}) {describe_exit(result.returncodes[i])}"
        break
      if len(deaths) == num_processes:
        break
      if deadline is not None and time.monotonic() > deadline:
        result.message = f"timed out after {timeout_s:g} s"
        break
  except KeyboardInterrupt:
    result.message = "interrupted"
  finally:
    if result.failed is not None and survivor_wait_s > 0:
      say(f"{result.message}; waiting up to {survivor_wait_s:g} s for the others to end")
      _wait_all(procs, result, survivor_wait_s, poll_s)
      for i, rc in enumerate(result.returncodes):
        if i != result.failed and rc is not None:
          say(f"process {i} ended by itself: {describe_exit(rc)}")
    if any(rc is None for rc in result.returncodes):
      if result.message:
        say(f"{result.message}; stopping the other processes")
      _stop(procs, result, grace_s)
    for t in pumps:
      t.join(timeout=5)
  if result.failed is None and result.message:  # timed out or interrupted: all were stopped
    result.failed = next((i for i, rc in enumerate(result.returncodes) if rc != 0), 0)
    if result.returncodes[result.failed] == 0:
      result.returncodes[result.failed] = 1
  if result.ok:
    say(f"all {num_processes} processes finished")
  else:
    say(f"FAILED: {result.message}; exit codes {result.returncodes}")
  return result


def _first_failure(deaths: list[tuple[float, int, int]],
                   window_s: float = FAILURE_WINDOW_S) -> int | None:
  """The process whose failure came first. Peers of a dead JAX process abort (SIGABRT) once
  they notice, often within milliseconds, so among failures less than ``window_s`` apart one
  that is not a SIGABRT is taken as the cause."""
  failures = [(t, i, rc) for t, i, rc in deaths if rc != 0]
  if not failures:
    return None
  first = min(t for t, _, _ in failures)
  close = sorted((t, i, rc) for t, i, rc in failures if t - first < window_s)
  for _, i, rc in close:
    if rc != -signal.SIGABRT:
      return i
  return close[0][1]


def _wait_all(procs: list[subprocess.Popen], result: Result, wait_s: float,
              poll_s: float) -> None:
  end = time.monotonic() + wait_s
  while time.monotonic() < end and any(rc is None for rc in result.returncodes):
    for i, p in enumerate(procs):
      if result.returncodes[i] is None:
        result.returncodes[i] = p.poll()
    time.sleep(poll_s)


def _stop(procs: list[subprocess.Popen], result: Result, grace_s: float) -> None:
  """SIGTERM to the processes still running, SIGKILL to those alive after ``grace_s``."""
  running = [(i, p) for i, p in enumerate(procs) if result.returncodes[i] is None]
  for _, p in running:
    p.send_signal(signal.SIGTERM)
  end = time.monotonic() + grace_s
  for i, p in running:
    try:
      result.returncodes[i] = p.wait(timeout=max(0.0, end - time.monotonic()))
    except subprocess.TimeoutExpired:
      p.kill()
      result.returncodes[i] = p.wait()


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      description="Run N local JAX processes of idat_jax.main (a multi-host rehearsal on CPU).")
  parser.add_argument("--num_processes", "-n", type=int, default=2)
  parser.add_argument("--devices_per_process", "-d", type=int,
                      default=int(os.environ.get("DEVICES_PER_PROCESS", "4")))
  parser.add_argument("--module", default="idat_jax.main",
                      help="Python module each process runs (python -m MODULE ARGS).")
  parser.add_argument("--grace_s", type=float, default=10.0,
                      help="SIGTERM-to-SIGKILL wait when stopping the others after a failure.")
  parser.add_argument("--survivor_wait_s", type=float, default=0.0,
                      help="After a failure, wait this long for the others to end by themselves "
                           "(the distributed heartbeat timeout) before stopping them.")
  parser.add_argument("--timeout_s", type=float, default=None,
                      help="Stop everything (and fail) after this many seconds.")
  parser.add_argument("args", nargs=argparse.REMAINDER,
                      help="Arguments of every process (after an optional '--').")
  ns = parser.parse_args(argv)
  args = ns.args[1:] if ns.args[:1] == ["--"] else ns.args
  result = launch(args, num_processes=ns.num_processes,
                  devices_per_process=ns.devices_per_process, module=ns.module,
                  grace_s=ns.grace_s, timeout_s=ns.timeout_s,
                  survivor_wait_s=ns.survivor_wait_s)
  return result.exit_code


if __name__ == "__main__":
  sys.exit(main())
