"""The layout's rules, checked on the code itself: stages on one floor, dvc.yaml's deps cover
everything each stage runs, and dvc.yaml's paths are the ones tasks/core/paths.py defines."""
from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO
from tasks.core import paths
from tasks.sandbox import launch

STAGES = ("codeio", "model", "prepare", "sample", "filter", "train", "evaluate", "publish", "diagnose", "report")


def project_imports(module_file: Path) -> set[Path]:
    """The project files a module imports (at any depth of its code: lazy imports count too)."""
    found = set()
    for node in ast.walk(ast.parse(module_file.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        for name in names:
            if name.split(".")[0] not in ("tasks", "flows"):
                continue
            base = REPO / Path(*name.split("."))
            for candidate in (base.with_suffix(".py"), base / "__init__.py"):
                if candidate.is_file():
                    found.add(candidate)
            # A package's __init__ runs for every module imported from it.
            for parent in Path(*name.split(".")).parents:
                init = REPO / parent / "__init__.py"
                if parent != Path(".") and init.is_file():
                    found.add(init)
    return found


def docstring_only(file: Path) -> bool:
    if file.suffix != ".py":
        return False
    body = ast.parse(file.read_text()).body
    return all(isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) for node in body)


def import_closure(module_file: Path) -> set[Path]:
    closure, todo = set(), [module_file]
    while todo:
        current = todo.pop()
        if current in closure:
            continue
        closure.add(current)
        todo += sorted(project_imports(current) - closure)
        if current.suffix == ".py" and current.with_suffix(".cpp").is_file():
            closure.add(current.with_suffix(".cpp"))  # the kernels' source, compiled at import
        if current == Path(launch.__file__):
            todo += sorted(launch.JAIL_DIR.glob("*.py"))  # run inside the jail, not imported
    return closure


def stage_bodies() -> dict[str, dict]:
    """dvc.yaml's stages by the module their command runs."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    bodies = {}
    for name, stage in stages.items():
        body = stage.get("do", stage)
        module = body["cmd"].split("python -m tasks.", 1)[1].split()[0]
        bodies[name] = dict(body, module=module)
    return bodies


def test_no_stage_imports_another_stage():
    for stage in STAGES:
        imported = {p.relative_to(REPO).as_posix() for p in project_imports(REPO / "tasks" / f"{stage}.py")}
        assert not imported & {f"tasks/{other}.py" for other in STAGES}, f"tasks/{stage}.py imports a stage"


def test_the_report_stage_loads_without_torch():
    code = "import sys, tasks.report; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO).returncode == 0


@pytest.mark.parametrize("name", sorted(stage_bodies()))
def test_dvc_deps_cover_every_file_the_stage_imports(name):
    """Editing any file a stage runs must make `dvc status` see the stage as changed."""
    body = stage_bodies()[name]
    deps = [d.rstrip("/") for d in body["deps"]]
    closure = import_closure(REPO / "tasks" / f"{body['module']}.py")
    missing = []
    for file in sorted(closure):
        rel = file.relative_to(REPO).as_posix()
        if docstring_only(file):
            continue  # a package's __init__ holding only its docstring cannot change a result
        if not any(rel == dep or rel.startswith(dep + "/") for dep in deps):
            missing.append(rel)
    assert not missing, f"dvc.yaml stage {name} runs {missing} but does not list them (or a folder holding them) in deps"


def test_dvc_yaml_paths_are_the_ones_the_stages_write():
    bodies = stage_bodies()

    def declared(body):
        return {next(iter(o)) if isinstance(o, dict) else o for key in ("outs", "metrics", "plots")
                for o in body.get(key, [])}

    arm, config = "${key}", "${item}"  # sample's foreach is a list of config names (sample.stages.whole)
    assert declared(bodies["codeio"]) == {paths.CODEIO_PROBLEMS, paths.CODEIO_CATALOG, paths.CODEIO_SOURCE}
    assert declared(bodies["model"]) == {paths.BASE_MODEL}
    assert declared(bodies["prepare"]) == {paths.TRAIN_PROBLEMS, paths.VALIDATION_PROBLEMS, paths.EVAL_PROBLEMS,
                                           paths.DATA_SOURCE}
    assert declared(bodies["sample"]) == {paths.samples(config), paths.sample_stats(config)}
    # sample.shards > 1: the shards' rows, and their merge into the same two files.
    assert declared(bodies["sample-shard"]) == {paths.sample_shard("${item.config}", "${item.shard}")}
    assert declared(bodies["sample-merge"]) == {paths.samples(config), paths.sample_stats(config)}
    assert paths.sample_shards_dir(config) in bodies["sample-merge"]["deps"]
    assert paths.TRAIN_PROBLEMS in bodies["sample-shard"]["deps"] and paths.TRAIN_PROBLEMS in bodies["sample-merge"]["deps"]
    assert paths.samples("${item.sample}") in bodies["filter"]["deps"]
    assert declared(bodies["filter"]) == {paths.filtered_samples(arm), paths.filter_stats(arm)}
    assert declared(bodies["train"]) == {paths.trained_model(arm), paths.train_stats(arm), paths.train_curves(arm),
                                         paths.train_live_summary(arm)}
    model = "${item}"  # evaluate's foreach: base and the arms (evaluate.stages.whole)
    assert declared(bodies["evaluate"]) == {paths.eval_samples_dir(model), paths.eval_metrics(model)}
    # evaluate.shards > 1: each part's shards, and their merge into the same files.
    for part in ("validation", "test"):
        assert declared(bodies[f"evaluate-{part}"]) == {paths.eval_shard("${item.model}", part, "${item.shard}")}
    assert f"{paths.eval_shards_dir('${item.model}')}/validation" in bodies["evaluate-test"]["deps"]
    assert declared(bodies["evaluate-merge"]) == {paths.eval_samples_dir(model), paths.eval_metrics(model)}
    assert paths.eval_shards_dir(model) in bodies["evaluate-merge"]["deps"]
    assert declared(bodies["publish"]) == {paths.release_dir(arm)}
    assert declared(bodies["report"]) == {paths.REPORT_JSON, paths.REPORT_HEADLINE, paths.REPORT_MD,
                                          paths.REPORT_FIGURES, paths.REPORT_T_EVAL}
    assert declared(bodies["diagnose-base"]) == {paths.diagnose_metrics("base"), paths.diagnose_classes()}
    assert declared(bodies["diagnose"]) == {paths.diagnose_metrics(arm)}
    assert paths.diagnose_classes() in bodies["diagnose"]["deps"]
    assert paths.trained_model("base") == paths.BASE_MODEL  # evaluate@base evaluates the base model
    assert f"--model {paths.trained_model(model)} --name {model}" in bodies["evaluate"]["cmd"]
    # The stages that read a file another stage writes declare it.
    assert {paths.CODEIO_PROBLEMS, paths.CODEIO_CATALOG, paths.CODEIO_SOURCE} <= set(bodies["prepare"]["deps"])
    assert paths.EVAL_PROBLEMS in bodies["evaluate"]["deps"] and paths.TRAIN_PROBLEMS in bodies["sample"]["deps"]
    assert paths.filtered_samples(arm) in bodies["train"]["deps"]
    assert paths.VALIDATION_PROBLEMS in bodies["evaluate"]["deps"]
    assert {paths.trained_model(arm), paths.eval_metrics(arm)} <= set(bodies["publish"]["deps"])
    assert f"{paths.BASE_MODEL}/source.json" in bodies["publish"]["deps"]
    # Training reads no decoding setting: a new evaluate.* value must not rerun it.
    assert not [p for p in bodies["train"]["params"] if p.startswith("evaluate.")]


def test_the_codeio_stage_declares_the_params_it_reads():
    """tasks/codeio.py reads every codeio.* key, data.*'s sizes, sources, split seed and held-out
    share (codeio.convert: needed converts what the sets draw) and the sandbox's limits."""
    from tasks.core.config import CodeIOConfig

    reads = {f"codeio.{key}" for key in CodeIOConfig.model_fields} | {
        "data.train.source", "data.train.max_problems", "data.validation.source", "data.validation.max_problems",
        "data.eval", "data.eval_fraction", "data.split_seed", "sandbox.memory_mb", "sandbox.workers"}
    assert set(stage_bodies()["codeio"]["params"]) == reads


def test_the_headline_is_the_only_dvc_metrics_file():
    """`dvc metrics show` and `dvc exp show` read one small flat file; the detailed files are outs."""
    pipeline = yaml.safe_load((REPO / "dvc.yaml").read_text())
    metrics = [next(iter(m)) if isinstance(m, dict) else m for stage in pipeline["stages"].values()
               for m in stage.get("do", stage).get("metrics", [])] + list(pipeline.get("metrics", []))
    assert metrics == [paths.REPORT_HEADLINE]


def test_dvc_plots_name_the_figures_the_report_writes():
    import inspect

    from tasks import report

    top_level = yaml.safe_load((REPO / "dvc.yaml").read_text())["plots"]
    written = set(re.findall(r'out / "([a-z_]+\.png)"', inspect.getsource(report.figures)))
    assert {Path(p).name for p in top_level} == written


def module_import_graph() -> dict[str, set[str]]:
    """Project module -> the project modules it imports, at any depth of its code."""
    files = [p for d in ("tasks", "flows") for p in (REPO / d).rglob("*.py")]
    modules = {".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__"): p for p in files}
    graph = {m: set() for m in modules}
    for module, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            for name in names:
                while name and name not in modules:
                    name = name.rpartition(".")[0]
                if name and name != module and not module.startswith(name + ".") and not name.startswith(module + "."):
                    graph[module].add(name)
    return graph


def test_no_import_cycles():
    """Function-level imports count: a cycle they hide is still one module needing the other."""
    graph = module_import_graph()

    def reaches(start: str, goal: str) -> bool:
        seen, todo = set(), [start]
        while todo:
            current = todo.pop()
            if current == goal:
                return True
            if current not in seen:
                seen.add(current)
                todo += graph[current]
        return False

    cycles = sorted({tuple(sorted((a, b))) for a in graph for b in graph[a] if reaches(b, a)})
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(pair) for pair in cycles)
