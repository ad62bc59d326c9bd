import math

import numpy as np
import torch

from vpmoe.train import health


def test_layer_health_against_hand_computation():
    counts = torch.tensor([[10, 30, 0, 60], [25, 25, 25, 25]])
    bias = torch.tensor([[0.1, -0.2, 0.3, 0.0], [0.0, 0.0, 0.0, 0.0]])
    h = health.layer_health(counts, bias)
    c = counts[0].double().numpy()
    p = c / c.sum()
    assert math.isclose(h["cv_pct"][0].item(), 100 * c.std() / c.mean(), rel_tol=1e-12)
    assert math.isclose(h["max_load_pct"][0].item(), 60.0, rel_tol=1e-12)
    assert math.isclose(h["entropy"][0].item(), -sum(x * np.log(x) for x in p if x > 0), rel_tol=1e-12)
    assert h["experts_active"].tolist() == [3, 4] and h["dead_experts"].tolist() == [1, 0]
    assert math.isclose(h["bias_range"][0].item(), 0.5, rel_tol=1e-6)
    assert h["cv_pct"][1].item() == 0 and math.isclose(h["entropy"][1].item(), math.log(4))
    agg = health.aggregate(h)
    assert agg["dead_experts_count"] == 1 and math.isclose(agg["experts_active_mean"], 3.5)


def test_collapse_detector_flags_only_collapsed_layers():
    e, k = 32, 4
    collapsed = torch.zeros(e, dtype=torch.int64)
    collapsed[:k] = 1000  # every token on the same 4 experts: CV = 100 sqrt((E - K) / K)
    balanced = torch.full((e,), 125, dtype=torch.int64)
    skewed = torch.arange(1, e + 1) * 10  # unbalanced but alive
    h = health.layer_health(torch.stack([balanced, collapsed, skewed]), torch.zeros(3, e))
    assert math.isclose(h["cv_pct"][1].item(), 100 * math.sqrt((e - k) / k), rel_tol=1e-9)
    assert health.collapsed_layers(h, e, k) == [1]
