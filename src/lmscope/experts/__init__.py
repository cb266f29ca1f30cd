"""Which experts do what: routing statistics of mixture-of-experts models over corpora
(:mod:`lmscope.experts.routing`) and expert resection as Monet (:mod:`lmscope.experts.resection`)."""

from lmscope.experts.resection import Resection, domain_loss, resection
from lmscope.experts.routing import ExpertStats, expert_stats, moe_layers

__all__ = ["ExpertStats", "Resection", "domain_loss", "expert_stats", "moe_layers", "resection"]
