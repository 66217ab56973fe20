"""The shared core: prompt files, atomic writes, pipeline loading, conditioning, CFG and the golden step."""
from __future__ import annotations

import hashlib
import math
import os
import re
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from golden_noise.diffusion import (Conditioning, ModelCounter, SDXLFamily, encode_prompts, family_of, latent_shape,
                                    load_pipeline, seeded_noise)
from golden_noise.golden import GoldenConfig, GoldenStep, golden_step
from golden_noise.errors import UserError
from golden_noise.io import atomic_path, atomic_torch_save
from golden_noise.prompts import read_prompts
from golden_noise.diffusion import sdxl_scheduler_config
from tests.conftest import ROOT


# ---------------------------------------------------------------- process exit
@pytest.mark.parametrize("skip_teardown", [False, True])
def test_exit_cli_flushes_and_keeps_the_code(skip_teardown):
    """exit_cli's teardown-free exit (used after multi-process CPU training) still delivers buffered output."""
    code = ("import logging, sys; from golden_noise.runtime import exit_cli; "
            "logging.basicConfig(stream=sys.stderr, format='%(message)s'); "
            "print('stdout line'); logging.getLogger('t').warning('log line'); "
            f"exit_cli(3, skip_teardown={skip_teardown}); print('not reached')")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # stdout block-buffered, as in a pipe
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 3
    assert proc.stdout == "stdout line\n" and proc.stderr == "log line\n"


# ---------------------------------------------------------------- prompt files and atomic writes
def test_read_prompts_txt_keeps_line_numbers(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("a red  circle\n\n   \n\tblue\tsquare \nlast", encoding="utf-8")
    got = [(p.index, p.text) for p in read_prompts(f)]
    assert got == [(0, "a red circle"), (3, "blue square"), (4, "last")]


def test_read_prompts_csv_column(tmp_path):
    f = tmp_path / "p.csv"
    f.write_text("id,caption,other\n1,first one,x\n2,,y\n3,\"third, quoted\",z\n", encoding="utf-8")
    assert [(p.index, p.text) for p in read_prompts(f)] == [(0, "first one"), (2, "third, quoted")]
    with pytest.raises(UserError, match="no column 'prompt_text'.*caption"):
        read_prompts(f, "prompt_text")


def test_read_prompts_bad_inputs(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        read_prompts(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("\n \n", encoding="utf-8")
    with pytest.raises(UserError, match="holds no prompts"):
        read_prompts(tmp_path / "empty.txt")
    (tmp_path / "bad.txt").write_bytes(b"fine\nalso fine\nbad \xff byte\n")
    with pytest.raises(UserError, match=r"line 3 is not valid UTF-8"):
        read_prompts(tmp_path / "bad.txt")


def test_atomic_path_leaves_nothing_on_error(tmp_path):
    target = tmp_path / "out.bin"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"partial")
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []


def test_atomic_torch_save_is_byte_deterministic(tmp_path):
    t = torch.arange(12, dtype=torch.float16).reshape(3, 4)
    atomic_torch_save(t, tmp_path / "a.pt")
    atomic_torch_save(t.clone(), tmp_path / "b.pt")
    digest = [hashlib.sha256((tmp_path / n).read_bytes()).hexdigest() for n in ("a.pt", "b.pt")]
    assert digest[0] == digest[1]
    assert torch.equal(torch.load(tmp_path / "a.pt", weights_only=True), t)


# ---------------------------------------------------------------- pipeline loading and conditioning
def test_load_pipeline_errors(tmp_path, monkeypatch):
    with pytest.raises(UserError, match="model_index.json missing"):
        load_pipeline(str(tmp_path / "nope"), device="cpu")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="HF_HUB_OFFLINE"):
        load_pipeline("no-such-org/no-such-model", device="cpu")


def test_encode_prompts_shapes(tiny_pipeline):
    cond = encode_prompts(tiny_pipeline, ["a red circle", "a blue square"])
    assert cond.cond_embeds.shape == (2, 77, 64)      # two text encoders of width 32, concatenated
    assert cond.cond_pooled.shape == (2, 32)          # text_encoder_2's projection
    assert cond.time_ids.tolist()[0] == [16, 16, 0, 0, 16, 16]
    # force_zeros_for_empty_prompt: no negative prompt -> zero unconditional embeddings, as SDXL does
    assert cond.uncond_embeds.abs().sum() == 0 and cond.uncond_pooled.abs().sum() == 0
    assert not torch.allclose(cond.cond_pooled[0], cond.cond_pooled[1])
    neg = encode_prompts(tiny_pipeline, ["a red circle"], negative_prompt="blurry")
    assert neg.uncond_embeds.abs().sum() > 0


def test_seeded_noise_depends_on_seed_only(tiny_pipeline):
    shape = latent_shape(tiny_pipeline)
    assert shape == (4, 16, 16)
    batch = seeded_noise([7, 8, 9], shape)
    assert torch.equal(batch[1], seeded_noise([8], shape)[0])
    assert torch.equal(batch[2], torch.randn(shape, generator=torch.Generator().manual_seed(9)))
    assert abs(batch.std().item() - 1) < 0.1


# ---------------------------------------------------------------- CFG and the golden step
def test_guided_prediction_branches_and_guidance(tiny_pipeline):
    predict = family_of(tiny_pipeline).predict
    cond = encode_prompts(tiny_pipeline, ["a red circle", "a blue square"])
    x = seeded_noise([0, 1], latent_shape(tiny_pipeline))
    counter = ModelCounter()
    eps_c = predict(x, 901, cond, 1.0, counter)
    assert (counter.calls, counter.rows) == (1, 2)
    eps_u = predict(x, 901, cond, 0.0, counter)
    assert (counter.calls, counter.rows) == (2, 4)
    eps = predict(x, 901, cond, 5.5, counter)
    assert (counter.calls, counter.rows) == (3, 8)  # both branches in ONE call of batch 2B
    torch.testing.assert_close(eps, eps_u + 5.5 * (eps_c - eps_u), atol=1e-5, rtol=1e-5)


def _alphas(config):
    from diffusers import DDIMScheduler

    return DDIMScheduler(**config).alphas_cumprod.double()


def test_golden_step_matches_closed_form_with_the_real_unet(tiny_pipeline):
    """x' = x - c (eps_l - eps_w), eps_l at (x, t0) with w_l, eps_w at (x_prev, t0) with w_w (DESIGN.md)."""
    pipe = tiny_pipeline
    step = golden_step(pipe, GoldenConfig(10, 5.5, 1.0))
    assert (step.t0, step.t_prev) == (901, 801)
    a = _alphas(sdxl_scheduler_config())
    a_t, a_p = a[901].item(), a[801].item()
    cond = encode_prompts(pipe, ["a small red circle", "a big blue square"])
    x = seeded_noise([3, 4], latent_shape(pipe))
    eps_l = family_of(pipe).predict(x, 901, cond, 5.5)
    x0 = (x - math.sqrt(1 - a_t) * eps_l) / math.sqrt(a_t)
    x_prev = math.sqrt(a_p) * x0 + math.sqrt(1 - a_p) * eps_l
    eps_w = family_of(pipe).predict(x_prev, 901, cond, 1.0)
    c = math.sqrt(1 - a_t) - math.sqrt(a_t / a_p) * math.sqrt(1 - a_p)
    assert step.coefficient == pytest.approx(c, rel=1e-6)
    torch.testing.assert_close(step(x, cond), x - c * (eps_l - eps_w), atol=2e-5, rtol=1e-5)
    assert step.counter.rows == 3 * 2  # w_w = 1: one branch for the inversion


class ControlledUNet(torch.nn.Module):
    """eps = a * x + b * (mean of the text embedding): a UNet stand-in whose epsilon we control exactly."""

    dtype = torch.float32

    def forward(self, x, t, encoder_hidden_states, added_cond_kwargs=None, return_dict=False):
        bias = encoder_hidden_states.mean(dim=(1, 2)).view(-1, 1, 1, 1)
        return (0.3 * x + 2.0 * bias,)


def controlled_predict():
    """The SDXL family's guided prediction with ControlledUNet as its UNet."""
    return SDXLFamily(SimpleNamespace(unet=ControlledUNet())).predict


@pytest.mark.parametrize("w_l,w_w,evals", [(5.5, 1.0, 3), (5.5, 0.0, 3), (7.0, 2.0, 4)])
def test_golden_step_closed_form_with_controlled_epsilon(w_l, w_w, evals):
    config = sdxl_scheduler_config()
    step = GoldenStep(controlled_predict(), config, GoldenConfig(10, w_l, w_w))
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    cond = Conditioning(cond_embeds=torch.full((2, 77, 8), 0.5), uncond_embeds=torch.zeros(2, 77, 8))

    def eps(z, w):  # eps_u + w (eps_c - eps_u) with eps_u = 0.3 z, eps_c = 0.3 z + 2 * 0.5
        return 0.3 * z + w * 1.0

    a = _alphas(config)
    a_t, a_p = a[901].item(), a[801].item()
    e_l = eps(x, w_l)
    x_prev = math.sqrt(a_p) * (x - math.sqrt(1 - a_t) * e_l) / math.sqrt(a_t) + math.sqrt(1 - a_p) * e_l
    expected = x - step.coefficient * (e_l - eps(x_prev, w_w))
    torch.testing.assert_close(step(x, cond), expected, atol=1e-5, rtol=1e-5)
    assert step.counter.rows == evals * 2


def test_golden_perturbation_size_is_guarded(tiny_pipeline):
    """The original code used a 1000-step schedule: golden noises 64x too close to the source."""
    pipe = tiny_pipeline
    # SDXL's steps_offset=1 puts t0 of a 1000-step schedule at 1000, past the table: the original code's
    # 1000-step schedule had t0 = 999, as with steps_offset=0.
    with pytest.raises(UserError, match="--schedule_steps 1000 puts t0 at 1000"):
        golden_step(pipe, GoldenConfig(1000))
    config, predict = {**pipe.scheduler.config, "steps_offset": 0}, family_of(pipe).predict
    coefficients = {n: GoldenStep(predict, config, GoldenConfig(n)).coefficient for n in (10, 50, 1000)}
    assert coefficients[10] == pytest.approx(0.385, abs=2e-3)
    assert coefficients[50] == pytest.approx(0.110, abs=2e-3)
    assert coefficients[1000] == pytest.approx(0.006, abs=1e-3)
    cond = encode_prompts(pipe, ["a small red circle"])
    x = seeded_noise([11], latent_shape(pipe))
    rel = {n: ((GoldenStep(predict, config, GoldenConfig(n))(x, cond) - x).norm() / x.norm()).item()
           for n in (10, 1000)}
    assert 1e-3 < rel[10] < 0.5
    assert rel[10] / rel[1000] > 20


def test_golden_sequence_shape(tiny_pipeline):
    pipe = tiny_pipeline
    step = golden_step(pipe)
    cond = encode_prompts(pipe, ["a", "b"])
    x = seeded_noise([0, 1], latent_shape(pipe))
    seq = step.sequence(x, cond, 3)
    assert seq.shape == (2, 3, 4, 16, 16)
    torch.testing.assert_close(seq[:, 1], step(seq[:, 0], cond))


# ---------------------------------------------------------------- the import drawing
def _project_imports() -> dict[str, set[str]]:
    """{module: the project's modules it imports}, module-level and in-function imports alike."""
    import ast

    from tests.conftest import ROOT

    roots = {"golden_noise": ROOT / "src" / "golden_noise", "golden_noise.model": ROOT / "model",
             "golden_noise_toy": ROOT / "src" / "golden_noise_toy"}
    files = {}
    for package, root in roots.items():
        for f in root.rglob("*.py"):
            parts = [p for p in f.relative_to(root).with_suffix("").parts if p != "__init__"]
            files[".".join([package, *parts])] = f
    graph = {}
    for module, f in files.items():
        base = module.split(".") if f.name == "__init__.py" else module.split(".")[:-1]
        deps = set()
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                target = ".".join(base[: len(base) - node.level + 1] + [node.module or ""]).strip(".") \
                    if node.level else node.module
                names = [f"{target}.{a.name}" if f"{target}.{a.name}" in files else target for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            for name in names:
                while name and name not in files:
                    name = name.rpartition(".")[0]
                if name and name != module:
                    deps.add(name)
        graph[module] = deps
    return graph


def test_the_import_drawing_has_no_circles():
    """No module of golden_noise / golden_noise_toy reaches itself through imports (in-function ones included):
    the golden step is built in golden.py from what a family exposes, and diffusion/ never imports golden.py."""
    graph = _project_imports()
    assert not [m for m in graph if m.startswith("golden_noise.diffusion") and "golden_noise.golden" in graph[m]]
    circles = []
    for start in graph:  # depth-first search for a path back to `start`
        seen, todo = set(), [(start, [start])]
        while todo:
            module, path = todo.pop()
            for dep in graph[module]:
                if dep == start:
                    circles.append(path + [start])
                elif dep not in seen:
                    seen.add(dep)
                    todo.append((dep, path + [dep]))
    assert not circles, circles[:3]


# docs/ARCHITECTURE.md's import layers, bottom first ("model" is golden_noise.model's registry, "model.*" its classes)
IMPORT_LAYERS = [
    {"errors", "io", "runtime", "runs", "cli", "prompts", "hub", "methods", "tables", "stats", "model"},
    {"diffusion", "rewards"},
    {"golden", "export", "model_card", "testing"},
    {"prompts_extract"},
    {"dataset", "scoring"},
    {"training", "model.*"},
    {"inference"},
    {"evaluation", "report"},
    {"sweep"},
    {"golden_noise_toy"},
]


def _layer(module: str) -> int | None:
    parts = module.split(".")
    if module == "golden_noise":
        return None  # the package's lazy __getattr__ (GoldenNoise), not a layer
    key = ("golden_noise_toy" if parts[0] == "golden_noise_toy" else
           "model.*" if parts[1] == "model" and len(parts) > 2 else parts[1])
    found = [i for i, layer in enumerate(IMPORT_LAYERS) if key in layer]
    assert found, f"{module}: place it in IMPORT_LAYERS and in docs/ARCHITECTURE.md's drawing"
    return found[0]


def test_no_import_runs_back_up_the_layers():
    """Every import (in-function ones included) goes to the same layer or one below: stages in pipeline order."""
    upward = [f"{module} -> {dep}" for module, deps in _project_imports().items() for dep in deps
              if _layer(module) is not None and _layer(dep) is not None and _layer(dep) > _layer(module)]
    assert not upward, upward
    drawing = (ROOT / "docs" / "ARCHITECTURE.md").read_text(encoding="utf-8").split("## Import layers", 1)[1]
    rows = drawing.split("```", 2)[1].strip().splitlines()[::-1]
    assert len(rows) == len(IMPORT_LAYERS)
    for row, layer in zip(rows, IMPORT_LAYERS):
        names = {n.strip(" ,/") for n in row[15:].split("(")[0].split() if n.strip(" ,/")}
        assert {n for n in layer if n != "model.*"} <= names | {"model"}, (row, layer)

IMPORT_REASON = re.compile(r"#\s*(heavy|optional|lazy):\s*\S")


def _in_function_project_imports(path) -> list[tuple[int, str, str]]:
    """(line, import statement, trailing comment) of each import of the project's own modules (golden_noise,
    golden_noise_toy, model, relative ones) inside a function body of `path`."""
    import ast
    import tokenize

    text = path.read_text(encoding="utf-8")
    with open(path, "rb") as f:
        comments = {t.start[0]: t.string for t in tokenize.tokenize(f.readline) if t.type == tokenize.COMMENT}
    found = {}
    for fn in ast.walk(ast.parse(text)):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for node in ast.walk(fn):
            if isinstance(node, ast.ImportFrom):
                project = node.level > 0 or (node.module or "").split(".")[0] in ("golden_noise", "golden_noise_toy",
                                                                                  "model")
            elif isinstance(node, ast.Import):
                project = any(a.name.split(".")[0] in ("golden_noise", "golden_noise_toy", "model") for a in node.names)
            else:
                continue
            if project:
                found[node.lineno] = (node.lineno, ast.unparse(node), comments.get(node.end_lineno, ""))
    return sorted(found.values())


def test_project_imports_sit_at_the_module_top():
    """The project's own modules are imported at the top of each module (src/, model/, scripts/); an import inside a
    function stays only when it is genuinely lazy, heavy or optional, and says so in a trailing comment
    (`# lazy: ...`, `# heavy: ...`, `# optional: ...`)."""
    from tests.conftest import ROOT

    unexplained, checked = [], 0
    for folder in ("src", "model", "scripts"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            checked += 1
            unexplained += [f"{rel}:{line}: {stmt}" for line, stmt, comment in _in_function_project_imports(path)
                            if not IMPORT_REASON.search(comment)]
    assert checked > 50 and not unexplained, "\n".join(unexplained)


def test_the_in_function_import_check_finds_one(tmp_path):
    """The check above sees an uncommented in-function import of the project and accepts a commented one."""
    f = tmp_path / "m.py"
    f.write_text("import os\n\ndef a():\n    from golden_noise.io import atomic_write_json\n\n"
                 "def b():\n    from .inference import GoldenNoise  # lazy: stays light\n\n"
                 "def c():\n    import json\n", encoding="utf-8")
    found = _in_function_project_imports(f)
    assert [(line, bool(IMPORT_REASON.search(c))) for line, _, c in found] == [(4, False), (7, True)]
