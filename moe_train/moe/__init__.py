"""Mixture-of-Experts: routers, dispatch, experts and the layer that joins them."""
from moe_train.moe.layer import MoELayer, MoEOutput

__all__ = ["MoELayer", "MoEOutput"]
