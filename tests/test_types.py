import pytest

from vime.types import Completion, Sample, Status, read_jsonl, write_jsonl


def test_sample_jsonl_roundtrip(tmp_path):
    s = Sample(
        prompt_ids=[1, 2],
        response_ids=[3, 4, 5],
        logprobs=[-0.1, -0.2, -0.3],
        loss_mask=[1, 0, 1],
        reward=1.0,
        status="truncated",
        weight_versions=["v1", "v1", "v2"],
        group_id="g",
        index=2,
        prompt="p",
        label="7",
        response="abc",
        metadata={"seed": 3},
    )
    write_jsonl([s, s], tmp_path / "s.jsonl")
    back = list(read_jsonl(tmp_path / "s.jsonl"))
    assert back == [s, s]
    assert back[0].status is Status.TRUNCATED


def test_sample_rejects_misaligned_fields():
    with pytest.raises(ValueError, match="logprobs has 1 entries for 2"):
        Sample(prompt_ids=[1], response_ids=[2, 3], logprobs=[-1.0])
    with pytest.raises(ValueError, match="weight_versions"):
        Sample(prompt_ids=[1], response_ids=[2], logprobs=[-1.0], weight_versions=["a", "b"])


def test_default_loss_mask_and_status_from_completion():
    c = Completion(token_ids=[5, 6], logprobs=[-1.0, -2.0], finish_reason="length")
    s = Sample.from_completion([1], c)
    assert s.loss_mask == [1, 1] and s.status is Status.TRUNCATED
    assert Completion([1], [0.0], "abort").status is Status.ABORTED
    assert Completion([1], [0.0], "stop").status is Status.COMPLETED


def test_routed_experts_are_one_int16_array_that_survives_json_ray_and_the_trainer_batch(tmp_path):
    """An MoE sample's routes are held as one int16 [position, layer, k] array (nested lists cost 8x the memory
    at DeepSeek-V3's shape), written to JSON losslessly, and turned into the trainer's [b, s, layers, k] tensor
    alike whether a sample came with an array or lists; a wrong shape or id is refused naming the field."""
    import pickle

    import numpy as np
    import torch

    from trainers.megatron.batching import engine_routes

    lists = [[[1, 2], [0, 3]], [[4, 5], [6, -1]], [[7, 0], [1, 1]]]  # 3 positions, 2 layers, top-2
    s = Sample(prompt_ids=[1, 2], response_ids=[3, 4], logprobs=[-0.1, -0.2], routed_experts=lists)
    assert isinstance(s.routed_experts, np.ndarray) and s.routed_experts.dtype == np.int16
    assert s.routed_experts.tolist() == lists
    write_jsonl([s], tmp_path / "s.jsonl")
    (back,) = read_jsonl(tmp_path / "s.jsonl")
    assert back.routed_experts.dtype == np.int16 and back.routed_experts.tolist() == lists
    assert pickle.loads(pickle.dumps(s)).routed_experts.tolist() == lists  # Ray's path to the trainer

    rows = [{"routed_experts": s.routed_experts}, {"routed_experts": lists[:2]}, {"routed_experts": None}]
    t = engine_routes(rows, 4)
    assert t.shape == (3, 4, 2, 2) and t.dtype == torch.int16
    assert t[0, :3].tolist() == lists and t[1, :2].tolist() == lists[:2]
    assert (t[0, 3] == -1).all() and (t[1, 2:] == -1).all() and (t[2] == -1).all()  # routed live
    assert engine_routes([{"routed_experts": None}], 4) is None

    with pytest.raises(ValueError, match=r"Sample.routed_experts must be expert ids \[position\]\[layer\]\[k\]"):
        Sample(prompt_ids=[1, 2], response_ids=[3], logprobs=[0.0], routed_experts=[[1, 2], [3, 4]])
    with pytest.raises(ValueError, match="Sample.routed_experts covers 1 positions, not 2"):
        Sample(prompt_ids=[1, 2], response_ids=[3], logprobs=[0.0], routed_experts=[[[1]]])
    with pytest.raises(ValueError, match="Completion.routed_experts"):
        Completion([1], [0.0], "stop", routed_experts=[[[40000]]])
