"""The model registry and the family contract on real checkpoint checkpoints (tiny random weights of the
real transformers classes, saved with ``save_pretrained``): descriptions from config files alone,
prompts equal to the checkpoint's own processor, a hub id served from an offline cache, and clear
refusals for everything that cannot work."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.merging.config import NO_REDUCTION
from pipeline.models.base import ModelError
from pipeline.models.registry import DEFAULT_MODEL, FAMILIES, PACKAGED, describe_model, load_model
from pipeline.models.whisper import WhisperSpeechModel
from pipeline.tasks import TaskError, TaskRequest
from tests.conftest import hub_cache

ROOT = Path(__file__).resolve().parent.parent
REQUESTS = [
    TaskRequest("asr"),
    TaskRequest("asr", language="de"),
    TaskRequest("st", target_language="fr"),
    TaskRequest("er"),
    TaskRequest("sqa", question="Who speaks first?"),
]


def waves() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [(0.1 * rng.standard_normal(n)).astype(np.float32) for n in (16000, 40_000, 480_000)]


def test_the_default_is_the_offline_whisper_and_its_description_needs_no_weights(monkeypatch, tmp_path):
    monkeypatch.setenv("FASTADASP_CACHE", str(tmp_path))
    described = describe_model()
    model = load_model()
    assert isinstance(model, WhisperSpeechModel) and model.description == described
    assert (described.name, described.sample_rate, described.max_window_s, described.tasks) == (
        DEFAULT_MODEL,
        16000,
        30.0,
        frozenset({"asr"}),
    )
    assert described.reducing_layers == model.model.config.encoder_layers
    assert model.device == "cpu" and model.model.dtype.is_floating_point


@pytest.mark.parametrize(
    ("key", "family", "kind", "tasks"),
    [
        ("qwen-base", "qwen2_audio", "base", {"asr", "st", "er", "sqa"}),
        ("qwen-instruct", "qwen2_audio", "instruct", {"asr", "st", "er", "sqa"}),
        ("glm", "glm_asr", "instruct", {"asr"}),
    ],
)
def test_a_local_folder_dispatches_on_its_model_type(checkpoints, key, family, kind, tasks):
    described = describe_model(str(checkpoints[key]))
    assert (described.family, described.kind, described.tasks) == (family, kind, frozenset(tasks))
    assert described.reducing_layers == 4
    model = load_model(str(checkpoints[key]))
    assert model.description == described


@pytest.mark.parametrize("key", ["qwen-base", "qwen-instruct", "glm"])
def test_prompt_ids_are_what_the_checkpoints_processor_gives(checkpoints, key):
    """Both kinds: the ids our engine gets equal the checkpoint's own processor's for the same text
    and audio (chat template applied for instruct checkpoints, plain prompts for base ones)."""
    model = load_model(str(checkpoints[key]))
    requests = [r for r in REQUESTS if r.task in model.description.tasks]
    for request in requests:
        text = model.prompt_text(request)
        if model.description.kind == "instruct":
            assert text == model.processor.apply_chat_template(
                [
                    {
                        "role": "user",
                        "content": [
                            {"type": "audio", "audio": "window"},
                            {"type": "text", "text": model.instruction(request)},
                        ],
                    }
                ],
                add_generation_prompt=True,
                tokenize=False,
            )
        for wave, count in zip(waves(), model.audio_token_counts(waves()), strict=True):
            ids, spans = model.prompt(text, [count])
            expected = model.processor(text=text, audio=[wave], sampling_rate=16000, return_tensors="pt")
            assert ids == expected["input_ids"][0].tolist(), (request, len(wave))
            assert spans == [(ids.index(model.audio_token_id), ids.index(model.audio_token_id) + count)]


def test_qwen_base_prompts_are_its_evaluation_prompts(checkpoints):
    model = load_model(str(checkpoints["qwen-base"]))
    audio = "<|audio_bos|><|AUDIO|><|audio_eos|>"
    assert (
        model.prompt_text(TaskRequest("asr"))
        == f"{audio}Detect the language and recognize the speech: <|en|>"
    )
    assert model.prompt_text(TaskRequest("asr", language="German")).endswith("<|de|>")
    assert (
        model.prompt_text(TaskRequest("st", target_language="zh"))
        == f"{audio}Translate the speech into Chinese:"
    )
    assert model.prompt_text(TaskRequest("er")) == f"{audio}Recognize the emotion with keywords in English:"
    assert model.prompt_text(TaskRequest("sqa", question=" Who? ")) == f"{audio}Who?"


def test_a_task_the_checkpoint_cannot_do_is_refused(checkpoints):
    model = load_model(str(checkpoints["glm"]))
    with pytest.raises(TaskError, match=r"cannot do task 'er' \(it does: asr\)"):
        model.run(waves()[:1], TaskRequest("er"), NO_REDUCTION)


def test_tiny_random_is_described_without_building_it():
    described = describe_model("tiny-random-qwen2-audio")
    assert (described.family, described.kind, described.reducing_layers) == ("qwen2_audio", "base", 4)
    assert load_model("tiny-random-qwen2-audio").description == described


def test_unknown_names_and_unsupported_types_say_what_is_supported(tmp_path):
    for name in ("whisper-huge", "no/such/path"):
        with pytest.raises(ModelError, match=f"unknown model {name!r}") as err:
            describe_model(name)
        assert all(packaged in str(err.value) for packaged in PACKAGED)
        assert all(model_type in str(err.value) for model_type in FAMILIES)
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ModelError, match=r"model_type 'bert' is not supported; supported: .*qwen2_audio"):
        describe_model(str(tmp_path / "bert"))


def test_broken_or_missing_configs_are_clear_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match=r"no config\.json"):
        describe_model(str(tmp_path / "empty"))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text('{"model_type": "qwen2_au')
    with pytest.raises(ModelError, match="not valid JSON"):
        describe_model(str(tmp_path / "broken"))


def test_glm_without_a_chat_template_is_refused(checkpoints, tmp_path):
    folder = shutil.copytree(checkpoints["glm"], tmp_path / "glm")
    (folder / "chat_template.jinja").unlink()
    with pytest.raises(ModelError, match="ships a chat template; this one has none"):
        describe_model(str(folder))


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        # a layer the weights lack (layer_types too: recent releases check the two agree)
        ({"num_hidden_layers": 5, "layer_types": ["full_attention"] * 5}, "weights do not match the config"),
        ({"intermediate_size": 96}, "does not load|do not match"),  # shapes differ
    ],
)
def test_weights_that_do_not_fit_the_config_are_refused_not_half_loaded(checkpoints, tmp_path, edit, message):
    folder = shutil.copytree(checkpoints["qwen-base"], tmp_path / "qwen")
    config = json.loads((folder / "config.json").read_text())
    config["text_config"] |= edit
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match=message):
        load_model(str(folder))


def test_a_hub_id_is_served_from_the_offline_cache(checkpoints, tmp_path):
    cache = hub_cache(tmp_path / "hub", "acme/tiny-qwen2-audio-instruct", checkpoints["qwen-instruct"])
    script = (
        "from pipeline.models.registry import describe_model, load_model\n"
        "d = describe_model('acme/tiny-qwen2-audio-instruct'); m = load_model(d.name)\n"
        "print(d.family, d.kind, m.description == d)\n"
        "describe_model('acme/not-cached')\n"
    )
    env = os.environ | {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, cwd=ROOT)
    assert "qwen2_audio instruct True" in out.stdout, out.stderr
    assert "ModelError" in out.stderr and "'acme/not-cached' is not a local folder" in out.stderr
    assert "local Hugging Face cache" in out.stderr


def test_describing_reads_no_weights(checkpoints, monkeypatch):
    """describe_model works with the weights gone: it reads config files only."""
    for key, folder in checkpoints.items():
        weights = folder / "model.safetensors"
        hidden = weights.rename(folder / "weights.hidden")
        try:
            monkeypatch.setattr(torch.nn.Module, "__init__", _no_modules)
            assert describe_model(str(folder)).reducing_layers == 4, key
        finally:
            monkeypatch.undo()
            hidden.rename(weights)


def _no_modules(*args, **kwargs):
    raise AssertionError("describing a model constructed a torch module")


def test_the_prompt_kind_can_be_forced_where_the_family_has_it(checkpoints):
    """A base checkpoint re-saved by transformers ships the processor's default template; the user
    can say how to prompt it. A family without that kind refuses."""
    assert describe_model(str(checkpoints["qwen-instruct"]), kind="base").kind == "base"
    model = load_model(str(checkpoints["qwen-instruct"]), kind="base")
    assert model.prompt_text(TaskRequest("er")).endswith("Recognize the emotion with keywords in English:")
    assert describe_model(str(checkpoints["qwen-base"]), kind="instruct").kind == "instruct"
    with pytest.raises(ModelError, match="glm_asr checkpoints have no base prompts"):
        describe_model(str(checkpoints["glm"]), kind="base")
    with pytest.raises(ModelError, match="kind 'chat' is not one of base, instruct"):
        describe_model(str(checkpoints["glm"]), kind="chat")


def test_int8_is_refused_where_the_family_has_none(checkpoints):
    """The description says so before any weights are read; loading anyway is refused, not half done."""
    from pipeline.models.base import INT8, ModelTaskError
    from schemas.job_config import JobConfig
    from workers.archive_job import check_model

    assert (
        "int8" in describe_model("whisper-tiny.en").dtypes
        and not describe_model(str(checkpoints["glm"])).dtypes
    )
    with pytest.raises(ModelTaskError, match="no int8 variant"):
        check_model(JobConfig("in", "out", model=str(checkpoints["qwen-instruct"]), int8=True))
    with pytest.raises(ModelError, match="int8 is not supported"):
        load_model(str(checkpoints["glm"]), dtype=INT8)


def test_languages_the_pipelines_table_does_not_name_get_the_models_own_refusal():
    """Swahili is not in the prompt table (pipeline.tasks.LANGUAGES): what the model cannot do is still
    what the refusal says, and a multilingual Whisper that knows it is not refused."""
    from pipeline.models.base import ModelTaskError
    from schemas.job_config import JobConfig
    from workers.archive_job import check_model

    with pytest.raises(ModelTaskError, match="is English-only; --language 'sw'"):
        check_model(JobConfig("in", "out", language="sw"))
    with pytest.raises(ModelTaskError, match="translates only into en, not 'Swahili'"):
        check_model(JobConfig("in", "out", model="whisper-base", task="st", target_language="Swahili"))
    assert check_model(JobConfig("in", "out", model="whisper-base", language="sw")).multilingual


def test_describing_whisper_imports_no_modeling_code():
    """The driver describes the model before anything starts: transformers' modeling module (seconds to
    import) is for the actors that load it."""
    script = (
        "import sys; from pipeline.models.registry import describe_model\n"
        "for name in ('whisper-tiny.en', 'whisper-base'): describe_model(name)\n"
        "print([m for m in sys.modules if m.startswith('transformers.models.whisper.modeling')])"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]", out.stdout
