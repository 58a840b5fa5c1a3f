"""moelm against numbers measured with NeMo AutoModel's own code (nemo_automodel 0.7.0, its wheel, in a separate
environment: it is not a test dependency): load_balance_metrics.compute_brief_metrics / compute_detailed_metrics on
the loads below, the gates named model.layers.1 ... model.layers.4 (NeMo names a layer by its position among the
MoE gates: layer_0 ... layer_3, which balance_metrics' default names are)."""
from __future__ import annotations

import pytest
import torch

from moelm.train.balance import balance_metrics

# 4 MoE layers x 8 experts: ties, dead experts, a layer routed no token
LOADS = [[9, 14, 3, 3, 3, 2, 10, 19], [21, 1, 18, 2, 0, 0, 13, 8], [0] * 8, [12, 0, 8, 10, 19, 4, 0, 10]]

BRIEF = {  # compute_brief_metrics(loads, top_k=3)
    "moe/cv_mean": 0.6722864657640457, "moe/cv_median": 0.8042904436588287, "moe/cv_min": 0.0,
    "moe/cv_max": 1.0805649757385254,
    "moe_expert_utilization/layer_1_expert_4": 0.0, "moe_expert_utilization/layer_1_expert_5": 0.0,
    "moe_expert_utilization/layer_2_expert_0": 0.0, "moe_expert_utilization/layer_0_expert_7": 2.41269850730896,
    "moe_expert_utilization/layer_3_expert_4": 2.41269850730896,
    "moe_expert_utilization/layer_1_expert_0": 2.6666667461395264,
    "moe/expert_utilization_p25": 0.0, "moe/expert_utilization_median": 0.380952388048172,
    "moe/expert_utilization_p75": 1.2698413133621216, "moe/expert_utilization_min": 0.0,
    "moe/expert_utilization_max": 2.6666667461395264, "moe/dead_expert_frac_mean": 0.375,
    "moe/expert_diversity_mean": 0.5001288550146157, "moe/expert_diversity_min": 0.0,
}

DETAILED = {  # compute_detailed_metrics(loads, top_k=2)
    **{k: v for k, v in BRIEF.items() if not k.startswith("moe_expert_utilization/")},
    "moe_expert_utilization/layer_1_expert_4": 0.0, "moe_expert_utilization/layer_1_expert_5": 0.0,
    "moe_expert_utilization/layer_3_expert_4": 2.41269850730896,
    "moe_expert_utilization/layer_1_expert_0": 2.6666667461395264,
    "moe/layer_0/cv": 0.7928340435028076, "moe/layer_1/cv": 1.0805649757385254, "moe/layer_2/cv": 0.0,
    "moe/layer_3/cv": 0.8157468438148499,
    "moe/layer_0/utilization_mean": 1.0, "moe/layer_1/utilization_mean": 1.0, "moe/layer_2/utilization_mean": 0.0,
    "moe/layer_3/utilization_mean": 1.0,
    "moe/layer_0/dead_expert_frac": 0.0, "moe/layer_0/expert_diversity": 0.7640687087880809,
    "moe/layer_1/dead_expert_frac": 0.25, "moe/layer_1/expert_diversity": 0.5530515268740501,
    "moe/layer_2/dead_expert_frac": 1.0, "moe/layer_2/expert_diversity": 0.0,
    "moe/layer_3/dead_expert_frac": 0.25, "moe/layer_3/expert_diversity": 0.683395184396332,
}


@pytest.mark.parametrize("detailed, top_k, expected", [(False, 3, BRIEF), (True, 2, DETAILED)])
def test_balance_metrics_are_nemos(detailed, top_k, expected):
    """Same names, same numbers (NeMo computes in fp32, moelm in fp64), the same experts picked among ties."""
    ours = balance_metrics([torch.tensor(load, dtype=torch.float32) for load in LOADS], detailed=detailed,
                           top_k=top_k)
    assert sorted(ours) == sorted(expected)
    assert ours == pytest.approx(expected, rel=1e-6, abs=1e-7)
