#!/usr/bin/env bash
# GPU check for one H100, under 8 minutes: SDXL-architecture UNet/VAE with random weights (no downloads) driven
# by the project's GoldenStep at 1024^2; see bench/README.md for what it prints.
# Usage:
#   bash bench/gpu_check.sh [bench/gpu_check.py flags]   # on the GPU machine, from a copy of the repo with .whl/
#   bash bench/gpu_check.sh --download-wheels            # beforehand, where PyPI is reachable: fills .whl/
#   bash bench/gpu_check.sh --help                       # this text; runs nothing (gpu_check.py's flags:
#                                                        # python bench/gpu_check.py --help)
#
# The GPU machine has torch but maybe not diffusers, and no network: when `import diffusers` fails, the wheels
# in .whl/ (diffusers and what it needs beyond torch) are installed with --no-index --no-deps into a private
# folder put on PYTHONPATH; packages the machine already has are used as they are (diffusers always from .whl/,
# the other wheels only where the machine lacks the package or has a version diffusers does not accept).
# Figures: stdout, and $OUT/gpu_check.json + gpu_check.log ($OUT defaults to results/).
source "$(dirname "${BASH_SOURCE[0]}")/../scripts/usage.sh"
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python}"
WHEELS="${GPU_CHECK_WHEELS:-$ROOT/.whl}"
SITE="${GPU_CHECK_SITE:-${TMPDIR:-/tmp}/gpu_check_site}"
OUT_DIR="${OUT:-$ROOT/results}"
LIMIT_S="${GPU_CHECK_LIMIT_S:-440}"   # hard stop of gpu_check.py; its own --time_budget_s (390) skips late sections first
# Tested versions (torch 2.14.1, Python 3.11). Binary wheels (numpy, pillow, pyyaml, charset_normalizer) are per Python
# version: set PIP_PYTHON_VERSION (e.g. 3.12) to download for the GPU machine's Python.
PACKAGES=(diffusers==0.42.1 huggingface_hub==2.4.0 safetensors==0.8.0 numpy==2.4.6 pillow==13.0.0 pyyaml==6.0.3
          requests==2.34.2 urllib3==2.7.0 idna==3.20 certifi==2026.5.20 packaging==26.2 tqdm==4.70.1
          charset_normalizer==3.4.7 httpx2==2.16.2 httpcore2==2.16.2 h11==0.16.0 truststore==0.10.5)
ALWAYS="diffusers"   # the rest of .whl/ only where the machine lacks it or its version breaks diffusers' requirement

if [[ "${1:-}" == "--download-wheels" ]]; then
    extra=()
    [[ -n "${PIP_PYTHON_VERSION:-}" ]] && extra=(--python-version "$PIP_PYTHON_VERSION" --platform manylinux2014_x86_64
                                                 --platform manylinux_2_28_x86_64)
    mkdir -p "$WHEELS"
    "$PY" -m pip download --no-deps --only-binary=:all: -d "$WHEELS" ${extra[@]+"${extra[@]}"} "${PACKAGES[@]}"
    echo "wheels in $WHEELS ($(du -sh "$WHEELS" | cut -f1)); carry that folder to the GPU machine"
    exit 0
fi

# true when the machine has distribution $1 in a version that satisfies the diffusers wheel's requirement on it
# (the machine's transformers may pin huggingface_hub below the wheel's: keep the machine's when diffusers accepts it)
have_dist() {
    "$PY" - "$1" "$WHEELS" <<'PYEOF' 2>/dev/null
import glob, importlib.metadata as m, re, sys, zipfile
name, wheels = sys.argv[1], sys.argv[2]
have = m.version(name)  # raises when missing
norm = lambda s: re.sub(r"[-_.]+", "-", s).lower()
for whl in glob.glob(f"{wheels}/diffusers-*.whl"):
    meta = zipfile.ZipFile(whl).read(next(n for n in zipfile.ZipFile(whl).namelist() if n.endswith("/METADATA")))
    from packaging.requirements import Requirement
    for line in meta.decode().splitlines():
        if line.startswith("Requires-Dist:") and "extra ==" not in line:
            req = Requirement(line.split(":", 1)[1].strip())
            if norm(req.name) == norm(name) and not req.specifier.contains(have, prereleases=True):
                sys.exit(1)
PYEOF
}

if "$PY" -c "import diffusers" 2>/dev/null; then
    echo "diffusers $("$PY" -c 'import diffusers; print(diffusers.__version__)') is installed: using it"
else
    shopt -s nullglob
    wheels=("$WHEELS"/*.whl)
    if (( ${#wheels[@]} == 0 )); then
        echo "error: diffusers is not installed and $WHEELS holds no wheels: run 'bash bench/gpu_check.sh" \
             "--download-wheels' where PyPI is reachable and bring .whl/ along" >&2
        exit 2
    fi
    todo=()
    for whl in "${wheels[@]}"; do
        name="$(basename "$whl" | cut -d- -f1)"
        if [[ " $ALWAYS " == *" $name "* ]] || ! have_dist "$name"; then todo+=("$whl"); fi
    done
    rm -rf "$SITE" && mkdir -p "$SITE"   # a fresh folder: wheels of an earlier run must not shadow the machine's packages
    echo "installing ${#todo[@]} wheel(s) from $WHEELS into $SITE: $(for w in "${todo[@]}"; do basename "$w" | cut -d- -f1-2; done | tr '\n' ' ')"
    if "$PY" -m pip --version >/dev/null 2>&1; then
        "$PY" -m pip install --quiet --no-index --no-deps --no-compile --disable-pip-version-check --target "$SITE" \
            "${todo[@]}" || { echo "error: pip could not install the wheels (built for another Python?" \
                              "see PIP_PYTHON_VERSION above)" >&2; exit 2; }
    else  # no pip: a wheel is a zip archive laid out for site-packages
        for whl in "${todo[@]}"; do "$PY" -m zipfile -e "$whl" "$SITE"; done
    fi
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    "$PY" -c "import diffusers" || { echo "error: diffusers still does not import from $SITE" >&2; exit 2; }
fi

if ! "$PY" -c "import golden_noise.model, golden_noise_toy" 2>/dev/null; then
    # not installed (`pip install -e .`): stage the project's packages as they install (model/ is golden_noise.model)
    PKG="${TMPDIR:-/tmp}/gpu_check_pkg"
    rm -rf "$PKG" && mkdir -p "$PKG"
    cp -r "$ROOT/src/golden_noise" "$ROOT/src/golden_noise_toy" "$PKG/"
    rm -rf "$PKG/golden_noise/model" && cp -r "$ROOT/model" "$PKG/golden_noise/model"
    export PYTHONPATH="$PKG${PYTHONPATH:+:$PYTHONPATH}"
fi
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
mkdir -p "$OUT_DIR"
status=0
timeout --signal=TERM --kill-after=10 "$LIMIT_S" "$PY" "$ROOT/bench/gpu_check.py" --json "$OUT_DIR/gpu_check.json" "$@" \
    2>&1 | tee "$OUT_DIR/gpu_check.log" || status=$?
(( status == 124 )) && echo "gpu_check.py hit the ${LIMIT_S}s limit: $OUT_DIR/gpu_check.json holds the sections it finished" >&2
exit "$status"
