"""The Colab and Kaggle notebooks run: Colab's code cells execute on the tiny klein with the settings overridden;
Kaggle's differ only in their settings, log-in and upload cells (checked against the generator). As shipped, both stop
in their first cell, before cloning anything, until REPO_URL is set; a wrong REPO_URL stops there too. Both upload
cells save the photos a user picks (with stand-ins for the browser: Colab's files.upload, ipywidgets' FileUpload).

Skipped, as the notebooks' generator documents: cells tagged "hub" (log-in, upload to the Hub) and shell/magic lines
(! and %). The clone and the training cell's subprocess call are stand-ins here (a link to this checkout; the script
run in-process, to keep it fast); the command lines are the ones a user's notebook runs."""

import json
import os
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
    # Kaggle's code is Colab's (executed below) but for its settings, log-in and upload cells
    shared = [c for c in generator["KAGGLE"] if c["cell_type"] == "code" and not {"parameters", "hub", "upload"} & set(
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


def code_cells(name):
    return [cell for cell in json.loads((NOTEBOOKS / name).read_text())["cells"] if cell["cell_type"] == "code"]


def python_of(cell, repo_url=None):
    """A cell's Python, shell and magic lines left out; with `repo_url`, the REPO_URL line set to it (as a user
    edits it)."""
    source = "".join(line for line in cell["source"] if not line.lstrip().startswith(("!", "%")))
    if repo_url is not None:
        placeholder = 'REPO_URL = "https://github.com/YOUR-ACCOUNT/dopsd"'
        assert placeholder in source
        source = source.replace(placeholder, f"REPO_URL = {repo_url!r}")
    return source


def fake_clone(commands, checkout=ROOT, returncode=0):
    """subprocess.run for the first cell: `git clone URL dopsd` links `checkout` as dopsd (None: makes an empty
    folder); a non-zero `returncode` fails as git does for a repository that is not there."""
    def run(command, **kwargs):
        commands.append(command)
        assert command[:2] == ["git", "clone"] and command[-1] == "dopsd"
        assert kwargs["env"]["GIT_TERMINAL_PROMPT"] == "0"  # a wrong URL fails instead of asking for a password
        if returncode:
            return subprocess.CompletedProcess(command, returncode, "", "fatal: repository 'x' not found\n")
        if checkout is None:
            os.mkdir("dopsd")
        else:
            os.symlink(checkout, "dopsd")
        return subprocess.CompletedProcess(command, 0, "", "")
    return run


@pytest.mark.parametrize("name", ["dopsd_colab.ipynb", "dopsd_kaggle.ipynb"])
def test_the_first_cell_stops_until_the_repository_url_is_set(name, tmp_path, monkeypatch):
    """As shipped, the first code cell asks for REPO_URL and clones nothing; set to something that is not the
    trainer (a failed clone, a repository without the script), it stops there too, saying what to do."""
    first = code_cells(name)[0]
    assert first["source"][0].startswith("# >>> SET THIS") and first["source"][1].startswith("REPO_URL = ")
    commands = []
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(subprocess, "run", fake_clone(commands))
    with pytest.raises(ValueError, match="^Set REPO_URL at the top of this cell to the git URL of the D-OPSD"):
        exec(compile(python_of(first), name, "exec"), {})
    assert commands == [] and os.listdir(tmp_path) == []

    monkeypatch.setattr(subprocess, "run", fake_clone(commands, returncode=128))
    with pytest.raises(ValueError, match=r"^git clone https://example.org/typo failed \(fatal: repository 'x' not found"
                                         r"\): check REPO_URL"):
        exec(compile(python_of(first, "https://example.org/typo"), name, "exec"), {})

    monkeypatch.setattr(subprocess, "run", fake_clone(commands, checkout=None))
    with pytest.raises(ValueError, match="^https://example.org/other has no train_dopsd_lora.py: set REPO_URL"):
        exec(compile(python_of(first, "https://example.org/other"), name, "exec"), {})
    assert [c[-2] for c in commands] == ["https://example.org/typo", "https://example.org/other"]


def stand_in_display(monkeypatch):
    """IPython.display.display for a test run (notebooks have IPython; a test run need not): records what is shown."""
    shown = []
    ipython, display = types.ModuleType("IPython"), types.ModuleType("IPython.display")
    display.display = shown.append
    ipython.display = display
    monkeypatch.setitem(sys.modules, "IPython", ipython)
    monkeypatch.setitem(sys.modules, "IPython.display", display)
    return shown


@pytest.mark.parametrize("name", ["dopsd_colab.ipynb", "dopsd_kaggle.ipynb"])
def test_the_upload_cell_saves_the_photos_a_user_picks(name, tmp_path, monkeypatch):
    photo, caption = (CONCEPT / "chelsea-1.jpg").read_bytes(), b"sks cat"
    upload = next(cell for cell in code_cells(name) if "upload" in cell["metadata"].get("tags", []))
    namespace = {"DATA_DIR": str(tmp_path / "my_concept")}
    shown = stand_in_display(monkeypatch)
    if "colab" in name:  # google.colab.files.upload() returns {file name: bytes} once the user has picked them
        google, colab, files = (types.ModuleType(n) for n in ("google", "google.colab", "google.colab.files"))
        files.upload = lambda: {"a.jpg": photo, "a.txt": caption}
        google.colab, colab.files = colab, files
        for module in (google, colab, files):
            monkeypatch.setitem(sys.modules, module.__name__, module)
        exec(compile(python_of(upload), name, "exec"), namespace)
        picked = ["a.jpg", "a.txt"]
    else:  # ipywidgets.FileUpload: the cell shows it; its value changes when the user picks files
        widgets = types.ModuleType("ipywidgets")

        class FileUpload:
            def __init__(self, **kwargs):
                self.kwargs, self.observers = kwargs, []

            def observe(self, handler, names):
                self.observers.append((handler, names))

        widgets.FileUpload = FileUpload
        monkeypatch.setitem(sys.modules, "ipywidgets", widgets)
        exec(compile(python_of(upload), name, "exec"), namespace)
        [uploader] = shown
        assert uploader.kwargs == {"accept": "image/*,.txt", "multiple": True}
        [(handler, names)] = uploader.observers
        assert names == "value"
        # ipywidgets 8's value: a tuple of files; ipywidgets 7's: a dict by name with the name in "metadata"
        handler({"new": ({"name": "a.jpg", "type": "image/jpeg", "content": memoryview(photo)},)})
        handler({"new": {"a.txt": {"metadata": {"name": "a.txt"}, "content": caption}}})
        picked = ["a.jpg", "a.txt"]
    assert sorted(os.listdir(tmp_path / "my_concept")) == picked
    assert (tmp_path / "my_concept" / "a.jpg").read_bytes() == photo
    assert (tmp_path / "my_concept" / "a.txt").read_bytes() == caption


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

    commands, clones = [], []
    clone = fake_clone(clones)

    def run(command, **kwargs):
        if command[0] == "git":
            return clone(command, **kwargs)
        commands.append(command)
        assert command[1] == "train_dopsd_lora.py" and kwargs == {"check": True}
        script.main(script.parse_args(command[2:]))

    monkeypatch.setattr(subprocess, "run", run)
    shown = stand_in_display(monkeypatch)  # records what the samples cell shows
    monkeypatch.chdir(tmp_path)  # a fresh notebook's folder: the first cell clones the trainer and enters it
    namespace = {}
    for cell in notebook["cells"]:
        tags = cell["metadata"].get("tags", [])
        if cell["cell_type"] != "code" or {"hub", "upload"} & set(tags):
            continue
        source = python_of(cell, "https://example.org/dopsd.git" if "REPO_URL =" in "".join(cell["source"]) else None)
        exec(compile(source, f"{name}:{cell['id']}", "exec"), namespace)
        if "parameters" in tags:
            namespace.update(overrides)

    assert clones == [["git", "clone", "--depth", "1", "https://example.org/dopsd.git", "dopsd"]]
    assert os.getcwd() == str((tmp_path / "dopsd").resolve())  # the first cell entered the clone (here: ROOT)
    assert len(commands) == 1 and "--trigger_word" in commands[0]
    output = tmp_path / "lora"
    assert (output / script.LORA_WEIGHT_NAME).is_file() and (output / "README.md").is_file()
    assert [p.name for p in namespace["samples"]] == ["step-000001-prompt0-0.png", "step-000001-teacher-view.png"]
    assert [image.filename for image in shown] == [str(path) for path in namespace["samples"]]
