"""Several training runs in one `accelerate launch` (for the multi-process tests: the processes start once).

argv[1] is a JSON list of runs, each {"script": module name, "argv": [...], "copy": {...}, "env": {...}}:
- "copy": {"from": an earlier run's output folder, "drop": [names]} starts the run from a copy of that folder
  without those entries (a resumed run: without the last checkpoint); {"from": ..., "only": [names]} from a copy of
  just those entries (the context cache). The main process copies.
- "env" is set for the run: ACCELERATE_USE_FSDP "false" in a launch with an FSDP config makes a DDP run.
After each run every process writes probe-<rank>.pt in the run's output folder: the velocity the network predicts
as student and, inside the EMA teacher's swap, as teacher, for the same input (recorded at the run's last
validation, where every process of an FSDP2 run takes part); the bytes this process holds of the weights, the EMA
teacher, the gradients (at the last optimizer step; DeepSpeed keeps its own elsewhere), the AdamW state and
DeepSpeed's fp32 master copy; and under DDP and DeepSpeed its final weights.

accelerate 1.15 turns FSDP on only for GPU-type process groups; on CPU processes (gloo) this worker switches the
state to FSDP after accelerate set it up, as accelerate does on GPUs, so the trainer's FSDP2 path runs unchanged.
"""

import importlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch
from accelerate import PartialState
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

set_up_state = AcceleratorState.__init__


def set_up_state_with_fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs):
    set_up_state(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if self.distributed_type in (DistributedType.MULTI_CPU, DistributedType.FSDP):
        fsdp = os.environ.get("ACCELERATE_USE_FSDP") == "true"
        self.fsdp_plugin = (fsdp_plugin or FullyShardedDataParallelPlugin()) if fsdp else None
        self.distributed_type = DistributedType.FSDP if fsdp else DistributedType.MULTI_CPU
        PartialState._shared_state["distributed_type"] = self.distributed_type


def held(tensors):
    """Bytes of `tensors` this process holds (of an FSDP2 DTensor: its shard)."""
    local = [t.to_local() if isinstance(t, DTensor) else t for t in tensors if t is not None]
    return sum(t.numel() * t.element_size() for t in local)


def adam_state(optimizer):
    """AdamW's moment tensors, and DeepSpeed's fp32 master partition, as this process holds them."""
    inner = optimizer.optimizer  # accelerate's wrapper
    master = getattr(inner, "single_partition_of_fp32_groups", [])  # DeepSpeed ZeRO-1/2
    inner = getattr(inner, "optimizer", inner)
    moments = [value for state in inner.state.values() for key, value in state.items() if key != "step"]
    return moments, master


def probe(script, record):
    """Wrap the script's log_validation: record student and teacher predictions on the teacher view's input."""
    log_validation = getattr(script.log_validation, "__wrapped__", script.log_validation)  # an earlier run's

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
        moments, master = adam_state(accelerator._optimizers[0])
        for module in transformer.modules():  # FSDP2's root module keeps its gathered weights after a forward
            if isinstance(module, FSDPModule):
                module.reshard()
        record.update(latents=latents, timestep=timesteps[1], context=context, student=student, teacher=teacher,
                      again=again, bytes={**record.get("bytes", {}), "weights": held(transformer.parameters()),
                                          "ema": held(ema_teacher.shadow), "adam": held(moments),
                                          "master": held(master)})
        return log_validation(family, transformer, ema_teacher, validation, args, accelerator, step)

    recording.__wrapped__ = log_validation
    return recording


def count_gradients(script, record):
    """Wrap the script's optimizer_step: record the bytes of the gradients this process holds when it is called."""
    optimizer_step = getattr(script.optimizer_step, "__wrapped__", script.optimizer_step)

    def counting(accelerator, optimizer, lr_scheduler, parameters, max_grad_norm, loss):
        record.setdefault("bytes", {})["gradients"] = held(p.grad for p in parameters)
        return optimizer_step(accelerator, optimizer, lr_scheduler, parameters, max_grad_norm, loss)

    counting.__wrapped__ = optimizer_step
    return counting


if __name__ == "__main__":
    AcceleratorState.__init__ = set_up_state_with_fsdp_on_cpu
    os.environ["FORK_LAUNCHED"] = "1"  # accelerate then keeps the process group when a run ends, for the next one
    launched_with = dict(os.environ)
    for run in json.loads(sys.argv[1]):
        os.environ.update({**launched_with, **run.get("env", {})})
        script = importlib.import_module(run["script"])
        args = script.parse_args(run["argv"])
        rank = int(os.environ["RANK"])  # accelerate's state is the script's to set up (its process group)
        copy = run.get("copy")
        if copy and rank == 0:
            source, copying = Path(copy["from"]), Path(f"{args.output_dir}.copying")
            copying.mkdir(parents=True)
            for entry in source.iterdir():
                wanted = entry.name in copy["only"] if "only" in copy else entry.name not in copy["drop"]
                if wanted and entry.name != ".dopsd.lock" and not entry.name.startswith("probe-"):
                    (shutil.copytree if entry.is_dir() else shutil.copy2)(entry, copying / entry.name)
            copying.rename(args.output_dir)
        while copy and not os.path.isdir(args.output_dir):
            time.sleep(0.1)
        record = {}
        script.log_validation = probe(script, record)
        script.optimizer_step = count_gradients(script, record)
        model = script.main(args)
        if not isinstance(next(model.parameters()), DTensor):  # FSDP2's shards: the run's saved outputs tell
            record["weights"] = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        torch.save(record, Path(args.output_dir) / f"probe-{rank}.pt")
        # The next run's Accelerator sets up its own engine on the same processes.
        AcceleratorState._reset_state()
        GradientState._reset_state()
