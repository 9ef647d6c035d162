"""Per-example scores from one conditioned forward pass over the response tokens.

Every score follows one convention: HIGHER = PREFERRED by a selector that ranks by it. So the
uncertainty baselines are signed to make "less certain" larger:

- ``loss``: mean next-token NLL of the response given the prompt (nats/token).
- ``perplexity``: ``exp(loss)``.
- ``length``: number of response tokens (the longest-response baseline).
- ``least_confidence``: minus the mean top logit over response positions (DiverseEvol's
  least-confidence baseline: it prefers the lowest mean top logit).
- ``margin``: minus the mean (top-1 − top-2) logit gap (DiverseEvol: lowest margin first).
- ``entropy``: mean softmax entropy over response positions (nats; highest first).

DiverseEvol computes its uncertainty baselines from raw logits, as here. Scores are means over
the response tokens that survive truncation; an example without one gets NaN (the data layer
already refuses such examples, so this is a guard).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from evotune.trainer.data import IGNORE_INDEX

SCORES = ("loss", "perplexity", "length", "least_confidence", "margin", "entropy")


@torch.no_grad()
def response_scores(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Scores of each row of a batch.

    Args:
        logits: (B, K, V) logits of the last K positions (see ``trainer.fit.logits_window``).
        labels: (B, T) token labels, IGNORE_INDEX outside the response.

    Returns:
        name → (B,) float64 tensor on the CPU, NaN for a row without response tokens.
    """
    k, t = logits.size(1), labels.size(1)
    targets = labels[:, t - k + 1:]
    out = {name: torch.full((logits.size(0),), float("nan"), dtype=torch.float64)
           for name in SCORES}
    # One row at a time: a (K, V) fp32 softmax per row instead of (B, K, V) at once.
    for i in range(logits.size(0)):
        mask = targets[i] != IGNORE_INDEX
        n = int(mask.sum())
        if n == 0:
            continue
        row = logits[i, :-1][mask].float()                     # (n, V)
        logp = F.log_softmax(row, dim=-1)
        nll = -logp.gather(1, targets[i][mask].unsqueeze(1)).squeeze(1)
        top2 = row.topk(2, dim=-1).values
        loss = float(nll.mean())
        out["loss"][i] = loss
        out["perplexity"][i] = float(torch.exp(nll.mean().double()))
        out["length"][i] = n
        out["least_confidence"][i] = -float(top2[:, 0].mean())
        out["margin"][i] = -float((top2[:, 0] - top2[:, 1]).mean())
        out["entropy"][i] = float(-(logp.exp() * logp).sum(-1).mean())
    return out
