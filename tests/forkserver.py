"""A process that imports evotune's commands once and forks a fresh child for every run.

A plain ``python launch/train.py`` spends ~6 s of CPU importing torch, transformers, peft and
DeepSpeed before it does anything, and a run imports as much again lazily (model classes,
DeepSpeed's engine); the end-to-end tests start well over a hundred such runs. Measured on
2 cores, a 3-round tiny run took 12-14 s forked from here and 23 s as a plain subprocess. This
server pays the imports once per test worker, then for each request forks a child that is what
a fresh ``python launch/<script> ARGS`` would be after its imports (launch/'s scripts only call
``main`` of a module of ``evotune.trainer.cli``): its own session (so it can be SIGKILLed as a
group), its own environment, working directory and output files, ``main(ARGS)`` and its exit
code. Nothing runs in the server itself, so every child starts from the same
freshly imported state. A request for N ranks forks a child that does what the ``deepspeed``
launcher does on one node (``_launch``), its ranks forked too: a two-rank tiny run started
through the real launcher spends ~40 s of its time (on 2 busy cores) starting four Pythons.
Runs that test the launcher itself start it for real (tests/helpers.py, ``launcher=True``).

After each child ends, the server imports the modules that child imported while running
(a run imports most of its libraries lazily: model classes, DeepSpeed's engine, sympy), so the
next children start with them too.

Protocol (JSON lines): the parent writes ``{"script", "args", "env", "cwd", "stdout",
"stderr"}`` (and for several ranks ``"ranks"`` and the group's ``"port"``) on stdin; the
server answers ``{"pid": N}`` when the child starts and ``{"rc": N}`` when it ends
(negative: killed by that signal, as ``subprocess`` reports it).
"""

from __future__ import annotations

import gc
import importlib
import json
import os
import sys
import traceback

LAUNCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "launch")


# launch/'s scripts that runs come here for, and the command module each one calls
COMMANDS = {"train.py": "evotune.trainer.cli.train",
            "score_pool.py": "evotune.trainer.cli.score_pool"}


def _child(request: dict, commands: dict) -> int:
    """The forked child: one run, or with ``ranks`` the launcher of that many ranks."""
    os.setsid()
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
        f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(f, fd)
        os.close(f)
    sys.stdout.reconfigure(line_buffering=True)
    sys.stderr.reconfigure(line_buffering=True)
    if request.get("ranks"):
        return _launch(request, commands)
    return _run(request["script"], request["args"], commands)


def _run(name: str, args: list[str], commands: dict) -> int:
    """``main(args)`` of the command behind launch/``name``, as that script's process would
    run it: its exit code."""
    # A fresh process reads OMP_NUM_THREADS when torch starts; torch started in the server.
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():
        import torch
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    sys.argv = [os.path.join(LAUNCH, name), *args]
    try:
        return int(commands[name].main(args) or 0)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:
        traceback.print_exc()
        return 1


def _launch(request: dict, commands: dict) -> int:
    """What ``deepspeed --num_gpus N launch/<script> ARGS`` does on one node, with ranks forked
    from here instead of started afresh: rank r gets the environment the launcher gives it
    (RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_SIZE, CROSS_RANK, CROSS_SIZE, MASTER_ADDR,
    MASTER_PORT) and ``--local_rank=r`` before ARGS, and shares this process's output files
    and process group. As the launcher does, the first rank to exit with an error has the
    others killed, and its exit code (mod 256: -9 is 247) is the launcher's."""
    import signal
    ranks = int(request["ranks"])
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(request["port"]),
           "WORLD_SIZE": str(ranks), "LOCAL_SIZE": str(ranks), "CROSS_RANK": "0",
           "CROSS_SIZE": "1"}
    pids = []
    for rank in range(ranks):
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                os.environ.update(env, RANK=str(rank), LOCAL_RANK=str(rank))
                code = _run(request["script"], [f"--local_rank={rank}", *request["args"]],
                            commands)
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        pids.append(pid)
    code = 0
    while pids:
        pid, status = os.wait()
        pids.remove(pid)
        rc = os.waitstatus_to_exitcode(status)
        if rc != 0 and code == 0:
            code = rc % 256
            for other in pids:
                os.kill(other, signal.SIGKILL)
    return code


def serve() -> None:
    # Replies go to the parent on the original stdout; whatever libraries print goes to stderr.
    sys.stdout.flush()
    reply = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.path.insert(0, LAUNCH)          # as for `python launch/<script>`: the script's folder
    commands = {script: importlib.import_module(module) for script, module in COMMANDS.items()}
    importlib.import_module("deepspeed")      # every run imports it (trainer/engine.py)
    print(json.dumps({"ready": True}), file=reply, flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()
        gc.freeze()     # the child's collector leaves the server's objects alone (no copy-on-write)
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                reply.close()
                code = _child(request, commands)
            finally:
                try:
                    with open(request["stderr"] + ".modules", "w") as f:
                        f.write("\n".join(name for name, m in list(sys.modules.items())
                                          if getattr(getattr(m, "__spec__", None), "origin",
                                                     None)))
                    sys.stdout.flush()
                    sys.stderr.flush()
                finally:
                    os._exit(code)
        print(json.dumps({"pid": pid}), file=reply, flush=True)
        _, status = os.waitpid(pid, 0)
        # Read the child's list before replying: the parent deletes the run's folder then.
        names = _child_modules(request["stderr"] + ".modules")
        print(json.dumps({"rc": os.waitstatus_to_exitcode(status)}), file=reply, flush=True)
        _import(names)


def _child_modules(listing: str) -> list[str]:
    """The modules a finished child had imported (none if it was killed before listing them)."""
    try:
        with open(listing) as f:
            names = f.read().split()
        os.unlink(listing)
        return names
    except FileNotFoundError:
        return []


def _import(names: list[str]) -> None:
    """Import what a child imported while it ran (transformers' model classes, DeepSpeed's
    engine, sympy through torch, ...), so later children find it imported. Import only: no
    model, no process group, nothing of a run is made here. A module that cannot be imported on
    its own is left to the children."""
    for name in sorted(set(names) - set(sys.modules), key=lambda n: n.count(".")):
        try:
            importlib.import_module(name)
        except BaseException:
            pass


if __name__ == "__main__":
    serve()
