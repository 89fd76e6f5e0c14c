"""Patches megatron-core 0.16.1 needs wherever Transformer Engine is absent, CPU or GPU (the device image has no
TE). Each answers one place that takes TE's presence for granted."""

from __future__ import annotations


def patch_router_gemm() -> None:
    """MoE's `router_gating_linear` tests `te_general_gemm is not None`, a name bound only when TE imports, so
    without TE every MoE forward raises NameError (first seen on an H100). Binding it to None selects Megatron's
    own plain-matmul branch."""
    import megatron.core.transformer.moe.moe_utils as mu

    if not mu.HAVE_TE and not hasattr(mu, "te_general_gemm"):
        mu.te_general_gemm = None


def patch_mla_have_te() -> None:
    """`multi_latent_attention` decides it has TE when `megatron.core.extensions.transformer_engine` imports,
    which it does without TE (it substitutes a MagicMock for the package); MLA then asks
    `isinstance(linear_proj, TELinear)` of a mock and every MLA layer fails to build (`isinstance() arg 2 must
    be a type`). Its flag follows the extension's own, which knows."""
    import megatron.core.extensions.transformer_engine as te_ext
    import megatron.core.transformer.multi_latent_attention as mla

    if not te_ext.HAVE_TE:
        mla.HAVE_TE = False


def apply() -> None:
    patch_router_gemm()
    patch_mla_have_te()
