"""Run a training script's main() under `accelerate launch` and save this rank's final weights (for the DDP test)."""

import importlib
import sys
from pathlib import Path

from accelerate import PartialState
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

if __name__ == "__main__":
    script = importlib.import_module(sys.argv[1])
    args = script.parse_args(sys.argv[2:])
    model = script.main(args)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, Path(args.output_dir) / f"rank{PartialState().process_index}.safetensors")
