"""A worker extension for tests only: vime's, plus a way to damage one engine worker's weights after a push (what
a push that half-landed, or a bug in a loader, would leave), so the check must find it on that worker."""

from __future__ import annotations

import torch

from engines.vllm.worker_ext import VimeWorkerExtension


class DamagingWorkerExtension(VimeWorkerExtension):
    def vime_test_damage(self, param: str, dp: int, rank: int) -> bool:
        """Scale `param` by 1.01 on the worker of data-parallel engine `dp` at TP/PP rank `rank` only."""
        pc = self.vllm_config.parallel_config
        if (pc.data_parallel_index, pc.rank) != (dp, rank):
            return False
        with torch.no_grad():
            dict(self.model_runner.get_model().named_parameters())[param].mul_(1.01)
        return True
