"""The job table: columns, rows that cannot run, and the command line each kind of job runs."""

from __future__ import annotations

import json

import pytest

from napari_nephi import InputError, UnsupportedFileError
from napari_nephi.batch import Job, read_jobs
from napari_nephi.batch.run import _resources
from napari_nephi.batch.tasks import check_job, command_line
from napari_nephi.cli import build_parser

from .conftest import write_table


def _jobs(tmp_path, rows):
    write_table(tmp_path / "jobs.csv", rows)
    return read_jobs(tmp_path / "jobs.csv")


def test_paths_are_relative_to_the_table_and_rows_are_numbered_as_lines(tmp_path):
    (tmp_path / "sub").mkdir()
    write_table(
        tmp_path / "sub" / "jobs.csv",
        [{"fixed": "a.tif", "moving": "/abs/b.tif", "method": "affine", "output": "x/y", "animal": "m1"}],
    )
    (job,) = read_jobs(tmp_path / "sub" / "jobs.csv")
    assert job.fixed == str(tmp_path / "sub" / "a.tif") and job.moving == "/abs/b.tif"
    assert (job.row, job.kind, job.output, job.extra, job.error) == (2, "pair", "x/y", {"animal": "m1"}, None)


def test_json_lines_table(tmp_path):
    lines = [
        {
            "fixed": "a.tif",
            "moving": "b.tif",
            "method": "nephi",
            "output": "o1",
            "options": {"iterations": 5},
        },
        {"moving": "s.tif", "kind": "stack", "output": "o2"},
    ]
    (tmp_path / "jobs.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    a, b = read_jobs(tmp_path / "jobs.jsonl")
    assert a.options == {"iterations": 5} and (a.row, b.row) == (1, 2)
    assert b.kind == "stack" and b.error is None and b.moving == str(tmp_path / "s.tif")


@pytest.mark.parametrize(
    ("rows", "match"),
    [
        ([{"fixed": "a", "moving": "b", "method": "affine"}], r"no column 'output'"),
        (
            [{"fixed": "a", "moving": "b", "method": "affine", "output": "o", "optons": "{}"}],
            r"unknown column 'optons'; did you mean 'options'",
        ),
        (
            [
                {"fixed": "a", "moving": "b", "method": "affine", "output": "o"},
                {"fixed": "c", "moving": "d", "method": "affine", "output": "o"},
            ],
            r"rows 2 and 3 write the same output 'o'",
        ),
        (
            [
                {"fixed": "a", "moving": "b", "method": "affine", "output": "o"},
                {"fixed": "c", "moving": "d", "method": "affine", "output": "o/p"},
            ],
            r"rows 2 and 3: output 'o/p' lies inside output 'o'",
        ),
    ],
)
def test_problems_of_the_whole_table_name_the_rows(tmp_path, rows, match):
    with pytest.raises(InputError, match=match):
        _jobs(tmp_path, rows)


def test_missing_or_empty_table(tmp_path):
    with pytest.raises(UnsupportedFileError, match="does not exist"):
        read_jobs(tmp_path / "nope.csv")
    (tmp_path / "empty.csv").write_text("fixed,moving,method,output\n")
    with pytest.raises(InputError, match="has no jobs"):
        read_jobs(tmp_path / "empty.csv")


@pytest.mark.parametrize(
    ("row", "match"),
    [
        ({"method": "afine"}, r"row 2: method 'afine' is unknown; a pair job takes one of affine, nephi"),
        ({"method": ""}, r"row 2: method is empty"),
        ({"kind": "stacks"}, r"row 2: unknown kind 'stacks'; use one of pair, stack, slides, atlas"),
        ({"options": "{iterations: 5}"}, r"row 2: options is not valid JSON"),
        ({"options": "[1, 2]"}, r"row 2: options must be a JSON object"),
        ({"fixed": ""}, r"row 2: fixed is empty; a pair job needs the fixed image"),
        ({"output": "../up"}, r"row 2: output '../up' must be a folder name inside"),
        ({"output": ".hidden"}, r"row 2: output '.hidden': names starting with '.' are reserved"),
        ({"kind": "stack", "fixed": "", "method": "nephi"}, r"row 2: method 'nephi': a stack job runs mito"),
        ({"kind": "atlas", "method": "mito"}, r"row 2: method 'mito': an atlas job registers"),
        (
            {"kind": "slides", "method": "", "moving_labels": "l.tif"},
            r"row 2: a slides job takes no moving_labels",
        ),
    ],
)
def test_a_row_that_cannot_run_gets_its_message(tmp_path, row, match):
    base = {"fixed": "a.tif", "moving": "b.tif", "method": "affine", "output": "o"}
    (job,) = _jobs(tmp_path, [{**base, **row}])
    assert job.error is not None
    with pytest.raises(InputError, match=match):
        raise InputError(job.error)


def _parsed(job):
    return build_parser().parse_args(command_line(job, "OUT"))


def test_pair_options_go_to_the_engine_and_device_to_its_flag():
    job = Job(
        row=2,
        output="o",
        fixed="f.tif",
        moving="m.tif",
        method="nephi",
        moving_labels="l.tif",
        options={"iterations": 7, "regularization": 0.5, "device": "cpu", "levels": None},
    )
    args = _parsed(job)
    assert (args.command, args.fixed, args.moving, args.output, args.method) == (
        "register",
        "f.tif",
        "m.tif",
        "OUT",
        "nephi",
    )
    assert args.iterations == 7 and args.device == "cpu" and args.levels is None and args.quiet
    assert args.option == ["regularization=0.5"] and args.moving_labels == "l.tif"
    masked = _parsed(Job(row=3, output="p", fixed="f", moving="m", method="affine", fixed_mask="fm.tif",
                         moving_mask="mm.tif"))  # fmt: skip
    assert (masked.fixed_mask, masked.moving_mask) == ("fm.tif", "mm.tif")


def test_unknown_engine_option_is_the_engines_message():
    job = Job(row=2, output="o", fixed="f.tif", moving="m.tif", method="affine", options={"iteratoins": 5})
    with pytest.raises(
        InputError, match=r"Unknown option for method 'affine': 'iteratoins' \(did you mean 'iterations'"
    ):
        check_job(job)


def test_stack_slides_and_atlas_command_lines():
    stack = _parsed(
        Job(
            row=2,
            output="s",
            kind="stack",
            moving="em.tif",
            moving_labels="mito.tif",
            options={"detector": "sift", "max_keypoints": 50, "use_masks": True, "refine": False},
        )
    )
    assert (stack.command, stack.stack, stack.masks, stack.detector, stack.max_keypoints) == (
        "align-em",
        "em.tif",
        "mito.tif",
        "sift",
        50,
    )
    assert stack.use_masks and stack.option == ["refine=false"]
    slides = _parsed(
        Job(
            row=3,
            output="h",
            kind="slides",
            fixed="a.svs",
            moving="b.svs",
            fixed_mask="m.png",
            options={"stages": ["rigid", "affine"], "no_flip": True, "rigid_um": 40},
        )
    )
    assert (slides.command, slides.fixed_mask, slides.stages, slides.no_flip, slides.rigid_um) == (
        "register-slides",
        "m.png",
        ["rigid", "affine"],
        True,
        40.0,
    )
    atlas = _parsed(
        Job(
            row=4,
            output="a",
            kind="atlas",
            fixed="index",
            moving="s.png",
            method="affine",
            options={"top": 3, "rerank": False},
        )
    )
    assert (atlas.command, atlas.index, atlas.sections, atlas.register, atlas.method) == (
        "atlas-lookup",
        "index",
        ["s.png"],
        True,
        "affine",
    )
    assert atlas.top == 3 and atlas.rerank is False
    with pytest.raises(InputError, match=r"register-slides has no option 'iterations'; valid: .*rigid_um"):
        command_line(
            Job(row=5, output="h", kind="slides", fixed="a", moving="b", options={"iterations": 3}), "o"
        )


def test_gpu_jobs_ask_for_a_gpu_only_where_the_cluster_has_one():
    pair = Job(row=2, output="o", fixed="f", moving="m", method="nephi")
    cpu = Job(row=3, output="p", fixed="f", moving="m", method="nephi", options={"device": "cpu"})
    stack = Job(row=4, output="s", kind="stack", moving="m")
    assert _resources(pair, gpus=1) == {"GPU": 1} and _resources(pair, gpus=0) is None
    assert _resources(cpu, gpus=1) is None and _resources(stack, gpus=2) is None


@pytest.mark.parametrize("output", ["summary.csv", "Summary.JSON"])
def test_the_summary_names_are_refused_as_outputs(tmp_path, output):
    base = {"fixed": "a.tif", "moving": "b.tif", "method": "affine"}
    (job,) = _jobs(tmp_path, [{**base, "output": output}])
    with pytest.raises(InputError, match=rf"row 2: output '{output}' is reserved for the batch summary"):
        raise InputError(job.error)


@pytest.mark.parametrize(
    ("outputs", "match"),
    [
        (["o", "O"], r"the job list: rows 1 and 2 write the same output 'O'"),
        (["o", "o/p"], r"the job list: rows 1 and 2: output 'o/p' lies inside output 'o'"),
    ],
)
def test_a_list_of_jobs_gets_the_table_checks(tmp_path, outputs, match):
    from napari_nephi.batch import run

    jobs = [Job(row=i, output=o, fixed="f", moving="m", method="affine") for i, o in enumerate(outputs, 1)]
    with pytest.raises(InputError, match=match):
        run(jobs, tmp_path / "out", workers=1)
    assert not (tmp_path / "out").exists()


def test_extra_columns_with_a_known_name_and_a_suffix_are_kept(tmp_path):
    row = {"fixed": "a.tif", "moving": "b.tif", "method": "affine", "output": "o", "moving_id": "7"}
    (job,) = _jobs(tmp_path, [{**row, "fixed_id": "3"}])
    assert job.extra == {"moving_id": "7", "fixed_id": "3"} and job.error is None
    with pytest.raises(InputError, match=r"unknown column 'optons'; did you mean 'options'"):
        _jobs(tmp_path, [{**row, "optons": "{}"}])


def test_pandas_missing_cells_are_empty():
    pd = pytest.importorskip("pandas")
    frame = pd.DataFrame(
        {"fixed": ["a.tif"], "moving": ["b.tif"], "method": ["affine"], "output": ["o"], "options": [pd.NA]}
    ).astype("string")
    (job,) = read_jobs(frame)
    assert job.options == {} and job.error is None


def test_a_flag_with_an_optional_value_is_bare_for_true_and_left_out_for_false():
    from napari_nephi.batch.tasks import option_arguments

    assert option_arguments("atlas-lookup", {"labels": True}) == ["--labels"]
    assert option_arguments("atlas-lookup", {"labels": False}) == []


def test_gpu_workers_are_counted_on_the_scheduler():
    from types import SimpleNamespace

    from napari_nephi.batch.cluster import gpu_workers

    workers = {i: SimpleNamespace(resources={"GPU": 1} if i < 6 else {}) for i in range(8)}

    class Client:
        def run_on_scheduler(self, function):
            return function(dask_scheduler=SimpleNamespace(workers=workers))

        def scheduler_info(self):  # lists only the first few workers, as some releases do
            return {"workers": {"a": {"resources": {"GPU": 1}}}}

    assert gpu_workers(Client()) == 6

    class Refusing(Client):
        def run_on_scheduler(self, function):
            raise RuntimeError("refused")

    assert gpu_workers(Refusing()) == 1
