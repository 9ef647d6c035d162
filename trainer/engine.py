"""The one module that touches DeepSpeed and torch.distributed.

:class:`Strategy` owns process-group setup, the device and dtype, the DeepSpeed config (built
here from typed settings: no ``"auto"`` strings reach ``deepspeed.initialize``), engine
creation, backward/step, checkpoints with ``client_state``, adapter export under ZeRO-3, and
the few collectives the loop needs. Everything else in evotune is written against it.
"""

from __future__ import annotations

import datetime
import functools
import gc
import os
import pickle
import platform
import socket
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from evotune.trainer.config import Config


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# x86 names of ``architecture`` in torch's CPU capabilities (cpuinfo) and platform.machine()
_X86 = frozenset({"x86_64", "amd64", "x86", "i386", "i686"})


def cpu_capabilities() -> dict:
    """This CPU's ``architecture`` and instruction-set flags, as ``torch.cpu.get_capabilities``
    gives them (cpuinfo: the same on every OS). A torch without that query: the architecture
    from ``platform`` and the bf16 flags of Linux's ``/proc/cpuinfo`` (none elsewhere)."""
    query = getattr(torch.cpu, "get_capabilities", None)
    if query is not None:
        return dict(query())
    caps: dict = {"architecture": platform.machine().lower()}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return caps
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines()
                  if line.startswith("flags")), [])
    caps.update({name: True for name in ("amx_bf16", "avx512_bf16") if name in flags})
    return caps


def cpu_precision(capabilities: dict) -> tuple[str, str]:
    """What ``model.precision: auto`` trains in on a CPU with ``capabilities`` (the mapping
    :func:`cpu_capabilities` returns), and why: ``("bf16" | "fp32", reason)``.

    bf16 where the CPU multiplies bf16 in hardware (AMX-BF16 tiles, or AVX512-BF16 dot
    products): there oneDNN's bf16 matmuls run at 2-4x the fp32 rate (measured on an AVX512-BF16
    CPU: SmolLM2's LM head 3.5x, a LoRA training step 2x). Without those instructions every bf16
    product is widened to fp32 first and bf16 is no faster than fp32, only less exact, so fp32.
    Other architectures than x86 get fp32 too (their bf16 paths are not measured here).
    """
    arch = str(capabilities.get("architecture", "unknown")).lower()
    if arch not in _X86:
        return "fp32", f"fp32 on a {arch} CPU (native bf16 is only used on x86)"
    native = [name for flag, name in (("amx_bf16", "AMX-BF16"), ("avx512_bf16", "AVX512-BF16"))
              if capabilities.get(flag)]
    if native:
        return "bf16", f"this CPU computes bf16 natively ({', '.join(native)})"
    return "fp32", "this CPU has no native bf16 (no AMX-BF16 or AVX512-BF16)"


class TorchComm:
    """The collectives of a sharded selection rule (``selectors/kcenter.py``
    :func:`~evotune.selectors.kcenter.kcenter_sharded`, ``selectors/sharded.py``) over the
    default process group."""

    def __init__(self, device: torch.device | None = None):
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.device = torch.device("cpu") if dist.get_backend() == "gloo" or device is None \
            else device

    def device_centres(self):
        """k-center's distances on the ranks' accelerator (``trainer/device_centres.py``), as a
        ``(cand, centres, chunk_size)`` factory; None on a CPU run (gloo: numpy on the host)."""
        if self.device.type == "cpu":
            return None
        from evotune.trainer.device_centres import DeviceNearestCentre
        return functools.partial(DeviceNearestCentre, device=self.device)

    def max_int64(self, value: int) -> int:
        t = torch.tensor([value], dtype=torch.int64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())

    def sum_int64(self, value: int) -> int:
        t = torch.tensor([value], dtype=torch.int64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return int(t.item())

    def sum_float64(self, array: np.ndarray) -> np.ndarray:
        t = torch.from_numpy(np.array(array, dtype=np.float64)).to(self.device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.cpu().numpy()

    def broadcast_row(self, row: np.ndarray | None, src: int, size: int) -> np.ndarray:
        t = torch.from_numpy(np.ascontiguousarray(row, dtype=np.float32)).to(self.device) \
            if self.rank == src else torch.empty(size, dtype=torch.float32, device=self.device)
        dist.broadcast(t, src=src)
        return t.cpu().numpy()

    def broadcast_block(self, block: np.ndarray | None, src: int, shape) -> np.ndarray:
        t = torch.from_numpy(np.ascontiguousarray(block, dtype=np.float32)).to(self.device) \
            if self.rank == src else torch.empty(tuple(shape), dtype=torch.float32,
                                                 device=self.device)
        dist.broadcast(t, src=src)
        return t.cpu().numpy()

    def all_gather_rows(self, array: np.ndarray) -> list[np.ndarray]:
        out = [None] * self.world_size
        dist.all_gather_object(out, array)
        return out

    def gather_rows(self, obj):
        """Every rank's ``obj`` on rank 0 (a list by rank); None on the other ranks."""
        out = [None] * self.world_size if self.rank == 0 else None
        dist.gather_object(obj, out, dst=0)
        return out


class Strategy:
    """Distributed setup and every DeepSpeed call of a run."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.rank = 0
        self.local_rank = 0
        self.world_size = 1
        self.device = torch.device("cpu")
        self.dtype = torch.float32
        self.accelerator = None
        self.precision_reason = ""       # why ``dtype`` (``setup`` says; the run's log shows it)

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        """Join (or create) the process group and pick device and dtype.

        Works under the ``deepspeed`` launcher (which sets RANK, LOCAL_RANK, WORLD_SIZE and
        MASTER_*) and as a plain ``python launch/train.py`` (a one-process group on a free
        local port, so DeepSpeed does not fall back to MPI discovery).
        """
        if "RANK" not in os.environ:
            os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1",
                               "LOCAL_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                               "MASTER_PORT": str(_free_port())})
        import deepspeed
        from deepspeed.accelerator import get_accelerator

        self.accelerator = get_accelerator()
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        on_cpu = self.accelerator.device_name() == "cpu"
        backend = self.cfg.deepspeed.backend
        if backend == "auto":
            backend = "gloo" if on_cpu else self.accelerator.communication_backend_name()
        if not on_cpu:
            self.accelerator.set_device(self.local_rank)
        elif int(os.environ["WORLD_SIZE"]) == 1:
            # DeepSpeed's CPU backend JIT-compiles a shared-memory allreduce op while joining
            # the group (~40 s on a 2-core CPU the first time, again whenever torch's extension
            # cache misses); one rank has nothing to reduce with it. DeepSpeed reads which ops
            # it may build from this table, which it keeps for the process so edits persist.
            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        deepspeed.init_distributed(dist_backend=backend, timeout=datetime.timedelta(
            minutes=self.cfg.deepspeed.timeout_minutes))
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        if on_cpu:
            self._unlink_shm_buffer()
        self.device = torch.device("cpu") if on_cpu else torch.device(
            self.accelerator.device_name(self.local_rank))
        precision = self.cfg.model.precision
        if precision != "auto":
            self.precision_reason = "set in model.precision"
        elif not on_cpu:
            precision = "bf16" if self.accelerator.is_bf16_supported() else "fp32"
            has = "supports" if precision == "bf16" else "has no"
            self.precision_reason = f"auto: the accelerator {has} bf16"
        else:
            precision, why = cpu_precision(cpu_capabilities())
            if self.world_size > 1:      # every rank must hold the same dtype
                agree = torch.tensor([int(precision == "bf16")])
                dist.all_reduce(agree, op=dist.ReduceOp.MIN)
                if precision == "bf16" and not agree.item():
                    precision, why = "fp32", "another rank's CPU has no native bf16"
            self.precision_reason = f"auto: {why}"
        self.dtype = torch.bfloat16 if precision == "bf16" else torch.float32

    def _unlink_shm_buffer(self) -> None:
        """Remove this rank's name of DeepSpeed's CPU shared-memory allreduce buffer.

        DeepSpeed 0.19's CPU comm op creates ``/dev/shm/deepspeed_allreduce_buffer_<uid>_<addr>_
        <port>_<rank>`` (~69 MB) while joining the group and never unlinks it, so every CPU run
        would leave that much RAM in /dev/shm until reboot. Once every rank has returned from
        ``init_distributed`` (the barrier), each has mapped all the others' buffers and the names
        are no longer needed: the memory stays mapped and is freed when the last rank exits, also
        when it is killed.
        """
        dist.barrier()
        name = (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
                f"{os.environ.get('MASTER_PORT', '')}_{self.rank}")
        try:
            os.unlink(Path("/dev/shm") / name)
        except FileNotFoundError:    # not created (ranks on several hosts, no shm op, no Linux)
            pass

    @property
    def is_rank0(self) -> bool:
        return self.rank == 0

    def grad_accum_steps(self) -> int:
        t = self.cfg.train
        per_step = t.micro_batch_size * self.world_size
        if t.batch_size % per_step:
            raise ValueError(
                f"train.batch_size={t.batch_size} must be a multiple of train.micro_batch_size "
                f"({t.micro_batch_size}) x ranks ({self.world_size}) = {per_step}")
        return t.batch_size // per_step

    def ds_config(self) -> dict:
        """The DeepSpeed config dict, fully resolved from the typed settings."""
        t, z = self.cfg.train, self.cfg.deepspeed.zero_stage
        config = {
            "train_micro_batch_size_per_gpu": t.micro_batch_size,
            "gradient_accumulation_steps": self.grad_accum_steps(),
            "train_batch_size": t.batch_size,
            "gradient_clipping": t.max_grad_norm,
            "zero_optimization": {"stage": z},
            "bf16": {"enabled": self.dtype == torch.bfloat16},
            "fp16": {"enabled": False},
            "steps_per_print": 10**9,   # the loop logs its own metrics
            "wall_clock_breakdown": False,
        }
        if z == 3:
            config["zero_optimization"]["stage3_param_persistence_threshold"] = \
                self.cfg.deepspeed.stage3_param_persistence_threshold
        return config

    # ------------------------------------------------------------------ engine
    def prepare(self, model: torch.nn.Module):
        """Wrap ``model`` in a DeepSpeed engine with AdamW over its trainable parameters.

        A torch optimizer is passed in (not DeepSpeed's own), so no extra C++ op is compiled.
        The learning rate is set by the loop before each step (see ``set_lr``).
        """
        import deepspeed
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("the model has no trainable parameters")
        t = self.cfg.train
        optimizer = torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay,
                                      betas=(0.9, 0.999), eps=1e-8)
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer,
                                          config=self.ds_config())
        return engine

    @staticmethod
    def set_lr(engine, lr: float) -> None:
        for group in engine.optimizer.param_groups:
            group["lr"] = lr

    def grad_norm_before_step(self, engine) -> float | None:
        """Global gradient norm before clipping, at ZeRO-0 (where DeepSpeed does not report
        one). Call after the accumulation boundary's backward (gradients already averaged over
        ranks) and before ``step``; None at ZeRO ≥ 1 or when the gradients live in DeepSpeed's
        own buffers (bf16)."""
        if self.cfg.deepspeed.zero_stage > 0:
            return None
        grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
        if not grads:
            return None
        return float(torch.linalg.vector_norm(
            torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])))

    @staticmethod
    def release(engine) -> None:
        """Free an engine before building the next one (retrain-from-base rounds)."""
        if engine is None:
            return
        if getattr(engine, "zero_optimization_partition_weights", lambda: False)():
            # ZeRO-3: partition every parameter again (also those a pass left gathered, e.g.
            # persistent ones) so the kept module's adapter can be re-drawn for the next engine
            engine.empty_partition_cache()
        if hasattr(engine, "destroy"):
            engine.destroy()
        del engine
        gc.collect()

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, engine, directory: Path, client_state: dict) -> None:
        """DeepSpeed checkpoint (module, optimizer, step counters) plus ``client_state``.

        Collective: every rank calls it. Frozen base weights are left out for LoRA runs.
        """
        engine.save_checkpoint(str(directory), tag="deepspeed", client_state=client_state,
                               exclude_frozen_parameters=self.cfg.lora.enabled)

    def load_checkpoint(self, engine, directory: Path, optimizer: bool = True) -> dict:
        """Load a checkpoint written by :meth:`save_checkpoint`; returns its client_state."""
        path, client_state = engine.load_checkpoint(
            str(directory), tag="deepspeed", load_module_strict=not self.cfg.lora.enabled,
            load_optimizer_states=optimizer, load_lr_scheduler_states=False)
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint under {directory}")
        return client_state

    def trainable_state_dict(self, engine) -> dict[str, torch.Tensor] | None:
        """Full (gathered) trainable weights on rank 0, None on other ranks.

        Collective under ZeRO-3, where each rank holds a shard: without the gather the saved
        adapter would be empty tensors (parameters are partitioned across ranks).
        """
        import deepspeed
        named = [(n, p) for n, p in engine.module.named_parameters() if p.requires_grad]
        if self.cfg.deepspeed.zero_stage == 3:
            with deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=None):
                state = {n: p.detach().to("cpu", torch.float32).clone() for n, p in named}
        else:
            state = {n: p.detach().to("cpu", torch.float32).clone() for n, p in named}
        return state if self.is_rank0 else None

    def full_state_dict(self, engine) -> dict[str, torch.Tensor] | None:
        """All weights on rank 0 (CPU copies), None elsewhere. Collective under ZeRO-3, where
        the parameters are gathered one at a time (in the same order on every rank), so no
        rank holds the whole model on its device and only rank 0 keeps copies."""
        import deepspeed
        state = {}
        for key, value in engine.module.state_dict(keep_vars=True).items():
            if hasattr(value, "ds_id"):                 # a ZeRO-3 partitioned parameter
                with deepspeed.zero.GatheredParameters([value], modifier_rank=None):
                    if self.is_rank0:
                        state[key] = value.detach().to("cpu").clone()
            elif self.is_rank0:
                state[key] = value.detach().to("cpu").clone()
        return state if self.is_rank0 else None

    # ------------------------------------------------------------------ collectives
    @staticmethod
    def full_shape(param) -> tuple[int, ...]:
        """A parameter's real shape, also when ZeRO-3 has partitioned it away."""
        return tuple(getattr(param, "ds_shape", param.shape))

    def optimizer_moments(self, engine, params) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Adam's ``exp_avg`` and ``exp_avg_sq`` of each parameter, whole, fp32, on the device.

        ZeRO 1-3 (and the bf16 optimizer) keep them flattened and sharded:
        ``safe_get_full_optimizer_state`` assembles them, a collective call that every rank
        makes. At ZeRO-0 in fp32 they are the torch optimizer's own state. Zeros for a parameter
        the optimizer has not stepped yet.
        """
        from deepspeed.utils import safe_get_full_optimizer_state

        opt = engine.optimizer
        torch_opt = getattr(opt, "optimizer", opt) if opt is not None else None
        out: tuple[list, list] = ([], [])
        for p in params:
            shape = self.full_shape(p)
            for key, dest in (("exp_avg", out[0]), ("exp_avg_sq", out[1])):
                value = safe_get_full_optimizer_state(p, key)
                if value is None and torch_opt is not None:
                    value = torch_opt.state.get(p, {}).get(key)
                if value is None:
                    value = torch.zeros(shape)
                dest.append(value.detach().float().reshape(shape).to(self.device))
        return out

    def barrier(self) -> None:
        dist.barrier()

    def close(self) -> None:
        """Wait for every rank, then leave the process group. Without this, gloo's threads can
        outlive interpreter shutdown ("terminate called without an active exception") and a
        finished run exits with a non-zero code that a scheduler reads as a failure."""
        if dist.is_available() and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        """Sum a few numbers over ranks (in float64)."""
        t = torch.tensor(values, dtype=torch.float64, device=self._comm_device())
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.tolist()

    def gather_to_rank0(self, obj):
        """Every rank's ``obj`` as a list on rank 0 (None on the others)."""
        if self.world_size == 1:
            return [obj]
        out = [None] * self.world_size if self.is_rank0 else None
        # Pickle to bytes first: large numpy arrays travel as one buffer.
        dist.gather_object(pickle.dumps(obj), out, dst=0)
        return [pickle.loads(b) for b in out] if self.is_rank0 else None

    def broadcast_from_rank0(self, obj):
        """Rank 0's ``obj`` on every rank."""
        if self.world_size == 1:
            return obj
        box = [obj if self.is_rank0 else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    @property
    def comm(self) -> TorchComm:
        """The collectives a sharded selection rule uses (``select_sharded``)."""
        if getattr(self, "_comm", None) is None:
            self._comm = TorchComm(self.device)
        return self._comm

    def _comm_device(self) -> torch.device:
        return torch.device("cpu") if dist.get_backend() == "gloo" else self.device
