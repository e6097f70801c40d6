"""The engine registry: descriptions, unknown option names refused, and the layering it keeps."""

import ast
from pathlib import Path

import numpy as np
import pytest

import napari_nephi as nn
from napari_nephi.core.registration import Registration
from napari_nephi.core.transform import AffineTransform
from napari_nephi.engines.registry import (
    check_options,
    engine_info,
    engine_options,
    register_engine,
    unregister_engine,
)

SRC = Path(nn.__file__).parent


@pytest.fixture
def pair():
    rng = np.random.default_rng(0)
    return rng.random((32, 32)).astype(np.float32), rng.random((32, 32)).astype(np.float32)


@pytest.fixture
def toy_engine():
    """A method ``toy`` with two options, registered for one test."""

    @register_engine("toy", description="Identity, for tests")
    def toy(pair, strength: float = 1.0, *, label: str = "x") -> Registration:
        return Registration(pair.moving * strength, AffineTransform(np.eye(3)), settings={"label": label})

    yield toy
    unregister_engine("toy")
    assert "toy" not in nn.available_methods()


def test_every_builtin_method_has_a_one_line_description():
    descriptions = nn.method_descriptions()
    assert {"affine", "nephi", "mito"} <= set(descriptions)
    for name, text in descriptions.items():
        assert text and "\n" not in text and len(text) < 90, name


@pytest.mark.parametrize(
    ("method", "typo", "hint"),
    [
        ("affine", "iteratons", "iterations"),
        ("nephi", "learnig_rate", "learning_rate"),
        ("mito", "ratoi", "ratio"),
    ],
)
def test_unknown_option_names_are_refused_with_the_valid_ones(pair, method, typo, hint):
    if engine_info(method).options is None:
        pytest.fail(f"engine {method!r} still takes **kwargs, so its option names cannot be checked")
    with pytest.raises(nn.InputError, match=rf"Unknown option for method '{method}': '{typo}' "
                       rf"\(did you mean '{hint}'\?\)\. Valid options: .*\b{hint}\b"):  # fmt: skip
        nn.register(*pair, method=method, **{typo: 10})


def test_option_names_come_from_the_engine_signature(toy_engine, pair):
    assert engine_options(toy_engine) == ("strength", "label")
    assert engine_info("toy").description == "Identity, for tests"
    reg = nn.register(*pair, method="toy", strength=2.0, label="y")
    np.testing.assert_allclose(reg.warped, pair[1] * 2.0)
    assert reg.settings["method"] == "toy" and reg.settings["label"] == "y"
    with pytest.raises(nn.InputError, match="Valid options: label, strength"):
        nn.register(*pair, method="toy", stregth=2.0)
    check_options("toy", {"label": "z"})  # known names pass


def test_unknown_method_names_the_available_ones(pair):
    with pytest.raises(
        nn.InputError, match=r"Unknown method 'afine'; available: affine, histology, mito, nephi"
    ):
        nn.register(*pair, method="afine")


@pytest.mark.parametrize("method", ["affine", "nephi", "mito"])
def test_an_unknown_device_is_refused_the_same_way_by_every_engine(pair, method):
    with pytest.raises(nn.InputError, match=r"Unknown device 'gpu'; use 'auto', 'cpu', 'cuda'"):
        nn.register(*pair, method=method, device="gpu")


@pytest.mark.parametrize(
    ("callbacks", "message"),
    [
        ({"progress": 5}, "progress must be a function"),
        ({"cancel": "stop"}, "cancel must be a threading.Event"),
    ],
)
def test_progress_and_cancel_must_be_callable(pair, callbacks, message):
    with pytest.raises(nn.InputError, match=message):
        nn.register(*pair, method="mito", **callbacks)


@pytest.mark.parametrize(
    "error",
    [
        MemoryError(),
        RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: not enough memory"),
    ],
    ids=["MemoryError", "torch-cpu-allocator"],
)
def test_running_out_of_memory_in_an_engine_is_an_out_of_memory_error(pair, error):
    @register_engine("greedy", description="Runs out of memory, for tests")
    def greedy(pair) -> Registration:
        raise error

    try:
        with pytest.raises(nn.OutOfMemoryError, match="The greedy registration ran out of memory"):
            nn.register(*pair, method="greedy")
    finally:
        unregister_engine("greedy")


def test_input_and_engine_notes_share_one_key(pair):
    @register_engine("noted", description="Leaves a note, for tests")
    def noted(pair) -> Registration:
        return Registration(pair.moving, AffineTransform(np.eye(3)), metrics={"notes": ["engine note"]})

    rgb = np.repeat(pair[1][..., None], 3, axis=-1)
    try:
        with pytest.warns(UserWarning, match="RGB"):
            reg = nn.register(pair[0], rgb, method="noted")
    finally:
        unregister_engine("noted")
    assert len(reg.metrics["notes"]) == 2
    assert "moving image was RGB" in reg.metrics["notes"][0] and reg.metrics["notes"][1] == "engine note"


def test_engines_take_no_catch_all_options():
    """Every built-in engine lists its options explicitly, so typos can be refused."""
    catch_all = [name for name in ("affine", "nephi", "mito") if engine_info(name).options is None]
    assert catch_all == []


def _imports(path: Path) -> list[str]:
    """Absolute module names a file imports (relative imports resolved against the package)."""
    package = ".".join(("napari_nephi", *path.relative_to(SRC).parent.parts))
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - (node.level - 1)] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            names += [module] + [f"{module}.{a.name}" for a in node.names]
    return names


@pytest.mark.parametrize(
    ("layer", "forbidden"),
    [
        ("core", ("napari_nephi.engines", "napari_nephi.cli", "napari_nephi.widgets", "napari", "qtpy")),
        ("engines", ("napari_nephi.cli", "napari_nephi.widgets", "napari", "qtpy")),
        ("widgets", ("napari_nephi.cli",)),
    ],
)
def test_layers_import_only_downwards(layer, forbidden):
    bad = []
    for path in sorted((SRC / layer).rglob("*.py")):
        for name in _imports(path):
            if any(name == f or name.startswith(f + ".") for f in forbidden):
                bad.append(f"{path.relative_to(SRC)} imports {name}")
    assert bad == []


def test_core_names_no_engine_even_lazily():
    """No ``importlib`` detour either: no core module names an engine, the CLI or the widgets."""
    for path in sorted((SRC / "core").rglob("*.py")):
        strings = [n.value for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Constant)]
        named = [s for s in strings if isinstance(s, str) and s.startswith("napari_nephi.")]
        assert named == [], path


def test_whole_slide_engines_get_their_inputs_unloaded():
    """A whole-slide engine sees the caller's pyramid (a list of dask levels) as given, never loaded."""
    import dask.array as da

    seen = {}

    @register_engine("slides", description="Keeps its inputs, for tests", whole_slides=True)
    def slides(pair, *, level: int = 0) -> Registration:
        seen.update(fixed=pair.fixed, moving=pair.moving, spacing=pair.spacing, rgb=pair.rgb)
        return Registration(np.zeros((2, 2)), AffineTransform(np.eye(3)))

    pyramid = [da.zeros((4096, 4096), chunks=512), da.zeros((2048, 2048), chunks=512)]
    try:
        reg = nn.register(pyramid, pyramid, method="slides", rgb=False, level=1)
        with pytest.raises(nn.InputError, match="levle"):
            nn.register(pyramid, pyramid, method="slides", levle=1)
    finally:
        unregister_engine("slides")
    assert seen["fixed"] is pyramid and seen["moving"] is pyramid
    assert seen["spacing"] is None and seen["rgb"] is False
    assert reg.settings["method"] == "slides" and reg.settings["spacing"] is None
    try:
        slides = register_engine("slides", whole_slides=True)(slides)
        reg = nn.register(pyramid, pyramid, method="slides", spacing=0.5)
    finally:
        unregister_engine("slides")
    assert seen["spacing"] == 0.5 and reg.settings["spacing"] == [0.5]
