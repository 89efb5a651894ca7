"""End to end on the tiny FLUX.2-klein with both teacher kinds: the LoRA loads in the stock pipeline and changes it."""


import logging

import pytest
import torch
from conftest import load_lora_into_pipeline, TINY_KLEIN, run_in_process, script_args

from diffusers import Flux2KleinPipeline


@pytest.mark.parametrize("teacher", ["edit", "vlm"])
def test_klein_lora_trains_loads_and_changes_images(tmp_path, teacher, caplog):
    with caplog.at_level(logging.INFO):
        run_in_process(script_args(tmp_path, TINY_KLEIN, "--teacher_context", teacher, "--max_train_steps", 2,
                                   "--learning_rate", 1e-3, "--rank", 8, "--lora_alpha", 8,
                                   "--validation_prompt", "a photo of sks cat", "--validation_steps", 2))
    assert f"teacher={teacher}" in caplog.text and "lr=0.001" in caplog.text
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == [
        "step-000002-prompt0-0.png", "step-000002-teacher-view.png"]
    pipe = Flux2KleinPipeline.from_pretrained(TINY_KLEIN)
    pipe.set_progress_bar_config(disable=True)

    def generate():
        return pipe(prompt="a photo of sks cat", height=64, width=64, num_inference_steps=4, guidance_scale=1.0,
                    output_type="np", generator=torch.Generator().manual_seed(0)).images

    before = generate()
    saved = load_lora_into_pipeline(pipe, tmp_path)
    assert any("single_transformer_blocks.0.attn.to_out" in k for k in saved)
    assert any("ff_context.linear_in" in k for k in saved)
    assert abs(generate() - before).max() > 1e-4


def test_klein_default_learning_rate_is_2e_5(tmp_path, caplog):
    with caplog.at_level(logging.INFO):
        run_in_process(script_args(tmp_path, TINY_KLEIN, "--max_train_steps", 1))
    assert "lr=2e-05" in caplog.text and "teacher=edit" in caplog.text
