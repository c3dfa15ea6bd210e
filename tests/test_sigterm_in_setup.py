"""SIGTERM from the start of ``fit`` until ``GracefulStop`` answers it (:mod:`epas_lightning.sigterm_in_setup`), each
case a process of its own: the handler's default action ends it. The command line's case is in test_surface."""

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import REPO

from epas_lightning.sigterm_in_setup import STOPPED_IN_SETUP

PRELUDE = """
import os, signal, time
from epas_lightning import sigterm_in_setup as setup
def stop_here():
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.1)  # the handler runs
with setup.answering_sigterm_in_setup():
"""
STOPPED = "try:\n    stop_here()\nexcept KeyboardInterrupt as e:\n    print(e.signum.name, e.reason)\n"


def run(body: str) -> tuple[int, str]:
    """Exit status and output of ``body`` run within :func:`answering_sigterm_in_setup` in a fresh interpreter."""
    lines = "\n".join(f"    {line}" for line in f'{body}\nprint("ends")'.splitlines())
    code = f"{PRELUDE}{lines}\nprint(signal.getsignal(signal.SIGTERM) == signal.SIG_DFL)"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    return done.returncode, done.stdout


@pytest.mark.parametrize(
    ("body", "status", "output"),
    [
        ("setup.answer_sigterm_in_setup(True)\n" + STOPPED, 0, f"SIGTERM {STOPPED_IN_SETUP}\nends\nTrue\n"),
        ('stop_here()\nprint("remembered")\n' + STOPPED.replace("stop_here()", "setup.answer_sigterm_in_setup(True)"),
         0, f"remembered\nSIGTERM {STOPPED_IN_SETUP}\nends\nTrue\n"),
        ('stop_here()\nprint("remembered")\nsetup.answer_sigterm_in_setup(False)', -signal.SIGTERM, "remembered\n"),
        ("setup.answer_sigterm_in_setup(False)\nstop_here()", -signal.SIGTERM, ""),
        ("setup.answer_sigterm_in_setup(True)\nsetup.training_started()\nstop_here()", -signal.SIGTERM, ""),
        ("setup.answer_sigterm_in_setup(True)\nfound = signal.getsignal(signal.SIGTERM)\n"
         'signal.signal(signal.SIGTERM, lambda *a: print("answered") or found(*a))\nstop_here()', 0, "answered\nends\n"
         "False\n"),
        ("setup.answer_sigterm_in_setup(True)\nif (child := os.fork()) == 0:\n    stop_here()\n    os._exit(0)\n"
         "print(os.waitpid(child, 0)[1] == signal.SIGTERM)", 0, "True\nends\nTrue\n"),
        ("setup.answer_sigterm_in_setup(True)\nsetup.NATIVE_WAIT_GRACE_S = 0.1\nif (child := os.fork()) == 0:\n"
         "    stop_here()\n    os._exit(0)\nprint(os.waitpid(child, 0)[1] == signal.SIGTERM)\ntime.sleep(1)", 0,
         "True\nends\nTrue\n"),
    ],
    ids=[
        "during setup: stops at once",
        "before the config is read: remembered, stops once it says so",
        "before the config is read: remembered, the default action once it says interrupt.enabled false",
        "interrupt.enabled false: the default action",
        "after training started: the default action",
        "called by the handler Lightning registers: its answer stands",
        "in a process forked meanwhile: the default action",
        "in a process forked meanwhile: the default action, not told to this one's watch of native waits",
    ],
)  # fmt: skip
def test_sigterm_before_training_stops_the_command_where_the_config_lets_it(body, status, output):
    assert run(body) == (status, output)


def test_sigterm_while_setup_waits_in_native_code_takes_the_default_action_at_once():
    """A rank waiting for the others to join (``init_process_group``'s store, here a ``TCPStore`` waiting for a second
    process that never comes) is in native code, where no Python handler runs: the SIGTERM was held until the wait timed
    out (30 min by default), then raised over its error. After a grace the process now ends as the signal's default
    action did, with the command's one line, and ends the processes it started (the ranks Lightning launched, which
    waited for it, as Lightning ends them after Ctrl+C)."""
    body = (
        "import datetime, subprocess, sys, threading, torch.distributed as dist\n"
        "setup.answer_sigterm_in_setup(True)\n"
        "setup.NATIVE_WAIT_GRACE_S = 0.5\n"
        "quiet = {'stdout': subprocess.DEVNULL, 'stderr': subprocess.DEVNULL}\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'], **quiet)\n"
        "print(child.pid, flush=True)\n"
        "threading.Timer(2, os.kill, (os.getpid(), signal.SIGTERM)).start()\n"
        "dist.TCPStore('127.0.0.1', 0, world_size=2, is_master=True, timeout=datetime.timedelta(seconds=20))"
    )
    code = f"{PRELUDE}{''.join(f'    {line}{chr(10)}' for line in body.splitlines())}"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 128 + signal.SIGTERM, done.stderr[-2000:]
    assert done.stderr == f"interrupted: fit stopped ({STOPPED_IN_SETUP})\n"
    child = Path(f"/proc/{int(done.stdout)}/stat")
    deadline = time.monotonic() + 5
    while child.exists() and child.read_text().rsplit(")", 1)[1].split()[0] != "Z" and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not child.exists() or child.read_text().rsplit(")", 1)[1].split()[0] == "Z"
