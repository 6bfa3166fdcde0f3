import random

import pytest

from speechllm.data.tasks import METRICS, Task, TaskError, TaskRegistry, default_registry

BUILTIN = ("asr", "st", "ic", "sf", "kwe", "kws", "er", "asc", "sc", "ac", "sns")
ROW_FIELDS = {"target_language": "German"}


def normalized(text):
    return " ".join(text.split()).casefold()


@pytest.fixture
def registry():
    return default_registry()


def test_default_registry_has_the_eleven_builtin_tasks_in_order(registry):
    assert registry.names() == list(BUILTIN)
    assert all(registry.get(name).metric in METRICS for name in BUILTIN)


@pytest.mark.parametrize("name", BUILTIN)
def test_every_task_has_enough_templates_and_all_render(registry, name):
    task = registry.get(name)
    assert len(task.train_templates) >= 10 and len(task.heldout_templates) >= 5
    assert len(set(map(normalized, task.templates()))) == len(task.templates()), "duplicate templates"
    for template in task.templates():
        text = task.render(template, ROW_FIELDS)
        assert text.strip() and "{" not in text and "}" not in text


@pytest.mark.parametrize("name", BUILTIN)
def test_heldout_templates_never_match_a_train_template(registry, name):
    task = registry.get(name)
    train = {normalized(t) for t in task.train_templates}
    assert not train & {normalized(t) for t in task.heldout_templates}


@pytest.mark.parametrize("name", BUILTIN)
def test_training_instructions_never_use_a_heldout_template(registry, name):
    task = registry.get(name)
    rng = random.Random(0)
    heldout = {task.render(t, ROW_FIELDS) for t in task.heldout_templates}
    train = {task.render(t, ROW_FIELDS) for t in task.train_templates}
    drawn = {task.instruction(ROW_FIELDS, rng) for _ in range(500)}
    assert drawn == train  # every train template is reachable ...
    assert not drawn & heldout  # ... and no held-out one is
    assert {task.instruction(ROW_FIELDS, rng, heldout=True) for _ in range(200)} == heldout


def test_only_translation_needs_row_fields(registry):
    assert {name: registry.get(name).fields() for name in BUILTIN if registry.get(name).fields()} == {
        "st": {"target_language"}
    }


def test_label_placeholder_lists_task_labels_or_the_rows_own():
    kws = default_registry().get("kws")
    assert all("{labels}" in t for t in kws.templates())
    assert "yes, no, up, down" in kws.render(kws.train_templates[0], {})
    assert "cat, dog" in kws.render(kws.train_templates[0], {"labels": ["cat", "dog"]})


def test_missing_template_field_names_task_template_and_field(registry):
    st = registry.get("st")
    with pytest.raises(TaskError, match=r"task 'st': template '.*\{target_language\}.*' needs field 'target_language'"):
        st.instruction({}, random.Random(0))
    with pytest.raises(KeyError):  # callers may treat it as the KeyError it is
        st.instruction({}, random.Random(0))


def test_lookup_is_case_insensitive_and_unknown_names_list_the_known_ones(registry):
    assert registry.get("ASR") is registry.get("asr")
    assert "Kws" in registry and "nope" not in registry
    with pytest.raises(TaskError, match=r"unknown task 'nope' \(known: asr, st, ic"):
        registry.get("nope")


def test_register_refuses_duplicates_unless_replacing(registry):
    custom = Task("asr", "my asr", "text", "wer", None, ("Transcribe it, please.",))
    with pytest.raises(TaskError, match="already registered"):
        registry.register(custom)
    registry.register(custom, replace=True)
    assert registry.get("asr").description == "my asr"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"metric": "f2"}, r"field 'metric' 'f2' is not one of wer"),
        ({"name": "Lid"}, r"field 'name' 'Lid' must be a non-empty lowercase"),
        ({"train_templates": ()}, r"field 'train_templates' needs at least one"),
        ({"heldout_templates": ("name the  LANGUAGE.",)}, r"field 'heldout_templates' .* is also a training template"),
        ({"train_templates": ("Say {0}.",)}, r"placeholder \{0\}"),
        ({"train_templates": ("Say {x.",)}, r"malformed template"),
    ],
)
def test_invalid_task_definitions_are_rejected_naming_the_field(kwargs, message):
    spec = dict(name="lid", description="language id", target_format="a language", metric="accuracy",
                labels=None, train_templates=("Name the language.",), heldout_templates=())
    with pytest.raises(TaskError, match=message):
        Task(**{**spec, **kwargs})


CUSTOM_YAML = """\
tasks:
  - name: lid
    description: spoken language identification
    target_format: a language name in English
    metric: accuracy
    labels: [english, german, french]
    train_templates:
      - "Which language is spoken? Options: {labels}."
      - "Identify the language of this speech."
    heldout_templates:
      - "What tongue is the speaker using ({labels})?"
  - name: accent
    description: accent of a given language
    target_format: accent label
    metric: accuracy
    train_templates: ["Which {language} accent is this?"]
"""


def test_yaml_registers_custom_tasks_usable_like_builtins(tmp_path, registry):
    path = tmp_path / "tasks.yaml"
    path.write_text(CUSTOM_YAML)
    added = registry.load_yaml(path)
    assert [t.name for t in added] == ["lid", "accent"]
    lid = registry.get("LID")
    assert lid.labels == ("english", "german", "french") and lid.fields() == set()
    assert lid.instruction({}, random.Random(0), heldout=True) == "What tongue is the speaker using (english, german, french)?"
    assert registry.get("accent").fields() == {"language"}
    assert registry.names()[-2:] == ["lid", "accent"]


def test_yaml_as_a_plain_list_works_too(tmp_path):
    path = tmp_path / "tasks.yaml"
    path.write_text("- {name: lid, description: d, target_format: t, metric: accuracy, train_templates: [Go.]}\n")
    assert TaskRegistry().load_yaml(path)[0].name == "lid"


@pytest.mark.parametrize(
    "text, message",
    [
        (CUSTOM_YAML.replace("metric: accuracy\n    labels", "metrc: accuracy\n    labels"), r"tasks.yaml:5: unknown field 'metrc'"),
        (CUSTOM_YAML.replace("    metric: accuracy\n    train", "    train"), r"tasks.yaml:12: task 'accent' is missing field 'metric'"),
        (CUSTOM_YAML.replace("metric: accuracy\n    train", "metric: bleu4\n    train"), r"tasks.yaml:15: task 'accent': field 'metric' 'bleu4'"),
        (CUSTOM_YAML.replace("labels: [english, german, french]", "labels: english"), r"tasks.yaml:6: task 'lid': field 'labels' must be a list"),
        ("tasks:\n  - name: [unclosed\n", r"tasks.yaml:\d+: invalid YAML"),
        ("name: lid\n", r"tasks.yaml: expected a list of tasks"),
    ],
)
def test_bad_yaml_names_the_file_line_and_field_and_registers_nothing(tmp_path, registry, text, message):
    path = tmp_path / "tasks.yaml"
    path.write_text(text)
    with pytest.raises(TaskError, match=message):
        registry.load_yaml(path)
    assert "lid" not in registry and "accent" not in registry


def test_yaml_cannot_silently_redefine_a_builtin(tmp_path, registry):
    path = tmp_path / "tasks.yaml"
    path.write_text("- {name: asr, description: d, target_format: t, metric: wer, train_templates: [Go.]}\n")
    with pytest.raises(TaskError, match=r"tasks.yaml: task 'asr' is already registered"):
        registry.load_yaml(path)
    registry.load_yaml(path, replace=True)
    assert registry.get("asr").train_templates == ("Go.",)


def test_missing_yaml_file_is_a_one_line_error(tmp_path):
    with pytest.raises(TaskError, match=r"nope.yaml: task file not found"):
        TaskRegistry().load_yaml(tmp_path / "nope.yaml")
