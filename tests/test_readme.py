"""README.md's params tables agree with the params schemas and with the shipped manifest.

Under "## Manifest params", each built-in registration with params (the compare_models step, the
nn_batch and tree_parallel executors) has a table under a "### NAME ..." heading with the columns
param | default | shipped manifest sets | meaning. Every row's default is the schema's ``default``, its
"shipped manifest sets" cell what agent_manifests/reinforcement.json sets (— where it leaves the param
out), both as JSON in backticks; every schema param has a row, and every row a schema param.

Plugins' params (e.g. the ridge plugin's ``ridge_max_iter``) are documented in their own packages: the
manager here loads the built-ins only. Params the tables leave out on purpose would be listed, with the
reason, in NOT_IN_THE_TABLES; there are none.
"""

from __future__ import annotations

import json
from pathlib import Path

from watcher_plugins.manifest import default_manifest_path

README = Path(__file__).parents[1] / "README.md"
SECTION = "## Manifest params"
COLUMNS = ["param", "default", "shipped manifest sets", "meaning"]
UNSET = "—"
#: param -> why its table leaves it out. Empty: every built-in param has a row.
NOT_IN_THE_TABLES: dict[str, str] = {}


def params_tables(readme: str) -> dict[str, tuple[list[str], dict[str, list[str]]]]:
    """Heading (without "### ") -> (header cells, param -> its row's cells), for each table of the section."""
    tables: dict[str, tuple[list[str], dict[str, list[str]]]] = {}
    in_section, heading = False, None
    for line in readme.splitlines():
        if line.startswith("## "):
            in_section, heading = line.strip() == SECTION, None
        elif in_section and line.startswith("### "):
            heading = line[4:].strip()
        elif in_section and heading and line.startswith("|"):
            cells = [cell.strip() for cell in line.strip().strip("|").split(" | ")]
            if heading not in tables:
                tables[heading] = (cells, {})
            elif not set(line) <= set("|- "):  # not the |---| line
                tables[heading][1][cells[0].strip("`")] = cells
    return tables


def cell(value) -> str:
    """How a table writes a JSON value."""
    return f"`{json.dumps(value)}`"


def _same(written: str, value) -> bool:
    if not (len(written) > 2 and written.startswith("`") and written.endswith("`")):
        return False
    try:
        parsed = json.loads(written[1:-1])
    except json.JSONDecodeError:
        return False
    return json.dumps(parsed, sort_keys=True) == json.dumps(value, sort_keys=True)  # 1 is not true, 1.0 not 1


def problems(readme: str, registrations, shipped: dict) -> list[str]:
    """What the README's tables get wrong, one line each, saying which row and what to write."""
    tables = params_tables(readme)
    found: list[str] = []
    documented: set[str] = set()
    for registration in registrations:
        properties = registration.schema().get("properties", {})
        if not properties:
            continue
        source = registration.params_schema if isinstance(registration.params_schema, str) else registration.name
        heading = next((h for h in tables if h == registration.name or h.startswith(f"{registration.name} ")), None)
        if heading is None:
            found.append(f"README.md has no table for {registration.name}'s params ({source}) under {SECTION!r}: "
                         f"add a '### {registration.name} ...' heading and a table | {' | '.join(COLUMNS)} |")
            continue
        where = f"README.md, table {heading!r}"
        header, rows = tables[heading]
        documented.update(rows)
        if header != COLUMNS:
            found.append(f"{where}: the columns are {header}; write | {' | '.join(COLUMNS)} |")
            continue
        for name, subschema in properties.items():
            default = subschema.get("default")
            manifest_cell = cell(shipped[name]) if name in shipped else UNSET
            if name not in rows:
                if name not in NOT_IN_THE_TABLES:
                    found.append(f"{where}: no row for `{name}` ({source}); add "
                                 f"| `{name}` | {cell(default)} | {manifest_cell} | {subschema.get('description', '...')} |")
                continue
            row = rows[name]
            if len(row) != len(COLUMNS):
                found.append(f"{where}, row `{name}`: {len(row)} cells, expected {len(COLUMNS)} ({' | '.join(COLUMNS)})")
                continue
            if not _same(row[1], default):
                found.append(f"{where}, row `{name}`, column 'default': it says {row[1]}, the schema ({source}) "
                             f"says {cell(default)}; write {cell(default)}")
            if name in shipped and not _same(row[2], shipped[name]):
                found.append(f"{where}, row `{name}`, column 'shipped manifest sets': it says {row[2]}, "
                             f"{default_manifest_path().name} sets {manifest_cell}; write {manifest_cell}")
            elif name not in shipped and row[2] != UNSET:
                found.append(f"{where}, row `{name}`, column 'shipped manifest sets': it says {row[2]}, "
                             f"{default_manifest_path().name} leaves `{name}` out; write {UNSET}")
        for name in rows.keys() - properties.keys():
            found.append(f"{where}, row `{name}`: {source} declares no param `{name}`; remove the row, or move it "
                         "to the table of the registration that declares it")
    for name in sorted(shipped.keys() - documented):
        found.append(f"{default_manifest_path().name} sets `{name}`, which no table of README.md's {SECTION!r} has")
    return found


def _built_in_registrations(pm) -> list:
    return [*pm.get_pipeline_steps().values(), *pm.get_executors().values()]


def _shipped_params() -> dict:
    return json.loads(default_manifest_path().read_text(encoding="utf-8"))["params"]


def test_the_params_tables_give_the_schema_defaults_and_what_the_shipped_manifest_sets(plugin_manager):
    found = problems(README.read_text(encoding="utf-8"), _built_in_registrations(plugin_manager), _shipped_params())
    assert found == [], "\n".join(found)


def test_every_built_in_params_schema_has_its_table(plugin_manager):
    tables = params_tables(README.read_text(encoding="utf-8"))
    assert len(tables) == 3 and all(header == COLUMNS for header, _ in tables.values())
    rows = {name for _, table in tables.values() for name in table}
    assert {"rows" not in rows, "nn_max_epochs" in rows, "tree_rounds" in rows} == {True}


def test_a_wrong_cell_is_named_with_what_to_write(plugin_manager):
    readme = README.read_text(encoding="utf-8")
    registrations, shipped = _built_in_registrations(plugin_manager), _shipped_params()
    assert "| `nn_max_epochs` | `200` | `100` |" in readme
    wrong = readme.replace("| `nn_max_epochs` | `200` | `100` |", "| `nn_max_epochs` | `150` | `200` |")
    wrong = wrong.replace("| `vram_budget_fraction` | `0.85` | — |", "| `vram_budget_fraction` | `0.85` | `0.85` |")
    wrong = "\n".join(line for line in wrong.splitlines() if not line.startswith("| `tree_rounds` |"))

    found = problems(wrong, registrations, shipped)

    table = "README.md, table 'nn_batch executor'"
    assert f"{table}, row `nn_max_epochs`, column 'default': it says `150`, the schema " \
           "(watcher_plugins.schemas:nn_batch.params.schema.json) says `200`; write `200`" in found
    assert f"{table}, row `nn_max_epochs`, column 'shipped manifest sets': it says `200`, reinforcement.json " \
           "sets `100`; write `100`" in found
    assert f"{table}, row `vram_budget_fraction`, column 'shipped manifest sets': it says `0.85`, " \
           "reinforcement.json leaves `vram_budget_fraction` out; write —" in found
    assert any(line.startswith("README.md, table 'tree_parallel executor': no row for `tree_rounds`") and
               "| `tree_rounds` | `500` | `300` | boosting rounds cap" in line for line in found), found
    assert "reinforcement.json sets `tree_rounds`, which no table of README.md's '## Manifest params' has" in found
    assert len(found) == 5, found
