import pytest

from vime.registry import ENGINES, PluginError, load_callable, load_object
from vime.rewards import get_reward_fn


def test_load_object_ok():
    assert load_object("vime.rewards.math:math_reward").__name__ == "math_reward"


@pytest.mark.parametrize(
    "path, needle",
    [
        ("vime.rewards.math", "package.module:name"),
        ("vime.no_such_module:fn", "cannot import module 'vime.no_such_module'"),
        ("vime.rewards.math:no_such_fn", "has no attribute 'no_such_fn'"),
    ],
)
def test_bad_plugin_path_names_the_path(path, needle):
    with pytest.raises(PluginError) as e:
        load_object(path)
    assert path in str(e.value) and needle in str(e.value)


def test_wrong_signature_is_reported():
    with pytest.raises(PluginError, match="must accept 2 positional"):
        load_callable("vime.rewards.math:math_reward", 2, what="rollout function")


def test_reward_lookup_errors():
    with pytest.raises(ValueError, match="unknown reward 'nope'"):
        get_reward_fn("nope")
    with pytest.raises(PluginError, match="my_pkg.rewards:score"):
        get_reward_fn("my_pkg.rewards:score")


def test_unknown_engine_name():
    with pytest.raises(PluginError, match="unknown engine 'tgi'.*vllm"):
        ENGINES.get("tgi")
