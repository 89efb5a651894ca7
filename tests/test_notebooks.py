"""The Colab and Kaggle notebooks run: Colab's code cells execute on the tiny klein with the settings overridden;
Kaggle's differ only in their settings and log-in cells (checked against the generator).

Skipped, as the notebooks' generator documents: cells tagged "hub" (log-in, upload) and "upload" (interactive), and
shell/magic lines (! and %). The training cell's subprocess call runs the script in-process here, to keep it fast;
the command line it builds is the one a user's notebook runs."""

import json
import shutil
import subprocess
import sys
import types

import pytest
from conftest import CONCEPT, ROOT, TINY_KLEIN, lora_script as script


NOTEBOOKS = ROOT / "examples" / "notebooks"


def test_notebooks_are_what_their_generator_writes(tmp_path):
    import runpy

    generator = runpy.run_path(str(NOTEBOOKS / "make_notebooks.py"))
    for name, cells in (("dopsd_colab.ipynb", generator["COLAB"]), ("dopsd_kaggle.ipynb", generator["KAGGLE"])):
        written = json.loads((NOTEBOOKS / name).read_text())
        expected = generator["notebook"](generator["with_ids"](cells, name.split(".")[0]))
        assert written == expected, f"{name} is stale: run python examples/notebooks/make_notebooks.py"
    # Kaggle's code is Colab's (executed below) but for its settings and log-in cells
    shared = [c for c in generator["KAGGLE"] if c["cell_type"] == "code" and not {"parameters", "hub"} & set(
        c["metadata"].get("tags", []))]
    assert shared and all(cell in generator["COLAB"] for cell in shared)
    kaggle_settings = next(c for c in generator["KAGGLE"] if "parameters" in c["metadata"].get("tags", []))
    colab_settings = next(c for c in generator["COLAB"] if "parameters" in c["metadata"].get("tags", []))
    names = [line.split("=")[0].strip() for line in colab_settings["source"] if "=" in line and line[0].isupper()]
    assert names == [line.split("=")[0].strip() for line in kaggle_settings["source"] if "=" in line
                     and line[0].isupper()]


@pytest.mark.parametrize("name", ["dopsd_colab.ipynb", "dopsd_kaggle.ipynb"])
def test_notebooks_are_valid_nbformat_4(name):
    notebook = json.loads((NOTEBOOKS / name).read_text())
    assert notebook["nbformat"] == 4 and notebook["metadata"]["kernelspec"]["language"] == "python"
    for cell in notebook["cells"]:
        assert {"cell_type", "metadata", "source", "id"} <= set(cell)
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and cell["execution_count"] is None


def test_notebook_code_runs_on_the_tiny_model(tmp_path, monkeypatch):
    name = "dopsd_colab.ipynb"
    notebook = json.loads((NOTEBOOKS / name).read_text())

    data = tmp_path / "my_concept"
    shutil.copytree(CONCEPT, data)
    for caption in data.glob("*.txt"):  # half the images captioned, half left to INSTANCE_PROMPT
        if caption.stem.endswith(("1", "2")):
            caption.unlink()
    overrides = {"MODEL_ID": str(TINY_KLEIN), "DATA_DIR": str(data), "OUTPUT_DIR": str(tmp_path / "lora"),
                 "EXTRA_FLAGS": ["--resolution", "64", "--max_train_steps", "1", "--gradient_accumulation_steps", "1",
                                 "--rollout_steps", "2", "--validation_steps", "1", "--validation_inference_steps", "2",
                                 "--report_to", "none", "--rank", "4", "--lora_alpha", "4"]}

    commands = []

    def run_in_process(command, check):
        commands.append(command)
        assert command[1] == "train_dopsd_lora.py" and check
        script.main(script.parse_args(command[2:]))

    monkeypatch.setattr(subprocess, "run", run_in_process)
    # Notebooks have IPython; a test run need not: a stand-in display() records what the samples cell shows.
    shown = []
    ipython, display = types.ModuleType("IPython"), types.ModuleType("IPython.display")
    display.display = shown.append
    ipython.display = display
    monkeypatch.setitem(sys.modules, "IPython", ipython)
    monkeypatch.setitem(sys.modules, "IPython.display", display)
    monkeypatch.chdir(ROOT)
    namespace = {}
    for cell in notebook["cells"]:
        tags = cell["metadata"].get("tags", [])
        if cell["cell_type"] != "code" or {"hub", "upload"} & set(tags):
            continue
        source = "".join(line for line in cell["source"] if not line.lstrip().startswith(("!", "%")))
        exec(compile(source, f"{name}:{cell['id']}", "exec"), namespace)
        if "parameters" in tags:
            namespace.update(overrides)

    assert len(commands) == 1 and "--trigger_word" in commands[0]
    output = tmp_path / "lora"
    assert (output / script.LORA_WEIGHT_NAME).is_file() and (output / "README.md").is_file()
    assert [p.name for p in namespace["samples"]] == ["step-000001-prompt0-0.png", "step-000001-teacher-view.png"]
    assert [image.filename for image in shown] == [str(path) for path in namespace["samples"]]
