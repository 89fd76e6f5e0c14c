"""One trainer rank: a Ray actor that owns its Megatron-core model shard and optimiser state.

All ranks run the same calls in the same order (the driver in `trainer.py` fans each call out); data is split
by data-parallel rank, and every TP/PP rank of a pipeline gets the same samples.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Iterator
from datetime import timedelta
from functools import partial
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from trainers.megatron import export, hf_import, optim, rank_checkpoint, routing, te_shim
from trainers.megatron.batching import microbatches, response_values
from trainers.megatron.logprobs import LogProbHead
from trainers.megatron.spec import build_model, transformer_config
from trainers.megatron.step_reduce import all_finite, token_means
from trainers.megatron.value_head import ValueHead
from vime.algorithms.aggregation import token_weights
from vime.algorithms.correction import correct
from vime.algorithms.losses import entropy_bonus, get_loss
from vime.placement import listening_socket
from vime.protocols import WeightChannel, WeightChannelFactory
from vime.trainer import TrainerConfig
from vime.weights import mark_resident


class MegatronWorker:
    # Megatron's wrappers and optimiser are untyped; the channel is the engine's, typed by the contract.
    model: Any
    optimizer: Any
    scheduler: Any
    head: Any
    channel: WeightChannel | None = None

    def __init__(self, cfg: dict[str, Any], model_path: str, rank: int, world_size: int, role: str = "policy"):
        self.cfg = TrainerConfig(**{k: v for k, v in cfg.items() if k in TrainerConfig.model_fields})
        self.role = role  # "policy", or "critic": the same network with a value head (PPO)
        self.model_path = model_path
        self.rank, self.world_size = rank, world_size
        self.on_cpu = not torch.cuda.is_available()
        if self.on_cpu:
            torch.set_num_threads(self.cfg.threads or max(1, int(self.cfg.cpus_per_rank)))
        self.steps = 0

    # ---- setup -------------------------------------------------------------------------------------------
    def address(self) -> tuple[str, int]:
        """Rank 0 holds the rendezvous socket, bound to its node's address only (loopback on a local cluster)."""
        import ray

        self._store_socket = listening_socket(ray.util.get_node_ip_address())
        host, port = self._store_socket.getsockname()[:2]
        return host, port

    def setup(self, master_addr: str, master_port: int) -> dict[str, int]:
        from megatron.core import parallel_state as ps
        from transformers import AutoConfig

        sock = getattr(self, "_store_socket", None)
        store = dist.TCPStore(
            master_addr,
            master_port,
            self.world_size,
            is_master=sock is not None,
            master_listen_fd=sock.detach() if sock is not None else None,
            timeout=timedelta(seconds=self.cfg.rendezvous_timeout_s),
        )
        dist.init_process_group(
            "gloo" if self.on_cpu else "nccl", store=store, rank=self.rank, world_size=self.world_size
        )
        if not self.on_cpu:
            torch.cuda.set_device(0)  # Ray gives each rank one visible GPU
        ps.initialize_model_parallel(
            tensor_model_parallel_size=self.cfg.tp,
            pipeline_model_parallel_size=self.cfg.pp,
            expert_model_parallel_size=self.cfg.ep,
            expert_tensor_parallel_size=1,
        )
        self._seed_everything(self.cfg.seed)
        te_shim.apply()
        if self.on_cpu:
            from trainers.megatron import cpu_shim

            cpu_shim.apply(self.cfg.seed)
        else:
            from megatron.core import tensor_parallel

            tensor_parallel.model_parallel_cuda_manual_seed(self.cfg.seed)
        self.hf_cfg = AutoConfig.from_pretrained(self.model_path)
        dtype = torch.bfloat16 if self.cfg.dtype == "bfloat16" else torch.float32
        self.tcfg = transformer_config(
            self.hf_cfg,
            tp=self.cfg.tp,
            pp=self.cfg.pp,
            ep=self.cfg.ep,
            dtype=dtype,
            on_cpu=self.on_cpu,
            recompute=self.cfg.recompute,
        )
        self._apply_args(self.tcfg)
        self.tp_rank, self.pp_rank = ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()
        self.dp_rank = ps.get_data_parallel_rank()
        self.ep_rank = ps.get_expert_model_parallel_rank()
        self.layers_per_stage = self.hf_cfg.num_hidden_layers // self.cfg.pp
        model, self.head = self._initial_model()
        self.model, self.optimizer, self.scheduler = optim.wrap(self, model, self._apply_args)
        return {"rank": self.rank, "tp_rank": self.tp_rank, "pp_rank": self.pp_rank, "dp_rank": self.dp_rank}

    def _initial_model(self) -> tuple[torch.nn.Module, Any]:
        """This rank's stage of the model, with the checkpoint's weights and (last stage) the log-prob head, or
        the critic's value head (untied: the head replaces the output layer, not the embedding)."""
        from megatron.core import parallel_state as ps

        critic, last = self.role == "critic", ps.is_pipeline_last_stage()
        model = build_model(
            self.hf_cfg, self.tcfg, pre_process=ps.is_pipeline_first_stage(), post_process=last, tied=not critic
        )
        if not self.on_cpu:
            model = model.cuda()
        head: Any = None
        if last:
            head = ValueHead.install(model, self.tcfg.hidden_size, self.tcfg.params_dtype) if critic else None
            head = head or LogProbHead.install(model)
        hf_import.load_into(self, model)
        return model, head

    def _build_reference(self) -> None:
        """The initial policy, frozen, in the same parallel layout (no DDP wrapper, no optimiser state)."""
        self.ref, self.ref_head = self._initial_model()
        self.ref.eval()
        self.ref.requires_grad_(False)

    def _apply_args(self, obj: Any) -> None:
        """`trainer.args` keys that are fields of `obj` (the recipe check rejected keys on neither dataclass)."""
        names = {f.name for f in dataclasses.fields(obj)}
        for k, v in self.cfg.args.items():
            if k in names:
                setattr(obj, k, v)

    def _seed_everything(self, seed: int) -> None:
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)

    def module(self) -> torch.nn.Module:
        """The GPTModel under the DDP / Float16Module wrappers."""
        m = self.model
        while hasattr(m, "module"):
            m = m.module
        return m

    def release_memory(self) -> None:
        """Hand cached activation memory back to the driver, so a colocated engine can wake up into it. Called
        by the loop before a wake only: emptying the cache after every step would make the next step allocate
        its activations afresh (measured: a tenth of the step time on an H100)."""
        if not self.on_cpu:
            torch.cuda.empty_cache()

    # ---- forward / train ---------------------------------------------------------------------------------
    def _run(
        self,
        samples: list[dict[str, Any]],
        forward_only: bool,
        loss_fn: Any,
        loss_kwargs: dict[str, Any],
        temperature: float,
        on_logits: Any = None,
        reference: bool = False,
    ) -> list[dict[str, Any]]:
        from megatron.core import parallel_state as ps
        from megatron.core.pipeline_parallel import get_forward_backward_func

        mbs, length = microbatches(samples, self.cfg.micro_batch_size)
        dev = "cpu" if self.on_cpu else "cuda"
        # the global batch's token and response counts (on the host, before the copy), so each micro-batch's token
        # weights make it its share of the whole batch's loss
        masks = [mb["loss_mask"] for mb in mbs]
        counts = torch.tensor([float(sum(m.sum() for m in masks)), float(sum((m.sum(-1) > 0).sum() for m in masks))])
        counts = counts.to(dev)
        mbs = [{k: v.to(dev) for k, v in mb.items()} for mb in mbs]
        dist.all_reduce(counts, group=ps.get_data_parallel_group())
        n_tokens, n_seqs = float(counts[0]), float(counts[1])
        loss_kwargs = dict(loss_kwargs)
        mode, max_len = loss_kwargs.pop("aggregation", "token-mean"), loss_kwargs.pop("max_len", None)
        fixes = {"tis": loss_kwargs.pop("tis", None), "mis": loss_kwargs.pop("mis", None)}
        entropy_coef = float(loss_kwargs.pop("entropy_coef", 0.0))
        scale = self.cfg.dp * len(mbs)  # Megatron averages over micro-batches and DP ranks: undo both
        mask = torch.triu(torch.ones(length, length, dtype=torch.bool, device=dev), 1)[None, None]

        model, head = (self.ref, self.ref_head) if reference else (self.model, self.head)
        replay = routing.replay_if_routed(self, model, mbs)
        if head is not None:  # the model's last stage returns per-token log-probs (see LogProbHead)
            h = head
            h.temperature, h.with_entropy, h.on_logits = temperature, not forward_only, on_logits

        def loss_func(mb: dict[str, torch.Tensor], logp: torch.Tensor):
            lm = mb["loss_mask"]
            out = {"logp": logp.detach(), "mask_sum": lm.sum()}
            if forward_only:
                return logp.sum() * 0.0, out
            tok_loss, metrics = loss_fn(logp, mb, **loss_kwargs)
            tok_loss, fixed = correct(tok_loss, mb, **fixes)  # TIS / MIS against the engine's log-probs
            metrics = {**metrics, **fixed}
            assert head is not None  # a loss is computed on the last stage, which has the head
            tok_loss = entropy_bonus(tok_loss, head.entropy, entropy_coef)
            w = token_weights(lm, mode, n_tokens=n_tokens, n_seqs=n_seqs, max_len=max_len)
            loss = (tok_loss * w).sum()
            out["loss_sum"] = (tok_loss * lm).sum().detach()
            if head.entropy is not None:
                out["entropy_sum"] = (head.entropy * lm).sum().detach()
            for k, v in metrics.items():  # `<name>_max`: the batch's maximum; any other: its token mean
                if k.endswith("_max"):
                    out[k] = torch.where(lm > 0, v, -torch.inf).max()
                else:
                    out[k + "_sum"] = (v * lm).sum()
            return loss * scale, out

        def forward_step(data_iter: Iterator[dict[str, torch.Tensor]], model: torch.nn.Module):
            mb = next(data_iter)
            if replay is not None:
                replay.load(mb.get("routes"))
            out = model(
                input_ids=mb["tokens"], position_ids=mb["position_ids"], attention_mask=mask, labels=mb["targets"]
            )
            return out, partial(loss_func, mb)

        try:
            return get_forward_backward_func()(
                forward_step_func=forward_step,
                data_iterator=iter(mbs),
                model=[model],
                num_microbatches=len(mbs),
                seq_length=length,
                micro_batch_size=self.cfg.micro_batch_size,
                forward_only=forward_only,
            )
        finally:
            if replay is not None:
                replay.load(None)

    def logprobs(
        self, samples: list[dict[str, Any]], temperature: float = 1.0, reference: bool = False
    ) -> list[list[float]] | None:
        """Per-sample response-token log-probs (on last-stage ranks; None elsewhere), of the policy or of the frozen
        reference (the initial weights, built on first use: only recipes with a KL term pay for it)."""
        from megatron.core import parallel_state as ps

        if reference and getattr(self, "ref", None) is None:
            self._build_reference()
        offload = reference and not self.on_cpu and self.cfg.offload_reference
        if offload:
            self.ref.cuda()
        self.model.eval()
        with torch.no_grad():
            outs = self._run(samples, True, None, {}, temperature, reference=reference)
        self.model.train()
        if offload:  # its memory goes back to the policy's activations (and a colocated engine) until next step
            self.ref.cpu()
            torch.cuda.empty_cache()
        if not ps.is_pipeline_last_stage():
            return None
        result, i = [], 0
        for out in outs:
            b = out["logp"].shape[0]
            result += response_values(out["logp"].float().cpu(), samples[i : i + b])
            i += b
        return result[: len(samples)]

    def forward_logits(self, tokens: list[int]) -> torch.Tensor | None:
        """Full-vocab logits [s, V] for one sequence (TP-gathered; last stage only) — for parity checks."""
        from megatron.core import parallel_state as ps
        from megatron.core.tensor_parallel.mappings import gather_from_tensor_model_parallel_region

        captured: list[torch.Tensor] = []

        def capture(logits: torch.Tensor) -> None:
            captured.append(gather_from_tensor_model_parallel_region(logits.float().contiguous())[0].cpu())

        sample = {"prompt_ids": tokens[:1], "response_ids": tokens[1:]}
        self.model.eval()
        with torch.no_grad():
            self._run([sample], True, None, {}, 1.0, on_logits=capture)
        self.model.train()
        return captured[0][: len(tokens)] if ps.is_pipeline_last_stage() else None

    def routing_counts(self) -> dict[str, float]:
        return routing.counts(self)

    def reset_optimizer(self) -> None:
        optim.reset(self.optimizer, self.scheduler)

    def set_lr(self, lr: float) -> None:
        optim.set_peak_lr(self.optimizer, self.scheduler, lr)

    def train_step(
        self, samples: list[dict[str, Any]], loss: str, loss_kwargs: dict[str, Any], temperature: float = 1.0
    ) -> dict[str, float]:
        if self.optimizer is None:
            raise RuntimeError("this trainer was built with trainer.optimizer=false (forward/export only)")
        self.model.zero_grad_buffer()
        self.optimizer.zero_grad()
        outs = self._run(samples, False, get_loss(loss), loss_kwargs, temperature)
        finite = all_finite(outs, self.model.parameters(), self.on_cpu)
        if finite:
            ok, grad_norm, _ = self.optimizer.step()
            self.scheduler.step(increment=1)
            self.steps += 1
        else:  # one NaN/inf gradient would poison every weight for good: this batch is not learned from
            ok, grad_norm = False, None
            self.optimizer.zero_grad()
        metrics, n = token_means(outs, self.world_size, self.on_cpu, self.cfg.pp)  # every metric the loss returned
        if self.tcfg.num_moe_experts:
            metrics.update(self.routing_counts())
        metrics.update(
            grad_norm=float(grad_norm or 0.0),
            update_ok=float(bool(ok)),
            skipped_nonfinite=float(not finite),
            tokens=n,
            lr=float(self.optimizer.param_groups[0]["lr"]),
        )
        return metrics

    # ---- weights out ---------------------------------------------------------------------------------------
    def iter_hf_buckets(self, bucket_bytes: int) -> Iterator[list[tuple[str, torch.Tensor]]]:
        return export.iter_hf_buckets(self, bucket_bytes)

    def stream_hf_buckets(self, bucket_bytes: int) -> Iterator[list[tuple[str, torch.Tensor]]]:
        """Ray streaming-generator form of `iter_hf_buckets` for the driver."""
        for b in self.iter_hf_buckets(bucket_bytes):
            if self.rank == 0:
                yield [(k, v.cpu()) for k, v in b]

    def hf_state_dict(self) -> dict[str, torch.Tensor] | None:
        out = {k: v.cpu() for b in self.iter_hf_buckets(1 << 62) for k, v in b}
        return out if self.rank == 0 else None

    def save_hf(self, out_dir: str, bucket_bytes: int = 1 << 30) -> str | None:
        """A standard sharded HF directory (safetensors + index + config + tokenizer files)."""
        from trainers.megatron.hf_export import write_hf_dir

        buckets = self.iter_hf_buckets(bucket_bytes)
        if self.rank != 0:
            for _ in buckets:
                pass
            return None
        return write_hf_dir(buckets, out_dir, self.model_path)

    # ---- weight channel (sender side lives on global rank 0) -------------------------------------------------
    def connect_weights(self, channel: str, cfg: dict[str, Any], urls: list[str], **kw: Any) -> None:
        """Open the weight channel from this process (rank 0 sends; the other ranks only feed the gathers)."""
        from vime.registry import load_object

        self.bucket_bytes = int(cfg.get("bucket_mb", 256)) << 20
        if self.rank == 0:
            if self.channel is not None:
                self.channel.close()
            factory: WeightChannelFactory = load_object(channel, what="weight channel")
            self.channel = factory(cfg, urls, **kw)
            self.channel.connect()

    def push_weights(self, version: str) -> dict[str, float] | None:
        buckets = self.iter_hf_buckets(self.bucket_bytes)
        if self.rank != 0:
            for _ in buckets:
                pass
            return None
        if self.channel is None:
            raise RuntimeError("push_weights before connect_weights: no weight channel is open")
        # the parameters stay put and hold what is pushed until push() returns (the optimiser steps in place): a
        # colocated channel may read them where they are (`vime.weights.mark_resident`)
        mark_resident(t.untyped_storage().data_ptr() for t in export.local_state(self).values() if torch.is_tensor(t))
        return self.channel.push(buckets, version)

    # ---- checkpoints ---------------------------------------------------------------------------------------
    def save(self, ckpt_dir: str) -> None:
        rank_checkpoint.save(self, ckpt_dir)

    def load(self, ckpt_dir: str) -> None:
        rank_checkpoint.load(self, ckpt_dir)

    def shutdown(self) -> None:
        from megatron.core import parallel_state as ps

        ps.destroy_model_parallel()
        if dist.is_initialized():
            dist.destroy_process_group()
