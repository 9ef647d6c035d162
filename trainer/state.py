"""What a completed round leaves on disk, and how a run finds where to resume.

Layout of an output dir (this module owns it; docs/outputs.md says the same)::

    OUT/.evotune-run                  written first: this dir is an evotune run
    OUT/config.yaml, config.json      resolved config of the run
    OUT/data_report.json              template, rows used, truncated, skipped, budget
    OUT/metrics.jsonl                 step metrics (train/loss, train/lr, ...; eval/* per round)
    OUT/rounds.jsonl                  one line per completed round (rebuilt from summaries)
    OUT/selected.jsonl                the pool's rows selected so far (``trainer/selected.py``)
    OUT/rounds/round_XXX/
        selection.jsonl               the round's new picks, in pick order
        features.npz                  what the selector read (embeddings, scores, gradient
                                      features) [rounds with a feature pass]
        influence_terms.npz           influence: per-subtask scores and the checkpoint's weight
        selector_state.json           the selector's settings
        checkpoint/                   DeepSpeed checkpoint; client_state = this round's state
        adapter/ (or model/)          HF/PEFT export of the round's weights
        summary.json                  counts, losses, tokens, seconds per phase
        state.json                    written LAST, atomically: the round is complete
    OUT/partial/round_XXX/            the gradient pass's finished batches while the round runs
                                      (removed once it is complete; reused when it is redone)
    OUT/final/adapter (or model/)     the last round's weights (final/merged on request)

A round is complete only when ``state.json`` exists; a round folder without it is the remains
of a crash and is redone from the previous complete round, never partly reused.

Atomic writes and fsync live in ``trainer/files.py``; seeds and the RNG states a round's state
carries, in ``trainer/seeding.py``. A resume compares the run's saved config with the current
one (``trainer/config.py``) and its inputs by content (``trainer/sources.py``).
"""

from __future__ import annotations

import json
import os
import signal
from dataclasses import asdict, dataclass, field
from pathlib import Path

from evotune.trainer.config import Config, flatten, result_keys, settings
from evotune.trainer.files import file_hash, fsync_tree, write_json_atomic
from evotune.trainer.sources import DataError, input_hash

STATE_FILE = "state.json"
STATE_VERSION = 1
# Written first into every output dir: evotune deletes only dirs that carry it (or an older
# run's config.json and rounds/), never a folder of the user's.
RUN_MARKER = ".evotune-run"


@dataclass
class RoundState:
    """The progress dataclass of a run after round ``round_idx``; also the DeepSpeed
    checkpoint's ``client_state``."""
    round_idx: int
    global_step: int
    selected_ids: list[str]          # every selected id so far, in selection order
    budget: list[int]                # examples added per round, round 0 first (whole run)
    seed: int
    config_hash: str                 # Config.results_hash() of the run
    pool_hash: str                   # sha256 of the pool file's bytes
    world_size: int
    zero_stage: int
    rng: dict = field(default_factory=dict)   # python/numpy/torch RNG states at round end
    stopped: str | None = None       # why the run stopped after this round (stop rule), if it did
    version: int = STATE_VERSION

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "RoundState":
        return cls(**d)


def round_dir(out: Path, round_idx: int) -> Path:
    return Path(out) / "rounds" / f"round_{round_idx:03d}"


def partial_dir(out: Path, round_idx: int) -> Path:
    """Where a round's gradient pass keeps its finished batches until the round is complete
    (outside ``rounds/``, which a resume clears for the rounds it redoes)."""
    return Path(out) / "partial" / f"round_{round_idx:03d}"


def read_state(out: Path, round_idx: int) -> RoundState | None:
    """The round's state, or None when the round is not complete."""
    path = round_dir(out, round_idx) / STATE_FILE
    if not path.is_file():
        return None
    try:
        return RoundState.from_json(json.loads(path.read_text()))
    except (json.JSONDecodeError, TypeError) as e:
        raise RuntimeError(f"{path} is unreadable ({e}); it was written atomically, so the file "
                           f"was changed by hand: restore it or delete the round folder") from None


def last_completed_round(out: Path) -> int:
    """Index of the last round of the unbroken run of complete rounds from 0; -1 if none."""
    r = -1
    while read_state(out, r + 1) is not None:
        r += 1
    return r


def incomplete_round_dirs(out: Path, after: int) -> list[Path]:
    """Round folders after round ``after`` (crash leftovers or rounds to discard)."""
    rounds = Path(out) / "rounds"
    if not rounds.is_dir():
        return []
    return sorted(p for p in rounds.iterdir()
                  if p.is_dir() and p.name.startswith("round_")
                  and p.name[6:].isdigit() and int(p.name[6:]) > after)


# ----------------------------------------------------------------------------- crash points

CRASH_ENV = "EVOTUNE_CRASH_AT"


def crash_point(name: str, round_idx: int, sync=None) -> None:
    """SIGKILL this process at a named point when ``$EVOTUNE_CRASH_AT`` is ``name:round``.

    For testing resume at exact places (``embed``, ``train``, ``checkpoint``, ``state``, and
    ``grad_train`` / ``grad_val``: after the gradient pass's first finished batch): a real
    kill, no cleanup, like a node failure. Does nothing unless the variable is set.
    ``sync`` (a barrier): every rank reaches the point before any dies, so what each rank
    wrote before it is on disk (else the launcher may stop a rank that had not got there yet).
    """
    if os.environ.get(CRASH_ENV) == f"{name}:{round_idx}":
        if sync is not None:
            sync()
        os.kill(os.getpid(), signal.SIGKILL)


# ----------------------------------------------------------------------------- resume

@dataclass
class ResumePlan:
    """Where a run starts and what rank 0 must clear first (nothing is touched until apply)."""
    out_dir: Path
    start_round: int
    state: RoundState | None
    discard: list[Path] = field(default_factory=list)
    wipe: bool = False
    warnings: list[str] = field(default_factory=list)

    def apply(self) -> None:
        """Clear what the plan says (rank 0 only), then make sure the dir exists and carries the
        run marker. Refuses (ValueError) to wipe a dir that is not an evotune run."""
        import shutil
        if self.wipe and self.out_dir.exists():
            if not is_run_dir(self.out_dir):
                raise ValueError(f"refusing to delete {self.out_dir}: not an evotune run")
            shutil.rmtree(self.out_dir)
        for d in self.discard:
            shutil.rmtree(d, ignore_errors=True)
        # Gradient batches of rounds that are complete (a kill between state.json and their
        # removal) or about to be redone from scratch are of no use: only the next round's stay.
        partial = self.out_dir / "partial"
        if partial.is_dir():
            for d in partial.iterdir():
                if d.name != f"round_{self.start_round:03d}":
                    shutil.rmtree(d, ignore_errors=True)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.out_dir / RUN_MARKER, {"evotune_run": True})


CHECKPOINT_MANIFEST = "complete.json"


def write_checkpoint_manifest(checkpoint: Path) -> None:
    """After a checkpoint and its exports are written by every rank: fsync them all, then list
    every file with its size (written atomically): what ``state.json`` will vouch for."""
    checkpoint = Path(checkpoint)
    fsync_tree(checkpoint)
    files = {str(p.relative_to(checkpoint)): p.stat().st_size
             for p in sorted(checkpoint.rglob("*")) if p.is_file()
             and p.name != CHECKPOINT_MANIFEST}
    write_json_atomic(checkpoint / CHECKPOINT_MANIFEST, {"files": files})


def checkpoint_status(rdir: Path) -> str:
    """``complete``, ``missing`` (no checkpoint: pruned by output.keep_checkpoints) or
    ``torn`` (a listed file is absent or has another size: a power loss before it reached the
    disk). A checkpoint from before manifests counts as complete when its folder exists."""
    checkpoint = Path(rdir) / "checkpoint"
    if not (checkpoint / "deepspeed").is_dir():
        return "missing"
    manifest = checkpoint / CHECKPOINT_MANIFEST
    if not manifest.is_file():
        return "complete"
    try:
        files = json.loads(manifest.read_text())["files"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return "torn"
    for name, size in files.items():
        f = checkpoint / name
        if not f.is_file() or f.stat().st_size != size:
            return "torn"
    return "complete"


def is_run_dir(out: Path) -> bool:
    """Whether ``out`` holds an evotune run (its marker, or an older run's config.json and
    rounds/ folder): the only kind of non-empty dir evotune ever deletes."""
    out = Path(out)
    return (out / RUN_MARKER).is_file() or ((out / "config.json").is_file()
                                            and (out / "rounds").is_dir())


def run_dir_of(path: Path) -> tuple[Path, int | None]:
    """A ``--resume PATH`` → (run dir, round index if PATH is a round folder)."""
    if path.parent.name == "rounds" and path.name.startswith("round_") and path.name[6:].isdigit():
        return path.parent.parent, int(path.name[6:])
    return path, None


def plan_resume(out: Path, mode: str, overwrite: bool, cfg, budget: list[int], pool_hash: str,
                world_size: int) -> ResumePlan:
    """Decide where the run starts.

    ``mode``: ``auto`` continues after the last complete round (or starts fresh when there is
    none); ``never`` starts fresh and refuses a non-empty dir unless ``overwrite``; a path (a run
    dir, or one of its ``rounds/round_XXX`` folders) resumes that run after its last complete
    round (or after the given round; later rounds are discarded only with ``overwrite``).
    Raises ValueError with the reason and the fix when the resume is refused.
    """
    out = Path(out)
    if mode not in ("auto", "never"):
        out, upto = run_dir_of(Path(mode))
        if not (out / "config.json").is_file():
            raise ValueError(f"--resume {mode}: not an evotune run (no config.json in {out})")
    else:
        upto = None
    if out.exists() and not out.is_dir():
        raise ValueError(f"output dir {out} is a file; choose another output.dir")
    non_empty = out.is_dir() and any(out.iterdir())
    if non_empty and not is_run_dir(out):
        raise ValueError(f"output dir {out} is not empty and is not an evotune run (no "
                         f"{RUN_MARKER}); evotune deletes only its own runs: choose another "
                         f"output.dir, or empty or remove that folder yourself")
    if mode == "never" or not non_empty:
        if non_empty and not overwrite:
            raise ValueError(f"output dir {out} holds an evotune run; use --resume auto to "
                             f"continue it, or --overwrite to delete it and start over")
        return ResumePlan(out, 0, None, wipe=non_empty)
    if not (out / "config.json").is_file():      # a run that died before writing its config
        return ResumePlan(out, 0, None, wipe=True,
                          warnings=[f"{out}: a run that stopped before its first round; "
                                    f"starting it over"])

    last = last_completed_round(out)
    if upto is not None:
        if read_state(out, upto) is None:
            raise ValueError(f"--resume {mode}: round {upto} is not complete (no {STATE_FILE})")
        if upto < last and not overwrite:
            raise ValueError(f"--resume {mode}: rounds {upto + 1}..{last} are complete too; pass "
                             f"--overwrite to discard them and redo from round {upto + 1}")
        last = upto
    torn = []
    while last >= 0 and checkpoint_status(round_dir(out, last)) == "torn":
        torn.append(last)                       # its state.json cannot be trusted: redo it
        last -= 1
    discard = incomplete_round_dirs(out, last)
    notes = [f"round {r} of {out} has an incomplete checkpoint (files missing or cut short, as "
             f"after a power loss); it is redone" for r in torn]
    if last < 0:
        return ResumePlan(out, 0, None, discard=discard,
                          warnings=notes + ([f"{out}: no complete round to resume; starting at "
                                             f"round 0"] if discard else []))
    state = read_state(out, last)
    if checkpoint_status(round_dir(out, last)) == "missing":
        raise ValueError(f"round {last} of {out} has no DeepSpeed checkpoint (removed by "
                         f"output.keep_checkpoints?)"
                         + (f", and round {torn[-1]}'s is incomplete" if torn else "")
                         + "; resume from a round that has one, or start over")
    warnings = notes + check_compatible(out, cfg, state, budget, pool_hash, world_size)
    start = last + 1
    if state.stopped and cfg.selection.stop_when.window > 0 and start < cfg.selection.rounds:
        warnings.append(f"the run stopped after round {last}: {state.stopped}; nothing to "
                        f"train (resume with selection.stop_when.window=0 to go on)")
        start = cfg.selection.rounds
    return ResumePlan(out, start, state, discard=discard, warnings=warnings)


# Selection settings that a random round 0 does not read (the budget keys and the round-0 rule
# itself excepted): the selector and its options, filters, embeddings, scoring, influence.
_NOT_RULE_KEYS = {"selection.init_size", "selection.per_round", "selection.rounds",
                  "selection.first_round", "selection.batch_size"}


def is_rule_key(key: str) -> bool:
    """Whether ``key`` only changes how rounds after a random round 0 select."""
    if key.startswith(("scoring.", "influence.")):
        return True
    return key.startswith("selection.") and key not in _NOT_RULE_KEYS \
        and not key.startswith("selection.stop_when.")


def _content(path: Path) -> str | list | None:
    """What a model dir (config and the weight files' names and sizes) or a data input (a file,
    a folder of shards, a pattern: :func:`~evotune.trainer.sources.input_hash`) holds; None
    when it is neither."""
    config = path / "config.json"
    if config.is_file():
        return [file_hash(config),
                sorted([p.name, p.stat().st_size] for p in path.iterdir() if p.is_file()
                       and p.suffix in (".safetensors", ".bin", ".gguf"))]
    try:
        return input_hash(path)
    except (OSError, DataError):
        return None


def same_input(a, b) -> bool:
    """Whether two input paths (as configs hold them) name the same input: the same resolved
    path, or the same content at two paths."""
    if not isinstance(a, str) or not isinstance(b, str) or not a or not b \
            or a.startswith("embedded:") or b.startswith("embedded:"):
        return False
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    if pa.resolve() == pb.resolve():
        return True
    ca = _content(pa)
    return ca is not None and ca == _content(pb)


def check_compatible(out: Path, cfg, state: RoundState, budget: list[int], pool_hash: str,
                     world_size: int) -> list[str]:
    """Refuse (ValueError naming the keys) a resume whose settings would change results;
    return warnings for the safe changes."""
    # A key the saved config lacks (added since the run started) had its default's behaviour;
    # a key this version lacks (renamed or removed since) cannot be compared: refused.
    defaults = Config().flat()
    saved = dict(flatten(json.loads((Path(out) / "config.json").read_text())))
    unknown = sorted(set(saved) - set(defaults))
    if unknown:
        raise ValueError(f"resume refused: the run in {out} was saved with settings this "
                         f"version of evotune does not have: {', '.join(unknown)} (renamed or "
                         f"removed since); start a new run in another output.dir (or --resume "
                         f"never --overwrite)")
    saved = {**defaults, **saved}
    current = cfg.flat()
    result = result_keys()
    changed = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
    # An input that moved (a copied project, a mounted volume) is the same input when its
    # content is: compared by resolved path, then by content, not by the string.
    inputs = {key for key, f, _, tp in settings(cfg) if tp is not None
              and f.metadata.get("path") == "input"}
    moved = [k for k in changed if k in inputs and same_input(saved.get(k), current.get(k))]
    changed = [k for k in changed if k not in moved]
    # The budget keys are compared through the counts of the completed rounds below, so that a
    # longer per_round schedule (more rounds) is accepted.
    budget_keys = {"selection.init_size", "selection.per_round"}
    # A random round 0 does not depend on how later rounds select: a run whose only complete
    # round is that warm-up may branch into another selector (LESS's workflow: one warm-up,
    # then selection), the new rule settings taking effect from round 1.
    branch = state.round_idx == 0 and saved.get("selection.first_round") == "random" \
        and current.get("selection.first_round") == "random"
    rule = [k for k in changed if branch and k in result and is_rule_key(k)]
    unsafe = [k for k in changed if k in result and k not in budget_keys and k not in rule]
    if unsafe:
        diffs = ", ".join(f"{k} ({saved.get(k)!r} -> {current.get(k)!r})" for k in unsafe)
        raise ValueError(f"resume refused: settings that change results differ from the run in "
                         f"{out}: {diffs}. Restore them, or start a new run in another "
                         f"output.dir (or --resume never --overwrite)")
    done = state.round_idx + 1
    if state.budget[:done] != budget[:done]:
        raise ValueError(f"resume refused: the completed rounds selected {state.budget[:done]} "
                         f"examples but selection.init_size/per_round now give {budget[:done]}")
    if state.pool_hash != pool_hash:
        raise ValueError(f"resume refused: the pool file {cfg.data.pool} changed since the run "
                         f"started (content hash differs)")
    warnings = []
    if state.world_size != world_size:
        if state.zero_stage > 0:
            raise ValueError(f"resume refused: the run used {state.world_size} rank(s) with "
                             f"ZeRO-{state.zero_stage}, whose optimizer state is sharded per "
                             f"rank; resume with {state.world_size} rank(s)")
        warnings.append(f"world size changed ({state.world_size} -> {world_size}); results can "
                        f"differ in floating-point summation order")
    if rule:
        warnings.append("round 0 was a random sample, which no selection setting changes; "
                        "rounds from 1 on select with the new settings: "
                        + ", ".join(f"{k} ({saved.get(k)!r} -> {current.get(k)!r})"
                                    for k in rule))
    if moved:
        warnings.append("inputs at another path with the same content: " + ", ".join(
            f"{k} ({saved.get(k)} -> {current.get(k)})" for k in moved))
    safe = [k for k in changed if k not in result or k in budget_keys]
    if safe:
        warnings.append("resuming with changed settings that do not affect completed rounds: "
                        + ", ".join(f"{k} ({saved.get(k)!r} -> {current.get(k)!r})"
                                    for k in safe))
    if cfg.selection.rounds <= state.round_idx + 1:
        warnings.append(f"all {cfg.selection.rounds} rounds are complete; nothing to train")
    return warnings
