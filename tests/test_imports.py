"""`vime/` is contracts and orchestration: importing all of it must not pull in an engine or trainer."""

import pkgutil
import subprocess
import sys

import vime


def test_vime_imports_no_engine_or_trainer():
    mods = [m.name for m in pkgutil.walk_packages(vime.__path__, "vime.")]
    code = (
        "import importlib, sys\n"
        f"for m in {mods!r}: importlib.import_module(m)\n"
        "bad = sorted({k.split('.')[0] for k in sys.modules} & {'vllm', 'sglang', 'megatron', 'engines', "
        "'trainers'})\n"
        "print(','.join(bad))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "", f"vime imports {r.stdout.strip()}"
    assert len(mods) > 10
