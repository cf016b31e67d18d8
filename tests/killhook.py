"""Run a script, killing its process (SIGKILL, no cleanup) at its N-th filesystem step.

    python tests/killhook.py N SCRIPT ARGS...     N = 0: run to the end and print the number of steps

A filesystem step is a call that changes the disk: opening a file for writing, os.replace / os.rename /
os.remove, shutil.rmtree, os.makedirs, torch.save. The kill lands just before the step, so the steps of a run
enumerate every instant at which a kill leaves the disk in a different state (a file opened for writing and
not yet written is the state a kill mid-write leaves, up to its length)."""
import atexit
import builtins
import os
import runpy
import shutil
import signal
import sys

import torch

AT, COUNT = int(sys.argv[1]), [0]


def step():
    COUNT[0] += 1
    if COUNT[0] == AT:
        os.kill(os.getpid(), signal.SIGKILL)


def counted(fn, writes=lambda *a, **k: True):
    def wrapper(*a, **k):
        if writes(*a, **k):
            step()
        return fn(*a, **k)
    return wrapper


def opens_for_writing(file, mode="r", *a, **k):
    return isinstance(file, (str, os.PathLike)) and any(c in mode for c in "wax+")


builtins.open = counted(builtins.open, opens_for_writing)
for mod, name in [(os, "replace"), (os, "rename"), (os, "remove"), (os, "makedirs"), (shutil, "rmtree"),
                  (torch, "save")]:
    setattr(mod, name, counted(getattr(mod, name)))
if AT == 0:
    atexit.register(lambda: print(f"FS_STEPS {COUNT[0]}", file=sys.stderr, flush=True))
sys.argv = sys.argv[2:]
sys.path.insert(0, os.path.dirname(os.path.abspath(sys.argv[0])))   # as `python SCRIPT` would
runpy.run_path(sys.argv[0], run_name="__main__")
