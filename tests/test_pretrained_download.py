"""Pretrained weights by name (issue 18, part 1): registry names, URLs and ``hf-hub:`` names
fetched from a local HTTP server on 127.0.0.1 that each test starts; every failure is one line
and leaves nothing in the cache that a later run would trust."""

import hashlib
import http.server
import json
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from idat_jax import checkpoints as ck
from idat_jax.checkpoints import pretrained
from idat_jax.models import build_vit
from vit_testing import random_params

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(width=32, depth=2, num_heads=2, mlp_dim=64, patch_size=8)
B16 = pretrained.REGISTRY["augreg-in21k-B/16"].filename
S16 = pretrained.REGISTRY["augreg-in21k-S/16"].filename
COMMIT = "0123456789abcdef0123456789abcdef01234567"


class Server:
  """Serves ``files`` (URL path -> bytes) and misbehaves on demand (``modes``: path -> mode).

  Modes: '404', '403', 'html' (an error page with status 200), 'truncate' (announces the whole
  size, sends half, closes), 'truncate_once' (then serves normally), 'truncate_then_no_range',
  '500_once', 'no_range' (ignores Range), 'slow' (sends in small, delayed chunks). ``requests`` records
  (method, path, Range header) of each request.
  """

  def __init__(self):
    self.files: dict[str, bytes] = {}
    self.modes: dict[str, str] = {}
    self.requests: list[tuple[str, str, str | None]] = []
    server = self

    class Handler(http.server.BaseHTTPRequestHandler):
      protocol_version = "HTTP/1.1"

      def log_message(self, *args):
        pass

      def do_HEAD(self):
        self._serve(head=True)

      def do_GET(self):
        self._serve(head=False)

      def _serve(self, head):
        path = self.path.split("?")[0]
        server.requests.append((self.command, path, self.headers.get("Range")))
        mode = server.modes.get(path, "")
        body = server.files.get(path)
        if mode in ("404", "403") or body is None:
          code = int(mode) if mode else 404
          self.send_response(code)
          self.send_header("Content-Length", "0")
          self.end_headers()
          return
        if mode == "500_once":
          server.modes[path] = ""
          self.send_response(500)
          self.send_header("Content-Length", "0")
          self.end_headers()
          return
        if mode == "html":
          page = b"<!DOCTYPE html><html><body>Sign in to continue</body></html>"
          self.send_response(200)
          self.send_header("Content-Type", "text/html; charset=utf-8")
          self.send_header("Content-Length", str(len(page)))
          self.end_headers()
          if not head:
            self.wfile.write(page)
          return
        start = 0
        wanted = self.headers.get("Range")
        if wanted and mode != "no_range" and not head:
          start = int(wanted.split("=")[1].split("-")[0])
          self.send_response(206)
          self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
          self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body) - start))
        self.send_header("ETag", '"' + hashlib.sha256(body).hexdigest() + '"')
        self.send_header("X-Repo-Commit", COMMIT)
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        if head:
          return
        payload = body[start:]
        if mode in ("truncate", "truncate_once", "truncate_then_no_range"):
          if mode != "truncate":
            server.modes[path] = "no_range" if mode == "truncate_then_no_range" else ""
          self.wfile.write(payload[:len(payload) // 2])
          self.wfile.flush()
          self.close_connection = True
          return
        if mode == "slow":
          for i in range(0, len(payload), 4096):
            self.wfile.write(payload[i:i + 4096])
            time.sleep(0.01)
          return
        self.wfile.write(payload)

    self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
    self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                   daemon=True)
    self.thread.start()

  def gets(self, path):
    return [r for r in self.requests if r[0] == "GET" and r[1] == path]

  def close(self):
    self.httpd.shutdown()
    self.httpd.server_close()


@pytest.fixture
def server():
  s = Server()
  yield s
  s.close()


@pytest.fixture
def env(tmp_path, monkeypatch, server):
  """A fresh cache, fast retries, no proxy between the tests and their own server."""
  cache = tmp_path / "cache"
  monkeypatch.setenv("IDAT_JAX_CACHE", str(cache))
  monkeypatch.setenv("IDAT_JAX_DOWNLOAD_RETRIES", "2")
  monkeypatch.setenv("IDAT_JAX_DOWNLOAD_BACKOFF", "0.01")
  monkeypatch.setenv("IDAT_JAX_DOWNLOAD_TIMEOUT", "10")
  monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
  monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
  for key in ("IDAT_JAX_OFFLINE", "HF_HUB_OFFLINE", "IDAT_JAX_PRETRAINED_MIRROR"):
    monkeypatch.delenv(key, raising=False)
  return cache


def _npz_bytes(tmp_path, seed=0, image_size=16):
  path = tmp_path / f"w{seed}-{image_size}.npz"
  ck.save_npz(random_params(build_vit(None, 0, image_size=image_size, **TINY), seed=seed), path)
  return path.read_bytes()


def _timm_state(seed=0):
  """A timm-layout state dict of the tiny ViT (fused qkv), as torch.save / safetensors hold."""
  rng = np.random.default_rng(seed)
  w, mlp, p = TINY["width"], TINY["mlp_dim"], TINY["patch_size"]
  state = {"cls_token": (1, 1, w), "pos_embed": (1, 5, w), "patch_embed.proj.weight": (w, 3, p, p),
           "patch_embed.proj.bias": (w,), "norm.weight": (w,), "norm.bias": (w,)}
  for i in range(TINY["depth"]):
    b = f"blocks.{i}."
    state.update({b + "norm1.weight": (w,), b + "norm1.bias": (w,), b + "attn.qkv.weight": (3 * w, w),
                  b + "attn.qkv.bias": (3 * w,), b + "attn.proj.weight": (w, w),
                  b + "attn.proj.bias": (w,), b + "norm2.weight": (w,), b + "norm2.bias": (w,),
                  b + "mlp.fc1.weight": (mlp, w), b + "mlp.fc1.bias": (mlp,),
                  b + "mlp.fc2.weight": (w, mlp), b + "mlp.fc2.bias": (w,)})
  return {k: rng.normal(0, 0.1, s).astype(np.float32) for k, s in state.items()}


def _pth_bytes(tmp_path, seed=0):
  path = tmp_path / f"w{seed}.pth"
  torch.save({k: torch.from_numpy(v) for k, v in _timm_state(seed).items()}, path)
  return path.read_bytes()


def _no_trusted_file(cache):
  """Nothing but locks and partial files: no file a later run would take as complete."""
  trusted = [os.path.join(d, f) for d, _, files in os.walk(cache) for f in files
             if not f.endswith((".lock", ".part"))]
  assert trusted == [], trusted


# ---------------------------------------------------------------------------------------------
# Success paths: registry names (mirror), URLs of every format, the Hub; cache hits.


def test_registry_name_and_official_file_name_fetch_once_and_hit_the_cache(tmp_path, server, env,
                                                                          monkeypatch):
  data = _npz_bytes(tmp_path)
  server.files["/mirror/" + B16] = data
  monkeypatch.setenv("IDAT_JAX_PRETRAINED_MIRROR", server.url + "/mirror")
  path = pretrained.resolve("augreg-in21k-B/16", model="student")
  assert path == str(env / B16)
  assert open(path, "rb").read() == data
  record = open(path + ".sha256").read().split()
  assert record[0] == hashlib.sha256(data).hexdigest() and record[2].endswith(B16)
  assert ck.tree_equal(ck.load_params(path), ck.load_params(tmp_path / "w0-16.npz"))
  # The recipe's default, <ckpt_dir>/<official name>, with an empty ckpt_dir: the cache.
  assert pretrained.resolve(str(tmp_path / "pretrained" / B16), model="student") == path
  assert len(server.gets("/mirror/" + B16)) == 1  # cache hits make no request
  # A hand-downloaded file in ckpt_dir is used as it is, without a request.
  (tmp_path / "pretrained").mkdir()
  (tmp_path / "pretrained" / B16).write_bytes(data)
  assert pretrained.resolve(str(tmp_path / "pretrained" / B16)) == str(tmp_path / "pretrained" / B16)
  assert len(server.requests) == 1


@pytest.mark.parametrize("kind", ["npz", "pth", "safetensors"])
def test_urls_of_each_format_load(tmp_path, server, env, kind):
  if kind == "npz":
    data = _npz_bytes(tmp_path)
  elif kind == "pth":
    data = _pth_bytes(tmp_path)
  else:
    save_file(_timm_state(), str(tmp_path / "w.safetensors"))
    data = (tmp_path / "w.safetensors").read_bytes()
  server.files[f"/files/weights.{kind}"] = data
  path = pretrained.resolve(f"{server.url}/files/weights.{kind}")
  assert path.startswith(str(env)) and open(path, "rb").read() == data
  params = ck.load_params(path, num_heads=TINY["num_heads"])
  kernel = params["Transformer"]["encoderblock_1"]["MlpBlock_3"]["Dense_0"]["kernel"]
  assert kernel.shape == (TINY["width"], TINY["mlp_dim"])
  assert pretrained.resolve(f"{server.url}/files/weights.{kind}") == path
  assert len(server.gets(f"/files/weights.{kind}")) == 1


def test_hash_prefix_in_the_file_name_is_checked(tmp_path, server, env):
  data = _npz_bytes(tmp_path)
  good = f"/w-{hashlib.sha256(data).hexdigest()[:8]}.npz"
  server.files[good] = data
  assert open(pretrained.resolve(server.url + good), "rb").read() == data
  server.files["/w-80ecf9dd.npz"] = data  # the name promises another file
  with pytest.raises(ck.DownloadError) as e:
    pretrained.resolve(server.url + "/w-80ecf9dd.npz", model="teacher")
  msg = str(e.value)
  assert "\n" not in msg and "does not match the published 80ecf9dd" in msg
  assert "model 'teacher'" in msg and server.url + "/w-80ecf9dd.npz" in msg
  leftover = [f for d, _, fs in os.walk(env) for f in fs if "80ecf9dd" in f
              and not f.endswith(".lock")]
  assert leftover == []


def test_registered_hash_is_checked_for_registry_files(tmp_path, server, env, monkeypatch):
  """timm 0.3.2's file carries the published prefix 80ecf9dd: a different file is refused."""
  entry = pretrained.REGISTRY["timm-vit-base-patch16-224-jx"]
  assert entry.sha256 == "80ecf9dd" and entry.filename.endswith("-80ecf9dd.pth")
  server.files["/m/" + entry.filename] = _pth_bytes(tmp_path)
  monkeypatch.setenv("IDAT_JAX_PRETRAINED_MIRROR", server.url + "/m")
  with pytest.raises(ck.DownloadError, match="does not match the published 80ecf9dd"):
    pretrained.resolve(entry.name)
  _no_trusted_file(env)


def test_recorded_sha256_is_checked_on_later_use(tmp_path, server, env):
  data = _npz_bytes(tmp_path)
  server.files["/w.npz"] = data
  path = pretrained.resolve(server.url + "/w.npz")
  with open(path, "r+b") as f:  # bit rot, or a half-finished copy by hand
    f.seek(100)
    f.write(b"\x00\x01\x02")
  assert pretrained.resolve(server.url + "/w.npz") == path
  assert open(path, "rb").read() == data  # fetched again, verified
  assert len(server.gets("/w.npz")) == 2


@pytest.mark.parametrize("mode", ["truncate_once", "truncate_then_no_range"])
def test_partial_download_resumes_with_range_or_starts_over(tmp_path, server, env, mode):
  """A server that honours Range continues the partial file (206); one that ignores it sends
  the whole file again (200), which replaces the partial one."""
  data = _npz_bytes(tmp_path)
  server.files["/w.npz"] = data
  server.modes["/w.npz"] = mode
  path = pretrained.resolve(server.url + "/w.npz")
  assert open(path, "rb").read() == data
  assert [g[2] for g in server.gets("/w.npz")] == [None, f"bytes={len(data) // 2}-"]


def test_transient_server_error_is_retried(tmp_path, server, env):
  data = _npz_bytes(tmp_path)
  server.files["/w.npz"] = data
  server.modes["/w.npz"] = "500_once"
  assert open(pretrained.resolve(server.url + "/w.npz"), "rb").read() == data
  assert len(server.gets("/w.npz")) == 2


# ---------------------------------------------------------------------------------------------
# Failures: one line naming the checkpoint, the URL and the hand-download path; nothing trusted.


@pytest.mark.parametrize("mode, phrase", [
    ("404", "HTTP 404"), ("403", "HTTP 403"), ("html", "HTML page"),
    ("truncate", "truncated body"), ("refused", "cannot connect")])
def test_failures_are_one_line_and_leave_nothing_trusted(tmp_path, server, env, monkeypatch, mode,
                                                         phrase):
  server.files["/m/" + S16] = _npz_bytes(tmp_path)
  mirror = server.url + "/m"
  if mode == "refused":
    mirror = "http://127.0.0.1:9/m"  # the discard port: nothing listens
  else:
    server.modes["/m/" + S16] = mode
  monkeypatch.setenv("IDAT_JAX_PRETRAINED_MIRROR", mirror)
  ckpt_dir = tmp_path / "pretrained"
  with pytest.raises(ck.DownloadError) as e:
    pretrained.resolve(str(ckpt_dir / S16), model="teacher")
  msg = str(e.value)
  assert "\n" not in msg and phrase in msg, msg
  assert "augreg-in21k-S/16" in msg and "model 'teacher'" in msg
  assert f"{mirror}/{S16}" in msg                     # the URL
  assert f"by hand to {ckpt_dir / S16}" in msg         # where a hand download is picked up
  _no_trusted_file(env)


def test_timeout_is_one_line(tmp_path, server, env, monkeypatch):
  import socket
  listener = socket.socket()
  listener.bind(("127.0.0.1", 0))
  listener.listen(8)  # accepts connections, never answers
  try:
    monkeypatch.setenv("IDAT_JAX_DOWNLOAD_TIMEOUT", "0.3")
    url = f"http://127.0.0.1:{listener.getsockname()[1]}/w.npz"
    with pytest.raises(ck.DownloadError, match=r"cannot connect \(.*timed out.*\)"):
      pretrained.resolve(url)
  finally:
    listener.close()
  _no_trusted_file(env)


def test_full_disk_is_one_line(tmp_path, server, env, monkeypatch):
  import builtins
  import errno
  server.files["/w.npz"] = _npz_bytes(tmp_path)
  real_open = builtins.open

  class FullFile:
    def __init__(self, f):
      self.f = f

    def write(self, chunk):
      raise OSError(errno.ENOSPC, "No space left on device")

    def __enter__(self):
      return self

    def __exit__(self, *exc):
      self.f.close()

  def fake_open(path, mode="r", *args, **kwargs):
    f = real_open(path, mode, *args, **kwargs)
    return FullFile(f) if str(path).endswith(".part") and "b" in mode else f

  monkeypatch.setattr(builtins, "open", fake_open)
  with pytest.raises(ck.DownloadError) as e:
    pretrained.resolve(server.url + "/w.npz")
  monkeypatch.setattr(builtins, "open", real_open)
  assert "no space left on device" in str(e.value) and "IDAT_JAX_CACHE" in str(e.value)
  _no_trusted_file(env)
  assert not [f for d, _, fs in os.walk(env) for f in fs if f.endswith(".part")]


def test_unwritable_cache_is_one_line(tmp_path, server, env, monkeypatch):
  server.files["/w.npz"] = _npz_bytes(tmp_path)
  (tmp_path / "a_file").write_text("x")
  monkeypatch.setenv("IDAT_JAX_CACHE", str(tmp_path / "a_file" / "cache"))
  with pytest.raises(ck.DownloadError) as e:
    pretrained.resolve(server.url + "/w.npz", model="student")
  msg = str(e.value)
  assert "\n" not in msg and "cannot write the cache" in msg and "IDAT_JAX_CACHE" in msg
  assert "model 'student'" in msg and server.url + "/w.npz" in msg
  assert server.requests == []


def test_a_file_put_in_the_cache_by_hand_is_verified_and_used(tmp_path, server, env, monkeypatch):
  """The failure messages point at the cache path for names without a ckpt_dir: a file put
  there by hand is used (offline too) once it parses; one that does not is set aside."""
  data = _npz_bytes(tmp_path)
  monkeypatch.setenv("IDAT_JAX_PRETRAINED_MIRROR", server.url + "/m")
  monkeypatch.setenv("IDAT_JAX_OFFLINE", "1")
  env.mkdir(parents=True)
  (env / B16).write_bytes(data)
  assert pretrained.resolve("augreg-in21k-B/16") == str(env / B16)
  assert open(str(env / B16) + ".sha256").read().split()[0] == hashlib.sha256(data).hexdigest()
  assert server.requests == []
  monkeypatch.delenv("IDAT_JAX_OFFLINE")
  server.files["/m/" + S16] = data
  (env / S16).write_bytes(b"<!DOCTYPE html><html><body>saved by a browser</body></html>")
  assert open(pretrained.resolve("augreg-in21k-S/16"), "rb").read() == data
  assert len(server.gets("/m/" + S16)) == 1


def test_a_stale_partial_file_of_another_version_starts_over(tmp_path, server, env):
  data, other = _npz_bytes(tmp_path, seed=0), _npz_bytes(tmp_path, seed=1)
  assert len(data) == len(other) and data != other
  server.files["/w.npz"] = data
  path = pretrained.resolve(server.url + "/w.npz")  # where the cache keeps this URL
  os.remove(path)
  os.remove(path + ".sha256")
  with open(path + ".part", "wb") as f:  # an interrupted download of the file's old version
    f.write(other[:len(other) // 2])
  server.requests.clear()
  assert pretrained.resolve(server.url + "/w.npz") == path
  assert open(path, "rb").read() == data
  assert [g[2] for g in server.gets("/w.npz")] == [f"bytes={len(other) // 2}-", None]
  assert not os.path.exists(path + ".part")


def test_offline_uses_the_cache_only(tmp_path, server, env, monkeypatch):
  server.files["/m/" + B16] = _npz_bytes(tmp_path)
  monkeypatch.setenv("IDAT_JAX_PRETRAINED_MIRROR", server.url + "/m")
  monkeypatch.setenv("IDAT_JAX_OFFLINE", "1")
  with pytest.raises(ck.NotCachedError, match=r"not in the cache .* IDAT_JAX_OFFLINE is set: "
                     r"download .*/m/B_16") as e:
    pretrained.resolve("augreg-in21k-B/16")
  assert isinstance(e.value, FileNotFoundError) and "\n" not in str(e.value)  # a missing file
  assert server.requests == []
  monkeypatch.delenv("IDAT_JAX_OFFLINE")
  path = pretrained.resolve("augreg-in21k-B/16")
  monkeypatch.setenv("IDAT_JAX_OFFLINE", "1")
  assert pretrained.resolve("augreg-in21k-B/16") == path
  assert len(server.requests) == 1


def test_paths_and_unknown_names_pass_through(tmp_path, env):
  assert pretrained.resolve("") == ""
  assert pretrained.resolve("gs://bucket/w.npz") == "gs://bucket/w.npz"
  assert pretrained.resolve(str(tmp_path / "missing.npz")) == str(tmp_path / "missing.npz")
  (tmp_path / "mine.npz").write_bytes(b"x")
  assert pretrained.resolve(str(tmp_path / "mine.npz")) == str(tmp_path / "mine.npz")
  assert "augreg-in21k-B/16" in pretrained.describe()
  assert ck.resolve_checkpoint is pretrained.resolve is ck.resolve_pretrained


def test_fetch_ahead_command(tmp_path, server, env, monkeypatch, capsys):
  """``python -m idat_jax.checkpoints [NAME...]``: the list, a fetch, and a one-line error."""
  assert pretrained.main([]) == 0
  assert "mae-vit-base" in capsys.readouterr().out
  server.files["/m/" + S16] = _npz_bytes(tmp_path)
  monkeypatch.setenv("IDAT_JAX_PRETRAINED_MIRROR", server.url + "/m")
  assert pretrained.main(["augreg-in21k-S/16"]) == 0
  assert capsys.readouterr().out.strip() == str(env / S16)
  assert pretrained.main(["augreg-in21k-B/16"]) == 1
  err = capsys.readouterr().err.strip()
  assert err.startswith("error: pretrained checkpoint 'augreg-in21k-B/16': ") and "\n" not in err
  assert "HTTP 404" in err and f"by hand to {env / B16}" in err


# ---------------------------------------------------------------------------------------------
# The Hugging Face Hub through huggingface_hub, HF_ENDPOINT pointed at the local server.


def _hub_env(server, tmp_path, **extra):
  env = dict(os.environ, HF_ENDPOINT=server.url, HF_HOME=str(tmp_path / "hf"),
             HF_HUB_DISABLE_TELEMETRY="1", NO_PROXY="127.0.0.1,localhost",
             no_proxy="127.0.0.1,localhost", IDAT_JAX_CACHE=str(tmp_path / "cache"), **extra)
  for key in ("HF_HUB_OFFLINE", "IDAT_JAX_OFFLINE"):  # (tests/conftest.py sets the latter)
    env.pop(key, None)
  env.update(extra)
  return env


_RESOLVE = ("import sys; from idat_jax.checkpoints import pretrained as p\n"
            "try:\n  print(p.resolve(sys.argv[1], model='student'))\n"
            "except p.DownloadError as e:\n  print('error:', e); sys.exit(1)\n")


def test_hub_names_download_verify_and_work_offline(tmp_path, server):
  save_file(_timm_state(), str(tmp_path / "model.safetensors"))
  data = (tmp_path / "model.safetensors").read_bytes()
  server.files["/timm/tiny_vit.test/resolve/main/model.safetensors"] = data
  run = lambda env: subprocess.run([sys.executable, "-c", _RESOLVE, "hf-hub:timm/tiny_vit.test"],  # noqa: E731
                                   env=env, capture_output=True, text=True, timeout=120, cwd=REPO)
  out = run(_hub_env(server, tmp_path))
  assert out.returncode == 0, out.stdout + out.stderr
  path = out.stdout.strip().splitlines()[-1]
  assert open(path, "rb").read() == data and str(tmp_path / "hf") in path
  gets = len(server.gets("/timm/tiny_vit.test/resolve/main/model.safetensors"))
  # Offline: the Hub's cache answers, no request.
  before = len(server.requests)
  out = run(_hub_env(server, tmp_path, HF_HUB_OFFLINE="1"))
  assert out.returncode == 0, out.stdout + out.stderr
  assert out.stdout.strip().splitlines()[-1] == path and len(server.requests) == before
  assert gets == 1
  # A repo that is not there, and offline with an empty cache: one line each.
  out = subprocess.run([sys.executable, "-c", _RESOLVE, "hf-hub:timm/missing"],
                       env=_hub_env(server, tmp_path), capture_output=True, text=True,
                       timeout=120, cwd=REPO)
  assert out.returncode == 1
  line = out.stdout.strip().splitlines()[-1]
  assert "hf-hub:timm/missing" in line and f"{server.url}/timm/missing/resolve/main/" in line
  out = subprocess.run([sys.executable, "-c", _RESOLVE, "hf-hub:timm/tiny_vit.test"],
                       env=_hub_env(server, tmp_path / "empty", HF_HUB_OFFLINE="1"),
                       capture_output=True, text=True, timeout=120, cwd=REPO)
  assert out.returncode == 1 and "offline mode is set" in out.stdout


# ---------------------------------------------------------------------------------------------
# Two processes of one host fetching one file at once: one download, both correct.


def test_two_processes_download_once(tmp_path, server, env, monkeypatch):
  data = _npz_bytes(tmp_path, image_size=64)
  server.files["/m/" + B16] = data
  server.modes["/m/" + B16] = "slow"
  child_env = dict(os.environ, IDAT_JAX_PRETRAINED_MIRROR=server.url + "/m")
  script = ("import hashlib, sys; from idat_jax.checkpoints import pretrained as p\n"
            "path = p.resolve('augreg-in21k-B/16')\n"
            "print(path, hashlib.sha256(open(path, 'rb').read()).hexdigest())\n")
  procs = [subprocess.Popen([sys.executable, "-c", script], env=child_env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for _ in range(2)]
  outs = [p.communicate(timeout=120) for p in procs]
  assert [p.returncode for p in procs] == [0, 0], outs
  digest = hashlib.sha256(data).hexdigest()
  for stdout, _ in outs:
    assert stdout.split() == [str(env / B16), digest]
  assert len(server.gets("/m/" + B16)) == 1


# ---------------------------------------------------------------------------------------------
# The README's first run: :task=dtd with the default recipe fetches both AugReg files (the
# folder holds a 5-class digits task under dtd's name; its task.json gives the class count).


@pytest.mark.slow
def test_default_recipe_fetches_both_augreg_files_and_trains(tmp_path, server):
  from idat_jax.data import write_digits_task
  write_digits_task(str(tmp_path / "vtab"), "dtd", classes=range(5), train_size=50)
  for name in (B16, S16):
    server.files["/augreg/" + name] = _npz_bytes(tmp_path, seed=len(name), image_size=16)
  workdir = tmp_path / "runs" / "dtd"
  args = ["--config", os.path.join(REPO, "configs", "idat_vtab.py") + ":task=dtd,dtype=float32",
          "--workdir", str(workdir),
          f"--config.data.root={tmp_path / 'vtab'}", "--config.data.image_size=16",
          "--config.optim.epochs=1", "--config.optim.cooldown_epochs=0",
          "--config.optim.warmup_epochs=0", "--config.batch_size=25",
          "--config.progress_bar=False", "--config.num_devices=1"]
  for model in ("student", "teacher"):
    args.append(f"--config.models.{model}.variant=custom")
    args += [f"--config.models.{model}.{k}={v}" for k, v in TINY.items()]
  env = dict(os.environ, IDAT_JAX_CACHE=str(tmp_path / "cache"), JAX_PLATFORMS="cpu",
             IDAT_JAX_PRETRAINED_MIRROR=server.url + "/augreg", NO_PROXY="127.0.0.1",
             no_proxy="127.0.0.1")
  for key in ("XLA_FLAGS", "IDAT_JAX_OFFLINE"):
    env.pop(key, None)
  # Run from a fresh folder: ckpt_dir's default 'pretrained/' does not exist there.
  out = subprocess.run([sys.executable, "-m", "idat_jax.main", *args], cwd=str(tmp_path),
                       env=dict(env, PYTHONPATH=REPO), capture_output=True, text=True,
                       timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert len(server.gets("/augreg/" + B16)) == 1 and len(server.gets("/augreg/" + S16)) == 1
  summary = json.load(open(workdir / "summary.json"))
  assert summary["finished"] and summary["last_top1"] is not None
  for name in (B16, S16):
    assert (tmp_path / "cache" / name).is_file()
  # A second run of the same command hits the cache: no new request.
  before = len(server.requests)
  out = subprocess.run([sys.executable, "-m", "idat_jax.main", *args[:3], str(tmp_path / "again"),
                        *args[4:]], cwd=str(tmp_path), env=dict(env, PYTHONPATH=REPO),
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert len(server.requests) == before
