"""Search scores over a ``Results`` (one value per plan, averaged over prompts).

Run the plans with ``wrong_answers=`` (for ``Results.logit_diff``) and, for
``mean_kl``, with ``kl=True``:

    res = runner.run(plans, task.prompts, task.answers, wrong_answers=task.wrong_answers)
    fs.search.score(res)        # mean logit difference as a fraction of the plan 'all'
"""

from __future__ import annotations

import torch

from ..errors import InputError
from ..results import Results


def mean_logit_diff(res: Results) -> torch.Tensor:
    """Mean over prompts of the logit difference (answer - wrong answer, first
    tokens) of every plan: [P]. Needs a run with ``wrong_answers=``."""
    if res.logit_diff is None:
        raise InputError("these results have no logit difference; run with wrong_answers=")
    return res.logit_diff.float().mean(dim=1)


def full_index(res: Results) -> int:
    """Index of the plan 'all' (the full model) in ``res``."""
    try:
        return res.plans.index("all")
    except ValueError:
        raise InputError("these results have no plan 'all' to compare with; include it or "
                         "pass full=") from None


def score(res: Results, full: float | None = None) -> torch.Tensor:
    """Mean logit difference of every plan as a fraction of the full model's
    (1.0 = as good as the full model): [P]. ``full``: the full model's mean
    logit difference (default: that of the plan 'all' in ``res``)."""
    mld = mean_logit_diff(res)
    base = float(mld[full_index(res)]) if full is None else float(full)
    return mld / base


def percent(res: Results, full: float | None = None) -> torch.Tensor:
    """``score`` in percent of the full model: [P]."""
    return 100.0 * score(res, full)


def accuracy(res: Results) -> torch.Tensor:
    """Share of prompts whose answer's first token ranks first (rank 0): [P]."""
    return (res.rank[:, :, 0] == 0).float().mean(dim=1)


def mean_kl(res: Results) -> torch.Tensor:
    """Mean over prompts of KL(full model || plan) at the first answer position:
    [P]. Needs a run with ``kl=True``."""
    if res.kl is None:
        raise InputError("these results have no KL divergence; run with kl=True")
    return res.kl.float().mean(dim=1)


__all__ = ["accuracy", "full_index", "mean_kl", "mean_logit_diff", "percent", "score"]
