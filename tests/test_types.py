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
