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

SIGTERM or SIGINT to the launcher is forwarded to every process (SIGKILL after ``--grace_s``)
and the launcher exits with 128 + its number. A launch that cannot start (no processes, a
``--port`` in use, a Python that does not run) is one line ``error: ...`` and exit code 2.
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


class LaunchError(Exception):
  """A launch that cannot start (printed as one line ``error: ...``, exit code 2)."""


def free_port() -> int:
  """A TCP port that is free now on 127.0.0.1 (the coordinator binds it a moment later)."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def check_port_free(port: int) -> None:
  """Raises LaunchError unless ``port`` can be bound on 127.0.0.1 now: a coordinator on a
  port in use fails in every process, sometimes with a segmentation fault."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    try:
      s.bind(("127.0.0.1", port))
    except OSError as e:
      raise LaunchError(
          f"coordinator port {port} on 127.0.0.1 is already in use ({e.strerror}); stop the "
          "program that holds it (another launch?), or pass --port 0 to pick a free "
          "port") from None


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
  signal: int | None = None  # a SIGTERM / SIGINT the launcher received and forwarded


  @property
  def ok(self) -> bool:
    return (self.signal is None and self.failed is None
            and all(rc == 0 for rc in self.returncodes))

  @property
  def exit_code(self) -> int:
    if self.signal is not None:
      return 128 + self.signal
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


def _pump(stream: IO[bytes], prefix: str, out: IO[str], lock: threading.Lock,
          last: list[str], index: int) -> None:
  for raw in iter(stream.readline, b""):
    line = raw.decode("utf-8", errors="replace").rstrip("\n")
    with lock:
      out.write(f"{prefix}{line}\n")
      out.flush()
      if line.strip():
        last[index] = line.strip()
  stream.close()


def launch(args: Sequence[str], *, num_processes: int, devices_per_process: int,
           module: str = "idat_jax.main", python: str = sys.executable, grace_s: float = 10.0,
           timeout_s: float | None = None, out: IO[str] | None = None,
           env: dict[str, str] | None = None, poll_s: float = 0.2,
           survivor_wait_s: float = 0.0, port: int = 0) -> Result:
  """Starts the processes, streams their prefixed output, and stops all when one fails.

  SIGTERM and SIGINT to the launcher (a preempted VM, a scheduler, Ctrl-C) are forwarded to
  every process; those still running after ``grace_s`` are SIGKILLed, and the launch fails
  with 128 + the signal's number: no process outlives the launcher. ``port``: the
  coordinator's (0: a free one). Raises LaunchError when the launch cannot start.
  """
  if num_processes < 1 or devices_per_process < 1:
    raise LaunchError(f"need at least 1 process and 1 device per process, got "
                      f"--num_processes {num_processes} x --devices_per_process "
                      f"{devices_per_process}")
  if port:
    check_port_free(port)
  else:
    port = free_port()
  given = _address_in_args(args)
  if given is not None:  # the processes' config takes it over the launcher's port
    host, _, given_port = given.rpartition(":")
    if host in ("127.0.0.1", "localhost", "0.0.0.0", "") and given_port.isdigit():
      check_port_free(int(given_port))
  out = out or sys.stdout
  lock = threading.Lock()
  base = dict(os.environ if env is None else env)
  procs: list[subprocess.Popen] = []
  pumps: list[threading.Thread] = []
  last_lines = [""] * num_processes
  changed = threading.Event()
  received: list[int] = []  # signals received, in order

  def on_signal(signum, frame) -> None:  # pylint: disable=unused-argument
    received.append(signum)
    changed.set()

  handlers = {}
  if threading.current_thread() is threading.main_thread():
    # Installed before the first child starts: a signal in between must not orphan it.
    for signum in (signal.SIGTERM, signal.SIGINT):
      handlers[signum] = signal.signal(signum, on_signal)

  def say(message: str) -> None:
    with lock:
      out.write(f"[launch] {message}\n")
      out.flush()

  started = time.monotonic()
  try:
    for i in range(num_processes):
      if received:
        break
      try:
        p = subprocess.Popen(
            [python, "-m", module, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            env=process_env(base, process_id=i, num_processes=num_processes, port=port,
                            devices_per_process=devices_per_process))
      except OSError as e:
        raise LaunchError(f"cannot start process {i} ({python} -m {module}): {e}") from None
      procs.append(p)
      t = threading.Thread(target=_pump, args=(p.stdout, f"[p{i}] ", out, lock, last_lines, i),
                           daemon=True)
      t.start()
      pumps.append(t)
      say(f"process {i}/{num_processes} pid {p.pid}, {devices_per_process} CPU devices, "
          f"coordinator 127.0.0.1:{port}")
  except BaseException:
    _stop(procs, Result(returncodes=[None] * len(procs)), grace_s)
    _restore_handlers(handlers)
    raise

  result = Result(returncodes=[None] * num_processes)
  for i in range(len(procs), num_processes):  # never started (a signal came first)
    result.returncodes[i] = 0
  ended: list[tuple[float, int, int]] = []  # (time, process, exit code), in order of death

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
      if received:
        result.signal = received[0]
        result.message = f"received {signal.Signals(received[0]).name}"
        break
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
        when = next(t for t, j, _ in deaths if j == i) - started
        result.message = (f"process {i} (pid {procs[i].pid}) "
                          f"{describe_exit(result.returncodes[i])} after {when:.1f} s")
        if last_lines[i]:
          result.message += f" (its last output line: {last_lines[i][:300]!r})"
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
      running = [i for i, rc in enumerate(result.returncodes) if rc is None]
      if result.signal is not None:
        name = signal.Signals(result.signal).name
        say(f"{result.message}: forwarding it to process(es) {running} (pids "
            f"{[procs[i].pid for i in running]}), SIGKILL after {grace_s:g} s")
        killed = _stop(procs, result, grace_s, result.signal)
        result.message += (f"; forwarded {name} to process(es) {running}"
                           + (f", SIGKILLed {killed} still running after {grace_s:g} s"
                              if killed else ""))
      else:
        if result.message:
          say(f"{result.message}; stopping the other processes")
        _stop(procs, result, grace_s)
    for t in pumps:
      t.join(timeout=5)
    _restore_handlers(handlers)
  if result.failed is None and result.message and result.signal is None:  # timed out
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


def _address_in_args(args: Sequence[str]) -> str | None:
  """The value of ``--config.distributed.coordinator_address`` in the processes' arguments."""
  flag = "--config.distributed.coordinator_address"
  for i, arg in enumerate(args):
    if arg.startswith(flag + "="):
      return arg.split("=", 1)[1]
    if arg == flag and i + 1 < len(args):
      return args[i + 1]
  return None


def _restore_handlers(handlers: dict) -> None:
  for signum, handler in handlers.items():
    signal.signal(signum, handler)


def _stop(procs: list[subprocess.Popen], result: Result, grace_s: float,
          signum: int = signal.SIGTERM) -> list[int]:
  """``signum`` to the processes still running, SIGKILL to those alive after ``grace_s``;
  returns the SIGKILLed process ids."""
  running = [(i, p) for i, p in enumerate(procs) if result.returncodes[i] is None]
  for _, p in running:
    if p.poll() is None:
      p.send_signal(signum)
  end = time.monotonic() + grace_s
  killed = []
  for i, p in running:
    try:
      result.returncodes[i] = p.wait(timeout=max(0.0, end - time.monotonic()))
    except subprocess.TimeoutExpired:
      p.kill()
      killed.append(i)
      result.returncodes[i] = p.wait()
  return killed


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      description="Run N local JAX processes of idat_jax.main (a multi-host rehearsal on CPU).")
  parser.add_argument("--num_processes", "-n", type=int, default=2)
  parser.add_argument("--devices_per_process", "-d", type=int,
                      default=int(os.environ.get("DEVICES_PER_PROCESS", "4")))
  parser.add_argument("--module", default="idat_jax.main",
                      help="Python module each process runs (python -m MODULE ARGS).")
  parser.add_argument("--grace_s", type=float, default=10.0,
                      help="SIGTERM-to-SIGKILL wait when stopping the others after a failure, "
                           "or all after the launcher got SIGTERM / SIGINT.")
  parser.add_argument("--port", type=int, default=0,
                      help="Coordinator port on 127.0.0.1 (0: a free one).")
  parser.add_argument("--survivor_wait_s", type=float, default=0.0,
                      help="After a failure, wait this long for the others to end by themselves "
                           "(the distributed heartbeat timeout) before stopping them.")
  parser.add_argument("--timeout_s", type=float, default=None,
                      help="Stop everything (and fail) after this many seconds.")
  parser.add_argument("args", nargs=argparse.REMAINDER,
                      help="Arguments of every process (after an optional '--').")
  ns = parser.parse_args(argv)
  args = ns.args[1:] if ns.args[:1] == ["--"] else ns.args
  try:
    result = launch(args, num_processes=ns.num_processes,
                    devices_per_process=ns.devices_per_process, module=ns.module,
                    grace_s=ns.grace_s, timeout_s=ns.timeout_s,
                    survivor_wait_s=ns.survivor_wait_s, port=ns.port)
  except LaunchError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return result.exit_code


if __name__ == "__main__":
  sys.exit(main())
