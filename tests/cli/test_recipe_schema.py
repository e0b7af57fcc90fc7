"""hstu-opt recipe-schema, and the README's recipe field table generated from it."""

import json
import subprocess
import sys
from pathlib import Path

import yaml

from hstu_opt.recipe_doc import fields_table, table_in

ROOT = Path(__file__).resolve().parents[2]


def test_recipe_schema_validates_every_shipped_recipe_and_rejects_a_typo(tmp_path):
    schema = tmp_path / "recipe.schema.json"
    proc = subprocess.run([sys.executable, "-m", "hstu_opt", "recipe-schema", str(schema)], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(schema.read_text())
    assert doc["$schema"].endswith("2020-12/schema") and doc["additionalProperties"] is False
    assert doc["required"] == ["name", "version"]
    recipes = sorted((ROOT / "recipes").glob("*.yaml"))
    check = [sys.executable, "-m", "check_jsonschema", "--schemafile", str(schema)]
    proc = subprocess.run([*check, *map(str, recipes)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    typo = tmp_path / "typo.yaml"
    typo.write_text(yaml.safe_dump({"name": "x", "version": "1", "model": {"num_head": 2}}))
    proc = subprocess.run([*check, str(typo)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "num_head" in proc.stdout


def test_recipe_schema_to_stdout():
    proc = subprocess.run([sys.executable, "-m", "hstu_opt", "recipe-schema"], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and json.loads(proc.stdout)["title"] == "hstu-opt recipe"


def test_readme_recipe_table_is_the_generated_one():
    readme = (ROOT / "README.md").read_text()
    assert table_in(readme) == fields_table(), (
        "README.md's recipe field table differs from the recipe model: regenerate it with "
        "`python -m hstu_opt.recipe_doc README.md`")
