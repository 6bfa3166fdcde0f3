"""Task registry: each SpeechVerse task's instruction templates, target format and metric.

Every task keeps two disjoint sets of instruction templates. Training draws only from
`train_templates`, so `heldout_templates` measure how well the model follows phrasings it never
saw (the paper's unseen-instruction evaluation). Templates are `str.format` strings of plain names:
`{labels}` lists the row's own labels, else the task's; any other name is a field of the manifest
row (e.g. `{target_language}` for translation).
"""

from __future__ import annotations

import dataclasses
import random
import re
import string
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import yaml

METRICS = ("wer", "bleu", "rouge_l", "accuracy", "macro_f1", "slot_f1", "keyword_f1")
_NAME = re.compile(r"[a-z][a-z0-9_]*")
_NULL_TAG = "tag:yaml.org,2002:null"


class TaskError(KeyError, ValueError):
    """A bad task definition, lookup or instruction; `field` names the Task field at fault, if any.

    A KeyError too, so callers that treat a missing template field as a missing key still catch it.
    """

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field

    def __str__(self) -> str:  # KeyError's own str() would quote the message
        return self.args[0]


@dataclass(frozen=True)
class Task:
    name: str  # lowercase identifier, e.g. "asr"; what manifest rows name in their `task` field
    description: str
    target_format: str  # what a target looks like, for readers and for whoever writes the data
    metric: str  # one of METRICS
    labels: tuple[str, ...] | None  # closed label set (fills {labels}); None when dataset-defined
    train_templates: tuple[str, ...]
    heldout_templates: tuple[str, ...] = ()

    def __post_init__(self):
        if not (isinstance(self.name, str) and _NAME.fullmatch(self.name)):
            raise self._error("name", f"'{self.name}' must be a non-empty lowercase identifier such as 'asr'")
        for field in ("description", "target_format"):
            if not (isinstance(getattr(self, field), str) and getattr(self, field).strip()):
                raise self._error(field, "must be a non-empty string")
        if self.metric not in METRICS:
            raise self._error("metric", f"'{self.metric}' is not one of {', '.join(METRICS)}")
        if self.labels is not None:
            object.__setattr__(self, "labels", self._strings("labels"))
            if not self.labels:
                raise self._error("labels", "needs at least one label (or null when the dataset defines them)")
        for field in ("train_templates", "heldout_templates"):
            object.__setattr__(self, field, self._strings(field))
        if not self.train_templates:
            raise self._error("train_templates", "needs at least one template")
        self._check_templates()

    def templates(self) -> tuple[str, ...]:
        return self.train_templates + self.heldout_templates

    def fields(self) -> set[str]:
        """Row fields the templates need: every placeholder but {labels} when the task has labels."""
        provided = {"labels"} if self.labels else set()
        return {name for template in self.templates() for name in _placeholders(template)} - provided

    def render(self, template: str, fields: Mapping) -> str:
        """The template filled from a row's fields; lists (such as labels) are joined with ', '."""
        values = {}
        for name in _placeholders(template):
            value = fields.get(name)
            if value is None and name == "labels":
                value = self.labels
            if value is None:
                raise TaskError(f"task '{self.name}': template '{template}' needs field '{name}'")
            values[name] = ", ".join(value) if isinstance(value, (list, tuple)) else value
        return template.format_map(values)

    def instruction(self, fields: Mapping, rng: random.Random, heldout: bool = False) -> str:
        """One example's instruction, drawn by `rng` from the training (or held-out) templates."""
        templates = self.heldout_templates if heldout else self.train_templates
        if not templates:
            raise TaskError(f"task '{self.name}' has no held-out templates")
        return self.render(rng.choice(templates), fields)

    def _strings(self, field: str) -> tuple[str, ...]:
        value = getattr(self, field)
        if not (isinstance(value, (list, tuple)) and all(isinstance(v, str) and v.strip() for v in value)):
            raise self._error(field, "must be a list of non-empty strings")
        return tuple(value)

    def _check_templates(self):
        """Templates must parse, use plain names, and be distinct ignoring case and spacing."""
        seen: dict[str, str] = {}
        for field in ("train_templates", "heldout_templates"):
            for template in getattr(self, field):
                try:
                    _placeholders(template)
                except ValueError as err:
                    raise self._error(field, str(err)) from None
                key = " ".join(template.split()).casefold()
                if key in seen:
                    clash = "is listed twice" if seen[key] == field else "is also a training template"
                    raise self._error(field, f"'{template}' {clash}")
                seen[key] = field

    def _error(self, field: str, message: str) -> TaskError:
        return TaskError(f"task '{self.name}': field '{field}' {message}", field)


def _placeholders(template: str) -> list[str]:
    """The names a template fills in; ValueError says why it is not a template of plain names."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as err:
        raise ValueError(f"has a malformed template '{template}' ({err})") from None
    names = []
    for _, name, spec, conversion in parsed:
        if name is None:
            continue
        if not name.isidentifier() or spec or conversion:
            written = name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "")
            raise ValueError(f"template '{template}' has placeholder {{{written}}}; use a plain name like {{labels}}")
        names.append(name)
    return names


class TaskRegistry:
    """Tasks by name, in registration order; lookups ignore case."""

    def __init__(self, tasks: Iterable[Task] = ()):
        self._tasks: dict[str, Task] = {}
        for task in tasks:
            self.register(task)

    def get(self, name: str) -> Task:
        try:
            return self._tasks[name.lower()]
        except KeyError:
            raise TaskError(f"unknown task '{name}' (known: {', '.join(self._tasks)})") from None

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._tasks

    def names(self) -> list[str]:
        return list(self._tasks)

    def register(self, task: Task, replace: bool = False) -> None:
        self._refuse_redefinition(task.name, replace)
        self._tasks[task.name] = task

    def load_yaml(self, path: str | Path, replace: bool = False) -> list[Task]:
        """Registers the tasks a YAML file defines (a list, or a mapping with the key `tasks`).

        All or nothing: one bad task registers none, and the error names the file and line.
        """
        path = Path(path)
        try:
            root = yaml.compose(path.read_text(), Loader=yaml.SafeLoader)
        except FileNotFoundError:
            raise TaskError(f"{path}: task file not found") from None
        except yaml.MarkedYAMLError as err:
            raise TaskError(f"{path}:{err.problem_mark.line + 1}: invalid YAML: {err.problem}") from None
        if isinstance(root, yaml.MappingNode) and [key.value for key, _ in root.value] == ["tasks"]:
            root = root.value[0][1]
        if not isinstance(root, yaml.SequenceNode):
            raise TaskError(f"{path}: expected a list of tasks, or a mapping with the single key 'tasks'")
        tasks = [_task_from_node(path, node) for node in root.value]
        for i, task in enumerate(tasks):
            if task.name in (t.name for t in tasks[:i]):
                raise TaskError(f"{path}: task '{task.name}' is defined twice")
            try:
                self._refuse_redefinition(task.name, replace)
            except TaskError as err:
                raise TaskError(f"{path}: {err}") from None
        for task in tasks:
            self._tasks[task.name] = task
        return tasks

    def _refuse_redefinition(self, name: str, replace: bool):
        if name in self._tasks and not replace:
            raise TaskError(f"task '{name}' is already registered; pass replace=True to redefine it")


_FIELDS = tuple(f.name for f in dataclasses.fields(Task))
_OPTIONAL_IN_YAML = {"labels": None, "heldout_templates": ()}


def _task_from_node(path: Path, node: yaml.Node) -> Task:
    line = node.start_mark.line + 1
    if not isinstance(node, yaml.MappingNode):
        raise TaskError(f"{path}:{line}: expected a task, a mapping of field: value")
    values, lines = {}, {}
    for key, value in node.value:
        at = key.start_mark.line + 1
        if key.value not in _FIELDS:
            raise TaskError(f"{path}:{at}: unknown field '{key.value}' (known: {', '.join(_FIELDS)})")
        if key.value in values:
            raise TaskError(f"{path}:{at}: field '{key.value}' is given twice")
        values[key.value], lines[key.value] = _plain(value), at
    who = f"task '{values['name']}'" if "name" in values else "task"
    for field in _FIELDS:
        if field not in values and field not in _OPTIONAL_IN_YAML:
            raise TaskError(f"{path}:{line}: {who} is missing field '{field}'")
    try:
        return Task(**{**_OPTIONAL_IN_YAML, **values})
    except TaskError as err:
        raise TaskError(f"{path}:{lines.get(err.field, line)}: {err}") from None


def _plain(node: yaml.Node):
    """A YAML node as strings, lists and None: scalars stay as written, because YAML 1.1 would turn
    the Speech Commands keywords yes, no, on and off into booleans."""
    if isinstance(node, yaml.ScalarNode):
        return None if node.tag == _NULL_TAG else node.value
    if isinstance(node, yaml.SequenceNode):
        return [_plain(item) for item in node.value]
    return {_plain(key): _plain(value) for key, value in node.value}


BUILTIN_TASKS = (
    Task(
        "asr",
        "automatic speech recognition",
        "the transcript: lowercase words without punctuation",
        "wer",
        None,
        (
            "Transcribe the audio.",
            "Write down exactly what the speaker says.",
            "What is being said in this recording?",
            "Convert this speech to text.",
            "Provide a verbatim transcript of the utterance.",
            "Listen to the clip and type out the spoken words.",
            "Generate the transcription for this audio.",
            "Please transcribe the speech in lowercase without punctuation.",
            "Repeat the spoken content as plain text.",
            "What words does the speaker say?",
            "Turn the spoken words in this audio into written text.",
            "Give me a word-for-word transcript of this speech.",
        ),
        (
            "Could you jot down everything the speaker said?",
            "Produce the written form of this spoken utterance.",
            "Recognize the speech and output the words you hear.",
            "Spell out what the person in this recording is saying.",
            "I need the text of this audio: what was spoken?",
            "Dictation: type what you hear.",
        ),
    ),
    Task(
        "st",
        "speech translation",
        "the translation into the row's target_language",
        "bleu",
        None,
        (
            "Translate the speech into {target_language}.",
            "What does the speaker say? Answer in {target_language}.",
            "Provide a {target_language} translation of this audio.",
            "Listen to the utterance and translate it to {target_language}.",
            "Render the spoken content in {target_language}.",
            "Translate what you hear into {target_language}.",
            "Give the {target_language} version of this recording.",
            "Convert the speech into {target_language} text.",
            "How would you say this in {target_language}?",
            "Write a {target_language} translation of the spoken words.",
            "Translate this audio clip to {target_language}, please.",
            "Express the meaning of this speech in {target_language}.",
        ),
        (
            "Interpret this recording for a {target_language} speaker.",
            "Someone only understands {target_language}; tell them what was said.",
            "Put the spoken sentence into {target_language}.",
            "Output the speech translated into the {target_language} language.",
            "Rewrite the utterance in {target_language}.",
            "What would this audio say if it were spoken in {target_language}?",
        ),
    ),
    Task(
        "ic",
        "intent classification",
        "the intent label the dataset defines, e.g. SLURP's scenario_action",
        "accuracy",
        None,
        (
            "What is the intent of the speaker?",
            "Classify the intent of this utterance.",
            "Identify what the speaker wants to do.",
            "Which intent does this spoken command express?",
            "Determine the user's intent from the audio.",
            "Predict the intent label for this request.",
            "What action is the speaker asking for? Give the intent.",
            "Name the intent behind this spoken request.",
            "Listen to the command and output its intent.",
            "Categorize this utterance by its intent.",
            "What is the user trying to accomplish? Answer with the intent label.",
            "Tag this spoken request with its intent.",
        ),
        (
            "What goal does the speaker have in this recording?",
            "Recognize the purpose of this voice command.",
            "Assign an intent to the spoken request.",
            "Tell me the intention behind what was said.",
            "Which intent category fits this audio best?",
            "Infer what the speaker wants from this utterance and state the intent.",
        ),
    ),
    Task(
        "sf",
        "slot filling",
        "slot pairs 'slot_type: value' joined with '; ' in order of appearance, or 'none'",
        "slot_f1",
        None,
        (
            "Extract the slots and their values from this utterance.",
            "List every slot in the speech as type: value, separated by semicolons.",
            "Identify the slot types and values mentioned by the speaker.",
            "Fill the slots for this spoken request.",
            "Which entities does the speaker mention? Give each as type: value.",
            "Perform slot filling on this audio.",
            "Find the slots in the command and report their values.",
            "What slot values are present in this utterance? Answer none if there are none.",
            "Tag the entities in this spoken request with their slot types.",
            "Give the slot-value pairs mentioned in the recording.",
            "Extract the entities from the speech in the format type: value.",
            "Pull out the slot labels and their values from what was said.",
        ),
        (
            "Annotate the spoken request with its slots and values.",
            "Which pieces of information, as slot and value, does the command contain?",
            "Parse this utterance into slot: value pairs.",
            "Detect the entities in this audio and label their types.",
            "Report each slot mentioned by the speaker together with its value.",
            "Map the details of this voice request to slots.",
        ),
    ),
    Task(
        "kwe",
        "keyword extraction",
        "the salient keywords in order of appearance, joined with ', '",
        "keyword_f1",
        None,
        (
            "Extract the keywords from this speech.",
            "What are the key words in this recording?",
            "List the most important words the speaker uses, separated by commas.",
            "Identify the salient keywords in the utterance.",
            "Give the main keywords of this audio in the order they are spoken.",
            "Which words carry the meaning of this speech? List them.",
            "Pick out the keywords from what is said.",
            "Summarize the speech as a comma-separated list of keywords.",
            "Find the important terms mentioned in this clip.",
            "Output the key terms of the spoken passage.",
            "Extract the salient words from this audio, in order of appearance.",
            "Name the keywords that capture what this speech is about.",
        ),
        (
            "Which terms would you index this recording under?",
            "Jot down the essential words from the speech.",
            "Highlight the key vocabulary used by the speaker.",
            "What are the content words that matter most in this audio?",
            "Condense this utterance into its keywords.",
            "Produce a list of the significant words spoken here.",
        ),
    ),
    Task(
        "kws",
        "keyword spotting",
        "the keyword from the label list that was spoken, or 'none'",
        "accuracy",
        ("yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go"),  # Speech Commands
        (
            "Which of these keywords is spoken: {labels}? Answer none if none is.",
            "Listen for the keywords {labels}. Which one do you hear?",
            "Detect which keyword from {labels} appears in the audio.",
            "Keyword spotting with the keywords {labels}: which one was said?",
            "Does the speaker say one of {labels}? Name it, or say none.",
            "From the list {labels}, which word is in this recording?",
            "Spot the keyword in this clip. Options: {labels}, or none.",
            "Identify the spoken command among {labels}.",
            "Which keyword ({labels}) does this audio contain?",
            "Choose the word you hear from {labels}; reply none if it is absent.",
            "Is any of the words {labels} spoken? Give the word or none.",
            "Recognize the keyword in this utterance. Candidates: {labels}.",
        ),
        (
            "Keywords to watch for: {labels}. Which one shows up in the speech, if any?",
            "Tell me which of the words {labels} the speaker uttered, or none.",
            "Out of {labels}, what did the speaker say?",
            "Check this audio for the keywords {labels} and report the one you find.",
            "Which command word is present ({labels})? Say none if there is no match.",
            "Listen carefully: was one of {labels} said? Name it or answer none.",
        ),
    ),
    Task(
        "er",
        "emotion recognition",
        "the emotion label",
        "macro_f1",
        ("neutral", "happy", "sad", "angry"),
        (
            "What emotion does the speaker express?",
            "Classify the emotion of this utterance as one of {labels}.",
            "How does the speaker feel? Choose from {labels}.",
            "Identify the emotional state of the speaker.",
            "Recognize the emotion in this speech.",
            "Which emotion ({labels}) best describes the speaker's voice?",
            "Detect the emotion conveyed in this recording.",
            "Label the speaker's emotion. Options: {labels}.",
            "What is the emotional tone of this audio?",
            "Listen to the voice and name the emotion it conveys.",
            "Determine the speaker's mood from the way they talk.",
            "Pick the emotion that fits this utterance: {labels}.",
        ),
        (
            "What mood is the person in, judging by their voice?",
            "Tell me the feeling behind this utterance ({labels}).",
            "Categorize the emotional content of the speech.",
            "Judging from tone alone, which of {labels} applies?",
            "How would you describe the speaker's emotion?",
            "Assign an emotion label to this recording. Possible labels: {labels}.",
        ),
    ),
    Task(
        "asc",
        "audio sentiment classification",
        "the sentiment label",
        "macro_f1",
        ("negative", "neutral", "positive"),
        (
            "What is the sentiment of this speech?",
            "Classify the sentiment of the utterance as one of {labels}.",
            "Which sentiment ({labels}) does the speaker convey?",
            "Determine the overall sentiment of what is said.",
            "Analyze the sentiment expressed in this recording.",
            "What opinion polarity does the speaker express? Options: {labels}.",
            "Identify the sentiment of the spoken content.",
            "How does the speaker feel about the topic? Answer with a sentiment label.",
            "Label the sentiment of this audio clip: {labels}.",
            "Classify the tone of this statement by sentiment.",
            "What sentiment does this utterance carry?",
            "Rate the speaker's sentiment as one of {labels}.",
        ),
        (
            "Is the speaker's view favorable, unfavorable or neither? Answer with one of {labels}.",
            "Judge the attitude of this spoken comment.",
            "Give the sentiment polarity of the speech ({labels}).",
            "Tell me whether the speaker sounds approving or disapproving; use one of {labels}.",
            "Which sentiment best summarizes this recording?",
            "Assess the emotional polarity of the speaker's words.",
        ),
    ),
    Task(
        "sc",
        "speaker classification: a speaker attribute or the number of speakers",
        "the speaker label the dataset defines (an attribute such as gender, or a speaker count)",
        "accuracy",
        None,
        (
            "Classify the speaker in this recording.",
            "Which speaker category does this audio belong to?",
            "Characterize who is speaking in this clip with a single label.",
            "Identify the speaker attribute of this utterance.",
            "What can you tell about the speakers in this recording? Answer with one label.",
            "Categorize the voices heard in this audio.",
            "Give the speaker class for this clip.",
            "Listen to the voices and label the speaker characteristic.",
            "Determine the speaker label of this recording.",
            "Analyze the speakers in this audio and output their class.",
            "What speaker label describes this utterance best?",
            "Assign a speaker category to this speech.",
        ),
        (
            "Describe the speakers of this clip in one label.",
            "Tell me about the person or people talking here, as a single class.",
            "Recognize the speaker characteristic in this audio.",
            "Who is talking, in terms of speaker category?",
            "Which speaker class fits this recording?",
        ),
    ),
    Task(
        "ac",
        "audio captioning",
        "a one-sentence caption",
        "rouge_l",
        None,
        (
            "Describe the audio in one sentence.",
            "Write a caption for this recording.",
            "What can you hear in this clip? Answer in a single sentence.",
            "Generate a short description of the sounds in this audio.",
            "Caption this audio.",
            "Summarize what happens in this recording in one sentence.",
            "Provide a one-sentence description of the audio.",
            "Describe the acoustic scene of this clip.",
            "What is going on in this audio? Describe it briefly.",
            "Give a brief caption describing the sounds you hear.",
            "Explain in one sentence what this recording contains.",
            "Write a short sentence that describes this sound clip.",
        ),
        (
            "Tell me, in a sentence, what this recording sounds like.",
            "Paint a picture of this audio in a single sentence.",
            "If you had to label this clip with a sentence, what would it be?",
            "Characterize the sounds in this recording briefly.",
            "Compose a one-line summary of the sounds in this audio.",
            "Narrate what is audible in this clip in one sentence.",
        ),
    ),
    Task(
        "sns",
        "speech vs non-speech detection",
        "'speech' or 'non-speech'",
        "accuracy",
        ("speech", "non-speech"),
        (
            "Does this audio contain speech? Answer with one of {labels}.",
            "Classify this recording as one of: {labels}.",
            "Is anyone talking in this clip? Reply with one of {labels}.",
            "Detect whether the audio contains human speech.",
            "Determine if this recording is speech or some other sound.",
            "Speech or non-speech: which describes this audio?",
            "Label this clip with one of {labels}.",
            "Is there a human voice in this audio? Answer speech or non-speech.",
            "Tell whether this sound is spoken language or not.",
            "Categorize the audio as speech or non-speech.",
            "Does the clip contain spoken words?",
            "Which category does this audio belong to: {labels}?",
        ),
        (
            "Can you hear a person speaking in this recording? Use one of {labels}.",
            "Decide whether this clip is talk or just sound.",
            "Is the content of this audio spoken language? Choose from {labels}.",
            "Separate speech from noise: which is this clip?",
            "Voice activity check: is this audio speech?",
            "Would you say this recording contains speech or not?",
        ),
    ),
)


def default_registry() -> TaskRegistry:
    """A fresh registry of the built-in tasks (fresh, so registering into it changes no other)."""
    return TaskRegistry(BUILTIN_TASKS)
