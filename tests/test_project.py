"""Project rules that a reviewer would otherwise check by hand: CI runs the README's test command,
and imports inside the package only go downward through the layers of SPEC §1."""

import ast
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "oodkernels"

# leaves without internal imports, which every layer may read
LEAVES = {"config", "_version"}
# module (or package prefix) -> internal modules it may import, besides the leaves
ALLOWED = {
    "config": set(),
    "_version": set(),
    "_cpp": set(),
    "testing": set(),
    "kernels": {"kernels", "config"},
    "reference": {"reference", "config"},
    "ops": {"kernels", "_cpp", "reference", "config"},
    "functional": {"ops"},
    "scores": {"ops"},
    # paired-batch objectives (dispatched ops) and plain-PyTorch batch-mixing utilities
    "paired": {"ops"},
    "model": {"ops", "reference", "config"},
    "utils": {"ops", "reference", "config"},
    # criteria subclass the reference modules (constructor, state and RNG draws defined once) and
    # route their forward through the functional layer
    "loss": {"functional", "model", "utils", "config", "reference"},
    "__main__": {"ops"},
    # the main job trains with the fused criteria and the reference side by side
    "demo": {"loss", "scores", "functional", "model", "utils", "config", "testing", "reference", "demo_segmentation"},
    "demo_segmentation": {"demo"},  # part 2 of the main job: the demo layer's second module
}


def _layer(module: str) -> str:
    return module.split(".")[0]


def _internal_imports(path: pathlib.Path, module: str) -> set:
    tree = ast.parse(path.read_text())
    package_parts = module.split(".")[:-1] if path.name != "__init__.py" else module.split(".")
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package_parts[: len(package_parts) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
                names = [target] if node.module else [f"{target}.{a.name}".strip(".") for a in node.names]
            elif node.module and node.module.startswith("oodkernels"):
                names = [node.module[len("oodkernels") :].lstrip(".")]
            else:
                continue
            found.update(n for n in names if n)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("oodkernels."):
                    found.add(alias.name[len("oodkernels.") :])
    return {_layer(n) for n in found}


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).with_suffix("")
        parts = list(rel.parts)
        if parts == ["__init__"]:
            continue
        if parts[-1] == "__init__":
            parts = parts[:-1]
        yield path, ".".join(parts)


@pytest.mark.parametrize("path,module", list(_modules()), ids=lambda v: str(v) if isinstance(v, str) else "")
def test_imports_only_go_down_the_layers(path, module):
    layer = _layer(module)
    assert layer in ALLOWED, f"{module}: not in the layer table of SPEC §1; add it deliberately"
    upward = _internal_imports(path, module) - ALLOWED[layer] - LEAVES - {layer}
    assert not upward, f"oodkernels/{path.relative_to(PACKAGE)} imports {sorted(upward)}, above its layer"


def _readme_command(marker: str) -> str:
    readme = (ROOT / "README.md").read_text()
    match = re.search(rf"<!-- {marker} -->\s*```(?:bash|sh)?\s*\n(.+?)\n```", readme, re.S)
    assert match, f"README.md: the command block after <!-- {marker} --> is missing"
    return match.group(1).strip()


def _make_recipes() -> dict:
    """``{target: [recipe lines]}`` of the Makefile (the recipe lines start with a tab)."""
    recipes, target = {}, None
    for line in (ROOT / "Makefile").read_text().splitlines():
        if line.startswith("\t") and target is not None:
            recipes[target].append(line.strip())
        elif re.match(r"^[\w.$()/-]+:", line) and not line.startswith("."):
            target = line.split(":")[0]
            recipes[target] = []
    return recipes


def test_ci_runs_the_readme_test_command():
    command = _readme_command("test-command")
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    ci_commands = [line.replace("$PY", "python") for line in ci_lines if line and not line.startswith("#")]
    assert command in ci_commands, f".ci/run does not run the README test command {command!r}"


def test_the_readme_commands_are_the_makefile_targets():
    """The README's two commands are `make demo` and `make test`; each target sets up first (the stamp of the
    project virtualenv) and runs the main job / the test suite with the virtualenv's Python."""
    assert _readme_command("demo-command") == "make demo"
    assert _readme_command("test-command") == "make test"
    recipes = _make_recipes()
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^demo: \$\(STAMP\)$", makefile, re.M) and re.search(r"^test: \$\(STAMP\)$", makefile, re.M)
    assert recipes["demo"] == ["$(PY) -m oodkernels.demo"]
    assert recipes["test"] == ["$(PY) -m pytest -q -n 2 tests"]
    setup = " ".join(recipes["$(STAMP)"])
    assert "torch==2.13.0" in makefile and "$(TORCH_CPU)" in setup  # the CPU build, pinned, where torch is missing
    assert "OODKERNELS_BUILD_EXT=1" in setup and ".[test,demo]" in setup  # the C++ extension built once
    assert "pytorch-ood==0.4.0" in setup
    assert "--system-site-packages" in " ".join(recipes["$(PY)"])  # a machine's own (CUDA) torch is kept


def test_ci_sets_up_through_the_makefile():
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"^make setup$", ci, re.M)  # torch's CPU build pinned, the package, the oracle: Makefile
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"pip install --no-deps \"?pytorch-ood==0\.4\.0", makefile)


def test_readme_python_examples_run():
    """LOSS_CONTRACT §8.7: every documentation example runs."""
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.+?)```", readme, re.S)
    assert blocks, "README.md has no python example"
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {})


def test_kernel_codes_agree_with_csrc():
    """kernels/codes.py is the one Python definition of the ops' kind codes and statistics counts; csrc/ repeats
    them as constexpr, and a mismatch would make the two backends compute different criteria."""
    from oodkernels.kernels import codes

    python = {name: value for name, value in vars(codes).items() if name.isupper()}
    center = {"CAC", "CENTER", "MCHAD", "CENTER_N_STATS"}
    for source, names, prefix in (("rows.cpp", python.keys() - center, "ROW_"), ("centers.cpp", center, "CENTER_")):
        text = (ROOT / "csrc" / source).read_text()
        cpp = {name: int(value) for name, value in re.findall(r"constexpr int64_t (\w+) = (\d+);", text)}
        for name in sorted(names):
            value = cpp.get(name.removeprefix(prefix) if name.endswith(("N_STATS", "N_TOTALS")) else name)
            assert value == python[name], f"{name}: {python[name]} in codes.py, {value} in {source}"
