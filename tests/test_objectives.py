"""--objective: the two baselines D-OPSD is measured against (docs/method.md §2.5), and the measures a user watches
while training (§2.6). The losses are checked against values computed by hand on a one-parameter model."""

import json

import pytest
import torch
from accelerate import Accelerator
from conftest import TINY_KLEIN, TINY_RESOLUTION, lora_script as script, load_family, run_in_process, script_args


@pytest.fixture(scope="module")
def accelerator():
    return Accelerator(cpu=True)


class Scaled(torch.nn.Module):
    """A 'transformer' whose velocity is scale * latents (+ the context's offset): simple enough to compute by hand."""

    def __init__(self, scale):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(scale))


class HandFamily:
    """The methods of a model family that the training steps call, on 1x1x2x2 latents, recording every state."""

    device = torch.device("cpu")
    default_inference_steps = 4

    def __init__(self, noise, training_sigma):
        self.noise, self.training_sigma, self.states = noise, training_sigma, []

    def collate(self, contexts):
        return {"offset": torch.stack([c["offset"] for c in contexts])}

    def rollout_schedule(self, num_steps, height, width):
        sigmas = torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0])[-num_steps - 1:]
        return sigmas * 1000, sigmas

    def initial_noise(self, batch_size, height, width, generator=None):
        return self.noise.clone()

    def training_sigmas(self, batch_size, height, width, generator=None):
        return torch.full((batch_size,), self.training_sigma)

    def predict(self, transformer, latents, timestep, context):
        self.states.append(latents.detach().clone())
        return transformer.scale * latents + context["offset"].view(-1, 1, 1, 1)


def hand_batch(x0):
    return {"bucket": (2, 2), "student": [{"offset": torch.tensor(0.0)}], "teacher": [{"offset": torch.tensor(0.5)}],
            "target": [{"latents": x0[0]}]}


X0 = torch.tensor([[[[0.2, -0.4], [0.6, 1.0]]]])
NOISE = torch.tensor([[[[1.0, -1.0], [0.5, 2.0]]]])


def test_sft_loss_and_gradient_are_flow_matching_by_hand(accelerator):
    """sft: x_s = (1 - s) x0 + s noise; loss = mean((v(x_s) - (noise - x0))^2), text-only context."""
    family, student = HandFamily(NOISE, 0.3), Scaled(0.7)
    loss = script.sft_step(family, student, hand_batch(X0), accelerator)
    state = 0.7 * X0 + 0.3 * NOISE
    residual = 0.7 * state - (NOISE - X0)
    torch.testing.assert_close(family.states[0], state)
    torch.testing.assert_close(loss, (residual ** 2).mean())
    torch.testing.assert_close(student.scale.grad, (2 * residual * state).mean())


@pytest.mark.parametrize("objective", ["dopsd", "offpolicy"])
def test_offpolicy_asks_the_teacher_on_noised_training_images(accelerator, objective):
    """Both objectives pull the student's x0 toward the teacher's at each of the K noise levels; only the states
    differ: dopsd follows the student's own roll-out, offpolicy noises the training image to each level."""
    family, student = HandFamily(NOISE, 0.3), Scaled(0.7)
    teacher = script.EMATeacher([("scale", student.scale)], 1.0)
    with torch.no_grad():
        teacher.shadow[0].fill_(0.9)
    loss, _ = script.dopsd_step(family, student, student, teacher, hand_batch(X0), accelerator, 4, "x0",
                                objective=objective)
    sigmas = [1.0, 0.75, 0.5, 0.25, 0.0]
    state, losses = NOISE, []
    for k in range(4):
        if objective == "offpolicy":
            state = (1 - sigmas[k]) * X0 + sigmas[k] * NOISE
        teacher_v, student_v = 0.9 * state + 0.5, 0.7 * state
        torch.testing.assert_close(family.states[2 * k], state)  # the teacher's pass, then the student's
        torch.testing.assert_close(family.states[2 * k + 1], state)
        losses.append(((sigmas[k] * (student_v - teacher_v)) ** 2).mean())  # x0 = x - sigma v
        state = state + (sigmas[k + 1] - sigmas[k]) * student_v
    torch.testing.assert_close(loss, torch.stack(losses).mean())


def test_training_sigmas_are_the_pipelines_shift_of_uniform_levels(tmp_path):
    """Z-Image's scheduler shifts sigma by 3 (s' = 3s / (1 + 2s)); sft's noise levels go through the same shift."""
    _, family = load_family(tmp_path)
    torch.manual_seed(0)
    uniform = 1 - torch.rand(64, dtype=torch.float64) * (1 - 1e-3)
    sigmas = family.training_sigmas(64, 64, 64, torch.Generator().manual_seed(0))
    generator = torch.Generator().manual_seed(0)
    uniform = 1 - torch.rand(64, generator=generator, dtype=torch.float64) * (1 - 1e-3)
    torch.testing.assert_close(sigmas, (3 * uniform / (1 + 2 * uniform)).float())
    assert 0 < sigmas.min() and sigmas.max() <= 1


def test_klein_target_latents_are_the_pipelines_reference_latents(tmp_path, accelerator):
    """The clean target x0 is the image exactly as the pipeline encodes it (patchified, batch-norm normalised):
    packed, it equals the edit teacher's reference tokens of the same image."""
    args, family = load_family(tmp_path, TINY_KLEIN, "--objective", "sft")
    examples = script.collect_examples(args, family.resolution_multiple)
    store = script.ContextStore(family, examples, accelerator, args.output_dir, targets=True)
    store.fill()
    cached = store.get(examples[0])
    assert cached.keys() == {"student", "teacher", "target"}
    packed = family.pipeline._pack_latents(cached["target"]["latents"][None])[0]
    torch.testing.assert_close(packed, cached["teacher"]["image_latents"].float(), rtol=0, atol=1e-5)  # conv noise
    assert cached["target"]["latents"].shape == family.initial_noise(1, *examples[0].bucket).shape[1:]


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("sft")
    run_in_process(script_args(output_dir, TINY_KLEIN, "--objective", "sft", "--max_train_steps", 4,
                               "--gradient_accumulation_steps", 1, "--validation_steps", 2, "--learning_rate", 1e-2,
                               "--validation_prompt", "sks cat"))
    return output_dir


def test_sft_run_measures_concept_gap_and_prior_drift(sft_run):
    """A run logs both measures at every validation into validation_metrics.jsonl and the model card, and records
    the objective in the card; the base model's prior samples (the drift's reference) are kept for a resume."""
    records = [json.loads(line) for line in (sft_run / script.METRICS_FILE).read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4]
    assert all(r["concept_gap"] > 0 and r["prior_drift"] > 0 for r in records)
    reference = script.load_file(sft_run / script.PRIOR_REFERENCE_FILE)
    assert sorted(reference) == [f"prompt{p}" for p in range(len(script.PRIOR_PROMPTS))]
    assert reference["prompt0"].shape[-2:] == (TINY_RESOLUTION // 16, TINY_RESOLUTION // 16)
    card = (sft_run / "README.md").read_text()
    assert "| objective | sft: plain fine-tuning" in card and "plain fine-tuning** (`--objective sft`" in card
    assert f"| 4 | {records[1]['concept_gap']:.4g} | {records[1]['prior_drift']:.4f} |" in card


def test_prior_drift_is_zero_for_the_base_model_and_grows_with_a_change(tmp_path):
    args, family = load_family(tmp_path, TINY_KLEIN)
    with torch.no_grad():
        prior = [(prompt, family.encode_student_context(prompt)) for prompt in args.prior_prompts[:2]]
    validation = {"prior": prior, "prior_reference": None}
    validation["prior_reference"] = script.base_prior_samples(family, family.transformer, validation, args, False)
    assert script.prior_drift(family, family.transformer, validation, args) == 0.0
    with torch.no_grad():
        family.transformer.proj_out.weight.mul_(1.5)
    assert script.prior_drift(family, family.transformer, validation, args) > 0.01
    # a resumed run reads the reference back instead of sampling the (changed) model
    assert script.base_prior_samples(family, family.transformer, validation, args, True).keys() == {"prompt0",
                                                                                                      "prompt1"}
