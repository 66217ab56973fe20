"""README command 1 end to end: all six stages on the committed toy world (QUICK sizes)."""
from __future__ import annotations

import json
import os
import shutil

import pytest

from tests.conftest import ROOT, run_with_progress


@pytest.mark.slow
def test_quickstart_runs_all_six_stages_and_prints_the_table(progress):
    """QUICK=1: 2-3 minutes on 2 cores; each stage's line is shown as it starts. The run's folders are removed
    afterwards, and so is inference_output/ when this test made it (the repository does not ship it)."""
    run = "pytest_quickstart"
    env = {**os.environ, "QUICK": "1", "SKIP_INSTALL": "1", "RUN": run, "OMP_NUM_THREADS": "1"}
    made_images_root = not (ROOT / "inference_output").exists()
    try:
        proc = run_with_progress(["bash", "scripts/quickstart.sh"], progress, timeout=3600, env=env)
        assert proc.returncode == 0, proc.stdout[-6000:]
        out = proc.stdout
        for stage in ("1/6 prompts", "2/6 golden-noise sequences", "3/6 train", "4-5/6 batch inference", "6/6 evaluate"):
            assert stage in out
        assert "gain vs standard [95% CI]" in out and "share of oracle gain" in out
        results = ROOT / "results" / f"{run}_quick"
        report = [line.split(": ", 1)[1] for line in out.splitlines() if line.startswith("HTML report: ")]
        assert report == [f"results/{run}_quick/report.html"] and (ROOT / report[0]).is_file()
        facts = json.loads((results / "quickstart.json").read_text())
        # the printed table is the evaluation's numbers: each method's row shows its mean and gain
        for method in ("gnsnet", "oracle"):
            m = facts["methods"][method]
            row = next(line for line in out.splitlines() if line.startswith(method + " "))
            assert f"{m['mean']:.4f}" in row and f"{m['diff_mean']:+.4f} [{m['ci95_low']:+.4f}, {m['ci95_high']:+.4f}]" \
                in row
        assert set(facts["methods"]) == {"standard", "gnsnet", "oracle"}
        assert facts["methods"]["oracle"]["n"] == facts["methods"]["gnsnet"]["n"] > 0
        assert (results / "grid.png").is_file() and (results / "report.html").is_file()
    finally:
        for part in ("data", "output", "inference_output", "results"):
            shutil.rmtree(ROOT / part / f"{run}_quick", ignore_errors=True)
        if made_images_root and (ROOT / "inference_output").is_dir() and not any((ROOT / "inference_output").iterdir()):
            (ROOT / "inference_output").rmdir()
