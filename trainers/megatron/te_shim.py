"""The one patch megatron-core 0.16.1 needs wherever Transformer Engine is absent, CPU or GPU (the device image
has no TE): MoE's `router_gating_linear` tests `te_general_gemm is not None`, a name bound only when TE imports,
so without TE every MoE forward raises NameError (first seen on an H100). Binding it to None selects Megatron's
own plain-matmul branch."""

from __future__ import annotations


def apply() -> None:
    import megatron.core.transformer.moe.moe_utils as mu

    if not mu.HAVE_TE and not hasattr(mu, "te_general_gemm"):
        mu.te_general_gemm = None
