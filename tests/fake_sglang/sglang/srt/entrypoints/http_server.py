"""FAKE SGLang (tests only, see tests/fake_sglang/README.md): SGLang 0.5.17's HTTP shapes for the routes vime uses,
generating with the real model through transformers (fp32, CPU, one request at a time per token step)."""

from __future__ import annotations

import asyncio
import base64
import glob
import json
import os
import threading
import time
import uuid
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

app = FastAPI()


class Fake:
    def __init__(self, args: Any):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        torch.set_num_threads(1)
        torch.manual_seed(args.random_seed)
        self.args = args
        self.model = AutoModelForCausalLM.from_pretrained(args.model_path, dtype=torch.float32).eval()
        self.tok = AutoTokenizer.from_pretrained(args.model_path)
        self.eos = {int(self.model.config.eos_token_id or 0)}
        self.version = args.weight_version
        self.lock = threading.Lock()  # one forward at a time
        self.resumed = threading.Event()
        self.resumed.set()
        self.abort = 0  # bumped by an abort: running requests end with finish_reason abort
        self.running = 0
        self.released: set[str] = set()
        self.pg: Any = None
        self.ttft = [0.0, 0]

    def sample(self, sp: dict[str, Any], ids: list[int], on_token: Any = None, routes: bool = False) -> dict[str, Any]:
        t0, epoch = time.monotonic(), self.abort
        temp, top_k, top_p = float(sp.get("temperature", 1.0)), int(sp.get("top_k", -1)), float(sp.get("top_p", 1.0))
        seed = sp.get("sampling_seed")
        gen = (
            torch.Generator().manual_seed(int(seed))
            if seed is not None and self.args.enable_deterministic_inference
            else None
        )
        stops = self.eos | set(sp.get("stop_token_ids") or [])
        out: list[int] = []
        lps: list[float] = []
        reason: dict[str, Any] = {"type": "length", "length": int(sp.get("max_new_tokens", 128))}
        past, feed = None, torch.tensor([ids])
        routes = routes and self.args.enable_return_routed_experts  # SGLang returns them only when started so
        rows: list[torch.Tensor] = []  # [fed tokens, layers, k] per forward: the routers' top-k, as SGLang records
        for _ in range(int(sp.get("max_new_tokens", 128))):
            self.resumed.wait()  # pause in place: the request waits here, its cache kept
            if self.abort != epoch:
                reason = {"type": "abort", "message": "Abort by pause_generation"}
                break
            if self.released:
                raise RuntimeError(f"generation while memory is released ({sorted(self.released)})")
            with self.lock, torch.no_grad():
                res = self.model(input_ids=feed, past_key_values=past, use_cache=True, output_router_logits=routes)
            if routes:
                k = self.model.config.num_experts_per_tok
                rows.append(torch.stack([g.topk(k, -1).indices for g in res.router_logits], 1).to(torch.int32))
            past, logits = res.past_key_values, res.logits[0, -1].double()
            greedy = temp < 1e-6
            logp = torch.log_softmax(logits if greedy else logits / temp, -1)
            if greedy:
                t = int(torch.argmax(logp))
            else:
                probs = logp.exp()
                if 0 < top_k < probs.numel():
                    probs[probs < torch.topk(probs, top_k).values[-1]] = 0
                if top_p < 1.0:
                    sorted_p, order = probs.sort(descending=True)
                    probs[order[(sorted_p.cumsum(0) - sorted_p) > top_p]] = 0
                t = int(torch.multinomial(probs / probs.sum(), 1, generator=gen))
            if not out:
                self.ttft[0] += time.monotonic() - t0
                self.ttft[1] += 1
            out.append(t)
            lps.append(float(logp[t]))
            feed = torch.tensor([[t]])
            if t in stops and not sp.get("ignore_eos"):
                reason = {"type": "stop", "matched": t}
                break
            if on_token is not None and len(out) < int(sp.get("max_new_tokens", 128)):
                on_token(self.item(out, lps, None, len(ids)))  # the last token comes with its finish reason
        item = self.item(out, lps, reason, len(ids))
        if routes:  # every fed position: the prompt and all sampled tokens but the last
            item["meta_info"]["routed_experts"] = base64.b64encode(torch.cat(rows).numpy().tobytes()).decode()
        return item

    def item(self, out: list[int], lps: list[float], reason: Any, n_prompt: int) -> dict[str, Any]:
        return {
            "text": self.tok.decode(out),
            "output_ids": list(out),
            "meta_info": {
                "id": uuid.uuid4().hex,
                "finish_reason": reason,
                "prompt_tokens": n_prompt,
                "weight_version": self.version,
                "completion_tokens": len(out),
                "cached_tokens": 0,
                "output_token_logprobs": [[lp, t, None] for lp, t in zip(lps, out)],
                "input_token_logprobs": [],
            },
        }

    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        state = self.model.state_dict()
        unknown = sorted(set(tensors) - set(state))
        if unknown:
            raise ValueError(f"unknown parameters {unknown[:3]}")
        with self.lock, torch.no_grad():
            for name, t in tensors.items():
                state[name].copy_(t)


def fake() -> Fake:
    return app.state.fake


@app.middleware("http")
async def keys(request: Request, call_next: Any) -> Any:
    """SGLang's api_key / admin_api_key: every route but /health* and /metrics wants the key."""
    path, key = request.url.path, fake().args.api_key
    if key and not path.startswith(("/health", "/metrics")) and request.headers.get("authorization") != f"Bearer {key}":
        return JSONResponse({"error": "Unauthorized"}, status_code=401)
    return await call_next(request)


def ok(message: str = "Success", **extra: Any) -> dict[str, Any]:
    return {"success": True, "message": message, **extra}


@app.get("/health")
@app.get("/health_generate")
async def health() -> Response:
    return Response(status_code=200 if fake().resumed.is_set() else 503)


@app.get("/model_info")
async def model_info() -> dict[str, Any]:
    return {"model_path": fake().args.model_path, "is_generation": True, "weight_version": fake().version}


@app.get("/weight_version")
async def weight_version() -> JSONResponse:
    return JSONResponse({"detail": "deprecated. Please use '/model_info' instead."}, status_code=404)


@app.get("/metrics")
async def metrics() -> PlainTextResponse:
    s, n = fake().ttft
    return PlainTextResponse(
        f'sglang:time_to_first_token_seconds_sum{{model_name="m"}} {s}\n'
        f'sglang:time_to_first_token_seconds_count{{model_name="m"}} {n}\n'
    )


@app.post("/generate")
async def generate(request: Request) -> Any:
    f, body = fake(), await request.json()
    ids = body["input_ids"]
    batch = [ids] if ids and isinstance(ids[0], int) else ids
    sps = body.get("sampling_params") or {}
    sps = sps if isinstance(sps, list) else [sps] * len(batch)
    if any(sp.get("json_schema") or sp.get("regex") or sp.get("ebnf") for sp in sps):  # never ignored silently
        return JSONResponse({"error": {"message": "the fake SGLang has no constrained decoding"}}, status_code=400)
    await asyncio.to_thread(f.resumed.wait)  # a paused server holds new requests until continue
    if body.get("stream"):
        return StreamingResponse(stream(batch[0], sps[0]), media_type="text/event-stream")
    f.running += len(batch)
    try:
        routes = bool(body.get("return_routed_experts"))
        items = await asyncio.gather(*(asyncio.to_thread(f.sample, sp, p, None, routes) for p, sp in zip(batch, sps)))
    except RuntimeError as e:
        return JSONResponse({"error": {"message": str(e)}}, status_code=400)
    finally:
        f.running -= len(batch)
    return items[0] if len(batch) == 1 and isinstance(ids[0], int) else list(items)


async def stream(prompt: list[int], sp: dict[str, Any]) -> Any:
    f, queue, loop = fake(), asyncio.Queue(), asyncio.get_running_loop()
    f.running += 1
    task = asyncio.ensure_future(
        asyncio.to_thread(f.sample, sp, prompt, lambda it: loop.call_soon_threadsafe(queue.put_nowait, it))
    )
    try:
        while not task.done() or not queue.empty():
            try:
                item = await asyncio.wait_for(queue.get(), 0.05)
            except TimeoutError:
                continue
            yield f"data: {json.dumps(item)}\n\n"
        yield f"data: {json.dumps(await task)}\n\ndata: [DONE]\n\n"
    finally:
        f.running -= 1


@app.post("/pause_generation")
async def pause(request: Request) -> dict[str, Any]:
    f, mode = fake(), (await request.json()).get("mode", "abort")
    if mode == "abort":
        f.abort += 1
    f.resumed.clear()
    if mode == "abort":
        while f.running:  # aborted requests leave at their next token
            f.resumed.set()
            await asyncio.sleep(0.01)
            f.resumed.clear()
    return {"message": "Generation paused successfully.", "status": "ok"}


@app.post("/continue_generation")
async def resume() -> dict[str, Any]:
    fake().resumed.set()
    return {"message": "Generation continued successfully.", "status": "ok"}


@app.api_route("/flush_cache", methods=["GET", "POST"])
async def flush() -> PlainTextResponse:
    if fake().running:
        return PlainTextResponse("Cache not flushed: requests are running.\n", status_code=400)
    return PlainTextResponse("Cache flushed.\nPlease check backend logs for more details.\n")


@app.post("/update_weight_version")
async def update_weight_version(request: Request) -> dict[str, Any]:
    fake().version = (await request.json())["new_version"]
    return ok(f"Weight version updated to {fake().version}", new_version=fake().version)


@app.post("/update_weights_from_disk")
async def from_disk(request: Request) -> JSONResponse:
    from safetensors.torch import load_file

    body = await request.json()
    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(glob.glob(os.path.join(body["model_path"], "*.safetensors"))):
        tensors.update(load_file(path))
    try:
        fake().load(tensors)
    except ValueError as e:
        return JSONResponse({"success": False, "message": f"Failed to update weights: {e}"}, status_code=400)
    if body.get("weight_version"):
        fake().version = body["weight_version"]
    return JSONResponse(ok("Succeeded to update model weights.", num_paused_requests=0))


@app.post("/init_weights_update_group")
async def init_group(request: Request) -> dict[str, Any]:
    from engines.sglang.pg import join_group  # the fake joins as SGLang's server does (rank = rank_offset)

    b = await request.json()
    fake().pg = await asyncio.to_thread(
        join_group, b.get("backend", "nccl"), b["master_address"], b["master_port"], b["world_size"],
        b["rank_offset"], b.get("group_name", "weight_update_group"), 120.0,
    )  # fmt: skip
    return ok("Succeeded to initialize custom process group.")


@app.post("/update_weights_from_distributed")
async def from_distributed(request: Request) -> JSONResponse:
    b, f = await request.json(), fake()

    def receive() -> dict[str, torch.Tensor]:
        out = {}
        for name, dtype, shape in zip(b["names"], b["dtypes"], b["shapes"]):
            t = torch.empty(shape, dtype=getattr(torch, dtype))
            torch.distributed.broadcast(t, src=0, group=f.pg)
            out[name] = t
        return out

    try:
        f.load(await asyncio.to_thread(receive))
    except ValueError as e:
        return JSONResponse({"success": False, "message": str(e)}, status_code=400)
    if b.get("weight_version"):
        f.version = b["weight_version"]
    return JSONResponse(ok("Succeeded to update parameter online."))


@app.post("/destroy_weights_update_group")
async def destroy_group() -> dict[str, Any]:
    f = fake()
    if f.pg is not None:
        torch.distributed.destroy_process_group(f.pg)
        f.pg = None
    return ok("Succeeded to destroy custom process group.")


@app.api_route("/release_memory_occupation", methods=["GET", "POST"])
async def release(request: Request) -> Any:
    f = fake()
    if f.running:
        return JSONResponse({"error": {"message": "release needs an idle server"}}, status_code=400)
    f.released |= set((await request.json()).get("tags") or ["weights", "kv_cache", "cuda_graph"])
    return None


@app.api_route("/resume_memory_occupation", methods=["GET", "POST"])
async def resume_memory(request: Request) -> Any:
    f = fake()
    f.released -= set((await request.json()).get("tags") or ["weights", "kv_cache", "cuda_graph"])
    return None


def launch_server(args: Any) -> None:
    import uvicorn

    app.state.fake = Fake(args)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
