"""Layout-aware ring attention: each rank exchanges only the key/value tokens its queries read (`ring_attention`),
planned from the global layout (`ring_plan`, `rank_plan`)."""
from .attention import TrafficCounter, merge_partial, ring_attention
from .plan import KeyRuns, RankPlan, RingPlan, RingTraffic, SequenceShards, rank_plan, ring_plan, sub_layout

__all__ = ["KeyRuns", "RankPlan", "RingPlan", "RingTraffic", "SequenceShards", "TrafficCounter", "merge_partial",
           "rank_plan", "ring_attention", "ring_plan", "sub_layout"]
