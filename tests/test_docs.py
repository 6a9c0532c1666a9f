"""The README and docs/ against the code they describe, so that neither can drift from the other.

What is read from the pages: the README's stage table and config table, every relative link, every
`configs/...yaml` path, every YAML block (keys against the signatures of the classes they name), every
Python block and inline call (names and arguments bound against the real signatures; a stage's
includes the arguments it forwards to its bases, as the CLI resolves them), every
`Defaults:` line (each value equal to the signature's default), every dotted `plpost.` name, and the
`name: value` settings of each stage's section in docs/stages.md (a parameter of the stage, a value
its Literal allows). No model is loaded.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
import re
import types
import typing
from pathlib import Path

import pytest
import yaml
from conftest import cli_signature

import plpost
from plpost.data.base import PostTrainingDataModule
from plpost.modules.base import PostTrainingModule

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
PUBLIC = {name: getattr(plpost, name) for name in plpost.__all__}
STAGE_MODULES = {name: cls for name, cls in PUBLIC.items() if issubclass(cls, PostTrainingModule)}
DATA_MODULES = {name: cls for name, cls in PUBLIC.items() if issubclass(cls, PostTrainingDataModule)}
STAGES = ["SFT", "reward model", "DPO and variants", "ORPO", "KTO", "PPO", "GRPO family", "distillation"]
"""The stages plpost offers, in the order the README's first table names them."""

FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
CODE_SPAN = re.compile(r"`([^`]+)`")
SETTING = re.compile(r"^(\w+): (\S.*)$")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def text_of(page: Path) -> str:
    return page.read_text(encoding="utf-8")


def prose_of(page: Path) -> str:
    """The page without its fenced code blocks."""
    return FENCE.sub("", text_of(page))


def fenced_blocks(page: Path, language: str) -> list[str]:
    return [body for lang, body in FENCE.findall(text_of(page)) if lang == language]


def table(page: Path, header: list[str]) -> list[list[str]]:
    """The body rows of the markdown table of `page` whose header cells are `header`, each a list of cells."""
    rows, inside = [], False
    for line in prose_of(page).splitlines():
        cells = [cell.strip() for cell in re.split(r"(?<!\\)\|", line.strip())[1:-1]] if line.startswith("|") else None
        if cells == header:
            inside = True
        elif inside and cells is None:
            break
        elif inside and not set("".join(cells)) <= set("-: "):
            assert len(cells) == len(header), f"{page.name}: a row of the {header} table has {len(cells)} cells: {line}"
            rows.append(cells)
    assert rows, f"{page.name} has no table with the header {header}"
    return rows


def public_names(cell: str, among: dict[str, type]) -> list[str]:
    return [span for span in code_spans(cell) if span in among]


def code_spans(text: str) -> list[str]:
    """The inline code of `text`, also where a span runs over a line break."""
    return CODE_SPAN.findall(text.replace("\n", " "))


def settings(text: str) -> list[tuple[str, str]]:
    """The `name: value` code spans of `text`."""
    return [match.groups() for span in code_spans(text) if (match := SETTING.match(span))]


def literal_choices(annotation) -> set | None:
    """The values a `Literal[...]` (or `Literal[...] | None`) annotation allows; None for any other type."""
    if typing.get_origin(annotation) is typing.Literal:
        return set(typing.get_args(annotation))
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        others = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        choices = literal_choices(others[0]) if len(others) == 1 else None
        return None if choices is None else choices | {None}
    return None


def forwards_to_its_bases(target) -> bool:
    """A plpost class whose `__init__` passes `**kwargs` on to its base's (another library's
    `**kwargs` may go anywhere, wandb's to `wandb.init`: those stay open)."""
    return (inspect.isclass(target) and target.__module__.startswith("plpost.")
            and any(p.kind is p.VAR_KEYWORD for p in inspect.signature(target).parameters.values()))


def signature_of(target) -> inspect.Signature:
    """What `target(...)` takes: a plpost class that forwards `**kwargs` takes exactly the arguments
    the CLI resolves through its bases, so a name none of them declares fails to bind."""
    return cli_signature(target) if forwards_to_its_bases(target) else inspect.signature(target)


def argument_types(cls: type) -> dict:
    """The resolved annotations of the arguments of `cls`; none for a class whose annotations name
    types its module imports only for type checkers (some loggers do)."""
    if forwards_to_its_bases(cls):
        return {name: p.annotation for name, p in cli_signature(cls).parameters.items()}
    try:
        return typing.get_type_hints(cls.__init__)
    except NameError:
        return {}


def check_setting(name: str, value: str, classes: list[type], where: str) -> None:
    """`name` is an argument of one of `classes`; where that argument is a Literal, every word of `value`
    (`truncate | drop | error` names three) is one of its choices."""
    owners = [cls for cls in classes if name in signature_of(cls).parameters]
    assert owners, f"{where}: `{name}` is not an argument of {', '.join(cls.__name__ for cls in classes)}"
    choices = literal_choices(argument_types(owners[0]).get(name))
    words = [word.strip() for word in value.split("|")]
    if choices is not None and all(re.fullmatch(r"\w+", word) for word in words):
        for word in words:
            assert word in choices, f"{where}: `{name}: {word}` is not one of {sorted(choices)}"


def test_readme_stage_table_pairs_every_stage_with_the_data_it_trains_on():
    rows = table(README, ["stage", "module", "data module", "loss"])
    assert [row[0] for row in rows] == STAGES
    named_modules, named_data = set(), set()
    for stage, module_cell, data_cell, _ in rows:
        modules = public_names(module_cell, STAGE_MODULES)
        assert len(modules) == 1, f"README stage table, {stage}: the module cell names {modules}"
        module = STAGE_MODULES[modules[0]]
        expected = {kind.__name__ for kind in module.data_modules}
        assert set(public_names(data_cell, DATA_MODULES)) == expected, (
            f"README stage table, {stage}: {module.__name__} trains on {sorted(expected)} (its data_modules)")
        for name, value in settings(module_cell):
            check_setting(name, value, [module], f"README stage table, {stage}")
        named_modules.add(module.__name__)
        named_data.update(expected)
    assert named_modules == set(STAGE_MODULES), f"stage modules missing from the README: {set(STAGE_MODULES) - named_modules}"
    assert named_data == set(DATA_MODULES), f"data modules missing from the README: {set(DATA_MODULES) - named_data}"


@pytest.mark.parametrize("page", [README, ROOT / "docs" / "data.md"], ids=lambda page: page.name)
def test_data_tables_describe_every_data_module_once(page):
    named = [name for row in table(page, ["data module", "rows"]) for name in public_names(row[0], DATA_MODULES)]
    assert sorted(named) == sorted(DATA_MODULES), f"{page.name}: the data table names {named}"


def test_readme_config_table_lists_every_config_with_the_classes_it_names():
    rows = table(README, ["config", "module", "data module", "what it runs"])
    listed = [re.search(r"configs/[\w./-]+\.yaml", row[0]).group() for row in rows]
    on_disk = sorted(str(path.relative_to(ROOT)) for path in (ROOT / "configs").rglob("*.yaml"))
    missing, absent = sorted(set(on_disk) - set(listed)), sorted(set(listed) - set(on_disk))
    assert not missing and not absent, f"README config table: configs/ files not listed {missing}, listed but absent {absent}"
    assert len(listed) == len(set(listed)), "README config table: a config is listed twice"
    for path, (_, module_cell, data_cell, what) in zip(listed, rows):
        config = yaml.safe_load((ROOT / path).read_text())
        for part, cell, among in (("model", module_cell, STAGE_MODULES), ("data", data_cell, DATA_MODULES)):
            names = public_names(cell, among)
            assert [f"plpost.{name}" for name in names] == [config[part]["class_path"]], (
                f"README config table, {path}: {part} is {config[part]['class_path']}, the row says {names}")
        written = {**config["data"].get("init_args", {}), **config["model"].get("init_args", {})}
        for name, value in settings(module_cell + what):
            assert name in written and written[name] == yaml.safe_load(value), (
                f"README config table, {path}: the row says `{name}: {value}`, the file {name}: {written.get(name)}")


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_relative_links_and_config_paths_point_at_files_that_exist(page):
    for target in LINK.findall(prose_of(page)):
        if re.match(r"\w+:", target):
            continue
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        assert linked.exists(), f"{page.name} links to {target}, which does not exist"
        if anchor and linked.suffix == ".md":
            assert anchor in heading_anchors(linked), f"{page.name} links to {target}: no such heading in {linked.name}"
    for path in re.findall(r"configs/[\w./-]+\.yaml", text_of(page)):
        assert (ROOT / path).exists(), f"{page.name} names {path}, which does not exist"


def heading_anchors(page: Path) -> set[str]:
    """GitHub's anchors of the headings: lower case, punctuation dropped, spaces to hyphens."""
    headings = re.findall(r"^#+ (.+)$", prose_of(page), re.M)
    return {re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-") for heading in headings}


def resolve(dotted: str):
    """The object a dotted name names: the longest importable module prefix, then attributes."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            found = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attribute in parts[cut:]:
            found = getattr(found, attribute)
        return found
    raise ImportError(dotted)


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_dotted_plpost_names_exist(page):
    for dotted in set(re.findall(r"\bplpost(?:\.[A-Za-z_]\w*)+", text_of(page))):
        try:
            resolve(dotted)
        except (ImportError, AttributeError):
            pytest.fail(f"{page.name} names {dotted}, which does not exist")


def check_class_paths(node, where: str) -> None:
    """Every `class_path` / `init_args` pair under `node`: each key an argument of the class, a Literal
    argument one of its values, a dataclass argument (`lora`) with fields of that dataclass."""
    if isinstance(node, list):
        for item in node:
            check_class_paths(item, where)
    if not isinstance(node, dict):
        return
    if "class_path" in node:
        cls = resolve(node["class_path"])
        parameters = signature_of(cls).parameters
        hints = argument_types(cls)
        open_ended = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
        for name, value in node.get("init_args", {}).items():
            assert open_ended or name in parameters, f"{where}: {node['class_path']} has no argument `{name}`"
            choices = literal_choices(hints.get(name))
            if choices is not None:
                assert value in choices, f"{where}: {node['class_path']} `{name}: {value}` is not one of {sorted(choices)}"
            settings_class = next((arg for arg in typing.get_args(hints.get(name)) if dataclasses.is_dataclass(arg)), None)
            if settings_class is not None and isinstance(value, dict):
                fields = {field.name for field in dataclasses.fields(settings_class)}
                assert set(value) <= fields, f"{where}: `{name}` has no field {sorted(set(value) - fields)}"
    for value in node.values():
        check_class_paths(value, where)


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_yaml_blocks_name_real_arguments(page):
    import lightning as L

    for block in fenced_blocks(page, "yaml"):
        config = yaml.safe_load(block)
        trainer_arguments = inspect.signature(L.Trainer).parameters
        for name in config.get("trainer", {}):
            assert name in trainer_arguments, f"{page.name}: the Trainer has no argument `{name}`"
        check_class_paths(config, page.name)


def named_object(node: ast.expr, namespace: dict):
    """What a name or dotted attribute names in `namespace`; None for anything else."""
    if isinstance(node, ast.Name):
        return namespace.get(node.id)
    if isinstance(node, ast.Attribute):
        owner = named_object(node.value, namespace)
        return None if owner is None else getattr(owner, node.attr)
    return None


def calls_bind(tree: ast.AST, namespace: dict, where: str, *, partial: bool) -> None:
    """Every call in `tree` to something `namespace` resolves binds to that callable's signature."""
    for call in ast.walk(tree):
        if not isinstance(call, ast.Call) or any(isinstance(arg, ast.Starred) for arg in call.args):
            continue
        target = named_object(call.func, namespace)
        if target is None:  # a local variable, or the result of another call
            continue
        bind = signature_of(target).bind_partial if partial else signature_of(target).bind
        try:
            bind(*call.args, **{keyword.arg: keyword.value for keyword in call.keywords if keyword.arg})
        except TypeError as error:
            pytest.fail(f"{where}: {ast.unparse(call)[:80]}: {error}")


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_python_blocks_call_real_signatures(page):
    for index, block in enumerate(fenced_blocks(page, "python")):
        tree = ast.parse(block)
        namespace: dict = {}
        for statement in tree.body:
            if isinstance(statement, ast.Import):
                namespace.update({alias.asname or alias.name: importlib.import_module(alias.name) for alias in statement.names})
            elif isinstance(statement, ast.ImportFrom):
                module = importlib.import_module(statement.module)
                namespace.update({alias.asname or alias.name: getattr(module, alias.name) for alias in statement.names})
        calls_bind(tree, namespace, f"{page.name}, python block {index + 1}", partial=False)


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_inline_calls_and_defaults_match_the_signatures(page):
    namespace = {**PUBLIC, "plpost": plpost}
    for paragraph in re.split(r"\n\s*\n", prose_of(page)):
        for span in code_spans(paragraph):
            try:
                tree = ast.parse(span, mode="eval")
            except SyntaxError:
                continue
            calls_bind(tree, namespace, f"{page.name}: `{span}`", partial=True)
        if paragraph.startswith("Defaults:"):
            check_defaults(code_spans(paragraph)[0], namespace, page.name)


def check_defaults(span: str, namespace: dict, where: str) -> None:
    """`Class(name=value, ...)`: each value is the default of that argument."""
    call = ast.parse(span, mode="eval").body
    cls = named_object(call.func, namespace) if isinstance(call, ast.Call) else None
    assert cls is not None, f"{where}: a Defaults line must open with a call of a plpost class, not `{span[:40]}`"
    parameters = signature_of(cls).parameters
    for keyword in call.keywords:
        default = parameters[keyword.arg].default
        assert ast.literal_eval(keyword.value) == default, (
            f"{where}: Defaults of {cls.__name__} say {keyword.arg}={ast.unparse(keyword.value)}, the default is {default!r}")


def test_stage_sections_name_settings_of_their_stage():
    """In docs/stages.md each section's `name: value` spans are arguments of the classes its heading
    names (of any stage or data module where the heading names none)."""
    sections = re.split(r"^## ", prose_of(ROOT / "docs" / "stages.md"), flags=re.M)[1:]
    headed = {name for section in sections for name in public_names(section.splitlines()[0], STAGE_MODULES)}
    assert headed == set(STAGE_MODULES), f"stages without a section in docs/stages.md: {set(STAGE_MODULES) - headed}"
    everything = [*STAGE_MODULES.values(), *DATA_MODULES.values()]
    for section in sections:
        heading = section.splitlines()[0]
        classes = [PUBLIC[name] for name in public_names(heading, PUBLIC)] or everything
        for name, value in settings(section):
            check_setting(name, value, classes, f"docs/stages.md, section {heading!r}")
