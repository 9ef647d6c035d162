"""k-center's distances on a torch device (a GPU run): the device form of
:class:`evotune.selectors.kcenter.NearestCentre`, given to the selectors by the run's comm
(:meth:`evotune.trainer.engine.TorchComm.device_centres`) so that ``selectors/`` stays free of
torch."""

from __future__ import annotations

import numpy as np
import torch


class DeviceNearestCentre:
    """:class:`NearestCentre` on a torch device: the candidates' rows, their norms and the
    distances live in the accelerator's memory and every update runs there (a GPU run's
    k-center; on the host a pick reads every candidate row from RAM, which at 10M × 4096 over
    64 ranks takes hours where the device takes minutes: docs/large-pools.md).

    Every distance is computed in float64 from the float32 rows, a block of ``chunk_size``
    candidates at a time, and rounded to float32, for the initial and the new centres alike:
    a reduction's order may change with a tensor's shape on a device, and in float64 that
    moves a distance only where it lies within float64 rounding of a float32 rounding
    boundary, so the picks do not change with the number of ranks. They are the host form's
    picks except where two distances agree to within float32 rounding (the host measures a
    new centre in float32).
    """

    def __init__(self, cand: np.ndarray, lab: np.ndarray, chunk_size: int, device):
        self._torch, self.chunk_size = torch, chunk_size
        self.cand = torch.from_numpy(np.ascontiguousarray(cand, dtype=np.float32)).to(device)
        self.norms = torch.cat([(c * c).sum(dim=1) for c in self._blocks()]) if len(cand) \
            else torch.zeros(0, dtype=torch.float64, device=device)
        self.sq = torch.full((len(cand),), float("inf"), dtype=torch.float32, device=device)
        for t in range(0, len(lab), chunk_size):
            self.add_centres(lab[t: t + chunk_size])

    def _blocks(self):
        """The candidates' rows in float64, ``chunk_size`` at a time."""
        for s in range(0, len(self.cand), self.chunk_size):
            yield self.cand[s: s + self.chunk_size].double()

    def _update(self, centres, norms) -> None:
        """Lower each candidate's distance to its nearest of ``centres`` (float64, (k, D))."""
        for s, c in zip(range(0, len(self.cand), self.chunk_size), self._blocks()):
            d = self.norms[s: s + len(c), None] + norms[None, :] - 2.0 * (c @ centres.T)
            block = self.sq[s: s + len(c)]
            self._torch.minimum(block, d.clamp_min(0.0).min(dim=1).values.float(), out=block)

    def add_centres(self, lab: np.ndarray) -> None:
        if not len(lab) or not len(self.cand):
            return
        centres = self._torch.from_numpy(np.ascontiguousarray(lab, dtype=np.float32)).to(
            self.cand.device).double()
        self._update(centres, (centres * centres).sum(dim=1))

    def add_centre(self, row: np.ndarray, norm) -> None:
        if not len(self.cand):
            return
        centre = self._torch.from_numpy(np.ascontiguousarray(row, dtype=np.float32)).to(
            self.cand.device).double()[None, :]
        self._update(centre, self._torch.tensor([float(norm)], dtype=self._torch.float64,
                                                device=self.cand.device))

    def best(self) -> tuple[int, np.float32]:
        if not len(self.sq):
            return -1, np.float32(-np.inf)
        j = int(self._torch.argmax(self.sq))           # the first maximum: the lowest index
        return j, np.float32(self.sq[j].item())

    def drop(self, j: int) -> None:
        self.sq[j] = float("-inf")

    def distances(self) -> np.ndarray:
        return self.sq.cpu().numpy()

    def centre_row(self, j: int) -> np.ndarray:
        return np.append(self.cand[j].cpu().numpy(),
                         np.float32(self.norms[j].item())).astype(np.float32)
