"""Every push verified: after the last bucket the engine and the sender agree on a fingerprint of every tensor
pushed, or the push fails naming the tensors that disagree.

The fingerprint is additive (Σw and Σw², summed in float64, and Σbits: the bytes read as integer words, summed
exactly modulo 2³², 2⁶⁴ for 8-byte elements), because an engine changes the layout of what it
loads: HF tensors stacked into one fused parameter (q/k/v → qkv_proj, gate/up → gate_up_proj, every expert →
w13/w2), cut over tensor- or expert-parallel workers, padded with zeros (vocab rows), shuffled into a kernel's
format. Sums survive all of these, so the sender sums what it sent, each engine worker sums the parameters those
tensors landed in, and the two must match per parameter. Float sums match only within a rounding bound that grows
with the tensor (sqrt(n·Σw²) × 1e-6), which a stale engine one small optimiser step behind passes (lr 1e-6 moves
a weight by ~5e-5 of its size); an integer sum does not depend on the order it is added in, so where both sides
hold one dtype it must match exactly and one element one ulp off fails it — there the bit sums are all either
side computes (one read of each tensor instead of three). It catches a tensor the engine dropped (a name it did
not know), one that arrived damaged or not at all, and a parameter changed on the engine since; it does not see
a permutation inside one parameter, nor state kept beside the parameters (the CPU backend's pre-packed copies,
which `worker_ext` rebuilds on every push). Both sides take float sums alike (rows of `ROW` elements in float32,
then float64), so an engine holding the sender's dtype differs only in summation order.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

import torch

from engines.vllm import word_sums
from engines.vllm.cpu_threads import one_thread
from engines.vllm.graphs import captured

EXPERT = re.compile(r"\.experts\.\d+\.(gate_proj|up_proj|down_proj|w1|w2|w3)\.weight$")
SAME_DTYPE_RTOL = 1e-6  # sums of identical values: only the summation order differs


ROW = 4096  # elements reduced per row in float32 before the rows are added in float64


def _parts(t: torch.Tensor) -> list[torch.Tensor]:
    """The tensor's elements as [rows of ROW, tail]: per row one float32 sum and 2-norm, streaming reductions that
    stay exact to ~1e-7 of a row (a float64 reduction over the whole tensor is 10-20× slower on a CPU). On a CPU a
    half-precision tensor is widened first: its reductions with a float32 accumulator run at a tenth of the speed."""
    flat = t.reshape(-1)
    if flat.dtype != torch.float32 and flat.device.type == "cpu":
        flat = flat.float()
    cut = flat.numel() // ROW * ROW
    out = [flat[:cut].view(-1, ROW)] if cut else []
    return out + ([flat[cut:].view(1, -1)] if cut < flat.numel() else [])


INT_OF_WIDTH = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def bits_mod(width: int) -> int:
    """The modulus of the bit sum of `width`-byte elements: 2³² up to 4 bytes (one changed element moves the sum by
    less than 2³², so never by a multiple of it), 2⁶⁴ for 8-byte ones."""
    return 1 << (64 if width == 8 else 32)


def pairs_split(width: int, numel: int) -> bool:
    """Whether a tensor's bit sum does not add up with its neighbours': 2-byte elements are summed in pairs
    (`bit_sum`), so a piece of odd length shifts the pairs of whatever follows it in a fused or cut parameter."""
    return width == 2 and numel % 2 == 1


def bit_sum(t: torch.Tensor) -> torch.Tensor:
    """Σ of the tensor's bytes read as signed words of max(4, element size) bytes (1-byte elements one by one),
    wrapping in int32 (int64 for 8-byte words); a 2-byte tensor of odd length adds its last element alone. One
    read of the tensor at the machine's speed: summing 2-byte elements into an int32 is 28× slower on a CPU than
    summing 4-byte words (138 vs 5 ms for 50M bf16 on one thread), and slow on a GPU too. A changed 2-byte element
    moves its word by δ or δ·2¹⁶ with 0 < |δ| < 2¹⁶, never a multiple of 2³², so any one change still shows;
    the sums of pieces add up to the whole's wherever no piece of 2-byte elements has odd length (`pairs_split`:
    both sides then fall back to float sums). Returned in its accumulator's dtype (int32 or int64)."""
    flat = t.reshape(-1)
    width = flat.element_size()
    if width == 2:
        even = flat.numel() // 2 * 2
        if flat.storage_offset() % 2:  # a view at an odd element: its pairs are not aligned words
            flat = flat.clone()
        words = flat[:even].view(torch.int32).sum(dtype=torch.int32)
        return words + flat[even:].view(torch.int16).sum(dtype=torch.int32) if even < flat.numel() else words
    acc = torch.int64 if width == 8 else torch.int32
    return flat.view(INT_OF_WIDTH[width]).sum(dtype=acc)


def tensor_sums(tensors: list[torch.Tensor], floats: list[bool] | None = None, fixed: bool = False) -> list[list[Any]]:
    """[Σw, Σw², Σbits mod 2³² (2⁶⁴)] per tensor, read back in one transfer (the tensors may be on a GPU); where
    `floats[i]` is False only the bit sum ([None, None, Σbits]): one read of the tensor instead of three. A GPU
    bucket of hundreds of tensors costs launches more than bandwidth: `fixed` (tensors that stay where they are
    from call to call, an engine's parameters) launches the bit sums as one CUDA graph."""
    if not tensors:
        return []
    dev = tensors[0].device
    if any(t.device != dev for t in tensors):
        raise ValueError(f"tensor_sums takes tensors on one device, got {sorted({str(t.device) for t in tensors})}")
    want = [True] * len(tensors) if floats is None else floats
    with one_thread(dev.type == "cpu"), torch.no_grad():
        sums, norms, owner, count = [], [], [], []
        for i, t in enumerate(tensors):
            for rows in _parts(t) if want[i] else []:
                sums.append(rows.sum(1, dtype=torch.float32))
                norms.append(torch.linalg.vector_norm(rows, dim=1, dtype=torch.float32))
                owner.append(i)
                count.append(rows.shape[0])
        out = torch.zeros(len(tensors), 2, dtype=torch.float64, device=dev)
        if sums:
            at = torch.repeat_interleave(torch.tensor(owner), torch.tensor(count)).to(dev)
            out[:, 0].index_add_(0, at, torch.cat(sums).double())
            out[:, 1].index_add_(0, at, torch.cat(norms).double().square())
        bits = graphed_bits(tensors) if fixed else stacked_bits([bit_sum(t) for t in tensors])
        floats_back = out.cpu().tolist() if sums else [[None, None]] * len(tensors)
        mods = [bits_mod(t.element_size()) for t in tensors]
        return [[s, q, b % m] if w else [None, None, b % m] for (s, q), b, w, m in zip(floats_back, bits, want, mods)]


def stacked_bits(bits: list[torch.Tensor]) -> list[int]:
    """The bit sums as Python ints, one stack and one read-back per accumulator dtype (int32; int64 for 8-byte
    elements), not one per tensor: a GPU bucket holds hundreds."""
    out = [0] * len(bits)
    for dtype in {b.dtype for b in bits}:
        idx = [i for i, b in enumerate(bits) if b.dtype == dtype]
        for i, v in zip(idx, torch.stack([bits[i] for i in idx]).tolist()):
            out[i] = v
    return out


GRAPHS: dict[tuple[Any, ...], Any] = {}  # the bit sums of one set of fixed tensors, captured (a few sets at most)


def graphed_bits(tensors: list[torch.Tensor]) -> list[int]:
    """`stacked_bits` of the tensors' bit sums, the kernels captured once per set of tensors and replayed after; on
    a GPU the word-sum kernel (`word_sums.py`) takes every tensor of whole 2- or 4-byte words below
    `word_sums.TORCH_FROM` bytes (where launches, not bytes, are the cost)."""
    if tensors[0].device.type != "cuda" or any(t.element_size() == 2 and t.storage_offset() % 2 for t in tensors):
        return stacked_bits([bit_sum(t) for t in tensors])  # (an odd 2-byte offset would clone inside the graph)
    key = tuple((t.data_ptr(), t.dtype, tuple(t.shape), tuple(t.stride())) for t in tensors)
    if key not in GRAPHS:
        if len(GRAPHS) >= 4:
            GRAPHS.pop(next(iter(GRAPHS)))
        GRAPHS[key] = _bits_graph(tensors)
    run, kernel, groups = GRAPHS[key]
    out = [0] * len(tensors)
    stacks = run()
    for i, v in zip(kernel, stacks[0].tolist()):
        out[i] = v
    for idx, stack in zip(groups, stacks[1:]):
        for i, v in zip(idx, stack.tolist()):
            out[i] = v
    return out


def _bits_graph(tensors: list[torch.Tensor]) -> tuple[Any, list[int], list[list[int]]]:
    """The graph of one set's bit sums: the kernel's into one int32 vector, the rest stacked per accumulator."""
    dev = tensors[0].device
    fast = word_sums.usable(dev)
    small = [t.numel() * t.element_size() < word_sums.TORCH_FROM for t in tensors]  # large: PyTorch's sum is as fast
    words = [word_sums.words(t) if fast and s and t.element_size() in (2, 4) else None for t, s in zip(tensors, small)]
    kernel = [i for i, w in enumerate(words) if w is not None]
    rest = [i for i, w in enumerate(words) if w is None]
    acc = {i: INT_OF_WIDTH[max(4, tensors[i].element_size())] for i in rest}  # bit_sum's accumulator dtype
    groups = [[i for i in rest if acc[i] == d] for d in sorted(set(acc.values()), key=str)]
    out = torch.zeros(len(kernel), dtype=torch.int32, device=dev)

    def launch() -> list[torch.Tensor]:
        out.zero_()
        for k, i in enumerate(kernel):
            word_sums.launch(words[i], out, k)  # type: ignore[arg-type]
        return [out, *(torch.stack([bit_sum(tensors[i]) for i in idx]) for idx in groups)]

    return captured(launch, dev), kernel, groups


# ---- engine worker side -------------------------------------------------------------------------------------
def stacked_names(model: torch.nn.Module) -> list[tuple[str, str]]:
    """(".q_proj.", ".qkv_proj.") pairs: the model's own list of HF projections it fuses on load."""
    pairs = [(f".{p}.", f".{fused}.") for fused, ps in getattr(model, "packed_modules_mapping", {}).items() for p in ps]
    mapper = getattr(model, "hf_to_vllm_mapper", None)
    for src, (dst, _) in (getattr(mapper, "orig_to_new_stacked", None) or {}).items():
        pairs.append((src + ".", dst + "."))
    return pairs


def param_for(name: str, params: dict[str, Any], stacked: list[tuple[str, str]]) -> str | None:
    """The engine parameter an HF tensor is loaded into (None: the engine has none and would drop it)."""
    if name in params:
        return name
    m = EXPERT.search(name)
    if m:
        fused = "w2_weight" if m.group(1) in ("down_proj", "w2") else "w13_weight"
        prefix = f"{name[: m.start()]}.experts."  # the fused module sits at or below it (0.32: .routed_experts)
        found = [p for p in params if p.startswith(prefix) and p.endswith("." + fused)]
        return found[0] if len(found) == 1 else None
    for src, dst in stacked:
        if src in name and (cand := name.replace(src, dst)) in params:
            return cand
    return None


READ_BACK_MAX_K = 256  # reading a packed weight back costs K × its size (tiny models); above, only Σw is probed


def computed_with(model: torch.nn.Module, name: str, param: torch.Tensor) -> tuple[torch.Tensor, int, bool]:
    """The values the engine computes with, their count, and whether they are only row sums. vLLM's CPU backend
    moves a linear layer's weight into a pre-packed kernel and leaves the parameter empty; that weight is read
    back through the kernel itself, so a stale or mis-packed copy is caught too: an identity in gives Wᵀ (every
    element once, exactly); past READ_BACK_MAX_K a row of ones gives the row sums (Σw, not Σw²)."""
    module_name, _, leaf = name.rpartition(".")
    if param.numel() or leaf != "weight":  # (a GPU engine's parameters: no module lookup on every push)
        return param, param.numel(), False
    module = model.get_submodule(module_name)
    if not hasattr(module, "cpu_linear"):
        return param, param.numel(), False
    k = getattr(module, "input_size_per_partition", None) or module.input_size  # a replicated layer has no partition
    if k <= READ_BACK_MAX_K:
        w_t = module.cpu_linear(torch.eye(k, dtype=param.dtype), None, None)
        return w_t, w_t.numel(), False
    rows = module.cpu_linear(torch.ones(1, k, dtype=param.dtype), None, None)
    return rows, rows.numel() * k, True


def engine_sums(
    model: torch.nn.Module,
    names: list[str],
    dtypes: list[str | None] | None = None,
    copied: dict[str, int] | None = None,
) -> dict[str, Any]:
    """This worker's side: where each pushed name landed and, per parameter, [Σw, Σw², Σbits] (Σw² None where
    only row sums could be read). `dtypes` (what each name was sent as; None: check it by float sums): a parameter
    that holds all it got in the dtype it got it in is checked by its bit sum alone ([None, None, Σbits]), taken
    from `copied` (parameter → Σbits the load's own copy summed as it wrote it whole) where it is there."""
    params = dict(model.named_parameters())
    where, held = landed(model, tuple(names), params)
    sent_as: dict[str, set[str | None]] = defaultdict(set)
    for n, d in zip(names, dtypes or []):
        if (p := where[n]) is not None:
            sent_as[p].add(d)
    with torch.no_grad():
        values = [computed_with(model, p, params[p].detach()) for p in held]
        exact = [
            not rows and sent_as.get(p) == {dtype_name(v)} and not pairs_split(v.element_size(), v.numel())
            for p, (v, _, rows) in zip(held, values)
        ]
        known = copied or {}
        read = [i for i, p in enumerate(held) if not (exact[i] and p in known)]
        sums: list[list[Any]] = [[None, None, known.get(p)] for p in held]
        for i, s in zip(read, tensor_sums([values[i][0] for i in read], [not exact[i] for i in read], fixed=True)):
            sums[i] = s
    info = {}
    for p, (v, numel, row_sums), s in zip(held, values, sums):
        info[p] = {"sums": [s[0], None, None] if row_sums else s, "numel": numel, "dtype": dtype_name(v)}
    return {"where": where, "params": info}


LANDED: dict[tuple[Any, ...], tuple[dict[str, str | None], list[str]]] = {}  # per model and names


def landed(
    model: torch.nn.Module, names: tuple[str, ...], params: dict[str, Any]
) -> tuple[dict[str, str | None], list[str]]:
    """Where each name lands and the parameters that hold them: the same every push of the same names (kept: the
    Python of finding them was a millisecond and more of every push's check)."""
    key = (type(model), tuple(params), names)
    if key not in LANDED:
        if len(LANDED) >= 8:
            LANDED.pop(next(iter(LANDED)))
        stacked = stacked_names(model)
        where = {n: param_for(n, params, stacked) for n in names}
        LANDED[key] = (where, sorted({p for p in where.values() if p}))
    where, held = LANDED[key]
    return dict(where), held


def dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).replace("torch.", "")


# ---- sender side --------------------------------------------------------------------------------------------
def rtol(sent_dtype: str, engine_dtype: str, row_sums: bool) -> float:
    """Same dtype: float64 summation noise only; otherwise the coarser dtype's rounding, at worst every element.
    Row sums read back through a kernel were accumulated in the engine's dtype."""
    if sent_dtype == engine_dtype and not row_sums:
        return SAME_DTYPE_RTOL
    dtypes = (sent_dtype, engine_dtype) if sent_dtype != engine_dtype else (engine_dtype,)
    return max(SAME_DTYPE_RTOL, *(4 * torch.finfo(getattr(torch, d)).eps for d in dtypes))


def disagreement(expected: list[Any], numel: int, got: list[Any], tol: float, exact: bool) -> bool:
    """Whether an engine parameter's sums `got` differ from the sums of what was sent: the bit sums exactly where
    both sides hold one dtype (`exact`; the engine then sums only those), the float sums within `tol` of their
    scale otherwise (the caller makes sure the sender summed floats wherever the engine did)."""
    s, q, bits = expected
    if got[0] is None:  # the engine summed the bits only
        return not exact or got[2] != bits
    scale = (max(numel, 1) * max(q, 0.0)) ** 0.5  # ≥ Σ|w|
    if got[1] is None:  # only row sums were read back
        return abs(got[0] - s) > tol * scale + 1e-12
    off = abs(got[0] - s) > tol * scale + 1e-12 or abs(got[1] - q) > 2 * tol * q + 1e-12
    return off or (exact and got[2] is not None and got[2] != bits)


def check(sent: dict[str, tuple[list[Any], int, str]], workers: list[dict[str, Any]], url: str) -> list[str]:
    """What disagrees between the tensors sent (name → sums, numel, dtype) and one server's workers' answers (of
    every data-parallel engine it runs; a problem names the engine where there are several)."""
    several = len({w.get("dp", 0) for w in workers}) > 1
    where: dict[str, str] = {}
    for w in workers:
        for name, p in w["where"].items():
            if p:
                where.setdefault(name, p)
    problems = [f"{url}: the engine has no parameter for {n!r} (dropped on load)" for n in sent if n not in where]
    groups: dict[str, list[str]] = defaultdict(list)
    for name in sent:
        if name in where:
            groups[where[name]].append(name)
    for p, names in sorted(groups.items()):
        held_by = [(w.get("dp", 0), w["params"][p]) for w in workers if p in w["params"]]
        held = [h for _, h in held_by]
        if len(held) == 1 and bits_agree(sent, names, held[0]):  # the common case, without the float bookkeeping
            continue
        floats = [sent[n][0][0] is not None for n in names]
        if not all(floats) and any(h["sums"][0] is not None for h in held):
            problems.append(
                f"{url}: engine parameter {p!r} (from {', '.join(names)}, {held[0]['dtype']}) is checked by float "
                "sums the sender did not take this push (it took bit sums only, as the last push's answer allowed: "
                "the engine changed since); the next push takes them"
            )
            continue
        mod = bits_mod(getattr(torch, sent[names[0]][2]).itemsize)
        bits = sum(sent[n][0][2] for n in names) % mod
        expected = [*(sum(sent[n][0][i] for n in names) if all(floats) else None for i in (0, 1)), bits]
        numel = sum(sent[n][1] for n in names)
        row_sums = any(h["sums"][1] is None and h["sums"][0] is not None for h in held)
        tol = rtol(sent[names[0]][2], held[0]["dtype"], row_sums)
        width = getattr(torch, held[0]["dtype"]).itemsize
        split = any(pairs_split(width, n) for n in [*(sent[x][1] for x in names), *(h["numel"] for h in held)])
        exact = not row_sums and not split and all(sent[n][2] == held[0]["dtype"] for n in names)
        for dp, got in copies(held_by, numel, row_sums, mod):
            if disagreement(expected, numel, got, tol, exact):
                at = f"{url} (DP engine {dp})" if several and dp is not None else url
                problems.append(
                    f"{at}: engine parameter {p!r} (from {', '.join(names)}) holds Σw={fmt(got[0])}, "
                    f"Σw²={fmt(got[1])}, Σbits={got[2]}; the sender sent Σw={fmt(expected[0])}, "
                    f"Σw²={fmt(expected[1])}, Σbits={expected[2]}"
                )
                break
    return problems


def copies(held_by: list[tuple[int, dict[str, Any]]], numel: int, row_sums: bool, mod: int) -> list[tuple[Any, Any]]:
    """A parameter's sums as each whole copy of it holds them, with the data-parallel engine it is in (None: all
    of them). A worker holding all of it (replicated, maybe padded) is a copy; parts cut over one engine's TP/EP
    workers add up to that engine's copy; parts cut over every engine's workers (vLLM shards MoE layers over DP
    x TP) add up to the one copy there is."""
    if all(h["numel"] >= numel for _, h in held_by):
        return [(dp, h["sums"]) for dp, h in held_by]
    engines: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for dp, h in held_by:
        engines[dp].append(h)
    if all(sum(h["numel"] for h in hs) >= numel for hs in engines.values()):
        return [(dp, parts_sum(hs, row_sums, mod)) for dp, hs in sorted(engines.items())]
    return [(None, parts_sum([h for _, h in held_by], row_sums, mod))]


def bits_agree(sent: dict[str, tuple[list[Any], int, str]], names: list[str], held: dict[str, Any]) -> bool:
    """Whether one worker's bit sum alone (it holds the whole parameter, in the dtype every piece was sent in, no
    piece splitting 2-byte pairs) equals the sender's: the check of almost every parameter of a GPU push. False
    also where that does not apply: the full check then decides."""
    got, dtype = held["sums"], held["dtype"]
    if got[0] is not None or any(sent[n][2] != dtype for n in names):
        return False
    width = getattr(torch, dtype).itemsize
    if held["numel"] < sum(sent[n][1] for n in names) or any(pairs_split(width, sent[n][1]) for n in names):
        return False
    return not pairs_split(width, held["numel"]) and got[2] == sum(sent[n][0][2] for n in names) % bits_mod(width)


def fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.9g}"


def parts_sum(held: list[dict[str, Any]], row_sums: bool, mod: int) -> list[Any]:
    """[Σw, Σw², Σbits] of a parameter cut over workers: the parts' sums added (None where not summed)."""

    def add(i: int) -> Any:
        return None if any(h["sums"][i] is None for h in held) else sum(h["sums"][i] for h in held)

    bits = add(2)
    return [add(0), None if row_sums else add(1), None if bits is None else bits % mod]


def float_checked(engines: Iterable[list[dict[str, Any]]]) -> set[str]:
    """The names some engine worker checked by float sums (it answered Σw for their parameter)."""
    return {
        n
        for workers in engines
        for w in workers
        for n, p in w["where"].items()
        if p in w["params"] and w["params"][p]["sums"][0] is not None
    }
