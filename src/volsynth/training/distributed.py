"""Data-parallel training on torch's own engine: ``torchrun`` + ``torch.distributed`` + DistributedDataParallel.

``torchrun --nproc_per_node=N --no-python volsynth train …`` starts N processes with ``RANK``/``WORLD_SIZE``/
``LOCAL_RANK`` set; each builds the same method (same seed → same initial weights), draws different items (the
rank is part of every iteration's seed) and wraps every trained network in ``DistributedDataParallel``, which
averages gradients across ranks during backward. The effective batch is ``N × data.sampling.per_step``; the
learning rate is not scaled silently (see the docs: scale ``train.lr`` yourself, linearly or by √N).

GAN patterns work unchanged: each network is wrapped on its own, a frozen discriminator (``requires_grad`` off
during the generator step) fires no gradient hooks, several forward calls before one backward are fine. Method
code keeps calling ``self.generator(x)``; attribute access falls through to the wrapped network. Rank 0 alone
logs, validates and writes; the others wait at a barrier. Every collective has a timeout
(``train.distributed_timeout``), so a rank that dies ends the job with an error instead of a hang.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from volsynth.errors import DistributedError


class _Parallel(DistributedDataParallel):
    """DDP that lets method code reach the wrapped network's attributes (``self.unet.time_embed`` …)."""

    def __getattr__(self, name: str) -> object:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.module, name)


@dataclass
class Wrapped:
    """The method with its trained networks wrapped; :meth:`unwrapped` restores them (checkpoints, validation)."""

    method: nn.Module
    wrapped: dict[str, nn.Module]
    originals: dict[str, nn.Module]

    @contextlib.contextmanager
    def unwrapped(self) -> Iterator[None]:
        """Plain networks while inside (state dict keys without ``.module``), wrapped again afterwards."""
        for name, module in self.originals.items():
            setattr(self.method, name, module)
        try:
            yield
        finally:
            for name, module in self.wrapped.items():
                setattr(self.method, name, module)


@dataclass(frozen=True)
class Distributed:
    """Where this process stands in a (possibly single-process) job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> Distributed:
        """From torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``); a single process otherwise."""
        try:
            rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
            local = int(os.environ.get("LOCAL_RANK", rank))
        except ValueError as error:
            raise DistributedError(f"RANK/WORLD_SIZE/LOCAL_RANK must be integers ({error})") from None
        if world < 1 or not 0 <= rank < world:
            raise DistributedError(f"RANK {rank} is not in [0, WORLD_SIZE={world})")
        return cls(rank, world, local)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def device(self, requested: torch.device) -> torch.device:
        """One device per local rank on CUDA (``cuda`` → ``cuda:LOCAL_RANK``); CPU ranks share the CPU."""
        if self.enabled and requested.type == "cuda" and requested.index is None:
            if self.local_rank >= torch.cuda.device_count():
                raise DistributedError(f"LOCAL_RANK {self.local_rank} has no CUDA device "
                                       f"({torch.cuda.device_count()} visible)")
            return torch.device("cuda", self.local_rank)
        return requested

    @contextlib.contextmanager
    def session(self, timeout: float) -> Iterator[None]:
        """The process group for the duration of training (NCCL on CUDA, gloo on CPU)."""
        if not self.enabled or torch.distributed.is_initialized():
            yield
            return
        backend = "nccl" if torch.cuda.is_available() and os.environ.get("VOLSYNTH_BACKEND") != "gloo" else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(self.local_rank)
        try:
            torch.distributed.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout))
        except (RuntimeError, ValueError) as error:
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise DistributedError(f"rank {self.rank}: could not join the process group within {timeout:g} s "
                                   f"({first})") from None
        try:
            yield
            # Leave together: a gloo rank that tears its connections down while another is still finishing can
            # abort ("terminate called without an active exception", once in a CI run of the 2-rank test).
            torch.distributed.barrier()
        finally:
            torch.distributed.destroy_process_group()

    def barrier(self) -> None:
        """Wait for every rank (rank 0 writing a checkpoint, validating); fails after the timeout."""
        if not self.enabled:
            return
        try:
            torch.distributed.barrier()
        except RuntimeError as error:
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise DistributedError(f"rank {self.rank}: another rank stopped answering ({first})") from None

    def wrap(self, method: nn.Module, optimizers: dict[str, torch.optim.Optimizer]) -> Wrapped:
        """Wrap every direct sub-network of ``method`` that an optimiser updates in DistributedDataParallel."""
        if not self.enabled:
            return Wrapped(method, {}, {})
        trained = {id(p) for opt in optimizers.values() for group in opt.param_groups for p in group["params"]}
        wrapped, originals = {}, {}
        for name, module in list(method.named_children()):
            if not any(id(p) in trained and p.requires_grad for p in module.parameters()):
                continue  # frozen parts (a stage's autoencoder) and losses with fixed weights stay plain
            device_ids = [module_device(module).index] if module_device(module).type == "cuda" else None
            # Parameters an optimiser holds but that a step leaves untouched (a frozen critic during the generator
            # step has requires_grad off and fires no hook; partially used networks would) are found per step.
            ddp = _Parallel(module, device_ids=device_ids, find_unused_parameters=True)
            originals[name], wrapped[name] = module, ddp
            setattr(method, name, ddp)
        return Wrapped(method, wrapped, originals)


    def sync_state(self, wrapped: Wrapped) -> None:
        """Give every rank rank 0's buffers outside the wrapped networks (e.g. HiFi-Syn's memory bank).

        DDP keeps parameters identical and broadcasts the wrapped networks' own buffers; state a method updates
        itself, outside any optimiser, would otherwise drift apart per rank. Like DDP's ``broadcast_buffers``,
        rank 0's copy wins, so a resumed run (which reads rank 0's checkpoint) continues exactly.
        """
        if not self.enabled:
            return
        inside = {id(b) for module in wrapped.wrapped.values() for b in module.buffers()}
        for buffer in wrapped.method.buffers():
            if id(buffer) not in inside:
                torch.distributed.broadcast(buffer.data, src=0)

    def check_in_sync(self, model: nn.Module) -> None:
        """Raise when the ranks' weights differ (a method that bypasses a wrapped network's ``forward`` would
        train unsynchronised replicas; this catches it at every checkpoint instead of silently)."""
        if not self.enabled:
            return
        with torch.no_grad():
            sums = torch.stack([p.detach().double().sum() for p in model.parameters()])
        if not all_equal_across_ranks(sums):
            raise DistributedError(f"rank {self.rank}: the ranks' weights diverged; a network is being called "
                                   "without going through its wrapper (call the network itself, not `.module`)")

    def explain(self, error: RuntimeError) -> DistributedError | None:
        """A one-line error for a failed collective (a rank died or stopped answering), else None."""
        text = str(error)
        markers = ("gloo", "nccl", "connection", "timed out", "timeout", "peer", "broken pipe", "socket")
        if not self.enabled or isinstance(error, DistributedError) or not any(m in text.lower() for m in markers):
            return None
        first = text.strip().splitlines()[0][:200] if text.strip() else type(error).__name__
        return DistributedError(f"rank {self.rank}: another rank stopped answering or died ({first})")


def module_device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def all_equal_across_ranks(tensor: torch.Tensor) -> bool:
    """Whether every rank holds the same values (a cheap divergence check for tests and diagnostics)."""
    if not torch.distributed.is_initialized():
        return True
    local = tensor.detach().double().flatten()
    highest, lowest = local.clone(), local.clone()
    torch.distributed.all_reduce(highest, op=torch.distributed.ReduceOp.MAX)
    torch.distributed.all_reduce(lowest, op=torch.distributed.ReduceOp.MIN)
    return bool(torch.equal(highest, lowest))
