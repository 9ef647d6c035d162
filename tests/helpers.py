"""Helpers shared by the tests (importable as ``helpers``: pytest puts tests/ on sys.path)."""

from __future__ import annotations

import atexit
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "fixtures"
POOL_TINY = FIXTURES / "pool_tiny.jsonl"      # 40 real rows (see fixtures/ATTRIBUTION.md)
EVAL_TINY = FIXTURES / "eval_tiny.jsonl"      # 10 real held-out rows


def load_module(path: Path):
    """The Python file at ``path`` (a launch script, which is not part of the package) as a
    module, without running its ``__main__`` block."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(Path(path).stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_config(path: Path, model_dir: Path, out_dir: Path, **sections) -> Path:
    """A small run config for end-to-end tests; ``sections`` update the defaults below.

    fp32 unless a test asks for bf16: ``model.precision: auto`` would pick bf16 on a CPU that
    computes it natively, and the tests' numbers must not depend on the machine."""
    import yaml
    cfg = {
        "seed": 7,
        "model": {"path": str(model_dir), "precision": "fp32"},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.1, "target_modules": ["q_proj", "v_proj"]},
        "data": {"pool": str(POOL_TINY), "max_length": 160, "on_error": "skip"},
        "eval": {"path": str(EVAL_TINY), "batch_size": 4},
        "selection": {"selector": "kcenter", "rounds": 3, "init_size": 6, "per_round": 5,
                      "batch_size": 8},
        "train": {"epochs": 2, "batch_size": 4, "micro_batch_size": 2, "lr": 1e-3},
        "deepspeed": {"zero_stage": 0},
        "output": {"dir": str(out_dir), "keep_checkpoints": 0},
    }
    for section, values in sections.items():
        if isinstance(values, dict):
            cfg.setdefault(section, {}).update(values)
        else:
            cfg[section] = values
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_train(args: list[str], ranks: int | None = None, timeout: int = 600,
              env: dict | None = None, check: bool = True, script: str = "train.py",
              launcher: bool = False) -> subprocess.CompletedProcess:
    """Run launch/train.py (or another launch ``script``), forked from the worker's fork server
    (tests/forkserver.py: a fresh ``python launch/<script>`` without paying its imports again):
    as one process, or with ``ranks`` as that many ranks set up as the ``deepspeed`` launcher
    sets them up. ``launcher=True``: through the real ``deepspeed`` launcher (``ranks`` of
    them, 1 by default), every rank a new Python process."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    shm_before = shm_buffers()
    if launcher:
        deepspeed = Path(sys.executable).with_name("deepspeed")
        cmd = [str(deepspeed), "--num_gpus", str(ranks or 1), "--master_port",
               str(_free_port()), str(REPO / "launch" / script), *args]
        proc = subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True,
                              timeout=timeout)
    else:
        cmd = [sys.executable, str(REPO / "launch" / script), *args]
        if ranks:
            cmd = ["deepspeed", "--num_gpus", str(ranks), *cmd[1:], "(ranks forked)"]
        proc = start_run(script, args, full_env, ranks).finish(timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n"
                             f"{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    assert_no_shm_leak(shm_before)
    return proc


class ForkedRun:
    """One run started by the fork server: its pid (also its process group), its exit code."""

    def __init__(self, server: subprocess.Popen, pid: int, args: list[str], out_dir: Path):
        self.server, self.pid, self.args, self._out = server, pid, args, out_dir
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None and select.select([self.server.stdout], [], [], 0)[0]:
            self.returncode = _read_reply(self.server)["rc"]
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            timed_out = not select.select([self.server.stdout], [], [], timeout)[0]
            if timed_out:
                os.killpg(self.pid, signal.SIGKILL)
            self.returncode = _read_reply(self.server)["rc"]
            if timed_out:
                raise subprocess.TimeoutExpired(self.args, timeout)
        return self.returncode

    def output(self, name: str) -> str:
        return (self._out / name).read_text(errors="replace")

    def finish(self, timeout: float | None = None) -> subprocess.CompletedProcess:
        rc = self.wait(timeout)
        done = subprocess.CompletedProcess(self.args, rc, self.output("stdout"),
                                           self.output("stderr"))
        shutil.rmtree(self._out, ignore_errors=True)
        return done


_SERVER: subprocess.Popen | None = None


def start_run(script: str, args: list[str], env: dict, ranks: int | None = None) -> ForkedRun:
    """Start launch/``script`` ``args`` as a forked child of this worker's fork server (with
    ``ranks``: a child that starts that many ranks, as the deepspeed launcher would)."""
    global _SERVER
    if _SERVER is None or _SERVER.poll() is not None:
        _SERVER = subprocess.Popen([sys.executable, str(Path(__file__).with_name("forkserver.py"))],
                                   cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                   text=True, bufsize=1)
        atexit.register(_SERVER.kill)
        assert _read_reply(_SERVER) == {"ready": True}
    out = Path(tempfile.mkdtemp(prefix="evotune-run-"))
    request = {"script": script, "args": [str(a) for a in args], "env": env, "cwd": str(REPO),
               "stdout": str(out / "stdout"), "stderr": str(out / "stderr")}
    if ranks:
        request.update(ranks=ranks, port=_free_port())
    _SERVER.stdin.write(json.dumps(request) + "\n")
    _SERVER.stdin.flush()
    return ForkedRun(_SERVER, _read_reply(_SERVER)["pid"],
                     [sys.executable, str(REPO / "launch" / script), *args], out)


def _read_reply(server: subprocess.Popen) -> dict:
    line = server.stdout.readline()
    if not line:
        raise RuntimeError(f"the fork server ended (exit code {server.wait()})")
    return json.loads(line)


def assert_no_shm_leak(before: set[str], grace: float = 10.0) -> None:
    """Fail if DeepSpeed shared-memory buffers that were not in ``before`` stay in /dev/shm.

    A run unlinks its buffers right after joining the group; a buffer seen here may belong to a
    run of another test worker that is joining just now, so a new name must outlive ``grace``
    seconds to count as leaked.
    """
    leaked = shm_buffers() - before
    deadline = time.monotonic() + grace
    while leaked and time.monotonic() < deadline:
        time.sleep(0.5)
        leaked &= shm_buffers()
    assert not leaked, f"a run left DeepSpeed shared-memory buffers behind: {sorted(leaked)}"


def shm_buffers() -> set[str]:
    """Names of DeepSpeed's CPU allreduce buffers in /dev/shm (each holds ~69 MB of RAM)."""
    shm = Path("/dev/shm")
    return {p.name for p in shm.glob("deepspeed_allreduce_buffer_*")} if shm.is_dir() else set()


def shard_rows(n_rows: int, rank: int, world: int) -> list[int]:
    """A rank's pool rows for the sharded-selection tests: blocks of 3 rows dealt
    round-robin, like the feature pass's batches."""
    return [p for p in range(n_rows) if (p // 3) % world == rank]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_ranks(work, world: int, *args, timeout: int = 180) -> list:
    """``work(rank, world, port, *args)`` on ``world`` ranks of a gloo group that ``work`` joins
    on ``port`` (a module-level function, so the ranks can import it); their return values by
    rank. A rank that raises fails the test with its traceback rather than leaving the others
    to time out.

    The ranks are processes of this test process's rank pool (spawned on first use, one more
    whenever a larger world is asked for, stopped at the end of the test module by conftest):
    each starts once and imports torch once, then runs one rank of every group after. Between
    two calls a rank leaves no process group and no environment variable behind; after a
    failure or a timeout the whole pool is stopped, and the next call spawns a fresh one. Each
    rank computes on one thread: three ranks of two threads each on a 2-core machine spent
    most of a collective's wait spinning in OpenMP (the sharded-selection tests took 2.5
    times as long)."""
    import queue
    pool = _rank_pool(world)
    port = _free_port()
    for rank in range(world):
        pool.inboxes[rank].put((work, rank, world, port, args))
    got = {}
    try:
        while len(got) < world:
            rank, crash, value = pool.results.get(timeout=timeout)
            assert crash is None, f"rank {rank}: {crash}"
            got[rank] = value
    except (AssertionError, queue.Empty):
        pool.stop()
        raise
    return [got[r] for r in range(world)]


class _RankPool:
    """Spawned processes that each run one rank of a group per request (``_rank_loop``)."""

    def __init__(self):
        import multiprocessing as mp
        self.ctx = mp.get_context("spawn")
        self.results = self.ctx.Queue()
        self.procs, self.inboxes = [], []

    def grow(self, size: int) -> None:
        while len(self.procs) < size:
            inbox = self.ctx.Queue()
            proc = self.ctx.Process(target=_rank_loop, args=(inbox, self.results), daemon=True)
            proc.start()
            self.procs.append(proc)
            self.inboxes.append(inbox)

    def stop(self) -> None:
        global _RANKS
        for proc in self.procs:
            proc.kill()
            proc.join(timeout=30)
        _RANKS = None


_RANKS: _RankPool | None = None


def stop_rank_pool() -> None:
    """Stop the rank pool's processes, if there are any (each holds ~250 MB)."""
    if _RANKS is not None:
        _RANKS.stop()


def _rank_pool(size: int) -> _RankPool:
    global _RANKS
    if _RANKS is None or not all(p.is_alive() for p in _RANKS.procs):
        if _RANKS is not None:
            _RANKS.stop()
        _RANKS = _RankPool()
    _RANKS.grow(size)
    return _RANKS


def _rank_loop(inbox, results) -> None:
    """A pool process: run each ``(work, rank, world, port, args)`` from ``inbox``, put
    ``(rank, traceback or None, value)`` on ``results``, then leave the process group and the
    environment as they were before it."""
    import traceback

    import torch
    import torch.distributed as dist
    torch.set_num_threads(1)
    while True:
        work, rank, world, port, args = inbox.get()
        env = dict(os.environ)
        try:
            results.put((rank, None, work(rank, world, port, *args)))
        except BaseException:
            results.put((rank, traceback.format_exc(), None))
        finally:
            if dist.is_available() and dist.is_initialized():
                dist.destroy_process_group()
            os.environ.clear()
            os.environ.update(env)


def build_tiny_model(out_dir, tokenizer_dir) -> Path:
    """Save a tiny randomly initialised Llama (hidden 32, 2 layers) and a real tokenizer, for tests.

    The weights are the same on every call (seed 0; the global RNG state is left untouched).
    The vocabulary is the tokenizer's, so real chat-templated text can be fed to the model.

    Returns:
        ``out_dir`` as a ``Path``, loadable with ``load_model`` and ``load_tokenizer``.
    """
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out_dir = Path(out_dir)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    config = LlamaConfig(
        vocab_size=len(tokenizer),  # len() counts added special tokens, vocab_size does not
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def ifd_scores(model, tokenizer, rows: list, variant: str, max_length: int,
               batch_size: int = 8, device="cpu") -> list[dict]:
    """IFD of each Alpaca row with one model in one process, from evotune's own token rules
    (``ifd_inputs``), batching and loss: the reference-template IFD pass without a Strategy.

    The conditioned and direct passes of all rows are batched together by length (right
    padding); each mean loss covers the row's scored answer tokens only. The model is put in
    eval mode for the pass and restored after.

    Returns:
        One dict per row, in order: ``{"loss_cond", "loss_direct", "ifd"}`` (floats; losses in
        nats/token), or ``{"skipped": reason}``.
    """
    import torch

    from evotune.trainer.data import Encoded, collate, plan_batches
    from evotune.trainer.fit import logits_window
    from evotune.trainer.model import backbone, lm_head
    from evotune.trainer.passes.ifd import ifd_inputs, ifd_value
    from evotune.trainer.passes.forward import response_scores

    out: list[dict] = [{} for _ in rows]
    seqs: list[Encoded] = []
    owners: list[tuple[int, str]] = []          # (row index, "loss_cond" | "loss_direct")
    for i, row in enumerate(rows):
        made = ifd_inputs(row, tokenizer, variant, max_length)
        if isinstance(made, str):
            out[i] = {"skipped": made}
            continue
        seqs += made
        owners += [(i, "loss_cond"), (i, "loss_direct")]

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    was_training = model.training
    model.eval()
    decoder, head = backbone(model), lm_head(model)
    try:
        with torch.no_grad():
            for positions in plan_batches([len(s.input_ids) for s in seqs], batch_size):
                batch = collate([seqs[p] for p in positions], pad_id)
                hidden = decoder(input_ids=batch["input_ids"].to(device),
                                 attention_mask=batch["attention_mask"].to(device)
                                 ).last_hidden_state
                logits = head(hidden[:, -logits_window(batch["labels"]):])
                losses = response_scores(logits, batch["labels"].to(logits.device),
                                         ("loss",))["loss"]
                for p, loss in zip(positions, losses.tolist()):
                    i, key = owners[p]
                    out[i][key] = loss
    finally:
        model.train(was_training)

    for r in out:
        if "skipped" in r:
            continue
        try:
            r["ifd"] = ifd_value(r["loss_cond"], r["loss_direct"], variant)
        except ValueError as e:
            r.clear()
            r["skipped"] = str(e)
    return out


BROWSERS = ("chromium", "chromium-browser", "google-chrome")


def find_browser() -> str | None:
    """A headless-capable Chromium on PATH (Debian: apt-get install chromium), else None."""
    return next((path for path in map(shutil.which, BROWSERS) if path), None)


def render_page(path: Path, fragment: str = "", timeout: int = 180) -> tuple[str, list[str]]:
    """Open ``path`` (plus ``#fragment``) in headless Chromium with the network cut off (every
    host unresolvable, a dead proxy): the DOM once its scripts have run, and every message the
    page wrote to the console (console.log/error, script errors, blocked loads)."""
    browser = find_browser()
    if browser is None:
        raise RuntimeError(f"no browser found (tried {', '.join(BROWSERS)})")
    with tempfile.TemporaryDirectory(prefix="evotune-browser-") as profile:
        proc = subprocess.run(
            [browser, "--headless", "--disable-gpu", "--no-sandbox", "--no-first-run",
             f"--user-data-dir={profile}", "--proxy-server=127.0.0.1:9",
             "--host-resolver-rules=MAP * ~NOTFOUND", "--enable-logging=stderr", "--v=0",
             "--dump-dom", Path(path).resolve().as_uri() + (f"#{fragment}" if fragment else "")],
            capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0 or "</html>" not in proc.stdout:
        raise RuntimeError(f"{browser} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc.stdout, [line for line in proc.stderr.splitlines() if ":CONSOLE" in line]


class Element:
    """One element of a parsed page: ``tag``, ``attrs``, ``children`` (elements and strings)."""

    def __init__(self, tag: str, attrs: dict):
        self.tag, self.attrs, self.children = tag, attrs, []

    def text(self) -> str:
        return "".join(c if isinstance(c, str) else c.text() for c in self.children)

    def iter(self, tag: str | None = None):
        """This element and every element under it (with ``tag`` only), in document order."""
        if tag is None or self.tag == tag:
            yield self
        for c in self.children:
            if isinstance(c, Element):
                yield from c.iter(tag)

    def by_id(self, id_: str) -> Element:
        found = next((e for e in self.iter() if e.attrs.get("id") == id_), None)
        if found is None:
            raise AssertionError(f"no element with id {id_!r} in the page")
        return found


def parse_page(page: str) -> Element:
    """The element tree of an HTML page (the standard library's tokenizer; void elements such
    as <input> and <meta> have no children)."""
    from html.parser import HTMLParser
    void = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta",
            "source", "track", "wbr"}
    root = Element("#document", {})
    stack = [root]

    class Builder(HTMLParser):
        def handle_starttag(self, tag, attrs):
            node = Element(tag, dict(attrs))
            stack[-1].children.append(node)
            if tag not in void:
                stack.append(node)

        def handle_startendtag(self, tag, attrs):
            stack[-1].children.append(Element(tag, dict(attrs)))

        def handle_endtag(self, tag):
            for i in range(len(stack) - 1, 0, -1):
                if stack[i].tag == tag:
                    del stack[i:]
                    break

        def handle_data(self, data):
            stack[-1].children.append(data)

    Builder(convert_charrefs=True).feed(page)
    return root
