"""The one KL helper against torch's own, in both input forms."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lmscope.core.stats import kl_divergence


def test_kl_divergence_is_kl_of_p_to_q_over_the_last_axis():
    g = torch.Generator().manual_seed(0)
    p_logits, q_logits = torch.randn(2, 3, 50, generator=g), torch.randn(2, 3, 50, generator=g)
    log_p, log_q = p_logits.log_softmax(-1), q_logits.log_softmax(-1)
    expected = F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(-1)  # KL(P || Q)
    assert kl_divergence(log_p, log_q).shape == (2, 3)
    torch.testing.assert_close(kl_divergence(log_p, log_q), expected)
    torch.testing.assert_close(kl_divergence(p_logits, q_logits, logits=True), expected)
    assert torch.equal(kl_divergence(log_p, log_p), torch.zeros(2, 3))
