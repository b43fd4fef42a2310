"""The trainer as ``build(config)`` + ``train(run)``: the config path equals the command line bit
for bit; the config is read-only and checked; the model family comes from the pipeline's
model_index.json through a registry; the loop and the step name no model component."""

import ast
import csv
import json
import math
import shutil
from pathlib import Path

import diffusers  # noqa: F401  (the train extra: `make test` installs it; missing, these tests fail)
import pytest
import torch
from helpers import needs_kernels
from safetensors.torch import load_file
from train_helpers import FAST

from fastpref import train
from fastpref.training import family as family_module
from fastpref.training import step as step_module
from fastpref.training.args import DEFAULT_MODEL
from fastpref.training.config import Config, parse_config
from fastpref.training.families.stable_diffusion import StableDiffusionFamily
from fastpref.training.family import FAMILIES, ModelFamily, family_class, register

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")
ROOT = Path(__file__).resolve().parents[1]


def _rows(out):
    with open(out / "metrics.csv") as f:
        return list(csv.DictReader(f))


def _tensors_equal(a: Path, b: Path) -> bool:
    x, y = load_file(a), load_file(b)
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


@needs_kernels
@pytest.mark.parametrize("loss_type", ["dpo", "kto"])
def test_build_and_train_from_a_config_equal_the_command_line(tmp_path, loss_type):
    """Same losses (the CSV text), checkpoint tensors, final LoRA file and args.json."""
    cli = train.main(
        [
            *FAST,
            "--train_batch_size",
            "2",
            "--max_train_steps",
            "2",
            "--checkpointing_steps",
            "2",
            "--report_to",
            "csv",
            "--loss_type",
            loss_type,
            "--random_crop",
            "--output_dir",
            str(tmp_path / "cli"),
        ]
    )
    config = parse_config(
        pretrained_model_name_or_path=str(DEFAULT_MODEL),
        train_batch_size=2,
        report_to="csv",
        learning_rate=1e-3,
        max_train_steps=2,
        checkpointing_steps=2,
        loss_type=loss_type,
        random_crop=True,
        output_dir=str(tmp_path / "config"),
    )
    run = train.build(config)
    assert isinstance(run.family, StableDiffusionFamily) and run.config.resolution == 32  # the VAE's sample_size
    out = train.train(run)
    assert out == tmp_path / "config" and cli == tmp_path / "cli"
    rows = _rows(out)
    assert [r["step"] for r in rows] == ["1", "2"] and rows == _rows(cli)
    assert rows[0]["loss"] != rows[1]["loss"]  # the runs trained on changing data
    for name in (
        "checkpoint-2/trainable.safetensors",
        "checkpoint-2/optimizer.safetensors",
        "pytorch_lora_weights.safetensors",
    ):
        assert _tensors_equal(out / name, cli / name), name
    args_cli, args_config = (json.loads((d / "args.json").read_text()) for d in (cli, out))
    assert list(args_cli) == list(args_config)
    assert {k: v for k, v in args_cli.items() if k != "output_dir"} == {
        k: v for k, v in args_config.items() if k != "output_dir"
    }


def test_config_is_read_only_and_checked():
    config = parse_config(learning_rate=2e-3, loss_type="kto")
    assert isinstance(config, Config) and config.learning_rate == 2e-3 and config.loss_type == "kto"
    assert config.train_batch_size == 4  # the parser's default
    with pytest.raises(AttributeError, match="read-only"):
        config.learning_rate = 1.0
    assert config.replace(seed=3).seed == 3 and config.seed == 0
    with pytest.raises(TypeError, match="unknown flags"):
        config.replace(learning_rat=1.0)
    assert parse_config(["--learning_rate", "5e-4"], learning_rate=2e-3).learning_rate == 5e-4  # argv wins
    assert parse_config(["--rank", "2"]) == parse_config(rank=2)
    with pytest.raises(TypeError, match=r"unknown flags \['learning_rat'\]"):
        parse_config(learning_rat=1.0)
    with pytest.raises(ValueError, match=r"--report_to: expected one of .*'csv'.*got 'bogus'"):
        parse_config(report_to="bogus")
    with pytest.raises(ValueError, match="--learning_rate: expected a finite number > 0, got -1"):
        parse_config(learning_rate=-1)
    with pytest.raises(TypeError, match="--learning_rate: expected float, got str '1e-3'"):
        parse_config(learning_rate="1e-3")
    with pytest.raises(TypeError, match="--train_batch_size: expected int, got float 2.0"):
        parse_config(train_batch_size=2.0)
    with pytest.raises(TypeError, match="--random_crop: expected bool, got int 1"):
        parse_config(random_crop=1)
    assert isinstance(parse_config(learning_rate=1).learning_rate, float)
    with pytest.raises(ValueError, match="--loss_type: expected one of"):
        parse_config(loss_type="cpo")


def _pipeline_dir(path: Path, class_name) -> Path:
    path.mkdir()
    (path / "model_index.json").write_text(json.dumps({"_class_name": class_name}))
    return path


def test_family_comes_from_model_index_class_name(tmp_path):
    assert family_class(DEFAULT_MODEL) is StableDiffusionFamily
    assert FAMILIES["StableDiffusionPipeline"] is StableDiffusionFamily
    assert family_class(tmp_path) is StableDiffusionFamily  # no model_index.json: the SD layout, as before
    with pytest.raises(
        ValueError,
        match=r"model_index.json names _class_name 'KandinskyPipeline', which no model "
        r"family trains; known: \[.*'StableDiffusionPipeline'.*\]",
    ):
        family_class(_pipeline_dir(tmp_path / "kandinsky", "KandinskyPipeline"))
    with pytest.raises(ValueError, match="has no string _class_name, got None"):
        family_class(_pipeline_dir(tmp_path / "nameless", None))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "model_index.json").write_text("{not json")
    with pytest.raises(ValueError, match="could not read .* as a diffusers model_index.json"):
        family_class(tmp_path / "broken")


def test_unknown_family_fails_before_any_write(tmp_path):
    model = _pipeline_dir(tmp_path / "cogvideox", "CogVideoXPipeline")
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="--pretrained_model_name_or_path: .*'CogVideoXPipeline'.*known: "):
        train.main(["--pretrained_model_name_or_path", str(model), "--output_dir", str(out)])
    assert not out.exists()


def test_register_refuses_a_second_family_for_one_class_name():
    class Other(StableDiffusionFamily):
        class_names = ("StableDiffusionPipeline",)

    with pytest.raises(TypeError, match="'StableDiffusionPipeline' is already StableDiffusionFamily's"):
        register(Other)
    assert FAMILIES["StableDiffusionPipeline"] is StableDiffusionFamily


def _identifiers(path: Path) -> tuple[set[str], set[str]]:
    """Every identifier of a module (names, attributes, arguments, keywords, definitions) and
    every module it imports from."""
    tree = ast.parse(path.read_text())
    names, modules = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            names.add(node.id)
        elif isinstance(node, ast.Attribute):
            names.add(node.attr)
        elif isinstance(node, ast.arg | ast.keyword) and node.arg:
            names.add(node.arg)
        elif isinstance(node, ast.FunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Import):
            modules.update(a.name for a in node.names)
            names.update((a.asname or a.name) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            modules.add(node.module or "")
            names.update((a.asname or a.name) for a in node.names)
    return names, modules


MODEL_WORDS = (
    "unet",
    "vae",
    "text_encoder",
    "tokenizer",
    "cliptext",
    "stablediffusion",
    "noise_scheduler",
    "encoder_hidden_states",
    "unet2dconditionmodel",
)


@pytest.mark.parametrize("module", [train, step_module], ids=["train", "step"])
def test_loop_and_step_know_no_model(module):
    """The trainer's loop and step reach the model through ModelFamily only: no identifier names
    a component of one architecture, and no model library or family module is imported."""
    names, modules = _identifiers(Path(module.__file__))
    assert "family" in " ".join(names)  # the check sees the module's identifiers
    offending = sorted(n for n in names if any(w in n.lower() for w in MODEL_WORDS))
    assert not offending, f"{module.__name__} names model components: {offending}"
    model_libraries = sorted(
        m
        for m in modules
        if m.split(".")[0] in ("transformers", "peft")
        or (m.startswith("diffusers") and m != "diffusers.optimization")
        or "families" in m
    )
    assert not model_libraries, f"{module.__name__} imports {model_libraries}"


def test_docs_list_every_method_of_the_family_interface():
    abstract = sorted(ModelFamily.__abstractmethods__)
    assert len(abstract) >= 12 and {"encode_prompts", "add_noise", "denoise", "save_weights"} <= set(abstract)
    assert StableDiffusionFamily.__abstractmethods__ == frozenset()
    docs = (ROOT / "docs" / "training.md").read_text()
    missing = [m for m in abstract if f"`{m}(" not in docs]
    assert not missing, f"docs/training.md does not describe ModelFamily.{missing}"
    assert family_module.LEGACY_CLASS_NAME in docs


class _FlowMatchingToy(StableDiffusionFamily):
    """The SD family with flow matching's noising and target (docs/training.md: SD3/Flux), under
    its own _class_name: a second family that the trainer must run without any change."""

    class_names = ("ToyFlowMatchingPipeline",)
    noised: list = []

    def add_noise(self, latents, noise, timesteps):
        sigma = ((timesteps.float() + 1) / self.scheduler.config.num_train_timesteps).view(-1, 1, 1, 1)
        self.noised.append(tuple(latents.shape))
        return (1 - sigma) * latents + sigma * noise, noise - latents


@needs_kernels
def test_a_second_family_trains_through_the_same_loop(tmp_path):
    model = tmp_path / "toy-flow"
    shutil.copytree(DEFAULT_MODEL, model)
    index = json.loads((model / "model_index.json").read_text())
    (model / "model_index.json").write_text(json.dumps({**index, "_class_name": "ToyFlowMatchingPipeline"}))
    flags = dict(train_batch_size=2, report_to="csv", learning_rate=1e-3, max_train_steps=2, checkpointing_steps=2)
    register(_FlowMatchingToy)
    try:
        run = train.build(
            parse_config(pretrained_model_name_or_path=str(model), output_dir=str(tmp_path / "flow"), **flags)
        )
        assert type(run.family) is _FlowMatchingToy
        flow = train.train(run)
    finally:
        del FAMILIES["ToyFlowMatchingPipeline"]
    assert _FlowMatchingToy.noised == [(4, 4, 8, 8)] * 2  # one micro-batch of 2 pairs per step
    sd = train.main([*FAST, *(f"--{k}={v}" for k, v in flags.items()), "--output_dir", str(tmp_path / "sd")])
    flow_rows, sd_rows = _rows(flow), _rows(sd)
    assert [r["step"] for r in flow_rows] == ["1", "2"]
    assert all(math.isfinite(float(r["loss"])) for r in flow_rows)
    assert [r["model_mse"] for r in flow_rows] != [r["model_mse"] for r in sd_rows]  # another target
    assert (flow / "pytorch_lora_weights.safetensors").is_file()


def test_every_family_module_is_packaged():
    """A non-editable install ships fastpref/training/families (pyproject lists packages by hand)."""
    import tomllib

    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    assert "fastpref.training.families" in packages
    modules = [m.stem for m in (ROOT / "fastpref" / "training" / "families").glob("*.py") if m.stem != "__init__"]
    assert "stable_diffusion" in modules
