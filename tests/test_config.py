import subprocess
import sys
from pathlib import Path

import pytest

from engines.vllm.server import to_cli_flags
from vime.cli import split_engine_flags
from vime.config import ConfigError, load_config

RECIPE = """
model: {path: m}
data: {path: d.jsonl}
rollout: {n_samples: 4}
"""


def write(tmp_path, text):
    p = tmp_path / "recipe.yaml"
    p.write_text(text)
    return p


def test_unknown_key_names_key_file_and_allowed_keys(tmp_path):
    p = write(tmp_path, RECIPE.replace("n_samples: 4", "n_sample: 4"))
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert "rollout.n_sample" in msg and str(p) in msg and "n_samples" in msg and "batch_size" in msg


def test_ill_typed_value_names_key(tmp_path):
    p = write(tmp_path, RECIPE.replace("n_samples: 4", "n_samples: lots"))
    with pytest.raises(ConfigError, match=r"rollout\.n_samples.*recipe\.yaml"):
        load_config(p)


def test_unknown_top_level_section(tmp_path):
    with pytest.raises(
        ConfigError,
        match="unknown key 'trainr'.*allowed here: algorithm, critic, data, engine, gateway, loop, model.*trainer, "
        "weights",
    ):
        load_config(write(tmp_path, RECIPE + "trainr: {}\n"))


def test_set_overrides_and_names_the_flag_on_error(tmp_path):
    p = write(tmp_path, RECIPE)
    cfg = load_config(p, ["rollout.n_samples=8", "engine.args.max_num_seqs=64"])
    assert cfg.rollout.n_samples == 8 and cfg.engine.args == {"max_num_seqs": 64}
    with pytest.raises(ConfigError, match=r"--set rollout.temperature=hot"):
        load_config(p, ["rollout.temperature=hot"])


def test_missing_recipe_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_engine_flags_pass_through_verbatim(tmp_path):
    argv, flags = split_engine_flags(
        [
            "rollout",
            "-c",
            "r.yaml",
            "--vllm-max-num-seqs",
            "64",
            "--vllm-enforce-eager",
            "--vllm-logprobs-mode=processed_logprobs",
        ]
    )
    assert argv == ["rollout", "-c", "r.yaml"]
    cfg = load_config(write(tmp_path, RECIPE), engine_args=flags)
    assert to_cli_flags(cfg.engine.args) == [
        "--max-num-seqs",
        "64",
        "--enforce-eager",
        "--logprobs-mode",
        "processed_logprobs",
    ]
    assert to_cli_flags({"weight_transfer_config": {"backend": "gloo"}, "x": False, "y": [1, 2]}) == [
        "--weight-transfer-config",
        '{"backend": "gloo"}',
        "--no-x",
        "--y",
        "1",
        "2",
    ]


def test_cli_bad_key_exits_before_starting_anything(tmp_path):
    p = write(tmp_path, RECIPE.replace("rollout:", "rolout:"))
    r = subprocess.run(
        [sys.executable, "-m", "vime.cli", "rollout", "-c", str(p)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert r.returncode == 2
    assert "unknown key 'rolout'" in r.stderr and str(p) in r.stderr


def test_weights_backend_must_fit_placement(tmp_path):
    """ipc maps the trainer's GPU buffer into the engine (same GPU); nccl cannot link two processes on one GPU."""
    p = write(tmp_path, RECIPE)
    with pytest.raises(ConfigError, match="ipc .*placement.colocate: true") as e:
        load_config(p, ["weights.backend=ipc"])
    assert str(p) in str(e.value)
    with pytest.raises(ConfigError, match="nccl cannot link"):
        load_config(p, ["weights.backend=nccl", "placement.colocate=true"])
    assert load_config(p, ["weights.backend=ipc", "placement.colocate=true"]).weights.backend == "ipc"
    assert load_config(p, ["weights.backend=nccl"]).weights.backend == "nccl"


def test_gpu_recipes_load():
    root = Path(__file__).resolve().parents[1] / "configs"
    gpu = load_config(root / "grpo_gpu.yaml")
    assert (gpu.weights.backend, gpu.placement.colocate, gpu.trainer.dtype) == ("ipc", True, "bfloat16")
    split = load_config(root / "grpo_2gpu_nccl.yaml")
    assert (split.weights.backend, split.placement.colocate) == ("nccl", False)


def test_engine_section_is_checked_against_the_engines_schema(tmp_path):
    """`engine:` keys come from the engine's own spec (engines/vllm/config.py), with the same error shape."""
    p = write(tmp_path, RECIPE + "engine: {name: vllm, topology: pd, kv_conector: nixl}\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert "unknown key 'engine.kv_conector'" in msg and str(p) in msg and "kv_connector" in msg and "topology" in msg
    with pytest.raises(ConfigError, match="'colocated_pd' is now called 'aggregated'"):
        load_config(p, ["engine.topology=colocated_pd", "engine.kv_conector=null"])
    assert load_config(write(tmp_path, RECIPE + "engine: {topology: pd}\n")).engine.num_servers == 2


def test_unknown_engine_name_lists_registered_engines(tmp_path):
    with pytest.raises(
        ConfigError, match=r"engine\.name.*unknown engine 'tgi'.*\['sglang', 'vllm'\].*package\.module:name"
    ):
        load_config(write(tmp_path, RECIPE), ["engine.name=tgi"])


def test_sglang_recipe_errors_name_the_keys(tmp_path):
    """The SGLang engine's schema and rules: vLLM's topology is not its key, and a pause mode SGLang lacks is
    refused at load, naming the key."""
    with pytest.raises(ConfigError, match=r"unknown key 'engine.topology'"):
        load_config(write(tmp_path, RECIPE + "engine: {name: sglang, topology: pd}\n"))
    with pytest.raises(ConfigError, match=r"weights.pause_mode=wait: SGLang pauses in place"):
        load_config(write(tmp_path, RECIPE + "engine: {name: sglang}\n"), ["weights.pause_mode=wait"])
    with pytest.raises(ConfigError, match=r"engine.args.tp_size=2: vime's SGLang weight channel"):
        load_config(write(tmp_path, RECIPE + "engine: {name: sglang, args: {tp_size: 2}}\n"))
    cfg = load_config(write(tmp_path, RECIPE + "engine: {name: sglang, args: {mem_fraction_static: 0.3}}\n"))
    assert type(cfg.engine).__name__ == "SGLangEngineConfig" and cfg.engine.args == {"mem_fraction_static": 0.3}


def test_weights_backend_must_be_one_the_engine_offers(tmp_path):
    with pytest.raises(ConfigError, match=r"weights\.backend='shm' is not offered by engine 'vllm'.*gloo.*disk"):
        load_config(write(tmp_path, RECIPE), ["weights.backend=shm"])


def test_unknown_trainer_args_fail_at_load(tmp_path):
    """Megatron's own dataclasses decide: a field of either passes, anything else fails before a process starts."""
    p = write(tmp_path, RECIPE)
    with pytest.raises(ConfigError) as e:
        load_config(p, ["trainer.args={num_layerz: 2, adam_eps: 1.0e-8}"])
    msg = str(e.value)
    assert "trainer.args.num_layerz" in msg and "TransformerConfig" in msg and str(p) in msg
    assert "adam_eps" not in msg.split("trainer.args.num_layerz", maxsplit=1)[0]  # the valid key is not reported
    cfg = load_config(p, ["trainer.args={recompute_granularity: full, adam_eps: 1.0e-8}"])
    assert cfg.trainer.args == {"recompute_granularity": "full", "adam_eps": 1e-8}


def test_cli_rejects_flags_for_another_engine(tmp_path, monkeypatch):
    from vime import cli
    from vime.registry import ENGINES

    monkeypatch.setitem(ENGINES._entries, "sglang", "engines.sglang.engine_spec:SPEC")  # a second registered name
    argv = ["rollout", "-c", str(write(tmp_path, RECIPE)), "--sglang-mem-fraction-static", "0.5"]
    assert cli.engine_flag_owners(argv) == {"sglang"}
    assert cli.split_engine_flags(argv)[1] == {"mem-fraction-static": 0.5}
    assert cli.main(argv) == 2
