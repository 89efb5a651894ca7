"""Every bad input, in one table, run through both scripts' command line (in-process, `script.run()`).

The table proves, for each row and for each script the row applies to: the run stops with exit status 2, prints no
traceback, and its last line on stderr says what to fix (the text in the row). Where each check lives is part of the
row, and decides what else is proved:

- "parse_args": the argument parser refuses it; stderr is that one line, `error: ...` (no usage block before it). The
  model is not even looked at (`detect_family` fails the test if called) and nothing is written.
- "setup": refused while the model folder, the data, the checkpoints and the model family are read; the last line is
  `error: ...` (a loading progress bar may come before it), and nothing is written: no output folder, no change at
  all under the row's folder.
- "main": refused in main, against the transformer's layout (its modules, before its weights are loaded); the last
  line is `error: ...`, and still nothing is written (the first write, claim_output_dir, comes after every check).

A row applies to both scripts unless it names one: "lora" for the LoRA flags (--rank, --lora_alpha, --lora_layers),
"full" for what only full fine-tuning refuses (--quantize_base, a --train_layers prefix).
"""

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import CONCEPT, TINY_KLEIN, TINY_ZIMAGE, script_args

import train_dopsd_full as full_script
import train_dopsd_lora as lora_script


JPEG = (CONCEPT / "chelsea-1.jpg").read_bytes()


# -- what a row's files are: builders that make them in the row's own folder -----------------------------------------


def folder(files, name="data"):
    """A folder holding `files` ({name: bytes, or None for a sub-folder})."""
    def build(case):
        path = case / name
        path.mkdir()
        for file_name, content in files.items():
            if content is None:
                (path / file_name).mkdir()
            else:
                (path / file_name).write_bytes(content)
        return path
    return build


def missing(name):
    """A path that does not exist."""
    return lambda case: case / name


def a_file(case):
    """A plain file where a folder is expected."""
    (case / "a-file").write_text("x")
    return case / "a-file"


def below_a_file(case):
    """A folder that cannot be made: its parent is a plain file."""
    return a_file(case) / "below"


def symlink_loop(case):
    """A folder whose only image is a symlink to itself."""
    path = case / "loop"
    path.mkdir()
    (path / "a.jpg").symlink_to(path / "a.jpg")
    return path


def metadata(*records):
    """metadata.jsonl with one JSON object (or raw bytes) a line."""
    return b"".join((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n" for r in records)


# a dataset (--dataset_name) whose second image is truncated
TRUNCATED_ROW = folder({"a.jpg": JPEG, "b.jpg": JPEG[:3000], "metadata.jsonl": metadata(
    {"file_name": "a.jpg", "text": "x"}, {"file_name": "b.jpg", "text": "y"})}, name="dataset")
STABLE_DIFFUSION = folder({"model_index.json": json.dumps({"_class_name": "StableDiffusionPipeline"}).encode()},
                          name="sd")
NO_TORCHAO = ("torchao", "torchao.quantization")
NO_BITSANDBYTES = ("bitsandbytes",)


def deepspeed(config):
    """`accelerate launch`'s environment for a DeepSpeed config file holding `config`."""
    def build(case):
        (case / "deepspeed.json").write_text(json.dumps(config))
        return {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(case / "deepspeed.json")}
    return build


FSDP2 = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}


@dataclass(frozen=True)
class Bad:
    """One bad input: where it is refused, the extra flags (split on spaces), the text of the last stderr line, and
    what differs from a good run (builders or paths; the output folder's placeholder `{output}` may appear in
    `expected`)."""

    stage: str
    flags: object  # a string split on spaces, or a tuple of arguments
    expected: str
    data: object = CONCEPT  # --instance_data_dir
    dataset: object = None  # --dataset_name instead of --instance_data_dir
    model: object = TINY_ZIMAGE
    output: object = None  # default: a fresh "out" folder
    only: str = None  # "lora" or "full"; None: both scripts
    hide: tuple = ()  # modules made unimportable for this row
    env: object = None  # environment variables (what `accelerate launch` sets from its config), or their builder


BAD_INPUTS = [
    # -- refused by the argument parser, before the model is looked at --
    Bad("parse_args", "--learning_rate 0", "argument --learning_rate: must be greater than 0.0 (got 0)"),
    Bad("parse_args", "--learning_rate -0.0001", "--learning_rate: must be greater than 0.0"),  # not taken for a flag
    Bad("parse_args", "--learning_rate nan", "--learning_rate: must be greater than 0.0 (got nan)"),
    Bad("parse_args", "--learning_rate fast", "argument --learning_rate: 'fast' is not a number"),
    Bad("parse_args", "--max_grad_norm -1", "argument --max_grad_norm: must be greater than 0.0"),
    Bad("parse_args", "--max_grad_norm 0", "argument --max_grad_norm: must be greater than 0.0"),
    Bad("parse_args", "--seed -1", "argument --seed: must be in [0, 2147483648) (got -1)"),
    Bad("parse_args", "--lr_scheduler cosine_annealing", "argument --lr_scheduler: invalid choice"),
    Bad("parse_args", "--report_to tensorbord", "argument --report_to: invalid choice"),
    Bad("parse_args", "--lr_warmup_steps -5", "argument --lr_warmup_steps: must be at least 0 (got -5)"),
    Bad("parse_args", "--lr_num_cycles 0", "argument --lr_num_cycles: must be at least 1 (got 0)"),
    Bad("parse_args", "--adam_beta2 1.0", "argument --adam_beta2: must be in [0.0, 1.0) (got 1.0)"),
    Bad("parse_args", "--adam_epsilon=-1e-8", "argument --adam_epsilon: must be at least 0.0 (got -1e-8)"),
    Bad("parse_args", "--checkpoints_total_limit 0", "argument --checkpoints_total_limit: must be at least 1"),
    Bad("parse_args", "--rollout_steps 0", "argument --rollout_steps: must be at least 1 (got 0)"),
    Bad("parse_args", "--max_train_steps 2.5", "argument --max_train_steps: '2.5' is not a whole number"),
    Bad("parse_args", "--resolution 32", "argument --resolution: must be in [64, 4096] (got 32)"),
    Bad("parse_args", "--resolution 100000", "argument --resolution: must be in [64, 4096] (got 100000)"),
    Bad("parse_args", "--resolution 72", "argument --resolution: must be a multiple of 16 (got 72)"),
    Bad("parse_args", "--reference_resolution 8192", "argument --reference_resolution: must be in [64, 4096]"),
    Bad("parse_args", "--ema_decay 1.5", "argument --ema_decay: must be in [0.0, 1.0] (got 1.5)"),
    Bad("parse_args", ("--trigger_word", "\u200b \ufeff"), "argument --trigger_word: is empty or shows no visible"),
    Bad("parse_args", ("--trigger_word", "sks\nperson"), "argument --trigger_word: must be one line"),
    Bad("parse_args", ("--instance_prompt", "   "), "argument --instance_prompt: is empty or shows no visible"),
    Bad("parse_args", "--dataset_name my/dataset", "give exactly one of --instance_data_dir or --dataset_name"),
    Bad("parse_args", "", "--output_dir {output} is a file; give a folder", output=a_file),
    Bad("parse_args", "", "lies inside the training data", output=lambda case: case / "data" / "out",
        data=folder({"a.jpg": JPEG, "a.txt": b"sks"})),
    Bad("parse_args", "", "lies inside the training data", output=lambda case: case / "data",
        data=folder({"a.jpg": JPEG, "a.txt": b"sks"})),
    Bad("parse_args", "--rank 0", "argument --rank: must be at least 1 (got 0)", only="lora"),
    Bad("parse_args", "--lora_alpha 0", "argument --lora_alpha: must be at least 1 (got 0)", only="lora"),
    Bad("parse_args", "--lora_layers ,", "argument --lora_layers: give at least one comma-separated module name",
        only="lora"),
    Bad("parse_args", "--train_layers= , ", "argument --train_layers: give at least one comma-separated module name",
        only="full"),
    Bad("parse_args", "--quantize_encoders int8", "--quantize_encoders int8 needs bitsandbytes", hide=NO_BITSANDBYTES),
    # full fine-tuning refuses every --quantize_base (so the missing-backend row below is the LoRA script's)
    Bad("parse_args", "--quantize_base nf4", "use train_dopsd_lora.py for a quantised base",
        model=missing("no-such-model"), only="full"),
    Bad("parse_args", "--quantize_base fp8", "--quantize_base fp8 needs torchao", model=missing("no-such-model"),
        only="lora", hide=NO_TORCHAO),
    *([Bad("parse_args", "--offload", "--offload needs a CUDA GPU: it keeps the base in host RAM and brings each"
           " layer to the GPU; without a GPU the run is on the CPU anyway, so drop the flag", only="lora")]
      if not torch.cuda.is_available() else []),

    # -- refused while setup reads the model folder, the data and the checkpoints and builds the model family, before
    #    anything is written --
    Bad("setup", "", "no-model does not exist: check the path", model=missing("no-model")),
    Bad("setup", "", "is a StableDiffusionPipeline; D-OPSD supports Z-Image-Turbo, FLUX.2-klein",
        model=STABLE_DIFFUSION),
    Bad("setup", "", "does not exist", data=missing("missing")),
    Bad("setup", "", "holds no images", data=folder({})),
    Bad("setup", "--instance_prompt sks", "broken.jpg",
        data=folder({"broken.jpg": b"\xff\xd8\xff\xe0 not really a jpeg"})),
    Bad("setup", "--instance_prompt sks", "truncated.jpg", data=folder({"truncated.jpg": JPEG[:2000]})),
    Bad("setup", "--instance_prompt sks", "cannot read image", data=symlink_loop),
    Bad("setup", "", "a.jpg has no caption: add a .txt caption or pass --instance_prompt",
        data=folder({"a.jpg": JPEG})),
    Bad("setup", "", "caption file for", data=folder({"a.jpg": JPEG, "a.txt": b"\n  \n"})),
    Bad("setup", "", "caption file for", data=folder({"a.jpg": JPEG, "a.txt": "\u200b\ufeff \u2060\n".encode()})),
    Bad("setup", "", "a.txt is not UTF-8 text (byte 0xe9",
        data=folder({"a.jpg": JPEG, "a.txt": "sks caf\xe9".encode("latin-1")})),
    Bad("setup", "", "cannot read caption file", data=folder({"a.jpg": JPEG, "a.txt": None})),
    Bad("setup", "", "names missing.jpg, which does not exist", data=folder({"a.jpg": JPEG, "metadata.jsonl": metadata(
        {"file_name": "a.jpg", "text": "x"}, {"file_name": "missing.jpg"})})),
    Bad("setup", "", "is not a JSON object", data=folder({"a.jpg": JPEG, "metadata.jsonl": b"{oops\n"})),
    Bad("setup", "", "metadata.jsonl:1 text: a caption must be a text or a list of texts, not 42",
        data=folder({"a.jpg": JPEG, "metadata.jsonl": metadata({"file_name": "a.jpg", "text": 42})})),
    Bad("setup", "", "metadata.jsonl:1 text: a caption must be a text or a list of texts, not ['sks', 7]",
        data=folder({"a.jpg": JPEG, "metadata.jsonl": metadata({"file_name": "a.jpg", "text": ["sks", 7]})})),
    Bad("setup", "", "metadata.jsonl ('utf-8' codec can't decode",
        data=folder({"a.jpg": JPEG, "metadata.jsonl": b'{"file_name": "a.jpg", "text": "caf\xe9"}'})),
    Bad("setup", "--caption_column text", "cannot read the image of dataset row 1", dataset=TRUNCATED_ROW),
    Bad("setup", "--caption_column text --image_column text",
        "dataset column 'text' holds no images; set --image_column to image", dataset=TRUNCATED_ROW),
    Bad("setup", "--resume_from_checkpoint checkpoint-7", "--resume_from_checkpoint checkpoint-7 does not exist"),
    Bad("setup", "--teacher_context edit", "--teacher_context edit is not available"),
    Bad("setup", "--text_encoder_out_layers 1 2", "--text_encoder_out_layers applies to FLUX.2-klein only, not to"
        " Z-Image-Turbo"),  # another family's own flag
    Bad("setup", "--reference_resolution 64", "--reference_resolution applies to FLUX.2-klein only, not to"
        " Z-Image-Turbo"),  # klein's own flag
    Bad("setup", "--teacher_context vlm --reference_resolution 64", "--reference_resolution applies to"
        " FLUX.2-klein's edit teacher only", model=TINY_KLEIN),
    Bad("setup", ("--teacher_vlm_name_or_path", "Qwen/Qwen3-VL-4B-Instruct"), "--teacher_vlm_name_or_path applies to"
        " the vlm teacher only, not to FLUX.2-klein's edit teacher: add --teacher_context vlm", model=TINY_KLEIN),
    Bad("setup", "", "cannot write to --output_dir", output=below_a_file),
    # a DeepSpeed or FSDP setup the trainer cannot honour, and processes accelerate did not join
    Bad("setup", "", "DeepSpeed ZeRO-3 shards the weights the EMA teacher swaps in: use ZeRO-2",
        env=deepspeed({"zero_optimization": {"stage": 3}}), only="lora"),
    Bad("setup", "", "DeepSpeed ZeRO-3 shards the weights the EMA teacher swaps in: use FSDP2",
        env=deepspeed({"zero_optimization": {"stage": 3}}), only="full"),
    Bad("setup", "", "DeepSpeed offload_param moves the weights the EMA teacher swaps in to the CPU",
        env=deepspeed({"zero_optimization": {"stage": 2, "offload_param": {"device": "cpu"}}})),
    Bad("setup", "--train_batch_size 2", "the DeepSpeed config sets train_micro_batch_size_per_gpu to 4, but"
        " --train_batch_size gives 2", env=deepspeed({"zero_optimization": {"stage": 2},
                                                       "train_micro_batch_size_per_gpu": 4})),
    Bad("setup", "", "the DeepSpeed config sets gradient_clipping to 0.5, but --max_grad_norm gives 1.0",
        env=deepspeed({"zero_optimization": {"stage": 2}, "gradient_clipping": 0.5})),
    Bad("setup", "", "cannot read the DeepSpeed config",
        env={"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_CONFIG_FILE": "no-such-config.json"}),
    Bad("setup", "", "FSDP is for full fine-tuning (train_dopsd_full.py)", env=FSDP2, only="lora"),
    Bad("setup", "", "set fsdp_version: 2", env={**FSDP2, "FSDP_VERSION": "1"}, only="full"),
    Bad("setup", "", "set fsdp_offload_params: false", env={**FSDP2, "FSDP_OFFLOAD_PARAMS": "true"}, only="full"),
    Bad("setup", "", "set fsdp_activation_checkpointing: false and pass --gradient_checkpointing instead",
        env={**FSDP2, "FSDP_ACTIVATION_CHECKPOINTING": "true"}, only="full"),
    Bad("setup", "--compile", "--compile is not supported with FSDP2", env=FSDP2, only="full"),
    Bad("setup", "--use_8bit_adam", "--use_8bit_adam is not supported with FSDP2", env=FSDP2, only="full"),
    Bad("setup", "", "2 processes were launched, but accelerate joined them into no process group",
        env={"WORLD_SIZE": "2"}),

    # -- refused in main, against the transformer's layout, before anything is written --
    Bad("main", "--lora_layers to_q,not_a_layer", "'not_a_layer' matches no linear layer", only="lora"),
    Bad("main", "--train_layers not_a_layer", "--train_layers entry 'not_a_layer' matches no parameter", only="full"),
]

SCRIPTS = {"lora": lora_script, "full": full_script}


def build(what, case):
    return what(case) if callable(what) else what


def tree(path):
    """Every entry below `path` with its kind, size and modification time (symlinks not followed)."""
    entries = {}
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            stat = os.lstat(os.path.join(root, name))
            entries[os.path.relpath(os.path.join(root, name), path)] = (stat.st_mode, stat.st_size, stat.st_mtime_ns)
    return entries


def looked_at_the_model(args):
    pytest.fail("the model was looked at before the flags were checked")


@pytest.mark.parametrize("kind", SCRIPTS)
def test_every_bad_input_is_one_clear_line(kind, tmp_path, capsys):
    script = SCRIPTS[kind]
    prog = Path(script.__file__).name
    rows = [row for row in BAD_INPUTS if row.only in (None, kind)]
    for index, row in enumerate(rows):
        case = tmp_path / f"row-{index:02d}"
        case.mkdir()
        output = build(row.output, case) if row.output else case / "out"
        flags = row.flags.split() if isinstance(row.flags, str) else row.flags
        argv = script_args(output, build(row.model, case), *flags, data=build(row.data, case))
        if row.dataset:
            at = argv.index("--instance_data_dir")
            argv[at:at + 2] = ["--dataset_name", str(build(row.dataset, case))]
        env = build(row.env, case) if row.env else {}
        before = tree(case)
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(sys, "argv", [prog, *argv])
            for name, value in env.items():
                patch.setenv(name, value)
            for module in row.hide:
                patch.setitem(sys.modules, module, None)
            if row.stage == "parse_args":
                patch.setattr(script, "detect_family", looked_at_the_model)
            with pytest.raises(SystemExit) as exit_info:
                script.run()
        script.release_output_dir(output)
        err = capsys.readouterr().err.strip()
        context = f"{kind} row {index}: {row}\nstderr ends:\n{err[-1500:]}"
        assert exit_info.value.code == 2, context
        assert "Traceback" not in err, context
        last = err.splitlines()[-1]
        assert row.expected.format(output=output) in last, context
        assert last.startswith("error: "), context
        if row.stage == "parse_args":
            assert err.splitlines() == [last], context
        assert not (case / "out").exists(), context  # nothing is written before the input is checked
        assert tree(case) == before, context


@pytest.mark.parametrize("kind", SCRIPTS)
def test_a_good_learning_rate_parses_exactly(kind, tmp_path):
    script = SCRIPTS[kind]
    assert script.parse_args(script_args(tmp_path / "out", TINY_ZIMAGE, "--learning_rate", 3e-6)).learning_rate == 3e-6


@pytest.mark.parametrize("library, flag", [("bitsandbytes", "--quantize_base nf4"), ("torchao", "--quantize_base fp8")])
def test_an_optional_library_that_fails_to_import_is_named_not_a_traceback(tmp_path, library, flag):
    """A bitsandbytes or torchao that raises something other than ImportError (a CUDA set-up error) would break
    `import diffusers`: the script hides it, imports, and the flag that needs it names the cause in one line."""
    import subprocess

    broken = tmp_path / "site" / library
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text('raise RuntimeError("CUDA Setup failed despite GPU being available")')
    code = "import sys, train_dopsd_lora as s; print(sorted(s.BROKEN_LIBRARIES)); s.run()"
    argv = script_args(tmp_path / "out", TINY_ZIMAGE, *flag.split())
    path = f"{broken.parent}{os.pathsep}{os.path.dirname(lora_script.__file__)}"
    result = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, cwd=tmp_path,
                            env={**os.environ, "PYTHONPATH": path})
    assert result.stdout.strip() == f"['{library}']", result.stderr[-2000:]
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].endswith(
        f"needs {library} (it is installed but fails to import: RuntimeError: CUDA Setup failed despite GPU being"
        " available); install or repair it, or drop the flag")
