"""A warm interpreter for the shell-pipeline tests: ``python`` without the import time.

A recipe test runs dozens of ``python -m fairseq_cli.train`` / ``fairseq_cli.generate`` /
``fairseq_kd....`` processes whose tiny models train in a second or two, while importing torch and
fairseq takes four to six seconds each time.  :func:`start` starts a server process that imports
them once and forks a child per command; :func:`start` also writes an executable ``python`` (the
client) that a recipe gets as ``PYTHON=...``.  The client hands the child its argv, working
directory, environment and its own stdin/stdout/stderr (the file descriptors themselves, so pipes,
redirections and heredocs behave as with a real interpreter), and exits with the child's exit code.
The child runs the command exactly as ``python`` would (``-m MODULE``, ``-c CODE``, ``-`` for a
script on stdin, or a script path), so the code under test is the real command-line tools'.

Signals: SIGINT/SIGTERM/SIGHUP to the client are forwarded to the child; when the client dies in any
other way (SIGKILL), the child sees its connection close and kills itself, as a real process would
have died.  Only the client side runs without site-packages (``python -S``), so it starts in ~30 ms.
"""

import json
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time

PRELOAD = [
    "torch", "numpy", "sacrebleu", "sentencepiece", "fairseq", "fairseq.tasks.translation",
    "fairseq.models.transformer", "fairseq.sequence_generator", "fairseq_cli.train", "fairseq_cli.generate",
    "fairseq_cli.preprocess", "matplotlib",
]  # third-party only: fairseq_kd patches fairseq's loader when imported, so it is imported per command, as in a real run


def _send(conn, obj, fds=()):
    data = json.dumps(obj).encode()
    msg = struct.pack("!I", len(data)) + data
    if fds:
        socket.send_fds(conn, [msg], list(fds))
    else:
        conn.sendall(msg)


def _recv(conn, with_fds=0):
    fds = []
    if with_fds:
        head, fds, _, _ = socket.recv_fds(conn, 4, with_fds)
    else:
        head = conn.recv(4)
    while len(head) < 4:
        more = conn.recv(4 - len(head))
        if not more:
            raise EOFError
        head += more
    (size,) = struct.unpack("!I", head)
    data = b""
    while len(data) < size:
        more = conn.recv(size - len(data))
        if not more:
            raise EOFError
        data += more
    return json.loads(data), fds


# ---- server ------------------------------------------------------------------------------------------

def _run_command(argv):
    """Run ``python ARGV`` in this process; returns the exit code."""
    import runpy
    import warnings

    # the preloaded modules are in sys.modules already: not the caller's concern
    warnings.filterwarnings("ignore", message=".*found in sys.modules after import of package", category=RuntimeWarning)

    if argv[:1] in (["-m"], ["-c"], ["-"], []):
        sys.path.insert(0, "" if argv[:1] != ["-m"] else os.getcwd())
    else:
        sys.path.insert(0, os.path.dirname(os.path.abspath(argv[0])))
    try:
        if argv[:1] == ["-m"] and len(argv) > 1:
            sys.argv = [argv[1]] + argv[2:]
            runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        elif argv[:1] == ["-c"] and len(argv) > 1:
            sys.argv = ["-c"] + argv[2:]
            exec(compile(argv[1], "<string>", "exec"), {"__name__": "__main__"})
        elif argv[:1] == ["-"] or not argv:
            sys.argv = ["-"] + argv[1:]
            exec(compile(sys.stdin.read(), "<stdin>", "exec"), {"__name__": "__main__"})
        else:
            sys.argv = list(argv)
            runpy.run_path(argv[0], run_name="__main__")
        return 0
    except SystemExit as e:
        if e.code is None:
            return 0
        if isinstance(e.code, int):
            return e.code
        print(e.code, file=sys.stderr)
        return 1
    except BaseException:  # a real interpreter prints the traceback and exits with 1
        import traceback

        traceback.print_exc()
        return 1


def _child(conn):
    request, fds = _recv(conn, with_fds=3)
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    _send(conn, {"pid": os.getpid()})

    import threading

    def watch():  # the client went away (killed): die as its process would have
        try:
            conn.recv(1)
        except OSError:
            pass
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, daemon=True).start()
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    import logging

    root = logging.getLogger()  # pristine logging: each tool's own basicConfig (stdout for fairseq's) takes effect
    for handler in root.handlers[:]:
        root.removeHandler(handler)
    root.setLevel(logging.WARNING)
    if "OMP_NUM_THREADS" in os.environ:
        import torch

        torch.set_num_threads(max(1, int(os.environ["OMP_NUM_THREADS"])))
    code = _run_command(request["argv"])
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    try:
        _send(conn, {"exit": code})
    except OSError:
        pass
    os._exit(code & 0xFF)


def serve(path):
    import importlib

    for name in PRELOAD:
        importlib.import_module(name)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children are reaped by the kernel
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path + ".tmp")
    server.listen(64)
    os.rename(path + ".tmp", path)  # the client may connect once the socket has its name
    while True:
        conn, _ = server.accept()
        if os.fork() == 0:
            server.close()
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            _child(conn)
        conn.close()


# ---- client ------------------------------------------------------------------------------------------

def client(path, argv):
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.connect(path)
    _send(conn, {"argv": argv, "cwd": os.getcwd(), "env": dict(os.environ)}, fds=(0, 1, 2))
    pid = _recv(conn)[0]["pid"]
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda s, _f: os.kill(pid, s))
    try:
        reply = _recv(conn)[0]
    except (EOFError, ConnectionError):  # the child died of a signal
        sys.exit(1)
    sys.exit(reply["exit"])


CLIENT = """#!/bin/sh
exec {python} -S {this} client {socket} "$@"
"""


class WarmPython:
    """The running server; ``.python`` is the client executable to pass as ``PYTHON``."""

    def __init__(self, folder, env=None):
        self.socket = os.path.join(folder, "warm.sock")
        self.python = os.path.join(folder, "python")
        with open(self.python, "w") as f:
            f.write(CLIENT.format(python=sys.executable, this=os.path.abspath(__file__), socket=self.socket))
        os.chmod(self.python, 0o755)
        self.log = open(os.path.join(folder, "warm.log"), "w")
        self.process = subprocess.Popen([sys.executable, os.path.abspath(__file__), "serve", self.socket],
                                        stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                        env=env)
        deadline = time.time() + 300
        while not os.path.exists(self.socket):
            if self.process.poll() is not None or time.time() > deadline:
                self.log.flush()
                raise RuntimeError(f"the warm interpreter did not start; see {self.log.name}")
            time.sleep(0.1)

    def close(self):
        self.process.terminate()
        self.process.wait()
        self.log.close()


def start(folder=None, env=None):
    return WarmPython(folder or tempfile.mkdtemp(prefix="warm-python-"), env)


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the checkout, not tests/
        serve(sys.argv[2])
    else:
        client(sys.argv[2], sys.argv[3:])
