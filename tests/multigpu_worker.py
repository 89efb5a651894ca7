"""Several training runs in one `accelerate launch` (for the multi-process tests: the processes start once).

argv[1] is a JSON list of runs, each {"script": module name, "argv": [...], "resume": {"from": output_dir,
"drop": "checkpoint-N"}}: a run with "resume" first gets a copy of that finished run's output folder without its
checkpoint N (made by the main process). After each run every process writes probe-<rank>.pt in the run's output
folder: the velocity the network predicts as student and, inside the EMA teacher's swap, as teacher, for the same
input (recorded at the run's last validation, where every process of an FSDP2 run takes part), and under DDP and
DeepSpeed its final weights.

accelerate 1.15 turns FSDP on only for GPU-type process groups; on CPU processes (gloo) this worker switches the
state to FSDP after accelerate set it up, as accelerate does on GPUs, so the trainer's FSDP2 path runs unchanged.
"""

import importlib
import json
import os
import shutil
import sys
from pathlib import Path

import torch
from accelerate import PartialState
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

set_up_state = AcceleratorState.__init__


def set_up_state_with_fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs):
    set_up_state(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if os.environ.get("ACCELERATE_USE_FSDP") == "true" and self.distributed_type == DistributedType.MULTI_CPU:
        self.fsdp_plugin = fsdp_plugin or FullyShardedDataParallelPlugin()
        self.distributed_type = PartialState._shared_state["distributed_type"] = DistributedType.FSDP


def probe(script, output_dir, record):
    """Wrap the script's log_validation: record student and teacher predictions on the teacher view's input."""
    log_validation = script.log_validation

    def recording(family, transformer, ema_teacher, validation, args, accelerator, step):
        first = validation["teacher_view"]
        height, width = first["bucket"]
        timesteps, _ = family.rollout_schedule(args.rollout_steps, height, width)
        latents = family.initial_noise(1, height, width, torch.Generator().manual_seed(7))
        context = family.collate([first["student"]])
        transformer.eval()
        with torch.no_grad():
            student = family.predict(transformer, latents, timesteps[1], context)
            with ema_teacher.swapped_in():
                teacher = family.predict(transformer, latents, timesteps[1], context)
            again = family.predict(transformer, latents, timesteps[1], context)  # the student, put back
        record.update(latents=latents, timestep=timesteps[1], student=student, teacher=teacher, again=again)
        return log_validation(family, transformer, ema_teacher, validation, args, accelerator, step)

    return recording


if __name__ == "__main__":
    AcceleratorState.__init__ = set_up_state_with_fsdp_on_cpu
    for run in json.loads(sys.argv[1]):
        script = importlib.import_module(run["script"])
        args = script.parse_args(run["argv"])
        state = PartialState(cpu=os.environ.get("ACCELERATE_USE_CPU") == "true")  # as Accelerator() will
        if "resume" in run and state.is_main_process:
            shutil.copytree(run["resume"]["from"], args.output_dir, ignore=shutil.ignore_patterns(
                run["resume"]["drop"], "probe-*", ".dopsd.lock"))
        state.wait_for_everyone()
        record = {}
        script.log_validation = probe(script, args.output_dir, record)
        model = script.main(args)
        if not getattr(model, "_is_fsdp_managed_module", False) and "DTensor" not in str(type(next(model.parameters()))):
            record["weights"] = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        torch.save(record, Path(args.output_dir) / f"probe-{state.process_index}.pt")
