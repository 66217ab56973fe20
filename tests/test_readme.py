"""What the README shows a newcomer runs as shown: its Python API example (on the tiny offline pipeline, with no
deprecation or future warning) and its statements about the quickstart's data."""
from __future__ import annotations

import re
import warnings

from tests.conftest import ROOT
from tests.test_inference import make_export

README = (ROOT / "README.md").read_text(encoding="utf-8")


def test_the_python_api_example_runs_without_warnings(tiny_pipeline, tiny_pipeline_dir, tmp_path):
    """Issue 21 item 6: the README's API example (its hub id, export path and CUDA device swapped for the tiny
    offline pipeline, a tiny export and the CPU) runs with every FutureWarning and DeprecationWarning an error:
    diffusers' `torch_dtype` FutureWarning is gone from the API path."""
    block = README.split("## Python API", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    export = make_export(tmp_path / "run" / "rnn_v3_model_final", tiny_pipeline, tiny_pipeline_dir)
    code = (block.replace("stabilityai/stable-diffusion-xl-base-1.0", str(tiny_pipeline_dir))
            .replace("output/rnn_v3_seq_model_output/rnn_v3_model_final", str(export))
            .replace('dtype="float16", device="cuda"', 'dtype="float32", device="cpu"')
            .replace('"golden.png"', repr(str(tmp_path / "golden.png"))))
    assert code.count(str(tiny_pipeline_dir)) == 1 and 'device="cpu"' in code and "torch_dtype" not in code
    code = code.replace("latents=gn(prompt, seed=12345))", "latents=gn(prompt, seed=12345), num_inference_steps=3)")
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        warnings.simplefilter("error", DeprecationWarning)
        exec(compile(code, "README.md (Python API)", "exec"), {})
    assert (tmp_path / "golden.png").stat().st_size > 0


def test_the_quickstart_numbers_say_what_the_rnn_trained_on():
    """Issue 21 item 7: 26,400 sequences are made, 2,640 held out for validation, 23,760 trained on."""
    assert "trained on 26,400" not in README and "is trained on 23,760\nsequences" in README
    assert re.search(r"26,400 = 264 captions × 100 seeds; 2,640 of them are held out", README)
    layout = README.split("## Layout", 1)[1].split("```", 2)[1]
    data_line = next(line for line in layout.splitlines() if line.startswith("data/"))
    assert "empty in the repository" in data_line  # it ships no prompt files (.gitignore keeps data/ out of git)
