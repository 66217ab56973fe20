"""Stage 1: scripts/extract_prompts.py on a Pick-a-Pic-shaped parquet, .txt and .csv files, and
scripts/generate_test_prompts.py (a test file disjoint from the training prompts); bad inputs. The CLIs run in
this process (`run_main`), each test with its own datasets cache (--cache_dir)."""
from __future__ import annotations

import random
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from golden_noise.errors import UserError
from golden_noise.prompts import read_prompts
from golden_noise.prompts_extract import (
    PromptSource, choose_column, collect_prompts, extract_prompts, resolve_source, split_test,
)
from tests.test_generate import error_line, run_main

SCRIPT = "scripts/extract_prompts.py"
TEST_SCRIPT = "scripts/generate_test_prompts.py"
UNIQUE = [f"prompt {i}: a {'red' if i % 2 else 'blue'} cat" for i in range(24)]


def _pickapic_rows():
    """Captions like Pick-a-Pic's: repeated prompts, blanks, messy whitespace; plus the expected result."""
    captions = []
    for i, text in enumerate(UNIQUE):
        captions.append(text if i % 3 else f"  {text.replace(' ', '   ')}\n")
        if i % 2 == 0:
            captions.append(f"\t{text} ")  # a duplicate once normalised
        if i % 5 == 0:
            captions.append(["", "   ", None, "\n\t"][i % 4])
    empty = sum(1 for c in captions if not (c or "").strip())
    return captions, {"read": len(captions), "kept": len(UNIQUE), "empty": empty,
                      "duplicates": len(captions) - empty - len(UNIQUE)}


@pytest.fixture(scope="module")
def pickapic(tmp_path_factory):
    """A parquet file shaped like yuvalkirstain/pickapic_v1: `caption` beside big `jpg_0`/`jpg_1` image bytes."""
    captions, counts = _pickapic_rows()
    rng = random.Random(0)  # incompressible 20 KB "images": reading them would show in the cache size
    images = [[rng.randbytes(20_000) for _ in captions] for _ in range(2)]
    table = pa.table({"caption": pa.array(captions, pa.string()), "jpg_0": images[0], "jpg_1": images[1],
                      "best_image_uid": [str(i) for i in range(len(captions))]})
    path = tmp_path_factory.mktemp("pickapic") / "train-00000-of-00001.parquet"
    pq.write_table(table, path, row_group_size=16)
    return path, counts


@pytest.fixture()
def run(tmp_path, capsys):
    """Run a stage-1 CLI in process with a private datasets cache (nothing shared between tests or with the
    user's cache); returns (exit code, stderr) and fails on an unexpected exit code."""
    def call(script, *args, code=0):
        got, _, stderr = run_main(capsys, script, *args, "--cache_dir", tmp_path / "hf_cache")
        assert got == code, stderr
        return stderr
    return call


def _lines(path):
    text = path.read_text(encoding="utf-8")
    assert text.endswith("\n")
    return text[:-1].split("\n")


def _final_counts(stderr: str) -> dict:
    """The counts of the final log line: 'Read R rows: kept K ...; dropped E empty and D duplicates'."""
    m = re.search(r"Read (\d+) rows: kept (\d+) unique prompts .*; dropped (\d+) empty and (\d+) duplicates", stderr)
    assert m, stderr
    return dict(zip(("read", "kept", "empty", "duplicates"), map(int, m.groups())))


def _assert_user_error(stderr, *needles):
    line = error_line(stderr)
    assert line.startswith("error:") and stderr.rstrip().splitlines()[-1] == line, stderr
    for needle in needles:
        assert needle in line, line


def _dir_size(path):
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def test_parquet_keeps_unique_normalised_prompts_and_reads_only_the_caption(pickapic, tmp_path, run):
    path, counts = pickapic
    stderr = run(SCRIPT, "--dataset_name", path, "--split", "train", "--output_dir", tmp_path / "data",
                 "--output_filename", "prompts.txt")
    assert _lines(tmp_path / "data" / "prompts.txt") == UNIQUE  # first occurrences, in dataset order
    assert _final_counts(stderr) == counts
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["prompts.txt"]  # no temp files, no test file
    # `columns=["caption"]`: the cache holds the captions only, not the ~2 MB of image bytes
    assert path.stat().st_size > 1_000_000 and _dir_size(tmp_path / "hf_cache") < 100_000


def test_seed_shuffle_is_deterministic_with_max_prompts_and_a_disjoint_test_file(pickapic, tmp_path, run):
    path, _ = pickapic
    common = ["--dataset_name", path, "--seed", 3, "--test_size", 4, "--test_filename", "test_prompts.txt"]
    full = run(SCRIPT, *common, "--output_dir", tmp_path / "full")
    capped = run(SCRIPT, *common, "--max_prompts", 5, "--output_dir", tmp_path / "capped")
    main, test = _lines(tmp_path / "full" / "prompts.txt"), _lines(tmp_path / "full" / "test_prompts.txt")
    assert len(test) == 4 and not set(main) & set(test) and sorted(main + test) == sorted(UNIQUE)
    assert test + main != UNIQUE  # shuffled
    assert _final_counts(full)["kept"] == len(UNIQUE)
    # same seed -> same order: the capped run is a prefix of the full one, with the same test prompts
    assert _lines(tmp_path / "capped" / "test_prompts.txt") == test
    assert _lines(tmp_path / "capped" / "prompts.txt") == main[:5]
    assert _final_counts(capped)["kept"] == 9 and "stopped at --max_prompts" in capped


def test_streaming_reads_the_same_prompts_and_shuffles_deterministically(pickapic, tmp_path, run):
    path, counts = pickapic
    # a directory, like a hub repo: datasets infers the parquet builder and the train split from the file name
    stderr = run(SCRIPT, "--dataset_name", path.parent, "--streaming", "--output_dir", tmp_path / "plain")
    assert _lines(tmp_path / "plain" / "prompts.txt") == UNIQUE
    assert _final_counts(stderr) == counts
    assert not (tmp_path / "hf_cache").exists() or _dir_size(tmp_path / "hf_cache") < 100_000  # nothing downloaded
    run(SCRIPT, "--dataset_name", path, "--output_dir", tmp_path / "cli", "--streaming", "--seed", 7,
        "--shuffle_buffer_size", 1000, "--test_size", 3, "--max_prompts", 6)
    source = PromptSource(dataset_name=str(path), streaming=True, seed=7, shuffle_buffer_size=1000,
                          cache_dir=str(tmp_path / "hf_cache"))
    extract_prompts(source, tmp_path / "lib", test_size=3, max_prompts=6)  # the core, called directly: same files
    for name in ("prompts.txt", "test_prompts.txt"):
        assert _lines(tmp_path / "cli" / name) == _lines(tmp_path / "lib" / name)
    main, test = _lines(tmp_path / "cli" / "prompts.txt"), _lines(tmp_path / "cli" / "test_prompts.txt")
    assert len(main) == 6 and len(test) == 3 and not set(main) & set(test) and set(main + test) <= set(UNIQUE)
    assert test + main != UNIQUE[:9]  # shuffled


def test_txt_input_uses_the_text_column(tmp_path, run):
    src = tmp_path / "raw prompts.txt"
    src.write_text("a café ☕ at  dawn\n\n   \nsecond\tprompt\na café ☕ at dawn\nthird\n", encoding="utf-8")
    stderr = run(SCRIPT, "--dataset_name", src, "--output_dir", tmp_path / "out")
    out = tmp_path / "out" / "prompts.txt"
    assert _lines(out) == ["a café ☕ at dawn", "second prompt", "third"]
    assert _final_counts(stderr) == {"read": 6, "kept": 3, "empty": 2, "duplicates": 1}
    assert [p.text for p in read_prompts(out)] == _lines(out)  # later stages read it back unchanged


def test_csv_input_with_a_named_column(tmp_path, run):
    src = tmp_path / "prompts.csv"
    src.write_text('id,prompt\n0,"a dog, wearing a hat"\n1,"two\nlines"\n2,\n3,"a dog,  wearing a hat"\n',
                   encoding="utf-8")
    stderr = run(SCRIPT, "--dataset_name", src, "--prompt_column", "prompt", "--output_dir", tmp_path,
                 "--output_filename", "out.txt")
    assert _lines(tmp_path / "out.txt") == ["a dog, wearing a hat", "two lines"]
    assert _final_counts(stderr) == {"read": 4, "kept": 2, "empty": 1, "duplicates": 1}


@pytest.mark.parametrize("case", ["unknown_hub_id", "missing_path", "missing_column", "image_column",
                                  "max_prompts_zero", "test_size_negative", "test_size_too_big"])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case, pickapic, tmp_path, run):
    path, _ = pickapic
    args, needles = {
        "unknown_hub_id": (["--dataset_name", "nobody-here/no-such-dataset"], ["no-such-dataset", "HF_HUB_OFFLINE"]),
        "missing_path": (["--dataset_name", tmp_path / "nope" / "prompts.parquet"], ["no such file"]),
        "missing_column": (["--dataset_name", path, "--prompt_column", "prompt"],
                           ["'prompt'", "caption, jpg_0, jpg_1, best_image_uid", "--prompt_column"]),
        "image_column": (["--dataset_name", path, "--prompt_column", "jpg_0"], ["not text"]),
        "max_prompts_zero": (["--dataset_name", path, "--max_prompts", 0], ["--max_prompts", "positive"]),
        "test_size_negative": (["--dataset_name", path, "--test_size", -1], ["--test_size", "positive"]),
        "test_size_too_big": (["--dataset_name", path, "--test_size", len(UNIQUE)], [f"only {len(UNIQUE)} unique"]),
    }[case]
    out = tmp_path / "out"
    _assert_user_error(run(SCRIPT, *args, "--output_dir", out, code=2), *needles)
    assert not out.exists() or not any(out.iterdir())


def test_collect_prompts_and_split_test():
    prompts, stats = collect_prompts([" a  b", None, "a b", "", "c", "d", "c"], limit=None)
    assert prompts == ["a b", "c", "d"]
    assert (stats.read, stats.kept, stats.empty, stats.duplicates) == (7, 3, 2, 2)
    prompts, stats = collect_prompts(iter(["x", "x", "y", "z"]), limit=2)
    assert prompts == ["x", "y"] and stats.read == 3  # stops reading once the limit is reached
    assert split_test(["a", "b", "c"], 2) == (["c"], ["a", "b"])
    assert split_test(["a", "b"], None) == (["a", "b"], [])
    with pytest.raises(UserError, match="--test_size 2"):
        split_test(["a", "b"], 2)


def test_resolve_source_and_choose_column(tmp_path):
    f = tmp_path / "p.tsv"
    f.write_text("caption\nx\n")
    src = resolve_source(str(f), "validation")
    assert (src.path, src.data_files, src.config_kwargs, src.is_hub) == ("csv", {"validation": str(f)},
                                                                       {"sep": "\t"}, False)
    assert resolve_source(str(tmp_path), "train").path == str(tmp_path)
    assert resolve_source("yuvalkirstain/pickapic_v1", "train", revision="main").is_hub
    for bad in ("./missing", "missing.jsonl", "a/b/c"):
        with pytest.raises(UserError, match="no such file"):
            resolve_source(bad, "train")
    (tmp_path / "p.xlsx").write_text("x")
    with pytest.raises(UserError, match="unsupported file type .xlsx"):
        resolve_source(str(tmp_path / "p.xlsx"), "train")
    assert choose_column(["text"], "caption", "text", "t.txt") == "text"
    with pytest.raises(UserError, match=r"no column 'caption' \(columns: text\)"):
        choose_column(["text"], "caption", "json", "t.jsonl")


@pytest.mark.parametrize("case", ["proc", "below_a_file"])
def test_unwritable_output_dir_is_refused_before_reading(case, tmp_path, run):
    (tmp_path / "file").write_text("x")
    out = "/proc/golden-noise-test" if case == "proc" else tmp_path / "file" / "data"
    # the dataset does not exist either: the output folder is checked first
    _assert_user_error(run(SCRIPT, "--dataset_name", tmp_path / "missing.parquet", "--output_dir", out, code=2),
                       f"--output_dir {out} is not a writable folder", "choose another --output_dir")


def test_collect_prompts_excludes_normalised_training_prompts():
    prompts, stats = collect_prompts(["a  b", "c", " c ", "d", "", "e"], limit=2, exclude={"a b", "d"})
    assert prompts == ["c", "e"]
    assert (stats.read, stats.kept, stats.excluded, stats.duplicates, stats.empty) == (6, 2, 2, 1, 1)


def test_generate_test_prompts_from_a_dataset_is_disjoint_and_deterministic(pickapic, tmp_path, run):
    path, _ = pickapic
    train = tmp_path / "prompts.txt"  # the training file spells some prompts with other whitespace
    train.write_text("".join(f"  {p.replace(' ', '  ')}\n" for p in UNIQUE[:10]), encoding="utf-8")
    common = ["--prompt_file", train, "--dataset_name", path, "--split", "train", "--num_prompts", 8]
    stderr = run(TEST_SCRIPT, *common, "--output", tmp_path / "plain.txt")
    assert _lines(tmp_path / "plain.txt") == UNIQUE[10:18]  # no --seed: the dataset's order
    assert "wrote 8 test prompts" in stderr and "dropped" in stderr
    outputs = {}
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        run(TEST_SCRIPT, *common, "--seed", seed, "--output", tmp_path / f"{name}.txt")
        outputs[name] = _lines(tmp_path / f"{name}.txt")
    assert outputs["a"] == outputs["b"] != outputs["c"]  # deterministic given --seed
    for lines in outputs.values():
        assert len(lines) == len(set(lines)) == 8 and set(lines) <= set(UNIQUE[10:])  # disjoint from training
    # asking for more than there is: every prompt outside the training file, with a warning
    stderr = run(TEST_SCRIPT, *common[:-1], 100, "--output", tmp_path / "all.txt")
    assert _lines(tmp_path / "all.txt") == UNIQUE[10:] and "only 14 prompts outside" in stderr


def test_generate_test_prompts_from_held_out_lines_of_a_prompt_file(tmp_path, run):
    full = tmp_path / "all_prompts.txt"
    full.write_text("".join(p + "\n" for p in UNIQUE), encoding="utf-8")
    train = tmp_path / "prompts.txt"
    train.write_text("".join(p + "\n" for p in UNIQUE[::2]), encoding="utf-8")  # every other line
    run(TEST_SCRIPT, "--prompt_file", train, "--dataset_name", full, "--num_prompts", 5, "--output",
        tmp_path / "test_prompts.txt")
    assert _lines(tmp_path / "test_prompts.txt") == UNIQUE[1::2][:5]
    assert [p.text for p in read_prompts(tmp_path / "test_prompts.txt")] == UNIQUE[1::2][:5]  # later stages read it


@pytest.mark.parametrize("case", ["output_is_training_file", "unwritable_output", "all_excluded", "zero"])
def test_generate_test_prompts_bad_inputs(case, tmp_path, run):
    train = tmp_path / "prompts.txt"
    train.write_text("".join(p + "\n" for p in UNIQUE), encoding="utf-8")
    (tmp_path / "file").write_text("x")
    output, source, count, needles = {
        "output_is_training_file": (train, train, 5, ["--output", "is also the --prompt_file"]),
        "unwritable_output": (tmp_path / "file" / "test.txt", tmp_path / "missing.txt", 5,
                              ["--output", "is not a writable folder"]),
        "all_excluded": (tmp_path / "test.txt", train, 5, ["no non-empty prompts outside the training --prompt_file",
                                                           f"{len(UNIQUE)} were in it"]),
        "zero": (tmp_path / "test.txt", train, 0, ["--num_prompts must be a positive integer"]),
    }[case]
    before = train.read_bytes()
    _assert_user_error(run(TEST_SCRIPT, "--prompt_file", train, "--dataset_name", source, "--num_prompts", count,
                           "--output", output, code=2), *needles)
    assert train.read_bytes() == before and not (tmp_path / "test.txt").exists()
