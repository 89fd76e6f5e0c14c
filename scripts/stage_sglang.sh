#!/usr/bin/env bash
# Stage SGLang 0.5.17 for the GPU device machine (no package registry there) as a site of its own, /tmp/site_sgl.
#
#   bash scripts/stage_sglang.sh [OUTDIR]        OUTDIR defaults to .stage_sgl (listed in .git/info/exclude)
#
# Same mechanism as ../shared/device/stage.sh (read its header): resolve for CPython 3.12 manylinux x86-64 against
# stand-ins for torch/torchvision/torchaudio (the image has torch 2.11.0+cu130; 0.5.17 is the newest SGLang whose
# pins take torch 2.11), drop what the image already holds (device-packages.txt), download the rest and cut it into
# parts of at most 56 MiB: OUTDIR/p00, p01, ... each with recv.sh; the last part also carries install_sgl.sh.
#
# Why a site of its own: SGLang's exact pins clash with vLLM 0.26's in /tmp/site (flashinfer, apache-tvm-ffi,
# xgrammar, openai, numba, transformers), so SGLang is never installed over vLLM. Every wheel here goes with
# `pip install --no-deps --target /tmp/site_sgl`, and only the SGLang server sees it: vime starts that server with
# PYTHONPATH=$VIME_SGLANG_PYTHONPATH:<repo> (default /tmp/site_sgl, scripts/device_run.sh), which *replaces*
# /tmp/site, so this site must hold everything SGLang needs beyond the image itself; it does not rely on /tmp/site.
# Two packages the image holds are staged anyway, at SGLang's own pins: transformers==5.12.1 (the image has 5.17,
# and SGLang patches transformers' internals) and tokenizers==0.22.2 (transformers 5.12.1 refuses the image's 0.23.2).
#
# Trimmed, for size (the full set is about 1 GB): vime serves SGLang token-in through /generate with
# `--attention-backend triton --sampling-backend pytorch --disable-cuda-graph` on a dense model (configs/
# grpo_gpu_sglang.yaml, tests/test_engine_suite.py), and these are not imported on that path (read from the wheels'
# module-level imports from sglang.launch_server, http_server, scheduler, model_runner, triton_backend, models.qwen2;
# their own imports are lazy or in try/except):
#   - sglang-kernel: sgl_kernel/flash_ops.abi3.so (FlashAttention-3, 1.1 GB unpacked, 342 MB of the 383 MB wheel),
#     loaded only by sgl_kernel.flash_attn for the fa3 attention backend. Version left at 0.4.5 (SGLang checks it).
#   - xgrammar: xgrammar/lib/libxgrammar.a, a static C++ library for linking against (31 MB); Python loads
#     libxgrammar_bindings.so. xgrammar itself stays: the function-call parsers import it at startup.
#   - whole packages: nvidia-* (cutlass-dsl, cuda-nvcc/nvvm/crt/cccl, mathdx, cudnn-frontend; JIT toolchains of the
#     CuTe-DSL kernels), flash-attn-4, quack-kernels, tilelang, tokenspeed-*, humming-kernels, cuda-tile,
#     sgl-deep-gemm, z3-solver (other attention/MoE/GEMM backends); torchcodec (video); outlines, outlines-core,
#     llguidance and outlines' pycountry, airportsdata, diskcache, lark, nest-asyncio (grammar backends other than
#     the default xgrammar); modelscope, modelscope-hub, cryptography (only with SGLANG_USE_MODELSCOPE);
#     mistral-common, pydantic-extra-types (Mistral/Voxtral models); nccl4py (flashinfer.comm); kernels,
#     kernels-data, tomlkit (FA3 from the HF hub, needs a network).
# Result: about 150 MB, 3 parts. A backend trimmed here (e.g. --attention-backend fa3/flashinfer-with-cutlass,
# --grammar-backend outlines) fails when first used, not at startup.
#
# On the device: each part travels in its own `run` call (carry [OUTDIR/pKK]); the machine keeps /tmp only while
# warm (about 30 s after a call), so make the calls back to back (vLLM's .stage parts may come in the same series):
#   call k (every part):  bash OUTDIR/pKK/recv.sh                       (copies into /tmp/stage_sgl)
#   last call also:       bash OUTDIR/pNN/recv.sh && bash OUTDIR/pNN/install_sgl.sh && ... (e.g. with vLLM's
#                         install.sh too: VIME_SGLANG_PYTHONPATH=/tmp/site_sgl bash scripts/device_run.sh sglang)
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-.stage_sgl}
device_pkgs=${DEVICE_PACKAGES:-$repo/../shared/device/device-packages.txt}
[ -f "$device_pkgs" ] || { echo "stage_sglang.sh: no $device_pkgs (set DEVICE_PACKAGES)" >&2; exit 2; }
req='sglang==0.5.17'
# staged although the image holds them (see above)
over_image='^(transformers|tokenizers)$'
# stage.sh's optional kernels and CLIs, then SGLang's optional backends and extras (see above)
skip='^(tokenspeed-triton|tokenspeed-mla|tilelang|z3-solver|pynvvideocodec|torchcodec|quack-kernels|humming-kernels|cuda-tile|fastapi-cloud-cli|fastapi-cli|sentry-sdk|rignore|agent-detector|detect-installer|fastar|rich-toolkit'
skip+='|flash-attn-4|sgl-deep-gemm|outlines|outlines-core|llguidance|pycountry|airportsdata|diskcache|lark|nest-asyncio'
skip+='|modelscope|modelscope-hub|cryptography|mistral-common|pydantic-extra-types|nccl4py|kernels|kernels-data|tomlkit)$'
# members cut out of kept wheels: wheel-name prefix -> regular expression on the member's path
trims='sglang_kernel-=^sgl_kernel/flash_ops\.
xgrammar-=^xgrammar/lib/libxgrammar\.a$'

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
plat=(--python-version 3.12 --implementation cp --only-binary=:all: --platform any
      --platform manylinux1_x86_64 --platform manylinux2014_x86_64)
for n in 17 24 26 27 28 31 34 35; do plat+=(--platform "manylinux_2_${n}_x86_64"); done

mkdir -p "$work/stand-ins"
python3 - "$work/stand-ins" <<'PY'
import sys, zipfile
for name, ver in [("torch", "2.11.0+standin"), ("torchvision", "0.26.0+standin"), ("torchaudio", "2.11.0+standin")]:
    info = f"{name}-{ver}.dist-info"
    with zipfile.ZipFile(f"{sys.argv[1]}/{name}-{ver}-py3-none-any.whl", "w") as z:
        z.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {ver}\n")
        z.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: stage\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{info}/RECORD", "")
PY
echo "resolving $req for the device (a couple of minutes) ..."
python3 -m pip install -q --dry-run --ignore-installed --report "$work/report.json" --target "$work/t" "${plat[@]}" \
  --find-links "$work/stand-ins" "$req" \
  torch==2.11.0+standin torchvision==0.26.0+standin torchaudio==2.11.0+standin 2>&1 | grep -v 'is ignored' || true
[ -s "$work/report.json" ] || { echo "stage_sglang.sh: resolution failed" >&2; exit 1; }

python3 - "$work/report.json" "$device_pkgs" "$skip" "$over_image" > "$work/need.txt" <<'PY'
import json, re, sys
norm = lambda s: re.sub(r"[-_.]+", "-", s.lower())
have = {norm(l.strip()) for l in open(sys.argv[2]) if l.strip() and not l.startswith("#")}
skip, over = re.compile(sys.argv[3]), re.compile(sys.argv[4])
dropped = {"image": [], "nvidia": [], "skip": []}
for item in json.load(open(sys.argv[1]))["install"]:
    name, ver = item["metadata"]["name"], item["metadata"]["version"]
    n = norm(name)
    if "standin" in ver:
        continue
    why = ("image" if n in have and not over.match(n) else "nvidia" if n.startswith("nvidia-")
           else "skip" if skip.match(n) else None)
    if why:
        dropped[why].append(f"{name}=={ver}")
    else:
        print(f"{name}=={ver}")
for why, names in dropped.items():
    print(f"not staged ({why}, {len(names)}): {' '.join(sorted(names, key=str.lower))}", file=sys.stderr)
PY
need=$(wc -l < "$work/need.txt")
echo "downloading $need wheels ..."
mkdir -p "$work/wheels"
python3 -m pip download -q --no-deps "${plat[@]}" -d "$work/wheels" -r "$work/need.txt" 2>&1 | grep -v 'is ignored' || true
got=$(ls "$work/wheels" | wc -l)
[ "$got" -eq "$need" ] || { echo "stage_sglang.sh: downloaded $got of $need wheels" >&2; exit 1; }

echo "trimming ..."
python3 - "$work/wheels" "$trims" <<'PY'
import os, re, sys, zipfile
d = sys.argv[1]
for rule in sys.argv[2].splitlines():
    prefix, pat = rule.split("=", 1)
    rx = re.compile(pat)
    wheels = [f for f in os.listdir(d) if f.startswith(prefix) and f.endswith(".whl")]
    if len(wheels) != 1:
        sys.exit(f"stage_sglang.sh: expected one {prefix}*.whl, found {wheels}")
    src = os.path.join(d, wheels[0])
    tmp, cut, before = src + ".tmp", [], os.path.getsize(src)
    with zipfile.ZipFile(src) as zi, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zo:
        for info in zi.infolist():
            if rx.search(info.filename):
                cut.append(info.filename)
                continue
            data = zi.read(info)
            if info.filename.endswith(".dist-info/RECORD"):  # its hashes must list only what is there
                data = "".join(l for l in data.decode().splitlines(True) if not rx.search(l.split(",")[0])).encode()
            zo.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED)
    if not cut:  # the wheel's layout changed: say so rather than stage it untrimmed
        sys.exit(f"stage_sglang.sh: nothing in {wheels[0]} matches {pat}")
    os.replace(tmp, src)
    print(f"  {wheels[0]}: cut {', '.join(cut)} ({before / 1e6:.0f} -> {os.path.getsize(src) / 1e6:.0f} MB)")
PY

rm -rf "$out"; mkdir -p "$out"
tar -C "$work/wheels" -cf - . | split -b 56m -d -a 2 - "$out/blob."
parts=$(ls "$out"/blob.* | wc -l)
sum=$(cat "$out"/blob.* | sha256sum | cut -d' ' -f1)
i=0
for blob in "$out"/blob.*; do
  part=$(printf '%s/p%02d' "$out" "$i"); mkdir -p "$part"; mv "$blob" "$part/"
  printf '#!/usr/bin/env bash\n# Copy this part of SGLang to /tmp/stage_sgl on the device.\nmkdir -p /tmp/stage_sgl && cp "$(dirname "$0")"/blob.* /tmp/stage_sgl/ && echo "sglang part %02d of %d received"\n' \
    "$i" "$parts" > "$part/recv.sh"
  i=$((i + 1))
done
cat > "$part/install_sgl.sh" <<EOF
#!/usr/bin/env bash
# On the device, after every part's recv.sh: join the SGLang parts in /tmp/stage_sgl and install the wheels into
# /tmp/site_sgl, SGLang's own site (its pins clash with vLLM's /tmp/site). Only the SGLang server uses it:
# PYTHONPATH=/tmp/site_sgl:<repo>, which vime sets from VIME_SGLANG_PYTHONPATH=/tmp/site_sgl.
set -euo pipefail
parts=$parts sum=$sum
EOF
cat >> "$part/install_sgl.sh" <<'EOF'
[ -d /tmp/site_sgl ] && [ -f /tmp/stage_sgl/.installed ] && { echo "already installed in /tmp/site_sgl"; exit 0; }
missing=$(for ((k = 0; k < parts; k++)); do b=$(printf 'blob.%02d' "$k"); [ -f "/tmp/stage_sgl/$b" ] || printf ' p%02d' "$k"; done)
[ -z "$missing" ] || { echo "install_sgl.sh: parts missing in /tmp/stage_sgl:$missing (send every part back to back: /tmp lasts only while the machine is warm)" >&2; exit 1; }
[ "$(cat /tmp/stage_sgl/blob.* | sha256sum | cut -d' ' -f1)" = "$sum" ] || { echo "install_sgl.sh: the joined parts' sha256 is not the staged one" >&2; exit 1; }
rm -rf /tmp/stage_sgl/wheels; mkdir -p /tmp/stage_sgl/wheels
cat /tmp/stage_sgl/blob.* | tar -C /tmp/stage_sgl/wheels -xf -
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site_sgl /tmp/stage_sgl/wheels/*.whl
touch /tmp/stage_sgl/.installed
echo "installed $(ls /tmp/stage_sgl/wheels | wc -l) wheels into /tmp/site_sgl (FA3 kernels of sglang-kernel trimmed: use --attention-backend triton):"
ls /tmp/stage_sgl/wheels | awk -F- '{printf "%s==%s ", $1, $2} END {print ""}'
PYTHONPATH=/tmp/site_sgl python3 - <<'PY' || true
from importlib.metadata import distribution, PackageNotFoundError
print("as the SGLang server sees them (PYTHONPATH=/tmp/site_sgl):")
for n in ("sglang", "sglang-kernel", "transformers", "tokenizers", "flashinfer-python", "xgrammar", "torch", "triton"):
    try:
        d = distribution(n)
        print(f"  {n} {d.version}  ({d.locate_file('')})")
    except PackageNotFoundError:
        print(f"  {n} MISSING")
PY
EOF
chmod +x "$out"/p*/*.sh
echo "$parts parts in $out ($(du -sh "$out" | cut -f1)); wheels: $got"
ls -l "$out"/p*/blob.* | awk '{printf "  %s %.1f MiB\n", $9, $5 / 1048576}'
last=$(printf 'p%02d' $((parts - 1)))
echo "device calls, back to back: for each part k, carry [$out/pKK] and run 'bash $out/pKK/recv.sh';" \
  "in the last, 'bash $out/$last/recv.sh && bash $out/$last/install_sgl.sh', then VIME_SGLANG_PYTHONPATH=/tmp/site_sgl"
