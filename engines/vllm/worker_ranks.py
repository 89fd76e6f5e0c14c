"""Where each engine worker sits in the weight channel's broadcast group (gloo, NCCL): the sender is rank 0, and
each server gets as many ranks as it runs workers (TP x PP per data-parallel engine, times its engines), as its
workers report them (`VimeWorkerExtension.vime_workers`). A worker takes `data_parallel_index * world_size + rank`
after its server's offset (vLLM's own rule, which its NCCL engine applies too), unique only where the server runs
every data-parallel engine it names."""

from __future__ import annotations

from typing import Any

from vime.weights import WeightPushError


def rank_offsets(urls: list[str], answers: list[dict[str, Any]], backend: str) -> tuple[int, list[int]]:
    """The group's size and each server's first rank, from every server's `vime_workers` answers."""
    counts = []
    for url, answer in zip(urls, answers):
        workers = answer["results"]
        far = [w for w in workers if (w["data_parallel_index"] + 1) * w["world_size"] > len(workers)]
        if far:
            w = far[0]
            raise WeightPushError(
                f"{url} runs data-parallel engine {w['data_parallel_index']} of {w['data_parallel_size']} "
                f"({w['lb']} load balancing): the {backend} weight channel needs every data-parallel engine in "
                "one server (internal load balancing, no --data-parallel-rank / --data-parallel-hybrid-lb in "
                "engine.args) or each replica as its own engine (engine.num_engines)"
            )
        counts.append(len(workers))
    return 1 + sum(counts), [1 + sum(counts[:i]) for i in range(len(counts))]
