"""Write dopsd_colab.ipynb and dopsd_kaggle.ipynb (nbformat 4) from the cells below: python make_notebooks.py

Both notebooks share every cell but the introduction, the settings, the log-in and the photo upload. The first code
cell holds the one setting a notebook cannot guess, REPO_URL (this trainer's git repository: your fork or copy), and
stops with a message until it is set. Cell tags that tests/test_notebooks.py honours: "parameters" (the settings a test
overrides), "hub" (log-in and upload to the Hub, skipped in the test), "upload" (interactive photo upload, run with
stand-ins for the browser); lines starting with ! or % are shell/magic lines, skipped.
"""

import json
from pathlib import Path


HERE = Path(__file__).resolve().parent
REPO_URL = "https://github.com/YOUR-ACCOUNT/dopsd"  # the placeholder the first cell refuses until it is replaced


def markdown(text):
    return {"cell_type": "markdown", "metadata": {}, "source": text.strip("\n").splitlines(keepends=True)}


def code(text, *tags):
    return {"cell_type": "code", "execution_count": None, "metadata": {"tags": list(tags)} if tags else {},
            "outputs": [], "source": text.strip("\n").splitlines(keepends=True)}


INSTALL = code(f"""
# >>> SET THIS: the git URL of the D-OPSD trainer's repository (your fork or copy of it), then run the cell. <<<
REPO_URL = "{REPO_URL}"

# Install: the trainer and its requirements. torch is preinstalled here and is kept.
import os
import subprocess
from pathlib import Path

if "YOUR-ACCOUNT" in REPO_URL:
    raise ValueError("Set REPO_URL at the top of this cell to the git URL of the D-OPSD trainer's repository (your"
                     " fork or copy of it), then run this cell again.")
if not Path("train_dopsd_lora.py").is_file():  # not in the trainer's folder yet
    if not Path("dopsd").exists():
        clone = subprocess.run(["git", "clone", "--depth", "1", REPO_URL, "dopsd"], capture_output=True, text=True,
                               env={{**os.environ, "GIT_TERMINAL_PROMPT": "0"}})  # a wrong URL fails, never asks
        if clone.returncode:
            reason = (clone.stderr.strip().splitlines() or [f"exit status {{clone.returncode}}"])[-1]
            raise ValueError(f"git clone {{REPO_URL}} failed ({{reason}}): check REPO_URL at the top of this cell, then"
                             " run it again.")
    if not Path("dopsd", "train_dopsd_lora.py").is_file():
        raise ValueError(f"{{REPO_URL}} has no train_dopsd_lora.py: set REPO_URL to the D-OPSD trainer's repository,"
                         " delete the dopsd folder (!rm -rf dopsd) and run this cell again.")
    os.chdir("dopsd")
!pip install -q -r requirements.txt
""")

IMAGES = markdown("""
## Your images

Put 5-30 photos of your concept in `DATA_DIR` (any size; at least 64 px). A caption per image is optional: a
same-name `.txt` file next to it, or `INSTANCE_PROMPT` for all images without one. `TRIGGER_WORD` is put in front of
every caption that lacks it; use it in your prompts later. Or upload files with the next cell.
""")

UPLOAD_COLAB = code("""
import os
from google.colab import files

os.makedirs(DATA_DIR, exist_ok=True)
for name, data in files.upload().items():
    with open(os.path.join(DATA_DIR, name), "wb") as f:
        f.write(data)
""", "upload")

UPLOAD_KAGGLE = code("""
# Choose your photos (and .txt captions) with the button: each is saved to DATA_DIR as it arrives, then run the next
# cells. For many or large photos add them as a Kaggle dataset instead and set DATA_DIR to /kaggle/input/<name>.
import os

import ipywidgets
from IPython.display import display

os.makedirs(DATA_DIR, exist_ok=True)


def save_uploads(change):
    # ipywidgets 8: a tuple of {"name", "content", ...}; ipywidgets 7: {name: {"metadata": {"name", ...}, "content"}}
    files = change["new"].values() if isinstance(change["new"], dict) else change["new"]
    for file in files:
        name = os.path.basename(file["name"] if "name" in file else file["metadata"]["name"])
        with open(os.path.join(DATA_DIR, name), "wb") as f:
            f.write(bytes(file["content"]))
        print(f"saved {name}")


uploader = ipywidgets.FileUpload(accept="image/*,.txt", multiple=True)
uploader.observe(save_uploads, names="value")
display(uploader)
""", "upload")

CHECK_DATA = code("""
from pathlib import Path

folder = Path(DATA_DIR)
suffixes = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"}
images = [p for p in sorted(folder.iterdir()) if p.suffix.lower() in suffixes] if folder.is_dir() else []
if not images:
    raise ValueError(f"no photos in {DATA_DIR}: add them (the cell above uploads them), then run this cell again.")
captioned = [p for p in images if p.with_suffix(".txt").exists()]
print(f"{len(images)} images in {DATA_DIR}, {len(captioned)} with a caption file")
""")

TRAIN = code("""
import subprocess
import sys

command = [
    sys.executable, "train_dopsd_lora.py",
    "--pretrained_model_name_or_path", MODEL_ID,
    "--instance_data_dir", DATA_DIR,
    "--instance_prompt", INSTANCE_PROMPT,
    "--trigger_word", TRIGGER_WORD,
    "--validation_prompt", VALIDATION_PROMPT,
    "--output_dir", OUTPUT_DIR,
    "--hub_model_id", HUB_MODEL_ID,
    *EXTRA_FLAGS,
]
subprocess.run(command, check=True)  # after an interruption, run it again with "--resume_from_checkpoint", "latest"
""")

SAMPLES = code("""
from IPython.display import display
from PIL import Image

samples = sorted(Path(OUTPUT_DIR, "samples").glob("*.png"))
for path in samples:
    print(path.name)
    display(Image.open(path))
""")

PUSH = code("""
# Upload the LoRA, its model card and the sample images (not the checkpoints and caches) to the Hub.
from huggingface_hub import create_repo, upload_folder

repo_id = create_repo(HUB_MODEL_ID, exist_ok=True).repo_id
upload_folder(repo_id=repo_id, folder_path=OUTPUT_DIR,
              ignore_patterns=["checkpoint-*", "checkpoint-*/*", "context_cache/*", "logs/*", "*.tmp"])
print(f"https://huggingface.co/{repo_id}")
""", "hub")

USE = markdown("""
## Use it

diffusers: `pipe.load_lora_weights("<your user>/<HUB_MODEL_ID>")` on the same base pipeline. ComfyUI / Forge: download
`pytorch_lora_weights.safetensors` into `models/loras` and load it at strength 1.0 (same effect as in diffusers).
""")


def settings(model_id, data_dir, flags, comment):
    return code(f"""
# Settings. {comment}
MODEL_ID = "{model_id}"
DATA_DIR = "{data_dir}"
TRIGGER_WORD = "sks"
INSTANCE_PROMPT = "a photo of sks dog"       # caption for images without a .txt file
VALIDATION_PROMPT = "a photo of sks dog on the beach"
OUTPUT_DIR = "sks-dog-lora"
HUB_MODEL_ID = "sks-dog-lora"                # becomes <your user>/sks-dog-lora after the log-in cell
EXTRA_FLAGS = {flags}
""", "parameters")


COLAB_FLAGS = """[
    "--mixed_precision", "bf16", "--gradient_checkpointing", "--use_8bit_adam",
    "--max_train_steps", "1000", "--checkpointing_steps", "250", "--validation_steps", "250",
]
# Z-Image-Turbo (Runtime > Change runtime type > A100, or L4):
# MODEL_ID = "Tongyi-MAI/Z-Image-Turbo"   and add "--learning_rate", "1e-4" to EXTRA_FLAGS if you like"""

KAGGLE_FLAGS = """[
    "--mixed_precision", "fp16", "--gradient_checkpointing", "--use_8bit_adam", "--resolution", "768",
    "--max_train_steps", "1000", "--checkpointing_steps", "250", "--validation_steps", "250",
]"""

LOGIN_COLAB = code("""
# Log in to the Hub (needed for the upload; FLUX.2-klein-9B also needs its terms accepted on its model page).
from huggingface_hub import notebook_login, whoami

notebook_login()
HUB_MODEL_ID = f"{whoami()['name']}/{HUB_MODEL_ID.split('/')[-1]}"
""", "hub")

LOGIN_KAGGLE = code("""
# Log in to the Hub with a Kaggle secret named HF_TOKEN (Add-ons > Secrets; enable Internet in the settings).
import os

from huggingface_hub import whoami
from kaggle_secrets import UserSecretsClient

os.environ["HF_TOKEN"] = UserSecretsClient().get_secret("HF_TOKEN")
HUB_MODEL_ID = f"{whoami()['name']}/{HUB_MODEL_ID.split('/')[-1]}"
""", "hub")


def notebook(cells):
    return {"cells": cells, "metadata": {"accelerator": "GPU", "kernelspec": {"display_name": "Python 3",
                                                                               "language": "python", "name": "python3"},
                                         "language_info": {"name": "python"}},
            "nbformat": 4, "nbformat_minor": 5}


def with_ids(cells, prefix):
    return [{**cell, "id": f"{prefix}-{i}"} for i, cell in enumerate(cells)]


COLAB = [
    markdown("""
# D-OPSD LoRA on Colab

Teach FLUX.2-klein-4B (or Z-Image-Turbo) your concept and keep its 4-8-step sampling (D-OPSD, arXiv 2605.05204).
**Runtime > Change runtime type**: klein-4B on an **L4** (24 GB; the free T4 has no bf16 and has not been measured
with this trainer), Z-Image-Turbo on an **A100** (or L4). About 1000 steps take a few hours.

**First**: set `REPO_URL` at the top of the next cell to the git URL of the D-OPSD trainer's repository (your fork or
copy); the cell stops with this reminder until it is set.
"""),
    INSTALL,
    settings("black-forest-labs/FLUX.2-klein-4B", "/content/my_concept", COLAB_FLAGS, "klein-4B on an L4."),
    LOGIN_COLAB, IMAGES, UPLOAD_COLAB, CHECK_DATA, TRAIN, SAMPLES, PUSH, USE,
]

KAGGLE = [
    markdown("""
# D-OPSD LoRA on Kaggle

Teach FLUX.2-klein-4B your concept and keep its 4-step sampling (D-OPSD, arXiv 2605.05204). **Settings**:
Accelerator GPU T4 x2 or P100, Internet on. Both are 16 GB cards **without bf16**: the run uses fp16 with a gradient
scaler at 768 px. This configuration has not been measured yet; if it runs out of memory lower `--resolution` or use
Colab's L4. Upload your photos with the upload cell, or add them as a Kaggle dataset and set `DATA_DIR` to it
(`/kaggle/input/<name>`).

**First**: set `REPO_URL` at the top of the next cell to the git URL of the D-OPSD trainer's repository (your fork or
copy); the cell stops with this reminder until it is set.
"""),
    INSTALL,
    settings("black-forest-labs/FLUX.2-klein-4B", "/kaggle/working/my_concept", KAGGLE_FLAGS,
             "Kaggle T4 / P100 (16 GB, no bf16). A Kaggle dataset as DATA_DIR: /kaggle/input/<name>"),
    LOGIN_KAGGLE, IMAGES, UPLOAD_KAGGLE, CHECK_DATA, TRAIN, SAMPLES, PUSH, USE,
]


if __name__ == "__main__":
    for name, cells in (("dopsd_colab.ipynb", COLAB), ("dopsd_kaggle.ipynb", KAGGLE)):
        text = json.dumps(notebook(with_ids(cells, name.split(".")[0])), indent=1, ensure_ascii=False) + "\n"
        (HERE / name).write_text(text)
        print(f"wrote {HERE / name}")
