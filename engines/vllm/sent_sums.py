"""The sender's side of every push's check (`weights.verify`): what it sent, what it asks the engines to sum, and
the verdict on their answers. The sums themselves and the comparison are `fingerprint.py`'s; this keeps one push's
record of them, and across pushes which names the engines check by float sums (the rest are checked by their exact
bit sums alone, which is all either side then computes)."""

from __future__ import annotations

import math
import time
import uuid
from typing import Any

import torch

from engines.vllm.fingerprint import check, dtype_name, float_checked, pairs_split, tensor_sums
from engines.vllm.staging import Staging

Bucket = list[tuple[str, torch.Tensor]]


class SentSums:
    def __init__(self) -> None:
        # names the engines check by float sums (a dtype change, row sums read back); None: not known yet (all)
        self.float_names: set[str] | None = None
        self.reset()

    def reset(self) -> None:
        """A new push."""
        self.sent: dict[str, tuple[list[Any], int, str]] = {}  # its tensors: sums, numel, dtype
        self.names: list[str] = []  # its tensor names so far (the last round asks the engines' sums of all)
        self.dtypes: list[str | None] = []  # and the dtypes they were sent as (None: check by float sums)
        self.expect_id = ""  # names its sums for the engines (they follow its last round's call)
        self.sum_s = 0.0  # time spent summing
        self.engine_sum_s = 0.0  # the slowest engine worker's sums
        self.summed_in_copy = 0  # parameters every engine worker's load summed as it wrote them (not read back)
        self.workers = 0  # engine workers whose weights the push checked (every TP/PP rank of every DP engine)

    def announce(self, meta: dict[str, Any]) -> None:
        """A round's tensors (`bucket_meta`); a piece whose bit sum does not add up with its neighbours' is checked
        by float sums (`pairs_split`)."""
        self.names += meta["names"]
        self.dtypes += [
            None if pairs_split(getattr(torch, d).itemsize, math.prod(shape)) else d
            for d, shape in zip(meta["dtype_names"], meta["shapes"])
        ]

    def ask(self, read_back: bool, timeout_s: float) -> tuple[dict[str, Any], dict[str, Any]]:
        """What the last round's update and its call carry: the names to sum, and the id the sums will follow by.
        The round's call times out after `timeout_s`: its wait for the sums must end well before."""
        self.expect_id = uuid.uuid4().hex
        update = {"sums": self.names, "sum_dtypes": self.dtypes, "read_back": read_back}
        return update, {"expect_id": self.expect_id, "expect_timeout_s": timeout_s / 2}

    def record(self, bucket: Bucket, staged: int, staging: Staging | None, fixed: bool) -> None:
        """The bucket's fingerprints, summed where the tensors are while the engines load them: the first `staged`
        in the ipc staging buffer (their bit sums in two kernels), the rest where they lie (`fixed`: at the same
        addresses every push, an ipc round's resident weights: their sums a captured graph)."""
        t0 = time.perf_counter()
        floats = [self.float_names is None or n in self.float_names for n, _ in bucket]
        sums = []
        if staged:
            assert staging is not None
            sums = staging.sums(floats[:staged])
        if len(bucket) > staged:
            sums += tensor_sums([t.detach() for _, t in bucket[staged:]], floats[staged:], fixed=fixed)
        for (name, t), s in zip(bucket, sums):
            self.sent[name] = (s, t.numel(), dtype_name(t))
        self.sum_s += time.perf_counter() - t0

    def expect_body(self) -> dict[str, Any]:
        return {"expect_id": self.expect_id, "expect": self.sent}

    def answered(self, answers: list[dict[str, Any]], problems: list[str]) -> None:
        """The engines' answers to the last round (their checks' `problems` already made there)."""
        sums = [w for a in answers for w in a["results"] if w]
        self.engine_sum_s = max((w.get("sum_s", 0.0) for w in sums), default=0.0)
        self.summed_in_copy = min((w.get("summed_in_copy", 0) for w in sums), default=0)
        self.workers = len(sums)
        self.float_names = None if problems else float_checked(a["results"] for a in answers)

    def asked_again(self) -> dict[str, Any]:
        """`vime_weight_sums`' kwargs to sum everything the last push sent once more."""
        return {"names": list(self.sent), "dtypes": [d for _, _, d in self.sent.values()]}

    def judged(self, urls: list[str], answers: list[dict[str, Any]]) -> list[str]:
        """The problems with the engines' answers to `asked_again` (each engine checked here, by the sender)."""
        problems = [p for url, a in zip(urls, answers) for p in check(self.sent, a["results"], url)]
        self.float_names = None if problems else float_checked(a["results"] for a in answers)
        return problems
